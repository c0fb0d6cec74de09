"""The reference edge LLM node: StackFlow units over a model (`EdgeUnits`), reachable from an
`EdgeBridge` through a ZeroMQ DEALER and from StackFlow clients over TCP (`EdgeNode`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
from pydantic import ValidationError

from shared.bus.edge.keys import CurveOption, NodeKeys, curve_client, node_keys
from shared.bus.edge.stackflow import (
    BEAT,
    BYE,
    CANCEL,
    MESSAGE,
    REGISTER,
    TEXT_FORMAT,
    UNIT,
    UNKNOWN,
    WELCOME,
    Action,
    ErrorCode,
    FrameSocket,
    Request,
    SetupData,
    StackFlowError,
    StreamAssembler,
    dumps,
    make_reply,
    parse_request,
    stream_data,
)
from shared.bus.errors import ConfigError, describe

from .models import Model, models_by_name, prompt_for

log = logging.getLogger("meetmesh.edge.node")
Send = Callable[[dict[str, Any]], Awaitable[None]]  # sends one reply to whoever asked


MAX_FRAME = 4 << 20  # bytes of one message from the bridge; more disconnects it
MAX_INPUT = 1 << 22  # characters of one streamed input, all chunks together; more gets -4


@dataclass(eq=False)
class Unit:
    """One instance made by ``setup`` (``llm.1001``): its setup, model, and whether it is paused.
    Streamed input is buffered per origin (connection), by index, whatever the chunks' request ids."""

    work_id: str
    setup: SetupData
    model: Model
    paused: bool = False
    inputs: dict[str, StreamAssembler] = field(default_factory=dict)  # by origin


@dataclass(eq=False)
class _Inference:
    unit: Unit
    task: asyncio.Task[None]


