"""Refuse oversized bodies on the coordinator's JSON API with a JSON 413 before anything reads them."""
from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


class DeclaredBodyLimit:
    """ASGI middleware: a request under `prefix` whose Content-Length exceeds `limit` gets 413 at once.

    Chunked bodies (no Content-Length) are capped by the router's own `max_body_size` as they stream in.
    """

    def __init__(self, app: ASGIApp, prefix: str, limit: int):
        self.app = app
        self.prefix = prefix
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            for name, value in scope["headers"]:
                if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                    response = JSONResponse({"error": {"code": "too_large", "message":
                                             f"the request body is over {self.limit} bytes; this API takes small "
                                             "JSON documents"}}, status_code=413)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
