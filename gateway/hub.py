"""The gateway's session hub: its sessions indexed by id, by task watched and by topic subscribed; it opens
and resumes them, routes task updates and topic events to them, and reaps the idle and the expired.

One session's own state (seq numbering, replay buffer, attachments) is `gateway.session`. (Per-user
limits: `shared.bus.dispatch.ratelimit.UserLimits`, in Redis.) Nothing here starts tasks or timers: the
gateway runs one reaper loop (`gateway.app`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from typing import Any

from shared.bus.errors import InvalidMessage
from shared.bus.events.catalogue import check_pattern, matches

from .session import (
    CLOSE_GOING_AWAY,
    CLOSE_IDLE,
    CLOSE_NORMAL,
    Clock,
    Session,
    SessionForbidden,
    SessionNotFound,
    SessionState,
    encode,
)

# Sessions `SessionHub.reap` looks at per call for idleness and old frames: one gateway holds 10,000
# sockets, and looking at all of them every second stalled its event loop 5-7 ms each time.
REAP_SLICE = 1000


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
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._detached: dict[str, Session] = {}  # the DETACHED ones, oldest detach first
        self._scan: list[Session] = []  # what is left of `reap`'s current pass over every session
        # dicts as ordered sets: delivery order is subscription order
        self._by_task: dict[str, dict[Session, None]] = {}
        self._by_topic: dict[str, dict[Session, None]] = {}
        self._by_pattern: dict[str, dict[Session, None]] = {}
        # counters since start (`stats`); the sessions count their frames here too
        self.counts = dict.fromkeys(("frames_pushed", "frames_sent", "frames_replayed", "frames_dropped",
                                     "slow_closes", "superseded", "resumes", "reaped"), 0)

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, user: str, roles: Iterable[str] = ()) -> Session:
        """A new session, ATTACHED; nothing pushed yet (the gateway pushes ``welcome``, seq 0)."""
        session_id = secrets.token_urlsafe(12)
        while session_id in self._sessions:  # 96 random bits: never, in practice
            session_id = secrets.token_urlsafe(12)
        session = Session(self, session_id, user, frozenset(roles), self.clock())
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
        now = self.clock()
        if session.expired(now):
            session.close(CLOSE_IDLE, "session expired")
            raise SessionNotFound(session_id, "it expired")
        if session.state is SessionState.ATTACHED:
            self.counts["superseded"] += 1
            session.supersede(now)
        session.attach()
        self.counts["resumes"] += 1
        return session

    def get(self, session_id: str) -> Session | None:
        """The live session with that id, if any."""
        return self._sessions.get(session_id)

    def detach(self, session: Session, epoch: int | None = None) -> bool:
        """The caller's socket went away: detach if the session is still attached to it; never raises.

        False if it is not attached, or attached to another connection now (the caller was superseded).
        """
        if not session.is_current(epoch):
            return False
        session.detach()
        return True

    def close(self, session: Session, code: int = CLOSE_NORMAL, reason: str = "session closed") -> bool:
        """Close ``session`` unless it is closed already; whether it was closed now."""
        if session.state is SessionState.CLOSED:
            return False
        session.close(code, reason)
        return True

    def on_detach(self, session: Session) -> None:
        """``session`` became DETACHED: last in the detached ones, which stay in detach order (for `reap`)."""
        self._detached.pop(session.id, None)
        self._detached[session.id] = session

    def on_attach(self, session: Session) -> None:
        """``session`` is ATTACHED again: no longer among the detached ones."""
        self._detached.pop(session.id, None)

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
            session.hold(task_id)

    def release_task(self, session: Session, task_id: str) -> int:
        """Push the frames held for ``task_id`` (oldest first); later ones go out directly. How many."""
        return session.release(task_id)

    def unwatch_task(self, session: Session, task_id: str) -> None:
        """Stop sending ``task_id``'s updates to ``session``; any held for it are dropped."""
        session.tasks.discard(task_id)
        _discard(self._by_task, task_id, session)
        session.drop_held(task_id)

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
        body, now = encode(frame), self.clock()
        for session in list(watchers):
            session.push_encoded(body, now, task_id)  # or held, if the session holds the task
        return len(watchers)

    def deliver_topic(self, topic: str, frame: dict[str, Any]) -> int:
        """Push ``frame`` (not modified) to every session subscribed to ``topic`` or a matching pattern."""
        return self._deliver(self.sessions_for_topic(topic), frame)

    def _deliver(self, sessions: list[Session], frame: dict[str, Any]) -> int:
        if not sessions:
            return 0
        body, now = encode(frame), self.clock()  # encoded once; each session appends its own seq
        for session in sessions:
            session.push_encoded(body, now)
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
        now, reaped = self.clock(), []
        while self._detached:
            session = next(iter(self._detached.values()))
            if not session.expired(now):
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
            if session.expired(now):
                why = ("detached past the replay window" if session.state is SessionState.DETACHED
                       else f"nothing from the client for {self.idle_timeout:g} s")
                session.close(CLOSE_IDLE, why)
                reaped.append(session)
            else:
                session.trim(now)
        self.counts["reaped"] += len(reaped)
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
                "detached": detached, **self.counts}


def _discard(index: dict[str, dict[Session, None]], key: str, session: Session) -> None:
    sessions = index.get(key)
    if sessions is not None:
        sessions.pop(session, None)
        if not sessions:
            del index[key]


def _check_open(session: Session) -> None:
    if session.state is SessionState.CLOSED:
        raise SessionNotFound(session.id, "it is closed")
