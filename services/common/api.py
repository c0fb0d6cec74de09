"""A service's own HTTP app: its routers, the JSON error body, ``/health`` and ``/ready``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from . import errors
from .identity import gateway_key

if TYPE_CHECKING:
    from .service import Service

CHECK_SECONDS = 1.0


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
        """Ready: the database, Redis and the event broker answer, and the worker runs."""
        checks = {
            "database": await _check(service.database.ping()),
            "redis": await _check(service.redis.ping()),
            "events": await _check(service.events.ping()),
            "worker": service.worker_running,
        }
        ok = all(checks.values())
        return JSONResponse({"status": "ready" if ok else "unavailable", "service": service.name,
                             "checks": checks}, status_code=200 if ok else 503)

    return app


async def _check(probe: Awaitable[Any]) -> bool:
    with contextlib.suppress(Exception):
        return bool(await asyncio.wait_for(probe, CHECK_SECONDS))
    return False
