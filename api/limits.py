"""Request body limits, enforced while the body streams in (a client can lie about its length)."""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, error_body


class BodyLimit:
    """Refuse bodies over `limit` bytes (`upload_limit` on `upload_paths`) with a 413 naming `body`.

    A declared Content-Length over the limit is refused before reading; a chunked body is counted
    as it arrives and cut off by raising `ApiError` from `receive`, which FastAPI passes through
    its body parsing and renders like any other refusal.
    """

    def __init__(self, app: ASGIApp, *, limit: int, upload_limit: int, upload_paths: re.Pattern[str]) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if self.upload_paths.match(scope["path"]) else self.limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _refuse(send, 400, "bad_request", "Content-Length is not a number")
                return
            if int(declared) > limit:
                await _refuse(send, 413, "too_large", f"body of {int(declared)} bytes exceeds {limit}")
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, f"body exceeds {limit} bytes", field="body")
            return message

        await self.app(scope, counted, send)


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps(error_body(code, message, "body")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
