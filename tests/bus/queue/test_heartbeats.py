"""The queue's worker set: a worker killed without deregistering leaves it once judged dead."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shared.bus import Queue, Router, Worker
from tests.bus.queue.test_crash import Child, spawn, until

__all__ = ["spawn"]  # the fixture, shared with the crash tests

MakeQueue = Callable[..., Queue]


async def members(queue: Queue) -> list[str]:
    return list(await queue.redis.zrange(queue.keys.workers, 0, -1))


async def test_a_killed_worker_leaves_the_worker_set_once_judged_dead(
        make_queue: MakeQueue, spawn: Callable[..., Child], run_worker: Callable[..., Any]) -> None:
    queue = make_queue("q")
    child = spawn("counting", lease=1.0)
    ghost = await child.ready(queue)
    assert (await queue.stats()).consumers == 1
    child.kill()  # SIGKILL: no deregistration, its heartbeat entry stays behind
    assert await child.exited() != 0
    assert ghost in await members(queue)

    async def not_counted() -> bool:
        return (await queue.stats()).consumers == 0

    await until(not_counted, 20, "stats to stop counting the killed worker (its lease has run out)")
    # Any live worker's heartbeat drops it from the set for good.
    async with run_worker(queue, Router(), lease_seconds=0.6) as live:
        async def pruned() -> bool:
            return await members(queue) == [live.id]

        await until(pruned, 20, "the killed worker's entry to be removed")
        assert (await queue.stats()).consumers == 1
    assert await members(queue) == []  # the live one deregistered when it stopped


async def test_a_long_lease_worker_is_not_judged_dead_by_a_short_lease_one(make_queue: MakeQueue) -> None:
    queue = make_queue("q")
    await queue.renew("slow", [], lease_seconds=600)   # heartbeats every 200 s
    await queue.renew("gone", [], lease_seconds=0.05)  # heartbeated once, then killed
    fast = Worker(queue, Router(), lease_seconds=0.05)

    async def gone_pruned() -> bool:
        await queue.renew(fast.id, [], lease_seconds=0.05)
        return "gone" not in await members(queue)

    await until(gone_pruned, 20, "the dead worker to be pruned")
    assert "slow" in await members(queue) and fast.id in await members(queue)
    scores = dict(await queue.redis.zrange(queue.keys.workers, 0, -1, withscores=True))
    assert scores["slow"] - scores[fast.id] > 500_000  # judged dead 10 minutes on, not at the next beat
