"""Pure ASGI middleware: API-key check, request-body limit, per-route request metrics, and the
last-resort answer for bugs."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from winnow.server.errors import ClientDisconnectedError, PayloadTooLargeError, UnauthorizedError, error_response
from winnow.server.state import ServerState

logger = logging.getLogger(__name__)

# Liveness probes stay open even with --api-key, so orchestrators need no secret.
OPEN_PATHS = frozenset({"/health", "/ping"})


class ApiKeyMiddleware:
    """With API keys configured, every route but the liveness probes needs ``Authorization: Bearer <key>``."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if not self.state.check_api_key(_header(scope, b"authorization")):
            error = UnauthorizedError("Missing or invalid API key; send `Authorization: Bearer <key>`.")
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the whole request body up front (FastAPI would anyway) and refuses one over the limit with 413."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLargeError(f"The request body is larger than {self.max_bytes} bytes.")
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(too_large)(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await error_response(too_large)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)


class InternalErrorMiddleware:
    """An exception no handler maps (a bug) becomes a 500 without internals, logged here with its
    traceback. Starlette's own last-resort handler re-raises after answering, and uvicorn then
    drops the connection, so a keep-alive client's next request would meet a reset."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception as exc:
            if started:  # part of an answer is out; nothing valid can follow it
                raise
            logger.exception("Internal error while serving %s %s", scope.get("method"), scope.get("path"))
            await error_response(exc)(scope, receive, send)


class MetricsMiddleware:
    """Counts requests by route template and status, and times them end to end."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), ClientDisconnectedError.status

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            # No answer at all: the client left before its body arrived ("disconnected", 499; a bug
            # is answered 500 by InternalErrorMiddleware). Answers given before routing (401, 413)
            # are "refused"; unknown paths are "unmatched".
            route = getattr(scope.get("route"), "path", None) or _UNROUTED.get(status, "unmatched")
            metrics = self.state.metrics
            metrics.requests.labels(route=route, status=str(status)).inc()
            metrics.request_seconds.labels(route=route).observe(time.perf_counter() - started)


_UNROUTED = {401: "refused", 413: "refused", ClientDisconnectedError.status: "disconnected"}


def _header(scope: Scope, name: bytes) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def install_middleware(app: Any, state: ServerState) -> None:
    # Added last runs first: metrics see every answer, including 401, 413 and 500.
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.settings.max_request_body_bytes)
    app.add_middleware(ApiKeyMiddleware, state=state)
    app.add_middleware(MetricsMiddleware, state=state)
