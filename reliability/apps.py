"""The handlers that chaos worker processes run (``meetmesh worker --app reliability.apps:chaos``).

Each execution is recorded in the scenario's Redis, so the count survives the worker that made it:
``HINCRBY <prefix>:chaos:runs <task id> 1`` (and ``INCR <prefix>:chaos:total``) once the handler's
work is done (an execution whose worker died before that point did no work anyone saw). The worker
process reads the Redis URL and the key prefix from ``MEETMESH_REDIS_URL`` and ``MEETMESH_KEY_PREFIX``,
as every ``meetmesh`` command does.

Message type ``chaos.work``, payload ``{"ms": milliseconds of simulated work}``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from redis.asyncio import Redis

from shared.bus import Context, Router
from shared.bus.connection import client

WORK_TYPE = "chaos.work"
_clients: dict[int, Redis] = {}


def runs_key(prefix: str) -> str:
    """The hash of task id -> finished executions."""
    return f"{prefix}:chaos:runs"


def total_key(prefix: str) -> str:
    """A counter of all finished executions (the scenarios watch it move)."""
    return f"{prefix}:chaos:total"


def _redis() -> Redis:
    """One client per event loop (a worker process has one; it connects lazily, and reconnects)."""
    loop_id = id(asyncio.get_running_loop())
    redis = _clients.get(loop_id)
    if redis is None:
        redis = _clients[loop_id] = client(os.environ["MEETMESH_REDIS_URL"])
    return redis


chaos = Router()


@chaos.handler(WORK_TYPE)
async def work(ctx: Context) -> dict[str, Any]:
    payload = ctx.payload or {}
    await asyncio.sleep(float(payload.get("ms", 0)) / 1000)
    prefix = os.environ["MEETMESH_KEY_PREFIX"]
    async with _redis().pipeline(transaction=False) as pipe:
        pipe.hincrby(runs_key(prefix), ctx.message.id, 1)
        pipe.incr(total_key(prefix))
        runs, _ = await pipe.execute()
    return {"run": int(runs)}
