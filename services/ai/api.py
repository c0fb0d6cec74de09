"""The ai service's own REST: ``GET /edge``, the bridge as operators see it (not proxied by the gateway)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from services.common import Caller, Forbidden
from shared.bus import AdaptiveLimiter
from shared.bus.edge.pool import EdgeBridge


def routes(bridge: EdgeBridge, limiter: AdaptiveLimiter, model: str) -> APIRouter:
    router = APIRouter(tags=["ai"])

    @router.get("/edge")
    async def edge(actor: Caller) -> dict[str, Any]:
        """Where edge nodes connect, the model the tasks ask for, the worker's adaptive concurrency
        limit, and the bridge's counters and live nodes (admins and services only)."""
        if not (actor.is_admin or actor.is_service):
            raise Forbidden("only admins and services may read the edge bridge's state")
        return {"endpoint": bridge.endpoint, "model": model,
                "serving": len(bridge.nodes(model)),
                "limiter": {"limit": limiter.limit, "held": limiter.held, "minimum": limiter.minimum,
                            "maximum": limiter.maximum, "rate_limited": limiter.reports},
                "stats": asdict(bridge.stats())}

    return router
