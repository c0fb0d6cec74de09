"""The event bus contract, run once against each real broker on the machine: Redis, NATS JetStream
and RabbitMQ. Every test has its own prefix (streams, subjects, exchanges and queues), removed after.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from shared.bus import InvalidMessage, Reject
from shared.bus.events.base import EventBus, Retention
from shared.bus.events.catalogue import Event

ROOT = Path(__file__).resolve().parents[3]
URLS = {
    "redis": os.environ.get("MEETMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/9"),
    "nats": os.environ.get("MEETMESH_TEST_NATS_URL", "nats://127.0.0.1:4222"),
    "amqp": os.environ.get("MEETMESH_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
}
WAIT = 20.0
MakeBus = Callable[..., EventBus]


@pytest.fixture(params=sorted(URLS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def prefix() -> str:
    return f"mmtest-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def make_bus(backend: str, prefix: str) -> AsyncIterator[MakeBus]:
    """``make_bus("svc", ack_wait=1)``: an EventBus on this test's backend and prefix (not started)."""
    made: list[EventBus] = []

    def make(service: str, **options: Any) -> EventBus:
        bus = EventBus.from_url(URLS[backend], service=service, prefix=prefix, **options)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        await bus.stop()
    for service in sorted({b.service for b in made}):  # drop what each service declared
        cleaner = EventBus.from_url(URLS[backend], service=service, prefix=prefix)
        await cleaner.start()
        await cleaner.drop()
        await cleaner.stop()


