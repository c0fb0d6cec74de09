"""Gateway sessions: seq numbering, replay for resume, supersede, slow clients, routing, reaping.

No network and no sleeps: time is a `FakeClock` moved by hand, and writers are parked on the session's
own waiter (``asyncio.sleep(0)`` only lets a task reach its await).
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import tracemalloc
from typing import Any

import pytest

from gateway.hub import REAP_SLICE, SessionHub
from gateway.session import (
    CLOSE_GOING_AWAY,
    CLOSE_IDLE,
    CLOSE_SLOW_CLIENT,
    CLOSE_SUPERSEDED,
    ResumeGap,
    Session,
    SessionForbidden,
    SessionNotFound,
    SessionState,
)
from shared.bus import BusError, IllegalTransition, InvalidMessage


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


@pytest.fixture
def make_hub(clock: FakeClock) -> Any:
    """Factory: ``make_hub(send_buffer=3, ...)`` -> a SessionHub on the test's fake clock."""

    def make(**options: Any) -> SessionHub:
        return SessionHub(clock=clock, **options)

    return make


def seqs(texts: list[str]) -> list[int]:
    return [json.loads(t)["seq"] for t in texts]


def welcomed(hub: SessionHub, user: str = "ann") -> Session:
    session = hub.open(user)
    session.push({"type": "welcome", "session_id": session.id})
    return session


def drain(session: Session) -> list[str]:
    """Everything queued for the socket right now (the writer's view), without waiting."""
    out = []
    while session._outbox:
        out.append(session._outbox.popleft())
    return out


# -- numbering and encoding ------------------------------------------------------------------------

def test_open_pushes_nothing_and_welcome_is_seq_zero(make_hub: Any) -> None:
    hub = make_hub()
    session = hub.open("ann", ["member"])
    assert session.state is SessionState.ATTACHED
    assert session.roles == frozenset({"member"})
    assert session.seq == -1
    assert session.replay_after(-1) == []
    welcome = {"type": "welcome", "session_id": session.id}
    assert session.push(welcome) == 0
    assert welcome["seq"] == 0
    assert [session.push({"type": "status", "n": n}) for n in range(3)] == [1, 2, 3]
    assert seqs(drain(session)) == [0, 1, 2, 3]


def test_push_encodes_compact_json_once_and_overrides_a_callers_seq(make_hub: Any) -> None:
    session = make_hub().open("ann")
    frame: dict[str, Any] = {"type": "event", "seq": 99, "data": {"x": [1, "é"]}}
    assert session.push(frame) == 0
    (text,) = drain(session)
    assert text == '{"type":"event","data":{"x":[1,"\\u00e9"]},"seq":0}'
    assert frame["seq"] == 0
    assert session.replay_after(-1)[0] is text  # the same string object: encoded once
    session.push({})
    assert drain(session) == ['{"seq":1}']


def test_unserialisable_frame_is_refused_without_using_a_seq(make_hub: Any) -> None:
    session = make_hub().open("ann")
    with pytest.raises(InvalidMessage, match="JSON"):
        session.push({"type": "result", "value": object()})
    with pytest.raises(InvalidMessage):
        session.push({"type": "progress", "pct": float("nan")})
    assert session.push({"type": "welcome"}) == 0


# -- replay ----------------------------------------------------------------------------------------

def test_replay_after_returns_exactly_the_later_frames(make_hub: Any) -> None:
    session = welcomed(make_hub())
    for n in range(1, 6):
        session.push({"type": "progress", "n": n})
    kept = session.replay_after(-1)
    assert seqs(kept) == [0, 1, 2, 3, 4, 5]
    assert session.replay_after(2) == kept[3:]
    assert [json.loads(t)["n"] for t in session.replay_after(2)] == [3, 4, 5]
    assert session.replay_after(5) == []


def test_replay_empties_the_send_buffer_so_nothing_is_sent_twice(make_hub: Any) -> None:
    session = welcomed(make_hub())
    session.push({"type": "status"})
    assert len(session._outbox or ()) == 2
    assert seqs(session.replay_after(0)) == [1]
    assert drain(session) == []
    session.push({"type": "status"})
    assert seqs(drain(session)) == [2]


