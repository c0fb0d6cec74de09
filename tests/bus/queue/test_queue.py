"""Queue semantics against the real Redis: priorities, aging, delays, dedupe, cancel, batches, records,
pause, stats, input validation, cluster slots, dead letters and malformed data.

Every test runs under its own key prefix (see tests/conftest.py), so "no keys were written" is
checked by scanning that prefix.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.exceptions import ResponseError

from shared.bus import (
    InvalidMessage,
    Message,
    MessageTooLarge,
    Priority,
    Queue,
    Reject,
    Retry,
    TaskNotFound,
    TaskStatus,
)

MakeQueue = Callable[..., Queue]
RunWorker = Callable[..., Any]

LEVELS = [Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW]


# -- helpers -------------------------------------------------------------------------------------


async def keys_under(redis: Any, prefix: str) -> list[str]:
    return sorted([k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)])


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0, what: str = "condition"
                     ) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)


async def drain(queue: Queue, worker: str = "w", count: int = 1000) -> list[str]:
    """Lease everything ready, in the order the queue serves it."""
    out: list[str] = []
    while True:
        deliveries, _ = await queue.dequeue(count, worker)
        if not deliveries:
            return out
        out += [d.id for d in deliveries]


def crc16_xmodem(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def cluster_slot(key: str) -> int:
    """The Redis Cluster slot of ``key``: CRC16 of the hash tag (first non-empty {...}), mod 16384."""
    raw = key.encode()
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return crc16_xmodem(raw) % 16384


# -- 1. strict levels -----------------------------------------------------------------------------


async def test_dequeue_serves_critical_high_normal_low_fifo_within_level(make_queue: MakeQueue) -> None:
    queue = make_queue()
    rng = random.Random(7)
    plan = [LEVELS[rng.randrange(4)] for _ in range(40)]
    ids = []
    for i, prio in enumerate(plan):
        ids.append((await queue.enqueue("t", i, priority=prio)).id)
    expected = [ids[i] for i in sorted(range(len(plan)), key=lambda i: (plan[i].level, i))]

    deliveries, _ = await queue.dequeue(100, "w")
    assert [d.id for d in deliveries] == expected
    assert [d.message.priority for d in deliveries if d.message] == sorted(plan, key=lambda p: p.level)
    assert all(d.message is not None and d.message.attempts == 1 for d in deliveries)


async def test_dequeue_one_at_a_time_keeps_the_same_order(make_queue: MakeQueue) -> None:
    queue = make_queue()
    low = (await queue.enqueue("t", priority="low")).id
    normal = (await queue.enqueue("t")).id
    high = (await queue.enqueue("t", priority=Priority.HIGH)).id
    critical = (await queue.enqueue("t", priority=0)).id  # a level number is accepted too
    assert await drain(queue, count=1) == [critical, high, normal, low]


async def test_worker_runs_a_mixed_backlog_in_strict_priority_order(make_queue: MakeQueue,
                                                                     run_worker: RunWorker) -> None:
    queue = make_queue()
    rng = random.Random(2024)
    plan = [LEVELS[rng.randrange(4)] for _ in range(400)]
    # Enqueued BEFORE the worker starts: some one by one, the rest in batches.
    ids: list[str] = []
    for i in range(100):
        ids.append((await queue.enqueue("job", i, priority=plan[i])).id)
    for start in range(100, 400, 75):
        batch = [queue.message("job", i, priority=plan[i]) for i in range(start, min(start + 75, 400))]
        ids += [e.id for e in await queue.enqueue_many(batch)]
    assert len(set(ids)) == 400

    served: list[int] = []

    async def job(ctx: Any) -> None:
        served.append(ctx.payload)

    async with run_worker(queue, {"job": job}, concurrency=1):
        await queue.wait(ids[-1], timeout=30)
        await eventually(lambda: _true(len(served) == 400), 30, "all 400 served")

    expected = sorted(range(400), key=lambda i: (plan[i].level, i))
    first_wrong = next((n for n, (a, b) in enumerate(zip(served, expected, strict=True)) if a != b), None)
    assert served == expected, (
        f"first out-of-order handler call at #{first_wrong}: ran payload {served[first_wrong]} "
        f"({plan[served[first_wrong]].value}), expected {expected[first_wrong]} "
        f"({plan[expected[first_wrong]].value})" if first_wrong is not None else "")


async def _true(value: bool) -> bool:
    return value


async def test_fifo_within_a_level_holds_for_caller_chosen_ids(make_queue: MakeQueue) -> None:
    queue = make_queue()
    batch = [queue.message("t", id=task_id) for task_id in ("order-c", "order-b", "order-a")]
    await queue.enqueue_many(batch)  # one script call: all three get the same ready time
    assert await drain(queue) == ["order-c", "order-b", "order-a"]


# -- 2. aging --------------------------------------------------------------------------------------


async def _aging_scenario(queue: Queue, wait: float) -> tuple[dict[str, str], list[str], float]:
    low = (await queue.enqueue("t", priority="low")).id
    await asyncio.sleep(wait)
    ids = {"low": low}
    for name, prio in (("critical", "critical"), ("high1", "high"), ("high2", "high"), ("normal", "normal")):
        ids[name] = (await queue.enqueue("t", priority=prio)).id
    waited = (await queue.get(ids["normal"])).enqueued_at - (await queue.get(low)).enqueued_at  # type: ignore[operator]
    by_id = {v: k for k, v in ids.items()}
    return ids, [by_id[i] for i in await drain(queue)], waited


async def test_aging_low_that_waited_one_period_beats_fresh_normal_not_fresh_high(
        make_queue: MakeQueue) -> None:
    queue = make_queue(aging_seconds=0.3)
    _, order, waited = await _aging_scenario(queue, 0.45)
    assert 0.3 < waited < 0.6, f"precondition: the low message should have waited 1-2 periods, not {waited}s"
    assert order == ["critical", "high1", "high2", "low", "normal"], f"waited {waited:.3f}s"


async def test_aging_low_that_waited_two_periods_beats_fresh_high_not_fresh_critical(
        make_queue: MakeQueue) -> None:
    queue = make_queue(aging_seconds=0.3)
    _, order, waited = await _aging_scenario(queue, 0.75)
    assert 0.6 < waited < 0.9, f"precondition: the low message should have waited 2-3 periods, not {waited}s"
    assert order == ["critical", "low", "high1", "high2", "normal"], f"waited {waited:.3f}s"


async def test_without_aging_low_waits_behind_everything(make_queue: MakeQueue) -> None:
    queue = make_queue()
    _, order, waited = await _aging_scenario(queue, 0.45)
    assert order == ["critical", "high1", "high2", "normal", "low"], f"waited {waited:.3f}s"


def test_aging_seconds_must_be_positive(make_queue: MakeQueue) -> None:
    with pytest.raises(ValueError):
        make_queue(aging_seconds=0)
    with pytest.raises(ValueError):
        make_queue(aging_seconds=-1)


# -- 3. delayed messages ---------------------------------------------------------------------------


async def _dequeue_when_due(queue: Queue, task_id: str, due: float) -> float:
    """Poll dequeue until ``task_id`` arrives; assert it never arrives early; return when it did."""
    deadline = time.time() + due + 5
    while time.time() < deadline:
        deliveries, due_in = await queue.dequeue(10, "w")
        now = time.time()
        if deliveries:
            assert [d.id for d in deliveries] == [task_id]
            assert now >= due - 0.005, f"delivered {due - now:.3f}s before it was due"
            return now
        if now < due - 0.05:
            assert due_in is not None and due_in > 0, "dequeue should say when the delayed message is due"
        await asyncio.sleep(0.01)
    pytest.fail("the delayed message was never delivered")


async def test_delay_holds_a_message_back_until_due(make_queue: MakeQueue) -> None:
    queue = make_queue()
    before = time.time()
    e = await queue.enqueue("t", delay=0.4)
    assert e.created

    record = await queue.get(e.id)
    assert record.status is TaskStatus.QUEUED
    assert record.ready_at is not None and record.enqueued_at is not None
    assert record.ready_at - record.enqueued_at == pytest.approx(0.4, abs=0.002)
    assert record.ready_at >= before + 0.4 - 0.002

    assert (await queue.dequeue(10, "w"))[0] == []
    stats = await queue.stats()
    assert stats.delayed == 1
    assert stats.ready == 0

    arrived = await _dequeue_when_due(queue, e.id, record.ready_at)
    assert arrived - record.ready_at < 1.0
    assert (await queue.stats()).delayed == 0


async def test_at_holds_a_message_back_until_that_time(make_queue: MakeQueue) -> None:
    queue = make_queue()
    at = time.time() + 0.3
    e = await queue.enqueue("t", at=at, priority="high")
    record = await queue.get(e.id)
    assert record.ready_at == pytest.approx(at, abs=0.01)
    assert (await queue.dequeue(10, "w"))[0] == []
    await _dequeue_when_due(queue, e.id, record.ready_at or at)


async def test_at_in_the_past_is_ready_at_once(make_queue: MakeQueue) -> None:
    queue = make_queue()
    e = await queue.enqueue("t", at=time.time() - 60)
    deliveries, _ = await queue.dequeue(10, "w")
    assert [d.id for d in deliveries] == [e.id]


async def test_due_delayed_message_joins_its_level_in_order(make_queue: MakeQueue) -> None:
    queue = make_queue()
    delayed_high = (await queue.enqueue("t", priority="high", delay=0.1)).id
    normal = (await queue.enqueue("t")).id
    await asyncio.sleep(0.15)
    fresh_high = (await queue.enqueue("t", priority="high")).id
    # The delayed high was due before the fresh high was enqueued: it is first of its level.
    assert await drain(queue) == [delayed_high, fresh_high, normal]


async def test_delayed_message_with_running_worker_is_not_early(make_queue: MakeQueue,
                                                                run_worker: RunWorker) -> None:
    queue = make_queue()
    started: dict[str, float] = {}

    async def handler(ctx: Any) -> None:
        started[ctx.message.id] = time.time()

    async with run_worker(queue, {"t": handler}):
        e = await queue.enqueue("t", delay=0.2)
        record = await queue.wait(e.id, timeout=10)
    assert record.status is TaskStatus.COMPLETED
    assert record.ready_at is not None
    assert started[e.id] >= record.ready_at - 0.005, "handler ran before the message was due"


async def test_delayed_message_runs_promptly_when_due_with_an_idle_worker(make_queue: MakeQueue,
                                                                         run_worker: RunWorker) -> None:
    queue = make_queue()
    started: dict[str, float] = {}

    async def handler(ctx: Any) -> None:
        started[ctx.message.id] = time.time()

    async with run_worker(queue, {"t": handler}):  # default poll_seconds=1.0
        ping = await queue.enqueue("t")
        await queue.wait(ping.id, timeout=10)  # the worker has just gone idle again
        e = await queue.enqueue("t", delay=0.2)
        record = await queue.wait(e.id, timeout=10)
    assert record.ready_at is not None
    lateness = started[e.id] - record.ready_at
    assert lateness < 0.5, f"a delayed message ran {lateness * 1000:.0f} ms after it was due (light load)"


async def test_delay_and_at_together_are_refused_and_nothing_is_written(make_queue: MakeQueue, redis: Any,
                                                                        key_prefix: str) -> None:
    queue = make_queue()
    with pytest.raises(InvalidMessage):
        await queue.enqueue("t", delay=1, at=time.time() + 1)
    with pytest.raises(InvalidMessage):
        await queue.enqueue_many([queue.message("t")], delay=0.5, at=time.time())
    for bad in (math.nan, math.inf):
        with pytest.raises(InvalidMessage):
            await queue.enqueue("t", delay=bad)
    assert await keys_under(redis, key_prefix) == []


# -- 4. dedupe --------------------------------------------------------------------------------------


async def test_dedupe_key_returns_the_first_message(make_queue: MakeQueue, redis: Any) -> None:
    queue = make_queue()
    first = await queue.enqueue("t", {"n": 1}, dedupe_key="meeting-42:summary")
    second = await queue.enqueue("t", {"n": 2}, dedupe_key="meeting-42:summary", priority="critical")
    assert first.created is True
    assert second.created is False
    assert second.id == first.id
    assert second.position == 0

    stats = await queue.stats()
    assert stats.enqueued == 1
    assert stats.ready == 1
    assert stats.depth[Priority.NORMAL] == 1 and stats.depth[Priority.CRITICAL] == 0
    task_keys = [k async for k in redis.scan_iter(match=queue.keys.task_prefix.replace("{", "\\{")
                                                  .replace("}", "\\}") + "*")]
    assert len(task_keys) == 1

    deliveries, _ = await queue.dequeue(10, "w")
    assert len(deliveries) == 1
    assert deliveries[0].message is not None and deliveries[0].message.payload == {"n": 1}

    # Still deduplicated while the first one is running.
    third = await queue.enqueue("t", dedupe_key="meeting-42:summary")
    assert (third.id, third.created, third.position) == (first.id, False, None)


async def test_dedupe_within_one_batch(make_queue: MakeQueue) -> None:
    queue = make_queue()
    out = await queue.enqueue_many([queue.message("t", i, dedupe_key=k)
                                    for i, k in enumerate(["a", "b", "a", "c", "b"])])
    assert [e.created for e in out] == [True, True, False, True, False]
    assert out[2].id == out[0].id and out[4].id == out[1].id
    assert (await queue.stats()).ready == 3


async def test_dedupe_expires_after_its_ttl(make_queue: MakeQueue, redis: Any) -> None:
    queue = make_queue(dedupe_ttl=0.2)
    first = await queue.enqueue("t", dedupe_key="k")
    dkey = queue.keys.dedupe("k")
    assert await redis.get(dkey) == first.id
    assert 0 < await redis.pttl(dkey) <= 200
    assert (await queue.enqueue("t", dedupe_key="k")).created is False

    await eventually(lambda: _not(redis.exists(dkey)), 3, "dedupe key expiry")
    again = await queue.enqueue("t", dedupe_key="k")
    assert again.created is True
    assert again.id != first.id
    assert (await queue.stats()).ready == 2


async def _not(value: Awaitable[Any]) -> bool:
    return not await value


async def test_per_call_dedupe_ttl_overrides_the_queue_default(make_queue: MakeQueue, redis: Any) -> None:
    queue = make_queue()  # default 1 hour
    await queue.enqueue("t", dedupe_key="short", dedupe_ttl=0.2)
    assert 0 < await redis.pttl(queue.keys.dedupe("short")) <= 200


async def test_enqueue_with_an_existing_id_is_idempotent(make_queue: MakeQueue,
                                                         run_worker: RunWorker) -> None:
    queue = make_queue()
    first = await queue.enqueue("t", {"v": 1}, id="order-17")
    again = await queue.enqueue("t", {"v": 2}, id="order-17", priority="critical")
    assert (first.id, first.created) == ("order-17", True)
    assert (again.id, again.created, again.position) == ("order-17", False, 0)
    assert (await queue.stats()).enqueued == 1

    runs: list[Any] = []

    async def handler(ctx: Any) -> None:
        runs.append(ctx.payload)

    async with run_worker(queue, {"t": handler}):
        await queue.wait("order-17", timeout=10)
    # Still idempotent after it completed (while its record lives).
    after = await queue.enqueue("t", {"v": 3}, id="order-17")
    assert (after.created, after.position) == (False, None)
    assert runs == [{"v": 1}]
    assert (await queue.get("order-17")).status is TaskStatus.COMPLETED


async def test_enqueueing_the_same_message_object_twice_is_idempotent(make_queue: MakeQueue) -> None:
    """A producer that retries a send (say after a timeout) with the same Message must not duplicate it."""
    queue = make_queue()
    message = queue.message("t", {"v": 1})  # id generated, not chosen
    first = await queue.enqueue(message)
    again = await queue.enqueue(message)
    assert first.created is True
    assert (again.id, again.created) == (first.id, False)
    stats = await queue.stats()
    assert (stats.enqueued, stats.ready, stats.depth[Priority.NORMAL]) == (1, 1, 1)
    assert len((await queue.dequeue(10, "w"))[0]) == 1


async def test_re_enqueueing_a_running_message_does_not_reset_it(make_queue: MakeQueue) -> None:
    queue = make_queue()
    message = queue.message("t", id="job-1")
    await queue.enqueue(message)
    deliveries, _ = await queue.dequeue(1, "w")
    again = await queue.enqueue(message)
    assert again.created is False
    record = await queue.get("job-1")
    assert record.status is TaskStatus.PROCESSING
    assert await queue.settle(["job-1", deliveries[0].token, "done", "", ""]) == [1]
    assert (await queue.get("job-1")).status is TaskStatus.COMPLETED


# -- 5. cancel -------------------------------------------------------------------------------------


async def test_cancel_a_queued_message(make_queue: MakeQueue, run_worker: RunWorker, redis: Any) -> None:
    queue = make_queue()
    doomed = await queue.enqueue("t", "doomed", priority="high")
    keep = await queue.enqueue("t", "keep", priority="high")
    assert (await queue.stats()).depth[Priority.HIGH] == 2

    assert await queue.cancel(doomed.id, reason="user left the meeting") is TaskStatus.QUEUED
    record = await queue.get(doomed.id)
    assert record.status is TaskStatus.CANCELLED
    assert record.position is None
    assert record.finished_at is not None
    assert record.error is not None and record.error.code == "cancelled"
    assert record.error.message == "user left the meeting"
    assert await redis.zscore(queue.keys.ready, doomed.id) is None
    assert 0 < await redis.pttl(queue.keys.task(doomed.id)) <= 86_400_000
    stats = await queue.stats()
    assert stats.depth[Priority.HIGH] == 1
    assert stats.cancelled == 1
    assert (await queue.get(keep.id)).position == 0

    ran: list[str] = []

    async def handler(ctx: Any) -> None:
        ran.append(ctx.payload)

    async with run_worker(queue, {"t": handler}):
        await queue.wait(keep.id, timeout=10)
        late = await queue.enqueue("t", "late")
        await queue.wait(late.id, timeout=10)
    assert ran == ["keep", "late"]
    assert (await queue.get(doomed.id)).status is TaskStatus.CANCELLED
    assert (await queue.stats()).depth[Priority.HIGH] == 0


async def test_cancel_a_delayed_message(make_queue: MakeQueue) -> None:
    queue = make_queue()
    e = await queue.enqueue("t", delay=0.2)
    assert await queue.cancel(e.id) is TaskStatus.QUEUED
    stats = await queue.stats()
    assert stats.delayed == 0
    assert stats.ready == 0
    await asyncio.sleep(0.3)  # past its due time: it must not come back
    assert (await queue.dequeue(10, "w"))[0] == []
    assert (await queue.get(e.id)).status is TaskStatus.CANCELLED
    assert (await queue.stats()).depth == dict.fromkeys(LEVELS, 0)


async def test_cancel_a_finished_task_changes_nothing(make_queue: MakeQueue, run_worker: RunWorker) -> None:
    queue = make_queue()
    e = await queue.enqueue("t")
    async with run_worker(queue, {"t": lambda ctx: "result"}):
        done = await queue.wait(e.id, timeout=10)
    assert done.status is TaskStatus.COMPLETED
    assert await queue.cancel(e.id) is TaskStatus.COMPLETED
    after = await queue.get(e.id)
    assert after.status is TaskStatus.COMPLETED
    assert after.result == "result"
    assert after.error is None
    assert after.finished_at == done.finished_at
    assert (await queue.stats()).cancelled == 0
    assert await queue.cancel(e.id) is TaskStatus.COMPLETED  # and again


async def test_cancel_twice_reports_cancelled(make_queue: MakeQueue) -> None:
    queue = make_queue()
    e = await queue.enqueue("t")
    assert await queue.cancel(e.id) is TaskStatus.QUEUED
    assert await queue.cancel(e.id) is TaskStatus.CANCELLED
    assert (await queue.stats()).cancelled == 1


async def test_cancel_unknown_id_raises_task_not_found(make_queue: MakeQueue, redis: Any,
                                                       key_prefix: str) -> None:
    queue = make_queue()
    with pytest.raises(TaskNotFound) as info:
        await queue.cancel("no-such-task")
    assert info.value.task_id == "no-such-task"
    with pytest.raises(TaskNotFound):
        await queue.get("no-such-task")
    assert await keys_under(redis, key_prefix) == []


async def test_enqueues_made_while_one_is_in_flight_go_together_in_order(
        make_queue: MakeQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of concurrent enqueues: the first goes alone, the rest ride in one write after it,
    each still its own atomic call with its own answer (dedupe and positions included)."""
    queue = make_queue()
    writes: list[int] = []
    run_each = queue._run_each

    async def counted(script: str, calls: list[list[Any]]) -> list[Any]:
        writes.append(len(calls))
        return await run_each(script, calls)

    monkeypatch.setattr(queue, "_run_each", counted)
    out = await asyncio.gather(*(queue.enqueue("t", i, dedupe_key="same" if i in (3, 7) else None)
                                 for i in range(40)))
    assert writes == [39]  # one write for all that came while the first was in flight
    assert [e.created for e in out] == [i != 7 for i in range(40)]
    assert out[7].id == out[3].id
    assert sorted(e.position for e in out if e.created) == list(range(39))  # type: ignore[type-var]
    deliveries, _ = await queue.dequeue(100, "w")
    assert [d.message.payload for d in deliveries if d.message] == [i for i in range(40) if i != 7]
    assert not queue._enqueuing and queue._riders == []
    assert (await queue.enqueue("t", "alone")).created and writes == [39]  # alone again: at once


