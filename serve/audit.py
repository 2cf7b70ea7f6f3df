"""One record per API request, filled as it runs, written as one JSON line when it ends.

`RecordRequests` is a plain ASGI middleware (it wraps streamed bodies without buffering them):
it opens the record, tags the response with `x-request-id` (the openai client reports it as
`response._request_id`), takes the status, and hands the finished record to `on_finish`
(metrics, rate limits, the audit log) even when the client went away mid-stream: a response
whose body did not reach its end is recorded as status 499, finish reason "abort". An error
no handler answered, before the response began, gets OpenAI's shape (500, `server_error`)
with its `x-request-id`, not the bare text of Starlette's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import ConfigError
from serve.protocol import error_body, new_id

log = logging.getLogger(__name__)

SCOPE_KEY = "loraplex.record"


@dataclass
class RequestRecord:
    request_id: str
    endpoint: str  # the route, e.g. /v1/chat/completions
    started: float = field(default_factory=time.monotonic)
    key_id: str | None = None
    caller: Any = None  # the api_keys.Caller, charged for the tokens when the request ends
    reserved_tokens: int = 0  # taken from the caller's budget when it was queued
    model: str | None = None  # the base or adapter the request ran on, loaded or unloaded
    adapter_uid: str | None = None  # the adapter version it ran on
    prompt: Any = None  # messages or prompt; written only with audit.include_prompts
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None  # monotonic
    status: int = 0
    latency_s: float = 0.0


class RecordRequests:
    def __init__(self, app, on_finish: Callable[[RequestRecord], None], in_flight: set[str]):
        self.app = app
        self.on_finish = on_finish
        self.in_flight = in_flight  # ids of the requests begun and not yet finished

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith("/v1/") or path in _UNVERSIONED):
            await self.app(scope, receive, send)
            return
        record = RequestRecord(new_id("req"), _endpoint(scope["path"]))
        scope[SCOPE_KEY] = record
        self.in_flight.add(record.request_id)
        ended = False  # the body's last part was sent
        failed = False  # the app raised after the response began

        async def send_with_id(message):
            nonlocal ended
            if message["type"] == "http.response.start":
                record.status = message["status"]
                request_id = (b"x-request-id", record.request_id.encode())
                message = {**message, "headers": [*message.get("headers", []), request_id]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if record.status:  # the response has begun: it cannot become an error now
                failed = True
                record.finish_reason = "error"
                raise
            log.exception("%s %s failed", scope["method"], scope["path"])
            body = json.dumps(error_body("internal server error", "server_error")).encode()
            headers = [(b"content-type", b"application/json")]
            await send_with_id({"type": "http.response.start", "status": 500, "headers": headers})
            await send_with_id({"type": "http.response.body", "body": body})
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            # The client went away mid-stream (unless the server cut a stream it stopped reading)
            if record.status and not ended and not failed and record.finish_reason != "timeout":
                record.status = 499
                record.finish_reason = "abort"
            record.latency_s = time.monotonic() - record.started
            try:
                self.on_finish(record)
            finally:
                self.in_flight.discard(record.request_id)


# vLLM's routes outside /v1 that are requests like the others (keys, audit, metrics)
_UNVERSIONED = ("/tokenize", "/detokenize")


def _endpoint(path: str) -> str:
    """The route, so that metrics labels stay few whatever paths clients send."""
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    known = {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/adapters",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        *_UNVERSIONED,
    }
    return path if path in known else "other"


class AuditLog:
    """Appends one JSON line per request; never the API key, the prompt only when asked."""

    def __init__(self, path: Path, include_prompts: bool = False):
        self.path = Path(path)
        self.include_prompts = include_prompts
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"audit.path: cannot append to {self.path}: {e.strerror}") from None
        self._lock = threading.Lock()

    def write(self, record: RequestRecord) -> None:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "request_id": record.request_id,
            "key_id": record.key_id,
            "endpoint": record.endpoint,
            "model": record.model,
            "adapter_uid": record.adapter_uid,
            "status": record.status,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "finish_reason": record.finish_reason,
            "latency_s": round(record.latency_s, 4),
        }
        if self.include_prompts:
            line["prompt"] = record.prompt
        with self._lock:
            if self._file.closed:  # a request that outlived the server's shutdown
                log.warning("audit log closed: request %s not recorded", record.request_id)
                return
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
