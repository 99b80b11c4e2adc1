"""Limits on what a client may send before any route sees it: body size, body time, body encoding.

`BodyLimitMiddleware` reads the whole request body itself, before routing and parsing:

- a Content-Length over `max_body_bytes` is answered 413 without keeping a byte of it;
- a body without a length (chunked) is counted while it streams and answered 413 as soon as it
  passes the cap, so no more than `max_body_bytes` plus one chunk is ever held;
- before a 413, the rest of a body of at most `DRAIN_FACTOR` x the cap is read and discarded
  (within the body deadline): a client still sending when the server closes the connection gets
  a reset instead of the 413, so an ordinary client that posts too much would never learn why;
  a larger body is refused at once, the connection closed under it;
- a body that has not fully arrived `body_read_timeout_s` after the headers is answered 408 and
  the connection closed (a slow client cannot hold a connection and a task open without limit);
- a JSON body (or one with no content type, which FastAPI parses as JSON) that is not UTF-8 is
  answered 400: `json.loads` would otherwise guess UTF-16/32, or turn UTF-8-encoded surrogates
  into lone surrogates.

The route then reads the buffered body as usual. Limits on the headers themselves (size, and
the idle time between requests) are uvicorn's, set from the same settings in `serve.py`.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flashstep.server.errors import error_response
from flashstep.server.metrics import Metrics

# How much of a refused body is read and thrown away so the client can read its 413 (see above).
DRAIN_FACTOR = 2


class BodyLimitMiddleware:
    """Pure ASGI: buffer the request body under a size cap and a deadline, then call the app."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_read_timeout_s: float, metrics: Metrics):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout_s = body_read_timeout_s
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_read_timeout_s
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            if int(declared) <= DRAIN_FACTOR * self.max_body_bytes:
                await self._drain(receive, deadline)
            await self._refuse(scope, receive, send, 413, "too_large", self._too_large(f"is {int(declared)} bytes"))
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - loop.time(), 0))
            except TimeoutError:
                message = None
            if message is None:
                await self._refuse(
                    scope, receive, send, 408, "timeout",
                    f"the request body did not arrive within body_read_timeout_s={self.body_read_timeout_s:g} s",
                )  # fmt: skip
                return
            if message["type"] == "http.disconnect":
                return  # nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                chunks.clear()
                if message.get("more_body", False):
                    await self._drain(receive, deadline, already=size)
                await self._refuse(scope, receive, send, 413, "too_large", self._too_large("passed it"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _is_json(headers.get(b"content-type")) and not _is_utf8(body):
            await self._refuse(scope, receive, send, 400, "not_utf8", "the request body is not valid UTF-8 JSON")
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads only wait for the client to disconnect

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, deadline: float, already: int = 0) -> None:
        """Read and discard the rest of a refused body: up to DRAIN_FACTOR x the cap, until the deadline."""
        loop = asyncio.get_running_loop()
        size = already
        while size <= DRAIN_FACTOR * self.max_body_bytes:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - loop.time(), 0))
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _too_large(self, what: str) -> str:
        return f"the request body {what}: max_body_bytes is {self.max_body_bytes}"

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, reason: str, message: str) -> None:
        self.metrics.bodies_refused.labels(reason).inc()
        code = {413: "request_too_large", 408: "request_timeout", 400: "invalid_encoding"}[status]
        error_type = "timeout_error" if status == 408 else "invalid_request_error"
        # The unread rest of the body would be parsed as the next request: close the connection.
        response = error_response(status, message, error_type, headers={"Connection": "close"}, code=code)
        await response(scope, receive, send)


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return True
    media_type = content_type.split(b";", 1)[0].strip().lower()
    return media_type == b"application/json" or media_type.endswith(b"+json")


def _is_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
