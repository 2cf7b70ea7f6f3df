"""Limits on a request body: past a size it is refused (413) before the server reads it whole,
and one that has not arrived by the request's deadline gets 408."""

from __future__ import annotations

import asyncio

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serve.protocol import error_body


class LimitBody:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 (by its
    Content-Length before any of it is read, else as soon as the bytes read pass it). A body
    still incomplete `timeout_s` after the request came is refused with 408: the engine's
    deadline starts only once the body is read, and a client that stalls mid-body would
    otherwise hold its connection for as long as it likes."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

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
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        read = 0
        complete = False  # after the body, receive() waits for the client to hang up: no limit

        async def counted():
            nonlocal read, complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    received = await receive()
            except TimeoutError:
                raise HTTPException(
                    408, f"the request body did not arrive within {self.timeout_s:g} s"
                ) from None
            read += len(received.get("body", b""))
            if read > self.max_bytes:  # chunked, or longer than it said
                raise HTTPException(413, message)
            complete = received["type"] != "http.request" or not received.get("more_body")
            return received

        await self.app(scope, counted, send)
