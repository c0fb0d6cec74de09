"""LocalBus, the in-process event bus: routing, order, failure isolation, backpressure, stats, lifecycle.

No Redis: everything runs in the test's event loop. Slow handlers are gated by an `asyncio.Event`
rather than timed sleeps, so "the emitter is blocked" is a fact about the gate, not about timing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from shared.bus import BusError, ConfigError, InvalidMessage
from shared.bus.events.catalogue import Event, make_event
from shared.bus.events.local import BusClosed, BusState, LocalBus


class Recorder:
    """A handler that records what it receives; optionally waits on a gate before returning."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.events: list[Event[Any]] = []
        self.gate = gate
        self.entered = asyncio.Event()

    async def __call__(self, event: Event[Any]) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        self.events.append(event)

    @property
    def types(self) -> list[str]:
        return [e.type for e in self.events]

    @property
    def meeting_ids(self) -> list[str]:
        return [e.data.meeting_id for e in self.events]


def started(meeting_id: str) -> Event[Any]:
    return make_event("meeting.started", {"meeting_id": meeting_id}, source="test")


async def settle(rounds: int = 20) -> None:
    """Let every ready task run a few steps."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def publish_one_of_each(bus: LocalBus) -> None:
    await bus.publish("meeting.created", {"meeting_id": "m1", "host_id": "u1"})
    await bus.publish("meeting.user_joined", {"meeting_id": "m1", "user_id": "u2"})
    await bus.publish("media.cover_ready", {"media_id": "x", "cover_path": "/c.jpg"})
    await bus.publish("ai.task_created", {"task_id": "t1", "kind": "summary"})


# -- routing ------------------------------------------------------------------------------------

async def test_one_segment_wildcard_takes_only_its_family() -> None:
    async with LocalBus() as bus:
        meeting = Recorder()
        bus.subscribe("meeting.*", meeting)
        await publish_one_of_each(bus)
        await bus.join()
    assert meeting.types == ["meeting.created", "meeting.user_joined"]


async def test_tail_wildcards_take_everything_below() -> None:
    async with LocalBus() as bus:
        everything, hashed, media = Recorder(), Recorder(), Recorder()
        bus.subscribe(">", everything)
        bus.subscribe("#", hashed)
        bus.subscribe("media.>", media)
        await publish_one_of_each(bus)
        await bus.join()
    all_four = ["meeting.created", "meeting.user_joined", "media.cover_ready", "ai.task_created"]
    assert everything.types == all_four
    assert hashed.types == all_four
    assert media.types == ["media.cover_ready"]


async def test_exact_pattern_takes_only_that_type() -> None:
    async with LocalBus() as bus:
        joined = Recorder()
        bus.subscribe("meeting.user_joined", joined)
        await publish_one_of_each(bus)
        await bus.join()
    assert joined.types == ["meeting.user_joined"]
    assert joined.events[0].data.user_id == "u2"
    assert joined.events[0].source == "local"


async def test_every_matching_handler_gets_the_same_event() -> None:
    async with LocalBus(source="meeting-svc") as bus:
        a, b, c, other = Recorder(), Recorder(), Recorder(), Recorder()
        bus.subscribe("meeting.started", a)
        bus.subscribe("meeting.*", b)
        bus.subscribe(">", c)
        bus.subscribe("media.*", other)
        trace = f"00-{'1' * 32}-{'2' * 16}-01"
        event = await bus.publish("meeting.started", {"meeting_id": "m9"}, traceparent=trace)
        await bus.join()
    assert a.events == b.events == c.events == [event]
    assert event.source == "meeting-svc"
    assert event.traceparent == trace
    assert other.events == []
    assert bus.stats().delivered == 3


async def test_decorator_form_returns_the_function_and_subscribes_it() -> None:
    seen: list[str] = []
    bus = LocalBus()

    @bus.subscribe("meeting.*")
    async def on_meeting(event: Event[Any]) -> None:
        seen.append(event.data.meeting_id)

    async with bus:
        await bus.emit(started("m1"))
        await bus.join()
    assert seen == ["m1"]
    assert callable(on_meeting) and on_meeting.__name__ == "on_meeting"


# -- order ----------------------------------------------------------------------------------------

async def test_each_handler_sees_events_in_emit_order() -> None:
    n = 500

    async def jittery(event: Event[Any]) -> None:
        # Yield a varying number of times so that handlers interleave unevenly.
        for _ in range(int(event.data.meeting_id) % 4):
            await asyncio.sleep(0)
        jittery_seen.append(event.data.meeting_id)

    jittery_seen: list[str] = []
    async with LocalBus(maxsize=7) as bus:
        plain = Recorder()
        bus.subscribe("meeting.*", jittery)
        bus.subscribe(">", plain)
        for i in range(n):
            await bus.emit(started(str(i)))
        await bus.join()
    expected = [str(i) for i in range(n)]
    assert jittery_seen == expected
    assert plain.meeting_ids == expected


async def test_a_handler_never_runs_twice_at_once() -> None:
    running = peak = 0

    async def handler(event: Event[Any]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        running -= 1

    async with LocalBus() as bus:
        bus.subscribe(">", handler)
        await asyncio.gather(*(bus.emit(started(str(i))) for i in range(50)))
        await bus.join()
    assert peak == 1
    assert bus.stats().processed == 50


# -- failures -------------------------------------------------------------------------------------

async def test_failing_handler_is_isolated_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    flaky_seen: list[str] = []

    async def flaky(event: Event[Any]) -> None:
        if int(event.data.meeting_id) % 3 == 0:
            raise RuntimeError(f"boom {event.data.meeting_id}")
        flaky_seen.append(event.data.meeting_id)

    caplog.set_level(logging.ERROR, logger="shared.bus.events.local")
    async with LocalBus() as bus:
        healthy = Recorder()
        bus.subscribe("meeting.*", flaky)
        bus.subscribe("meeting.*", healthy)
        for i in range(10):
            await bus.emit(started(str(i)))
        await bus.join()
    assert flaky_seen == ["1", "2", "4", "5", "7", "8"]
    assert healthy.meeting_ids == [str(i) for i in range(10)]
    stats = bus.stats()
    assert (stats.failed, stats.processed) == (4, 16)
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 4
    assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in failures)
    assert "meeting.started" in failures[0].getMessage()


async def test_a_stray_cancelled_error_from_a_handler_does_not_kill_its_consumer() -> None:
    seen: list[str] = []

    async def handler(event: Event[Any]) -> None:
        if event.data.meeting_id == "0":
            raise asyncio.CancelledError
        seen.append(event.data.meeting_id)

    async with LocalBus() as bus:
        bus.subscribe(">", handler)
        await bus.emit(started("0"))
        await bus.emit(started("1"))
        await asyncio.wait_for(bus.join(), 5)
    assert seen == ["1"]
    assert (bus.stats().failed, bus.stats().processed) == (1, 1)


# -- backpressure ---------------------------------------------------------------------------------

async def test_overflow_wait_blocks_the_emitter_until_there_is_room() -> None:
    gate = asyncio.Event()
    async with LocalBus(maxsize=2, overflow="wait") as bus:
        slow = Recorder(gate)
        bus.subscribe("meeting.*", slow)
        await bus.emit(started("0"))
        await asyncio.wait_for(slow.entered.wait(), 5)  # "0" is in the handler, the queue is empty
        await bus.emit(started("1"))
        await bus.emit(started("2"))  # queue full now
        third = asyncio.create_task(bus.emit(started("3")))
        await asyncio.sleep(0.05)
        assert not third.done(), "emit returned although the subscriber's queue was full"
        assert bus.stats().depths == {"meeting.*->Recorder": 2}
        gate.set()
        assert await asyncio.wait_for(third, 5) == 1
        await bus.join()
    assert slow.meeting_ids == ["0", "1", "2", "3"]
    assert bus.stats().dropped == 0


async def test_overflow_wait_queues_all_or_nothing_and_a_fast_subscriber_waits_for_the_slow_one() -> None:
    gate = asyncio.Event()
    async with LocalBus(maxsize=1) as bus:
        slow, fast = Recorder(gate), Recorder()
        bus.subscribe("meeting.*", slow)
        bus.subscribe("meeting.*", fast)
        await bus.emit(started("0"))
        await asyncio.wait_for(slow.entered.wait(), 5)
        await bus.emit(started("1"))  # fills slow's queue
        blocked = asyncio.create_task(bus.emit(started("2")))
        await settle()
        assert not blocked.done()
        assert fast.meeting_ids == ["0", "1"], "the fast subscriber got '2' before the slow one had room"
        gate.set()
        await asyncio.wait_for(blocked, 5)
        await bus.join()
    assert slow.meeting_ids == fast.meeting_ids == ["0", "1", "2"]


async def test_overflow_drop_never_blocks_and_counts_each_drop() -> None:
    gate = asyncio.Event()
    async with LocalBus(maxsize=2, overflow="drop") as bus:
        slow, fast = Recorder(gate), Recorder()
        bus.subscribe("meeting.*", slow)
        bus.subscribe(">", fast)
        await bus.emit(started("0"))
        await asyncio.wait_for(slow.entered.wait(), 5)
        got = []
        for i in range(1, 8):
            got.append(await asyncio.wait_for(bus.emit(started(str(i))), 0.5))
            await settle()  # the fast subscriber keeps up; the slow one is stuck on "0"
        assert got == [2, 2, 1, 1, 1, 1, 1]  # slow's queue (2) filled, then slow lost 5; fast never did
        stats = bus.stats()
        assert (stats.emitted, stats.dropped, stats.delivered) == (8, 5, 11)
        gate.set()
        await bus.join()
    assert slow.meeting_ids == ["0", "1", "2"]
    assert fast.meeting_ids == [str(i) for i in range(8)]
    assert bus.stats().processed == 11


async def test_overflow_can_be_chosen_per_call() -> None:
    gate = asyncio.Event()
    async with LocalBus(maxsize=1, overflow="wait") as bus:
        slow = Recorder(gate)
        bus.subscribe(">", slow)
        await bus.emit(started("0"))
        await asyncio.wait_for(slow.entered.wait(), 5)
        await bus.emit(started("1"))
        assert await asyncio.wait_for(bus.emit(started("2"), overflow="drop"), 0.5) == 0
        event = await asyncio.wait_for(
            bus.publish("meeting.started", {"meeting_id": "3"}, overflow="drop"), 0.5)
        assert event.data.meeting_id == "3"
        assert bus.stats().dropped == 2
        gate.set()
        await bus.join()
    assert slow.meeting_ids == ["0", "1"]


async def test_bad_overflow_is_refused() -> None:
    with pytest.raises(ConfigError, match="overflow"):
        LocalBus(overflow="block")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="maxsize"):
        LocalBus(maxsize=0)
    async with LocalBus() as bus:
        with pytest.raises(InvalidMessage, match="overflow"):
            await bus.emit(started("0"), overflow="later")  # type: ignore[arg-type]
    assert bus.stats().emitted == 0


# -- stats ----------------------------------------------------------------------------------------

async def test_stats_are_exact() -> None:
    async def broken(event: Event[Any]) -> None:
        raise ValueError("no")

    async with LocalBus() as bus:
        assert bus.stats().emitted == 0
        ok = Recorder()
        bus.subscribe("meeting.*", ok)
        bus.subscribe("meeting.started", broken)
        for i in range(3):
            await bus.emit(started(str(i)))  # ok + broken
        await bus.publish("meeting.ended", {"meeting_id": "0"})  # ok only
        await bus.publish("user.registered", {"user_id": "u", "username": "n"})  # nobody
        await bus.join()
        stats = bus.stats()
    assert stats.emitted == 5
    assert stats.delivered == 7
    assert stats.processed == 4
    assert stats.failed == 3
    assert (stats.dropped, stats.discarded, stats.pending) == (0, 0, 0)
    assert stats.depths == {"meeting.*->Recorder": 0,
                            "meeting.started->test_stats_are_exact.<locals>.broken": 0}


# -- validation -----------------------------------------------------------------------------------

async def test_invalid_payload_raises_and_emits_nothing() -> None:
    async with LocalBus() as bus:
        everything = Recorder()
        bus.subscribe(">", everything)
        with pytest.raises(InvalidMessage, match=r"invalid 'meeting\.started' event"):
            await bus.publish("meeting.started", {"meeting": "m1"})
        with pytest.raises(InvalidMessage, match="unknown event type"):
            await bus.publish("meeting.exploded", {"meeting_id": "m1"})
        with pytest.raises(InvalidMessage, match="Event"):
            await bus.emit({"type": "meeting.started"})  # type: ignore[arg-type]
        await bus.join()
    assert everything.events == []
    assert (bus.stats().emitted, bus.stats().delivered) == (0, 0)


@pytest.mark.parametrize("pattern", ["", "meeting..started", "Meeting.*", "meeting.>.x", "meeting.st arted"])
async def test_bad_pattern_is_refused(pattern: str) -> None:
    bus = LocalBus()
    with pytest.raises(InvalidMessage, match="topic pattern"):
        bus.subscribe(pattern, Recorder())
    with pytest.raises(InvalidMessage, match="topic pattern"):
        bus.subscribe(pattern)
    assert bus.subscriptions == ()


# -- unsubscribing --------------------------------------------------------------------------------

async def test_cancel_stops_delivery() -> None:
    async with LocalBus() as bus:
        kept, gone = Recorder(), Recorder()
        bus.subscribe(">", kept)
        handle = bus.subscribe(">", gone)
        await bus.emit(started("0"))
        await bus.join()
        handle.cancel()
        handle.cancel()  # twice is harmless
        assert not handle.active
        await bus.emit(started("1"))
        await bus.join()
    assert kept.meeting_ids == ["0", "1"]
    assert gone.meeting_ids == ["0"]


async def test_unsubscribe_by_handler_and_queued_deliveries_are_discarded() -> None:
    gate = asyncio.Event()
    bus = LocalBus()
    slow = Recorder(gate)
    bus.subscribe("meeting.*", slow)
    bus.subscribe("meeting.started", slow)
    async with bus:
        await bus.emit(started("0"))
        await asyncio.wait_for(slow.entered.wait(), 5)
        await settle()  # both subscriptions' consumers are now in a call on "0"
        await bus.emit(started("1"))
        assert bus.unsubscribe(slow) == 2
        assert bus.unsubscribe(slow) == 0
        gate.set()  # the call already running finishes
        await asyncio.wait_for(bus.join(), 5)
        await bus.emit(started("2"))
        await bus.join()
    # Both calls on "0" were running when unsubscribed and finish; "1", queued twice, is discarded.
    assert slow.meeting_ids == ["0", "0"]
    stats = bus.stats()
    assert (stats.delivered, stats.processed, stats.discarded) == (4, 2, 2)
    assert stats.depths == {}


async def test_a_handler_can_unsubscribe_itself() -> None:
    seen: list[str] = []

    async def once(event: Event[Any]) -> None:
        seen.append(event.data.meeting_id)
        bus.unsubscribe(once)

    async with LocalBus() as bus:
        bus.subscribe(">", once)
        for i in range(3):
            await bus.emit(started(str(i)))
        await asyncio.wait_for(bus.join(), 5)
    assert seen == ["0"]


# -- lifecycle ------------------------------------------------------------------------------------

async def test_stop_with_drain_handles_the_backlog() -> None:
    async def slowish(event: Event[Any]) -> None:
        await asyncio.sleep(0.001)
        seen.append(event.data.meeting_id)

    seen: list[str] = []
    bus = LocalBus(maxsize=100)
    bus.subscribe(">", slowish)
    await bus.start()
    for i in range(30):
        await bus.emit(started(str(i)))
    assert bus.stats().pending > 0
    await bus.stop(drain=True, timeout=10)
    assert bus.state is BusState.STOPPED
    assert seen == [str(i) for i in range(30)]
    assert (bus.stats().processed, bus.stats().discarded) == (30, 0)


async def test_stop_without_drain_discards_the_backlog() -> None:
    gate = asyncio.Event()
    bus = LocalBus()
    slow = Recorder(gate)
    bus.subscribe(">", slow)
    await bus.start()
    for i in range(5):
        await bus.emit(started(str(i)))
    await asyncio.wait_for(slow.entered.wait(), 5)
    await bus.stop(drain=False)
    assert slow.events == []
    stats = bus.stats()
    assert (stats.delivered, stats.processed, stats.discarded, stats.pending) == (5, 0, 5, 0)


async def test_drain_gives_up_after_its_timeout() -> None:
    bus = LocalBus()
    bus.subscribe(">", Recorder(asyncio.Event()))  # never released
    await bus.start()
    await bus.emit(started("0"))
    await bus.emit(started("1"))
    await asyncio.wait_for(bus.stop(drain=True, timeout=0.05), 5)
    assert bus.state is BusState.STOPPED
    assert bus.stats().discarded == 2


async def test_emit_after_stop_raises() -> None:
    bus = LocalBus()
    bus.subscribe(">", Recorder())
    with pytest.raises(BusClosed, match="start"):
        await bus.emit(started("early"))
    async with bus:
        assert bus.state is BusState.RUNNING
        await bus.emit(started("0"))
    with pytest.raises(BusClosed, match="stopped") as caught:
        await bus.emit(started("1"))
    assert isinstance(caught.value, BusError)
    with pytest.raises(BusClosed):
        await bus.publish("meeting.started", {"meeting_id": "2"})
    with pytest.raises(BusClosed):
        await bus.start()
    with pytest.raises(BusClosed):
        bus.subscribe(">", Recorder())
    assert bus.stats().emitted == 1


async def test_an_emitter_waiting_for_room_is_released_by_stop() -> None:
    gate = asyncio.Event()
    bus = LocalBus(maxsize=1)
    slow = Recorder(gate)
    bus.subscribe(">", slow)
    await bus.start()
    await bus.emit(started("0"))
    await asyncio.wait_for(slow.entered.wait(), 5)
    await bus.emit(started("1"))
    waiting = asyncio.create_task(bus.emit(started("2")))
    await settle()
    assert not waiting.done()
    stopping = asyncio.create_task(bus.stop(drain=True, timeout=5))
    await settle()
    # Released at once, not when the drain ends: the handler is still stuck on "0".
    assert waiting.done() and not stopping.done()
    with pytest.raises(BusClosed):
        await waiting
    gate.set()
    await asyncio.wait_for(stopping, 5)
    assert slow.meeting_ids == ["0", "1"]
    assert bus.stats().emitted == 2


async def test_join_waits_for_events_that_handlers_emit() -> None:
    async with LocalBus() as bus:
        ended = Recorder()

        async def end_after_start(event: Event[Any]) -> None:
            await asyncio.sleep(0.01)
            await bus.publish("meeting.ended", {"meeting_id": event.data.meeting_id})

        bus.subscribe("meeting.started", end_after_start)
        bus.subscribe("meeting.ended", ended)
        await bus.emit(started("m1"))
        await asyncio.wait_for(bus.join(), 5)
        assert ended.meeting_ids == ["m1"]


async def test_context_manager_skips_the_drain_after_an_error() -> None:
    gate = asyncio.Event()
    slow = Recorder(gate)
    with pytest.raises(KeyError):
        async with LocalBus() as bus:
            bus.subscribe(">", slow)
            await bus.emit(started("0"))
            await bus.emit(started("1"))
            raise KeyError("boom")
    assert bus.state is BusState.STOPPED
    assert bus.stats().discarded == 2
