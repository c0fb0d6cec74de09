"""Handler routers for worker processes started by the crash tests.

A child worker runs ``python -m meetmesh worker --app tests.bus.queue.apps:<router> ...`` with
``MEETMESH_REDIS_URL`` and ``MEETMESH_KEY_PREFIX`` set to the test's Redis and key prefix. The
handlers record what they did in Redis under ``<prefix>:app:...`` (so the test's clean-up removes
it), which lets the test count executions after the worker process has been killed.

- ``counting``: type ``count``; payload ``{"sleep": seconds | [first, later...]}``. Counts starts
  (``started``) and finished executions (``runs``) per task id, and all finished ones (``total``).
- ``pipeline``: types ``pipe.0`` -> ``pipe.1`` -> ``pipe.2``, one stage each, chained with
  ``ctx.then``; every execution appends ``stage:<n>`` to the task's ``stages`` list first.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from redis.asyncio import Redis

from shared.bus import Context, Router
from shared.bus.connection import client

PIPELINE_STAGES = 3

_clients: dict[int, Redis] = {}


def app_key(prefix: str, *parts: str) -> str:
    """``<prefix>:app:<parts...>``: where the handlers record their executions."""
    return ":".join([prefix, "app", *parts])


def runs_key(prefix: str, task_id: str) -> str:
    return app_key(prefix, "runs", task_id)


def started_key(prefix: str, task_id: str) -> str:
    return app_key(prefix, "started", task_id)


def stages_key(prefix: str, task_id: str) -> str:
    return app_key(prefix, "stages", task_id)


def total_key(prefix: str) -> str:
    return app_key(prefix, "total")


def _prefix() -> str:
    return os.environ["MEETMESH_KEY_PREFIX"]


def _redis() -> Redis:
    """One client per event loop (a worker process has one loop; the client connects lazily)."""
    loop_id = id(asyncio.get_running_loop())
    redis = _clients.get(loop_id)
    if redis is None:
        redis = _clients[loop_id] = client(os.environ["MEETMESH_REDIS_URL"])
    return redis


def _pick_sleep(spec: Any, nth: int) -> float:
    """``spec`` is seconds, or a list: seconds for the 1st, 2nd, ... start (the last one repeats)."""
    if isinstance(spec, list):
        return float(spec[min(nth, len(spec)) - 1]) if spec else 0.0
    return float(spec or 0.0)


counting = Router()


@counting.handler("count")
async def count(ctx: Context) -> dict[str, Any]:
    prefix, task_id = _prefix(), ctx.message.id
    redis = _redis()
    payload = ctx.payload or {}
    nth = int(await redis.incr(started_key(prefix, task_id)))
    await asyncio.sleep(_pick_sleep(payload.get("sleep"), nth))
    async with redis.pipeline(transaction=False) as pipe:
        pipe.incr(runs_key(prefix, task_id))
        pipe.incr(total_key(prefix))
        runs, _ = await pipe.execute()
    return {"run": runs, "pid": os.getpid()}


pipeline = Router()


async def _stage(ctx: Context) -> dict[str, Any] | None:
    stage = ctx.message.stage
    payload = ctx.payload or {}
    await _redis().rpush(stages_key(_prefix(), ctx.message.id), f"stage:{stage}")  # type: ignore[misc]
    await asyncio.sleep(float(payload.get("sleep", 0.0)))
    if stage + 1 < PIPELINE_STAGES:
        ctx.then(f"pipe.{stage + 1}", payload, delay=float(payload.get("delay", 0.0)))
        return None
    return {"stage": stage}


for _n in range(PIPELINE_STAGES):
    pipeline.add(f"pipe.{_n}", _stage)