def test_gap_when_the_count_limit_trimmed_the_buffer(make_hub: Any) -> None:
    session = welcomed(make_hub(replay_max=3))
    for _ in range(5):
        session.push({"type": "progress"})
    assert seqs(session.replay_after(2)) == [3, 4, 5]
    with pytest.raises(ResumeGap) as caught:
        session.replay_after(1)
    assert (caught.value.last_seq, caught.value.oldest, caught.value.newest) == (1, 3, 5)
    assert isinstance(caught.value, BusError)
    assert "after seq 1" in str(caught.value)


def test_gap_when_the_window_aged_frames_out(make_hub: Any, clock: FakeClock) -> None:
    session = welcomed(make_hub(replay_window=30.0))
    clock.advance(20)
    session.push({"type": "status"})  # seq 1
    clock.advance(10)  # seq 0 is exactly 30 s old: still kept
    assert seqs(session.replay_after(-1)) == [0, 1]
    clock.advance(0.5)
    with pytest.raises(ResumeGap):
        session.replay_after(-1)
    assert seqs(session.replay_after(0)) == [1]
    clock.advance(20)
    with pytest.raises(ResumeGap):
        session.replay_after(0)
    assert session.replay_after(1) == []  # nothing missed, nothing to send


def test_gap_when_the_memory_cap_trimmed_and_the_newest_frame_is_always_kept(make_hub: Any) -> None:
    session = welcomed(make_hub(replay_max_bytes=1000))
    for _ in range(20):
        session.push({"type": "progress", "pad": "x" * 100})
    kept = session.replay_after(session.seq - 1)
    assert seqs(kept) == [20]
    with pytest.raises(ResumeGap):
        session.replay_after(0)
    assert session._replay_bytes <= 1000
    session.push({"type": "big", "pad": "y" * 5000})  # alone over the cap: kept anyway
    assert seqs(session.replay_after(20)) == [21]


def test_a_client_claiming_frames_never_sent_is_refused(make_hub: Any) -> None:
    session = welcomed(make_hub())
    with pytest.raises(ResumeGap, match="only up to seq 0"):
        session.replay_after(7)


# -- state machine ---------------------------------------------------------------------------------

def test_state_machine_moves_and_illegal_moves(make_hub: Any) -> None:
    session = welcomed(make_hub())
    with pytest.raises(IllegalTransition, match="attached to attached"):
        session.attach()
    session.detach()
    assert session.state is SessionState.DETACHED
    with pytest.raises(IllegalTransition):
        session.detach()
    session.attach()
    assert (session.state, session.epoch) == (SessionState.ATTACHED, 2)
    session.close()
    assert session.state is SessionState.CLOSED
    for move in (session.attach, session.detach, session.close):
        with pytest.raises(IllegalTransition, match="from closed"):
            move()
    with pytest.raises(SessionNotFound, match="closed"):
        session.push({"type": "status"})


def test_the_transition_table() -> None:
    attached, detached, closed = SessionState.ATTACHED, SessionState.DETACHED, SessionState.CLOSED
    allowed = {(a, b) for a in SessionState for b in SessionState if _legal(a, b)}
    assert allowed == {(attached, detached), (detached, attached), (attached, closed), (detached, closed)}
    assert not _legal(closed, closed)


def _legal(a: SessionState, b: SessionState) -> bool:
    try:
        a.check(b)
    except IllegalTransition:
        return False
    return True


def test_detached_session_keeps_frames_but_queues_none(make_hub: Any) -> None:
    hub = make_hub()
    session = welcomed(hub)
    hub.detach(session)
    session.push({"type": "result"})
    assert session._outbox is None
    assert seqs(session.replay_after(0)) == [1]


# -- resume ----------------------------------------------------------------------------------------

def test_resume_reattaches_and_replays(make_hub: Any, clock: FakeClock) -> None:
    hub = make_hub()
    session = welcomed(hub)
    assert hub.detach(session) is True
    session.push({"type": "result", "task_id": "t1"})
    clock.advance(5)
    again = hub.resume(session.id, "ann")
    assert again is session
    assert session.state is SessionState.ATTACHED
    assert session.last_seen == clock.now
    assert seqs(session.replay_after(0)) == [1]
    assert session.push({"type": "status"}) == 2
    assert hub.stats["resumes"] == 1


