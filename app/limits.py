"""The request-body cap: a body over ``max_body_bytes`` is answered 413 before the app reads it.

A declared ``Content-Length`` over the cap is refused without reading anything; a body without one (chunked) is
read only up to the cap, so no request holds more than ``max_body_bytes`` in memory.
"""

from __future__ import annotations

import json
from typing import Any

from app.errors import error_body


def too_large_message(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes (RESTORELCC_MAX_BODY_BYTES)"


class BodyLimitMiddleware:
    """Pure ASGI: buffers at most ``max_bytes`` of the body, then hands it on unchanged."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        messages: list[dict] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away: let the app see it
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(error_body("request_too_large", too_large_message(self.max_bytes))).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})
