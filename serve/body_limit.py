"""Request bodies past a size limit are refused (413) before the server reads them whole."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve.protocol import error_body


class LimitBody:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 (by its
    Content-Length before any of it is read, else as soon as the bytes read pass it)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is over the limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            refusal = JSONResponse(error_body(message, "invalid_request_error"), status_code=413)
            await refusal(scope, receive, send)
            return
        read = 0

        async def counted():
            nonlocal read
            received = await receive()
            read += len(received.get("body", b""))
            if read > self.max_bytes:  # chunked, or longer than it said
                raise HTTPException(413, message)
            return received

        await self.app(scope, counted, send)
