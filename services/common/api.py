"""A service's own HTTP app: its routers, the JSON error body, ``/health`` and ``/ready`` (which also
shows the outbox: events waiting to be published, and the relay's counters)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from . import errors
from .identity import gateway_key

if TYPE_CHECKING:
    from .service import Service

CHECK_SECONDS = 1.0
R = TypeVar("R")


def service_app(service: Service, routers: Iterable[APIRouter]) -> FastAPI:
    """The FastAPI app a `Service` serves with uvicorn on its port."""
    app = FastAPI(
        title=f"MeetMesh {service.name} service",
        version="0.1.0",
        description="Called by the gateway (which verifies tokens and forwards the user in headers), "
        'not by clients. Every error answers `{"error": {"code", "message"}}`.',
    )
    app.state.service = service
    app.state.gateway_key = gateway_key(service.settings.jwt_secret)
    errors.install(app)
    for router in routers:
        app.include_router(router)
    started = time.time()

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, Any]:
        """Alive: the process answers."""
        return {"status": "ok", "service": service.name, "uptime_s": round(time.time() - started, 1)}

    @app.get("/ready", tags=["ops"], responses={503: {"description": "a backend is unreachable"}})
    async def ready() -> JSONResponse:
        """Ready: the database, Redis and the event broker answer, and the worker and the outbox relay
        run. ``outbox``: events committed but not yet published (``pending``, null if the store
        does not answer), published by this replica, and its relay's last error."""
        checks = {
            "database": await _check(service.database.ping()),
            "redis": await _check(service.redis.ping()),
            "events": await _check(service.events.ping()),
            "worker": service.worker_running,
            "outbox": service.relay.running,
        }
        ok = all(checks.values())
        relay = service.relay
        outbox = {"pending": await _value(service.outbox.pending(service.database)),
                  "published": relay.published, "last_error": relay.last_error}
        return JSONResponse({"status": "ready" if ok else "unavailable", "service": service.name,
                             "checks": checks, "outbox": outbox}, status_code=200 if ok else 503)

    return app


async def _check(probe: Awaitable[Any]) -> bool:
    return bool(await _value(probe))


async def _value(probe: Awaitable[R]) -> R | None:
    """What ``probe`` answers within `CHECK_SECONDS`, or None if it fails or takes longer."""
    with contextlib.suppress(Exception):
        return await asyncio.wait_for(probe, CHECK_SECONDS)
    return None
