"""A request the server refuses with an OpenAI error body and a status other than 400/404."""

from __future__ import annotations


class Refusal(Exception):
    """401, 403, 429, 503, 504: the status, OpenAI's error `type` and `code`, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.code = code
        self.headers = headers or {}


def timed_out(seconds: float) -> Refusal:
    """504 past `request_timeout_s`; `x-should-retry: false` stops openai clients re-running it."""
    return Refusal(
        504,
        f"request timed out after {seconds:g} s and was aborted",
        "timeout",
        "request_timeout",
        {"x-should-retry": "false"},
    )


def client_gone(record) -> Refusal:
    """499 (nginx's status) for a client that hung up; its request record, if any, says so."""
    if record is not None:
        record.finish_reason = "abort"
    return Refusal(499, "client closed the request", "client_closed_request")


def registry_unavailable() -> Refusal:
    """503 for an adapter the registry cannot be read for now (its URI stays in the log)."""
    return Refusal(
        503,
        "the adapter registry cannot be read now",
        "server_error",
        "registry_unavailable",
        {"Retry-After": "10"},
    )
