"""The edge inference bridge: StackFlow LLM nodes that come and go, made into one reliable pool.

Nodes connect a ZeroMQ DEALER to the bridge's ROUTER (`edge_router`; frames: `stackflow`); a
StackFlow unit manager reached over TCP joins the same pool (`EdgeBridge.add_stackflow`). Either
transport hands the bridge its nodes through `attach`, `deliver` and `detach`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError
from .keys import BridgeKeys, CurveOption, bridge_keys
from .stackflow import (
    STREAM_FORMAT,
    TEXT_FORMAT,
    UNIT,
    EdgeBadReply,
    EdgeBusy,
    EdgeStreamBroken,
    EdgeTimeout,
    EdgeUnavailable,
    ErrorCode,
    SetupData,
    StackFlowError,
    Template,
    error_for,
)

if TYPE_CHECKING:
    from .router import RouterTransport

log = logging.getLogger("meetmesh.edge")


class LinkDown(Exception):
    """Raised by a `NodeLink` that cannot reach its node (internal: the bridge then drops the node)."""


class NodeLink(Protocol):
    """How the bridge talks to one node (ZeroMQ here; StackFlow TCP in `stackflow_tcp`)."""

    async def send(self, message: dict[str, Any]) -> None:
        """Send one StackFlow request; `LinkDown` if the node cannot be reached."""
        ...

    async def cancel(self, request_id: str) -> None:
        """Ask the node to stop an inference (best effort)."""
        ...

    async def beat(self) -> None:
        """Send a heartbeat; the node's next message of any kind counts as its answer."""
        ...

    def close(self) -> None:
        """The bridge dropped the node: release the connection."""
        ...


@dataclass
class NodeInfo:
    """One live node, as `EdgeBridge.nodes` shows it."""

    key: str
    name: str
    models: list[str]
    capacity: int
    inflight: int
    served: int
    units: int
    silent_s: float
    transport: str


@dataclass
class EdgeStats:
    """Counters since start, and the live nodes."""

    requests: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    busy: int = 0
    timeouts: int = 0
    bad_replies: int = 0
    broken_streams: int = 0
    nodes_joined: int = 0
    nodes_lost: int = 0
    nodes: list[NodeInfo] = field(default_factory=list)


@dataclass(eq=False)
class _Unit:
    work_id: asyncio.Future[str]
    users: int = 0


@dataclass(eq=False)
class _Node:
    key: bytes
    name: str
    models: frozenset[str]
    capacity: int
    link: NodeLink
    transport: str
    last_seen: float
    inflight: int = 0
    served: int = 0
    picked: int = 0
    alive: bool = True
    beating: asyncio.Task[None] | None = None
    calls: set[str] = field(default_factory=set)
    units: OrderedDict[SetupData, _Unit] = field(default_factory=OrderedDict)


@dataclass(eq=False)
class _Call:
    request_id: str
    node: _Node
    queue: asyncio.Queue[Any]
    timer: asyncio.TimerHandle


# A node's answers that move a request to another node (nothing streamed yet): full (-21), its
# waiting line full (-4), or the unit forgotten (-6: set up again elsewhere).
_MOVE_ON = frozenset({ErrorCode.TASK_FULL, ErrorCode.PUSH_FAILED, ErrorCode.UNIT_NOT_FOUND})
_LOST = object()     # put in a call's queue when its node is dropped
_EXPIRED = object()  # ... when its deadline passes