async def test_riding_enqueues_each_get_their_own_error(make_queue: MakeQueue) -> None:
    """One call Redis refuses fails alone; one it no longer has the script for is sent again."""
    queue = make_queue()
    good = [[queue.keys.dedupe_prefix, "0", *queue._pack(queue.message("t", i), 0, "1")]
            for i in range(2)]
    bad = [queue.keys.dedupe_prefix, "0", "id-x", "not-a-level", "0", "", "1", "0", "t", "", "{}"]
    answers = await queue._run_each("enqueue", [good[0], bad, good[1]])
    assert isinstance(answers[1], ResponseError) and not isinstance(answers[0], Exception)
    assert answers[2] == [[], []]
    sha = queue._scripts.sha
    lost = iter(["0" * 40])  # as if Redis had been restarted: the first write is refused (NOSCRIPT)
    queue._scripts.sha = lambda name: next(lost, None) or sha(name)  # type: ignore[method-assign]
    again = [queue.keys.dedupe_prefix, "0", *queue._pack(queue.message("t", "again"), 0, "1")]
    assert await queue._run_each("enqueue", [again]) == [[[], []]]
    assert (await queue.stats()).ready == 3


# -- 6. batches ------------------------------------------------------------------------------------


async def test_enqueue_many_across_script_chunks(make_queue: MakeQueue) -> None:
    queue = make_queue()
    messages = [queue.message("bulk", i) for i in range(2500)]  # three script calls of <= 1,000
    out = await queue.enqueue_many(messages, positions=True)
    assert [e.id for e in out] == [m.id for m in messages]
    assert all(e.created for e in out)
    assert sorted(e.position for e in out if e.position is not None) == list(range(2500))

    stats = await queue.stats()
    assert stats.enqueued == 2500
    assert stats.depth[Priority.NORMAL] == 2500

    first, _ = await queue.dequeue(2500, "w")
    assert 0 < len(first) <= 2500
    rest = await drain(queue, count=2500)
    leased = [d.id for d in first] + rest
    assert sorted(leased) == sorted(m.id for m in messages), "every message leased exactly once"
    assert (await queue.stats()).in_flight == 2500
    assert (await queue.dequeue(2500, "w"))[0] == []