class EdgeUnits:
    """The StackFlow unit manager of one node: answers setup, inference (streamed or not), pause,
    work, exit and taskinfo for any transport, which passes each raw request to `handle` with a
    ``send`` for the replies and an ``origin`` naming the connection.

    ``capacity`` inferences run at once; later ones wait their turn, first come first served (as
    StackFlow's units take them one after another), up to ``max_waiting``; one more gets -4. A setup
    beyond ``max_units`` instances gets -21 (task full). A setup naming a model this node does not
    serve gets the node's first model, and its reply's ``data`` says which (``{"model": name}``).
    Bad input gets StackFlow's error reply; nothing else is disturbed.
    """

    def __init__(self, models: Sequence[Model], *, capacity: int = 1, max_units: int = 256,
                 max_waiting: int = 64, max_input: int = MAX_INPUT) -> None:
        if capacity < 1 or max_units < 1 or max_waiting < 0 or max_input < 1:
            raise ConfigError("capacity, max_units and max_input must be >= 1, max_waiting >= 0")
        if not models:
            raise ConfigError("a node needs at least one model")
        self.models: dict[str, Model] = models_by_name(models)
        self.default_model = models[0]
        self.capacity, self.max_units, self.max_waiting = capacity, max_units, max_waiting
        self.max_input = max_input
        self.units: dict[str, Unit] = {}
        self._next = 1001
        self._running: dict[tuple[str, str], _Inference] = {}  # (origin, request id): running or waiting
        self._slots = asyncio.Semaphore(capacity)
        self.served = 0

    @property
    def running(self) -> int:
        """Inferences running now (the first ``capacity`` accepted: slots are taken in order)."""
        return min(len(self._running), self.capacity)

    @property
    def waiting(self) -> int:
        """Inferences accepted and waiting for a slot."""
        return max(0, len(self._running) - self.capacity)

    async def handle(self, raw: bytes | str, send: Send, *, origin: str = "") -> None:
        """Answer one request (an inference's answer is streamed by a task of its own)."""
        request: Request | None = None
        try:
            request = parse_request(raw)
            await self._dispatch(request, send, origin)
        except StackFlowError as exc:
            await send(exc.reply())
        except Exception as exc:  # a bug here must not take the node down for everyone else
            log.exception("request %r failed", raw[:200])
            where = (request.request_id, request.work_id) if request is not None else ("0", "sys")
            await send(make_reply(*where, code=ErrorCode.UNIT_CALL, message=f"unit call false: {exc}"))

    async def _dispatch(self, req: Request, send: Send, origin: str) -> None:
        where = {"request_id": req.request_id, "work_id": req.work_id}
        unit_name = req.work_id.split(".", 1)[0]
        if unit_name == "sys" and req.action == Action.PING:
            await send(make_reply(req.request_id, req.work_id))
            return
        if unit_name != UNIT:  # StackFlow's unit manager finds no such unit to call
            raise StackFlowError(ErrorCode.UNIT_CALL, f"unit call false: no unit {unit_name!r} here "
                                 f"(this node runs {UNIT!r})", **where)
        if req.action == Action.SETUP:
            await send(self._setup(req))
            return
        if req.action == Action.TASKINFO and req.work_id == UNIT:
            await send(make_reply(req.request_id, UNIT, object="llm.tasklist", data=list(self.units)))
            return
        unit = self.units.get(req.work_id)
        if unit is None:
            raise StackFlowError(ErrorCode.UNIT_NOT_FOUND, f"unit {req.work_id!r} does not exist", **where)
        if req.action == Action.INFERENCE:
            self._inference(unit, req, send, origin)
            return
        if req.action == Action.TASKINFO:
            await send(make_reply(req.request_id, unit.work_id, object="llm.taskinfo", data=taskinfo(unit)))
            return
        if req.action in (Action.PAUSE, Action.EXIT):
            for key, job in list(self._running.items()):
                if job.unit is unit:
                    job.task.cancel()
                    self._running.pop(key, None)
            unit.paused = req.action == Action.PAUSE
            if req.action == Action.EXIT:
                del self.units[unit.work_id]
        elif req.action == Action.WORK:
            unit.paused = False
        await send(make_reply(req.request_id, unit.work_id))

    def _setup(self, req: Request) -> dict[str, Any]:
        where = {"request_id": req.request_id, "work_id": UNIT}
        try:
            setup = SetupData.model_validate(req.data)
        except ValidationError as exc:
            raise StackFlowError(ErrorCode.JSON_FORMAT, f"json format error: {describe(exc)}",
                                 **where) from exc
        if len(self.units) >= self.max_units:
            raise StackFlowError(ErrorCode.TASK_FULL, f"task full: {self.max_units} units", **where)
        model = self.models.get(setup.model)
        if model is None:
            model = self.default_model
            log.info("setup %s asked for model %r: serving %r", req.request_id, setup.model, model.name)
        work_id = f"{UNIT}.{self._next}"
        self._next += 1
        self.units[work_id] = Unit(work_id, setup, model)
        return make_reply(req.request_id, work_id, data={"model": model.name})

    def _inference(self, unit: Unit, req: Request, send: Send, origin: str) -> None:
        where = {"request_id": req.request_id, "work_id": unit.work_id}
        key = (origin, req.request_id)
        text: str | None
        if "stream" in req.object:
            if not isinstance(req.data, dict):
                if req.data in (None, "", "None"):
                    raise StackFlowError(ErrorCode.DATA_EMPTY, **where)
                raise StackFlowError(ErrorCode.JSON_FORMAT, "json format error: streamed data is "
                                     "{index, delta, finish}", **where)
            assembler = unit.inputs.setdefault(origin, StreamAssembler())
            try:
                text = assembler.add(req.data)
                if text is None and assembler.size > self.max_input:
                    raise StackFlowError(ErrorCode.PUSH_FAILED, "inference data push false: streamed "
                                         f"input over {self.max_input} characters")
            except StackFlowError as exc:
                unit.inputs.pop(origin, None)
                raise StackFlowError(exc.code, exc.message, **where) from exc
            if text is None:
                return  # more chunks to come; StackFlow does not answer them
            unit.inputs.pop(origin, None)
        else:
            text = req.data if isinstance(req.data, str) else None
            if text is None and req.data is not None:
                raise StackFlowError(ErrorCode.JSON_FORMAT, f"json format error: {TEXT_FORMAT} data is "
                                     "a string", **where)
        if not text or text == "None":  # StackFlow's "no data"
            raise StackFlowError(ErrorCode.DATA_EMPTY, **where)
        if unit.paused:
            raise StackFlowError(ErrorCode.PUSH_FAILED, "inference data push false: unit is paused", **where)
        if key in self._running:
            raise StackFlowError(ErrorCode.PUSH_FAILED, "inference data push false: request "
                                 f"{req.request_id!r} is already running", **where)
        if len(self._running) >= self.capacity + self.max_waiting:
            raise StackFlowError(ErrorCode.PUSH_FAILED, f"inference data push false: {self.capacity} "
                                 f"running and {self.waiting} waiting", **where)
        job = _Inference(unit, asyncio.create_task(self._generate(unit, key, text, send)))
        self._running[key] = job

    def _release(self, key: tuple[str, str]) -> None:
        # In the step that sends the last reply, not in a done callback a loop pass later: by then the
        # caller may have sent its next request, and found the slot still taken.
        job = self._running.get(key)
        if job is not None and job.task is asyncio.current_task():
            del self._running[key]

    async def _generate(self, unit: Unit, key: tuple[str, str], text: str, send: Send) -> None:
        await self._slots.acquire()  # FIFO: asyncio wakes waiters in order
        held = True

        def free() -> None:
            nonlocal held
            if held:
                held = False
                self._slots.release()
            self._release(key)

        try:
            await self._answer(unit, key, text, send, free)
        finally:
            free()

    async def _answer(self, unit: Unit, key: tuple[str, str], text: str, send: Send,
                      free: Callable[[], None]) -> None:
        setup, fmt, request_id = unit.setup, unit.setup.response_format, key[1]
        index, parts = 0, []
        try:
            prompt = prompt_for(unit.model, setup, text)
            stream = unit.model.stream(prompt, max_tokens=setup.max_token_len)
            try:
                async for delta in stream:
                    if setup.stream:
                        data = stream_data(index, delta)
                        await send(make_reply(request_id, unit.work_id, object=fmt, data=data))
                        index += 1
                    else:
                        parts.append(delta)
            finally:
                closer = getattr(stream, "aclose", None)
                if closer is not None:
                    await closer()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("unit %s: model %s failed: %s", unit.work_id, unit.model.name, exc)
            free()
            with contextlib.suppress(Exception):
                await send(make_reply(request_id, unit.work_id, code=ErrorCode.MODEL_RUN,
                                      message=f"model run failed: {exc}"))
            return
        self.served += 1
        free()
        last: Any = stream_data(index, "", True) if setup.stream else "".join(parts)
        await send(make_reply(request_id, unit.work_id, object=fmt, data=last))

    def cancel(self, origin: str, request_id: str | None = None) -> int:
        """Stop the inferences ``origin`` asked for (just ``request_id``, if given); how many stopped."""
        stopped = 0
        for key, job in list(self._running.items()):
            if key[0] == origin and (request_id is None or key[1] == request_id):
                job.task.cancel()
                self._running.pop(key, None)
                stopped += 1
        if request_id is None:
            for unit in self.units.values():
                unit.inputs.pop(origin, None)
        return stopped

    async def close(self) -> None:
        """Stop every inference, running or waiting."""
        tasks = [job.task for job in self._running.values()]
        self._running.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def taskinfo(unit: Unit) -> dict[str, Any]:
    """``taskinfo`` of a unit, with StackFlow's field names (``model``, ``response_format``,
    ``enoutput``, ``inputs``); then MeetMesh's own. ``model`` is the model served."""
    setup = unit.setup
    inputs = [setup.input] if isinstance(setup.input, str) else list(setup.input)
    return {"model": unit.model.name, "response_format": setup.response_format, "enoutput": setup.enoutput,
            "inputs": inputs, "max_token_len": setup.max_token_len, "prompt": setup.prompt,
            "template": setup.template, "language": setup.language, "paused": unit.paused}