class EdgeBridge:
    """The AI service's way to the edge LLM nodes.

    Binds a ROUTER at ``bind`` (``tcp://host:*`` picks a free port: see `endpoint`). Nodes register
    with their models and capacity; each side beats every ``heartbeat`` seconds and a node silent for
    ``missed`` beats is dropped. A request goes to the least-loaded live node serving its model; if
    that node dies (or says it is full) before any token reached the caller, the request moves to
    another node; after that it fails with `EdgeStreamBroken`. Every node full: `EdgeBusy` (-21);
    none serving the model: `EdgeUnavailable`; over ``request_timeout`` seconds: `EdgeTimeout`.

    ``curve``: "env" (the default) takes the CURVE keys from settings (`edge_keys`; outside
    development mode, no keys is a `ConfigError` at `start`); `BridgeKeys` gives them; "off" runs
    plain on purpose (tests, benchmarks). A node whose key is not allowed is refused and logged.
    A node's message over ``max_frame`` bytes disconnects it.

    A node that breaks the protocol (a reply that is not StackFlow's, stream chunks out of order,
    more than the setup's ``max_token_len`` tokens or ``max_output`` characters) fails the request
    with `EdgeBadReply` (tried on another node if nothing was streamed yet) and is told to stop;
    one that never answers runs into the deadline (`EdgeTimeout`).
    """

    def __init__(self, bind: str = "tcp://127.0.0.1:5555", *, heartbeat: float = 1.0, missed: int = 3,
                 request_timeout: float = 120.0, max_units_per_node: int = 16,
                 max_frame: int = 4 << 20, max_output: int = 1 << 20,
                 curve: BridgeKeys | CurveOption = "env") -> None:
        if (heartbeat <= 0 or missed < 1 or request_timeout <= 0 or max_units_per_node < 1
                or max_frame < 1024 or max_output < 1):
            raise ConfigError("heartbeat and request_timeout must be > 0, missed, max_units_per_node and "
                              "max_output >= 1, max_frame >= 1024")
        self.max_frame, self.max_output = max_frame, max_output
        self.bind, self.heartbeat, self.missed = bind, heartbeat, missed
        self.request_timeout, self.max_units_per_node = request_timeout, max_units_per_node
        self.endpoint = bind
        self.curve = curve
        self.keys: BridgeKeys | None = None  # once started: the CURVE keys in use (None: plain)
        self._stats = EdgeStats()
        self._nodes: dict[bytes, _Node] = {}
        self._calls: dict[str, _Call] = {}
        self._ids = itertools.count(1)
        self._prefix = f"mm{uuid.uuid4().hex[:6]}-"
        self._picks = itertools.count(1)
        self._changed = asyncio.Event()
        self._router: RouterTransport | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> EdgeBridge:
        """Bind and start serving nodes: `ConfigError` without CURVE keys outside development mode
        (see `edge_keys`), `BusConnectionError` if the address is taken."""
        from .router import RouterTransport

        if self.curve == "env":
            self.keys = bridge_keys()
        elif self.curve == "off":
            log.warning("edge bridge %s runs without CURVE (curve='off'): any process that connects "
                        "is taken for a node", self.bind)
        else:
            self.keys = self.curve
        router = RouterTransport(self, self.bind, keys=self.keys, max_frame=self.max_frame)
        self.endpoint = router.start()
        self._router = router
        self._tasks = [asyncio.create_task(self._heartbeats())]
        log.info("edge bridge at %s (%s)", self.endpoint, "CURVE, nodes' keys from "
                 f"{self.keys.allowed_dir}" if self.keys else "plain: no CURVE")
        return self

    async def close(self) -> None:
        """Drop every node (failing what is in flight) and close the socket."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        router, self._router = self._router, None
        for node in list(self._nodes.values()):
            self._lose(node, "bridge closed")
        if router is not None:
            router.close()

    async def __aenter__(self) -> EdgeBridge:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the registry --------------------------------------------------------------------------

    def attach(self, key: bytes, link: NodeLink, *, name: str, models: list[str], capacity: int,
               transport: str) -> None:
        """Add a node (replacing one of the same key). Transports call this; so can tests."""
        if (old := self._nodes.get(key)) is not None:
            self._lose(old, "registered again")
        loop = asyncio.get_running_loop()
        self._nodes[key] = _Node(key, name, frozenset(models), capacity, link, transport, loop.time())
        self._stats.nodes_joined += 1
        self._changed.set()
        log.info("edge node %s joined: models %s, capacity %d (%s)", name, models, capacity, transport)

    def knows(self, key: bytes) -> bool:
        """Whether a live node has this key."""
        return key in self._nodes

    def detach(self, key: bytes, reason: str) -> None:
        """Drop a node: its requests in flight are retried elsewhere or failed."""
        if (node := self._nodes.get(key)) is not None:
            self._lose(node, reason)

    def deliver(self, key: bytes, message: dict[str, Any]) -> None:
        """A node's reply (or any sign of life, with ``message`` empty) arrived."""
        node = self._nodes.get(key)
        if node is None:
            return
        node.last_seen = asyncio.get_running_loop().time()
        call = self._calls.get(str(message.get("request_id", ""))) if message else None
        if call is not None and call.node is node:
            call.queue.put_nowait(message)

    def _lose(self, node: _Node, reason: str) -> None:
        if self._nodes.get(node.key) is node:
            del self._nodes[node.key]
        if not node.alive:
            return
        node.alive = False
        self._stats.nodes_lost += 1
        quiet = self._router is None or reason == "left"
        log.log(logging.INFO if quiet else logging.WARNING, "edge node %s dropped: %s "
                "(%d requests in flight)", node.name, reason, len(node.calls))
        for request_id in node.calls:
            self._calls[request_id].queue.put_nowait(_LOST)
        if node.beating is not None and node.beating is not asyncio.current_task():
            node.beating.cancel()
        node.link.close()
        self._changed.set()

    def nodes(self, model: str | None = None) -> list[NodeInfo]:
        """The live nodes (serving ``model``, if given)."""
        now = asyncio.get_running_loop().time()
        return [NodeInfo(n.key.decode(errors="replace"), n.name, sorted(n.models), n.capacity, n.inflight,
                         n.served, len(n.units), round(now - n.last_seen, 3), n.transport)
                for n in self._nodes.values() if model is None or model in n.models]

    async def wait_for_nodes(self, count: int = 1, *, model: str | None = None,
                             timeout: float = 10.0) -> None:
        """Until at least ``count`` live nodes serve ``model`` (any model if None); `EdgeTimeout` if not."""
        async def enough() -> None:
            while len(self.nodes(model)) < count:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            raise EdgeTimeout(message=f"fewer than {count} edge nodes serving {model or 'any model'} "
                              f"after {timeout}s") from None

    def stats(self) -> EdgeStats:
        """Counters and live nodes, now."""
        return EdgeStats(**{**self._stats.__dict__, "nodes": self.nodes()})

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        while True:
            await asyncio.sleep(self.heartbeat / 4)  # dead nodes are noticed within a quarter beat
            now = loop.time()
            beat = now >= next_beat
            if beat:
                next_beat = now + self.heartbeat
            for node in list(self._nodes.values()):
                if now - node.last_seen > self.heartbeat * self.missed:
                    self._lose(node, f"missed {self.missed} heartbeats")
                elif beat and (node.beating is None or node.beating.done()):
                    # a task each: a link slow to take its beat (TCP) delays no other node's
                    node.beating = asyncio.create_task(self._beat(node))

    async def _beat(self, node: _Node) -> None:
        try:
            await node.link.beat()
        except LinkDown as exc:
            self._lose(node, f"unreachable: {exc}")

    async def add_stackflow(self, host: str, port: int = 10001, *, models: list[str], capacity: int = 1,
                            name: str | None = None) -> None:
        """Use a StackFlow unit manager at ``host:port`` (JSON over TCP) as one more node, serving
        ``models`` with ``capacity`` inferences at once; reconnects while the bridge runs."""
        from .stackflow_tcp import StackFlowBackend

        backend = StackFlowBackend(self, host, port, models=models, capacity=capacity, name=name)
        self._tasks.append(asyncio.create_task(backend.run()))

    # -- requests ------------------------------------------------------------------------------

    async def infer(self, model: str, prompt: str, *, max_tokens: int = 256, task: Template = "chat",
                    system: str = "", language: str = "English", stream: bool = True,
                    timeout: float | None = None) -> AsyncIterator[str]:
        """Run ``prompt`` through ``model`` under the ``task``'s prompt template, yielding text deltas
        (one, the whole answer, with ``stream=False``). Raises a `StackFlowError`: `EdgeBusy` (-21:
        every node full, i.e. rate-limited), `EdgeUnavailable`, `EdgeTimeout`, `EdgeStreamBroken`."""
        setup = SetupData(model=model, response_format=STREAM_FORMAT if stream else TEXT_FORMAT,
                          max_token_len=max_tokens, prompt=system, template=task, language=language)
        async for delta in self.request(setup, prompt, timeout=timeout):
            yield delta

    async def complete(self, model: str, prompt: str, **options: Any) -> str:
        """The whole answer of `infer` (same arguments) as one string."""
        return "".join([delta async for delta in self.infer(model, prompt, **options)])

    def _pick(self, model: str, tried: set[_Node]) -> _Node:
        serving = [n for n in self._nodes.values() if model in n.models]
        free = [n for n in serving if n not in tried and n.inflight < n.capacity]
        if not free:
            if serving:
                self._stats.busy += 1
                raise EdgeBusy(message=f"task full: all {len(serving)} edge nodes serving {model!r} are busy")
            raise EdgeUnavailable(message=f"no live edge node serves {model!r}")
        node = min(free, key=lambda n: (n.inflight / n.capacity, n.inflight, n.picked))
        node.picked = next(self._picks)
        return node

    def _open(self, node: _Node, deadline: float) -> _Call:
        """A request id of ours, and the queue its replies (or _LOST, or _EXPIRED at deadline) go to."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        call = _Call(f"{self._prefix}{next(self._ids)}", node, queue,
                     asyncio.get_running_loop().call_at(deadline, queue.put_nowait, _EXPIRED))
        self._calls[call.request_id] = call
        node.calls.add(call.request_id)
        return call

    def _shut(self, call: _Call) -> None:
        call.timer.cancel()
        self._calls.pop(call.request_id, None)
        call.node.calls.discard(call.request_id)

    async def _next(self, call: _Call) -> dict[str, Any]:
        """The call's next reply; its error raised; `EdgeBadReply` if it is not a StackFlow reply."""
        item = await call.queue.get()
        if item is _EXPIRED:
            raise EdgeTimeout(message="edge request timed out")
        if item is _LOST:
            raise LinkDown("node lost")
        assert isinstance(item, dict)
        error = item.get("error")
        if error is not None:
            code = error.get("code", 0) if isinstance(error, dict) else None
            if not isinstance(code, int) or isinstance(code, bool):
                raise self._bad(call.node, f"an error that is not {{code, message}}: {str(error)[:100]!r}")
            if code:
                assert isinstance(error, dict)
                raise error_for(code, str(error.get("message", ""))[:1000])
        return item

    def _bad(self, node: _Node, what: str) -> EdgeBadReply:
        self._stats.bad_replies += 1
        log.warning("edge node %s broke the protocol: %s", node.name, what)
        return EdgeBadReply(message=f"edge node {node.name} broke the protocol: {what}")

    async def _unit(self, node: _Node, setup: SetupData, deadline: float) -> _Unit:
        """The node's instance for ``setup`` (made by one ``setup`` call, then reused)."""
        unit = node.units.get(setup)
        if unit is None:
            unit = node.units[setup] = _Unit(asyncio.get_running_loop().create_future())
            call = self._open(node, deadline)
            try:
                await node.link.send({"request_id": call.request_id, "work_id": UNIT, "action": "setup",
                                      "object": "llm.setup", "data": setup.model_dump(mode="json")})
                reply = await self._next(call)
                work_id = reply.get("work_id")
                if not isinstance(work_id, str) or not work_id or len(work_id) > 200:
                    raise self._bad(node, f"a setup answered with work_id {str(work_id)[:100]!r}")
                unit.work_id.set_result(work_id)
            except BaseException as exc:
                node.units.pop(setup, None)
                # waiters for this unit try another node (or time out, or find it gone, as we did)
                unit.work_id.set_exception(exc if isinstance(exc, StackFlowError | LinkDown) else
                                           StackFlowError(ErrorCode.UNIT_NOT_FOUND, "setup abandoned"))
                unit.work_id.exception()  # retrieved: each waiter raises it itself
                raise
            finally:
                self._shut(call)
            self._evict(node)
        elif not unit.work_id.done():  # another request is setting it up
            left = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(asyncio.shield(unit.work_id), left)
            except TimeoutError:
                raise EdgeTimeout(message="edge request timed out in setup") from None
        else:
            node.units.move_to_end(setup)
        return unit

    def _evict(self, node: _Node) -> None:
        """Keep at most max_units_per_node idle instances per node; exit the oldest idle ones."""
        idle = [(s, u) for s, u in node.units.items() if u.users == 0 and u.work_id.done()]
        for setup, unit in idle[: max(0, len(node.units) - self.max_units_per_node)]:
            del node.units[setup]
            if not unit.work_id.exception():
                message = {"request_id": f"{self._prefix}exit", "work_id": unit.work_id.result(),
                           "action": "exit", "object": "None", "data": "None"}
                task = asyncio.create_task(node.link.send(message))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def request(self, setup: SetupData, text: str, *, timeout: float | None = None
                      ) -> AsyncIterator[str]:
        """The StackFlow call under `infer`: ``text`` through a unit set up with ``setup`` (any
        response_format, prompt, template, max_token_len), yielding text deltas. Each node gets one
        ``setup`` per distinct ``setup``, reused by later requests; then one ``inference`` each."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.request_timeout)
        tried: set[_Node] = set()
        streamed = 0
        self._stats.requests += 1
        try:
            last_error: EdgeBadReply | None = None
            while True:
                try:
                    node = self._pick(setup.model, tried)
                except (EdgeBusy, EdgeUnavailable):
                    if last_error is not None:
                        raise last_error from None
                    raise
                tried.add(node)
                node.inflight += 1
                call, unit, finished = None, None, False
                try:
                    unit = await self._unit(node, setup, deadline)
                    unit.users += 1
                    call = self._open(node, deadline)
                    await node.link.send({"request_id": call.request_id, "work_id": unit.work_id.result(),
                                          "action": "inference", "object": TEXT_FORMAT, "data": text})
                    index = tokens = size = 0
                    while not finished:
                        data = (await self._next(call)).get("data")
                        if isinstance(data, dict):  # a stream chunk: {index, delta, finish}
                            delta, finished, at = data.get("delta", ""), data.get("finish", False), \
                                data.get("index", index)
                            if not isinstance(delta, str) or not isinstance(finished, bool):
                                raise self._bad(node, f"a stream chunk that is not {{index, delta, finish}}: "
                                                f"{str(data)[:100]!r}")
                            if at != index or isinstance(at, bool):
                                raise self._bad(node, f"stream chunk {str(at)[:20]} where {index} was due")
                            index += 1
                        elif isinstance(data, str):  # the whole answer
                            finished, delta = True, data
                        else:
                            raise self._bad(node, f"data that is neither text nor a stream chunk: "
                                            f"{str(data)[:100]!r}")
                        if delta:
                            tokens, size = tokens + 1, size + len(delta)
                            if tokens > setup.max_token_len and setup.stream:
                                raise self._bad(node, f"more than max_token_len={setup.max_token_len} "
                                                "tokens streamed")
                            if size > self.max_output:
                                raise self._bad(node, f"more than {self.max_output} characters of answer")
                            streamed += 1
                            yield delta
                    node.served += 1
                    self._stats.completed += 1
                    return
                except LinkDown as exc:
                    self._lose(node, str(exc))
                    if streamed:
                        self._stats.broken_streams += 1
                        raise EdgeStreamBroken(message=f"edge node {node.name} died after {streamed} tokens "
                                               "were streamed; not retried") from None
                    self._stats.retried += 1
                except EdgeBadReply as exc:
                    if streamed:
                        raise
                    last_error = exc  # tried elsewhere; if there is nowhere else, this is the answer
                    self._stats.retried += 1
                except StackFlowError as exc:
                    if streamed or exc.code not in _MOVE_ON:
                        raise
                    if exc.code == ErrorCode.UNIT_NOT_FOUND:
                        node.units.pop(setup, None)  # the node forgot the unit: set up again elsewhere
                    self._stats.retried += 1
                finally:
                    node.inflight -= 1
                    if unit is not None:
                        unit.users -= 1
                    if call is not None:
                        self._shut(call)
                        if not finished and node.alive:
                            await node.link.cancel(call.request_id)
        except StackFlowError as exc:
            self._stats.failed += 1
            self._stats.timeouts += isinstance(exc, EdgeTimeout)
            raise