async def test_a_batch_larger_than_one_chunk_is_served_in_order(make_queue: MakeQueue) -> None:
    for attempt in range(5):  # chunk reordering would be a race: give it several chances to show
        queue = make_queue(f"chunks-{attempt}")
        messages = [queue.message("t", i) for i in range(1010)]  # chunks of 1,000 and 10
        out = await queue.enqueue_many(messages, positions=True)
        payloads: list[int] = []
        while deliveries := (await queue.dequeue(1010, "w"))[0]:
            payloads += [d.message.payload for d in deliveries if d.message]
        assert payloads == list(range(1010)), (
            f"attempt {attempt}: the 1,001st message of the batch was served #{payloads.index(1000) + 1}")
        assert [e.position for e in out] == list(range(1010))


async def test_dequeue_of_thousands_is_bounded_and_drains_everything(make_queue: MakeQueue) -> None:
    queue = make_queue()
    await queue.enqueue_batch("t", range(5000))
    first, _ = await queue.dequeue(5000, "w")  # one call may return fewer than asked (never an error)
    assert 0 < len(first) <= 5000
    payloads = [d.message.payload for d in first if d.message]
    while True:
        more, _ = await queue.dequeue(5000, "w")
        if not more:
            break
        payloads += [d.message.payload for d in more if d.message]
    assert sorted(payloads) == list(range(5000))


