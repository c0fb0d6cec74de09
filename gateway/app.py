"""The gateway application: ``create_app()`` wires Redis, the event bus, the dispatcher, the
session hub and live updates into FastAPI; ``meetmesh gateway`` serves it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from shared.bus import EventBus, connect
from shared.bus.dispatch.dispatcher import Dispatcher

from . import errors, logs, rest, upstream, ws
from .auth import Admin
from .hub import SessionHub
from .limits import BodyLimit, user_limits
from .live import Live
from .metrics import Metrics
from .settings import GatewaySettings
from .task_routes import TASK_ROUTES

log = logging.getLogger(__name__)
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


GC_THRESHOLDS = (10_000, 20, 100)  # allocations before a young collection; young ones before older


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway as an ASGI app. Connections are made in its lifespan, not here."""
    logs.install()  # no token or secret in any log line, from any logger (see gateway.logs)
    settings = settings or GatewaySettings.load()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logs.install()  # again: uvicorn (or the embedding app) may have configured logging since
        redis = await connect(settings.redis_url)
        events = EventBus.from_url(settings.events, service="gateway", prefix=settings.key_prefix)
        await events.start()
        # Updates go through the broker only while another gateway follows them: a lone gateway
        # (or the one relaying) hands its sessions their updates directly.
        limits = user_limits(redis, settings)  # per user, shared by every gateway (docs/gateway.md, Limits)
        dispatcher = Dispatcher(redis, events=events, routes=TASK_ROUTES, prefix=settings.key_prefix,
                                relay_broadcast="followed", admission=limits,
                                queue_options={**settings.retention,
                                               "max_message_bytes": settings.max_payload_bytes})
        hub = SessionHub(
            replay_window=settings.replay_window,
            replay_max=settings.replay_max,
            send_buffer=settings.send_buffer,
            # Liveness of an attached socket is uvicorn's protocol pings (a client answering them is
            # not silent, though it may send no frame for hours); the hub only reaps dropped sessions.
            idle_timeout=float("inf"),
        )
        live = Live(events, hub)
        if dispatcher.relay is not None:  # while this gateway relays, its own sessions skip the broker
            dispatcher.relay.local = live.update
        app.state.redis, app.state.events, app.state.dispatcher = redis, events, dispatcher
        app.state.hub, app.state.live = hub, live
        app.state.limits = limits
        live.start()
        if dispatcher.relay is not None:  # before serving: the relay holder must know we are here
            await dispatcher.relay.follow()
        # Move everything allocated so far out of the collector's sight: with thousands of sockets
        # connecting at once, full collections over it froze every socket for up to 1.8 s.
        gc.collect()
        gc.freeze()
        # And collect less often: nearly all of a gateway's garbage is freed by reference counting.
        # Measured with `meetmesh bench ws` (10,000 sockets): Python's defaults (700, 10, 10) spent
        # 7.6 s of a run in collections (a 1.7 s full one while the sockets connected, then a 1-2 ms
        # one every 20 ms); these spent 1.6 s, and the sockets connected in 10 s instead of 14.
        gc.set_threshold(*GC_THRESHOLDS)
        background = [
            asyncio.create_task(dispatcher.run(), name="dispatcher"),
            asyncio.create_task(limits.run(), name="socket-slots"),
            asyncio.create_task(_reap(hub, app.state.metrics), name="session-reaper"),
            asyncio.create_task(app.state.metrics.refresh_queues(dispatcher.queues), name="metrics"),
            asyncio.create_task(app.state.metrics.sample_loop_lag(), name="loop-lag"),
        ]
        try:
            yield
        finally:
            dispatcher.stop()
            limits.stop()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await live.stop()
            await app.state.services.aclose()  # MeetMesh services: the proxy's HTTP client
            await events.stop()
            await redis.aclose()

    app = FastAPI(
        title="MeetMesh gateway",
        version="0.1.0",
        lifespan=lifespan,
        description="Submit tasks to MeetMesh's services and watch them live (REST, SSE, WebSocket "
        "`/ws`). REST takes the JWT as `Authorization: Bearer <JWT>`. `/ws` takes it, preferred first, "
        "as `Sec-WebSocket-Protocol: bearer, <JWT>` (the answer names only `bearer`), as a first frame "
        '`{"type": "auth", "token": "<JWT>"}` within 5 s, or as `/ws?token=<JWT>` (older clients only: '
        "a URL reaches proxies' logs). "
        'Every error answers `{"error": {"code", "message"}}`.',
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.started = time.time()
    app.state.gateway_stats = lambda: _stats(app)
    # REST bodies are bounded before they are read (uploads have their own bound, MEETMESH_MEDIA_MAX_BYTES)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes, exempt=frozenset({"/api/v1/media"}))
    errors.install(app)
    app.include_router(rest.router)
    app.include_router(ws.router)
    upstream.install(app, settings)  # MeetMesh services: their REST under /api/v1, proxied

    def openapi() -> dict[str, Any]:
        """FastAPI's document less the 422 it adds to every operation: invalid input answers 400 here,
        as each operation's responses say."""
        document = app.openapi_schema
        if document is None:
            document = FastAPI.openapi(app)
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    answers = operation.get("responses", {})
                    answers.pop("422", None)
                    operation["responses"] = dict(sorted(answers.items()))
            for unused in ("HTTPValidationError", "ValidationError"):
                document.get("components", {}).get("schemas", {}).pop(unused, None)
        return document

    app.openapi = openapi  # type: ignore[method-assign]

    @app.middleware("http")
    async def timed(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        response: Response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        method = (
            request.method if request.method in _METHODS else "other"
        )  # clients pick methods: bound labels
        app.state.metrics.requests.labels(method, path).observe(time.perf_counter() - started)
        if 400 <= response.status_code < 500:
            app.state.metrics.client_errors.labels(str(response.status_code)).inc()
        return response

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, Any]:
        """Alive: the process answers."""
        return {"status": "ok", "uptime_s": round(time.time() - app.state.started, 1)}

    @app.get("/ready", tags=["ops"], responses={503: {"description": "a backend is unreachable"}})
    async def ready(request: Request) -> JSONResponse:
        """Ready: Redis and the event broker both answer."""
        checks = {"redis": False, "events": False}
        with contextlib.suppress(Exception):
            checks["redis"] = bool(await asyncio.wait_for(request.app.state.redis.ping(), 1.0))
        with contextlib.suppress(Exception):
            checks["events"] = await asyncio.wait_for(request.app.state.events.ping(), 1.0)
        ok = all(checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
        )

    @app.get(
        "/metrics", tags=["ops"], response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, **errors.responses(401, 403)},
    )
    async def metrics(principal: Admin) -> Response:
        """Prometheus text: sockets, frames, errors, request times, queue depths, rates, latencies.
        Admins only (a scraper sends an admin bearer token): queue depths and rates are not public."""
        return Response(app.state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _stats(app: FastAPI) -> dict[str, Any]:
    """Only called by `GET /stats`, after the lifespan made the hub and live updates."""
    return {
        "sessions": app.state.hub.stats,
        "updates_relayed": app.state.live.relayed,
        "uptime_s": round(time.time() - app.state.started, 1),
    }


async def _reap(hub: SessionHub, metrics: Metrics, every: float = 1.0) -> None:
    """Close idle sessions and forget dropped ones past their resume window."""
    while True:
        await asyncio.sleep(every)
        try:
            hub.reap()
            stats = hub.stats
            metrics.sessions.set(stats.get("sessions", 0))
        except Exception:
            log.exception("session reaper")
