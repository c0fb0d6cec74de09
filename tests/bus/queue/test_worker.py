"""Worker semantics, in-process against the real Redis: leases, retries, timeouts, cancellation,
pipeline stages, progress, graceful shutdown, unknown types, bad results, sync handlers, concurrency.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections import Counter
from itertools import pairwise
from typing import Any

import pytest

from shared.bus import Context, Queue, Reject, Retry, Router, TaskStatus, Worker
from shared.bus.dispatch.updates import stream_id

WAIT = 15.0  # generous: a task that is merely slow never fails a test, only a wrong outcome does


# -- helpers ------------------------------------------------------------------------------------


async def read_events(queue: Queue) -> list[dict[str, str]]:
    """Every event of the queue's stream so far, oldest first, each with its stream id as ``entry``."""
    out: list[dict[str, str]] = []
    last = "0"
    while True:
        batch = await queue.events(last, block_ms=1, count=1000)
        if not batch:
            return out
        for entry_id, fields in batch:
            out.append({"entry": entry_id, **fields})
        last = batch[-1][0]


def about(event: dict[str, str], task_id: str) -> bool:
    """Whether the event concerns the task (a batch enqueue announces many ids in one event)."""
    return event.get("id") == task_id or task_id in event.get("ids", "").split(",")


def select(events: list[dict[str, str]], task_id: str, status: str | None = None,
           reason: str | None = None) -> list[dict[str, str]]:
    return [e for e in events if about(e, task_id) and (status is None or e["status"] == status)
            and (reason is None or e.get("reason") == reason)]


def entry_ms(event: dict[str, str]) -> int:
    """The Redis server time (ms) at which the event was appended."""
    return int(event["entry"].split("-")[0])


async def where(queue: Queue, task_id: str) -> dict[str, bool]:
    """Which of the queue's sets hold the task id."""
    k = queue.keys
    return {name: await queue.redis.zscore(key, task_id) is not None
            for name, key in (("ready", k.ready), ("delayed", k.delayed), ("leases", k.leases),
                              ("dead", k.dead))}