async def test_a_worker_with_a_batch_over_the_dequeue_cap_does_not_stall(make_queue: MakeQueue,
                                                                         run_worker: RunWorker) -> None:
    queue = make_queue()
    done = 0

    async def handler(ctx: Any) -> None:
        nonlocal done
        done += 1

    out = await queue.enqueue_batch("t", range(1500))
    assert len(out) == 1500
    async with run_worker(queue, {"t": handler}, concurrency=2000, batch=2000, poll_seconds=4):
        start = time.monotonic()
        await eventually(lambda: _true(done == 1500), 20, "1500 handlers run")
        took = time.monotonic() - start
    # With 1,500 ready and room for 2,000 the worker should never wait for its 4 s poll timeout.
    assert took < 2.5, f"1500 trivial messages took {took:.1f}s with 2000 free slots"


async def test_enqueue_many_without_positions(make_queue: MakeQueue) -> None:
    queue = make_queue()
    out = await queue.enqueue_many([queue.message("t") for _ in range(3)])  # positions are opt-in
    assert [e.position for e in out] == [None, None, None]
    assert all(e.created for e in out)
    assert (await queue.get(out[2].id)).position == 2


async def test_enqueue_many_of_nothing_writes_nothing(make_queue: MakeQueue, redis: Any, key_prefix: str
                                                      ) -> None:
    queue = make_queue()
    assert await queue.enqueue_many([]) == []
    assert await keys_under(redis, key_prefix) == []


async def test_enqueue_batch_shares_fields_and_keeps_order(make_queue: MakeQueue) -> None:
    queue = make_queue()
    out = await queue.enqueue_batch("bulk", range(1000), priority="high", owner="team-7",
                                    headers={"source": "import"}, max_retries=5, positions=True)
    assert len(out) == 1000 and all(e.created for e in out)
    assert len({e.id for e in out}) == 1000
    assert [e.position for e in out] == list(range(1000))
    record = await queue.get(out[0].id)
    assert (record.type, record.priority, record.owner, record.max_retries) == ("bulk", Priority.HIGH,
                                                                                "team-7", 5)
    assert (await queue.stats()).depth[Priority.HIGH] == 1000

    deliveries, _ = await queue.dequeue(1000, "w")
    assert [d.id for d in deliveries] == [e.id for e in out]
    for n, d in enumerate(deliveries):
        m = d.message
        assert m is not None
        assert (m.id, m.type, m.payload, m.priority, m.owner) == (out[n].id, "bulk", n, Priority.HIGH,
                                                                  "team-7")
        assert m.headers == {"source": "import"} and m.max_retries == 5 and m.attempts == 1
        assert m.traceparent is not None
    assert len({d.message.traceparent for d in deliveries if d.message}) == 1000


@pytest.mark.parametrize("payloads,fields,error", [
    ([1, 2, object()], {}, InvalidMessage),
    ([1, "z" * 2000], {}, MessageTooLarge),
    ([1], {"id": "mine"}, InvalidMessage),
    ([1], {"dedupe_key": "k"}, InvalidMessage),
    ([1], {"priority": "urgent"}, InvalidMessage),
])
async def test_enqueue_batch_refuses_bad_input_and_writes_nothing(
        make_queue: MakeQueue, redis: Any, key_prefix: str, payloads: list[Any], fields: dict[str, Any],
        error: type[Exception]) -> None:
    queue = make_queue(max_message_bytes=1024)
    with pytest.raises(error):
        await queue.enqueue_batch("t", payloads, **fields)
    assert await keys_under(redis, key_prefix) == []


async def test_dequeue_returns_at_most_count(make_queue: MakeQueue) -> None:
    queue = make_queue()
    await queue.enqueue_many([queue.message("t", i) for i in range(7)])
    first, _ = await queue.dequeue(5, "w")
    second, _ = await queue.dequeue(5, "w")
    third, due_in = await queue.dequeue(5, "w")
    assert (len(first), len(second), len(third)) == (5, 2, 0)
    assert [d.message.payload for d in first + second if d.message] == list(range(7))
    assert due_in is not None and due_in > 0  # the next lease deadline
    assert (await queue.dequeue(0, "w"))[0] == []


# -- 7. task records -------------------------------------------------------------------------------


async def test_position_counts_the_messages_served_before(make_queue: MakeQueue) -> None:
    queue = make_queue()
    enqueued = {}
    for name, prio, delay in (("n1", "normal", None), ("n2", "normal", None), ("l1", "low", None),
                              ("h1", "high", None), ("h2", "high", None), ("h3", "high", None),
                              ("c1", "critical", None), ("d1", "critical", 60.0)):
        enqueued[name] = await queue.enqueue("t", name, priority=prio, delay=delay)
    # Position at enqueue time: what was ahead of it then.
    assert {k: e.position for k, e in enqueued.items()} == {
        "n1": 0, "n2": 1, "l1": 2, "h1": 0, "h2": 1, "h3": 2, "c1": 0, "d1": 7}

    async def positions() -> dict[str, int | None]:
        return {k: (await queue.get(e.id)).position for k, e in enqueued.items()}

    assert await positions() == {"c1": 0, "h1": 1, "h2": 2, "h3": 3, "n1": 4, "n2": 5, "l1": 6, "d1": 7}

    deliveries, _ = await queue.dequeue(2, "w")  # c1 and h1 are now processing
    assert [d.message.payload for d in deliveries if d.message] == ["c1", "h1"]
    assert await positions() == {"c1": None, "h1": None, "h2": 0, "h3": 1, "n1": 2, "n2": 3, "l1": 4,
                                 "d1": 5}


async def test_record_lifecycle(make_queue: MakeQueue, run_worker: RunWorker) -> None:
    queue = make_queue(max_retries=2)
    proceed = asyncio.Event()
    progressed = asyncio.Event()

    async def handler(ctx: Any) -> dict[str, Any]:
        assert await ctx.progress(0.5, delta="half")
        progressed.set()
        await proceed.wait()
        return {"summary": ctx.payload["text"].upper()}

    before = time.time()
    e = await queue.enqueue("summarise", {"text": "hello"}, priority="high", owner="user-1")
    queued = await queue.get(e.id)
    assert queued.status is TaskStatus.QUEUED
    assert (queued.type, queued.priority, queued.owner, queued.queue) == ("summarise", Priority.HIGH,
                                                                          "user-1", queue.name)
    assert queued.attempts == 0
    assert queued.max_retries == 2
    assert queued.position == 0
    assert queued.enqueued_at == pytest.approx(before, abs=1.0)
    assert queued.started_at is None and queued.finished_at is None
    assert queued.message is not None and queued.message.payload == {"text": "hello"}

    async with run_worker(queue, {"summarise": handler}) as worker:
        await asyncio.wait_for(progressed.wait(), 10)
        running = await queue.get(e.id)
        assert running.status is TaskStatus.PROCESSING
        assert running.attempts == 1
        assert running.progress == 0.5
        assert running.position is None
        assert running.worker == worker.id
        assert running.started_at is not None and running.enqueued_at is not None
        assert running.started_at >= running.enqueued_at
        assert (await queue.stats()).in_flight == 1
        proceed.set()
        done = await queue.wait(e.id, timeout=10)

    assert done.status is TaskStatus.COMPLETED
    assert done.result == {"summary": "HELLO"}
    assert done.progress == 1.0
    assert done.attempts == 1
    assert done.finished_at is not None and done.started_at is not None
    assert done.enqueued_at <= done.started_at <= done.finished_at  # type: ignore[operator]


