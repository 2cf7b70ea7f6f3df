"""The server's refusals as OpenAI-shaped error bodies: each exception type, its status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from registry.config_file import is_union_member
from registry.errors import AdapterError, NotFoundError, UsageError
from serve.async_engine import EngineStepError, QueueFull, RequestFailed
from serve.audit import SCOPE_KEY
from serve.protocol import error_body
from serve.refusal import Refusal, client_gone


def install_error_handlers(app: FastAPI) -> None:
    """400 for the request's own mistakes, 404/405 for unknown models, routes and methods,
    500 for a failed engine step, 503 for a full queue, and each `Refusal`'s own status.
    Any other exception is a bug: a 500 (`serve.audit.RecordRequests`)."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        # The deepest error: of a union's branches, the one that got furthest (an image part
        # fails `str` at the content, and `list[TextPart]` at the part's type).
        first = max(error.errors(), key=lambda e: len(e["loc"]))
        field = ".".join(str(p) for p in first["loc"] if p != "body" and not is_union_member(p))
        message = f"{field}: {first['msg']}"
        if first["type"] == "json_invalid":  # its loc is a character offset, not a field
            field, reason = None, first.get("ctx", {}).get("error", first["msg"])
            message = (
                f"the request body is not valid JSON: {reason} (at character {first['loc'][-1]})"
            )
        elif not field:  # the body as a whole: missing, or not a JSON object
            field = None
            message = (
                "the request body is missing: send a JSON object"
                if first["type"] == "missing"
                else "the request body must be a JSON object, sent with Content-Type: "
                f"application/json ({first['msg']})"
            )
        return JSONResponse(error_body(message, "invalid_request_error", field), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException):
        if isinstance(error.__cause__, ClientDisconnect):  # FastAPI's 400 for a cut body
            return await _refused(request, client_gone(request.scope.get(SCOPE_KEY)))
        message = error.detail  # Starlette's own: unknown routes (404), methods (405), 413
        if error.status_code in (404, 405):
            message = f"{error.detail}: {request.method} {request.url.path}"
        return JSONResponse(
            error_body(message, "invalid_request_error"),
            status_code=error.status_code,
            headers=error.headers,
        )

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, error: NotFoundError):
        return JSONResponse(
            error_body(
                str(error), "invalid_request_error", error.param or "model", "model_not_found"
            ),
            status_code=404,
        )

    # The request's own mistakes only: any other ValueError is a bug, a 500.
    @app.exception_handler(UsageError)
    async def _bad_value(request: Request, error: UsageError):
        code = getattr(error, "code", None)  # InvalidField's
        return JSONResponse(
            error_body(str(error), "invalid_request_error", error.param, code), status_code=400
        )

    @app.exception_handler(EngineStepError)
    async def _step_failed(request: Request, error: EngineStepError):
        request.scope[SCOPE_KEY].finish_reason = "error"
        return await _refused(request, engine_failed(error))

    @app.exception_handler(Refusal)
    async def _refused(request: Request, error: Refusal):
        return JSONResponse(
            error_body(str(error), error.kind, None, error.code),
            status_code=error.status,
            headers=error.headers,
        )

    @app.exception_handler(QueueFull)
    async def _overloaded(request: Request, error: QueueFull):
        return JSONResponse(
            error_body(f"server overloaded: {error}", "server_overloaded", None, "queue_full"),
            status_code=503,
            headers={"Retry-After": "1"},
        )


def engine_failed(error: EngineStepError) -> Refusal:
    """500 for a request the engine could not serve. A request it ended alone is told why in
    words of its own: the error (logged) names the server's folders."""
    if not isinstance(error, RequestFailed):
        message = f"the engine step computing this request failed: {error}"
        return Refusal(500, message, "server_error", "engine_step_failed")
    if isinstance(error.__cause__, AdapterError):
        why = "its adapter could not be read back from where it was loaded; load it again"
    else:
        why = "making its output failed (a bug, in the server's log)"
    return Refusal(
        500, f"the engine could not serve this request: {why}", "server_error", "request_failed"
    )
