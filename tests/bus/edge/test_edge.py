"""The edge bridge and the reference node, with the deterministic echo model.

One StackFlow conversation suite runs against both of the node's transports (ZeroMQ, as the bridge
speaks it, and StackFlow TCP from a plain socket). Nodes are in-process where nothing is killed and
``meetmesh edge-node`` child processes where one is SIGKILLed or SIGSTOPped. No timing assertions:
waits are generous deadlines, never measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import zmq
import zmq.asyncio
from typer.testing import CliRunner

from edge_node.models import EchoModel
from edge_node.node import EdgeNode, EdgeUnits
from meetmesh.edge import register
from shared.bus.edge.pool import EdgeBridge
from shared.bus.edge.stackflow import (
    EdgeBusy,
    EdgeStreamBroken,
    EdgeTimeout,
    EdgeUnavailable,
    ErrorCode,
    make_reply,
    to_handler_signal,
)
from shared.bus.edge.stackflow_tcp import JsonFramer, StackFlowServer
from shared.bus.errors import RateLimited

ROOT = Path(__file__).resolve().parents[3]
BEAT = 0.3           # the bridge's heartbeat in these tests: a node silent for 3 beats is dropped
WAIT = 20.0          # generous deadline for anything to happen
WORDS = "one two three four five six seven eight"


@pytest.fixture(autouse=True)
def plain_dev_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Development mode, no CURVE keys: bridge and nodes (child processes too) talk plain ZeroMQ.
    CURVE has its own tests (test_edge_curve.py)."""
    monkeypatch.setenv("MEETMESH_ENV", "dev")
    for variable in ("SERVER_SECRET_KEY", "CLIENT_KEYS_DIR", "NODE_SECRET_KEY", "SERVER_PUBLIC_KEY"):
        monkeypatch.delenv(f"MEETMESH_EDGE_{variable}", raising=False)


async def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def open_bridge(**options: Any) -> AsyncIterator[EdgeBridge]:
    options = {"heartbeat": BEAT, "request_timeout": WAIT, **options}
    async with EdgeBridge(options.pop("bind", "tcp://127.0.0.1:*"), **options) as bridge:
        yield bridge


@contextlib.asynccontextmanager
async def run_node(connect: str | None, name: str = "n", *, capacity: int = 1, delay: float = 0.0,
                   stackflow_port: int | None = None) -> AsyncIterator[EdgeNode]:
    """An in-process node serving the echo model."""
    node = EdgeNode(EdgeUnits([EchoModel(delay=delay)], capacity=capacity), connect=connect, name=name,
                    stackflow_port=stackflow_port)
    started = asyncio.Event()
    task = asyncio.create_task(node.run(ready=lambda _: started.set()))
    await asyncio.wait_for(started.wait(), WAIT)
    try:
        yield node
    finally:
        node.stop()
        await asyncio.wait_for(task, WAIT)


class NodeProcess:
    """``meetmesh edge-node`` (echo model) in its own process group."""

    def __init__(self, connect: str, name: str, *, capacity: int = 1, delay: float = 0.0,
                 stackflow_port: int = 0, log: Path) -> None:
        self.name, self.log = name, log
        argv = [sys.executable, "-m", "meetmesh.edge", "edge-node", "--connect", connect, "--model",
                "echo", "--name", name, "--capacity", str(capacity), "--token-delay", str(delay),
                "--stackflow-port", str(stackflow_port), "--heartbeat", str(BEAT)]
        with log.open("wb") as err:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.proc.wait(WAIT)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    started: list[NodeProcess] = []

    def start(connect: str, name: str, **options: Any) -> NodeProcess:
        started.append(NodeProcess(connect, name, log=tmp_path / f"{name}.log", **options))
        return started[-1]

    yield start
    for node in started:
        node.stop()