def test_resume_by_another_user_is_forbidden(make_hub: Any) -> None:
    hub = make_hub()
    session = welcomed(hub, "ann")
    hub.detach(session)
    with pytest.raises(SessionForbidden, match="another user"):  # the gateway maps on these words
        hub.resume(session.id, "bob")
    assert session.state is SessionState.DETACHED
    assert hub.resume(session.id, "ann") is session


def test_resume_of_an_unknown_or_closed_id_is_not_found(make_hub: Any) -> None:
    hub = make_hub()
    with pytest.raises(SessionNotFound):
        hub.resume("no-such-id", "ann")
    session = welcomed(hub)
    session.close()
    with pytest.raises(SessionNotFound):
        hub.resume(session.id, "ann")


def test_resume_after_the_window_is_not_found_and_forgets(make_hub: Any, clock: FakeClock) -> None:
    hub = make_hub(replay_window=30.0)
    session = welcomed(hub)
    hub.detach(session)
    clock.advance(30.5)
    with pytest.raises(SessionNotFound, match="expired"):
        hub.resume(session.id, "ann")
    assert session.state is SessionState.CLOSED
    assert hub.get(session.id) is None


async def test_resume_supersedes_a_still_attached_socket(make_hub: Any) -> None:
    hub = make_hub()
    session = welcomed(hub)
    assert await session.next_outgoing() is not None  # the welcome, sent by the first socket
    old_context = contextvars.copy_context()  # what the first socket's handler and writer carry
    old_writer = asyncio.create_task(session.next_outgoing(), context=old_context.copy())
    await asyncio.sleep(0)  # let it park on the session's waiter
    assert session._waiter is not None

    assert hub.resume(session.id, "ann") is session  # in this context: the new connection
    assert await old_writer is None
    assert old_context.run(lambda: session.close_code) == CLOSE_SUPERSEDED
    assert "resumed" in (old_context.run(lambda: session.closing_reason) or "")
    assert session.close_code is None  # the new attachment is live

    session.push({"type": "status"})
    late_old_call = asyncio.create_task(session.next_outgoing(), context=old_context.copy())
    assert await late_old_call is None  # an old writer back from a slow send steals nothing
    assert old_context.run(hub.detach, session) is False  # the old handler's cleanup is a no-op
    assert session.state is SessionState.ATTACHED
    assert seqs([await session.next_outgoing() or ""]) == [1]
    assert await session.next_outgoing(epoch=1) is None  # explicit epochs work the same way
    assert hub.stats["superseded"] == 1


def test_close_for_names_each_attachments_ending(make_hub: Any) -> None:
    hub = make_hub(send_buffer=1)
    session = welcomed(hub)
    assert session.close_for(1) is None  # live
    hub.resume(session.id, "ann")  # supersedes attachment 1
    hub.resume(session.id, "ann")  # supersedes attachment 2
    superseded = (CLOSE_SUPERSEDED, "another connection resumed this session")
    assert session.close_for(2) == superseded  # recorded when it ended
    assert session.close_for(1) == superseded  # older: only superseding can have ended it
    assert session.close_for(3) is None
    session.push({"type": "status"})
    session.push({"type": "status"})  # over a send buffer of 1
    code, reason = session.close_for(3) or (0, "")
    assert code == CLOSE_SLOW_CLIENT and "slow" in reason


# -- the writer ------------------------------------------------------------------------------------

async def test_writer_waits_for_a_push_and_stops_on_detach(make_hub: Any) -> None:
    hub = make_hub()
    session = welcomed(hub)
    assert seqs([await session.next_outgoing() or ""]) == [0]
    writer = asyncio.create_task(session.next_outgoing())
    await asyncio.sleep(0)
    assert not writer.done()
    session.push({"type": "pong"})
    assert seqs([await writer or ""]) == [1]
    writer = asyncio.create_task(session.next_outgoing())
    await asyncio.sleep(0)
    assert hub.detach(session) is True
    assert await writer is None
    assert hub.stats["frames_sent"] == 2


