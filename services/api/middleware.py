"""ASGI middleware: request metrics (outermost, so every answer is counted) and the request body size limit.

The size limit refuses a declared ``Content-Length`` over the limit before reading anything, and counts the
bytes of a body without one (chunked) as they arrive, failing the request with 413 once it is over.
"""

from __future__ import annotations

import asyncio
import json
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.metrics import ApiMetrics

UNMATCHED_ROUTE = "(unmatched)"
#: a declared-too-large body up to this size is read and discarded before the 413, so the client, still
#: sending, reads the answer instead of a reset connection; a larger one is answered at once
DRAIN_BYTES = 16 * 1024 * 1024


class _HttpMiddleware:
    """A pure ASGI middleware that sees HTTP requests (``http``) and passes every other scope (lifespan,
    websocket) straight to the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class MetricsMiddleware(_HttpMiddleware):
    """Counts every HTTP request by method, route template (not the raw path) and status, with latency."""

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started, status = time.perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            seconds = time.perf_counter() - started
            self.metrics.observe(method=scope["method"], route=route, status=status, seconds=seconds)


class BodySizeLimitMiddleware(_HttpMiddleware):
    """413 for request bodies over ``max_bytes`` (declared or counted); 408 when the body stalls for
    ``read_timeout`` seconds (None: no limit)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, read_timeout: float | None = None) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            if declared <= DRAIN_BYTES:
                await _drain(receive)
            await _send_too_large(send, declared=declared, limit=self.max_bytes)
            return
        seen = 0
        body_done = False

        async def counted() -> Message:
            nonlocal seen, body_done
            if body_done or self.read_timeout is None:  # after the body: a disconnect may take any time
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), timeout=self.read_timeout)
                except TimeoutError:  # raised inside the route's body read: the error handler answers
                    raise HTTPException(
                        408, f"the request body stalled: no bytes for {self.read_timeout:g} s"
                    ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.max_bytes:  # raised inside the route's body read: the error handler answers
                    raise HTTPException(413, f"request body is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _drain(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _send_too_large(send: Send, *, declared: int, limit: int) -> None:
    message = f"request body of {declared} bytes is larger than {limit} bytes"
    body = json.dumps({"error": {"code": "payload_too_large", "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


__all__ = ["BodySizeLimitMiddleware", "MetricsMiddleware"]
