"""The AdaptiveLimiter (AIMD): shrink by 2 per rate-limit report, grow by 1 per quiet minute, within [2, 12].

Time is injected through ``clock=``, so nothing here waits for a real minute.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from shared.bus import AdaptiveLimiter, RateLimited, Router, Worker


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_defaults_start_at_twelve(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(clock=clock)
    assert limiter.limit == 12
    assert limiter.held == 0
    assert limiter.available == 12
    assert limiter.reports == 0


def test_report_drops_by_two(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(clock=clock)
    limiter.report_rate_limited()
    assert limiter.limit == 10
    assert limiter.reports == 1
    limiter.report_rate_limited()
    assert limiter.limit == 8


def test_floor_at_two(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(clock=clock)
    seen = []
    for _ in range(8):
        limiter.report_rate_limited()
        seen.append(limiter.limit)
    assert seen == [10, 8, 6, 4, 2, 2, 2, 2]
    assert limiter.reports == 8


def test_grows_by_one_after_sixty_quiet_seconds_not_before(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(clock=clock)
    limiter.report_rate_limited()
    assert limiter.limit == 10
    clock.advance(59.9)
    assert limiter.limit == 10, "grew before a full quiet minute"
    clock.advance(0.1)
    assert limiter.limit == 11, "did not grow after 60 quiet seconds"
    clock.advance(59.9)
    assert limiter.limit == 11, "the second period started at the first growth, not at the read"
    clock.advance(0.1)
    assert limiter.limit == 12


def test_growth_is_one_per_period_even_if_nobody_looked(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(clock=clock)
    for _ in range(5):
        limiter.report_rate_limited()
    assert limiter.limit == 2
    clock.advance(3 * 60 + 30)  # three whole quiet periods, read once
    assert limiter.limit == 5
    clock.advance(30)  # completes the fourth period (the half period was kept, not lost)
    assert limiter.limit == 6


def test_a_report_restarts_the_quiet_period(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(clock=clock)
    limiter.report_rate_limited()  # t=0: 10
    clock.advance(30)
    limiter.report_rate_limited()  # t=30: 8, quiet clock restarts
    clock.advance(59)  # t=89: only 59 s since the last report
    assert limiter.limit == 8
    clock.advance(1)  # t=90
    assert limiter.limit == 9


def test_ceiling_at_twelve(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(clock=clock)
    limiter.report_rate_limited()
    clock.advance(10 * 3600)
    assert limiter.limit == 12
    clock.advance(10 * 3600)
    assert limiter.limit == 12


def test_quiet_time_at_the_ceiling_is_not_banked(clock: FakeClock) -> None:
    """An hour spent at the maximum must not let the limit jump straight back up after a drop."""
    limiter = AdaptiveLimiter(clock=clock)
    clock.advance(3600)
    assert limiter.limit == 12
    limiter.report_rate_limited()
    limiter.report_rate_limited()
    assert limiter.limit == 8
    clock.advance(1)
    assert limiter.limit == 8


def test_custom_bounds_and_steps(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(initial=5, minimum=3, maximum=7, decrease=3, increase=2, quiet_seconds=10,
                              clock=clock)
    limiter.report_rate_limited()
    assert limiter.limit == 3  # 5 - 3 = 2, floored at 3
    clock.advance(10)
    assert limiter.limit == 5
    clock.advance(10)
    assert limiter.limit == 7
    clock.advance(10)
    assert limiter.limit == 7


@pytest.mark.parametrize("kwargs", [
    {"minimum": 0},
    {"initial": 1, "minimum": 2},
    {"initial": 13},
    {"minimum": 5, "maximum": 4, "initial": 4},
    {"decrease": 0},
    {"increase": 0},
    {"quiet_seconds": 0},
])
def test_invalid_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        AdaptiveLimiter(**kwargs)


async def test_acquire_blocks_at_the_limit_and_release_unblocks(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(initial=2, minimum=1, maximum=2, clock=clock)
    await asyncio.wait_for(limiter.acquire(), 1)
    await asyncio.wait_for(limiter.acquire(), 1)
    assert limiter.held == 2
    assert limiter.available == 0
    assert limiter.try_acquire() == 0

    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.05)
    assert not waiter.done(), "acquire returned although the limit was reached"
    assert limiter.held == 2

    limiter.release()
    await asyncio.wait_for(waiter, 2)
    assert limiter.held == 2

    limiter.release()
    assert limiter.held == 1
    assert limiter.try_acquire() == 1
    assert limiter.held == 2


async def test_a_drop_does_not_revoke_held_slots_but_gates_new_ones(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(initial=4, minimum=2, maximum=4, clock=clock)
    for _ in range(4):
        assert limiter.try_acquire()
    limiter.report_rate_limited()  # limit 2, 4 held
    assert limiter.held == 4
    assert limiter.available == 0
    waiter = asyncio.create_task(limiter.acquire())
    limiter.release()  # 3 held: still not under 2
    limiter.release()  # 2 held: still not under 2
    await asyncio.sleep(0.05)
    assert not waiter.done(), "a new slot was granted while held >= the lowered limit"
    limiter.release()  # 1 held: now there is room
    await asyncio.wait_for(waiter, 2)
    assert limiter.held == 2


async def test_context_manager_holds_a_slot(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(initial=3, minimum=1, maximum=3, clock=clock)
    async with limiter:
        assert limiter.held == 1
        async with limiter:
            assert limiter.held == 2
    assert limiter.held == 0


async def test_waiter_gets_a_slot_when_quiet_time_raises_the_limit() -> None:
    limiter = AdaptiveLimiter(initial=2, minimum=2, maximum=3, quiet_seconds=0.2)  # real clock
    assert limiter.try_acquire() and limiter.try_acquire()
    waiter = asyncio.create_task(limiter.acquire())
    try:
        # After 0.2 s of quiet the limit is 3 and only 2 are held: the waiter is entitled to a slot.
        await asyncio.wait_for(asyncio.shield(waiter), 2)
        assert limiter.limit == 3
    finally:
        waiter.cancel()


# -- with a worker ---------------------------------------------------------------------------------


class Concurrency:
    """Counts handlers running at once, and the most seen."""

    def __init__(self) -> None:
        self.now = 0
        self.max = 0

    async def run(self, seconds: float) -> None:
        self.now += 1
        self.max = max(self.max, self.now)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.now -= 1


async def test_worker_never_runs_more_handlers_than_the_limit(make_queue: Callable[..., Any],
                                                               run_worker: Callable[..., Any],
                                                               clock: FakeClock) -> None:
    queue = make_queue()
    limiter = AdaptiveLimiter(initial=3, minimum=2, maximum=3, clock=clock)
    seen = Concurrency()
    router = Router()

    @router.handler("work")
    async def work(ctx: Any) -> None:
        await seen.run(0.03)

    enqueued = await queue.enqueue_many([queue.message("work", i) for i in range(30)])
    async with run_worker(queue, router, concurrency=50, limiter=limiter):
        for e in enqueued:
            assert (await queue.wait(e.id, timeout=20)).status == "completed"
    assert seen.max == 3, f"max concurrent handlers {seen.max} with a limiter limit of 3 (concurrency 50)"


async def test_rate_limited_handler_shrinks_the_worker_limiter(make_queue: Callable[..., Any],
                                                               run_worker: Callable[..., Any],
                                                               clock: FakeClock) -> None:
    queue = make_queue(max_retries=1, retry_base_seconds=0.01)
    limiter = AdaptiveLimiter(initial=8, minimum=2, maximum=8, clock=clock)  # frozen clock: no regrowth
    seen = Concurrency()
    router = Router()

    @router.handler("limited")
    async def limited(ctx: Any) -> str:
        if ctx.message.attempts == 1:
            raise RateLimited(delay=0)
        return "ok"

    @router.handler("work")
    async def work(ctx: Any) -> None:
        await seen.run(0.03)

    async with run_worker(queue, router, concurrency=50, limiter=limiter):
        first = await queue.enqueue_many([queue.message("limited", i) for i in range(3)])
        for e in first:
            record = await queue.wait(e.id, timeout=20)
            assert record.status == "completed"
            assert record.attempts == 2
        assert limiter.reports == 3
        assert limiter.limit == 2  # 8 - 3 * 2

        second = await queue.enqueue_many([queue.message("work", i) for i in range(20)])
        for e in second:
            assert (await queue.wait(e.id, timeout=20)).status == "completed"
    assert seen.max == 2, f"max concurrent handlers {seen.max} after the limiter dropped to 2"


async def test_context_report_rate_limited_shrinks_the_limiter(make_queue: Callable[..., Any],
                                                               run_worker: Callable[..., Any],
                                                               clock: FakeClock) -> None:
    queue = make_queue()
    limiter = AdaptiveLimiter(clock=clock)

    async def handler(ctx: Any) -> str:
        ctx.report_rate_limited()  # succeeded, but the downstream said "slow down"
        return "done"

    async with run_worker(queue, {"soft": handler}, limiter=limiter):
        e = await queue.enqueue("soft")
        assert (await queue.wait(e.id, timeout=10)).status == "completed"
    assert limiter.reports == 1
    assert limiter.limit == 10


class Fleet:
    """Workers run in the background, all stopped together with a bounded wait."""

    def __init__(self) -> None:
        self.workers: list[Worker] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, worker: Worker) -> Worker:
        self.workers.append(worker)
        self.tasks.append(asyncio.create_task(worker.run()))
        return worker

    async def stop(self, timeout: float = 10.0) -> bool:
        """Stop every worker; True when all of them finished within ``timeout``."""
        for worker in self.workers:
            worker.stop()
        _, pending = await asyncio.wait(self.tasks, timeout=timeout) if self.tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        return not pending


async def test_a_shared_limiter_bounds_the_total_across_workers(make_queue: Callable[..., Any],
                                                                 clock: FakeClock) -> None:
    a, b = make_queue("a"), make_queue("b")
    limiter = AdaptiveLimiter(initial=2, minimum=2, maximum=2, clock=clock)
    seen = Concurrency()

    async def work(ctx: Any) -> None:
        await seen.run(0.05)

    ea = await a.enqueue_many([a.message("work", i) for i in range(10)])
    eb = await b.enqueue_many([b.message("work", i) for i in range(10)])
    fleet = Fleet()
    try:
        fleet.start(Worker(a, {"work": work}, limiter=limiter, poll_seconds=0.1))
        fleet.start(Worker(b, {"work": work}, limiter=limiter, poll_seconds=0.1))
        for q, batch in ((a, ea), (b, eb)):
            for e in batch:
                assert (await q.wait(e.id, timeout=20)).status == "completed"
    finally:
        assert await fleet.stop(), "workers sharing a limiter did not stop"
    assert seen.max <= 2, f"{seen.max} handlers ran at once under one limiter with a limit of 2"
    assert limiter.held == 0, "slots leaked"


async def test_an_idle_worker_does_not_starve_others_sharing_its_limiter(make_queue: Callable[..., Any],
                                                                         clock: FakeClock) -> None:
    idle_queue, busy_queue = make_queue("idle"), make_queue("busy")
    limiter = AdaptiveLimiter(initial=2, minimum=2, maximum=2, clock=clock)  # frozen clock

    async def work(ctx: Any) -> None:
        await asyncio.sleep(0.01)

    fleet = Fleet()
    try:
        fleet.start(Worker(idle_queue, {"work": work}, limiter=limiter))  # nothing to do
        await asyncio.sleep(0.3)  # it is now waiting for work
        out = await busy_queue.enqueue_many([busy_queue.message("work", i) for i in range(5)])
        fleet.start(Worker(busy_queue, {"work": work}, limiter=limiter))
        for e in out:
            assert (await busy_queue.wait(e.id, timeout=5)).status == "completed"
    finally:
        assert await fleet.stop()


async def test_stop_interrupts_a_worker_waiting_for_a_limiter_slot(make_queue: Callable[..., Any],
                                                                   clock: FakeClock) -> None:
    queue = make_queue()
    limiter = AdaptiveLimiter(initial=2, minimum=2, maximum=2, clock=clock)
    assert limiter.try_acquire(2) == 2  # another user of the limiter holds every slot
    worker = Worker(queue, {"work": lambda ctx: None}, limiter=limiter)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.sleep(0.2)
        worker.stop()
        await asyncio.wait_for(asyncio.shield(task), 3)
    finally:
        limiter.release(2)
        await asyncio.wait_for(task, 10)


def test_a_report_after_a_quiet_spell_drops_from_the_grown_limit() -> None:
    results = []
    for look in (True, False):
        clock = FakeClock()
        limiter = AdaptiveLimiter(clock=clock)
        for _ in range(5):
            limiter.report_rate_limited()  # 2
        clock.advance(10 * 60)  # ten quiet minutes: the limit is back at 12
        if look:
            assert limiter.limit == 12
        limiter.report_rate_limited()
        results.append(limiter.limit)
    assert results == [10, 10], (
        f"after the report: {results[0]} if the limit was read first, else {results[1]}")


def test_backoff_doubles_from_base_up_to_cap_jittered_down_to_half() -> None:
    from shared.bus import backoff

    for failures, full in ((1, 0.1), (2, 0.2), (4, 0.8), (7, 5.0), (10_000, 5.0)):
        waits = [backoff(failures) for _ in range(200)]
        assert all(full / 2 <= w <= full for w in waits), (failures, min(waits), max(waits))
        assert max(waits) - min(waits) > full / 10  # jittered, not fixed
    assert all(0.1 <= backoff(3, base=0.2, cap=0.2) <= 0.2 for _ in range(50))
    assert 0.05 <= backoff(0) <= 0.1  # no failure yet counts as the first
