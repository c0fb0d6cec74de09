"""Client sessions behind the gateway's WebSocket: everything about a session that is not the socket.

A `Session` numbers every frame sent to its client (``welcome`` is 0), keeps the encoded frames for a
``replay_window`` so a client that reconnects with ``resume`` loses nothing, and bounds what may wait
for a slow socket. A `SessionHub` holds them: it opens and resumes them, routes task updates and topic
events to them, and reaps the idle and the expired. (Per-user limits: `ratelimit.UserLimits`, in Redis.)
Nothing here starts tasks or timers: the gateway runs one reaper loop and one writer per socket.

Close codes the gateway sends (4000-4999 are ours)::

    1000  CLOSE_NORMAL       closed on purpose (logout, a resumed connection's spare session)
    1001  CLOSE_GOING_AWAY   the gateway is shutting down (`SessionHub.close_all`)
    4001  CLOSE_SUPERSEDED   another connection resumed this session; this socket is finished
    4002  CLOSE_IDLE         nothing from the client for ``idle_timeout`` s, or expired while detached
    4008  CLOSE_SLOW_CLIENT  the send buffer filled up; frames are kept, the client may ``resume``

Errors (all `BusError`)::

    SessionNotFound    no live session with that id: never opened, closed, or expired
    SessionForbidden   the session belongs to another user
    ResumeGap          frames after the client's ``last_seq`` are no longer kept: open a new session
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from enum import StrEnum
from itertools import islice
from typing import Any

from .catalogue import check_pattern, matches
from .errors import BusError, IllegalTransition, InvalidMessage

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_SUPERSEDED = 4001
CLOSE_IDLE = 4002
CLOSE_SLOW_CLIENT = 4008

Clock = Callable[[], float]

# The attachment (session id -> epoch) the calling task opened or resumed; tasks created afterwards
# (the socket's writer) inherit it. This is how a superseded socket's handler and writer are told
# apart from the new ones without the gateway passing tokens around. A connection holds at most two
# sessions (the one it opened, the one it resumed), so a few entries suffice.
_ATTACHMENTS: ContextVar[dict[str, int]] = ContextVar("meetmesh_session_attachments")
_REMEMBERED = 4
# What one kept frame costs besides its text (str header, timestamp, deque slots), so that
# ``replay_max_bytes`` bounds the memory a replay buffer really holds.
_FRAME_OVERHEAD = 96
# Sessions `SessionHub.reap` looks at per call for idleness and old frames: one gateway holds 10,000
# sockets, and looking at all of them every second stalled its event loop 5-7 ms each time.
REAP_SLICE = 1000


class SessionNotFound(BusError):
    """No live session with that id: it never existed, was closed, or expired."""

    def __init__(self, session_id: str, detail: str = "never existed, was closed, or expired") -> None:
        super().__init__(f"no session {session_id!r} ({detail})")
        self.session_id = session_id


class SessionForbidden(BusError):
    """The session exists but belongs to another user."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} belongs to another user")
        self.session_id = session_id


class ResumeGap(BusError):
    """Frames after ``last_seq`` are no longer kept (or were never sent): the client must start afresh."""

    def __init__(self, session_id: str, last_seq: int, oldest: int, newest: int) -> None:
        why = (f"has sent only up to seq {newest}" if last_seq > newest
               else f"no longer keeps the frames after seq {last_seq} (oldest kept: {oldest})")
        super().__init__(f"session {session_id!r} {why}; open a new session")
        self.session_id, self.last_seq, self.oldest, self.newest = session_id, last_seq, oldest, newest


class SessionState(StrEnum):
    """Where a session is: bound to a socket, waiting to be resumed, or gone."""

    ATTACHED = "attached"
    DETACHED = "detached"
    CLOSED = "closed"

    def check(self, target: SessionState) -> None:
        """Raise `IllegalTransition` unless moving from this state to ``target`` is allowed."""
        if target not in _MOVES[self]:
            raise IllegalTransition(f"a session cannot go from {self.value} to {target.value}")