async def until(check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def recorder(into: list[Event[Any]]) -> Callable[[Event[Any]], Awaitable[None]]:
    async def handler(event: Event[Any]) -> None:
        into.append(event)

    return handler


def created(i: int) -> dict[str, Any]:
    return {"meeting_id": f"m{i}", "host_id": "u1", "title": f"#{i}"}


async def test_three_services_two_replicas_each_get_every_event_once(make_bus: MakeBus) -> None:
    got: dict[str, list[Event[Any]]] = {"user": [], "meeting": [], "ai": []}
    replicas = []
    for service in got:
        for _ in range(2):
            bus = make_bus(service)
            bus.subscribe(">", recorder(got[service]))
            replicas.append(bus)
    publisher = make_bus("publisher")
    for bus in [*replicas, publisher]:
        await bus.start()
    sent = [await publisher.publish("meeting.created", created(i)) for i in range(60)]
    await until(lambda: all(len(v) >= 60 for v in got.values()), "every service to get 60 events")
    await asyncio.sleep(0.5)  # a duplicate would arrive now
    for service, events in got.items():
        assert sorted(e.id for e in events) == sorted(e.id for e in sent), service
    assert all(b.stats.dead == 0 for b in replicas)


async def test_subscriber_killed_mid_handler_gets_the_event_again(
        backend: str, prefix: str, make_bus: MakeBus, tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    make_bus("meeting")  # so the fixture cleans this service's queues up
    child = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the child is watched below
        [sys.executable, "-m", "tests.bus.events.event_child", URLS[backend], prefix, "meeting", str(mark)],
        cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ready = Path(str(mark) + ".ready")
        await until(lambda: ready.exists() or child.poll() is not None, "the child to start")
        assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
        publisher = make_bus("publisher")
        await publisher.start()
        event = await publisher.publish("meeting.started", {"meeting_id": "m1"})
        await until(mark.exists, "the child to start handling the event")
        assert mark.read_text() == event.id
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()

    got: list[Event[Any]] = []
    replica = make_bus("meeting", ack_wait=1.0)
    replica.subscribe("meeting.*", recorder(got))
    await replica.start()
    await until(lambda: len(got) >= 1, "the event to be delivered again")
    assert [e.id for e in got] == [event.id]


async def test_a_service_that_was_down_catches_up(make_bus: MakeBus) -> None:
    first: list[Event[Any]] = []
    service = make_bus("media")
    service.subscribe("meeting.*", recorder(first))
    publisher = make_bus("publisher")
    await service.start()
    await publisher.start()
    before = await publisher.publish("meeting.created", created(0))
    await until(lambda: len(first) == 1, "the first event")
    await service.stop()

    missed = [await publisher.publish("meeting.created", created(i)) for i in range(1, 11)]
    later: list[Event[Any]] = []
    restarted = make_bus("media")
    restarted.subscribe("meeting.*", recorder(later))
    await restarted.start()
    try:
        await until(lambda: len(later) >= 10, "the missed events")
    except AssertionError as exc:  # say where the events are, to tell a lost read from a slow one
        raise AssertionError(f"{exc}: got {len(later)}; {await _where(restarted)}") from None
    await asyncio.sleep(0.3)
    # In order, and without the one acknowledged before the stop.
    assert [e.data.meeting_id for e in later] == [e.data.meeting_id for e in missed]
    assert before.id not in {e.id for e in later}


async def test_a_stopped_redis_replica_lets_go_of_its_reads_and_hands_back_what_it_held(
        make_bus: MakeBus, backend: str) -> None:
    """An event Redis gave a replica just as it stopped (its blocking read not yet dropped) is not left
    waiting ``ack_wait`` for a reclaim: the stop marks it idle that long, so the next replica to start
    takes it at once. And once stopped, no connection of the replica is left in Redis."""
    if backend != "redis":
        pytest.skip("Redis consumer groups")
    from redis.asyncio import Redis

    a = make_bus("media", consumer="media-a", ack_wait=60.0)
    a.subscribe("meeting.*", recorder([]))
    publisher = make_bus("publisher")
    await a.start()
    await a.stop()
    await publisher.start()
    event = await publisher.publish("meeting.created", created(1))
    redis = Redis.from_url(URLS["redis"])
    try:
        log = a.keys.log  # type: ignore[attr-defined]
        # The race, by hand: the entry goes to media-a's pending list, unhandled.
        assert await redis.xreadgroup("media", "media-a", {log: ">"}, count=1)
        again = make_bus("media", consumer="media-a", ack_wait=60.0)
        again.subscribe("meeting.*", recorder([]))
        await again.start()
        await again.stop()  # ...and it stops without having handled it
        names = {c.get("name") for c in await redis.client_list()}
        assert again._client_name not in names  # type: ignore[attr-defined]
        got: list[Event[Any]] = []
        b = make_bus("media", ack_wait=60.0)
        b.subscribe("meeting.*", recorder(got))
        await b.start()
        await until(lambda: len(got) >= 1, "the handed-back event (else only after ack_wait, 60 s)")
        assert [e.id for e in got] == [event.id]
    finally:
        await redis.aclose()


async def _where(bus: EventBus) -> str:
    """The backend's own view of the service's group, for a failure message (Redis only)."""
    if bus.scheme != "redis":
        return f"stats {bus.stats}"
    from redis.asyncio import Redis

    redis = Redis.from_url(bus.url)
    try:
        log = bus.keys.log  # type: ignore[attr-defined]
        consumers = await redis.xinfo_consumers(log, bus.service)
        pending = await redis.xpending(log, bus.service)
        return f"stats {bus.stats}; consumers {consumers}; pending {pending}"
    finally:
        await redis.aclose()


async def test_wildcards(make_bus: MakeBus) -> None:
    meetings: list[Event[Any]] = []
    everything: list[Event[Any]] = []
    exact: list[Event[Any]] = []
    a, b, c = make_bus("a"), make_bus("b"), make_bus("c")
    a.subscribe("meeting.*", recorder(meetings))
    b.subscribe(">", recorder(everything))
    c.subscribe("media.cover_ready", recorder(exact))
    publisher = make_bus("publisher")
    for bus in (a, b, c, publisher):
        await bus.start()
    await publisher.publish("meeting.created", created(1))
    await publisher.publish("user.registered", {"user_id": "u1", "username": "ann"})
    await publisher.publish("media.cover_ready", {"media_id": "x", "cover_path": "/c.jpg"})
    await publisher.publish("meeting.user_joined", {"meeting_id": "m1", "user_id": "u2"})
    await until(lambda: len(everything) == 4 and len(meetings) == 2 and len(exact) == 1, "routing")
    await asyncio.sleep(0.3)
    assert [e.type for e in meetings] == ["meeting.created", "meeting.user_joined"]
    assert [e.type for e in exact] == ["media.cover_ready"]
    assert len(everything) == 4


async def test_per_topic_order_for_one_consumer(make_bus: MakeBus) -> None:
    got: list[Event[Any]] = []
    consumer = make_bus("ordered")
    consumer.subscribe("meeting.*", recorder(got))
    publisher = make_bus("publisher")
    await consumer.start()
    await publisher.start()
    for i in range(150):
        await publisher.publish("meeting.created", created(i))
    await until(lambda: len(got) >= 150, "150 events")
    assert [e.data.meeting_id for e in got] == [f"m{i}" for i in range(150)]


async def test_concurrent_publishes_all_arrive(make_bus: MakeBus) -> None:
    got: list[Event[Any]] = []
    consumer = make_bus("many")
    consumer.subscribe("meeting.started", recorder(got))
    publisher = make_bus("publisher")
    await consumer.start()
    await publisher.start()
    sends = (publisher.publish("meeting.started", {"meeting_id": f"m{i}"}) for i in range(500))
    sent = await asyncio.gather(*sends)
    await until(lambda: len(got) >= 500, "500 events")
    assert Counter(e.id for e in got) == Counter(e.id for e in sent)
    assert publisher.stats.published == 500


async def test_failing_handler_dead_letters_and_never_blocks_the_topic(make_bus: MakeBus) -> None:
    got: list[Event[Any]] = []
    calls: Counter[str] = Counter()
    consumer = make_bus("fragile", max_attempts=3, retry_backoff=0.01)

    @consumer.subscribe("meeting.*")
    async def handler(event: Event[Any]) -> None:
        calls[event.data.meeting_id] += 1
        if event.data.meeting_id == "boom":
            raise RuntimeError("the database is on fire")
        if event.data.meeting_id == "nope":
            raise Reject("not for us")
        got.append(event)

    publisher = make_bus("publisher")
    await consumer.start()
    await publisher.start()
    boom = await publisher.publish("meeting.started", {"meeting_id": "boom"})
    nope = await publisher.publish("meeting.started", {"meeting_id": "nope"})
    await publisher.publish("meeting.started", {"meeting_id": "fine"})
    await until(lambda: len(got) == 1, "the event after the failing ones")
    assert calls == {"boom": 3, "nope": 1, "fine": 1}
    dead = await consumer.dead_letters()
    assert [d.event_id for d in dead] == [boom.id, nope.id]
    assert "RuntimeError: the database is on fire (after 3 attempts)" in dead[0].reason
    assert dead[0].handler is not None and dead[0].handler.endswith("handler")
    assert dead[1].reason == "rejected: not for us"
    assert dead[0].service == "fragile" and boom.id in dead[0].body
    assert consumer.stats.dead == 2 and consumer.stats.retried == 2


async def test_malformed_event_is_dead_lettered_and_the_subscriber_goes_on(make_bus: MakeBus) -> None:
    got: list[Event[Any]] = []
    consumer = make_bus("strict")
    consumer.subscribe(">", recorder(got))
    publisher = make_bus("publisher")
    await consumer.start()
    await publisher.start()
    await publisher._publish("meeting.created", b"{not json")
    wrong = b'{"type": "meeting.created", "source": "x", "data": {"meeting_id": 5}}'
    await publisher._publish("meeting.created", wrong)
    ok = await publisher.publish("meeting.created", created(1))
    await until(lambda: len(got) == 1, "the good event")
    assert got[0].id == ok.id
    dead = await consumer.dead_letters()
    assert len(dead) == 2
    assert dead[0].reason.startswith("malformed event") and dead[0].body == "{not json"
    assert "invalid 'meeting.created' event: meeting_id" in dead[1].reason or "malformed" in dead[1].reason


async def test_invalid_publish_raises_and_sends_nothing(make_bus: MakeBus) -> None:
    got: list[Event[Any]] = []
    consumer = make_bus("watcher")
    consumer.subscribe(">", recorder(got))
    publisher = make_bus("publisher")
    await consumer.start()
    await publisher.start()
    with pytest.raises(InvalidMessage, match="meeting_id"):
        await publisher.publish("meeting.created", {"host_id": "u1"})
    with pytest.raises(InvalidMessage, match=r"unknown event type 'meeting\.exploded'"):
        await publisher.publish("meeting.exploded", {})
    with pytest.raises(InvalidMessage, match="Extra inputs"):
        await publisher.publish("meeting.started", {"meeting_id": "m", "colour": "red"})
    ok = await publisher.publish("meeting.started", {"meeting_id": "m"})
    await until(lambda: len(got) == 1, "the valid event")
    await asyncio.sleep(0.3)
    assert [e.id for e in got] == [ok.id]
    assert publisher.stats.published == 1


async def test_broadcast_reaches_every_live_process_matching_its_pattern(make_bus: MakeBus) -> None:
    one, two, sender = make_bus("gateway"), make_bus("gateway"), make_bus("ai")
    for bus in (one, two, sender):
        await bus.start()
    meeting_1, everything, other = one.listen("meeting.m1"), two.listen(">"), two.listen("meeting.m2")
    await asyncio.sleep(0.3)  # subscriptions are live once the broker has them
    await sender.broadcast("meeting.m1", {"joined": "u2"})
    await sender.broadcast("task.t1", {"status": "processing"})
    first = await meeting_1.get(timeout=5)
    assert (first.topic, first.data, first.source) == ("meeting.m1", {"joined": "u2"}, "ai")
    assert [(await everything.get(timeout=5)).topic for _ in range(2)] == ["meeting.m1", "task.t1"]
    with pytest.raises(TimeoutError):
        await other.get(timeout=0.3)
    with pytest.raises(TimeoutError):
        await meeting_1.get(timeout=0.3)  # task.t1 is not for it


async def test_a_broadcast_sent_with_skip_self_reaches_every_process_but_its_own(make_bus: MakeBus) -> None:
    relaying, other = make_bus("gateway"), make_bus("gateway")
    for bus in (relaying, other):
        await bus.start()
    mine, theirs = relaying.listen("task.>"), other.listen("task.>")
    await asyncio.sleep(0.3)  # subscriptions are live once the broker has them
    await relaying.broadcast("task.t1", {"status": "queued"}, skip_self=True)
    await relaying.broadcast("task.t1", {"status": "processing"})
    got = await theirs.get(timeout=5)
    assert (got.topic, got.data, got.origin) == ("task.t1", {"status": "queued"}, relaying.consumer)
    assert (await theirs.get(timeout=5)).data == {"status": "processing"}
    assert (await mine.get(timeout=5)).data == {"status": "processing"}  # its own copy of the first skipped
    assert relaying.stats.broadcast_skipped == 1 and other.stats.broadcast_skipped == 0


async def test_broadcast_many_sends_in_order_and_nothing_if_one_is_invalid(make_bus: MakeBus) -> None:
    relaying, other = make_bus("gateway"), make_bus("gateway")
    for bus in (relaying, other):
        await bus.start()
    mine, theirs = relaying.listen("task.>"), other.listen("task.>")
    await asyncio.sleep(0.3)
    with pytest.raises(InvalidMessage):
        await relaying.broadcast_many([("task.t0", 0), ("bad topic!", 1)])
    await relaying.broadcast_many([(f"task.t{i}", i) for i in range(1, 6)], skip_self=True)
    await relaying.broadcast_many([("task.t9", 9)])
    assert [(await theirs.get(timeout=5)).data for _ in range(6)] == [1, 2, 3, 4, 5, 9]
    assert (await mine.get(timeout=5)).data == 9  # its own copies of the skip_self ones dropped
    assert relaying.stats.broadcast_sent == 6 and relaying.stats.broadcast_skipped == 5


async def test_a_full_listener_drops_and_counts_without_slowing_others(make_bus: MakeBus) -> None:
    receiver, sender = make_bus("gateway"), make_bus("meeting")
    await receiver.start()
    await sender.start()
    slow, fast = receiver.listen("t.*", maxsize=2), receiver.listen("t.*", maxsize=100)
    await asyncio.sleep(0.3)
    for i in range(5):
        await sender.broadcast(f"t.{i}", i)
    got = [(await fast.get(timeout=5)).data for _ in range(5)]
    assert got == [0, 1, 2, 3, 4]
    assert slow.dropped == 3 and receiver.stats.broadcast_dropped == 3
    assert [(await slow.get(timeout=1)).data for _ in range(2)] == [0, 1]
    with pytest.raises(InvalidMessage):
        await sender.broadcast("bad topic!", 1)


async def test_retention_by_count_limits_what_a_returning_service_gets(make_bus: MakeBus) -> None:
    retention = Retention(max_age=None, max_count=20)
    got: list[Event[Any]] = []
    service = make_bus("late", retention=retention)
    service.subscribe(">", recorder(got))
    await service.start()
    await service.stop()
    publisher = make_bus("publisher", retention=retention)
    await publisher.start()
    sent = [await publisher.publish("meeting.started", {"meeting_id": f"m{i}"}) for i in range(400)]
    returning = make_bus("late", retention=retention)
    returning.subscribe(">", recorder(got))
    await returning.start()
    await until(lambda: len(got) >= 20, "the retained events")
    await asyncio.sleep(0.5)
    # Redis trims approximately (whole stream nodes of up to 100 entries); NATS and RabbitMQ exactly.
    assert 20 <= len(got) <= 200
    assert [e.id for e in got] == [e.id for e in sent[-len(got):]]  # the newest, in order


async def test_subscribe_after_start_and_use_before_start_are_refused(make_bus: MakeBus) -> None:
    from shared.bus import BusError

    bus = make_bus("early")
    with pytest.raises(BusError, match="not started"):
        await bus.publish("meeting.started", {"meeting_id": "m"})
    with pytest.raises(InvalidMessage, match="topic pattern"):
        bus.subscribe("meeting.**", recorder([]))
    await bus.start()
    with pytest.raises(BusError, match="before start"):
        bus.subscribe("meeting.*", recorder([]))
