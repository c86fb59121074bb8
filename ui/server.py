"""The FastAPI app of the master: OpenAI routes, health, status and metrics, and the ASGI
layers around them (access log, request counts, API key, body size limit).

`/` is left free: the Gradio UI is mounted there by the caller."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference.async_engine import AsyncEngine

from .auth import bearer_ok
from .errors import APIError, error_response, install_handlers
from .images import ImageLimits
from .metrics import CountRequests, RequestCounts
from .metrics import router as metrics_router
from .openai_api import router
from .response_store import ResponseStore
from .responses_api import router as responses_router
from .status_api import router as status_router

log = logging.getLogger(__name__)


def _is_api(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class AccessLog:
    """One log line per request: method, path, status, milliseconds (until the last byte)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # what the server answers if the app raises before responding

        async def send_logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, (time.perf_counter() - t0) * 1e3)


class ApiKeyAuth:
    """With a key set, every /v1/* call needs `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_api(scope["path"]) and not bearer_ok(scope["headers"], self._key):
            err = APIError(
                401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )
            await error_response(err, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ApiCors:
    """CORS for the API (/v1/*, /health, /healthz) and nothing else (the Gradio page keeps its
    own): preflights from `origins` ("*": any) are answered here, before the API key is
    asked for, and every answer to such an origin says it may read it. Credentials are the
    bearer key, never cookies, so no origin is told it may send cookies."""

    def __init__(self, app: ASGIApp, origins: tuple[str, ...]):
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=list(origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],  # echoed: covers Authorization and the SDKs' x-stainless-* headers
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (_is_api(path) or path in ("/health", "/healthz")):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than {limit} bytes.", code="request_too_large")


class BodyLimit:
    """Refuses /v1/* bodies over `limit` bytes: at once from Content-Length, and while
    reading a chunked body (the route's read raises BodyTooLarge, answered as a 413).
    A callable `limit` is asked per request (it grows once a vision model is loaded)."""

    def __init__(self, app: ASGIApp, limit: int | Callable[[], int]):
        self.app = app
        self._limit = limit

    @property
    def limit(self) -> int:
        return self._limit() if callable(self._limit) else self._limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_api(scope["path"]):
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await error_response(APIError(400, "Invalid Content-Length header."))(scope, receive, send)
                return
            if size > limit:
                await error_response(BodyTooLarge(limit))(scope, receive, send)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


def build_app(
    engine: AsyncEngine,
    api_key: str | None = None,
    allowed_origins: tuple[str, ...] = (),
    max_body_bytes: int = 1 << 20,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    status_extra: Callable[[], dict] | None = None,
    image_limits: ImageLimits | None = None,
) -> FastAPI:
    """The master's app over an AsyncEngine, whose model may still be loading (generation
    routes answer 503 until it is attached). The lifespan starts the engine's model thread
    (a no-op without a model yet), runs `on_startup` on the server's event loop (the
    cluster manager starts there), and shuts the engine down with the server.
    `status_extra()` adds keys (nodes, plan) to GET /api/status; with `api_key`, a caller
    without it sees only what the status page shows anyone (no addresses, no ports), and
    GET /metrics answers 401 (Prometheus sends the key as a bearer token).
    `allowed_origins`: web pages that may call the API from a browser (CORS; none by default).
    `image_limits`: how pictures in chat messages are read (remote URLs off by default)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="ringllm", lifespan=lifespan)
    app.state.engine = engine
    app.state.status_extra = status_extra
    app.state.api_key = api_key
    app.state.created = int(time.time())
    app.state.image_limits = image_limits or ImageLimits()
    app.state.responses = ResponseStore()  # kept responses (the Responses API's store)
    app.state.request_counts = RequestCounts()  # generation requests by outcome (GET /metrics)
    install_handlers(app)
    # The routers of the API, in order: `router` last, as its catch-all answers unknown /v1
    # paths (a 405 lists the methods these routers take for the path).
    app.state.api_routers = (responses_router, router)
    for api in app.state.api_routers:
        app.include_router(api)
    app.include_router(metrics_router)
    app.include_router(status_router)

    def body_limit() -> int:
        # A vision model's pictures come as base64 data: URLs in the body (4/3 of their bytes).
        if not engine.has_vision:
            return max_body_bytes
        return max_body_bytes + app.state.image_limits.max_bytes * 4 // 3

    # add_middleware wraps: the last added runs first. Order: log -> count -> CORS -> auth ->
    # body limit (a request refused for its key or size counts as an error).
    app.add_middleware(BodyLimit, limit=body_limit)
    if api_key:
        app.add_middleware(ApiKeyAuth, api_key=api_key)
    if allowed_origins:
        app.add_middleware(ApiCors, origins=allowed_origins)
    app.add_middleware(CountRequests, counts=app.state.request_counts)
    app.add_middleware(AccessLog)
    return app
