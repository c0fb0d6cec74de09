"""A client session behind the gateway's WebSocket: everything about one session that is not the socket.

A `Session` numbers every frame sent to its client (``welcome`` is 0), keeps the encoded frames for a
``replay_window`` so a client that reconnects with ``resume`` loses nothing, and bounds what may wait
for a slow socket; `SessionState` is its state machine. The hub that holds the sessions (`gateway.hub`)
opens, resumes, routes to and reaps them; a session knows it only as a `SessionOwner` (its limits,
clock and counters). Nothing here starts tasks or timers: the gateway runs one writer per socket.

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
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from enum import StrEnum
from itertools import islice
from typing import Any, Protocol

from shared.bus.errors import BusError, IllegalTransition, InvalidMessage

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


def encode(frame: dict[str, Any]) -> str:
    """The frame as compact JSON text without ``seq`` (each session appends its own)."""
    body = frame if "seq" not in frame else {k: v for k, v in frame.items() if k != "seq"}
    try:
        return json.dumps(body, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f"frame is not JSON-serialisable: {exc}") from exc


def _numbered(body: str, seq: int) -> str:
    return f'{body[:-1]},"seq":{seq}}}' if len(body) > 2 else f'{{"seq":{seq}}}'


class SessionOwner(Protocol):
    """What a `Session` needs of the hub holding it (`gateway.hub.SessionHub`): the limits, the clock
    and the counters (read on every push), and to hear when the session detaches, attaches or closes."""

    replay_window: float
    replay_max: int
    replay_max_bytes: int
    send_buffer: int
    idle_timeout: float
    clock: Clock
    counts: dict[str, int]

    def on_detach(self, session: Session) -> None:
        """``session`` became DETACHED (at ``session.detached_at``)."""

    def on_attach(self, session: Session) -> None:
        """``session`` is ATTACHED again."""

    def forget(self, session: Session) -> None:
        """``session`` is CLOSED: drop it."""


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

    def __init__(self, hub: SessionOwner, session_id: str, user: str, roles: frozenset[str],
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
        seq = self.push_encoded(encode(frame), self._hub.clock())
        frame["seq"] = seq
        return seq

    def push_encoded(self, body: str, now: float, task: str | None = None) -> int:
        """`push` for a frame `encode` made (a hub encodes once for every session it pushes to), at
        ``now``; its seq. With ``task``, the frame is one of that task's updates: held instead (seq -1)
        while the task is held (`hold`)."""
        if task is not None:
            held = self._held
            if held is not None and task in held:
                held[task].append(body)
                return -1
        if self.state is SessionState.CLOSED:
            raise SessionNotFound(self.id, "it is closed")
        hub = self._hub
        self._seq += 1
        text = _numbered(body, self._seq)
        self._replay.append(text)
        self._stamps.append(now)
        self._replay_bytes += len(text) + _FRAME_OVERHEAD
        self.trim(now)
        hub.counts["frames_pushed"] += 1
        if self.state is SessionState.ATTACHED:
            if self._outbox is None:
                self._outbox = deque()
            if len(self._outbox) < hub.send_buffer:
                self._outbox.append(text)
                self._wake()
            else:
                hub.counts["slow_closes"] += 1
                hub.counts["frames_dropped"] += 1
                self._end(SessionState.DETACHED, CLOSE_SLOW_CLIENT,
                          f"too slow: {hub.send_buffer} frames waiting; resume to catch up", now)
        return self._seq

    def trim(self, now: float) -> None:
        """Drop the kept frames past the hub's replay window, count or byte bound (never the newest)."""
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
                self._hub.counts["frames_sent"] += 1
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
        self.trim(self._hub.clock())
        oldest = self._seq - len(self._replay) + 1
        last_seq = max(last_seq, -1)
        if last_seq > self._seq or last_seq + 1 < oldest:
            raise ResumeGap(self.id, last_seq, oldest, self._seq)
        frames = list(islice(self._replay, last_seq + 1 - oldest, None))
        if self._outbox:
            self._outbox.clear()
        self._hub.counts["frames_replayed"] += len(frames)
        return frames

    # -- state ------------------------------------------------------------------------------------

    def attach(self) -> None:
        """DETACHED -> ATTACHED: a new attachment (`epoch` + 1), remembered for the calling task."""
        self.state.check(SessionState.ATTACHED)
        self.state = SessionState.ATTACHED
        self._epoch += 1
        self.last_seen, self.detached_at = self._hub.clock(), None
        self._hub.on_attach(self)
        self._remember()

    def detach(self) -> None:
        """ATTACHED -> DETACHED: the socket went away; frames are kept for ``replay_window`` seconds."""
        self._end(SessionState.DETACHED, CLOSE_NORMAL, "detached", self._hub.clock())

    def supersede(self, now: float) -> None:
        """ATTACHED -> DETACHED at ``now``: another connection resumes this session (`CLOSE_SUPERSEDED`
        for the socket it had); `attach` follows."""
        self._end(SessionState.DETACHED, CLOSE_SUPERSEDED, "another connection resumed this session", now)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "session closed") -> None:
        """-> CLOSED, for good: frees the replay buffer and leaves the hub (see `SessionHub.forget`)."""
        self._end(SessionState.CLOSED, code, reason, self._hub.clock())
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
            self._hub.counts["frames_dropped"] += len(self._outbox)  # still replayable
        self._outbox = None
        self._wake()
        if target is SessionState.DETACHED:
            self.detached_at = now
            self._hub.on_detach(self)

    def touch(self, now: float | None = None) -> None:
        """The client sent something (any frame, a pong): it is alive."""
        self.last_seen = self._hub.clock() if now is None else now

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

    def is_current(self, epoch: int | None = None) -> bool:
        """Whether the session is attached to the caller's attachment (or to attachment ``epoch``)."""
        return self.state is SessionState.ATTACHED and self._caller_epoch(epoch) == self._epoch

    # -- task updates held back (see `SessionHub.watch_task`) -------------------------------------

    def hold(self, task_id: str) -> None:
        """Keep ``task_id``'s frames aside (`push_encoded` with ``task``) until `release`."""
        if self._held is None:
            self._held = {}
        self._held.setdefault(task_id, [])

    def release(self, task_id: str) -> int:
        """Push the frames held for ``task_id`` (oldest first); later ones go out directly. How many."""
        held = self._held.pop(task_id, None) if self._held else None
        if not self._held:
            self._held = None
        if not held or self.state is SessionState.CLOSED:
            return 0
        now = self._hub.clock()
        for body in held:
            self.push_encoded(body, now)
        return len(held)

    def drop_held(self, task_id: str) -> None:
        """Forget the frames held for ``task_id``, if any."""
        if self._held:
            self._held.pop(task_id, None)

    # -- attachments ------------------------------------------------------------------------------

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

    def expired(self, now: float) -> bool:
        """Due for reaping at ``now``: detached past the replay window, or attached and silent past the
        idle timeout."""
        hub = self._hub
        if self.state is SessionState.DETACHED:
            return self.detached_at is not None and now - self.detached_at > hub.replay_window
        return self.state is SessionState.ATTACHED and now - self.last_seen > hub.idle_timeout
