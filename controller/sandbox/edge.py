"""The edge middleware that runs before routing."""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.sandbox.catalog import MAX_BODY_BYTES
from controller.sandbox.problems import Problem, problem_response
from controller.sandbox.stats import RequestStats


class EdgeMiddleware:
    """Request id, body size and path hygiene, done before routing like the gateway's
    middleware stack (so a 413 or a ``%2F`` never reaches auth)."""

    def __init__(self, app: ASGIApp, stats: RequestStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id: str | None = None
        content_length: int | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    content_length = None
        if not request_id:
            request_id = str(uuid.uuid4())
        scope["sandbox.request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        problem = self._reject(scope, content_length)
        if problem is not None:
            path: str = scope["path"]
            if not path.startswith("/_sandbox"):
                self.stats.count(scope["method"], "<rejected>")
            await problem_response(path, problem)(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)

    @staticmethod
    def _reject(scope: Scope, content_length: int | None) -> Problem | None:
        if content_length is not None and content_length > MAX_BODY_BYTES:
            return Problem(413, "payload-too-large", f"Request body exceeds {MAX_BODY_BYTES} bytes")
        path: str = scope["path"]
        if path.startswith("/v1/"):
            raw_path: bytes = scope.get("raw_path") or path.encode()
            lowered = raw_path.lower()
            if b"%2f" in lowered or b"%5c" in lowered:
                return Problem(400, "encoded-path-separator", "Encoded path separators are not allowed")
            if any(len(segment) > 128 for segment in path.split("/")):
                return Problem(400, "path-too-long", "Path segment exceeds 128 characters")
        return None