async def test_a_second_writer_on_one_attachment_is_a_bug(make_hub: Any) -> None:
    session = make_hub().open("ann")
    first = asyncio.create_task(session.next_outgoing())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already has a writer"):
        await session.next_outgoing()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert session._waiter is None


async def test_slow_client_is_cut_off_with_its_code_and_loses_nothing(make_hub: Any) -> None:
    hub = make_hub(send_buffer=3)
    session = welcomed(hub)
    session.push({"type": "progress"})
    session.push({"type": "progress"})
    assert session.close_code is None
    assert session.push({"type": "result"}) == 3  # the buffer holds 3: this one overflows it
    assert session.state is SessionState.DETACHED
    assert session.close_code == CLOSE_SLOW_CLIENT == 4008
    assert "slow" in (session.closing_reason or "")
    assert await session.next_outgoing() is None
    assert hub.detach(session) is False  # the gateway's cleanup after closing the socket: no error
    stats = hub.stats
    assert (stats["slow_closes"], stats["frames_dropped"], stats["detached"]) == (1, 4, 1)

    hub.resume(session.id, "ann")
    assert seqs(session.replay_after(-1)) == [0, 1, 2, 3]
    assert session.close_code is None


# -- routing ---------------------------------------------------------------------------------------

def test_deliver_task_reaches_only_its_watchers_each_with_its_own_seq(make_hub: Any) -> None:
    hub = make_hub()
    ann, bob, cat = welcomed(hub, "ann"), welcomed(hub, "bob"), welcomed(hub, "cat")
    ann.push({"type": "accepted"})
    hub.watch_task(ann, "t1")
    hub.watch_task(bob, "t1")
    hub.watch_task(cat, "t2")
    for s in (ann, bob, cat):
        drain(s)
    frame = {"type": "status", "task_id": "t1", "status": "processing"}
    assert hub.deliver_task("t1", frame) == 2
    assert frame == {"type": "status", "task_id": "t1", "status": "processing"}  # not modified
    assert [json.loads(t) for t in drain(ann)] == [{**frame, "seq": 2}]
    assert [json.loads(t) for t in drain(bob)] == [{**frame, "seq": 1}]
    assert drain(cat) == []
    assert hub.deliver_task("t9", frame) == 0
    assert set(hub.sessions_for_task("t1")) == {ann, bob}


def test_unwatch_and_drop_task(make_hub: Any) -> None:
    hub = make_hub()
    ann, bob = hub.open("ann"), hub.open("bob")
    hub.watch_task(ann, "t1")
    hub.watch_task(bob, "t1")
    hub.unwatch_task(ann, "t1")
    assert hub.sessions_for_task("t1") == [bob]
    assert hub.drop_task("t1") == 1
    assert hub.sessions_for_task("t1") == [] and bob.tasks == set()


def test_a_held_task_gets_its_frames_only_after_release_in_order(make_hub: Any) -> None:
    """A submitter holds its task from before the enqueue: updates that beat the enqueue's answer wait
    for the ``accepted`` frame; another session watching the task is not held up."""
    hub = make_hub()
    ann, bob = welcomed(hub, "ann"), welcomed(hub, "bob")
    hub.watch_task(ann, "t1", hold=True)
    hub.watch_task(bob, "t1")
    drain(ann), drain(bob)
    processing = {"type": "status", "task_id": "t1", "status": "processing"}
    result = {"type": "result", "task_id": "t1", "status": "completed", "result": 1}
    assert hub.deliver_task("t1", processing) == 2
    assert hub.deliver_task("t1", result) == 2
    assert hub.drop_task("t1") == 2  # finished before its submitter was told: what was held stays held
    assert drain(ann) == [] and [json.loads(t)["type"] for t in drain(bob)] == ["status", "result"]
    ann.push({"type": "accepted", "task_id": "t1"})
    assert hub.release_task(ann, "t1") == 2
    assert [(f["type"], f["seq"]) for f in map(json.loads, drain(ann))] == [
        ("accepted", 1), ("status", 2), ("result", 3)]
    assert hub.release_task(ann, "t1") == 0 and ann._held is None


