"""The task dispatcher against the real Redis: routing, submission (single, batch, dedupe), reading and
cancelling, deadlines (queued, running, finished, two sweepers), the relay (one and two instances, its
lease and takeovers, bad entries, Redis errors), `SeqFilter`, dead-letter replay; and the queue's
cancel-as-timeout it relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis import exceptions as redis_errors

from gateway.task_routes import TASK_ROUTES as DEFAULT_ROUTES
from shared.bus import (
    ConfigError,
    Context,
    InvalidMessage,
    Message,
    Priority,
    Queue,
    Reject,
    TaskNotFound,
    TaskRecord,
    TaskStatus,
    connect,
)
from shared.bus.dispatch.dispatcher import Dispatcher, TaskUpdate
from shared.bus.dispatch.relay import LEADER, RELAY_GROUP
from shared.bus.dispatch.updates import SeqFilter, stream_id
from shared.bus.events.base import EventBus, Listener
from shared.bus.keys import DispatchKeys

REDIS_URL = os.environ.get("MEETMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
WAIT = 15.0  # generous: a slow machine never fails a test, only a wrong outcome does
MakeDispatcher = Callable[..., Dispatcher]
RunWorker = Callable[..., Any]


# -- helpers and fixtures -------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)


async def keys_under(redis: Any, prefix: str) -> list[str]:
    return sorted([k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)])


async def stream(queue: Queue) -> list[dict[str, str]]:
    return [fields for _, fields in await queue.events("0", block_ms=1, count=10_000)]


@pytest.fixture
def make_dispatcher(redis: Any, key_prefix: str) -> MakeDispatcher:
    def make(**options: Any) -> Dispatcher:
        return Dispatcher(options.pop("client", redis), routes=options.pop("routes", DEFAULT_ROUTES),
                          prefix=key_prefix, **options)

    return make


@pytest.fixture
async def make_bus(key_prefix: str) -> AsyncIterator[Callable[[], Awaitable[EventBus]]]:
    """``await make_bus()``: a started event bus (a gateway's) under this test's prefix."""
    made: list[EventBus] = []

    async def make() -> EventBus:
        bus = EventBus.from_url(REDIS_URL, service="gateway", prefix=key_prefix)
        await bus.start()
        made.append(bus)
        return bus

    yield make
    if made:
        await made[0].drop()
    for bus in made:
        await bus.stop()


@contextlib.asynccontextmanager
async def running(*dispatchers: Dispatcher) -> AsyncIterator[None]:
    """Run the dispatchers (sweeper and relay) for the block; their relays are ready on entry."""
    tasks = [asyncio.create_task(d.run()) for d in dispatchers]
    try:
        await asyncio.wait_for(asyncio.gather(*(d.ready.wait() for d in dispatchers)), WAIT)
        yield
    finally:
        for d in dispatchers:
            d.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)


async def collect(listener: Listener, task_ids: set[str], *, settle: float = 0.0) -> list[TaskUpdate]:
    """Updates broadcast for ``task_ids`` until each has a terminal one (then ``settle`` s more, to
    catch duplicates), in the order received; checks each topic."""
    got: list[TaskUpdate] = []
    left = set(task_ids)
    deadline = time.monotonic() + WAIT
    while left or settle > 0:
        timeout = deadline - time.monotonic() if left else settle
        try:
            message = await listener.get(timeout=max(timeout, 0.001))
        except TimeoutError:
            if left:
                pytest.fail(f"no final update for {sorted(left)}")
            break
        update = TaskUpdate.model_validate(message.data)
        assert message.topic == f"task.{update.task_id}"
        if update.task_id in task_ids:
            got.append(update)
            if update.status.terminal:
                left.discard(update.task_id)
    return got


def handlers(log: list[str]) -> dict[str, Any]:
    """Handlers for a few AI types: a chat streaming its answer, a summary (with a large variant), a
    translation that is always refused, action items that sleep until cancelled."""

    async def chat(ctx: Context) -> dict[str, str]:
        await ctx.progress(0.5, "Hel")
        await ctx.progress(1.0, "lo")
        return {"text": "Hello", "meeting": ctx.message.meeting_id or ""}

    async def summarize(ctx: Context) -> Any:
        return "x" * 20_000 if ctx.payload == "large" else {"summary": f"about {ctx.payload}"}

    async def translate(ctx: Context) -> None:
        raise Reject("no such language")

    async def action_items(ctx: Context) -> None:
        log.append("started")
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    return {"ai.chat": chat, "ai.summarize": summarize, "ai.translate": translate,
            "ai.action_items": action_items}


def streaming(count: int, pause: float = 0.0) -> Any:
    """A chat handler streaming its answer as ``count`` deltas ("w0 ", "w1 ", ...), ``pause`` s apart."""

    async def chat(ctx: Context) -> str:
        for i in range(count):
            await ctx.progress((i + 1) / count, f"w{i} ")
            await asyncio.sleep(pause)
        return "done"

    return chat


def passed_on(updates: list[TaskUpdate]) -> list[TaskUpdate]:
    """What a gateway passes on to its clients: the updates `SeqFilter` finds fresh."""
    seen = SeqFilter()
    return [u for u in updates if seen.fresh(u)]


async def stream_ids(queue: Queue, task_id: str) -> list[str]:
    """The ids of the status entries of one task, in stream order."""
    return [entry_id for entry_id, fields in await queue.events("0", block_ms=1, count=10_000)
            if fields.get("id") == task_id]


def partition(client: Any) -> Callable[[], None]:
    """Cut ``client`` off from Redis (every command it starts from now on fails as if the network were
    down), as a dead instance would be; returns what heals it."""
    pool = client.connection_pool

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise redis_errors.ConnectionError("partitioned from Redis (simulated)")

    pool.get_connection = unreachable

    def heal() -> None:
        pool.__dict__.pop("get_connection", None)

    return heal


def leader_of(*dispatchers: Dispatcher) -> list[Dispatcher]:
    """The dispatchers whose relay holds the lease (by its own clock)."""
    return [d for d in dispatchers if d.relay is not None and d.relay.leading]


# -- routing and submitting -----------------------------------------------------------------------


async def test_routes_each_type_to_its_service_queue(make_dispatcher: MakeDispatcher, redis: Any,
                                                     key_prefix: str) -> None:
    d = make_dispatcher()
    assert sorted(d.queues) == ["ai", "media", "meeting", "user"]
    assert d.routes == DEFAULT_ROUTES
    for type_, queue in DEFAULT_ROUTES.items():
        assert d.queue_for(type_).name == queue
    for type_ in ("media.cover", "meeting.kick", "user.profile.update", "ai.chat"):
        s = await d.submit(owner="alice", type=type_, data={"x": 1})
        assert s.created and s.queue == DEFAULT_ROUTES[type_]
        assert s.task_id.startswith(f"{s.queue}.")
        record = await d.get(s.task_id)
        assert record.queue == s.queue and record.type == type_ and record.message is not None
        assert record.message.payload == {"x": 1}

    before = await keys_under(redis, key_prefix)
    with pytest.raises(InvalidMessage) as refused:
        await d.submit(owner="alice", type="ai.dance")
    assert str(refused.value) == f"unknown task type 'ai.dance'; known: {', '.join(sorted(DEFAULT_ROUTES))}"
    assert await keys_under(redis, key_prefix) == before

    custom = make_dispatcher(routes={"report.build": "reports", "report.mail": "reports"})
    assert list(custom.queues) == ["reports"]
    assert (await custom.submit(owner="bob", type="report.mail")).task_id.startswith("reports.")
    with pytest.raises(InvalidMessage, match=r"known: report\.build, report\.mail$"):
        custom.queue_for("media.cover")
    for bad in ({}, {"x.y": "has.dot"}, {"x.y": "_hidden"}, {"bad type!": "q"}):
        with pytest.raises(ConfigError):
            make_dispatcher(routes=bad)


def test_the_routes_are_the_applications_to_give(redis: Any) -> None:
    """The library holds no table of task types: a dispatcher without ``routes=`` is refused, saying so."""
    with pytest.raises(ConfigError, match=r"needs routes= \(task type -> queue name\)"):
        Dispatcher(redis)


async def test_submit_records_priority_owner_meeting_deadline_and_position(
        make_dispatcher: MakeDispatcher, redis: Any, key_prefix: str) -> None:
    d = make_dispatcher()
    first = await d.submit(owner="alice", type="ai.summarize", data="a")
    second = await d.submit(owner="alice", type="ai.translate", data="b", priority="low")
    urgent = await d.submit(owner="bob", type="ai.chat", data={"q": "hi"}, priority="critical",
                            meeting_id="m-42", timeout_s=30)
    delayed = await d.submit(owner="bob", type="ai.chat", delay_s=60)
    assert (first.position, second.position, urgent.position, delayed.position) == (0, 1, 0, 3)
    assert all(s.status is TaskStatus.QUEUED for s in (first, second, urgent, delayed))

    record = await d.get(urgent.task_id)
    assert record.priority is Priority.CRITICAL and record.owner == "bob" and record.meeting_id == "m-42"
    assert record.position == 0 and record.status is TaskStatus.QUEUED
    assert record.message is not None and record.message.payload == {"q": "hi"}
    assert record.message.timeout == 30 and record.message.meeting_id == "m-42"
    assert (await d.get(second.task_id)).priority is Priority.LOW
    assert (await d.get(first.task_id)).meeting_id is None
    assert (await d.get(first.task_id)).position == 1

    deadlines = await redis.zrange(DispatchKeys(key_prefix).deadlines, 0, -1, withscores=True)
    assert [task_id for task_id, _ in deadlines] == [urgent.task_id]  # only tasks with a timeout
    assert deadlines[0][1] >= (time.time() + 25) * 1000

    for bad in ({"priority": "urgent"}, {"timeout_s": 0}, {"timeout_s": float("nan")}, {"delay_s": -1},
                {"data": object()}, {"meeting_id": ""}, {"dedupe_key": ""}):
        with pytest.raises(InvalidMessage):
            await d.submit(owner="alice", type="ai.chat", **bad)
    for bad_id in ("nodot", "zzz.0190", "ai.", "ai.no-such-task", ".ai"):
        with pytest.raises(TaskNotFound):
            await d.get(bad_id)
        with pytest.raises(TaskNotFound):
            await d.cancel(bad_id)


async def test_batch_validates_every_item_before_writing_any(make_dispatcher: MakeDispatcher, redis: Any,
                                                             key_prefix: str) -> None:
    d = make_dispatcher()
    good = {"type": "media.cover", "data": {"file": "a.png"}}
    for n, bad in [(2, {"type": "ai.dance"}), (1, {"type": "ai.chat", "priority": "urgent"}),
                   (2, {"type": "ai.chat", "data": object()}), (1, {"type": "ai.chat", "colour": "red"}),
                   (2, {"data": 1}), (1, {"type": "ai.chat", "timeout_s": -1})]:
        items = [good, good, bad] if n == 2 else [good, bad, good]
        with pytest.raises(InvalidMessage, match=f"batch item {n}"):
            await d.submit_batch(owner="alice", items=items)
    with pytest.raises(InvalidMessage, match=r"^unknown task type 'ai.dance'; known: .*\(batch item 0\)$"):
        await d.submit_batch(owner="alice", items=[{"type": "ai.dance"}])
    assert await keys_under(redis, key_prefix) == []

    items = [{"type": "ai.summarize", "data": 1, "meeting_id": "m1", "timeout_s": 30},
             {"type": "media.cover", "data": 2, "priority": "high"},
             {"type": "ai.chat", "data": 3, "priority": "critical"},
             {"type": "ai.summarize", "data": 4},
             {"type": "media.transcode", "data": 5, "delay_s": 60}]
    submitted = await d.submit_batch(owner="carol", items=items)
    assert [s.queue for s in submitted] == ["ai", "media", "ai", "ai", "media"]
    assert all(s.created and s.status is TaskStatus.QUEUED for s in submitted)
    assert [s.position for s in submitted][:4] == [1, 0, 0, 2]
    assert submitted[4].position in (0, 1)  # behind media's ready tasks: enqueued concurrently
    for s, item in zip(submitted, items, strict=True):
        record = await d.get(s.task_id)
        assert record.owner == "carol" and record.type == item["type"]
        assert record.message is not None and record.message.payload == item["data"]
    assert (await d.get(submitted[0].task_id)).meeting_id == "m1"
    # One enqueue per queue (and delay): the AI queue announced its three tasks in one entry.
    ai = [e for e in await stream(d.queues["ai"]) if e["status"] == "queued"]
    assert len(ai) == 1 and ai[0]["ids"].split(",") == [submitted[i].task_id for i in (0, 2, 3)]
    assert await d.submit_batch(owner="carol", items=[]) == []


async def test_dedupe_answers_the_first_task(make_dispatcher: MakeDispatcher, redis: Any,
                                             key_prefix: str) -> None:
    d = make_dispatcher()
    first = await d.submit(owner="alice", type="ai.summarize", dedupe_key="sum:m1", timeout_s=30)
    again = await d.submit(owner="alice", type="ai.summarize", dedupe_key="sum:m1", timeout_s=30)
    assert first.created and not again.created
    assert again.task_id == first.task_id and again.status is TaskStatus.QUEUED and again.position == 0
    batch = await d.submit_batch(owner="alice", items=[
        {"type": "ai.summarize", "dedupe_key": "sum:m1", "timeout_s": 5},
        {"type": "ai.summarize", "dedupe_key": "sum:m2"}])
    assert [s.created for s in batch] == [False, True] and batch[0].task_id == first.task_id
    # Same key on another queue is another task.
    other = await d.submit(owner="alice", type="media.cover", dedupe_key="sum:m1")
    assert other.created and other.task_id != first.task_id
    # Only the task that exists has a deadline.
    assert await redis.zrange(DispatchKeys(key_prefix).deadlines, 0, -1) == [first.task_id]
    assert await d.cancel(first.task_id) is TaskStatus.QUEUED
    cancelled = await d.submit(owner="alice", type="ai.summarize", dedupe_key="sum:m1")
    assert not cancelled.created and cancelled.status is TaskStatus.CANCELLED


async def test_get_and_cancel(make_dispatcher: MakeDispatcher, redis: Any, key_prefix: str) -> None:
    d = make_dispatcher()
    s = await d.submit(owner="alice", type="meeting.mute", data={"user": "u2"}, timeout_s=30)
    assert await d.cancel(s.task_id, "host changed their mind") is TaskStatus.QUEUED
    record = await d.get(s.task_id)
    assert record.status is TaskStatus.CANCELLED and record.position is None
    assert record.error is not None and record.error.code == "cancelled"
    assert record.error.message == "host changed their mind"
    assert await redis.zcard(DispatchKeys(key_prefix).deadlines) == 0
    assert await d.cancel(s.task_id) is TaskStatus.CANCELLED
    assert (await d.queues["meeting"].stats()).ready == 0


# -- deadlines ------------------------------------------------------------------------------------


async def test_a_queued_task_past_its_deadline_times_out(make_dispatcher: MakeDispatcher, redis: Any,
                                                         key_prefix: str) -> None:
    d = make_dispatcher()
    doomed = await d.submit(owner="alice", type="ai.chat", timeout_s=0.2)
    waiting = await d.submit(owner="alice", type="ai.chat", delay_s=30, timeout_s=0.2)
    patient = await d.submit(owner="alice", type="ai.chat", timeout_s=600)
    plain = await d.submit(owner="alice", type="ai.chat")
    async with running(d):  # the sweeper, without a relay
        for s in (doomed, waiting):
            await eventually(lambda s=s: _status(d, s.task_id, TaskStatus.TIMEOUT), "the timeout")
    for s in (doomed, waiting):
        record = await d.get(s.task_id)
        assert record.error is not None and record.error.code == "timeout"
        assert record.finished_at is not None and record.position is None
    assert (await d.get(patient.task_id)).status is TaskStatus.QUEUED
    assert (await d.get(plain.task_id)).status is TaskStatus.QUEUED
    queue = d.queues["ai"]
    stats = await queue.stats()
    assert (stats.ready, stats.delayed, stats.dead_letters) == (2, 0, 0)  # ended, not dead-lettered
    assert await redis.zrange(DispatchKeys(key_prefix).deadlines, 0, -1) == [patient.task_id]
    assert await d.sweep_timeouts() == 0


async def test_a_running_task_past_its_deadline_is_stopped(make_dispatcher: MakeDispatcher,
                                                           run_worker: RunWorker, redis: Any,
                                                           key_prefix: str) -> None:
    d = make_dispatcher()
    log: list[str] = []
    async with run_worker(d.queues["ai"], handlers(log), grace_seconds=1):
        s = await d.submit(owner="alice", type="ai.action_items", timeout_s=60)
        await eventually(lambda: _async(log == ["started"]), "the handler to start")
        assert (await d.get(s.task_id)).status is TaskStatus.PROCESSING
        # Bring the deadline forward rather than wait for it: the handler's own timeout (the same 60 s,
        # counted from its start) must not be what ends it here.
        await redis.zadd(DispatchKeys(key_prefix).deadlines, {s.task_id: 0})
        assert await d.sweep_timeouts() == 1
        await eventually(lambda: _async(log == ["started", "cancelled"]), "the handler to be cancelled")
        record = await d.get(s.task_id)
        assert record.status is TaskStatus.TIMEOUT and record.error is not None
        assert record.error.code == "timeout"
    assert (await d.get(s.task_id)).status is TaskStatus.TIMEOUT  # the worker settled nothing
    assert (await d.queues["ai"].stats()).in_flight == 0


async def test_a_finished_task_is_never_marked_timeout(make_dispatcher: MakeDispatcher, run_worker: RunWorker,
                                                       redis: Any, key_prefix: str) -> None:
    d = make_dispatcher()
    async with run_worker(d.queues["ai"], handlers([])):
        done = await d.submit(owner="alice", type="ai.summarize", data="m1", timeout_s=60)
        failed = await d.submit(owner="alice", type="ai.translate", timeout_s=60)
        for s in (done, failed):
            await eventually(lambda s=s: _terminal(d, s.task_id), "the task to finish")
    cancelled = await d.submit(owner="alice", type="ai.chat", timeout_s=60)
    await d.queues["ai"].cancel(cancelled.task_id)  # behind the dispatcher's back: its deadline stays
    keys = DispatchKeys(key_prefix)
    await redis.zadd(keys.deadlines, {done.task_id: 0, failed.task_id: 0, cancelled.task_id: 0})
    assert await d.sweep_timeouts() == 0
    assert (await d.get(done.task_id)).status is TaskStatus.COMPLETED
    assert (await d.get(failed.task_id)).status is TaskStatus.FAILED
    assert (await d.get(cancelled.task_id)).status is TaskStatus.CANCELLED
    assert await redis.zcard(keys.deadlines) == 0


async def test_two_sweepers_end_each_task_once(make_dispatcher: MakeDispatcher, redis: Any,
                                               key_prefix: str) -> None:
    one, two = make_dispatcher(), make_dispatcher()
    submitted = await one.submit_batch(owner="alice", items=[
        {"type": "ai.chat" if i % 2 else "media.cover", "timeout_s": 60} for i in range(60)])
    await redis.zadd(DispatchKeys(key_prefix).deadlines, {s.task_id: 0 for s in submitted})
    counts = await asyncio.gather(*(d.sweep_timeouts() for d in (one, two, one, two)))
    assert sum(counts) == 60
    ended = Counter()
    for queue in one.queues.values():
        for e in await stream(queue):
            if e["status"] == "timeout":
                ended[e["id"]] += 1
    assert ended == Counter({s.task_id: 1 for s in submitted})


# -- the relay ------------------------------------------------------------------------------------


async def test_relay_pushes_a_tasks_life_to_listeners(make_dispatcher: MakeDispatcher, make_bus: Any,
                                                      run_worker: RunWorker, redis: Any,
                                                      key_prefix: str) -> None:
    bus = await make_bus()
    listener = bus.listen("task.>")
    d = make_dispatcher(events=bus)
    async with running(d), run_worker(d.queues["ai"], handlers([])):
        chat = await d.submit(owner="alice", type="ai.chat", data={"q": "hi"}, meeting_id="m-7", timeout_s=60)
        updates = await collect(listener, {chat.task_id})
        large = await d.submit(owner="alice", type="ai.summarize", data="large")
        refused = await d.submit(owner="bob", type="ai.translate")
        batch = await d.submit_batch(owner="carol", items=[
            {"type": "ai.summarize", "data": "b1", "meeting_id": "m-8"},
            {"type": "ai.summarize", "data": "b2"}])
        others = await collect(listener, {large.task_id, refused.task_id, *(s.task_id for s in batch)})

    steps = [(u.status, u.progress, u.delta) for u in updates]
    assert steps == [(TaskStatus.QUEUED, None, None), (TaskStatus.PROCESSING, None, None),
                     (TaskStatus.PROCESSING, 0.5, "Hel"), (TaskStatus.PROCESSING, 1.0, "lo"),
                     (TaskStatus.COMPLETED, None, None)]
    for u in updates:
        assert (u.task_id, u.queue, u.type, u.owner, u.meeting_id) == (chat.task_id, "ai", "ai.chat", "alice",
                                                                        "m-7")
        assert u.at > time.time() - 600 and u.seq is not None
    assert updates[0].position == 0 or updates[0].position is None
    assert updates[1].attempts == 1
    assert updates[-1].result == {"text": "Hello", "meeting": "m-7"}
    assert [u.seq for u in updates] == sorted((u.seq or "" for u in updates), key=_seq)
    assert await redis.zcard(DispatchKeys(key_prefix).deadlines) == 0  # dropped when it finished

    def final(task_id: str) -> TaskUpdate:
        return next(u for u in others if u.task_id == task_id and u.status.terminal)

    assert final(large.task_id).result == "x" * 20_000  # too large for the stream entry: read back
    failed = final(refused.task_id)
    assert failed.status is TaskStatus.FAILED and failed.owner == "bob"
    assert failed.error is not None and failed.error.code == "rejected"
    for s, meeting in zip(batch, ("m-8", None), strict=True):
        queued = [u for u in others if u.task_id == s.task_id and u.status is TaskStatus.QUEUED]
        assert len(queued) == 1  # from the batch's single stream entry
        assert (queued[0].type, queued[0].owner, queued[0].meeting_id) == ("ai.summarize", "carol", meeting)
        assert final(s.task_id).status is TaskStatus.COMPLETED


async def test_the_relay_hands_updates_to_its_local_hook_before_broadcasting_them(
        make_dispatcher: MakeDispatcher, make_bus: Any, run_worker: RunWorker) -> None:
    bus, elsewhere = await make_bus(), await make_bus()
    own, listener = bus.listen("task.>"), elsewhere.listen("task.>")
    d = make_dispatcher(events=bus)
    assert d.relay is not None
    local: list[TaskUpdate] = []
    broadcast_when_local: list[int] = []

    def hook(update: TaskUpdate) -> None:
        local.append(update)
        broadcast_when_local.append(bus.stats.broadcast_sent)
        if len(local) == 2:
            raise RuntimeError("a failing hook stops nothing")

    d.relay.local = hook
    async with running(d), run_worker(d.queues["ai"], handlers([])):
        chat = await d.submit(owner="alice", type="ai.chat", data={"q": "hi"})
        broadcast = await collect(listener, {chat.task_id})  # another gateway gets them all
    assert [(u.seq, u.status, u.delta) for u in local] == [(u.seq, u.status, u.delta) for u in broadcast]
    assert len(local) == 5
    assert all(sent <= i for i, sent in enumerate(broadcast_when_local))  # each before its broadcast
    with pytest.raises(TimeoutError):
        await own.get(timeout=0.3)  # this process's listeners had them from the hook: skipped
    assert bus.stats.broadcast_skipped == 5


async def test_the_relay_knows_a_task_before_it_is_queued(
        make_dispatcher: MakeDispatcher, make_bus: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker may start a task, and the relay read that, before the enqueue's answer is back: the
    relay must know the task's type, owner and meeting already, or it looks them up (a round trip
    more for the whole batch)."""
    d = make_dispatcher(events=await make_bus())
    assert d.relay is not None
    known_when_queued: list[tuple[Any, ...] | None] = []
    enqueue_many = Queue.enqueue_many  # `enqueue` goes through it too

    async def spy(self: Queue, messages: Any, **kwargs: Any) -> Any:
        known_when_queued.extend(d.relay._tasks.get(m.id) if d.relay else None for m in messages)
        return await enqueue_many(self, messages, **kwargs)

    monkeypatch.setattr(Queue, "enqueue_many", spy)
    await d.submit(owner="alice", type="ai.chat", data={"q": "hi"}, meeting_id="m1")
    await d.submit_batch(owner="bob", items=[{"type": "media.cover", "data": {}}, {"type": "ai.chat"}])
    assert sorted(known_when_queued, key=str) == sorted(
        [("ai.chat", "alice", "m1"), ("ai.chat", "bob", None), ("media.cover", "bob", None)], key=str)


async def test_a_relay_broadcasting_when_followed_sends_nothing_while_it_alone_follows(
        make_dispatcher: MakeDispatcher, make_bus: Any, run_worker: RunWorker, redis: Any,
        key_prefix: str) -> None:
    """A lone gateway: every update goes to its own sessions (the local hook), none to the broker,
    and every entry is acknowledged all the same."""
    bus, observer = await make_bus(), await make_bus()
    listener = observer.listen("task.>")  # listening without following: told nothing
    d = make_dispatcher(events=bus, relay_broadcast="followed")
    assert d.relay is not None
    local: list[TaskUpdate] = []
    d.relay.local = local.append
    await d.relay.follow()
    followers = DispatchKeys(key_prefix).followers
    assert await redis.zrange(followers, 0, -1) == [d.consumer]
    async with running(d), run_worker(d.queues["ai"], handlers([])):
        chats = [await d.submit(owner="alice", type="ai.chat") for _ in range(3)]

        async def all_done() -> bool:
            return sum(u.status.terminal for u in local) == 3

        await eventually(all_done, "every task's final update, locally")
        with pytest.raises(TimeoutError):
            await listener.get(timeout=0.3)
    assert bus.stats.broadcast_sent == 0
    for chat in chats:
        mine = [u for u in local if u.task_id == chat.task_id]
        assert [u.status for u in mine] == [TaskStatus.QUEUED, *[TaskStatus.PROCESSING] * 3,
                                            TaskStatus.COMPLETED]
    events = d.queues["ai"].keys.events
    assert [(g["name"], g["pending"]) for g in await redis.xinfo_groups(events)] == [(RELAY_GROUP, 0)]
    assert await redis.zcard(followers) == 0  # dropped when its relay stopped


async def test_a_follower_gets_every_update_of_what_it_submits_once_registered(
        make_dispatcher: MakeDispatcher, make_bus: Any, run_worker: RunWorker) -> None:
    """Gateway A relays, alone, blocked in a read; gateway B registers, then at once submits: the
    check after A's read sees B, so B's updates reach it through the broker, every one."""
    bus_a, bus_b = await make_bus(), await make_bus()
    a = make_dispatcher(events=bus_a, relay_broadcast="followed")
    b = make_dispatcher(client=await connect(REDIS_URL), events=bus_b, relay_broadcast="followed")
    assert a.relay is not None and b.relay is not None
    local: list[TaskUpdate] = []
    a.relay.local = local.append
    listener = bus_b.listen("task.>")
    await a.relay.follow()
    try:
        async with running(a), run_worker(a.queues["ai"], handlers([])):
            await eventually(lambda: _async(a.relay is not None and a.relay.leading), "A to lead")
            alone = await a.submit(owner="alice", type="ai.chat")
            await eventually(lambda: _async(any(u.task_id == alone.task_id and u.status.terminal
                                                for u in local)), "A's own task, locally")
            assert bus_a.stats.broadcast_sent == 0
            await asyncio.sleep(0.1)  # A is blocked in its next read
            await b.relay.follow()
            chat = await b.submit(owner="bob", type="ai.chat")
            updates = await collect(listener, {chat.task_id})
    finally:
        await b.redis.aclose()
    assert [u.status for u in updates] == [TaskStatus.QUEUED, *[TaskStatus.PROCESSING] * 3,
                                           TaskStatus.COMPLETED]
    assert [u.seq for u in updates] == [u.seq for u in local if u.task_id == chat.task_id]


async def test_a_followers_registration_counts_despite_a_clock_a_little_behind(
        make_dispatcher: MakeDispatcher, make_bus: Any, run_worker: RunWorker, redis: Any,
        key_prefix: str) -> None:
    """Another gateway whose clock runs 10 s behind stamped a registration that is already over by
    ours: it still counts (30 s of slack), so it still gets the broadcast."""
    bus = await make_bus()
    d = make_dispatcher(events=bus, relay_broadcast="followed")
    assert d.relay is not None
    local: list[TaskUpdate] = []
    d.relay.local = local.append
    await d.relay.follow()
    await redis.zadd(DispatchKeys(key_prefix).followers, {"behind": int((time.time() - 10) * 1000)})
    async with running(d), run_worker(d.queues["ai"], handlers([])):
        chat = await d.submit(owner="alice", type="ai.chat")
        await eventually(lambda: _async(any(u.task_id == chat.task_id and u.status.terminal
                                            for u in local)), "the task's final update")
    assert bus.stats.broadcast_sent == 5


async def test_a_follower_without_a_local_hook_hears_of_its_own_updates_through_the_broker(
        make_dispatcher: MakeDispatcher, make_bus: Any, run_worker: RunWorker) -> None:
    bus = await make_bus()
    listener = bus.listen("task.>")
    d = make_dispatcher(events=bus, relay_broadcast="followed")
    assert d.relay is not None
    await d.relay.follow()
    async with running(d), run_worker(d.queues["ai"], handlers([])):
        chat = await d.submit(owner="alice", type="ai.chat")
        updates = await collect(listener, {chat.task_id})
    assert [u.status for u in updates][-1] is TaskStatus.COMPLETED and len(updates) == 5


async def test_a_relay_broadcast_mode_is_always_or_followed(make_dispatcher: MakeDispatcher,
                                                           make_bus: Any) -> None:
    with pytest.raises(ConfigError, match="always, followed"):
        make_dispatcher(events=await make_bus(), relay_broadcast="sometimes")


async def test_two_relays_broadcast_each_change_once(make_dispatcher: MakeDispatcher, make_bus: Any,
                                                     run_worker: RunWorker, redis: Any) -> None:
    """Two gateways: a task submitted through one reaches a client on either, through one broadcast."""
    bus_a, bus_b = await make_bus(), await make_bus()
    listeners = [bus_a.listen("task.>"), bus_b.listen("task.>")]
    a = make_dispatcher(events=bus_a)
    b = make_dispatcher(client=await connect(REDIS_URL), events=bus_b)  # another process, another client
    try:
        async with running(a, b), run_worker(a.queues["ai"], handlers([]), concurrency=4):
            submitted = [await (a if i % 2 else b).submit(owner="alice", type="ai.chat", meeting_id=f"m{i}")
                         for i in range(20)]
            ids = {s.task_id for s in submitted}
            got = [await collect(listener, ids, settle=0.3) for listener in listeners]
    finally:
        await b.redis.aclose()
    for updates in got:  # every instance's listener sees every update, once
        assert Counter(u.seq for u in updates).most_common(1)[0][1] == 1
        per_task = Counter(u.task_id for u in updates)
        assert per_task == Counter({task_id: 5 for task_id in ids})  # queued, processing x3, completed
        for s in submitted:
            mine = [u for u in updates if u.task_id == s.task_id]
            assert {u.meeting_id for u in mine} == {f"m{submitted.index(s)}"}
    info = await redis.xinfo_groups(a.queues["ai"].keys.events)
    assert [(g["name"], g["pending"]) for g in info] == [(RELAY_GROUP, 0)]
    consumers = await redis.xinfo_consumers(a.queues["ai"].keys.events, RELAY_GROUP)
    assert [c["name"] for c in consumers] == [LEADER]  # one reader for every instance


async def test_one_relay_holds_the_lease_and_keeps_each_tasks_order(
        make_dispatcher: MakeDispatcher, make_bus: Any, run_worker: RunWorker, redis: Any,
        key_prefix: str) -> None:
    """Two gateways, three tasks streaming 50 deltas each at once: one instance relays, and every
    client sees every update once, in stream order."""
    bus_a, bus_b = await make_bus(), await make_bus()
    listeners = [bus_a.listen("task.>"), bus_b.listen("task.>")]
    a = make_dispatcher(events=bus_a)
    b = make_dispatcher(client=await connect(REDIS_URL), events=bus_b)
    try:
        async with running(a, b), run_worker(a.queues["ai"], {"ai.chat": streaming(50)}, concurrency=3):
            await eventually(lambda: _async(bool(leader_of(a, b))), "a relay to lead")
            [leader] = leader_of(a, b)
            submitted = [await a.submit(owner="alice", type="ai.chat") for _ in range(3)]
            ids = {s.task_id for s in submitted}
            got = [await collect(listener, ids, settle=0.3) for listener in listeners]
            assert leader_of(a, b) == [leader]
            assert await redis.get(DispatchKeys(key_prefix).relay_lease) == leader.consumer
    finally:
        await b.redis.aclose()
    for updates in got:
        assert len({u.seq for u in updates}) == len(updates) == 3 * 53  # each once
        for s in submitted:
            mine = [u for u in updates if u.task_id == s.task_id]
            assert [u.seq for u in mine] == await stream_ids(a.queues["ai"], s.task_id)  # all, in order
            assert [u.delta for u in mine] == [None, None, *(f"w{i} " for i in range(50)), None]
            assert mine[-1].status is TaskStatus.COMPLETED
    events = a.queues["ai"].keys.events
    assert [(g["name"], g["pending"]) for g in await redis.xinfo_groups(events)] == [(RELAY_GROUP, 0)]
    assert [c["name"] for c in await redis.xinfo_consumers(events, RELAY_GROUP)] == [LEADER]


async def test_a_dead_leader_is_taken_over_and_nothing_is_lost(
        make_dispatcher: MakeDispatcher, make_bus: Any, make_queue: Callable[..., Queue],
        run_worker: RunWorker, redis: Any, key_prefix: str) -> None:
    """The leader is cut off from Redis mid-stream (as if it died, without releasing the lease): it
    stops relaying when its lease ends, the other instance takes the lease and first re-reads what the
    dead one read and did not acknowledge. Clients may get repeats, never a gap or a step back."""
    observer = await make_bus()
    listener = observer.listen("task.>")
    clients = [await connect(REDIS_URL), await connect(REDIS_URL)]
    a, b = [make_dispatcher(client=c, events=await make_bus(), relay_lease_seconds=0.6) for c in clients]
    heal: Callable[[], None] | None = None
    both: list[float] = []

    async def watch() -> None:  # the two instances never lead at once
        while True:
            if len(leader_of(a, b)) > 1:
                both.append(time.monotonic())
            await asyncio.sleep(0.002)

    try:
        async with running(a, b), run_worker(make_queue("ai"), {"ai.chat": streaming(50, 0.03)}):
            watcher = asyncio.create_task(watch())
            await eventually(lambda: _async(bool(leader_of(a, b))), "a relay to lead")
            [leader] = leader_of(a, b)
            survivor = b if leader is a else a
            s = await survivor.submit(owner="alice", type="ai.chat", meeting_id="m-1")
            await eventually(lambda: _progress(survivor, s.task_id, 0.2), "ten deltas")
            heal = partition(leader.redis)
            got = await collect(listener, {s.task_id}, settle=0.5)
            watcher.cancel()
            # The last 40 deltas took over 1.2 s, twice the lease: the survivor relayed the end.
            assert leader_of(a, b) == [survivor]
            assert await redis.get(DispatchKeys(key_prefix).relay_lease) == survivor.consumer
            heal()
    finally:
        if heal is not None:
            heal()
        for c in clients:
            await c.aclose()
    assert both == []
    expected = await stream_ids(make_queue("ai"), s.task_id)
    assert {u.seq for u in got} == set(expected)  # nothing lost (repeats allowed)
    clean = passed_on(got)
    assert [u.seq for u in clean] == expected
    assert [u.delta for u in clean] == [None, None, *(f"w{i} " for i in range(50)), None]
    assert all(u.meeting_id == "m-1" for u in clean) and clean[-1].result == "done"
    info = await redis.xinfo_groups(make_queue("ai").keys.events)
    assert [(g["name"], g["pending"]) for g in info] == [(RELAY_GROUP, 0)]


async def test_a_clean_stop_hands_the_lease_over_at_once(
        make_dispatcher: MakeDispatcher, make_bus: Any, make_queue: Callable[..., Queue],
        run_worker: RunWorker, redis: Any, key_prefix: str) -> None:
    """A leader that stops releases the lease (rather than letting it run out): the other instance
    takes over at its next try, and since everything read was acknowledged, nothing comes twice."""
    observer = await make_bus()
    listener = observer.listen("task.>")
    lease = DispatchKeys(key_prefix).relay_lease
    clients = [await connect(REDIS_URL), await connect(REDIS_URL)]
    a, b = [make_dispatcher(client=c, events=await make_bus(), relay_lease_seconds=1.5) for c in clients]
    runs = {d: asyncio.create_task(d.run()) for d in (a, b)}
    try:
        async with run_worker(make_queue("ai"), {"ai.chat": streaming(50, 0.02)}):
            await asyncio.wait_for(asyncio.gather(a.ready.wait(), b.ready.wait()), WAIT)
            await eventually(lambda: _async(bool(leader_of(a, b))), "a relay to lead")
            [leader] = leader_of(a, b)
            survivor = b if leader is a else a
            s = await survivor.submit(owner="alice", type="ai.chat")
            await eventually(lambda: _progress(survivor, s.task_id, 0.2), "ten deltas")
            leader.stop()
            await asyncio.wait_for(runs[leader], WAIT)
            assert await redis.get(lease) != leader.consumer  # released: nobody waits for it to run out
            got = await collect(listener, {s.task_id}, settle=0.3)
            assert leader_of(a, b) == [survivor] and await redis.get(lease) == survivor.consumer
            after = await survivor.submit(owner="bob", type="ai.chat")
            assert len(await collect(listener, {after.task_id})) == 53
    finally:
        for d in (a, b):
            d.stop()
        await asyncio.wait_for(asyncio.gather(*runs.values()), WAIT)
        for c in clients:
            await c.aclose()
    assert len({u.seq for u in got}) == len(got)  # nothing twice
    assert [u.seq for u in got] == await stream_ids(make_queue("ai"), s.task_id)
    assert await redis.get(lease) is None  # the survivor released it too


async def test_a_new_leader_first_relays_what_the_last_one_left_unacknowledged(
        make_dispatcher: MakeDispatcher, make_bus: Any, redis: Any, key_prefix: str) -> None:
    bus = await make_bus()
    listener = bus.listen("task.>")
    with pytest.raises(ConfigError, match="lease_seconds"):
        make_dispatcher(events=bus, relay_lease_seconds=0)
    d = make_dispatcher(events=bus, relay_lease_seconds=0.6)
    queue = d.queues["user"]
    lease = DispatchKeys(key_prefix).relay_lease
    # The last leader took the lease, read two entries as the leader consumer, and died.
    await redis.xgroup_create(queue.keys.events, RELAY_GROUP, id="$", mkstream=True)
    await redis.set(lease, "a-dead-instance", px=600)
    first = await d.submit(owner="alice", type="user.profile.update")
    await d.cancel(first.task_id)
    read = await redis.xreadgroup(RELAY_GROUP, LEADER, {queue.keys.events: ">"})
    assert len(read[0][1]) == 2
    second = await d.submit(owner="bob", type="user.profile.update")  # not read by anyone yet
    await d.cancel(second.task_id)
    async with running(d):
        got = await collect(listener, {first.task_id, second.task_id}, settle=0.3)
        assert await redis.get(lease) == d.consumer
    assert [(u.task_id, u.status) for u in got] == [
        (first.task_id, TaskStatus.QUEUED), (first.task_id, TaskStatus.CANCELLED),
        (second.task_id, TaskStatus.QUEUED), (second.task_id, TaskStatus.CANCELLED)]
    assert [u.owner for u in got] == ["alice", "alice", "bob", "bob"]
    assert [u.seq for u in got] == [*await stream_ids(queue, first.task_id),
                                    *await stream_ids(queue, second.task_id)]
    assert (await redis.xinfo_groups(queue.keys.events))[0]["pending"] == 0


async def test_a_failed_acknowledgement_is_logged_and_its_entries_come_again_from_the_backlog(
        make_dispatcher: MakeDispatcher, make_bus: Any, redis: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Acks go out in the background, after the batch is broadcast: one that fails leaves its entries
    pending without stopping the relay, and the next leader's backlog read relays them again."""
    bus = await make_bus()
    listener = bus.listen("task.>")
    d = make_dispatcher(events=bus)
    assert d.relay is not None
    queue = d.queues["user"]
    real, lost = d.relay._acknowledge, []

    async def lose_the_first(batch: Any) -> None:
        if not lost:
            lost.extend(batch.acked.get(queue.keys.events, []))
            raise redis_errors.ConnectionError("the acknowledgement's reply was lost")
        await real(batch)

    monkeypatch.setattr(d.relay, "_acknowledge", lose_the_first)
    with caplog.at_level(logging.WARNING, logger="shared.bus.dispatch.relay"):
        async with running(d):
            first = await d.submit(owner="alice", type="user.profile.update")
            await d.cancel(first.task_id)
            await collect(listener, {first.task_id})
            second = await d.submit(owner="bob", type="user.profile.update")
            await d.cancel(second.task_id)
            await collect(listener, {second.task_id})  # relaying went on
    assert "acknowledging" in caplog.text and lost
    assert (await redis.xinfo_groups(queue.keys.events))[0]["pending"] == len(lost)

    successor = make_dispatcher(events=bus)
    async with running(successor):
        again = [TaskUpdate.model_validate((await listener.get(timeout=WAIT)).data) for _ in lost]
    assert [u.seq for u in again] == lost  # the same entries, in order
    assert (await redis.xinfo_groups(queue.keys.events))[0]["pending"] == 0


def test_seq_filter_drops_repeats_and_compares_ids_as_numbers() -> None:
    def update(task_id: str, seq: str | None) -> TaskUpdate:
        return TaskUpdate(task_id=task_id, queue="ai", type="ai.chat", owner="alice",
                          status=TaskStatus.PROCESSING, at=0.0, seq=seq)

    seen = SeqFilter()
    seqs = ["1700000000000-2", "1700000000000-10", "1700000000000-2", "1700000000000-10",
            "1700000000000-9", "1700000000001-0", "999999999999-99", "10000000000000-0"]
    assert [seen.fresh(update("t1", q)) for q in seqs] == [True, True, False, False, False, True, False,
                                                           True]
    assert seen.fresh(update("t2", "1700000000000-2"))  # each task has its own order
    assert not seen.fresh(update("t2", "1700000000000-2"))
    assert all(seen.fresh(update("t3", None)) for _ in range(2))  # nothing to order by: passed on
    assert seen.fresh(update("t3", "not-an-id")) and seen.fresh(update("t3", "not-an-id"))

    assert stream_id("1700000000000-10") == (1700000000000, 10) > stream_id("1700000000000-2")
    assert stream_id("5") == (5, 0)
    for bad in ("", "-1", "1-", "1-x", "x-1", "1-2-3", "1.5-0"):
        with pytest.raises(ValueError):
            stream_id(bad)

    assert seen.fresh(update("t4", "1700000000001-0"))
    assert seen.seen("t4", "1700000000000-10") and seen.seen("t4", "1700000000001-0")  # at or before
    assert not seen.seen("t4", "1700000000001-1") and not seen.seen("t9", "1-1")  # later; unknown
    assert not seen.seen("t4", None) and not seen.seen(None, "1-1") and not seen.seen("t4", "x")
    assert seen.fresh(update("t4", "1700000000001-1"))  # `seen` recorded nothing

    small = SeqFilter(size=2)  # remembers the two tasks seen last
    assert small.fresh(update("a", "1-1")) and small.fresh(update("b", "1-1"))
    assert not small.fresh(update("a", "1-1"))  # a repeat, and now "a" is the most recent
    assert small.fresh(update("c", "1-1"))  # forgets "b"
    assert not small.fresh(update("a", "1-1"))
    assert small.fresh(update("b", "1-1"))  # forgotten, so passed on again
    with pytest.raises(ConfigError):
        SeqFilter(size=0)


async def test_relay_skips_bad_entries_and_survives_redis_errors(
        make_dispatcher: MakeDispatcher, make_bus: Any, redis: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shared.bus.dispatch.relay")
    bus = await make_bus()
    listener = bus.listen("task.>")
    client = await connect(REDIS_URL)
    failures = {"left": 3}
    d = make_dispatcher(client=client, events=bus)
    assert d.relay is not None
    real = d.relay._round_trip

    async def flaky(commands: list[tuple[Any, ...]]) -> Any:
        if failures["left"] > 0 and any(c[0] == "XREADGROUP" and "BLOCK" in c for c in commands):
            failures["left"] -= 1
            raise redis_errors.ConnectionError("connection reset by peer (simulated)")
        return await real(commands)

    d.relay._round_trip = flaky  # type: ignore[method-assign]
    queue = d.queues["user"]
    try:
        async with running(d):
            for bad in ({"id": "x1", "status": "sleeping"}, {"status": "queued"},
                        {"id": "bad:topic", "status": "cancelled", "type": "t", "owner": ""},
                        {"id": "x2", "status": "completed", "result": "{not json"}):
                await redis.xadd(queue.keys.events, bad)
            s = await d.submit(owner="alice", type="user.profile.update", data={"name": "Al"})
            assert await d.cancel(s.task_id) is TaskStatus.QUEUED
            updates = await collect(listener, {s.task_id})
            assert [u.status for u in updates] == [TaskStatus.QUEUED, TaskStatus.CANCELLED]
            assert failures["left"] == 0
            # The stream is deleted (a queue dropped): the relay recreates its group and goes on.
            await redis.delete(queue.keys.events)
            await eventually(lambda: _has_group(redis, queue), "the relay's group to be recreated")
            again = await d.submit(owner="alice", type="user.profile.update")
            await d.cancel(again.task_id)
            assert [u.status for u in await collect(listener, {again.task_id})] == [
                TaskStatus.QUEUED, TaskStatus.CANCELLED]
    finally:
        await client.aclose()
    logged = [r.getMessage() for r in caplog.records]
    assert sum("skipped status entry" in line for line in logged) == 4
    assert sum("simulated" in line for line in logged) == 3
    assert any("NOGROUP" in line for line in logged)


async def test_status_events_are_published_when_asked(make_dispatcher: MakeDispatcher, make_bus: Any,
                                                      key_prefix: str) -> None:
    got: list[Any] = []

    async def record(event: Any) -> None:
        got.append(event)

    audit = EventBus.from_url(REDIS_URL, service="audit", prefix=key_prefix)
    audit.subscribe("task.status", record)
    await audit.start()
    try:
        bus = await make_bus()
        d = make_dispatcher(events=bus, publish_status_events=True)
        async with running(d):
            s = await d.submit(owner="alice", type="meeting.end", meeting_id="m-1")
            await d.cancel(s.task_id)
            await eventually(lambda: _async(len(got) >= 2), "two task.status events")
    finally:
        await audit.stop()
    assert [(e.data.task_id, e.data.status, e.data.meeting_id) for e in got] == [
        (s.task_id, "queued", "m-1"), (s.task_id, "cancelled", "m-1")]
    assert got[0].data.queue == "meeting" and got[0].data.at is not None


async def test_retry_failed_replays_dead_letters(make_dispatcher: MakeDispatcher,
                                                 run_worker: RunWorker) -> None:
    d = make_dispatcher(queue_options={"max_retries": 0})
    attempts = Counter[str]()

    async def flaky(ctx: Context) -> str:
        attempts[ctx.message.id] += 1
        if attempts[ctx.message.id] == 1:
            raise Reject("downstream said no, once")
        return "ok"

    async with run_worker(d.queues["media"], {"media.cover": flaky, "media.transcode": flaky}):
        submitted = [await d.submit(owner="alice", type=t) for t in ("media.cover", "media.transcode")]
        for s in submitted:
            await eventually(lambda s=s: _status(d, s.task_id, TaskStatus.FAILED), "the first failure")
        assert await d.retry_failed("ai") == 0
        assert await d.retry_failed() == 2
        for s in submitted:
            await eventually(lambda s=s: _status(d, s.task_id, TaskStatus.COMPLETED), "the replay")
            assert (await d.get(s.task_id)).result == "ok"
    assert await d.retry_failed("media") == 0
    with pytest.raises(InvalidMessage, match="unknown queue 'nope'"):
        await d.retry_failed("nope")


# -- what the dispatcher needs from the queue -----------------------------------------------------


async def test_queue_cancel_can_end_a_task_as_timeout(make_queue: Callable[..., Queue], redis: Any) -> None:
    queue = make_queue()
    task = await queue.enqueue("t", "slow", meeting_id="m-3")
    assert await queue.cancel(task.id, "deadline passed", status=TaskStatus.TIMEOUT) is TaskStatus.QUEUED
    record = await queue.get(task.id)
    assert record.status is TaskStatus.TIMEOUT and record.meeting_id == "m-3"
    assert record.error is not None
    assert (record.error.code, record.error.message) == ("timeout", "deadline passed")
    assert (await queue.stats()).dead_letters == 0 and (await queue.stats()).cancelled == 0
    assert 0 < await redis.pttl(queue.keys.task(task.id))
    assert [(e["id"], e["status"]) for e in await stream(queue)][-1] == (task.id, "timeout")
    assert await queue.cancel(task.id, status=TaskStatus.TIMEOUT) is TaskStatus.TIMEOUT  # no-op now
    assert await queue.cancel(task.id) is TaskStatus.TIMEOUT
    with pytest.raises(InvalidMessage):
        await queue.cancel(task.id, status=TaskStatus.COMPLETED)
    TaskStatus.QUEUED.check(TaskStatus.TIMEOUT)  # legal now


def test_message_and_record_carry_the_meeting() -> None:
    m = Message(type="ai.chat", meeting_id="m-1")
    assert Message.model_validate_json(m.model_dump_json()).meeting_id == "m-1"
    assert "meeting_id" not in Message(type="t").model_dump(exclude_none=True)
    record = TaskRecord(id="i", queue="q", type="t", status=TaskStatus.QUEUED, priority=Priority.NORMAL,
                        message=m)
    assert record.meeting_id == "m-1"


# -- small helpers --------------------------------------------------------------------------------


async def _async(value: bool) -> bool:
    return value


async def _status(d: Dispatcher, task_id: str, status: TaskStatus) -> bool:
    return (await d.get(task_id)).status is status


async def _progress(d: Dispatcher, task_id: str, at_least: float) -> bool:
    return ((await d.get(task_id)).progress or 0.0) >= at_least


async def _terminal(d: Dispatcher, task_id: str) -> bool:
    return (await d.get(task_id)).status.terminal


async def _has_group(redis: Any, queue: Queue) -> bool:
    with contextlib.suppress(redis_errors.ResponseError):
        return any(g["name"] == RELAY_GROUP for g in await redis.xinfo_groups(queue.keys.events))
    return False


def _seq(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n)


async def test_stop_ends_a_relays_blocking_read_at_once(make_dispatcher: MakeDispatcher, make_bus: Any,
                                                        monkeypatch: pytest.MonkeyPatch, redis: Any,
                                                        key_prefix: str) -> None:
    """The leader waits in a read that would block for a minute: `stop()` cuts it short (the read is
    interrupted, not waited out), and the lease is released."""
    monkeypatch.setattr("shared.bus.dispatch.relay.RELAY_BLOCK_MS", 60_000)
    d = make_dispatcher(events=await make_bus(), relay_lease_seconds=180.0)  # reads may block 60 s
    run = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), WAIT)
    await eventually(lambda: _async(d.relay is not None and d.relay._reader is not None), "a blocked read")
    d.stop()
    await asyncio.wait_for(run, WAIT)  # well before the read's minute
    assert await redis.get(DispatchKeys(key_prefix).relay_lease) is None


async def test_cancelling_a_relay_in_a_blocking_read_is_not_swallowed(
        make_dispatcher: MakeDispatcher, make_bus: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only `stop()`'s own interruption of a read ends it quietly; a cancel from outside propagates."""
    monkeypatch.setattr("shared.bus.dispatch.relay.RELAY_BLOCK_MS", 60_000)
    d = make_dispatcher(events=await make_bus(), relay_lease_seconds=180.0)
    run = asyncio.create_task(d.run())
    await asyncio.wait_for(d.ready.wait(), WAIT)
    await eventually(lambda: _async(d.relay is not None and d.relay._reader is not None), "a blocked read")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, WAIT)


async def test_the_relay_reads_on_after_its_connection_is_killed(make_dispatcher: MakeDispatcher,
                                                                 make_bus: Any, redis: Any) -> None:
    """The relay reads on a connection of its own: killed in the middle of a blocking read, it is
    replaced, and nothing relayed is lost."""
    bus = await make_bus()
    listener = bus.listen("task.>")
    d = make_dispatcher(events=bus)
    async with running(d):
        first = await d.submit(owner="alice", type="user.profile.update")
        await d.cancel(first.task_id)
        assert len(await collect(listener, {first.task_id})) == 2

        async def blocked_reads() -> list[int]:
            return [c["id"] for c in await redis.client_list() if c.get("cmd") == "xreadgroup"]

        await eventually(lambda: _async_true(blocked_reads), "the relay blocked in a read")
        for client_id in await blocked_reads():
            await redis.client_kill_filter(_id=client_id)
        second = await d.submit(owner="alice", type="user.profile.update")
        await d.cancel(second.task_id)
        assert [u.status for u in await collect(listener, {second.task_id})] == [
            TaskStatus.QUEUED, TaskStatus.CANCELLED]


async def _async_true(get: Callable[[], Awaitable[list[int]]]) -> bool:
    return bool(await get())


def test_the_relays_fast_update_is_the_model_construct_one() -> None:
    """The relay builds its updates without pydantic's `model_construct` walk over the fields: the
    model must come out the same (dict, fields set, dumps, equality), or a pydantic upgrade broke it."""
    from shared.bus.dispatch.updates import _UPDATE_FIELDS, _built_update

    values = {"task_id": "ai.x", "queue": "ai", "type": "ai.chat", "owner": "u", "meeting_id": None,
              "status": TaskStatus.COMPLETED, "progress": None, "delta": None, "result": {"a": [1, 2]},
              "error": None, "attempts": 2, "position": None, "reason": None, "at": 1.5, "seq": "1500-0"}
    assert set(values) == set(_UPDATE_FIELDS)
    fast, slow = _built_update(dict(values)), TaskUpdate.model_construct(**values)
    assert fast == slow
    assert fast.__dict__ == slow.__dict__ and fast.model_fields_set == slow.model_fields_set
    assert fast.model_dump(mode="json") == slow.model_dump(mode="json")
    assert fast.model_dump_json() == slow.model_dump_json()
    assert repr(fast) == repr(slow)
    fast.position = 3  # assignment works as on any model
    assert fast.position == 3 and "position" in fast.model_fields_set
