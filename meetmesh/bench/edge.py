"""``meetmesh bench edge``: what the bridge adds, against the same work without it, in one run.

Echo: requests/s (``concurrency`` in flight) and latency (one request at a time) of non-streamed
requests through `EdgeBridge` and an echo node process, against a raw pyzmq ROUTER in this process
and a DEALER process sending the same request bytes straight back. LLM: tokens/s of SmolLM2-135M
(greedy, same prompt and token count) through bridge and node, against llama-cpp-python called
directly in this process. Rounds alternate between the two sides; medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import IO, Any

import zmq
import zmq.asyncio

from shared.bus.edge.pool import EdgeBridge
from shared.bus.edge.stackflow import MESSAGE, Template
from shared.bus.queue.records import percentile

TARGET_ADDED_P99_MS = 1.0
TARGET_TOKEN_RATIO = 0.95
WARMUP = 200
ECHO_PROMPT = "ping"
RAW_REQUEST = (b'{"request_id":"mm1a2b3c-12345","work_id":"llm.1001","action":"inference",'
               b'"object":"llm.utf-8","data":"ping"}')  # what the bridge sends for ECHO_PROMPT
LLM_TASK: Template = "chat"
LLM_PROMPT = "Explain in detail, step by step, how to plan a productive team meeting."  # a long answer


_LOGS: dict[int, IO[bytes]] = {}  # a child's stderr, by pid: read when it fails


def _child(*args: str) -> subprocess.Popen[bytes]:
    log = tempfile.TemporaryFile()
    # plain ZeroMQ, as the raw side is: the bench measures the bridge, not CURVE's encryption
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEETMESH_EDGE_")}
    env["MEETMESH_ENV"] = "dev"
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=log,
                            start_new_session=True, env=env)
    _LOGS[proc.pid] = log
    return proc


def _stderr(proc: subprocess.Popen[bytes]) -> str:
    log = _LOGS.get(proc.pid)
    if log is None:
        return ""
    log.seek(0)
    return log.read()[-2000:].decode(errors="replace")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if (log := _LOGS.pop(proc.pid, None)) is not None:
        log.close()


def _latency(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round((percentile(ordered, 50) or 0) * 1e3, 3),
            "p99_ms": round((percentile(ordered, 99) or 0) * 1e3, 3)}


async def _timed(call: Callable[[], Coroutine[Any, Any, object]], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


async def _flood(call: Callable[[], Coroutine[Any, Any, object]], n: int, concurrency: int) -> float:
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(n, concurrency))))
    return n / (time.perf_counter() - start)


# -- the raw pyzmq echo -----------------------------------------------------------------------------

class _RawEcho:
    """A ROUTER here and a DEALER echo process; ``call()`` is one round trip of RAW_REQUEST."""

    def __init__(self) -> None:
        self.context = zmq.asyncio.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.proc = _child("meetmesh.bench.edge", "echo", self.sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self.peer = b""
        self._waiting: list[asyncio.Future[None]] = []
        self._receiver: asyncio.Task[None] | None = None

    async def start(self) -> None:
        frames = await asyncio.wait_for(self.sock.recv_multipart(), 60)
        self.peer = frames[0]
        self._receiver = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        while True:
            await self.sock.recv_multipart()
            self._waiting.pop(0).set_result(None)  # replies come back in order: one peer, FIFO

    async def call(self) -> None:
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(done)
        await self.sock.send_multipart([self.peer, MESSAGE + RAW_REQUEST])
        await done

    async def close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)
        _stop(self.proc)
        self.sock.close(linger=0)
        self.context.term()


async def _echo_peer(endpoint: str) -> None:
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    await sock.send_multipart([b"hello"])
    while True:
        await sock.send_multipart(await sock.recv_multipart())


@contextlib.asynccontextmanager
async def _bridge_with_node(*node_args: str, model: str, timeout: float) -> AsyncIterator[EdgeBridge]:
    async with EdgeBridge("tcp://127.0.0.1:*", request_timeout=600, curve="off") as bridge:
        proc = _child("meetmesh.edge", "edge-node", "--connect", bridge.endpoint, "--stackflow-port",
                      "0", "--name", "bench-node", *node_args)
        try:
            try:
                await bridge.wait_for_nodes(1, model=model, timeout=timeout)
            except Exception:
                raise RuntimeError(f"the bench's edge node did not register:\n{_stderr(proc)}") from None
            yield bridge
        finally:
            _stop(proc)


# -- the two measurements ---------------------------------------------------------------------------

async def _echo(requests: int, concurrency: int, latency_requests: int, rounds: int) -> dict[str, Any]:
    raw = _RawEcho()
    async with _bridge_with_node("--model", "echo", "--capacity", str(concurrency), model="echo",
                                 timeout=60) as bridge:
        await raw.start()

        async def through_bridge() -> None:
            await bridge.complete("echo", ECHO_PROMPT, stream=False)

        sides = {"raw": raw.call, "bridge": through_bridge}
        per_round: dict[str, list[dict[str, float]]] = {"raw": [], "bridge": []}
        try:
            for call in sides.values():
                await _timed(call, WARMUP)
            for _ in range(rounds):
                for side, call in sides.items():
                    rate = await _flood(call, requests, concurrency)
                    lat = _latency(await _timed(call, latency_requests))
                    per_round[side].append({"requests_per_s": round(rate), **lat})
        finally:
            await raw.close()
    out: dict[str, Any] = {"requests": requests, "concurrency": concurrency,
                           "latency_requests": latency_requests, "rounds": rounds}
    for side, figures in per_round.items():
        out[side] = {key: round(statistics.median(r[key] for r in figures), 3) for key in figures[0]}
        out[side]["per_round"] = figures
    pairs = list(zip(per_round["raw"], per_round["bridge"], strict=True))  # each round: back to back
    out["added_ms"] = {p: round(statistics.median(b[f"{p}_ms"] - r[f"{p}_ms"] for r, b in pairs), 3)
                       for p in ("p50", "p99")}
    out["throughput_ratio"] = round(out["bridge"]["requests_per_s"] / max(1, out["raw"]["requests_per_s"]), 3)
    return out


def _direct_generation(model: Any, prompt: str, tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    first, count = 0.0, 0
    for chunk in model.completion(prompt, max_tokens=tokens):
        if chunk["choices"][0]["text"]:
            count += 1
            first = first or time.perf_counter()
    return _rates(start, first, time.perf_counter(), count)


def _rates(start: float, first: float, end: float, count: int) -> dict[str, float]:
    return {"tokens": count, "tokens_per_s": round(count / (end - start), 2),
            "decode_tokens_per_s": round((count - 1) / max(1e-9, end - first), 2),
            "first_token_ms": round((first - start) * 1e3, 1)}


async def _llm(tokens: int, rounds: int) -> dict[str, Any]:
    try:
        from edge_node.models import LlamaModel, template_messages

        model = LlamaModel()
    except Exception as exc:  # the [llm] extra is optional: say why this part did not run
        return {"skipped": str(exc)}
    prompt = model.render(template_messages(LLM_TASK, LLM_PROMPT))
    per_round: dict[str, list[dict[str, float]]] = {"direct": [], "bridge": []}
    try:
        async with _bridge_with_node(model=model.name, timeout=180) as bridge:

            async def through_bridge() -> dict[str, float]:
                start = time.perf_counter()
                first, count = 0.0, 0
                async for _ in bridge.infer(model.name, LLM_PROMPT, task=LLM_TASK, max_tokens=tokens):
                    count += 1
                    first = first or time.perf_counter()
                return _rates(start, first, time.perf_counter(), count)

            async def direct() -> dict[str, float]:  # on a thread: the bridge keeps beating meanwhile
                return await asyncio.to_thread(_direct_generation, model, prompt, tokens)

            sides = {"direct": direct, "bridge": through_bridge}
            for call in sides.values():
                await call()  # warm-up: caches, and the node's unit
            for _ in range(rounds):
                for side, call in sides.items():
                    per_round[side].append(await call())
    finally:
        model.close()
    out: dict[str, Any] = {"model": model.name, "max_tokens": tokens, "rounds": rounds}
    for side, figures in per_round.items():
        out[side] = {key: round(statistics.median(r[key] for r in figures), 2) for key in figures[0]}
        out[side]["per_round"] = figures
    pairs = zip(per_round["direct"], per_round["bridge"], strict=True)  # each round: back to back
    ratios = [b["tokens_per_s"] / max(1e-9, d["tokens_per_s"]) for d, b in pairs]
    out["ratio"] = round(statistics.median(ratios), 3)
    return out


async def run_bench(*, requests: int = 5_000, concurrency: int = 32, latency_requests: int = 2_000,
                    rounds: int = 3, tokens: int = 128, llm_rounds: int = 7, llm: bool = True
                    ) -> dict[str, Any]:
    """Both measurements; the result ``meetmesh bench edge --json`` prints."""
    echo = await _echo(requests, concurrency, latency_requests, rounds)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "zmq": zmq.zmq_version()},
        "echo": echo, "llm": await _llm(tokens, llm_rounds) if llm else {"skipped": "--no-llm"}}
    added = echo["added_ms"]["p99"]
    result["targets"] = {"added_p99_ms": {"target": TARGET_ADDED_P99_MS, "measured": added,
                                          "met": added <= TARGET_ADDED_P99_MS}}
    if "ratio" in result["llm"]:
        ratio = result["llm"]["ratio"]
        result["targets"]["tokens_ratio"] = {"target": TARGET_TOKEN_RATIO, "measured": ratio,
                                             "met": ratio >= TARGET_TOKEN_RATIO}
    result["notes"] = [
        "echo: non-streamed requests; bridge = EdgeBridge.complete() here + an echo node process; raw = a "
        "pyzmq ROUTER here + a DEALER process echoing the same request bytes; both asyncio",
        "llm: greedy, same prompt and tokens; direct = Llama.create_completion(stream=True) on a thread of "
        "this process; bridge = EdgeBridge.infer() streaming from a node process; one at a time",
        "per side: medians of the rounds; added_ms and ratio: medians of the per-round differences and "
        "ratios (each round runs both sides back to back); the machine is shared (2 cores)"]
    return result


def print_result(r: dict[str, Any]) -> None:
    """The result as tables."""
    from rich.console import Console
    from rich.table import Table

    echo = r["echo"]
    t = Table(title=f"bench edge: echo, {echo['rounds']} rounds (medians)")
    for col in ("", "raw pyzmq", "bridge + node", "bridge adds"):
        t.add_column(col, justify="right")
    t.add_row(f"requests/s ({echo['concurrency']} in flight)", str(echo["raw"]["requests_per_s"]),
              str(echo["bridge"]["requests_per_s"]), f"x{echo['throughput_ratio']}")
    for p in ("p50", "p99"):
        t.add_row(f"latency {p} ms", str(echo["raw"][f"{p}_ms"]), str(echo["bridge"][f"{p}_ms"]),
                  f"{echo['added_ms'][p]:+.3f}")
    console = Console()
    console.print(t)
    llm = r["llm"]
    if "skipped" in llm:
        console.print(f"llm: skipped ({llm['skipped']})")
    else:
        u = Table(title=f"bench edge: {llm['model']}, {llm['max_tokens']} tokens (medians)")
        for col in ("", "llama-cpp direct", "bridge + node"):
            u.add_column(col, justify="right")
        for key in ("tokens_per_s", "decode_tokens_per_s", "first_token_ms"):
            u.add_row(key, str(llm["direct"][key]), str(llm["bridge"][key]))
        console.print(u)
    for name, target in r["targets"].items():
        console.print(f"target {name} {target['target']}: {target['measured']} "
                      f"{'met' if target['met'] else 'NOT met'}")


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m meetmesh.bench.edge", description=__doc__)
    parser.add_argument("role", choices=["echo"])
    parser.add_argument("endpoint")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_echo_peer(args.endpoint))


if __name__ == "__main__":
    _main()