async def test_attempts_count_retries(make_queue: MakeQueue, run_worker: RunWorker) -> None:
    queue = make_queue(max_retries=3)
    seen: list[int] = []

    async def flaky(ctx: Any) -> str:
        seen.append(ctx.message.attempts)
        if ctx.message.attempts < 3:
            raise Retry(delay=0, reason="try again")
        return "third time lucky"

    e = await queue.enqueue("flaky")
    async with run_worker(queue, {"flaky": flaky}):
        record = await queue.wait(e.id, timeout=10)
    assert seen == [1, 2, 3]
    assert record.status is TaskStatus.COMPLETED
    assert record.attempts == 3
    assert record.result == "third time lucky"
    assert (await queue.stats()).retried == 2


async def test_finished_records_expire_after_record_ttl(make_queue: MakeQueue, run_worker: RunWorker,
                                                        redis: Any) -> None:
    queue = make_queue(record_ttl=0.5, max_retries=0)

    async def handler(ctx: Any) -> str:
        if ctx.payload == "bad":
            raise RuntimeError("boom")
        return "ok"

    good = await queue.enqueue("t", "good")
    bad = await queue.enqueue("t", "bad")
    cancelled = await queue.enqueue("t", "cancelled", delay=60)
    assert await redis.pttl(queue.keys.task(good.id)) == -1, "a queued record must not expire"
    async with run_worker(queue, {"t": handler}):
        assert (await queue.wait(bad.id, timeout=10)).status is TaskStatus.DEAD
        assert (await queue.wait(good.id, timeout=10)).status is TaskStatus.COMPLETED
        assert 0 < await redis.pttl(queue.keys.task(good.id)) <= 500
    await queue.cancel(cancelled.id)
    assert 0 < await redis.pttl(queue.keys.task(cancelled.id)) <= 500
    # record_ttl (deprecated) no longer covers dead letters: they are kept dead_letter_ttl (7 d)
    assert 86_400_000 < await redis.pttl(queue.keys.task(bad.id)) <= queue.dead_letter_ttl * 1000

    async def gone() -> bool:
        return not await redis.exists(queue.keys.task(good.id), queue.keys.task(cancelled.id))

    await eventually(gone, 5, "finished records expiring")
    with pytest.raises(TaskNotFound):
        await queue.get(good.id)
    assert (await queue.get(bad.id)).status is TaskStatus.DEAD


async def test_status_events_are_streamed(make_queue: MakeQueue, run_worker: RunWorker) -> None:
    queue = make_queue()

    async def handler(ctx: Any) -> int:
        await ctx.progress(0.25)
        return 42

    e = await queue.enqueue("evt", priority="low", owner="o-9")
    async with run_worker(queue, {"evt": handler}) as worker:
        await queue.wait(e.id, timeout=10)

    events = await queue.events("0", block_ms=100, count=1000)
    mine = [fields for _, fields in events if fields.get("id") == e.id]
    statuses = [f["status"] for f in mine]
    assert statuses[0] == "queued" and statuses[-1] == "completed"
    assert statuses == ["queued", "processing", "processing", "completed"], statuses
    assert all(f["type"] == "evt" and f["owner"] == "o-9" for f in mine)
    assert mine[0]["priority"] == "3"
    assert mine[1]["attempts"] == "1" and mine[1]["worker"] == worker.id
    assert mine[2]["progress"] == "0.25"
    assert json.loads(mine[3]["result"]) == 42
    # Entry ids increase: the stream is in order.
    ids = [entry_id for entry_id, _ in events]
    assert ids == sorted(ids, key=lambda x: tuple(int(p) for p in x.split("-")))


async def test_a_batch_announces_every_created_message(make_queue: MakeQueue) -> None:
    queue = make_queue()
    await queue.enqueue("t", dedupe_key="dup")
    out = await queue.enqueue_many([queue.message("t", i) for i in range(3)]
                                   + [queue.message("t", dedupe_key="dup")])
    assert [e.created for e in out] == [True, True, True, False]
    announced: list[str] = []
    for _, fields in await queue.events("0", block_ms=100, count=1000):
        if fields.get("status") == "queued":
            announced += fields["ids"].split(",") if "ids" in fields else [fields["id"]]
    assert sorted(announced) == sorted([out[3].id] + [e.id for e in out[:3]])


# -- 8. pause / resume -----------------------------------------------------------------------------


async def test_paused_queue_delivers_nothing_until_resumed(make_queue: MakeQueue) -> None:
    queue = make_queue()
    e = await queue.enqueue("t")
    await queue.pause()
    assert await queue.is_paused()
    assert (await queue.stats()).paused is True
    assert (await queue.dequeue(10, "w"))[0] == []
    assert (await queue.get(e.id)).status is TaskStatus.QUEUED
    assert (await queue.stats()).ready == 1

    await queue.resume()
    assert not await queue.is_paused()
    assert (await queue.stats()).paused is False
    deliveries, _ = await queue.dequeue(10, "w")
    assert [d.id for d in deliveries] == [e.id]


async def test_paused_queue_with_a_running_worker(make_queue: MakeQueue, run_worker: RunWorker) -> None:
    queue = make_queue()
    ran: list[str] = []

    async def handler(ctx: Any) -> None:
        ran.append(ctx.message.id)

    async with run_worker(queue, {"t": handler}):
        await queue.pause()
        e = await queue.enqueue("t")
        await asyncio.sleep(0.3)
        assert ran == [], "a paused queue delivered a message"
        assert (await queue.get(e.id)).status is TaskStatus.QUEUED
        await queue.resume()
        assert (await queue.wait(e.id, timeout=5)).status is TaskStatus.COMPLETED
    assert ran == [e.id]


# -- 9. stats --------------------------------------------------------------------------------------


async def test_stats(make_queue: MakeQueue, run_worker: RunWorker) -> None:
    queue = make_queue(max_retries=0)
    for prio, n in ((Priority.CRITICAL, 1), (Priority.HIGH, 2), (Priority.NORMAL, 3), (Priority.LOW, 4)):
        await queue.enqueue_many([queue.message("ok", priority=prio) for _ in range(n)])
    await queue.enqueue_many([queue.message("ok") for _ in range(2)], delay=60)

    empty = await queue.stats()
    assert empty.name == queue.name
    assert empty.depth == {Priority.CRITICAL: 1, Priority.HIGH: 2, Priority.NORMAL: 3, Priority.LOW: 4}
    assert (empty.ready, empty.delayed, empty.in_flight, empty.dead_letters) == (10, 2, 0, 0)
    assert (empty.consumers, empty.enqueued, empty.processed, empty.failed) == (0, 12, 0, 0)
    assert empty.paused is False
    assert empty.processed_per_s == 0
    assert empty.latency.samples == 0 and empty.latency.p50_ms is None

    held, _ = await queue.dequeue(1, "someone-else")  # the critical one, leased and never settled
    leased = await queue.stats()
    assert leased.in_flight == 1
    assert leased.depth[Priority.CRITICAL] == 0
    assert leased.latency.samples == 1

    bad = await queue.enqueue("bad")
    release = asyncio.Event()

    async def ok(ctx: Any) -> None:
        await release.wait()

    async def fail(ctx: Any) -> None:
        raise RuntimeError("nope")

    async with run_worker(queue, {"ok": ok, "bad": fail}, concurrency=20):

        async def consuming() -> bool:
            s = await queue.stats()
            return s.consumers == 1 and s.in_flight == 1 + 9

        await eventually(consuming, 5, "one consumer holding 9 messages (plus the manual lease)")
        release.set()
        assert (await queue.wait(bad.id, timeout=10)).status is TaskStatus.DEAD

        async def settled() -> bool:
            return (await queue.stats()).processed == 9

        await eventually(settled, 10, "9 processed")

    stats = await queue.stats()
    assert stats.consumers == 0, "a stopped worker must not count as a consumer"
    assert stats.processed == 9
    assert stats.failed == 1
    assert stats.dead_letters == 1
    assert stats.ready == 0
    assert stats.delayed == 2
    assert stats.in_flight == 1
    assert stats.enqueued == 13
    assert stats.processed_per_s == pytest.approx(9 / 60)
    assert stats.failed_per_s == pytest.approx(1 / 60)
    assert stats.latency.samples == 11
    assert None not in (stats.latency.p50_ms, stats.latency.p95_ms, stats.latency.p99_ms)
    assert 0 <= stats.latency.p50_ms <= stats.latency.p95_ms <= stats.latency.p99_ms  # type: ignore[operator]
    assert (await queue.get(held[0].id)).status is TaskStatus.PROCESSING  # the manual lease is untouched