async def eventually(predicate: Any, timeout: float = WAIT, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(poll)


# -- 1. lease renewal -----------------------------------------------------------------------------


async def test_lease_is_renewed_while_a_handler_runs_three_times_its_lease(make_queue, run_worker):
    queue = make_queue(lease_seconds=0.5)
    runs: list[tuple[str, int]] = []

    async def slow(ctx: Context) -> str:
        runs.append((ctx.worker, ctx.message.attempts))
        await asyncio.sleep(1.5)
        return "ok"

    router = Router({"slow": slow})
    # two workers with free capacity, the second polling often: an expired lease would be reclaimed
    async with run_worker(queue, router, concurrency=2, name="w1"), \
            run_worker(queue, router, concurrency=2, name="w2", poll_seconds=0.05):
        task = await queue.enqueue("slow")
        record = await queue.wait(task.id, WAIT)

    assert record.status is TaskStatus.COMPLETED
    assert record.attempts == 1
    assert len(runs) == 1, f"the handler ran {len(runs)} times: {runs}"
    assert (await queue.stats()).reclaimed == 0
    events = await read_events(queue)
    assert len(select(events, task.id, "processing")) == 1
    assert not select(events, task.id, reason="lease_expired")


# -- 2. retries ---------------------------------------------------------------------------------


async def test_failing_twice_then_succeeding_completes_on_the_third_attempt(make_queue, run_worker):
    queue = make_queue(max_retries=3, retry_base_seconds=0.02)
    attempts: list[int] = []

    async def flaky(ctx: Context) -> dict[str, int]:
        attempts.append(ctx.message.attempts)
        if ctx.message.attempts < 3:
            raise RuntimeError(f"flaky failure {ctx.message.attempts}")
        return {"ok": ctx.message.attempts}

    async with run_worker(queue, {"flaky": flaky}):
        task = await queue.enqueue("flaky")
        record = await queue.wait(task.id, WAIT)

    assert record.status is TaskStatus.COMPLETED
    assert record.attempts == 3
    assert record.result == {"ok": 3}
    assert attempts == [1, 2, 3]
    retries = select(await read_events(queue), task.id, "queued", "retry")
    assert [e["attempts"] for e in retries] == ["1", "2"]
    for e in retries:
        assert '"code":"RuntimeError"' in e["error"]
    assert (await queue.stats()).retried == 2


async def test_retry_backoff_is_exponential_with_full_jitter(make_queue, run_worker):
    base = 0.02  # attempt n waits uniform(0, base * 2 ** (n - 1)): 20, 40, 80 ms caps
    queue = make_queue(max_retries=3, retry_base_seconds=base)

    async def fails_three_times(ctx: Context) -> None:
        if ctx.message.attempts <= 3:
            raise RuntimeError("not yet")

    async with run_worker(queue, {"f": fails_three_times}, concurrency=20):
        tasks = await queue.enqueue_many([queue.message("f") for _ in range(20)])
        for t in tasks:
            assert (await queue.wait(t.id, WAIT)).attempts == 4

    events = await read_events(queue)
    delays: dict[int, list[int]] = {1: [], 2: [], 3: []}
    for t in tasks:
        mine = select(events, t.id)
        retries = [e for e in mine if e.get("reason") == "retry"]
        assert [e["attempts"] for e in retries] == ["1", "2", "3"]
        for e in retries:
            n, delay = int(e["attempts"]), int(e["retry_in_ms"])
            cap = round(base * 1000 * 2 ** (n - 1))
            assert 0 <= delay <= cap, f"attempt {n} waited {delay} ms, over its cap of {cap} ms"
            delays[n].append(delay)
            # the delay is honoured: the next delivery comes no earlier than it asked. (Measured from
            # `due`, the script's clock plus the delay: the retry's own entry id is stamped as its
            # XADD runs, which in a batch of settles can be a few ms after that clock was read.)
            later = [x for x in mine
                     if x["status"] == "processing" and stream_id(x["entry"]) > stream_id(e["entry"])]
            assert int(e["due"]) - entry_ms(e) <= delay
            assert later and entry_ms(later[0]) >= int(e["due"])
    # jitter: the delays differ; exponential: the third retry's cap (80 ms) is used beyond the second
    # one's (40 ms); full jitter: it also goes below half its cap. (Each fails with p = 2**-20.)
    assert len(set(delays[1])) > 1
    assert max(delays[3]) > 40
    assert min(delays[3]) < 40


async def test_retry_with_an_explicit_delay_is_honoured(make_queue, run_worker):
    queue = make_queue(max_retries=3, retry_base_seconds=0.0)
    starts: list[float] = []
    ends: list[float] = []

    async def later(ctx: Context) -> str:
        starts.append(time.monotonic())
        if ctx.message.attempts == 1:
            ends.append(time.monotonic())
            raise Retry(delay=0.3, reason="come back later")
        return "ok"

    async with run_worker(queue, {"later": later}, poll_seconds=0.05):
        task = await queue.enqueue("later")
        record = await queue.wait(task.id, WAIT)

    assert record.status is TaskStatus.COMPLETED
    assert record.attempts == 2
    assert starts[1] - ends[0] >= 0.28, f"ran again after {starts[1] - ends[0]:.3f}s, not ~0.3s"
    (retry,) = select(await read_events(queue), task.id, "queued", "retry")
    assert retry["retry_in_ms"] == "300"
    assert '"code":"retry"' in retry["error"] and "come back later" in retry["error"]


async def test_reject_fails_at_once_into_the_dead_letters(make_queue, run_worker):
    queue = make_queue(max_retries=5, retry_base_seconds=0.01)
    runs: list[int] = []

    async def refuse(ctx: Context) -> None:
        runs.append(ctx.message.attempts)
        raise Reject("why: the payload is nonsense")

    async with run_worker(queue, {"refuse": refuse}):
        task = await queue.enqueue("refuse")
        record = await queue.wait(task.id, WAIT)
        await asyncio.sleep(0.2)  # a retry would run within this

    assert record.status is TaskStatus.FAILED
    assert runs == [1]
    assert record.attempts == 1
    assert record.error is not None and record.error.code == "rejected"
    assert "why: the payload is nonsense" in record.error.message
    assert [d.id for d in await queue.dead_letters()] == [task.id]
    assert (await queue.get(task.id)).status is TaskStatus.FAILED
    assert not select(await read_events(queue), task.id, reason="retry")


async def test_out_of_retries_is_dead_with_the_exception_and_its_traceback(make_queue, run_worker):
    queue = make_queue(max_retries=2, retry_base_seconds=0.01)
    runs: list[int] = []
    raise_lines: list[int] = []

    async def broken(ctx: Context) -> None:
        runs.append(ctx.message.attempts)
        raise_lines.append(inspect.currentframe().f_lineno + 1)  # type: ignore[union-attr]
        raise ValueError(f"boom {ctx.payload}")

    async with run_worker(queue, {"broken": broken}):
        task = await queue.enqueue("broken", 42)
        record = await queue.wait(task.id, WAIT)

    assert record.status is TaskStatus.DEAD
    assert runs == [1, 2, 3]
    assert record.attempts == 3
    assert record.error is not None
    assert record.error.code == "ValueError"
    assert record.error.message == "boom 42"
    tb = record.error.traceback or ""
    assert f'test_worker.py", line {raise_lines[0]}, in broken' in tb, tb
    assert 'raise ValueError(f"boom {ctx.payload}")' in tb
    assert "ValueError: boom 42" in tb
    (dead,) = await queue.dead_letters()
    assert dead.id == task.id and dead.error == record.error


# -- 3. per-message timeout ---------------------------------------------------------------------


@pytest.mark.parametrize("where_set", ["message", "queue"])
async def test_timeout_cancels_the_handler_and_ends_as_timeout(make_queue, run_worker, where_set):
    queue_options: dict[str, Any] = {"timeout": 0.2} if where_set == "queue" else {}
    queue = make_queue(max_retries=1, retry_base_seconds=0.01, **queue_options)
    cancelled: list[int] = []
    finished: list[int] = []

    async def sleepy(ctx: Context) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(ctx.message.attempts)
            raise
        finished.append(ctx.message.attempts)

    async with run_worker(queue, {"sleepy": sleepy}):
        fields = {"timeout": 0.2} if where_set == "message" else {}
        task = await queue.enqueue("sleepy", **fields)
        record = await queue.wait(task.id, WAIT)

    assert record.status is TaskStatus.TIMEOUT
    assert cancelled == [1, 2], "each attempt's handler must see its cancellation"
    assert not finished
    assert record.attempts == 2
    assert record.error is not None and record.error.code == "timeout"
    assert "0.2" in record.error.message
    assert [d.id for d in await queue.dead_letters()] == [task.id]
    (retry,) = select(await read_events(queue), task.id, "queued", "retry")
    assert retry["attempts"] == "1" and '"code":"timeout"' in retry["error"]


async def test_a_timed_out_attempt_is_retried(make_queue, run_worker):
    queue = make_queue(max_retries=2, retry_base_seconds=0.01)

    async def slow_once(ctx: Context) -> int:
        if ctx.message.attempts == 1:
            await asyncio.sleep(10)
        return ctx.message.attempts

    async with run_worker(queue, {"slow_once": slow_once}):
        task = await queue.enqueue("slow_once", timeout=0.2)
        record = await queue.wait(task.id, WAIT)

    assert record.status is TaskStatus.COMPLETED
    assert record.result == 2
    assert record.attempts == 2


async def test_a_handler_raising_timeout_error_itself_is_an_ordinary_failure(make_queue, run_worker):
    queue = make_queue(max_retries=1, retry_base_seconds=0.01)

    async def upstream_timeout(ctx: Context) -> None:
        raise TimeoutError("upstream did not answer")

    async with run_worker(queue, {"t": upstream_timeout}):
        task = await queue.enqueue("t", timeout=30)
        record = await queue.wait(task.id, WAIT)

    assert record.status is TaskStatus.DEAD  # not "timeout": the deadline never passed
    assert record.attempts == 2
    assert record.error is not None and record.error.code == "TimeoutError"
    assert record.error.message == "upstream did not answer"


# -- 4. cancel ----------------------------------------------------------------------------------


async def test_cancelling_a_running_task_cancels_its_handler_promptly(make_queue, run_worker):
    queue = make_queue(lease_seconds=30)  # renewals every 10 s: only the cancel request can be prompt
    started = asyncio.Event()
    observed = asyncio.Event()
    runs: list[str] = []

    async def long(ctx: Context) -> None:
        runs.append(ctx.message.id)
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            observed.set()
            raise

    async def quick(ctx: Context) -> str:
        runs.append(ctx.message.id)
        return "ok"

    async with run_worker(queue, {"long": long, "quick": quick}, concurrency=1):
        task = await queue.enqueue("long")
        await asyncio.wait_for(started.wait(), WAIT)
        assert await queue.cancel(task.id, "user gave up") is TaskStatus.PROCESSING
        await asyncio.wait_for(observed.wait(), 5)
        record = await queue.wait(task.id, 1)
        # the single slot is free again: the worker goes on with the next message
        after = await queue.enqueue("quick")
        assert (await queue.wait(after.id, WAIT)).status is TaskStatus.COMPLETED
        await asyncio.sleep(0.2)

    assert record.status is TaskStatus.CANCELLED
    assert record.error is not None and record.error.code == "cancelled"
    assert "user gave up" in record.error.message
    assert runs == [task.id, after.id], "a cancelled task must not be retried"
    final = await queue.get(task.id)
    assert final.status is TaskStatus.CANCELLED and final.attempts == 1
    assert not any((await where(queue, task.id)).values())
    assert await queue.cancel(task.id) is TaskStatus.CANCELLED  # finished: left alone


async def test_cancelled_queued_and_delayed_tasks_never_run(make_queue, run_worker):
    queue = make_queue()
    started = asyncio.Event()
    gate = asyncio.Event()
    ran: list[str] = []

    async def blocker(ctx: Context) -> None:
        started.set()
        await gate.wait()

    async def work(ctx: Context) -> None:
        ran.append(ctx.message.id)

    async with run_worker(queue, {"blocker": blocker, "work": work}, concurrency=1, poll_seconds=0.05):
        busy = await queue.enqueue("blocker")
        await asyncio.wait_for(started.wait(), WAIT)  # the only slot is taken
        queued = await queue.enqueue("work")
        delayed = await queue.enqueue("work", delay=0.3)
        assert (await queue.get(queued.id)).status is TaskStatus.QUEUED
        assert await queue.cancel(queued.id) is TaskStatus.QUEUED
        assert await queue.cancel(delayed.id) is TaskStatus.QUEUED
        gate.set()
        await queue.wait(busy.id, WAIT)
        control = await queue.enqueue("work")
        await queue.wait(control.id, WAIT)
        await asyncio.sleep(0.5)  # past the delayed one's due time

    assert ran == [control.id]
    for t in (queued, delayed):
        record = await queue.get(t.id)
        assert record.status is TaskStatus.CANCELLED
        assert record.attempts == 0
        assert not any((await where(queue, t.id)).values())
    stats = await queue.stats()
    assert stats.ready == 0 and stats.delayed == 0 and stats.cancelled == 2


async def test_a_cancel_that_lands_before_the_handler_starts_frees_its_slot(make_queue):
    """The cancel request for a task that was leased in the same round as the control message
    arrives: the listener runs before the new handler task's first step (a real interleaving when
    both replies are read in one event-loop iteration). Reproduced deterministically by delivering
    the control message right after `_start`."""
    queue = make_queue()
    ran: list[Any] = []

    async def work(ctx: Context) -> None:
        ran.append(ctx.payload)

    worker = Worker(queue, {"work": work}, concurrency=1, poll_seconds=0.05)
    real_start = worker._start

    async def dequeue_then_wait(count: int, worker_id: str, lease: Any, idle: float, settle: Any,
                                wait: float, leased: Any) -> Any:
        deliveries, due = await queue.dequeue(count, worker_id, lease, idle, settle=settle)
        for d in deliveries:
            if d.message is not None and d.message.payload == "victim":
                await queue.cancel(d.id)  # a user cancels it just as it is leased
        leased(deliveries, due)
        return None, True  # as if the wait was cut short: the worker waits on its own

    def start(delivery: Any) -> bool:
        started = real_start(delivery)
        if delivery.message is not None and delivery.message.payload == "victim":
            worker._on_control({"data": delivery.id})  # the control message, before the first step
        return started

    queue.dequeue_then_wait = dequeue_then_wait  # type: ignore[method-assign]
    worker._start = start  # type: ignore[method-assign]
    runner = asyncio.create_task(worker.run())
    try:
        victim = await queue.enqueue("work", "victim")
        assert (await queue.wait(victim.id, WAIT)).status is TaskStatus.CANCELLED
        nxt = await queue.enqueue("work", "next")
        record = await queue.wait(nxt.id, 3)  # with the leaked slot, a concurrency-1 worker is stuck
        assert record.status is TaskStatus.COMPLETED
        assert worker.in_flight == 0
    finally:
        worker.stop()
        await asyncio.wait_for(runner, 10)


# -- 5. pipeline stages and progress -------------------------------------------------------------


async def test_then_moves_the_same_task_to_its_next_stage_later(make_queue, run_worker):
    queue = make_queue()
    first_done: list[float] = []
    seen: list[tuple[Any, ...]] = []

    async def first(ctx: Context) -> str:
        ctx.then("p.second", {"from": ctx.payload}, delay=0.2)
        first_done.append(time.monotonic())
        return "ignored: the next stage follows"

    async def second(ctx: Context) -> dict[str, Any]:
        seen.append((time.monotonic(), ctx.message.id, ctx.message.type, ctx.message.stage, ctx.payload,
                     ctx.message.attempts))
        return {"done": ctx.payload}

    async with run_worker(queue, {"p.first": first, "p.second": second}, poll_seconds=0.05):
        task = await queue.enqueue("p.first", "abc")

        async def moved() -> bool:
            return (await queue.get(task.id)).stage == 1

        await eventually(moved)
        between = await queue.get(task.id)
        sets = await where(queue, task.id)
        looked = time.monotonic()
        record = await queue.wait(task.id, WAIT)

    if looked - first_done[0] < 0.15:  # we looked well within the 0.2 s delay: it must be waiting
        assert between.status is TaskStatus.QUEUED and between.type == "p.second"
        assert sets == {"ready": False, "delayed": True, "leases": False, "dead": False}
    assert record.status is TaskStatus.COMPLETED
    assert record.id == task.id and record.type == "p.second" and record.stage == 1
    assert record.result == {"done": {"from": "abc"}}
    assert record.attempts == 1
    (started, task_id, type_, stage, payload, attempts) = seen[0]
    assert len(seen) == 1
    assert (task_id, type_, stage, payload, attempts) == (task.id, "p.second", 1, {"from": "abc"}, 1)
    assert started - first_done[0] >= 0.19, "the next stage ran before its delay"
    events = await read_events(queue)
    (nxt,) = select(events, task.id, "queued", "next_stage")
    assert nxt["stage"] == "1" and nxt["type"] == "p.second" and nxt["retry_in_ms"] == "200"
    assert len(select(events, task.id, "completed")) == 1


async def test_a_polling_stage_reschedules_itself_with_growing_delays(make_queue, run_worker):
    queue = make_queue()
    runs: list[tuple[int, float]] = []

    async def poll(ctx: Context) -> dict[str, int] | None:
        n = ctx.message.stage
        runs.append((n, time.monotonic()))
        if n < 3:
            ctx.then(payload={"n": n + 1}, delay=0.05 * 2 ** n)
            return None
        return {"n": n, "payload": ctx.payload}

    async with run_worker(queue, {"poll": poll}, poll_seconds=0.05):
        task = await queue.enqueue("poll", {"n": 0})
        record = await queue.wait(task.id, WAIT)

    assert record.status is TaskStatus.COMPLETED
    assert record.stage == 3 and record.type == "poll"
    assert record.result == {"n": 3, "payload": {"n": 3}}
    assert [n for n, _ in runs] == [0, 1, 2, 3]
    for (n, t0), (_, t1) in pairwise(runs):
        assert t1 - t0 >= 0.05 * 2 ** n - 0.01, f"stage {n + 1} came {t1 - t0:.3f}s after stage {n}"
    nexts = select(await read_events(queue), task.id, "queued", "next_stage")
    assert [(e["stage"], e["retry_in_ms"]) for e in nexts] == [("1", "50"), ("2", "100"), ("3", "200")]


async def test_progress_shows_in_the_record_and_the_event_stream(make_queue, run_worker):
    queue = make_queue()
    reported = asyncio.Event()
    release = asyncio.Event()
    answers: list[bool] = []

    async def talky(ctx: Context) -> str:
        answers.append(await ctx.progress(0.5, "delta"))
        reported.set()
        await release.wait()
        return "done"

    async with run_worker(queue, {"talky": talky}):
        task = await queue.enqueue("talky")
        await asyncio.wait_for(reported.wait(), WAIT)
        during = await queue.get(task.id)
        release.set()
        record = await queue.wait(task.id, WAIT)

    assert answers == [True]
    assert during.status is TaskStatus.PROCESSING and during.progress == 0.5
    assert record.status is TaskStatus.COMPLETED and record.progress == 1.0
    progress = [e for e in select(await read_events(queue), task.id, "processing") if "progress" in e]
    assert len(progress) == 1
    assert float(progress[0]["progress"]) == 0.5 and progress[0]["delta"] == "delta"


# -- 6. graceful shutdown -----------------------------------------------------------------------


async def test_stop_lets_a_short_running_handler_finish(make_queue):
    queue = make_queue()
    started = asyncio.Event()

    async def short(ctx: Context) -> str:
        started.set()
        await asyncio.sleep(0.3)
        return "finished"

    worker = Worker(queue, {"short": short}, grace_seconds=10)
    runner = asyncio.create_task(worker.run())
    try:
        task = await queue.enqueue("short")
        await asyncio.wait_for(started.wait(), WAIT)
        worker.stop()
        await asyncio.wait_for(runner, WAIT)
    finally:
        worker.stop()
        await asyncio.wait_for(runner, WAIT)

    record = await queue.get(task.id)  # settled before run() returned: no waiting
    assert record.status is TaskStatus.COMPLETED
    assert record.result == "finished" and record.attempts == 1
    assert not any((await where(queue, task.id)).values())


async def test_stop_after_the_grace_period_cancels_and_releases_the_lease_at_once(make_queue, run_worker):
    queue = make_queue(lease_seconds=30)  # an unreleased lease would hold the task for 30 s
    started = asyncio.Event()
    cancelled: list[str] = []
    fast = False
    completed_by: list[str] = []

    async def long(ctx: Context) -> str:
        if fast:
            completed_by.append(ctx.worker)
            return "second worker"
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(ctx.worker)
            raise
        return "first worker"

    first = Worker(queue, {"long": long}, grace_seconds=0.2, name="first")
    runner = asyncio.create_task(first.run())
    try:
        task = await queue.enqueue("long")
        await asyncio.wait_for(started.wait(), WAIT)
        first.stop()
        await asyncio.wait_for(runner, WAIT)
    finally:
        first.stop()
        await asyncio.wait_for(runner, WAIT)

    assert cancelled == ["first"]
    released = await queue.get(task.id)
    assert released.status is TaskStatus.QUEUED
    assert released.attempts == 0, "an attempt interrupted by shutdown does not count"
    assert await where(queue, task.id) == {"ready": True, "delayed": False, "leases": False, "dead": False}
    assert select(await read_events(queue), task.id, "queued", "released")

    fast = True
    async with run_worker(queue, {"long": long}, name="second"):
        record = await queue.wait(task.id, 5)  # far sooner than the 30 s lease
    assert record.status is TaskStatus.COMPLETED
    assert record.result == "second worker" and record.attempts == 1
    assert completed_by == ["second"]


# -- 7. unknown types, bad results, sync handlers -----------------------------------------------


async def test_an_unknown_type_is_dead_lettered_with_a_clear_reason_and_the_worker_goes_on(
        make_queue, run_worker):
    queue = make_queue(max_retries=3)

    async def known(ctx: Context) -> str:
        return "known"

    async with run_worker(queue, {"known": known}):
        unknown = await queue.enqueue("nobody.handles.this")
        record = await queue.wait(unknown.id, WAIT)
        after = await queue.enqueue("known")
        assert (await queue.wait(after.id, WAIT)).status is TaskStatus.COMPLETED

    assert record.status is TaskStatus.FAILED
    assert record.attempts == 1  # not retried: another try cannot help
    assert record.error is not None and record.error.code == "rejected"
    assert "no handler for message type 'nobody.handles.this'" in record.error.message
    assert [d.id for d in await queue.dead_letters()] == [unknown.id]


async def test_a_result_that_is_not_json_fails_with_bad_result(make_queue, run_worker):
    queue = make_queue(max_retries=3)
    runs: list[int] = []

    async def odd(ctx: Context) -> Any:
        runs.append(ctx.message.attempts)
        return {"handle": object()}

    async with run_worker(queue, {"odd": odd}):
        task = await queue.enqueue("odd")
        record = await queue.wait(task.id, WAIT)
        await asyncio.sleep(0.1)

    assert record.status is TaskStatus.FAILED
    assert record.error is not None and record.error.code == "bad_result"
    assert "not JSON-serialisable" in record.error.message
    assert runs == [1]
    assert [d.id for d in await queue.dead_letters()] == [task.id]


async def test_sync_handlers_work_off_the_event_loop(make_queue, run_worker):
    queue = make_queue(max_retries=1, retry_base_seconds=0.01)
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def double(ctx: Context) -> int:
        threads.append(threading.get_ident())
        time.sleep(0.05)  # blocking is fine here: it runs in a thread
        return int(ctx.payload) * 2

    def refuse(ctx: Context) -> None:
        raise Reject("sync says no")

    async with run_worker(queue, {"double": double, "refuse": refuse}):
        ok = await queue.enqueue("double", 21)
        no = await queue.enqueue("refuse")
        record = await queue.wait(ok.id, WAIT)
        rejected = await queue.wait(no.id, WAIT)

    assert record.status is TaskStatus.COMPLETED and record.result == 42
    assert threads and loop_thread not in threads
    assert rejected.status is TaskStatus.FAILED
    assert rejected.error is not None and rejected.error.message == "sync says no"


# -- 8. concurrency -----------------------------------------------------------------------------


async def test_a_burst_landing_between_inbox_waits_runs_each_message_once(make_queue):
    """A producer's batch reaches Redis just after the worker's inbox wait timed out and just before
    its next dequeue (a real interleaving; the test makes it happen on cue)."""
    queue = make_queue(lease_seconds=0.5, max_retries=3)
    runs: Counter[str] = Counter()

    async def work(ctx: Context) -> None:
        runs[ctx.message.id] += 1
        await asyncio.sleep(1.0)  # two lease periods: held leases must be renewed

    worker = Worker(queue, {"work": work}, concurrency=2, poll_seconds=0.2)
    real = queue.dequeue_then_wait
    burst: list[Any] = []
    timed_out = False

    async def dequeue_then_wait(*args: Any, **kwargs: Any) -> Any:
        nonlocal timed_out
        if timed_out and not burst:  # after a wait that timed out, before the next dequeue
            burst.extend(await queue.enqueue_many([queue.message("work") for _ in range(3)]))
        handed, cut = await real(*args, **kwargs)
        timed_out = timed_out or (handed is None and not cut)
        return handed, cut

    queue.dequeue_then_wait = dequeue_then_wait  # type: ignore[method-assign]
    runner = asyncio.create_task(worker.run())
    try:
        async def burst_sent() -> bool:
            return bool(burst)

        await eventually(burst_sent)
        records = [await queue.wait(t.id, WAIT) for t in burst]
    finally:
        worker.stop()
        await asyncio.wait_for(runner, WAIT)

    assert [r.status for r in records] == [TaskStatus.COMPLETED] * 3, [r.error for r in records]
    assert [r.attempts for r in records] == [1, 1, 1]
    assert sorted(runs.values()) == [1, 1, 1]


async def test_concurrency_limit_is_never_exceeded(make_queue, run_worker):
    queue = make_queue()
    running = 0
    peak = 0
    done: Counter[str] = Counter()

    async def busy(ctx: Context) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.03)
        finally:
            running -= 1
        done[ctx.message.id] += 1

    async with run_worker(queue, {"busy": busy}, concurrency=3, poll_seconds=0.05):
        batch = await queue.enqueue_many([queue.message("busy") for _ in range(15)])
        singles = [await queue.enqueue("busy") for _ in range(15)]  # one by one: handed to an idle worker
        for t in [*batch, *singles]:
            assert (await queue.wait(t.id, WAIT)).status is TaskStatus.COMPLETED

    assert peak == 3, f"peak concurrency {peak}, limit 3"
    assert len(done) == 30 and set(done.values()) == {1}