class EdgeNode:
    """An edge node: `EdgeUnits` served to a bridge at ``connect`` (ZeroMQ DEALER; it registers with
    its models and capacity, heartbeats, and reconnects with a fresh identity when the bridge goes
    silent for ``missed`` beats) and, if ``stackflow_port`` is set, to StackFlow TCP clients.

    ``curve``: "env" (the default) takes the node's CURVE key pair and the bridge's public key from
    settings (`edge_keys`; outside development mode, none is a `ConfigError` when `run` starts);
    `NodeKeys` gives them; "off" talks to the bridge plain on purpose."""

    def __init__(self, units: EdgeUnits, *, connect: str | None = "tcp://127.0.0.1:5555",
                 name: str | None = None, heartbeat: float = 1.0, missed: int = 3,
                 stackflow_host: str = "127.0.0.1", stackflow_port: int | None = None,
                 curve: NodeKeys | CurveOption = "env") -> None:
        if heartbeat <= 0 or missed < 1:
            raise ConfigError("heartbeat must be > 0 and missed >= 1")
        self.curve = curve
        self.keys: NodeKeys | None = None  # once running: the CURVE keys in use (None: plain)
        self.units, self.connect = units, connect
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.heartbeat, self.missed = heartbeat, missed
        self.stackflow_host, self.stackflow_port = stackflow_host, stackflow_port
        self.registered = asyncio.Event()
        self.connections = 0  # bridge connections made (1 + reconnects)
        self._beat, self._heard = heartbeat, 0.0  # the agreed interval; when the bridge last spoke
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Ask `run` to return."""
        self._stopping.set()

    async def run(self, *, ready: Callable[[EdgeNode], None] | None = None) -> None:
        """Serve until `stop` (then stop running inferences and close everything)."""
        from shared.bus.edge.stackflow_tcp import StackFlowServer

        if self.connect:
            if self.curve == "env":
                self.keys = node_keys()
            elif self.curve != "off":
                self.keys = self.curve
        server = None
        if self.stackflow_port is not None:
            server = StackFlowServer(self.units, self.stackflow_host, self.stackflow_port)
            await server.start()
            self.stackflow_port = server.port
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        link = asyncio.create_task(self._bridge_link(context)) if self.connect else None
        if ready is not None:
            ready(self)
        try:
            await self._stopping.wait()
        finally:
            if link is not None:
                link.cancel()
                await asyncio.gather(link, return_exceptions=True)
            if server is not None:
                await server.close()
            await self.units.close()
            context.term()

    async def _bridge_link(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        assert self.connect is not None
        while True:
            identity = f"{self.name}/{uuid.uuid4().hex[:8]}"
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, identity.encode())
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
            if self.keys is not None:
                curve_client(sock, self.keys)
            try:
                sock.connect(self.connect)
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                raise ConfigError(f"cannot connect to the bridge at {self.connect}: {exc}") from exc
            inbox: asyncio.Queue[list[bytes]] = asyncio.Queue()
            link = FrameSocket(sock, inbox.put_nowait)
            self.connections += 1
            linger = 0
            try:
                await self._session(link, inbox, identity)
            except asyncio.CancelledError:
                linger = 200  # stopping: let the goodbye out
                raise
            finally:
                self.registered.clear()
                self.units.cancel(identity)
                with contextlib.suppress(zmq.ZMQError):
                    link.send([BYE])
                link.close(linger)

    async def _session(self, link: FrameSocket, inbox: asyncio.Queue[list[bytes]], identity: str) -> None:
        """One connection to the bridge; returns when the bridge has been silent too long."""
        loop = asyncio.get_running_loop()
        registration = dumps({"name": self.name, "models": sorted(self.units.models),
                              "capacity": self.units.capacity, "pid": os.getpid()})
        self._beat, self._heard = self.heartbeat, loop.time()

        async def send(message: dict[str, Any]) -> None:
            try:
                link.send([MESSAGE + dumps(message)])
            except zmq.ZMQError as exc:  # closed (replaced), or the bridge stopped reading
                log.debug("reply to %s dropped: %s", message.get("request_id"), exc)

        link.send([REGISTER + registration])
        receiving = asyncio.create_task(self._receive(link, inbox, identity, registration, send))
        try:
            while not receiving.done():
                silent = loop.time() - self._heard
                if silent > self._beat * self.missed:
                    hint = "" if self.registered.is_set() or self.keys is None else (
                        " (never welcomed: is this node's CURVE key among the bridge's allowed keys, and "
                        "the bridge's public key the right one?)")
                    log.warning("bridge %s silent for %.1fs: reconnecting%s", self.connect, silent, hint)
                    return
                with contextlib.suppress(zmq.ZMQError):
                    link.send([BEAT + dumps({"running": self.units.running})])
                await asyncio.wait([receiving], timeout=self._beat)
            receiving.result()  # it only ends by raising
        finally:
            receiving.cancel()
            await asyncio.gather(receiving, return_exceptions=True)

    async def _receive(self, link: FrameSocket, inbox: asyncio.Queue[list[bytes]], identity: str,
                       registration: bytes, send: Send) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frames = await inbox.get()
            self._heard = loop.time()
            kind, payload = frames[0][:1], frames[0][1:]
            if kind == MESSAGE:
                await self.units.handle(payload, send, origin=identity)
            elif kind == CANCEL:
                self.units.cancel(identity, payload.decode(errors="replace"))
            elif kind == WELCOME:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    self._beat = float(json.loads(payload).get("heartbeat", self._beat))
                self.registered.set()
            elif kind == UNKNOWN:  # the bridge lost us (restarted, or judged us dead)
                self.registered.clear()
                self.units.cancel(identity)
                with contextlib.suppress(zmq.ZMQError):
                    link.send([REGISTER + registration])