# -- 10. bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("priority", ["urgent", 7, -1, 4, None, True, 2.0, "", "1"])
async def test_invalid_priority_is_refused(make_queue: MakeQueue, redis: Any, key_prefix: str,
                                           priority: Any) -> None:
    queue = make_queue()
    with pytest.raises(InvalidMessage):
        await queue.enqueue("t", priority=priority)
    with pytest.raises(InvalidMessage):
        Priority.parse(priority)
    assert await keys_under(redis, key_prefix) == []


@pytest.mark.parametrize("priority,level", [("CRITICAL", 0), ("High", 1), (2, 2), (Priority.LOW, 3)])
async def test_valid_priority_spellings(make_queue: MakeQueue, priority: Any, level: int) -> None:
    queue = make_queue()
    e = await queue.enqueue("t", priority=priority)
    assert (await queue.get(e.id)).priority.level == level


@pytest.mark.parametrize("type_", ["", "has space", ".leading-dot", "-dash", "a{b}", "x" * 201, "naïve"])
async def test_invalid_type_is_refused(make_queue: MakeQueue, redis: Any, key_prefix: str,
                                       type_: str) -> None:
    queue = make_queue()
    with pytest.raises(InvalidMessage):
        await queue.enqueue(type_)
    assert await keys_under(redis, key_prefix) == []


@pytest.mark.parametrize("fields", [{"colour": "red"}, {"max_retries": -1}, {"timeout": 0},
                                    {"id": "bad id"}, {"dedupe_key": ""}, {"headers": {"a": 1}}])
async def test_invalid_fields_are_refused(make_queue: MakeQueue, redis: Any, key_prefix: str,
                                          fields: dict[str, Any]) -> None:
    queue = make_queue()
    with pytest.raises(InvalidMessage):
        await queue.enqueue("t", **fields)
    assert await keys_under(redis, key_prefix) == []


@pytest.mark.parametrize("payload", [object(), {"when": object()}, b"\xff\xfe"])
async def test_unserialisable_payload_is_refused(make_queue: MakeQueue, redis: Any, key_prefix: str,
                                                 payload: Any) -> None:
    queue = make_queue()
    with pytest.raises(InvalidMessage):
        await queue.enqueue("t", payload)
    assert await keys_under(redis, key_prefix) == []


@pytest.mark.parametrize("payload,stored", [({3, 1, 2}, [1, 2, 3]), ((1, "a"), [1, "a"]), (b"abc", "abc"),
                                            ({"k": {1: "int key"}}, {"k": {"1": "int key"}}),
                                            ({"deep": [[[["x"]]]], "n": 10**30}, {"deep": [[[["x"]]]],
                                                                                  "n": 10**30})])
async def test_json_like_payloads_round_trip_as_json(make_queue: MakeQueue, payload: Any,
                                                     stored: Any) -> None:
    """What pydantic really does: sets/tuples become lists, bytes text, int keys strings."""
    queue = make_queue()
    await queue.enqueue("t", payload)
    deliveries, _ = await queue.dequeue(1, "w")
    assert deliveries[0].message is not None
    got = deliveries[0].message.payload
    if isinstance(payload, set):
        got = sorted(got)
    assert got == stored


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("via", ["enqueue", "enqueue_batch"])
async def test_non_finite_float_payload_is_refused_or_kept(make_queue: MakeQueue, value: float,
                                                           via: str) -> None:
    """Never silently turned into null: either refused, or delivered as it was sent."""
    queue = make_queue()
    try:
        if via == "enqueue":
            await queue.enqueue("t", {"score": value})
        else:
            await queue.enqueue_batch("t", [{"score": value}])
    except InvalidMessage:
        return
    deliveries, _ = await queue.dequeue(1, "w")
    assert deliveries[0].message is not None
    got = deliveries[0].message.payload["score"]
    assert got is not None, f"payload {{'score': {value}}} came back as {{'score': None}}"
    assert math.isnan(got) if math.isnan(value) else got == value


async def test_message_over_the_size_limit_is_refused(make_queue: MakeQueue, redis: Any,
                                                      key_prefix: str) -> None:
    queue = make_queue(max_message_bytes=512)
    with pytest.raises(MessageTooLarge) as info:
        await queue.enqueue("t", "x" * 600)
    assert info.value.limit == 512
    assert info.value.size > 600
    assert isinstance(info.value, InvalidMessage)
    # One bad message in a batch: nothing of the batch is written.
    with pytest.raises(MessageTooLarge):
        await queue.enqueue_many([queue.message("t", 1), queue.message("t", 2),
                                  queue.message("t", "y" * 600)])
    assert await keys_under(redis, key_prefix) == []
    assert (await queue.enqueue("t", "x" * 100)).created  # small ones still pass


async def test_size_limit_counts_utf8_bytes_not_characters(make_queue: MakeQueue, redis: Any,
                                                           key_prefix: str) -> None:
    with pytest.raises(MessageTooLarge) as probe:  # the size of a message with an empty payload
        await make_queue("probe", max_message_bytes=1).enqueue("t", "")
    envelope = probe.value.size
    queue = make_queue(max_message_bytes=envelope + 100)
    with pytest.raises(MessageTooLarge) as info:  # 60 characters, 120 bytes of payload
        await queue.enqueue("t", "é" * 60)
    assert info.value.size >= envelope + 110  # (created_at varies by a few characters)
    assert await keys_under(redis, key_prefix) == []
    assert (await queue.enqueue("t", "e" * 60)).created  # 60 ASCII characters fit


async def test_one_unserialisable_message_spoils_the_whole_batch(make_queue: MakeQueue, redis: Any,
                                                                  key_prefix: str) -> None:
    queue = make_queue()
    batch = [queue.message("t", i) for i in range(1500)]
    batch.append(Message(type="t", payload=object()))
    with pytest.raises(InvalidMessage):
        await queue.enqueue_many(batch)
    assert await keys_under(redis, key_prefix) == []


@pytest.mark.parametrize("name", ["has space", "a{b}", "{q}", "b}", "", "x" * 101, "-lead", "tab\there",
                                  "q*", "naïve"])
def test_invalid_queue_name_is_refused(redis: Any, key_prefix: str, name: str) -> None:
    with pytest.raises(InvalidMessage):
        Queue(name, redis, prefix=key_prefix)


@pytest.mark.parametrize("prefix", ["mm{", "has space", "", "a}b"])
def test_invalid_key_prefix_is_refused(redis: Any, prefix: str) -> None:
    with pytest.raises(InvalidMessage):
        Queue("q", redis, prefix=prefix)


async def test_progress_out_of_range_is_refused(make_queue: MakeQueue) -> None:
    queue = make_queue()
    e = await queue.enqueue("t")
    deliveries, _ = await queue.dequeue(1, "w")
    token = deliveries[0].token
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidMessage):
            await queue.progress(e.id, token, bad)
    assert await queue.progress(e.id, token, 0.3)
    assert not await queue.progress(e.id, "wrong-token", 0.4)
    assert (await queue.get(e.id)).progress == 0.3


# -- 11. Redis Cluster safety ----------------------------------------------------------------------


def test_crc16_matches_the_cluster_spec() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3  # the check value from the Redis Cluster spec
    assert cluster_slot("{user1000}.following") == cluster_slot("{user1000}.followers")
    assert cluster_slot("foo{}{bar}") == crc16_xmodem(b"foo{}{bar}") % 16384
    try:
        from redis.crc import key_slot
    except ImportError:  # pragma: no cover
        return
    for key in ("mm:{orders}:ready", "foo{}{bar}", "foo{{bar}}zap", "plain"):
        assert cluster_slot(key) == key_slot(key.encode())


