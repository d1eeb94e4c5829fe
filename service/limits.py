"""ASGI middleware that caps request bodies (BentoML 1.4 has no setting for it): 413 with a message, never a 500."""

from __future__ import annotations

import json
import os

#: Largest request body accepted, in bytes (HEADSTART_MAX_REQUEST_BYTES, default 32 MiB).
MAX_REQUEST_BYTES = int(os.environ.get("HEADSTART_MAX_REQUEST_BYTES", 32 * 1024 * 1024))


class BodyTooLarge(Exception):
    pass


class RequestSizeLimit:
    """Refuses bodies over ``max_bytes``: at once from Content-Length, or while streaming a chunked body."""

    def __init__(self, app, max_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send) -> None:
        body = json.dumps({
            "error": f"Request body larger than {self.max_bytes} bytes. Send smaller images (or fewer per request)."
        }).encode()  # fmt: skip
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length > self.max_bytes or length < 0:
                    await self._reject(send)
                    return
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send)