_MOVES: dict[SessionState, frozenset[SessionState]] = {
    SessionState.ATTACHED: frozenset({SessionState.DETACHED, SessionState.CLOSED}),
    SessionState.DETACHED: frozenset({SessionState.ATTACHED, SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}


def _encode(frame: dict[str, Any]) -> str:
    """The frame as compact JSON text without ``seq`` (which `_numbered` appends)."""
    body = frame if "seq" not in frame else {k: v for k, v in frame.items() if k != "seq"}
    try:
        return json.dumps(body, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f"frame is not JSON-serialisable: {exc}") from exc


def _numbered(body: str, seq: int) -> str:
    return f'{body[:-1]},"seq":{seq}}}' if len(body) > 2 else f'{{"seq":{seq}}}'


class Session:
    """One client's session. Every frame goes through `push`; the socket's writer awaits `next_outgoing`.

    Each attach (open, resume) starts a new *attachment*, numbered by `epoch`. The attachment is
    remembered in the calling task's context, which the writer task it then creates inherits, so
    once another connection resumes the session, the old writer's `next_outgoing` returns None, its
    `close_code` is `CLOSE_SUPERSEDED`, and `SessionHub.detach` from the old handler does nothing.
    Pass ``epoch=`` to say which attachment explicitly.
    """

    __slots__ = ("_ended", "_epoch", "_held", "_hub", "_outbox", "_replay", "_replay_bytes", "_seq",
                 "_stamps", "_waiter", "detached_at", "id", "last_seen", "roles", "state", "tasks", "topics",
                 "user")

    id: str
    user: str
    roles: frozenset[str]
    state: SessionState
    tasks: set[str]
    topics: set[str]
    last_seen: float
    detached_at: float | None

    def __init__(self, hub: SessionHub, session_id: str, user: str, roles: frozenset[str],
                 now: float) -> None:
        self._hub = hub
        self.id, self.user, self.roles = session_id, user, roles
        self.state = SessionState.ATTACHED
        self.tasks, self.topics = set(), set()
        self.last_seen, self.detached_at = now, None
        self._seq = -1  # the last seq pushed; welcome gets 0
        self._replay: deque[str] = deque()  # encoded frames, oldest first; seqs are contiguous
        self._stamps: deque[float] = deque()  # when each was pushed
        self._replay_bytes = 0
        self._outbox: deque[str] | None = None  # frames waiting for this attachment's writer
        self._waiter: asyncio.Future[None] | None = None  # the writer, parked until a push or an end
        self._epoch = 1
        self._ended: tuple[int, int, str] | None = None  # (epoch, close code, reason) of the last end
        self._held: dict[str, list[str]] | None = None  # task id -> its frames, until `release_task`
        self._remember()

    def __repr__(self) -> str:
        return f"<Session {self.id} user={self.user!r} {self.state.value} seq={self._seq}>"

    @property
    def epoch(self) -> int:
        """The current attachment's number (1 when opened; +1 on every attach)."""
        return self._epoch

    @property
    def seq(self) -> int:
        """The seq of the last frame pushed (-1 before any)."""
        return self._seq

    # -- frames out -------------------------------------------------------------------------------

    def push(self, frame: dict[str, Any]) -> int:
        """Number ``frame`` (sets ``frame["seq"]``), keep it for replay, queue it if attached; its seq.

        Never blocks: if the send buffer is full the session is detached as a slow client
        (`CLOSE_SLOW_CLIENT`); the frame is still kept for replay, so a ``resume`` gets it.
        """
        seq = self._push_encoded(_encode(frame), self._hub._clock())
        frame["seq"] = seq
        return seq

    def _push_encoded(self, body: str, now: float) -> int:
        if self.state is SessionState.CLOSED:
            raise SessionNotFound(self.id, "it is closed")
        hub = self._hub
        self._seq += 1
        text = _numbered(body, self._seq)
        self._replay.append(text)
        self._stamps.append(now)
        self._replay_bytes += len(text) + _FRAME_OVERHEAD
        self._trim(now)
        hub._counts["frames_pushed"] += 1
        if self.state is SessionState.ATTACHED:
            if self._outbox is None:
                self._outbox = deque()
            if len(self._outbox) < hub.send_buffer:
                self._outbox.append(text)
                self._wake()
            else:
                hub._counts["slow_closes"] += 1
                hub._counts["frames_dropped"] += 1
                self._end(SessionState.DETACHED, CLOSE_SLOW_CLIENT,
                          f"too slow: {hub.send_buffer} frames waiting; resume to catch up", now)
        return self._seq

    def _trim(self, now: float) -> None:
        hub, replay, stamps = self._hub, self._replay, self._stamps
        oldest_allowed = now - hub.replay_window
        while replay and (stamps[0] < oldest_allowed or len(replay) > hub.replay_max
                          or (self._replay_bytes > hub.replay_max_bytes and len(replay) > 1)):
            self._replay_bytes -= len(replay.popleft()) + _FRAME_OVERHEAD
            stamps.popleft()

    async def next_outgoing(self, epoch: int | None = None) -> str | None:
        """The next JSON text for the socket, waiting for one; None once this attachment has ended
        (detached, superseded, slow, closed): the writer stops, and closes with `close_code` if set."""
        mine = self._caller_epoch(epoch)
        while True:
            if self.state is not SessionState.ATTACHED or mine != self._epoch:
                return None
            if self._outbox:
                self._hub._counts["frames_sent"] += 1
                return self._outbox.popleft()
            if self._waiter is not None:
                raise RuntimeError(f"session {self.id} already has a writer waiting")
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter  # woken by a push, or by the end of the attachment (checked above)
            finally:
                if self._waiter is waiter:
                    self._waiter = None

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def replay_after(self, last_seq: int) -> list[str]:
        """The kept frames with seq > ``last_seq``, oldest first; raises `ResumeGap` if some are gone.

        Call it right after `SessionHub.resume` and send the frames before starting the writer: the
        send buffer is emptied, as each frame in it is either in the list or already had by the client.
        """
        if self.state is SessionState.CLOSED:
            raise SessionNotFound(self.id, "it is closed")
        self._trim(self._hub._clock())
        oldest = self._seq - len(self._replay) + 1
        last_seq = max(last_seq, -1)
        if last_seq > self._seq or last_seq + 1 < oldest:
            raise ResumeGap(self.id, last_seq, oldest, self._seq)
        frames = list(islice(self._replay, last_seq + 1 - oldest, None))
        if self._outbox:
            self._outbox.clear()
        self._hub._counts["frames_replayed"] += len(frames)
        return frames

    # -- state ------------------------------------------------------------------------------------

    def attach(self) -> None:
        """DETACHED -> ATTACHED: a new attachment (`epoch` + 1), remembered for the calling task."""
        self.state.check(SessionState.ATTACHED)
        self.state = SessionState.ATTACHED
        self._epoch += 1
        self.last_seen, self.detached_at = self._hub._clock(), None
        self._hub._detached.pop(self.id, None)
        self._remember()

    def detach(self) -> None:
        """ATTACHED -> DETACHED: the socket went away; frames are kept for ``replay_window`` seconds."""
        self._end(SessionState.DETACHED, CLOSE_NORMAL, "detached", self._hub._clock())

    def close(self, code: int = CLOSE_NORMAL, reason: str = "session closed") -> None:
        """-> CLOSED, for good: frees the replay buffer and leaves the hub (see `SessionHub.forget`)."""
        self._end(SessionState.CLOSED, code, reason, self._hub._clock())
        self._held = None
        self._replay.clear()
        self._stamps.clear()
        self._replay_bytes = 0
        self._hub.forget(self)

    def _end(self, target: SessionState, code: int, reason: str, now: float) -> None:
        self.state.check(target)
        self.state = target
        self._ended = (self._epoch, code, reason)
        if self._outbox:
            self._hub._counts["frames_dropped"] += len(self._outbox)  # still replayable
        self._outbox = None
        self._wake()
        if target is SessionState.DETACHED:
            self.detached_at = now
            detached = self._hub._detached
            detached.pop(self.id, None)
            detached[self.id] = self  # last: the hub's detached sessions stay in detach order

    def touch(self, now: float | None = None) -> None:
        """The client sent something (any frame, a pong): it is alive."""
        self.last_seen = self._hub._clock() if now is None else now

    def close_for(self, epoch: int) -> tuple[int, str] | None:
        """The close code and reason for attachment ``epoch``'s socket; None while it is live."""
        if epoch == self._epoch and self.state is SessionState.ATTACHED:
            return None
        if self._ended is not None and self._ended[0] == epoch:
            return self._ended[1], self._ended[2]
        return CLOSE_SUPERSEDED, "another connection resumed this session"

    @property
    def close_code(self) -> int | None:
        """The code to close the caller's socket with (see `close_for`); None while it is live."""
        ending = self.close_for(self._caller_epoch(None))
        return ending[0] if ending else None

    @property
    def closing_reason(self) -> str | None:
        """Why the caller's attachment ended (goes in the close frame); None while it is live."""
        ending = self.close_for(self._caller_epoch(None))
        return ending[1] if ending else None

    def _remember(self) -> None:
        known = _ATTACHMENTS.get(None) or {}
        kept = [(k, v) for k, v in known.items() if k != self.id][-(_REMEMBERED - 1):]
        _ATTACHMENTS.set({**dict(kept), self.id: self._epoch})

    def _caller_epoch(self, epoch: int | None) -> int:
        if epoch is not None:
            return epoch
        known = _ATTACHMENTS.get(None)
        mine = known.get(self.id) if known else None
        return self._epoch if mine is None else mine

    def _expired(self, now: float) -> bool:
        hub = self._hub
        if self.state is SessionState.DETACHED:
            return self.detached_at is not None and now - self.detached_at > hub.replay_window
        return self.state is SessionState.ATTACHED and now - self.last_seen > hub.idle_timeout


def _is_pattern(topic: str) -> bool:
    return any(part in ("*", ">", "#") for part in topic.split("."))


def _topic_key(topic: str) -> str:
    if _is_pattern(topic):
        return check_pattern(topic)
    if not topic:
        raise InvalidMessage("a topic cannot be empty")
    return topic


class SessionHub:
    """The gateway's sessions, indexed by id, by task watched and by topic subscribed.

    ``replay_window``: seconds a frame is kept for ``resume``, and a detached session is kept at all;
    ``replay_max`` / ``replay_max_bytes``: at most that many frames / about that much memory kept per
    session (the newest frame always is); ``send_buffer``: frames that may wait for one socket before
    it is dropped as a slow client; ``idle_timeout``: seconds of client silence before an attached
    session is reaped. All times come from ``clock``.
    """

    def __init__(self, *, replay_window: float = 30.0, replay_max: int = 1000,
                 replay_max_bytes: int = 64 * 1024, send_buffer: int = 256, idle_timeout: float = 60.0,
                 clock: Clock = time.monotonic) -> None:
        if replay_window <= 0 or idle_timeout <= 0 or min(replay_max, replay_max_bytes, send_buffer) < 1:
            raise ValueError("replay_window and idle_timeout must be > 0; replay_max, replay_max_bytes "
                             "and send_buffer >= 1")
        self.replay_window, self.replay_max, self.send_buffer = replay_window, replay_max, send_buffer
        self.replay_max_bytes, self.idle_timeout = replay_max_bytes, idle_timeout
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._detached: dict[str, Session] = {}  # the DETACHED ones, oldest detach first
        self._scan: list[Session] = []  # what is left of `reap`'s current pass over every session
        # dicts as ordered sets: delivery order is subscription order
        self._by_task: dict[str, dict[Session, None]] = {}
        self._by_topic: dict[str, dict[Session, None]] = {}
        self._by_pattern: dict[str, dict[Session, None]] = {}
        self._counts = dict.fromkeys(("frames_pushed", "frames_sent", "frames_replayed", "frames_dropped",
                                      "slow_closes", "superseded", "resumes", "reaped"), 0)

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, user: str, roles: Iterable[str] = ()) -> Session:
        """A new session, ATTACHED; nothing pushed yet (the gateway pushes ``welcome``, seq 0)."""
        session_id = secrets.token_urlsafe(12)
        while session_id in self._sessions:  # 96 random bits: never, in practice
            session_id = secrets.token_urlsafe(12)
        session = Session(self, session_id, user, frozenset(roles), self._clock())
        self._sessions[session_id] = session
        return session

    def resume(self, session_id: str, user: str) -> Session:
        """Re-attach ``user``'s session; one still attached (a half-dead socket) is superseded first.

        Raises `SessionNotFound` (unknown, closed or expired) or `SessionForbidden` (another user's).
        """
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        if session.user != user:
            raise SessionForbidden(session_id)
        now = self._clock()
        if session._expired(now):
            session.close(CLOSE_IDLE, "session expired")
            raise SessionNotFound(session_id, "it expired")
        if session.state is SessionState.ATTACHED:
            self._counts["superseded"] += 1
            session._end(SessionState.DETACHED, CLOSE_SUPERSEDED, "another connection resumed this session",
                         now)
        session.attach()
        self._counts["resumes"] += 1
        return session

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def detach(self, session: Session, epoch: int | None = None) -> bool:
        """The caller's socket went away: detach if the session is still attached to it; never raises.

        False if it is not attached, or attached to another connection now (the caller was superseded).
        """
        if session.state is not SessionState.ATTACHED or session._caller_epoch(epoch) != session._epoch:
            return False
        session.detach()
        return True

    def close(self, session: Session, code: int = CLOSE_NORMAL, reason: str = "session closed") -> bool:
        """Close ``session`` unless it is closed already; whether it was closed now."""
        if session.state is SessionState.CLOSED:
            return False
        session.close(code, reason)
        return True

    def forget(self, session: Session) -> None:
        """Drop ``session`` from the hub and its indexes (`Session.close` does this). Idempotent."""
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
        if self._detached.get(session.id) is session:
            del self._detached[session.id]
        for task_id in session.tasks:
            _discard(self._by_task, task_id, session)
        for topic in session.topics:
            _discard(self._by_pattern if _is_pattern(topic) else self._by_topic, topic, session)
        session.tasks.clear()
        session.topics.clear()

    # -- routing ----------------------------------------------------------------------------------

    def watch_task(self, session: Session, task_id: str, *, hold: bool = False) -> None:
        """Send ``task_id``'s updates to ``session``.

        With ``hold``, they are kept aside until `release_task`. A submitter watches its task before
        queueing it, so no update can come before anyone listens (a worker may start it, and the relay
        read that, before the enqueue's answer is back), and releases it once its ``accepted`` frame
        is pushed, so that frame still comes first.
        """
        _check_open(session)
        session.tasks.add(task_id)
        self._by_task.setdefault(task_id, {})[session] = None
        if hold:
            if session._held is None:
                session._held = {}
            session._held.setdefault(task_id, [])

    def release_task(self, session: Session, task_id: str) -> int:
        """Push the frames held for ``task_id`` (oldest first); later ones go out directly. How many."""
        held = session._held.pop(task_id, None) if session._held else None
        if not session._held:
            session._held = None
        if not held or session.state is SessionState.CLOSED:
            return 0
        now = self._clock()
        for body in held:
            session._push_encoded(body, now)
        return len(held)

    def unwatch_task(self, session: Session, task_id: str) -> None:
        """Stop sending ``task_id``'s updates to ``session``; any held for it are dropped."""
        session.tasks.discard(task_id)
        _discard(self._by_task, task_id, session)
        if session._held:
            session._held.pop(task_id, None)

    def drop_task(self, task_id: str) -> int:
        """``task_id`` is over: stop routing it to anyone; how many sessions watched it. Frames held
        for it (`watch_task`) stay held until released."""
        watchers = self._by_task.pop(task_id, {})
        for session in watchers:
            session.tasks.discard(task_id)
        return len(watchers)

    def sessions_for_task(self, task_id: str) -> list[Session]:
        return list(self._by_task.get(task_id, ()))

    def subscribe(self, session: Session, topic: str) -> str:
        """Send events on ``topic`` (exact, or a pattern: ``*``, ``>``/``#``) to ``session``; the key kept
        (patterns normalised). Raises `InvalidMessage` for a malformed pattern."""
        _check_open(session)
        key = _topic_key(topic)
        session.topics.add(key)
        (self._by_pattern if _is_pattern(key) else self._by_topic).setdefault(key, {})[session] = None
        return key

    def unsubscribe(self, session: Session, topic: str) -> bool:
        """Stop ``topic`` (as given to `subscribe`); whether it was subscribed."""
        key = _topic_key(topic)
        if key not in session.topics:
            return False
        session.topics.discard(key)
        _discard(self._by_pattern if _is_pattern(key) else self._by_topic, key, session)
        return True

    def sessions_for_topic(self, topic: str) -> list[Session]:
        found = dict(self._by_topic.get(topic, {}))
        for pattern, sessions in self._by_pattern.items():
            if matches(pattern, topic):
                found.update(sessions)
        return list(found)

    def deliver_task(self, task_id: str, frame: dict[str, Any]) -> int:
        """Push ``frame`` (not modified) to every session watching ``task_id``, or hold it for those
        that hold the task (`watch_task`); how many sessions."""
        watchers = self._by_task.get(task_id)
        if not watchers:
            return 0
        body, now = _encode(frame), self._clock()
        for session in list(watchers):
            held = session._held
            if held is not None and task_id in held:
                held[task_id].append(body)
            else:
                session._push_encoded(body, now)
        return len(watchers)

    def deliver_topic(self, topic: str, frame: dict[str, Any]) -> int:
        """Push ``frame`` (not modified) to every session subscribed to ``topic`` or a matching pattern."""
        return self._deliver(self.sessions_for_topic(topic), frame)

    def _deliver(self, sessions: list[Session], frame: dict[str, Any]) -> int:
        if not sessions:
            return 0
        body, now = _encode(frame), self._clock()  # encoded once; each session appends its own seq
        for session in sessions:
            session._push_encoded(body, now)
        return len(sessions)

    # -- housekeeping -----------------------------------------------------------------------------

    def reap(self) -> list[Session]:
        """Close DETACHED sessions past ``replay_window`` and ATTACHED ones silent past ``idle_timeout``
        (`CLOSE_IDLE`); they are returned so the gateway can close their sockets. Also ages out the
        frames of quiet sessions (a push or a resume does it for the others).

        Cheap enough to call every second with 10,000 sessions: detached ones are kept in detach
        order, so only those due are looked at; the rest are looked at ``REAP_SLICE`` per call, so a
        silent session is reaped up to ``len(hub) / REAP_SLICE`` calls after its time.
        """
        now, reaped = self._clock(), []
        while self._detached:
            session = next(iter(self._detached.values()))
            if not session._expired(now):
                break
            session.close(CLOSE_IDLE, "detached past the replay window")
            reaped.append(session)
        if not self._scan:
            self._scan = list(self._sessions.values())
        batch = self._scan[-REAP_SLICE:]
        del self._scan[-REAP_SLICE:]
        for session in batch:
            if session.state is SessionState.CLOSED:
                continue
            if session._expired(now):
                why = ("detached past the replay window" if session.state is SessionState.DETACHED
                       else f"nothing from the client for {self.idle_timeout:g} s")
                session.close(CLOSE_IDLE, why)
                reaped.append(session)
            else:
                session._trim(now)
        self._counts["reaped"] += len(reaped)
        return reaped

    def close_all(self, code: int = CLOSE_GOING_AWAY,
                  reason: str = "the gateway is shutting down") -> list[Session]:
        """Close every session (shutdown); returns them."""
        sessions = list(self._sessions.values())
        for session in sessions:
            session.close(code, reason)
        return sessions

    @property
    def stats(self) -> dict[str, int]:
        """Sessions by state, and counters since start: frames pushed, handed to writers (sent),
        replayed, dropped from send buffers (still replayable), slow closes, supersedes, resumes, reaps."""
        detached = len(self._detached)
        return {"sessions": len(self._sessions), "attached": len(self._sessions) - detached,
                "detached": detached, **self._counts}


def _discard(index: dict[str, dict[Session, None]], key: str, session: Session) -> None:
    sessions = index.get(key)
    if sessions is not None:
        sessions.pop(session, None)
        if not sessions:
            del index[key]


def _check_open(session: Session) -> None:
    if session.state is SessionState.CLOSED:
        raise SessionNotFound(session.id, "it is closed")