async def test_every_key_of_a_full_lifecycle_shares_one_slot(make_queue: MakeQueue, run_worker: RunWorker,
                                                             redis: Any, key_prefix: str) -> None:
    queue = make_queue("orders.eu-1", max_retries=0)
    seen: set[str] = set()

    async def snapshot() -> None:
        seen.update(await keys_under(redis, key_prefix))

    release = asyncio.Event()

    async def ok(ctx: Any) -> str:
        await ctx.progress(0.5)
        await release.wait()
        return "ok"

    async def bad(ctx: Any) -> None:
        raise RuntimeError("to the dead-letter queue")

    await queue.enqueue("ok", dedupe_key="room-1}{odd")  # braces in a dedupe key must not move the slot
    await queue.enqueue("ok", dedupe_key="room-1}{odd")
    await queue.enqueue("ok", delay=60)
    await queue.enqueue("ok", at=time.time() + 120, priority="low")
    cancelled = await queue.enqueue("ok", priority="critical")
    await queue.cancel(cancelled.id)
    await queue.pause()
    await snapshot()
    await queue.resume()

    async with run_worker(queue, {"ok": ok, "bad": bad}):
        b = await queue.enqueue("bad")
        o = await queue.enqueue("ok")
        await queue.wait(b.id, timeout=10)

        async def held() -> bool:
            return (await queue.stats()).in_flight == 2

        await eventually(held, 5, "two handlers running")
        await snapshot()
        release.set()
        await queue.wait(o.id, timeout=10)
        await queue.stats()
        await snapshot()
    await queue.replay_dead([b.id])
    await snapshot()
    await queue.dequeue(10, "manual")
    await snapshot()
    await queue.stats()
    await snapshot()

    kinds = {key.split("}:", 1)[1].split(":", 1)[0] for key in seen}
    for kind in ("ready", "delayed", "leases", "dead", "depth", "stats", "paused", "events", "latency",
                 "workers", "task", "dedupe", "rate"):
        assert kind in kinds, f"the lifecycle never created a {kind!r} key; saw {sorted(kinds)}"
    slots = {key: cluster_slot(key) for key in seen}
    assert len(set(slots.values())) == 1, f"keys in more than one slot: {slots}"
    assert all(key.startswith(f"{key_prefix}:{{orders.eu-1}}:") for key in seen), sorted(seen)

    # The stopped worker left nothing of its own behind.
    left = await keys_under(redis, key_prefix)
    assert not [k for k in left if ":inbox:" in k or k.endswith(":idle") or k.endswith(":workers")], left


# -- idle hand-off ---------------------------------------------------------------------------------


async def test_a_hand_off_racing_the_inbox_timeout_is_not_stranded(make_queue: MakeQueue,
                                                                  run_worker: RunWorker) -> None:
    """Simulates the race deterministically: the worker's inbox wait times out at the very moment a
    producer enqueues (so the message is leased and pushed to the still-registered worker), and more
    work arrives right after, so the worker's next dequeue is full and it does not look at its inbox.
    """
    queue = make_queue(lease_seconds=0.5)
    runs: list[str] = []
    dequeue_then_wait = queue.dequeue_then_wait
    raced = False

    async def racy_dequeue_then_wait(*args: Any, **kwargs: Any) -> Any:
        nonlocal raced
        handed, cut = await dequeue_then_wait(*args, **kwargs)
        if not raced and handed is None and not cut:  # its BLPOP has just timed out...
            raced = True
            await queue.enqueue("t", "handed")  # ...and this is handed to it, still registered as idle
            await queue.enqueue_many([queue.message("t", f"busy-{i}") for i in range(8)])
        return handed, cut

    queue.dequeue_then_wait = racy_dequeue_then_wait  # type: ignore[method-assign]

    async def handler(ctx: Any) -> None:
        runs.append(ctx.payload)
        await asyncio.sleep(0.1)

    async with run_worker(queue, {"t": handler}, concurrency=1):
        await eventually(lambda: _true(len(runs) >= 9), 10, "all messages run")
        await asyncio.sleep(0.3)  # room for a stale second run to show up
    assert runs.count("handed") == 1, f"the handed message ran {runs.count('handed')} times: {runs}"
    assert runs[0] == "handed", f"the first message enqueued ran at #{runs.index('handed')}: {runs}"


async def test_dequeue_then_wait_hands_over_what_arrives_during_the_wait(make_queue: MakeQueue) -> None:
    """Settle, lease and the inbox wait in one round trip: nothing to lease, so the worker waits, and a
    message enqueued meanwhile is handed to it (already leased); the acks rode along."""
    queue = make_queue()
    first = await queue.enqueue("t", "first")
    (delivery,), _ = await queue.dequeue(1, "w")
    calls: list[tuple[list[Any], float | None]] = []
    settle = [delivery.id, delivery.token, "done", '"ok"', ""]

    async def produce() -> Any:
        await asyncio.sleep(0.2)
        return await queue.enqueue("t", "second")

    producer = asyncio.create_task(produce())
    handed, cut = await queue.dequeue_then_wait(5, "w", None, 10.0, settle, 5.0,
                                                lambda got, due: calls.append((got, due)))
    second = await producer
    assert calls == [([], calls[0][1])]  # told first: nothing leased
    assert not cut and handed is not None and handed.id == second.id
    assert handed.message is not None and handed.message.payload == "second"
    assert (await queue.get(first.id)).status is TaskStatus.COMPLETED
    assert (await queue.get(second.id)).status is TaskStatus.PROCESSING


async def test_dequeue_then_wait_does_not_wait_with_no_room_left(make_queue: MakeQueue, redis: Any) -> None:
    """A worker that got all it asked for is not kept waiting, and its inbox is left empty."""
    queue = make_queue()
    await queue.enqueue_many([queue.message("t", i) for i in range(3)])
    leased: list[Any] = []
    started = time.monotonic()
    handed, cut = await queue.dequeue_then_wait(2, "w", None, 10.0, [], 30.0,
                                                lambda got, due: leased.extend(got))
    assert time.monotonic() - started < 15.0  # not the 30 s wait
    assert cut and handed is None
    assert [d.message.payload for d in leased if d.message] == [0, 1]
    assert await redis.llen(queue.keys.inbox("w")) == 0


async def test_dequeue_then_wait_is_cut_short_when_something_falls_due_first(make_queue: MakeQueue) -> None:
    """A delayed message due before the wait would end cuts it short; the caller learns when it is due."""
    queue = make_queue()
    await queue.enqueue("t", "later", delay=0.5)
    dues: list[float | None] = []
    started = time.monotonic()
    handed, cut = await queue.dequeue_then_wait(5, "w", None, 10.0, [], 30.0,
                                                lambda got, due: dues.append(due))
    assert time.monotonic() - started < 15.0  # not the 30 s wait
    assert cut and handed is None
    assert dues[0] is not None and 0 < dues[0] <= 0.5


async def test_dequeue_then_wait_loads_its_script_when_redis_lost_it(make_queue: MakeQueue) -> None:
    """After a restart (or SCRIPT FLUSH) the call is refused with NOSCRIPT: the script is loaded and
    the pair sent again, with no wait left blocking behind the refused call. (A SHA Redis never saw
    stands in for the lost script: a real flush would disturb whoever else uses this Redis.)"""
    queue = make_queue()
    await queue.enqueue("t", "x")
    sha = queue._scripts.sha
    lost = iter(["0" * 40])
    queue._scripts.sha = lambda name: next(lost, None) or sha(name)  # type: ignore[method-assign]
    leased: list[Any] = []
    handed, cut = await queue.dequeue_then_wait(1, "w", None, 10.0, [], 30.0,
                                                lambda got, due: leased.extend(got))
    assert cut and handed is None and len(leased) == 1


# -- 12. dead letters ------------------------------------------------------------------------------


async def _make_dead_letters(queue: Queue, run_worker: RunWorker, payloads: list[str]) -> dict[str, str]:
    async def handler(ctx: Any) -> None:
        if ctx.payload.startswith("reject"):
            raise Reject(f"refused {ctx.payload}")
        raise ValueError(f"boom {ctx.payload}")

    ids = {p: (await queue.enqueue("dl", p)).id for p in payloads}
    async with run_worker(queue, {"dl": handler}):
        for task_id in ids.values():
            await queue.wait(task_id, timeout=10)
    return ids