def test_a_released_task_is_delivered_directly_and_an_unwatched_hold_is_dropped(make_hub: Any) -> None:
    hub = make_hub()
    ann = welcomed(hub, "ann")
    hub.watch_task(ann, "t1", hold=True)
    hub.watch_task(ann, "t2", hold=True)
    drain(ann)
    assert hub.release_task(ann, "t1") == 0  # nothing came while held
    hub.deliver_task("t1", {"type": "status", "task_id": "t1"})
    assert [json.loads(t)["task_id"] for t in drain(ann)] == ["t1"]
    hub.deliver_task("t2", {"type": "status", "task_id": "t2"})
    hub.unwatch_task(ann, "t2")  # its submit failed: the held frame goes with it
    assert hub.release_task(ann, "t2") == 0 and drain(ann) == [] and ann._held is None
    assert ann.tasks == {"t1"}


def test_deliver_topic_matches_exact_topics_and_patterns_once_each(make_hub: Any) -> None:
    hub = make_hub()
    exact, star, rest, both = (hub.open(u) for u in ("exact", "star", "rest", "both"))
    hub.subscribe(exact, "meeting.m1")
    hub.subscribe(star, "meeting.*")
    assert hub.subscribe(rest, "media.#") == "media.>"
    hub.subscribe(both, "meeting.m1")
    hub.subscribe(both, "meeting.>")
    assert set(hub.sessions_for_topic("meeting.m1")) == {exact, star, both}
    assert hub.deliver_topic("meeting.m1", {"type": "event", "topic": "meeting.m1"}) == 3
    assert len(drain(both)) == 1
    assert set(hub.sessions_for_topic("meeting.m2")) == {star, both}
    assert hub.sessions_for_topic("media.stream.started") == [rest]
    assert hub.sessions_for_topic("chat.m1") == []
    assert hub.unsubscribe(star, "meeting.*") is True
    assert hub.unsubscribe(star, "meeting.*") is False
    assert hub.unsubscribe(rest, "media.>") is True  # normalised the same way
    assert set(hub.sessions_for_topic("meeting.m2")) == {both}
    assert hub.sessions_for_topic("media.x") == []
    with pytest.raises(InvalidMessage):
        hub.subscribe(exact, "meeting.>.x")


def test_a_closed_session_leaves_every_index(make_hub: Any) -> None:
    hub = make_hub()
    session = welcomed(hub)
    hub.watch_task(session, "t1")
    hub.subscribe(session, "meeting.*")
    hub.subscribe(session, "meeting.m1")
    assert hub.close(session) is True
    assert hub.close(session) is False
    assert hub.get(session.id) is None and len(hub) == 0
    assert hub.deliver_task("t1", {"type": "status"}) == 0
    assert hub.deliver_topic("meeting.m1", {"type": "event"}) == 0
    assert (hub._by_task, hub._by_topic, hub._by_pattern) == ({}, {}, {})
    assert (len(session._replay), len(session._stamps), session._replay_bytes) == (0, 0, 0)  # memory freed
    with pytest.raises(SessionNotFound):
        hub.watch_task(session, "t2")


# -- reaping ---------------------------------------------------------------------------------------

def test_reap_closes_detached_sessions_past_the_window(make_hub: Any, clock: FakeClock) -> None:
    hub = make_hub(replay_window=30.0, idle_timeout=60.0)
    gone, live = welcomed(hub), welcomed(hub)
    hub.detach(gone)
    clock.advance(30)
    live.touch()
    assert hub.reap() == []
    clock.advance(0.5)
    assert hub.reap() == [gone]
    assert gone.state is SessionState.CLOSED and gone.close_code == CLOSE_IDLE
    assert hub.get(gone.id) is None and hub.get(live.id) is live
    assert hub.stats["reaped"] == 1


def test_reap_closes_attached_sessions_silent_past_the_idle_timeout(make_hub: Any, clock: FakeClock) -> None:
    hub = make_hub(idle_timeout=60.0)
    silent, chatty = welcomed(hub), welcomed(hub)
    clock.advance(50)
    chatty.touch()
    clock.advance(10)
    assert hub.reap() == []
    clock.advance(0.5)
    assert hub.reap() == [silent]
    assert silent.close_code == CLOSE_IDLE
    assert "nothing from the client" in (silent.closing_reason or "")
    assert chatty.state is SessionState.ATTACHED
    chatty.touch(now=clock.now + 100)  # an explicit time, e.g. the frame's receive time
    clock.advance(100)
    assert hub.reap() == []


