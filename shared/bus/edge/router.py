"""The bridge's ZeroMQ side: a ROUTER its nodes' DEALERs register with (CURVE-authenticated unless
told otherwise), whose frames (`stackflow`) become `EdgeBridge.attach` / `deliver` / `detach` calls,
as `stackflow_tcp.StackFlowBackend` does for a unit manager reached over TCP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

import zmq
from pydantic import BaseModel, Field, ValidationError
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from ..errors import BusConnectionError
from .keys import LOG_EVERY, BridgeKeys, curve_server, start_authenticator
from .pool import LinkDown
from .stackflow import BEAT, BYE, CANCEL, MESSAGE, REGISTER, UNKNOWN, WELCOME, FrameSocket, dumps

if TYPE_CHECKING:
    from .pool import EdgeBridge

log = logging.getLogger("meetmesh.edge")


class _Registration(BaseModel):
    name: str = Field(min_length=1)
    models: list[str] = Field(min_length=1)
    capacity: int = Field(ge=1)


class _RouterLink:
    """One registered node, as the bridge sees it (a `edge.NodeLink`)."""

    def __init__(self, router: RouterTransport, identity: bytes) -> None:
        self.router, self.identity = router, identity

    async def send(self, message: dict[str, Any]) -> None:
        self.router.frames(self.identity, MESSAGE, dumps(message))

    async def cancel(self, request_id: str) -> None:
        with contextlib.suppress(LinkDown):
            self.router.frames(self.identity, CANCEL, request_id.encode())

    async def beat(self) -> None:
        self.router.frames(self.identity, BEAT, b"")

    def close(self) -> None:
        pass  # the node hears nothing more; its next message gets b"?"


class RouterTransport:
    """The ROUTER at ``bind`` serving ``bridge``. With ``keys`` it is a CURVE server whose ZAP
    handler lets in only the allowed node keys (every refusal logged); a node's message over
    ``max_frame`` bytes disconnects it."""

    def __init__(self, bridge: EdgeBridge, bind: str, *, keys: BridgeKeys | None, max_frame: int) -> None:
        self.bridge, self.bind, self.keys, self.max_frame = bridge, bind, keys, max_frame
        self.endpoint = bind
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._sock: FrameSocket | None = None
        self._auth: AsyncioAuthenticator | None = None
        self._monitor: FrameSocket | None = None
        self._refusal_logged = -LOG_EVERY

    def start(self) -> str:
        """Bind (`BusConnectionError` if the address is taken); the endpoint bound."""
        self._context = zmq.Context()
        if self.keys is not None:  # the ZAP handler first: without one, libzmq lets every key in
            self._auth = start_authenticator(self._context, self.keys)
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
        if self.keys is not None:
            curve_server(sock, self.keys)
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            self._monitor = FrameSocket(monitor, self._handshake_failed)
        try:
            sock.bind(self.bind)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            self.close()
            raise BusConnectionError(f"edge bridge cannot bind {self.bind}: {exc}") from exc
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = FrameSocket(sock, self._receive)
        return self.endpoint

    def close(self) -> None:
        """Close the socket, the monitor and the ZAP handler."""
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._monitor is not None:
                with contextlib.suppress(zmq.ZMQError):
                    sock.sock.disable_monitor()
            sock.close()
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._context is not None:
            self._context.term()
            self._context = None

    def frames(self, identity: bytes, kind: bytes, payload: bytes) -> None:
        """Send one frame to a node; `LinkDown` if it cannot be."""
        if self._sock is None:
            raise LinkDown("bridge closed")
        try:
            self._sock.send([identity, kind + payload])
        except zmq.ZMQError as exc:  # EHOSTUNREACH (gone), EAGAIN (not reading: its queue is full)
            raise LinkDown(str(exc)) from exc

    def _handshake_failed(self, frames: list[bytes]) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._refusal_logged < LOG_EVERY:  # a refused peer retries many times a second
            return
        with contextlib.suppress(Exception):
            event = parse_monitor_message(frames)
            self._refusal_logged = now
            log.warning("edge bridge refused a connection to %s: handshake failed (%s: not a CURVE "
                        "client of this bridge?)", event["endpoint"].decode(errors="replace"),
                        zmq.Event(event["event"]).name)

    def _receive(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            log.warning("refused a message of %d frames (expected identity + one)", len(frames))
            return
        identity, kind, payload = frames[0], frames[1][:1], frames[1][1:]
        bridge = self.bridge
        try:
            if kind == REGISTER:
                self._register(identity, payload)
            elif not bridge.knows(identity):
                if kind != BYE:
                    self.frames(identity, UNKNOWN, b"")
            elif kind == MESSAGE:
                bridge.deliver(identity, json.loads(payload))
            elif kind == BYE:
                bridge.detach(identity, "left")
            else:
                bridge.deliver(identity, {})
        except (ValueError, TypeError, AttributeError, RecursionError, LinkDown) as exc:
            log.warning("bad %r frame from %r: %s", kind, identity, exc)

    def _register(self, identity: bytes, payload: bytes) -> None:
        try:
            reg = _Registration.model_validate_json(payload)
        except ValidationError as exc:
            log.warning("refused registration from %r: %s", identity, exc)
            return
        self.bridge.attach(identity, _RouterLink(self, identity), name=reg.name, models=reg.models,
                           capacity=reg.capacity, transport="zmq")
        with contextlib.suppress(LinkDown):
            self.frames(identity, WELCOME, dumps({"heartbeat": self.bridge.heartbeat}))
