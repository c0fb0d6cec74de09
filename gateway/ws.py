"""WebSocket ``/ws``: JSON frames in both directions (see docs/gateway.md, which lists the close codes).

The token comes, in order of preference, from ``Sec-WebSocket-Protocol: bearer, <token>`` (the
answer names only ``bearer``), a first frame ``{"type": "auth", "token": ...}`` sent within
`AUTH_TIMEOUT_S`, or ``?token=`` (kept for old clients; redacted from every log line by
`gateway.logs`). The first two never put the token in a URL.

One reader (this coroutine) and one writer task per socket. Every frame to the client goes
through its `Session` (which numbers it, keeps it for ``resume``, and bounds what a slow client
may have queued), so the writer is the only one writing to the socket. Whatever a client frame
holds, it ends in an answer (an ``error`` frame at worst) or in a close with a documented code:
it is parsed defensively (`parse_frame`), and its ``id`` is echoed only when it is a short string
or a safe integer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from shared.bus import BusError, InvalidMessage
from shared.bus.dispatch.dispatcher import Dispatcher
from shared.bus.events.catalogue import check_pattern

from . import upstream
from .auth import Principal, authenticate
from .errors import ApiError, from_bus_error
from .frames import MAX_SAFE_INT, FrameError, parse_frame, safe_id
from .hub import SessionHub
from .limits import CLOSE_TRY_AGAIN, socket_slot
from .session import CLOSE_GOING_AWAY, Session, SessionForbidden, SessionState
from .tasks import TaskSubmit, owned_record, submit

log = logging.getLogger(__name__)
router = APIRouter()
CLOSE_POLICY = 1008  # a bad or expired token, or a first frame that is not `auth` when one is due
CLOSE_TOO_BIG = 1009  # uvicorn's, for a frame over its ws_max_size
CLOSE_AUTH_TIMEOUT = 4003  # no token in the handshake and no `auth` frame within AUTH_TIMEOUT_S
AUTH_TIMEOUT_S = 5.0
BEARER = "bearer"  # the subprotocol that carries a token: `Sec-WebSocket-Protocol: bearer, <token>`
MAX_NAME_CHARS = 256  # a topic, task id or session id: longer ones are refused before any look-up


def _name(frame: dict[str, Any], key: str, what: str) -> str:
    value = frame.get(key)
    if not isinstance(value, str) or not value:
        raise ApiError(400, "bad_request", what)
    if len(value) > MAX_NAME_CHARS:
        raise ApiError(400, "bad_request", f"`{key}` is over {MAX_NAME_CHARS} characters")
    return value


class Connection:
    """One socket's reader loop, bound to one session (which ``resume`` may swap)."""

    def __init__(self, ws: WebSocket, principal: Principal) -> None:
        self.ws = ws
        self.principal = principal
        app = ws.app
        self.hub: SessionHub = app.state.hub
        self.dispatcher: Dispatcher = app.state.dispatcher
        self.max_bytes: int = app.state.settings.max_frame_bytes
        self.metrics = app.state.metrics
        self.session: Session = self.hub.open(principal.user, principal.roles)
        self.writer: asyncio.Task[None] | None = None

    async def run(self) -> None:
        self.session.push({"type": "welcome", "session_id": self.session.id})
        self._start_writer()
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    self.metrics.frames_in.inc()
                    self.error(None, "bad_request", "send JSON text frames, not binary")
                else:
                    await self.handle(text)
                if self.session.state is SessionState.CLOSED:  # the hub closed it (shutdown): end here
                    with contextlib.suppress(Exception):
                        await self.ws.close(self.session.close_code or CLOSE_GOING_AWAY,
                                            (self.session.closing_reason or "session closed")[:120])
                    break
        except WebSocketDisconnect:
            pass
        finally:
            await self._stop_writer()
            self.hub.detach(self.session)  # kept for resume; a no-op if another socket took it over

    def _start_writer(self) -> None:
        self.writer = asyncio.create_task(self._write(self.session))

    async def _stop_writer(self) -> None:
        if self.writer is not None:
            self.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.writer
            self.writer = None

    async def _write(self, session: Session) -> None:
        try:
            while (text := await session.next_outgoing()) is not None:
                await self.ws.send_text(text)
                self.metrics.frames_out.inc()
        except Exception:  # the socket went away; the reader sees the disconnect
            return
        if session.close_code is not None:  # closed by the hub: slow client, idle, superseded
            with contextlib.suppress(Exception):
                await self.ws.close(session.close_code, (session.closing_reason or "")[:120])

    # -- frames from the client -------------------------------------------------------------------

    def error(self, request_id: str | int | None, code: str, message: str,
              retry_after: int | None = None) -> None:
        """Push an ``error`` frame (``request_id`` must come from `safe_id`); nothing if the session
        is closed, as the reader then closes the socket. ``retry_after`` (s) comes with a limit's refusal."""
        self.metrics.client_errors.labels(code).inc()
        frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if request_id is not None:
            frame["id"] = request_id
        if retry_after is not None:
            frame["retry_after"] = retry_after
        if self.session.state is not SessionState.CLOSED:
            self.session.push(frame)

    async def handle(self, text: str) -> None:
        self.session.touch()
        self.metrics.frames_in.inc()
        if len(text) > self.max_bytes and len(text.encode()) > self.max_bytes:
            self.error(None, "too_large", f"frame over {self.max_bytes} bytes")
            return
        try:
            frame = parse_frame(text)
            request_id = safe_id(frame.get("id"))
        except FrameError as exc:
            self.error(None, "bad_request", exc.message)
            return
        kind = frame.get("type")
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            shown = repr(kind)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            known = ", ".join(_HANDLERS)
            self.error(request_id, "bad_request", f"unknown frame type {shown}; known: {known}")
            return
        try:
            await handler(self, frame)
        except ApiError as exc:
            wait = (exc.headers or {}).get("Retry-After")  # a limit's refusal (gateway.limits)
            self.error(request_id, exc.code, exc.message, int(wait) if wait and wait.isdigit() else None)
        except BusError as exc:
            err = from_bus_error(exc)
            self.error(request_id, err.code, err.message)
        except Exception:  # a bug, not the client's doing: say so, keep the socket, log it
            log.exception("a %s frame failed", kind)
            self.error(request_id, "internal", f"the gateway failed to handle this {kind} frame")

    async def on_submit(self, frame: dict[str, Any]) -> None:
        fields = {
            k: frame[k]
            for k in ("data", "priority", "timeout_s", "delay_s", "dedupe_key", "meeting_id")
            if k in frame
        }
        if not isinstance(frame.get("task"), str):
            raise ApiError(400, "bad_request", 'submit needs `task`: the task type, e.g. "ai.summarize"')
        try:
            task = TaskSubmit(type=frame["task"], **fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ApiError(
                400, "bad_request", f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
            ) from None
        session = self.session
        held: list[str] = []  # the id given before the enqueue (one; none if building failed)

        def hold(task_id: str) -> None:  # its updates may come before the enqueue's answer
            self.hub.watch_task(session, task_id, hold=True)
            held.append(task_id)

        try:
            submitted = await submit(self.dispatcher, self.principal, task, on_id=hold)
        except BaseException:
            for task_id in held:
                self.hub.unwatch_task(session, task_id)
            raise
        if submitted.task_id not in held:  # a dedupe key in use: the existing task is the one watched
            for task_id in held:
                self.hub.unwatch_task(session, task_id)
            self.hub.watch_task(session, submitted.task_id)
        session.push(
            {
                "type": "accepted",
                "id": frame.get("id"),
                "task_id": submitted.task_id,
                "status": submitted.status.value,
                "position": submitted.position,
            }
        )
        self.hub.release_task(session, submitted.task_id)

    async def on_cancel(self, frame: dict[str, Any]) -> None:
        task_id = _name(frame, "task_id", "cancel needs `task_id`")
        await owned_record(self.dispatcher, self.principal, task_id)
        self.hub.watch_task(self.session, task_id)
        before = await self.dispatcher.cancel(task_id)
        self.session.push(
            {
                "type": "cancelled",
                "id": frame.get("id"),
                "task_id": task_id,
                "cancelled": not before.terminal,
                "previous_status": before.value,
            }
        )

    async def on_subscribe(self, frame: dict[str, Any]) -> None:
        topic = self._topic(frame)
        if topic.startswith("task."):  # a task's status, progress and result frames
            task_id = topic.removeprefix("task.")
            await self._may_watch(task_id)
            self.hub.watch_task(self.session, task_id)
        else:
            # MeetMesh services: meeting.<id> is for the meeting's participants (and admins) only
            await upstream.may_follow(self.ws.app.state, self.principal, topic)
            self.hub.subscribe(self.session, topic)
        self.session.push({"type": "subscribed", "id": frame.get("id"), "topic": topic})

    async def on_unsubscribe(self, frame: dict[str, Any]) -> None:
        topic = self._topic(frame)
        self.hub.unsubscribe(self.session, topic)
        self.session.push({"type": "unsubscribed", "id": frame.get("id"), "topic": topic})

    def _topic(self, frame: dict[str, Any]) -> str:
        topic = _name(frame, "topic", 'needs `topic`, e.g. "meeting.m1"')
        try:
            return check_pattern(topic)
        except InvalidMessage as exc:
            raise ApiError(400, "bad_request", str(exc)) from None

    async def _may_watch(self, task_id: str) -> None:
        """A task's updates are for its owner (and admins) alone."""
        if any(c in task_id for c in "*>#"):
            raise ApiError(400, "bad_request", "watch one task at a time: task.<task_id>")
        await owned_record(self.dispatcher, self.principal, task_id)

    async def on_ping(self, frame: dict[str, Any]) -> None:
        self.session.push({"type": "pong", "id": frame.get("id")})

    async def on_auth(self, frame: dict[str, Any]) -> None:
        raise ApiError(400, "bad_request", "this connection is authenticated already")

    async def on_resume(self, frame: dict[str, Any]) -> None:
        session_id, last_seq = frame.get("session_id"), frame.get("last_seq")
        if (not isinstance(session_id, str) or not isinstance(last_seq, int) or isinstance(last_seq, bool)
                or not -1 <= last_seq <= MAX_SAFE_INT):
            raise ApiError(400, "bad_request", "resume needs `session_id` (string) and `last_seq` "
                           f"(integer, -1 to {MAX_SAFE_INT})")
        session_id = _name(frame, "session_id", "resume needs `session_id`")
        if session_id == self.session.id:  # the hub would end it under our feet, then we would push to it
            raise ApiError(409, "conflict", f"session {session_id!r} is this connection's own already")
        try:
            old = self.hub.resume(session_id, self.principal.user)
        except SessionForbidden as exc:
            raise ApiError(403, "forbidden", str(exc)) from None
        except BusError as exc:
            raise ApiError(404, "not_found", str(exc)) from None
        try:
            frames = old.replay_after(last_seq)
        except BusError as exc:  # frames after last_seq are gone: this session cannot go on
            self.hub.close(old)
            raise ApiError(404, "not_found", str(exc)) from None
        # Swap: the fresh session this socket opened with is dropped, the resumed one takes over.
        await self._stop_writer()
        fresh, self.session = self.session, old
        fresh.close()
        self.hub.forget(fresh)
        for text in frames:
            await self.ws.send_text(text)
        self._start_writer()


_HANDLERS = {
    "submit": Connection.on_submit,
    "cancel": Connection.on_cancel,
    "subscribe": Connection.on_subscribe,
    "unsubscribe": Connection.on_unsubscribe,
    "ping": Connection.on_ping,
    "resume": Connection.on_resume,
    "auth": Connection.on_auth,
}


def _protocol_token(offered: list[str]) -> str | None:
    """The token in ``Sec-WebSocket-Protocol: bearer, <token>`` (the value after ``bearer``)."""
    for i, value in enumerate(offered[:-1]):
        if value.strip().lower() == BEARER:
            return offered[i + 1].strip() or None
    return None


async def _auth_frame(ws: WebSocket) -> str | None:
    """The token of the socket's first frame (``{"type":"auth","token":...}``); None when the client
    left or sent nothing in time (then closed with `CLOSE_AUTH_TIMEOUT`); `ApiError` 401 otherwise."""
    try:
        message = await asyncio.wait_for(ws.receive(), AUTH_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(Exception):
            await ws.close(CLOSE_AUTH_TIMEOUT, f"no auth frame within {AUTH_TIMEOUT_S:g} s")
        return None
    if message["type"] == "websocket.disconnect":
        return None
    frame: dict[str, Any] | None = None
    with contextlib.suppress(FrameError):
        frame = parse_frame(message["text"]) if message.get("text") is not None else None
    token = frame.get("token") if frame is not None and frame.get("type") == "auth" else None
    if not isinstance(token, str) or not token:
        raise ApiError(401, "unauthorized", 'no token: send {"type":"auth","token":JWT} first, or the '
                       'header Sec-WebSocket-Protocol: bearer, JWT')
    return token


@router.websocket("/ws")
async def websocket(ws: WebSocket) -> None:
    offered = [str(p) for p in ws.scope.get("subprotocols") or ()]
    token = _protocol_token(offered)
    await ws.accept(subprotocol=BEARER if token is not None else None)
    token = token or ws.query_params.get("token")
    try:
        if not token:
            token = await _auth_frame(ws)
            if token is None:
                return
        principal = await authenticate(ws.app.state, token)  # revoked tokens too (a deleted user's)
    except ApiError as exc:
        code = CLOSE_TRY_AGAIN if exc.status == 503 else CLOSE_POLICY  # 503: Redis cannot say yet
        with contextlib.suppress(Exception):
            await ws.close(code, exc.message[:120])
        return
    metrics = ws.app.state.metrics
    metrics.sockets.inc()
    try:
        async with socket_slot(ws, principal.user) as admitted:  # per-user socket limit (gateway.limits)
            if admitted:
                await Connection(ws, principal).run()
    finally:
        metrics.sockets.dec()