async def test_dead_letters_keep_error_and_traceback(make_queue: MakeQueue, run_worker: RunWorker) -> None:
    queue = make_queue(max_retries=1, retry_base_seconds=0.01)
    ids = await _make_dead_letters(queue, run_worker, ["a", "b", "reject-c"])
    letters = {r.id: r for r in await queue.dead_letters()}
    assert set(letters) == set(ids.values())

    for p in ("a", "b"):
        r = letters[ids[p]]
        assert r.status is TaskStatus.DEAD
        assert r.attempts == 2  # the first try and one retry
        assert r.error is not None
        assert r.error.code == "ValueError"
        assert r.error.message == f"boom {p}"
        assert r.error.traceback is not None
        assert f"ValueError: boom {p}" in r.error.traceback
        assert "in handler" in r.error.traceback
        assert r.finished_at is not None
        assert r.message is not None and r.message.payload == p
    rejected = letters[ids["reject-c"]]
    assert rejected.status is TaskStatus.FAILED
    assert rejected.attempts == 1, "a rejected message must not be retried"
    assert rejected.error is not None and rejected.error.code == "rejected"
    assert rejected.error.message == "refused reject-c"
    stats = await queue.stats()
    assert stats.dead_letters == 3
    assert stats.failed == 3

    assert [r.id for r in await queue.dead_letters(limit=2)] == [r.id for r in await queue.dead_letters()][:2]
    assert len(await queue.dead_letters(limit=10, offset=2)) == 1


async def test_replay_dead_letters_by_id_and_all(make_queue: MakeQueue, run_worker: RunWorker) -> None:
    queue = make_queue(max_retries=0)
    ids = await _make_dead_letters(queue, run_worker, ["a", "b", "c"])

    assert await queue.replay_dead([ids["a"]]) == 1
    replayed = await queue.get(ids["a"])
    assert replayed.status is TaskStatus.QUEUED
    assert replayed.attempts == 0
    assert replayed.finished_at is None
    assert replayed.error is not None and replayed.error.message == "boom a", "the last error is kept"
    assert replayed.position == 0
    stats = await queue.stats()
    assert stats.dead_letters == 2
    assert stats.depth[Priority.NORMAL] == 1

    assert await queue.replay_dead([ids["a"]]) == 0, "only dead letters can be replayed"
    assert await queue.replay_dead(["no-such-id"]) == 0

    assert await queue.replay_dead() == 2
    stats = await queue.stats()
    assert stats.dead_letters == 0
    assert stats.depth[Priority.NORMAL] == 3
    deliveries, _ = await queue.dequeue(10, "w")
    assert {d.id for d in deliveries} == set(ids.values())
    assert all(d.message is not None and d.message.attempts == 1 for d in deliveries)


async def test_replay_all_respects_the_limit(make_queue: MakeQueue, run_worker: RunWorker) -> None:
    queue = make_queue(max_retries=0)
    await _make_dead_letters(queue, run_worker, ["a", "b", "c"])
    oldest = [r.id for r in await queue.dead_letters()]
    assert await queue.replay_dead(limit=2) == 2
    assert [r.id for r in await queue.dead_letters()] == oldest[2:]


async def test_purge_dead_letters_by_id_and_all(make_queue: MakeQueue, run_worker: RunWorker,
                                                redis: Any) -> None:
    queue = make_queue(max_retries=0)
    ids = await _make_dead_letters(queue, run_worker, ["a", "b", "c"])
    live = await queue.enqueue("dl", "still-queued")

    assert await queue.purge_dead([ids["a"]]) == 1
    with pytest.raises(TaskNotFound):
        await queue.get(ids["a"])
    assert (await queue.stats()).dead_letters == 2
    assert await queue.purge_dead([ids["a"], live.id]) == 0, "only dead letters are purged"
    assert (await queue.get(live.id)).status is TaskStatus.QUEUED

    assert await queue.purge_dead() == 2
    assert await queue.dead_letters() == []
    assert (await queue.stats()).dead_letters == 0
    for p in ("b", "c"):
        assert not await redis.exists(queue.keys.task(ids[p]))
    assert await queue.purge_dead() == 0


# -- 13. malformed data in Redis -------------------------------------------------------------------


async def test_garbage_message_body_is_dead_lettered_and_the_worker_goes_on(
        make_queue: MakeQueue, run_worker: RunWorker, redis: Any) -> None:
    queue = make_queue()
    first = await queue.enqueue("t", 1)
    broken = await queue.enqueue("t", 2)
    last = await queue.enqueue("t", 3)
    await redis.hset(queue.keys.task(broken.id), "msg", "{this is not json")
    ran: list[int] = []

    async def handler(ctx: Any) -> None:
        ran.append(ctx.payload)

    async with run_worker(queue, {"t": handler}, concurrency=1):
        record = await queue.wait(broken.id, timeout=10)
        assert (await queue.wait(last.id, timeout=10)).status is TaskStatus.COMPLETED
        after = await queue.enqueue("t", 4)
        assert (await queue.wait(after.id, timeout=10)).status is TaskStatus.COMPLETED

    assert record.status is TaskStatus.DEAD
    assert record.error is not None
    assert record.error.code == "malformed"
    assert "malformed" in record.error.message
    assert record.message is None
    assert sorted(ran) == [1, 3, 4]
    assert (await queue.get(first.id)).status is TaskStatus.COMPLETED
    assert [r.id for r in await queue.dead_letters()] == [broken.id]


async def test_ready_id_without_a_message_body_is_buried_by_dequeue(make_queue: MakeQueue,
                                                                    redis: Any) -> None:
    queue = make_queue()
    good = await queue.enqueue("t", "good")
    hollow = await queue.enqueue("t", "hollow", priority="high")
    await redis.hdel(queue.keys.task(hollow.id), "msg")
    await redis.zadd(queue.keys.ready, {"ghost": 0})  # a ready id with no record at all

    deliveries, _ = await queue.dequeue(10, "w")
    assert [d.id for d in deliveries] == [good.id]

    record = await queue.get(hollow.id)
    assert record.status is TaskStatus.DEAD
    assert record.error is not None and record.error.code == "malformed"
    assert "malformed" in record.error.code and "no message body" in record.error.message
    assert await redis.zscore(queue.keys.dead, hollow.id) is not None
    stats = await queue.stats()
    assert stats.depth == dict.fromkeys(LEVELS, 0), "depth must not drift"
    assert stats.ready == 0

    # A body-less dead letter cannot be replayed: its record is dropped instead.
    assert await queue.replay_dead([hollow.id]) == 0
    with pytest.raises(TaskNotFound):
        await queue.get(hollow.id)


async def test_enqueue_batch_size_limit_is_exact(make_queue: MakeQueue) -> None:
    """The bulk path splices payloads into a template; its size check must match the real body
    (up to the few characters by which the time stamp's text may differ between two calls)."""
    queue = make_queue(max_message_bytes=400)
    ok = await queue.enqueue_batch("t", ["x"])
    body = (await queue.redis.hget(queue.keys.task(ok[0].id), "msg"))
    room = 400 - len(body.encode())  # bytes left under the limit with a one-character payload
    fits = "x" * (1 + room - 6)
    assert len(await queue.enqueue_batch("t", [fits, "é" * ((1 + room - 6) // 2)])) == 2
    with pytest.raises(MessageTooLarge):
        await queue.enqueue_batch("t", ["y", "y" * (1 + room + 6)])
    assert (await queue.stats()).enqueued == 3  # the refused batch wrote nothing
    for record in [await queue.get(e.id) for e in ok]:
        assert record.message is not None and record.message.payload == "x"


async def test_an_unreachable_redis_is_a_bus_connection_error_everywhere() -> None:
    """redis-py's errors never leak out of the queue's API: every call says BusConnectionError."""
    from shared.bus import BusConnectionError
    from shared.bus.connection import client

    redis = client("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    queue = Queue("q", redis)
    calls = [queue.enqueue("t"), queue.enqueue_batch("t", [1, 2]), queue.get("x"), queue.cancel("x"),
             queue.stats(), queue.pause(), queue.dead_letters(), queue.dequeue(1, "w"),
             queue.wait_inbox("w", 0.1)]
    for call in calls:
        with pytest.raises(BusConnectionError, match="Redis unreachable during"):
            await call
    await redis.aclose()
