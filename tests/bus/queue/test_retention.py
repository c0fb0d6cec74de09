"""How long finished task records are kept: one retention class per way a task ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from shared.bus import BusSettings, Queue, Reject, TaskStatus

MakeQueue = Callable[..., Queue]
RunWorker = Callable[..., Any]
# Distinct per class, so a record kept by the wrong class shows (seconds).
TTLS = {"completed_ttl": 1_000.0, "cancelled_ttl": 2_000.0, "dead_letter_ttl": 3_000.0}


async def until(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return got


async def kept_for(redis: Any, queue: Queue, task_id: str) -> float:
    """Seconds the record has left to live (-1: no expiry; -2: gone)."""
    ms = await redis.pttl(queue.keys.task(task_id))
    return float(ms) if ms < 0 else ms / 1000


def within(left: float, ttl: float) -> bool:
    """Set to ``ttl`` moments ago (a generous minute of slack: this is not a timing test)."""
    return ttl - 60 < left <= ttl


async def handler(ctx: Any) -> str:
    if ctx.payload == "reject":
        raise Reject("not this one")
    if ctx.payload == "crash":
        raise RuntimeError("boom")
    if ctx.payload == "slow":
        await asyncio.sleep(30)
    return "ok"


def test_defaults_are_sized_for_a_deployment(make_queue: MakeQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = make_queue()
    assert (queue.completed_ttl, queue.cancelled_ttl, queue.dead_letter_ttl) == (3_600, 86_400, 7 * 86_400)
    for name in ("COMPLETED_TTL", "CANCELLED_TTL", "DEAD_LETTER_TTL"):
        monkeypatch.delenv(f"MEETMESH_{name}", raising=False)
    assert BusSettings.load().retention == {"completed_ttl": 3_600, "cancelled_ttl": 86_400,
                                            "dead_letter_ttl": 7 * 86_400}
    monkeypatch.setenv("MEETMESH_COMPLETED_TTL", "60")
    monkeypatch.setenv("MEETMESH_DEAD_LETTER_TTL", "1209600")
    retention = BusSettings.load().retention
    assert retention["completed_ttl"] == 60 and retention["dead_letter_ttl"] == 1_209_600
    assert make_queue(**retention).completed_ttl == 60


def test_record_ttl_still_works_and_says_it_is_deprecated(make_queue: MakeQueue) -> None:
    with pytest.warns(DeprecationWarning, match="completed_ttl and cancelled_ttl"):
        queue = make_queue(record_ttl=120.0)
    assert (queue.completed_ttl, queue.cancelled_ttl, queue.dead_letter_ttl) == (120, 120, 7 * 86_400)
    with pytest.raises(ValueError, match="must be > 0"):
        make_queue(completed_ttl=0)


async def test_each_way_of_ending_keeps_the_record_for_its_class(make_queue: MakeQueue, run_worker: RunWorker,
                                                                redis: Any) -> None:
    queue = make_queue(max_retries=0, **TTLS)
    queued = await queue.enqueue("t", "queued", delay=600)
    ids = {p: (await queue.enqueue("t", p)).id for p in ("ok", "reject", "crash")}
    timed = await queue.enqueue("t", "slow", timeout=0.2)
    async with run_worker(queue, {"t": handler}):
        assert (await queue.wait(ids["ok"], 20)).status is TaskStatus.COMPLETED
        assert (await queue.wait(ids["reject"], 20)).status is TaskStatus.FAILED
        assert (await queue.wait(ids["crash"], 20)).status is TaskStatus.DEAD
        assert (await queue.wait(timed.id, 20)).status is TaskStatus.TIMEOUT
    assert await kept_for(redis, queue, queued.id) == -1, "a queued record never expires"
    assert within(await kept_for(redis, queue, ids["ok"]), TTLS["completed_ttl"])
    for task_id in (ids["reject"], ids["crash"], timed.id):  # the three kinds of dead letter
        assert within(await kept_for(redis, queue, task_id), TTLS["dead_letter_ttl"])
    assert await queue.cancel(queued.id) is TaskStatus.QUEUED
    assert within(await kept_for(redis, queue, queued.id), TTLS["cancelled_ttl"])
    late = await queue.enqueue("t", "late", delay=600)
    await queue.cancel(late.id, "deadline passed", status=TaskStatus.TIMEOUT)
    assert within(await kept_for(redis, queue, late.id), TTLS["cancelled_ttl"])


async def test_a_lease_that_expires_on_every_attempt_is_a_dead_letter_with_its_ttl(make_queue: MakeQueue,
                                                                                   redis: Any) -> None:
    queue = make_queue(max_retries=0, lease_seconds=0.05, **TTLS)
    task = await queue.enqueue("t", "x")
    leased, _ = await queue.dequeue(1, "w-killed")  # leased, then never settled: its worker died
    assert [d.id for d in leased] == [task.id]
    await until(lambda: _dequeue_and_check(queue, task.id), "the expired lease to be reaped")
    assert within(await kept_for(redis, queue, task.id), TTLS["dead_letter_ttl"])


async def _dequeue_and_check(queue: Queue, task_id: str) -> bool:
    await queue.dequeue(0, "w-reaper")
    return (await queue.get(task_id)).status is TaskStatus.DEAD


async def test_a_replayed_dead_letter_never_expires_while_queued(make_queue: MakeQueue, run_worker: RunWorker,
                                                                 redis: Any) -> None:
    queue = make_queue(max_retries=0, **TTLS)
    task = await queue.enqueue("t", "reject")
    async with run_worker(queue, {"t": handler}):
        await queue.wait(task.id, 20)
    assert within(await kept_for(redis, queue, task.id), TTLS["dead_letter_ttl"])
    assert await queue.replay_dead([task.id]) == 1
    assert (await queue.get(task.id)).status is TaskStatus.QUEUED
    assert await kept_for(redis, queue, task.id) == -1


async def test_a_dead_letter_past_its_retention_leaves_the_dead_letter_queue(make_queue: MakeQueue,
                                                                             run_worker: RunWorker,
                                                                             redis: Any) -> None:
    queue = make_queue(max_retries=0, dead_letter_ttl=0.3)
    task = await queue.enqueue("t", "crash")
    async with run_worker(queue, {"t": handler}, poll_seconds=0.05):
        await queue.wait(task.id, 20)
        assert (await queue.stats()).dead_letters == 1
        # The record expires by itself; the worker's next dequeue drops the id from the dead set.
        await until(lambda: _no_dead_letters(queue), "the dead letter to go")
    assert await kept_for(redis, queue, task.id) == -2
    assert await queue.dead_letters() == [] and await queue.replay_dead() == 0


async def _no_dead_letters(queue: Queue) -> bool:
    return await queue.redis.zcard(queue.keys.dead) == 0