def test_reap_also_ages_out_frames_of_quiet_sessions(make_hub: Any, clock: FakeClock) -> None:
    hub = make_hub(replay_window=30.0, idle_timeout=600.0)
    session = welcomed(hub)
    clock.advance(31)
    hub.reap()
    assert len(session._replay) == 0 and session._replay_bytes == 0


def test_reap_looks_at_a_slice_of_sessions_per_call_and_detached_ones_when_due(
        make_hub: Any, clock: FakeClock) -> None:
    hub = make_hub(replay_window=30.0, idle_timeout=60.0)
    sessions = [welcomed(hub) for _ in range(2 * REAP_SLICE + 10)]
    gone = sessions[5]
    hub.detach(gone)
    clock.advance(61)
    for s in sessions[1:]:
        s.touch()
    silent = sessions[0]
    reaped = [hub.reap() for _ in range(3)]  # one pass over every session: three slices
    assert gone in reaped[0]  # detached past the window: at once, whatever the slice
    assert sum(r.count(silent) for r in reaped) == 1
    assert silent.state is SessionState.CLOSED
    assert all(s.state is SessionState.ATTACHED for s in sessions if s not in (gone, silent))
    assert hub.stats["reaped"] == 2 and len(hub) == len(sessions) - 2


def test_detached_count_follows_detach_resume_and_close(make_hub: Any) -> None:
    hub = make_hub()
    a, b = welcomed(hub), welcomed(hub)
    hub.detach(a)
    hub.detach(b)
    assert (hub.stats["attached"], hub.stats["detached"]) == (0, 2)
    hub.resume(a.id, "ann")
    assert (hub.stats["attached"], hub.stats["detached"]) == (1, 1)
    b.close()
    hub.detach(a)
    assert (hub.stats["sessions"], hub.stats["attached"], hub.stats["detached"]) == (1, 0, 1)


def test_close_all_for_shutdown(make_hub: Any) -> None:
    hub = make_hub()
    sessions = [welcomed(hub), welcomed(hub)]
    hub.detach(sessions[1])
    assert hub.close_all() == sessions
    assert all(s.state is SessionState.CLOSED and s.close_code == CLOSE_GOING_AWAY for s in sessions)
    assert len(hub) == 0


# -- stats and memory ------------------------------------------------------------------------------

def test_stats_count_sessions_and_frames(make_hub: Any) -> None:
    hub = make_hub()
    a, b, c = welcomed(hub), welcomed(hub), welcomed(hub)
    hub.detach(b)
    c.close()
    drain(a)
    a.push({"type": "pong"})
    a.replay_after(0)
    stats = hub.stats
    assert {k: stats[k] for k in ("sessions", "attached", "detached", "frames_pushed", "frames_replayed",
                                  "frames_dropped", "slow_closes")} == {
        "sessions": 2, "attached": 1, "detached": 1, "frames_pushed": 4, "frames_replayed": 1,
        "frames_dropped": 2, "slow_closes": 0}  # b's and c's unsent welcomes


def test_per_session_memory_stays_small(make_hub: Any) -> None:
    """An idle session (welcome, a task, a topic) costs a few KB, and a busy one about replay_max_bytes."""
    hub = make_hub(replay_max_bytes=32 * 1024)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        idle = [welcomed(hub) for _ in range(500)]
        for i, session in enumerate(idle):
            hub.watch_task(session, f"task-{i}")
            hub.subscribe(session, f"meeting.m{i}")
        per_idle = (tracemalloc.get_traced_memory()[0] - before) / len(idle)
        busy = [welcomed(hub) for _ in range(20)]
        for session in busy:
            hub.detach(session)
            for n in range(2000):
                session.push({"type": "event", "topic": "meeting.m1", "data": {"n": n}})
        per_busy = (tracemalloc.get_traced_memory()[0] - before - per_idle * len(idle)) / len(busy)
    finally:
        tracemalloc.stop()
    assert per_idle < 6 * 1024, per_idle
    assert per_busy < 1.25 * 32 * 1024, per_busy