def inflight(bridge: EdgeBridge) -> dict[str, int]:
    return {n.name: n.inflight for n in bridge.nodes()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the StackFlow conversation, over each transport of the node -----------------------------------

class TcpClient:
    """A plain blocking socket, as StackFlow's own clients are (driven from a thread)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.lines = self.sock.makefile("rb")

    async def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        await asyncio.to_thread(self.sock.sendall, data + b"\n")

    async def recv(self) -> dict[str, Any]:
        line = await asyncio.to_thread(self.lines.readline)
        assert line, "connection closed"
        return dict(json.loads(line))

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


class ZmqClient:
    """A bare ROUTER standing in for the bridge: frames as the bridge sends them."""

    def __init__(self) -> None:
        self.context = zmq.asyncio.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.peer = b""

    async def accept(self, heartbeat: float = 10.0) -> dict[str, Any]:
        """Wait for a registration (skipping heartbeats); welcome it with ``heartbeat``."""
        frame = b""
        while not frame.startswith(b"R"):
            ident, frame = await asyncio.wait_for(self.sock.recv_multipart(), WAIT)
        self.peer = ident
        await self.sock.send_multipart([ident, b"W" + json.dumps({"heartbeat": heartbeat}).encode()])
        return dict(json.loads(frame[1:]))

    async def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        await self.sock.send_multipart([self.peer, b"M" + data])

    async def recv(self) -> dict[str, Any]:
        while True:
            ident, frame = await asyncio.wait_for(self.sock.recv_multipart(), WAIT)
            if frame.startswith(b"M") and ident == self.peer:
                return dict(json.loads(frame[1:]))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


Client = TcpClient | ZmqClient


@pytest.fixture(params=["zmq", "tcp"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Client, EdgeNode]]:
    """A node (echo, capacity 2) and a client on one of its transports."""
    if request.param == "zmq":
        zc = ZmqClient()
        async with run_node(zc.endpoint, capacity=2, delay=0.01) as node:
            registration = await zc.accept()
            assert registration["models"] == ["echo"] and registration["capacity"] == 2
            yield zc, node
        zc.close()
    else:
        async with run_node(None, capacity=2, delay=0.01, stackflow_port=0) as node:
            assert node.stackflow_port
            tc = TcpClient(node.stackflow_port)
            yield tc, node
            tc.close()


def setup_request(request_id: str, model: str = "echo", fmt: str = "llm.utf-8.stream") -> dict[str, Any]:
    return {"request_id": request_id, "work_id": "llm", "action": "setup", "object": "llm.setup",
            "data": {"model": model, "response_format": fmt, "input": "llm.utf-8", "enoutput": True,
                     "max_token_len": 64, "prompt": "You are a helpful assistant."}}


def call(request_id: str, work_id: str, action: str, object: str = "None", data: Any = "None"
         ) -> dict[str, Any]:
    return {"request_id": request_id, "work_id": work_id, "action": action, "object": object, "data": data}


async def setup(client: Client, fmt: str = "llm.utf-8.stream") -> str:
    await client.send(setup_request("s", fmt=fmt))
    reply = await client.recv()
    assert reply["error"] == {"code": 0, "message": ""}, reply
    return str(reply["work_id"])


async def test_setup_streamed_inference_taskinfo_and_exit(client: tuple[Client, EdgeNode]) -> None:
    c, _ = client
    work_id = await setup(c)
    assert work_id == "llm.1001"
    # streamed input, out of order, assembled by index; streamed answer
    for index, delta, finish in [(1, "edge world", False), (0, "hello ", False), (2, "", True)]:
        await c.send(call("2", work_id, "inference", "llm.utf-8.stream",
                          {"index": index, "delta": delta, "finish": finish}))
    replies = [await c.recv()]
    while not replies[-1]["data"]["finish"]:
        replies.append(await c.recv())
    assert all(r["request_id"] == "2" and r["work_id"] == work_id and r["object"] == "llm.utf-8.stream"
               and r["error"]["code"] == 0 for r in replies)
    assert [r["data"]["index"] for r in replies] == list(range(len(replies)))
    assert "".join(r["data"]["delta"] for r in replies) == "hello edge world"
    assert replies[-1]["data"] == {"index": 3, "delta": "", "finish": True}

    await c.send(call("3", work_id, "taskinfo"))
    info = await c.recv()
    assert info["object"] == "llm.taskinfo" and info["data"]["model"] == "echo"
    await c.send(call("4", "llm", "taskinfo"))
    assert (await c.recv())["data"] == [work_id]

    await c.send(call("5", work_id, "exit"))
    assert (await c.recv())["error"]["code"] == 0
    await c.send(call("6", work_id, "inference", "llm.utf-8", "hi"))
    assert (await c.recv())["error"]["code"] == ErrorCode.UNIT_NOT_FOUND


async def test_a_non_streamed_unit_answers_once(client: tuple[Client, EdgeNode]) -> None:
    c, _ = client
    work_id = await setup(c, fmt="llm.utf-8")
    await c.send(call("q", work_id, "inference", "llm.utf-8", "just one reply"))
    reply = await c.recv()
    assert (reply["object"], reply["data"], reply["error"]["code"]) == ("llm.utf-8", "just one reply", 0)


async def test_bad_input_gets_stackflow_errors_and_the_node_goes_on(client: tuple[Client, EdgeNode]) -> None:
    c, node = client
    work_id = await setup(c)
    bad: list[tuple[dict[str, Any] | bytes, int]] = [
        (b"{this is not json}", ErrorCode.JSON_FORMAT),
        (call("a", "llm", "dance"), ErrorCode.NO_SUCH_ACTION),
        ({"request_id": "b", "action": "setup"}, ErrorCode.JSON_FORMAT),
        ({**setup_request("d"), "data": {"model": "echo", "max_token_len": "many"}}, ErrorCode.JSON_FORMAT),
        (setup_request("v") | {"work_id": "vlm"}, ErrorCode.UNIT_CALL),  # no such unit here
        (call("e", "llm.4242", "inference", "llm.utf-8", "hi"), ErrorCode.UNIT_NOT_FOUND),
        (call("f", work_id, "inference", "llm.utf-8", ""), ErrorCode.DATA_EMPTY),
        (call("f2", work_id, "inference", "llm.utf-8", "None"), ErrorCode.DATA_EMPTY),
        (call("f3", work_id, "inference", "llm.utf-8.stream", {"index": 0, "delta": "", "finish": True}),
         ErrorCode.DATA_EMPTY),
        (call("g", work_id, "inference", "llm.utf-8", {"not": "text"}), ErrorCode.JSON_FORMAT),
        (call("h", work_id, "inference", "llm.utf-8.stream", {"index": 1, "delta": "x", "finish": True}),
         ErrorCode.STREAM_INDEX),
    ]
    for message, code in bad:
        await c.send(message)
        reply = await c.recv()
        assert reply["error"]["code"] == code, (message, reply)
        assert reply["error"]["message"]
        if code == ErrorCode.JSON_FORMAT and not (isinstance(message, dict) and "work_id" in message):
            assert (reply["request_id"], reply["work_id"]) == ("0", "sys")  # as StackFlow names them
        elif isinstance(message, dict):
            assert reply["request_id"] == message["request_id"]
    await c.send(call("ok", work_id, "inference", "llm.utf-8.stream", {"index": 0, "delta": "still here",
                                                                         "finish": True}))
    text = ""
    while not (reply := await c.recv())["data"]["finish"]:
        text += reply["data"]["delta"]
    assert text == "still here" and node.units.running == 0


# -- the unit manager on its own --------------------------------------------------------------------

async def test_a_full_node_refuses_setup_with_minus_21_and_queues_inferences() -> None:
    """StackFlow answers -21 to a setup when the node is full, never to an inference: inferences beyond
    ``capacity`` wait their turn, in order (up to ``max_waiting``; one more gets -4)."""
    units = EdgeUnits([EchoModel(delay=0.05)], capacity=1, max_units=2, max_waiting=1)
    replies: list[dict[str, Any]] = []

    async def send(reply: dict[str, Any]) -> None:
        replies.append(reply)

    for i in range(3):
        await units.handle(json.dumps(setup_request(f"s{i}", fmt="llm.utf-8")), send)
    assert [r["error"]["code"] for r in replies] == [0, 0, ErrorCode.TASK_FULL]  # max_units
    assert (replies[2]["request_id"], replies[2]["work_id"]) == ("s2", "llm")
    one, two = replies[0]["work_id"], replies[1]["work_id"]
    replies.clear()
    await units.handle(json.dumps(call("a", one, "inference", "llm.utf-8", WORDS)), send)
    await units.handle(json.dumps(call("b", two, "inference", "llm.utf-8", "second")), send)
    await units.handle(json.dumps(call("c", two, "inference", "llm.utf-8", "third")), send)
    assert (units.running, units.waiting) == (1, 1)
    assert [(r["request_id"], r["error"]["code"]) for r in replies] == [("c", ErrorCode.PUSH_FAILED)]
    await until(lambda: units.running == 0, "both inferences answered")
    answers = [(r["request_id"], r["data"]) for r in replies if not r["error"]["code"]]
    assert answers == [("a", WORDS), ("b", "second")]  # first come, first served; b was never -21
    await units.close()


async def test_pause_stops_a_units_inferences_and_work_resumes_it() -> None:
    units = EdgeUnits([EchoModel(delay=0.05)], capacity=1)
    replies: list[dict[str, Any]] = []

    async def send(reply: dict[str, Any]) -> None:
        replies.append(reply)

    await units.handle(json.dumps(setup_request("s", fmt="llm.utf-8")), send)
    one = replies.pop()["work_id"]
    await units.handle(json.dumps(call("a", one, "inference", "llm.utf-8", WORDS)), send)
    assert units.running == 1
    await units.handle(json.dumps(call("p", one, "pause")), send)  # stops its running inference
    assert units.running == 0 and replies[-1]["error"]["code"] == 0
    await units.handle(json.dumps(call("c", one, "inference", "llm.utf-8", "hi")), send)
    assert replies[-1]["error"]["code"] == ErrorCode.PUSH_FAILED
    await units.handle(json.dumps(call("w", one, "work")), send)
    await units.handle(json.dumps(call("d", one, "inference", "llm.utf-8", "hi")), send)
    await until(lambda: units.running == 0, "the inference after work")
    assert replies[-1]["request_id"] == "d" and replies[-1]["data"] == "hi"
    await units.close()


async def test_streamed_input_is_grouped_per_connection_by_index_not_by_request_id() -> None:
    units = EdgeUnits([EchoModel()], capacity=2)
    replies: list[dict[str, Any]] = []

    async def send(reply: dict[str, Any]) -> None:
        replies.append(reply)

    await units.handle(json.dumps(setup_request("s", fmt="llm.utf-8")), send)
    work_id = replies.pop()["work_id"]
    # two connections interleave chunks for one unit; each chunk has a request id of its own
    for origin, request_id, index, delta, finish in [
            ("x", "x1", 1, "world", True), ("y", "y1", 0, "other ", False), ("x", "x0", 0, "hello ", False),
            ("y", "y2", 1, "text", True)]:
        await units.handle(json.dumps(call(request_id, work_id, "inference", "llm.utf-8.stream",
                                           {"index": index, "delta": delta, "finish": finish})), send,
                           origin=origin)
    # x's finish came before its index 0: a gap at that moment (-25), as StackFlow's joining finds it
    assert replies[0]["error"]["code"] == ErrorCode.STREAM_INDEX and replies[0]["request_id"] == "x1"
    await until(lambda: len(replies) == 2, "y's answer")
    assert (replies[1]["request_id"], replies[1]["data"]) == ("y2", "other text")  # the last chunk's id
    await units.close()


async def test_an_inference_frees_its_slot_before_its_last_reply_leaves() -> None:
    """A caller that answers the last reply with its next request at once never finds the slot taken."""
    units = EdgeUnits([EchoModel()], capacity=1)
    replies: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def keep(reply: dict[str, Any]) -> None:
        replies.append(reply)

    await units.handle(json.dumps(setup_request("s")), keep)
    work_id = replies.pop()["work_id"]

    async def send(reply: dict[str, Any]) -> None:
        replies.append(reply)
        if reply["error"]["code"] or len(replies) >= 20:
            done.set()
        elif reply["data"]["finish"]:  # the bridge's next request, as fast as it can be
            await units.handle(json.dumps(call(f"r{len(replies)}", work_id, "inference", "llm.utf-8", "hi")),
                               send)

    await units.handle(json.dumps(call("r0", work_id, "inference", "llm.utf-8", "hi")), send)
    await asyncio.wait_for(done.wait(), WAIT)
    assert [r["error"]["code"] for r in replies] == [0] * len(replies)


# -- the bridge -------------------------------------------------------------------------------------

async def test_requests_go_to_the_least_loaded_of_three_nodes_and_minus_21_when_all_are_full() -> None:
    async with open_bridge() as bridge, \
            run_node(bridge.endpoint, "a", capacity=1, delay=0.2) as a, \
            run_node(bridge.endpoint, "b", capacity=2, delay=0.2) as b, \
            run_node(bridge.endpoint, "c", capacity=3, delay=0.2) as c:
        await bridge.wait_for_nodes(3, model="echo", timeout=WAIT)
        answers = [asyncio.create_task(bridge.complete("echo", WORDS)) for _ in range(6)]
        await until(lambda: sum(inflight(bridge).values()) == 6, "six requests in flight")
        assert inflight(bridge) == {"a": 1, "b": 2, "c": 3}
        assert (a.units.running, b.units.running, c.units.running) == (1, 2, 3)
        with pytest.raises(EdgeBusy) as busy:
            await bridge.complete("echo", "one more")
        assert busy.value.code == ErrorCode.TASK_FULL
        assert isinstance(to_handler_signal(busy.value), RateLimited)
        assert await asyncio.gather(*answers) == [WORDS] * 6
        # idle again: one at a time, the load ties and the nodes take turns
        before = {n.name: n.served for n in bridge.nodes()}
        for _ in range(6):
            assert await bridge.complete("echo", "x") == "x"
        assert {n.name: n.served - before[n.name] for n in bridge.nodes()} == {"a": 2, "b": 2, "c": 2}
        stats = bridge.stats()
        assert (stats.completed, stats.busy, stats.nodes_joined) == (12, 1, 3)


async def test_a_node_killed_before_any_token_has_its_request_retried_elsewhere(spawn: Any) -> None:
    async with open_bridge() as bridge:
        nodes = {name: spawn(bridge.endpoint, name, delay=2.0) for name in ("k1", "k2")}
        await bridge.wait_for_nodes(2, model="echo", timeout=WAIT)
        answer = asyncio.create_task(bridge.complete("echo", "alpha beta"))
        await until(lambda: 1 in inflight(bridge).values(), "the request on a node")
        victim = next(name for name, n in inflight(bridge).items() if n == 1)
        nodes[victim].signal(signal.SIGKILL)  # its first token was 2 s away
        assert await asyncio.wait_for(answer, WAIT) == "alpha beta"
        stats = bridge.stats()
        assert (stats.retried, stats.nodes_lost, stats.completed) == (1, 1, 1)
        assert [n.name for n in bridge.nodes()] == [name for name in nodes if name != victim]


async def test_a_node_killed_after_tokens_were_streamed_fails_the_request_clearly(spawn: Any) -> None:
    async with open_bridge() as bridge:
        nodes = {name: spawn(bridge.endpoint, name, delay=0.3) for name in ("s1", "s2")}
        await bridge.wait_for_nodes(2, model="echo", timeout=WAIT)
        received: list[str] = []
        with pytest.raises(EdgeStreamBroken) as broken:
            async for delta in bridge.infer("echo", WORDS, max_tokens=32):
                received.append(delta)
                if len(received) == 1:
                    victim = next(name for name, n in inflight(bridge).items() if n == 1)
                    nodes[victim].signal(signal.SIGKILL)
        assert received == ["one "]
        assert broken.value.code == ErrorCode.MODEL_RUN
        assert "after 1 tokens were streamed" in broken.value.message
        stats = bridge.stats()
        assert (stats.broken_streams, stats.retried, stats.failed) == (1, 0, 1)
        assert [n.served for n in bridge.nodes()] == [0]  # not retried on the survivor


async def test_a_silent_node_is_dropped_and_comes_back_when_it_beats_again(spawn: Any) -> None:
    async with open_bridge() as bridge:
        frozen = spawn(bridge.endpoint, "frozen")
        spawn(bridge.endpoint, "other")
        await bridge.wait_for_nodes(2, model="echo", timeout=WAIT)
        frozen.signal(signal.SIGSTOP)  # connected, but silent
        await until(lambda: [n.name for n in bridge.nodes()] == ["other"], "the silent node dropped")
        assert bridge.stats().nodes_lost == 1
        for _ in range(3):
            assert await bridge.complete("echo", "served by the other") == "served by the other"
        frozen.signal(signal.SIGCONT)
        await bridge.wait_for_nodes(2, model="echo", timeout=WAIT)  # it registers again
        assert sorted(n.name for n in bridge.nodes()) == ["frozen", "other"]


async def test_a_node_reconnects_when_the_bridge_goes_silent() -> None:
    zc = ZmqClient()
    try:
        async with run_node(zc.endpoint, "lonely") as node:
            await zc.accept(heartbeat=0.1)  # then never beat: silent for 3 x 0.1 s
            first = zc.peer
            await zc.accept(heartbeat=10.0)  # it registers again, as a new connection
            assert zc.peer != first and node.connections == 2
    finally:
        zc.close()


async def test_a_restarted_bridge_gets_its_nodes_back() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    async with open_bridge(bind=endpoint) as bridge:
        async with run_node(endpoint, "faithful"):
            await bridge.wait_for_nodes(1, timeout=WAIT)
            await bridge.close()
            async with open_bridge(bind=endpoint) as again:
                await again.wait_for_nodes(1, timeout=WAIT)
                assert await again.complete("echo", "back again") == "back again"


async def test_a_request_times_out_and_the_node_stops_working_on_it() -> None:
    async with open_bridge() as bridge, run_node(bridge.endpoint, "slow", delay=1.0) as node:
        await bridge.wait_for_nodes(1, timeout=WAIT)
        with pytest.raises(EdgeTimeout) as timed_out:
            await bridge.complete("echo", WORDS, timeout=0.2)
        assert timed_out.value.code == ErrorCode.UNIT_CALL and bridge.stats().timeouts == 1
        await until(lambda: node.units.running == 0, "the node told to stop")
        assert inflight(bridge) == {"slow": 0}


async def test_a_caller_that_stops_reading_frees_the_node() -> None:
    async with open_bridge() as bridge, run_node(bridge.endpoint, "single", delay=0.05) as node:
        await bridge.wait_for_nodes(1, timeout=WAIT)
        stream = bridge.infer("echo", WORDS)
        assert await anext(stream) == "one "
        await stream.aclose()  # type: ignore[attr-defined]
        await until(lambda: node.units.running == 0, "the node told to stop")
        assert await bridge.complete("echo", "capacity is back") == "capacity is back"


async def test_streamed_deltas_arrive_in_order_and_a_whole_answer_when_not_streamed() -> None:
    async with open_bridge() as bridge, run_node(bridge.endpoint, capacity=4) as node:
        await bridge.wait_for_nodes(1, timeout=WAIT)
        text = " ".join(f"w{i}" for i in range(200))
        deltas = [d async for d in bridge.infer("echo", text, max_tokens=500)]
        assert deltas == [f"w{i} " for i in range(199)] + ["w199"]
        assert [d async for d in bridge.infer("echo", text, max_tokens=3)] == ["w0 ", "w1 ", "w2 "]
        assert [d async for d in bridge.infer("echo", text, stream=False)] == [text]
        assert len(node.units.units) == 3  # one unit per distinct setup, reused
        await bridge.complete("echo", "again", max_tokens=3)
        assert len(node.units.units) == 3


async def test_no_node_for_the_model_is_unavailable() -> None:
    async with open_bridge() as bridge:
        with pytest.raises(EdgeUnavailable):
            await bridge.complete("echo", "anyone?")
        async with run_node(bridge.endpoint):
            await bridge.wait_for_nodes(1, timeout=WAIT)
            with pytest.raises(EdgeUnavailable) as caught:
                await bridge.complete("llama-70b", "too big for the edge")
            assert caught.value.code == ErrorCode.UNIT_NOT_FOUND


async def test_bad_frames_from_a_peer_do_not_disturb_the_bridge() -> None:
    async with open_bridge() as bridge, run_node(bridge.endpoint, "good"):
        await bridge.wait_for_nodes(1, timeout=WAIT)
        context = zmq.asyncio.Context()
        rogue = context.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.connect(bridge.endpoint)
        try:
            await rogue.send_multipart([b"Mhello?"])  # not registered
            assert await asyncio.wait_for(rogue.recv_multipart(), WAIT) == [b"?"]
            for frames in ([b"R{not json"], [b'R{"name": "x", "models": [], "capacity": 0}'], [b""],
                           [b"Z?"], [b"M", b"two frames"]):
                await rogue.send_multipart(frames)
            await rogue.send_multipart([b'R{"name": "rogue", "models": ["rogue"], "capacity": 1}'])
            await bridge.wait_for_nodes(2, timeout=WAIT)
            for frames in ([b"M{bad json"], [b"M[1]"], [b'M{"request_id": "nobody"}'], [b"M"]):
                await rogue.send_multipart(frames)
            assert await bridge.complete("echo", "unbothered") == "unbothered"
        finally:
            rogue.close(linger=0)
            context.term()


async def test_a_stackflow_unit_manager_over_tcp_is_one_more_node() -> None:
    units = EdgeUnits([EchoModel()], capacity=2)
    server = StackFlowServer(units, "127.0.0.1", 0)
    await server.start()
    async with open_bridge() as bridge:
        await bridge.add_stackflow("127.0.0.1", server.port, models=["echo"], capacity=2)
        await bridge.wait_for_nodes(1, model="echo", timeout=WAIT)
        (info,) = bridge.nodes()
        assert info.transport == "stackflow" and info.capacity == 2
        assert await bridge.complete("echo", "over tcp") == "over tcp"
        assert [d async for d in bridge.infer("echo", "a b", stream=False)] == ["a b"]
        await server.close()
        await until(lambda: bridge.nodes() == [], "the closed backend dropped")


async def test_a_unit_manager_that_answers_no_ping_stays_attached_while_idle() -> None:
    """Edge-LLM-Infra's unit manager answers nothing to a sys ping; it does answer llm taskinfo, which
    is what the bridge asks each beat, so an idle one is not judged dead."""
    beats: list[dict[str, Any]] = []

    async def unit_manager(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = JsonFramer()
        while data := await reader.read(65536):
            for item in framer.feed(data):
                assert isinstance(item, bytes)
                request = json.loads(item)
                if request["action"] == "taskinfo" and request["work_id"] == "llm":
                    beats.append(request)
                    reply = make_reply(request["request_id"], "llm", object="llm.tasklist", data=[])
                    writer.write(json.dumps(reply).encode() + b"\n")
                    await writer.drain()
                # anything else: silence, as the framework gives a sys ping

    server = await asyncio.start_server(unit_manager, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with open_bridge() as bridge:
            await bridge.add_stackflow("127.0.0.1", port, models=["echo"])
            await bridge.wait_for_nodes(1, model="echo", timeout=WAIT)
            await until(lambda: len(beats) >= 6, "six beats answered")  # twice `missed` beats
            assert len(bridge.nodes()) == 1 and bridge.stats().nodes_lost == 0
    finally:
        server.close()
        await server.wait_closed()


async def test_the_edge_node_command_serves_stackflow_tcp_to_a_plain_socket(spawn: Any) -> None:
    port = free_port()
    async with open_bridge() as bridge:
        spawn(bridge.endpoint, "cli", stackflow_port=port)
        await bridge.wait_for_nodes(1, timeout=WAIT)  # up; its TCP server started first
        c = TcpClient(port)
        try:
            work_id = await setup(c)
            await c.send(call("i", work_id, "inference", "llm.utf-8.stream",
                              {"index": 0, "delta": "from a socket", "finish": True}))
            text = ""
            while not (reply := await c.recv())["data"]["finish"]:
                text += reply["data"]["delta"]
            assert text == "from a socket"
            await c.send(call("x", work_id, "exit"))
            assert (await c.recv())["error"]["code"] == 0
        finally:
            c.close()


# -- StackFlow's own clients, byte for byte ---------------------------------------------------------

# What Edge-LLM-Infra's sample/test.py writes (json.dumps(..., ensure_ascii=False) + "\n"): a setup
# for a model this node does not serve, one streamed-input inference per line typed (index 0, finish
# true, the setup's request id again), then an exit without object or data.
SAMPLE_SETUP = (
    b'{"request_id": "llm_001", "work_id": "llm", "action": "setup", "object": "llm.setup", "data": '
    b'{"model": "DeepSeek-R1-Distill-Qwen-1.5B", "response_format": "llm.utf-8.stream", '
    b'"input": "llm.utf-8.stream", "enoutput": true, "max_token_len": 1023, "prompt": '
    b'"You are a knowledgeable assistant capable of answering various questions and providing '
    b'information."}}\n')
SAMPLE_INFERENCE = (b'{"request_id": "llm_001", "work_id": "%s", "action": "inference", "object": '
                    b'"llm.utf-8.stream", "data": {"delta": "%s", "index": 0, "finish": true}}\n')
SAMPLE_EXIT = b'{"request_id": "llm_exit", "work_id": "%s", "action": "exit"}\n'


@contextlib.asynccontextmanager
async def tcp_node(**options: Any) -> AsyncIterator[TcpClient]:
    """An in-process echo node serving StackFlow TCP only, and a plain socket to it."""
    async with run_node(None, stackflow_port=0, **options) as node:
        assert node.stackflow_port
        c = TcpClient(node.stackflow_port)
        try:
            yield c
        finally:
            c.close()


async def send_raw(c: TcpClient, data: bytes) -> None:
    await asyncio.to_thread(c.sock.sendall, data)


async def test_the_frameworks_sample_client_is_served_as_it_is() -> None:
    async with tcp_node() as c:
        await send_raw(c, SAMPLE_SETUP)
        reply = await c.recv()  # the client reads up to the first newline and checks these
        assert reply["request_id"] == "llm_001" and reply["error"] == {"code": 0, "message": ""}
        work_id = reply["work_id"]
        assert work_id == "llm.1001"
        assert reply["data"] == {"model": "echo"}  # the model served, not the one asked for
        for line in (b"what is a stand-up", b"and a retro"):
            await send_raw(c, SAMPLE_INFERENCE % (work_id.encode(), line))
            deltas = []
            while not (reply := await c.recv())["data"]["finish"]:
                assert reply["request_id"] == "llm_001" and reply["error"]["code"] == 0
                deltas.append(reply["data"]["delta"])
            assert "".join(deltas) == line.decode()
        await c.send(call("t", work_id, "taskinfo"))
        info = (await c.recv())["data"]
        # the framework's names; "model" is the model served
        assert {k: info[k] for k in ("model", "response_format", "enoutput", "inputs")} == {
            "model": "echo", "response_format": "llm.utf-8.stream", "enoutput": True,
            "inputs": ["llm.utf-8.stream"]}
        await send_raw(c, SAMPLE_EXIT % work_id.encode())
        reply = await c.recv()
        assert (reply["request_id"], reply["work_id"], reply["error"]["code"]) == ("llm_exit", work_id, 0)


async def test_input_over_32_kb_in_chunks_with_a_request_id_each_is_one_inference() -> None:
    """The meeting-system Go client's way: 32 KB pieces, each its own inference message and request
    id, numbered by index, finish only on the last; all written at once, no newlines between."""
    text = " ".join(f"{i:04d}" + "x" * 2495 for i in range(40))  # 100 KB in 40 words
    pieces = [text[i:i + 32_768] for i in range(0, len(text), 32_768)]
    async with tcp_node() as c:
        work_id = await setup(c, fmt="llm.utf-8")
        data = b"".join(json.dumps(call(f"chunk-{i}", work_id, "inference", "llm.utf-8.stream",
                                        {"index": i, "delta": piece, "finish": i == len(pieces) - 1})
                                   ).encode() for i, piece in enumerate(pieces))
        await send_raw(c, data)
        reply = await c.recv()
        assert reply["error"]["code"] == 0, reply["error"]
        assert reply["request_id"] == f"chunk-{len(pieces) - 1}" and reply["data"] == text


async def test_objects_are_framed_by_brace_balance_whatever_the_writes() -> None:
    async with tcp_node(capacity=2) as c:
        work_id = await setup(c, fmt="llm.utf-8")
        one = json.dumps(call("one", work_id, "inference", "llm.utf-8", 'braces } { and "quotes"')).encode()
        two = json.dumps(call("two", work_id, "inference", "llm.utf-8", "second")).encode()
        both = one + two  # two objects in one write, no newline after either
        await send_raw(c, both[:17])
        await send_raw(c, both[17:])
        answers = {(r := await c.recv())["request_id"]: r["data"] for _ in range(2)}
        assert answers == {"one": 'braces } { and "quotes"', "two": "second"}
        await send_raw(c, b'}{"request_id": 1}  not json  ')  # a stray brace, a bad request, text
        errors = [await c.recv() for _ in range(3)]
        assert [(r["request_id"], r["work_id"], r["error"]["code"]) for r in errors] == [
            ("0", "sys", ErrorCode.JSON_FORMAT)] * 3
        await send_raw(c, json.dumps(call("three", work_id, "inference", "llm.utf-8", "still read")).encode())
        assert (await c.recv())["data"] == "still read"


# -- the commands -----------------------------------------------------------------------------------

def test_register_adds_edge_node_and_bench_edge() -> None:
    app, bench = typer.Typer(), typer.Typer()
    app.add_typer(bench, name="bench")
    register(app, bench)
    runner = CliRunner()
    assert "--stackflow-port" in runner.invoke(app, ["edge-node", "--help"]).output
    assert "--json" in runner.invoke(app, ["bench", "edge", "--help"]).output


@pytest.mark.slow
async def test_bench_edge_runs_both_sides_of_the_echo_comparison() -> None:
    from meetmesh.bench.edge import run_bench

    result = await run_bench(requests=100, concurrency=4, latency_requests=50, rounds=1, llm=False)
    echo = result["echo"]
    for side in ("raw", "bridge"):
        assert echo[side]["requests_per_s"] > 0
        assert 0 < echo[side]["p50_ms"] <= echo[side]["p99_ms"]
    assert set(echo["added_ms"]) == {"p50", "p99"}
    assert set(result["targets"]) == {"added_p99_ms"}
    assert result["llm"] == {"skipped": "--no-llm"}
