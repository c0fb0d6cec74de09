"""Edge nodes that misbehave: answers malformed, out of order, endless, too long or never, and a node
that dies mid-stream. Each is bounded and reported to the caller as a `StackFlowError`; none hangs.

The misbehaving nodes are fakes: a bare DEALER that registers, beats, and answers as each test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import zmq
import zmq.asyncio

from edge_node.models import EchoModel
from edge_node.node import EdgeNode, EdgeUnits
from shared.bus.edge.pool import EdgeBridge
from shared.bus.edge.stackflow import (
    EdgeBadReply,
    EdgeStreamBroken,
    EdgeTimeout,
    EdgeUnavailable,
    ErrorCode,
    make_reply,
    stream_data,
    to_handler_signal,
)
from shared.bus.edge.stackflow_tcp import StackFlowServer
from shared.bus.errors import Retry

BEAT = 0.3
WAIT = 20.0
Answer = Callable[["FakeNode", dict[str, Any]], Awaitable[None]]


async def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


class FakeNode:
    """Registers as a node serving ``echo``, beats, answers setups well (unless ``setup`` says how)
    and inferences with ``answer``; keeps every frame the bridge sent."""

    def __init__(self, endpoint: str, answer: Answer, *, setup: Answer | None = None) -> None:
        self.context = zmq.asyncio.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.answer, self.setup = answer, setup
        self.received: list[bytes] = []
        self.welcomed = asyncio.Event()
        self.beating = True
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> FakeNode:
        await self.sock.send(b"R" + json.dumps({"name": "fake", "models": ["echo"], "capacity": 1}).encode())
        self.tasks = [asyncio.create_task(self._beat()), asyncio.create_task(self._serve())]
        await asyncio.wait_for(self.welcomed.wait(), WAIT)
        return self

    async def _beat(self) -> None:
        while True:
            if self.beating:
                await self.sock.send(b'H{"running": 0}')
            await asyncio.sleep(BEAT / 5)

    async def _serve(self) -> None:
        while True:
            frame = await self.sock.recv()
            self.received.append(frame)
            if frame.startswith(b"W"):
                self.welcomed.set()
            elif frame.startswith(b"M"):
                request = json.loads(frame[1:])
                if request["action"] == "setup":
                    await (self.setup or self.good_setup)(self, request)
                elif request["action"] == "inference":
                    self.tasks.append(asyncio.create_task(self.answer(self, request)))

    @staticmethod
    async def good_setup(fake: FakeNode, request: dict[str, Any]) -> None:
        await fake.send(make_reply(request["request_id"], "llm.1001"))

    async def send(self, reply: dict[str, Any]) -> None:
        await self.sock.send(b"M" + json.dumps(reply).encode())

    def cancelled(self, request_id: str) -> bool:
        return b"C" + request_id.encode() in self.received

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.sock.close(linger=0)
        self.context.term()


@contextlib.asynccontextmanager
async def bridge_with(answer: Answer, *, setup: Answer | None = None, **options: Any
                      ) -> AsyncIterator[tuple[EdgeBridge, FakeNode]]:
    async with EdgeBridge("tcp://127.0.0.1:*", heartbeat=BEAT, request_timeout=WAIT, curve="off",
                          **options) as bridge:
        fake = await FakeNode(bridge.endpoint, answer, setup=setup).start()
        try:
            await bridge.wait_for_nodes(1, model="echo", timeout=WAIT)
            yield bridge, fake
        finally:
            await fake.close()


@contextlib.asynccontextmanager
async def good_node(bridge: EdgeBridge) -> AsyncIterator[EdgeNode]:
    node = EdgeNode(EdgeUnits([EchoModel()]), connect=bridge.endpoint, name="good", heartbeat=BEAT,
                    curve="off")
    task = asyncio.create_task(node.run())
    try:
        await bridge.wait_for_nodes(2, model="echo", timeout=WAIT)
        yield node
    finally:
        node.stop()
        await asyncio.wait_for(task, WAIT)


def replying(**reply: Any) -> Answer:
    """An inference answered with one reply of these fields (over a well-formed one)."""
    async def answer(fake: FakeNode, request: dict[str, Any]) -> None:
        await fake.send({**make_reply(request["request_id"], request["work_id"]), **reply})
    return answer


MALFORMED = {
    "error not an object": replying(error="oops"),
    "error code not a number": replying(error={"code": "-21", "message": "?"}),
    "data neither text nor chunk": replying(data=42),
    "delta not text": replying(data={"index": 0, "delta": 5, "finish": True}),
    "finish not a boolean": replying(data={"index": 0, "delta": "a", "finish": "yes"}),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
async def test_a_malformed_answer_is_an_error_for_the_caller(kind: str) -> None:
    async with bridge_with(MALFORMED[kind]) as (bridge, _):
        with pytest.raises(EdgeBadReply) as caught:
            await bridge.complete("echo", "the agenda")
        assert caught.value.code == ErrorCode.UNIT_CALL and "fake broke the protocol" in caught.value.message
        assert isinstance(to_handler_signal(caught.value), Retry)
        assert bridge.stats().bad_replies == 1 and bridge.stats().failed == 1
        assert bridge.nodes()[0].inflight == 0


async def test_a_malformed_answer_before_any_token_moves_the_request_to_another_node() -> None:
    async with bridge_with(MALFORMED["error not an object"]) as (bridge, _), good_node(bridge) as good:
        assert await bridge.complete("echo", "the agenda") == "the agenda"  # the fake, picked first, failed
        stats = bridge.stats()
        assert (stats.bad_replies, stats.retried, stats.completed) == (1, 1, 1) and good.units.served == 1


async def test_a_setup_answered_without_a_work_id_is_an_error() -> None:
    async def no_work_id(fake: FakeNode, request: dict[str, Any]) -> None:
        await fake.send({**make_reply(request["request_id"], ""), "work_id": None})

    async with bridge_with(replying(data="unused"), setup=no_work_id) as (bridge, _):
        with pytest.raises(EdgeBadReply, match="work_id"):
            await bridge.complete("echo", "the agenda")


async def test_chunks_out_of_order_end_the_stream_with_an_error_after_what_was_streamed() -> None:
    async def skipping(fake: FakeNode, request: dict[str, Any]) -> None:
        for index, delta in ((0, "first "), (2, "third ")):  # 1 never comes
            await fake.send(make_reply(request["request_id"], request["work_id"], object="llm.utf-8.stream",
                                       data=stream_data(index, delta)))

    async with bridge_with(skipping) as (bridge, fake):
        received: list[str] = []
        with pytest.raises(EdgeBadReply, match="chunk 2 where 1 was due"):
            async for delta in bridge.infer("echo", "the agenda"):
                received.append(delta)
        assert received == ["first "]
        request_id = json.loads(next(f for f in fake.received if b'"inference"' in f)[1:])["request_id"]
        await until(lambda: fake.cancelled(request_id), "the node told to stop")


async def test_an_endless_stream_is_cut_at_max_tokens_and_the_node_told_to_stop() -> None:
    async def endless(fake: FakeNode, request: dict[str, Any]) -> None:
        index = 0
        while not fake.cancelled(request["request_id"]):
            await fake.send(make_reply(request["request_id"], request["work_id"], object="llm.utf-8.stream",
                                       data=stream_data(index, f"t{index} ")))
            index += 1
            await asyncio.sleep(0)

    async with bridge_with(endless) as (bridge, fake):
        received: list[str] = []
        with pytest.raises(EdgeBadReply, match="more than max_token_len=5 tokens"):
            async for delta in bridge.infer("echo", "go on forever", max_tokens=5):
                received.append(delta)
        assert received == [f"t{i} " for i in range(5)]
        await until(lambda: any(f.startswith(b"C") for f in fake.received), "the node told to stop")
        assert bridge.nodes()[0].inflight == 0


async def test_an_answer_longer_than_max_output_is_cut() -> None:
    async with bridge_with(replying(object="llm.utf-8", data="x" * 5000), max_output=1000) as (bridge, _):
        with pytest.raises(EdgeBadReply, match="more than 1000 characters"):
            await bridge.complete("echo", "the agenda", stream=False)


async def test_a_node_that_never_answers_runs_into_the_deadline_and_is_told_to_stop() -> None:
    async def silent(fake: FakeNode, request: dict[str, Any]) -> None:
        pass  # it beats on, and never answers

    async with bridge_with(silent) as (bridge, fake):
        with pytest.raises(EdgeTimeout):
            await bridge.complete("echo", "anyone?", timeout=0.5)
        await until(lambda: any(f.startswith(b"C") for f in fake.received), "the node told to stop")
        assert bridge.stats().timeouts == 1 and bridge.nodes()[0].inflight == 0


async def test_a_node_that_dies_mid_stream_fails_the_stream_clearly() -> None:
    async def dying(fake: FakeNode, request: dict[str, Any]) -> None:
        await fake.send(make_reply(request["request_id"], request["work_id"], object="llm.utf-8.stream",
                                   data=stream_data(0, "last words ")))
        fake.beating = False  # then nothing more: as a node killed, or cut off, would be

    async with bridge_with(dying) as (bridge, _):
        received: list[str] = []
        with pytest.raises(EdgeStreamBroken, match="after 1 tokens were streamed"):
            async for delta in bridge.infer("echo", "the agenda"):
                received.append(delta)
        assert received == ["last words "] and bridge.nodes() == []


# -- peers that stop reading ------------------------------------------------------------------------

class FloodModel:
    """Answers with large tokens, as fast as they can be taken."""

    name = "echo"

    def render(self, messages: Any) -> str:
        return "flood"

    async def stream(self, prompt: str, *, max_tokens: int) -> AsyncIterator[str]:
        for _ in range(max_tokens):
            yield "x" * 4096
            await asyncio.sleep(0)


async def test_a_stackflow_client_that_stops_reading_is_cut_off_and_frees_the_node() -> None:
    units = EdgeUnits([FloodModel()], capacity=1)
    server = StackFlowServer(units, "127.0.0.1", 0, write_timeout=0.5)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        setup = {"request_id": "s", "work_id": "llm", "action": "setup", "object": "llm.setup",
                 "data": {"model": "echo", "response_format": "llm.utf-8.stream", "max_token_len": 32768}}
        writer.write(json.dumps(setup).encode())
        work_id = json.loads(await reader.readline())["work_id"]
        writer.write(json.dumps({"request_id": "i", "work_id": work_id, "action": "inference",
                                 "object": "llm.utf-8", "data": "go"}).encode())
        await until(lambda: units.running == 1, "the flood started")
        # ... and this client reads nothing more: its replies pile up until it is cut off
        await until(lambda: units.running == 0, "the stalled client's inference stopped")
        with contextlib.suppress(ConnectionError):  # the node closed the connection: EOF or a reset
            while await reader.read(1 << 20):
                pass
        writer.close()
        r2, w2 = await asyncio.open_connection("127.0.0.1", server.port)  # the node serves others
        w2.write(json.dumps({**setup, "request_id": "s2"}).encode())
        assert json.loads(await r2.readline())["error"]["code"] == 0
        w2.close()
    finally:
        await server.close()
        await units.close()


async def test_a_unit_manager_that_stops_reading_is_dropped_and_the_request_fails_clearly() -> None:
    connected = asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await asyncio.sleep(3600)  # reads nothing, answers nothing

    server = await asyncio.start_server(deaf, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with EdgeBridge("tcp://127.0.0.1:*", heartbeat=BEAT, request_timeout=WAIT,
                              curve="off") as bridge:
            await bridge.add_stackflow("127.0.0.1", port, models=["echo"])
            await bridge.wait_for_nodes(1, model="echo", timeout=WAIT)
            with pytest.raises(EdgeUnavailable):  # 16 MB it never reads: the send stalls, the node
                await bridge.complete("echo", "x" * (16 << 20))  # is dropped, none is left
            assert bridge.stats().nodes_lost >= 1 and connected.is_set()
    finally:
        server.close()
        await server.wait_closed()
