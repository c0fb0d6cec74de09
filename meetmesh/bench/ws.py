"""``meetmesh bench ws``: how many WebSockets one gateway process holds and what each costs in RSS, then
the submit-to-result round trip (gateway, dispatcher, queue, a no-op service, relay, back) at a fixed rate
with every socket still held.

Everything runs as in production, each in its own process: ``meetmesh gateway`` (uvicorn, its defaults),
``meetmesh worker --queue ai --app meetmesh.bench.ws:noop_router``, and client processes
(``python -m meetmesh.bench.ws client ...``) that open the sockets, wait for each ``welcome``, and hold
them. The first client process then sends ``submit`` frames over 100 of its sockets, round-robin,
the i-th at t0 + i/rate, and times each from just before its frame is sent to its ``result`` frame.
The run uses a key prefix of its own and deletes its keys at the end.

``--gateways N`` runs N gateway processes (N ports, as behind a load balancer) on the same Redis, and
every client process spreads its sockets over them round-robin, the round-trip sockets too: a task
submitted through one gateway is relayed by whichever holds the relay lease, and reaches the other
through the broadcast. RSS and CPU are then the sum over the gateways; the socket and RSS targets
are for one process and are only judged with one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import resource
import secrets
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from gateway.metrics import sample_loop_lag
from shared.bus import ConfigError, Context, Router
from shared.bus.queue.records import percentile

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/8"  # db 8 for benches; the tests use db 9
TARGET_SOCKETS = 10_000
TARGET_KB_PER_SOCKET = 100.0
TARGET_P99_MS = 10.0
TASK_TYPE = "ai.chat"
NOOP_QUEUE = "ai"  # the queue TASK_TYPE routes to, which the no-op worker serves
LATENCY_SOCKETS = 100  # held sockets the round-trip phase submits over, round-robin
PER_PROCESS = 2_500  # sockets per client process
CONNECTING = 50  # handshakes in flight per client process
WARMUP_TASKS = 50
SPARE_FILES = 1_000  # descriptors beyond one per socket: Redis pools, logs, the listener

noop_router = Router()


@noop_router.handler(TASK_TYPE)
async def noop(ctx: Context) -> None:
    """The no-op service: answers at once, with nothing."""


# -- the client processes ------------------------------------------------------------------------


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _open(url: str, token: str, errors: dict[str, int]) -> Any:
    """A socket past its ``welcome`` (three tries), or None."""
    from websockets.asyncio.client import connect

    last = "?"
    for attempt in range(3):
        ws = None
        try:
            ws = await connect(
                url, subprotocols=["bearer", token],  # type: ignore[list-item]  # the token never in a URL
                ping_interval=None, open_timeout=60, close_timeout=5, max_size=8 << 20
            )  # compression: deflate offered, as browsers do
            frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if frame.get("type") == "welcome":
                return ws
            last = f"first frame was {frame.get('type')!r}, not welcome"
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"[:200]
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        await asyncio.sleep(0.5 * (attempt + 1))
    errors[last] = errors.get(last, 0) + 1
    return None


async def _round_trips(sockets: list[Any], tasks: int, rate: float,
                       go: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    """Submit ``tasks`` tasks at ``rate`` over ``sockets`` round-robin; per task, ms from just before the
    submit frame is sent to its ``result`` frame (and to its ``accepted`` frame). After the warm-up
    it says ``measuring`` and waits for ``go()``: the orchestrator takes its readings (a scrape of the
    gateway's metrics, Redis's INFO) before the first measured task, not during it."""
    sent: dict[str, float] = {}  # request id -> when its frame went
    accepted: dict[str, tuple[str, float]] = {}  # request id -> task id, when accepted
    results: dict[str, tuple[float, str]] = {}  # task id -> when its result came, status
    started: dict[str, float] = {}  # task id -> when its "processing" status came
    errors: list[dict[str, Any]] = []
    expected = 0
    all_in = asyncio.Event()

    async def read(ws: Any) -> None:
        async for text in ws:
            now = time.perf_counter()
            frame = json.loads(text)
            kind = frame.get("type")
            if kind == "accepted":
                accepted[frame["id"]] = (frame["task_id"], now)
            elif kind == "result":
                results[frame["task_id"]] = (now, frame.get("status", "?"))
                if len(results) >= expected:
                    all_in.set()
            elif kind == "status" and frame.get("status") == "processing":
                started.setdefault(frame["task_id"], now)
            elif kind == "error":
                errors.append(frame)

    async def send(n: int, first: int, at_rate: float) -> tuple[float, float]:
        nonlocal expected
        expected += n
        all_in.clear()
        lag, start = 0.0, time.perf_counter()
        for i in range(first, first + n):
            pause = start + (i - first) / at_rate - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)
            else:
                lag = max(lag, -pause)
            request = f"r{i}"
            frame = f'{{"type":"submit","id":"{request}","task":"{TASK_TYPE}","data":{{"n":{i}}}}}'
            sent[request] = time.perf_counter()
            await sockets[i % len(sockets)].send(frame)
        return time.perf_counter() - start, lag

    late: list[float] = []  # how late this process's loop ran a timer, ms (as the gateway's metric)

    readers = [asyncio.create_task(read(ws)) for ws in sockets]
    try:
        await send(WARMUP_TASKS, 0, min(rate, 200.0))  # warms the worker, the relay and both ends' code
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), 30)
        warm = len(results)
        await asyncio.sleep(0.5)
        _emit({"event": "measuring"})
        await go()
        readers.append(asyncio.create_task(sample_loop_lag(lambda lag: late.append(lag * 1000.0))))
        took, lag = await send(tasks, WARMUP_TASKS, rate)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), 30 + tasks / rate)
        _emit({"event": "measured"})
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    round_trip: list[float] = []
    to_accepted: list[float] = []
    to_processing: list[float] = []
    statuses: dict[str, int] = {}
    wall = time.time() - time.perf_counter()  # perf_counter -> epoch seconds, to set beside Redis's clock
    traces: list[tuple[str, float, float]] = []  # completed tasks: id, sent and result, epoch ms
    for i in range(WARMUP_TASKS, WARMUP_TASKS + tasks):
        request = f"r{i}"
        if request not in accepted:
            continue
        task_id, at = accepted[request]
        to_accepted.append((at - sent[request]) * 1000.0)
        if task_id in started:
            to_processing.append((started[task_id] - sent[request]) * 1000.0)
        if task_id in results:
            done, status = results[task_id]
            statuses[status] = statuses.get(status, 0) + 1
            round_trip.append((done - sent[request]) * 1000.0)
            traces.append((task_id, (sent[request] + wall) * 1000.0, (done + wall) * 1000.0))
    return {
        "warmup_completed": warm,
        "sent": tasks,
        "accepted": len(to_accepted),
        "completed": statuses.get("completed", 0),
        "statuses": statuses,
        "sent_per_s": round(tasks / took, 1),
        "max_send_lag_ms": round(lag * 1000.0, 3),
        "round_trip_ms": round_trip,
        "accepted_ms": to_accepted,
        "processing_ms": to_processing,
        "errors": errors[:5],
        "error_count": len(errors),
        "client_loop_lag_ms": late,
        "traces": traces,
    }


async def _client(urls: list[str], first: int, count: int) -> None:
    """Open ``count`` sockets (users bench-<first>...; socket n on ``urls[n % len(urls)]``), report,
    then obey commands on stdin."""
    from gateway.auth import mint

    secret = os.environ["MEETMESH_JWT_SECRET"]
    errors: dict[str, int] = {}
    gate = asyncio.Semaphore(CONNECTING)
    held = 0

    async def one(n: int) -> Any:
        nonlocal held
        async with gate:
            ws = await _open(urls[n % len(urls)], mint(secret, f"bench-{n}"), errors)
        held += ws is not None
        return ws

    async def progress() -> None:
        while True:
            await asyncio.sleep(1.0)
            _emit({"event": "progress", "held": held})

    start = time.perf_counter()
    ticker = asyncio.create_task(progress())
    opened = await asyncio.gather(*(one(first + k) for k in range(count)))
    ticker.cancel()
    sockets = [ws for ws in opened if ws is not None]
    # The load generator's own pauses must not land in what it measures: its sockets are long-lived,
    # so take them out of the collector's sight (the gateway does the same with its own).
    gc.collect()
    gc.freeze()
    deflate = bool(sockets) and "permessage-deflate" in (
        sockets[0].response.headers.get("Sec-WebSocket-Extensions") or ""
    )
    _emit(
        {
            "event": "held",
            "held": len(sockets),
            "failed": count - len(sockets),
            "errors": errors,
            "seconds": time.perf_counter() - start,
            "deflate": deflate,
        }
    )

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    while line := await stdin.readline():
        command = json.loads(line)
        if command["cmd"] == "round_trips":
            subset = sockets[: command["sockets"]]
            done = await _round_trips(subset, command["tasks"], command["rate"], stdin.readline)  # "go"
            _emit({"event": "round_trips", **done})
        elif command["cmd"] == "count":
            from websockets.protocol import State

            _emit({"event": "count", "open": sum(ws.state is State.OPEN for ws in sockets)})
        else:
            break
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True), 15)


# -- the orchestrating side ----------------------------------------------------------------------


class _Child:
    """A process of the run: its own session (so its whole group can be signalled), stderr to a file."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.name, self.proc, self.stderr = name, proc, stderr

    @classmethod
    async def spawn(
        cls, name: str, argv: list[str], env: dict[str, str], work: Path, pipes: bool = False
    ) -> _Child:
        stderr = work / f"{name}.stderr"
        err = stderr.open("wb")  # a local file: nothing to wait for
        try:
            pipe = asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL
            proc = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=pipe, stdout=pipe, stderr=err, start_new_session=True, limit=32 << 20
            )
        finally:
            err.close()
        return cls(name, proc, stderr)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check(self) -> None:
        if self.proc.returncode is not None:
            tail = self.stderr.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"bench {self.name} exited with {self.proc.returncode}:\n{tail}")

    async def read(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next event of ``kind`` from its stdout (progress events are skipped)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                left = max(0.1, deadline - time.monotonic())
                line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            except TimeoutError:
                raise TimeoutError(f"bench {self.name}: no {kind} within {timeout:.0f}s") from None
            if not line:
                await asyncio.sleep(0.1)
                self.check()
                raise RuntimeError(f"bench {self.name} closed its output")
            event: dict[str, Any] = json.loads(line)
            if event["event"] == kind:
                return event

    def log_tail(self, lines: int = 20) -> list[str]:
        """The last ``lines`` lines it wrote to stderr."""
        try:
            return self.stderr.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    async def tell(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()

    async def stop(self, grace: float = 15.0) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # anything it left behind in its group
            os.killpg(self.proc.pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _raise_file_limit(clients: int) -> int:
    """Soft open-files limit := hard, inherited by every process started after; the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = clients + SPARE_FILES
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ConfigError(
            f"{clients} sockets need an open-files limit of at least {need}, but the hard limit "
            f"(ulimit -Hn) is {hard}: raise it (limits.conf / systemd LimitNOFILE / docker --ulimit "
            f"nofile={need}:{need}) or run fewer --clients"
        )
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard if hard != resource.RLIM_INFINITY else -1


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _machine_jiffies() -> tuple[int, int] | None:
    """Busy and total CPU time of the whole machine, in clock ticks (/proc/stat), or None off Linux."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, first[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


async def _redis_cpu_s(redis_url: str) -> float:
    """Redis's own CPU time so far (user + system, all its threads), from INFO cpu."""
    from shared.bus import connect

    redis = await connect(redis_url)
    try:
        info = await redis.info("cpu")
    finally:
        await redis.aclose()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _cpu_now(pids: list[int], worker: int, client: int, redis_url: str) -> dict[str, Any]:
    """CPU used so far by the gateways (summed), the worker, the measuring client and Redis, the
    machine's busy and total ticks, and the monotonic time: two of these frame a window."""
    return {"gateways": sum(map(_cpu_s, pids)), "worker": _cpu_s(worker), "client": _cpu_s(client),
            "redis": await _redis_cpu_s(redis_url), "machine": _machine_jiffies(), "at": time.monotonic()}


def _cpu_window(before: dict[str, Any], after: dict[str, Any], tasks: int) -> dict[str, Any]:
    """What each process of the path cost per task over the window, and how busy the machine was."""
    wall = after["at"] - before["at"]
    per_task = {f"{name}_cpu_us_per_task": round((after[name] - before[name]) * 1e6 / tasks, 1)
                for name in ("worker", "client", "redis")}
    out: dict[str, Any] = {
        "gateway_cpu_pct": round((after["gateways"] - before["gateways"]) * 100 / wall, 1),
        "gateway_cpu_us_per_task": round((after["gateways"] - before["gateways"]) * 1e6 / tasks, 1),
        **per_task,
        "machine_busy_cores": None,
    }
    if before["machine"] is not None and after["machine"] is not None:
        busy = after["machine"][0] - before["machine"][0]
        total = after["machine"][1] - before["machine"][1]
        if total > 0:
            out["machine_busy_cores"] = round(busy / total * (os.cpu_count() or 1), 2)
    return out


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _summary(samples: list[float]) -> dict[str, float | None]:
    ordered = sorted(samples)
    return {
        "p50_ms": _ms(percentile(ordered, 50)),
        "p95_ms": _ms(percentile(ordered, 95)),
        "p99_ms": _ms(percentile(ordered, 99)),
        "max_ms": _ms(ordered[-1] if ordered else None),
    }


async def _wait_ready(base: str, gateway: _Child, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as http:
        while True:
            gateway.check()
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{base}/ready")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway was not ready within {timeout:.0f}s")
            await asyncio.sleep(0.1)


async def _warm_up(ws_url: str, token: str) -> None:
    """One socket, one task through the whole path: the worker is up and the relay reads."""
    from websockets.asyncio.client import connect

    async with connect(ws_url, subprotocols=["bearer", token], ping_interval=None) as ws:  # type: ignore[list-item]
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.send(json.dumps({"type": "submit", "id": "warm", "task": TASK_TYPE, "data": {}}))
        async with asyncio.timeout(60):
            while json.loads(await ws.recv())["type"] != "result":
                pass


async def _gateway_stats(bases: list[str], token: str) -> dict[str, Any]:
    """The session counters of the gateways, added up, and ``attached_each``: each one's sockets."""
    import httpx

    total: dict[str, Any] = {}
    each: list[int] = []
    async with httpx.AsyncClient(timeout=30.0) as http:
        for base in bases:
            r = await http.get(f"{base}/api/v1/stats", headers={"Authorization": f"Bearer {token}"})
            r.raise_for_status()
            sessions = r.json()["gateway"]["sessions"]
            for name, value in sessions.items():
                total[name] = total.get(name, 0) + value
            each.append(sessions["attached"])
    return {**total, "attached_each": each}


async def _loop_lag(bases: list[str], token: str) -> dict[float, float]:
    """The gateways' ``meetmesh_gateway_loop_lag_seconds`` histograms, added up: samples at or
    under each bucket's bound (``inf``: all of them)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total: dict[float, float] = {}
    async with httpx.AsyncClient(timeout=30.0) as http:
        for base in bases:
            r = await http.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token}"})
            r.raise_for_status()
            for family in text_string_to_metric_families(r.text):
                if family.name != "meetmesh_gateway_loop_lag_seconds":
                    continue
                for sample in family.samples:
                    if sample.name.endswith("_bucket"):
                        bound = float(sample.labels["le"])
                        total[bound] = total.get(bound, 0.0) + sample.value
    return total


def _lag_summary(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """What the gateways' loop-lag samples say about the window between two `_loop_lag` readings:
    how many, how many came over 5 and 10 ms late, and the bucket bound under which 99 % came."""
    delta = {bound: after.get(bound, 0.0) - before.get(bound, 0.0) for bound in sorted(after)}
    samples = delta.get(math.inf, 0.0)
    p99 = next((bound for bound, n in delta.items() if samples and n >= 0.99 * samples), None)
    return {
        "samples": int(samples),
        "over_5ms": int(samples - delta.get(0.005, 0.0)),
        "over_10ms": int(samples - delta.get(0.01, 0.0)),
        "p99_at_most_ms": None if p99 is None or p99 == math.inf else p99 * 1000,
    }


def _late_summary(late_ms: list[float]) -> dict[str, Any]:
    """`_lag_summary`'s figures from raw lateness samples (ms)."""
    ordered = sorted(late_ms)
    p99 = percentile(ordered, 99)
    return {
        "samples": len(ordered),
        "over_5ms": sum(x > 5 for x in ordered),
        "over_10ms": sum(x > 10 for x in ordered),
        "p99_ms": None if p99 is None else round(p99, 3),
    }


async def _segments(redis_url: str, prefix: str, traces: list[list[Any]]) -> dict[str, Any]:
    """Where the round trips' time went, from each task's record (server times, in ms) set beside
    the client's clock (the same host's): ``ingress`` (submit frame sent -> enqueued in Redis, through
    the gateway), ``queued`` (-> a worker took it), ``running`` (-> settled: the handler and the
    settle's batching), ``egress`` (-> its
    result frame arrived: settle, relay, gateway). p50 / p99 in ms, to the server's 1 ms resolution."""
    from shared.bus import connect
    from shared.bus.keys import QueueKeys

    keys = QueueKeys(NOOP_QUEUE, prefix)
    redis = await connect(redis_url)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for task_id, _, _ in traces:
                pipe.hmget(keys.task(task_id), ["enq", "started", "finished"])
            stamps = await pipe.execute()
    finally:
        await redis.aclose()
    parts: dict[str, list[float]] = {"ingress": [], "queued": [], "running": [], "egress": []}
    for (_, sent, done), (enq, began, finished) in zip(traces, stamps, strict=True):
        if not (enq and began and finished):
            continue
        enq_ms, began_ms, finished_ms = int(enq), int(began), int(finished)
        for name, value in (("ingress", enq_ms - sent), ("queued", began_ms - enq_ms),
                            ("running", finished_ms - began_ms), ("egress", done - finished_ms)):
            parts[name].append(value)
    out: dict[str, Any] = {}
    for name, values in parts.items():
        ordered = sorted(values)
        out[name] = {"p50_ms": _ms(percentile(ordered, 50)), "p99_ms": _ms(percentile(ordered, 99))}
    return out


async def _drop_keys(redis_url: str, prefix: str) -> int:
    from shared.bus import connect

    redis = await connect(redis_url)
    dropped = 0
    try:
        batch: list[str] = []
        async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                dropped += await redis.unlink(*batch)  # frees in the background
                batch.clear()
        if batch:
            dropped += await redis.unlink(*batch)  # frees in the background
    finally:
        await redis.aclose()
    return dropped


async def run(
    *,
    clients: int = 10_000,
    rate: float = 1000.0,
    tasks: int = 5000,
    redis_url: str = DEFAULT_REDIS_URL,
    per_process: int = PER_PROCESS,
    gateways: int = 1,
) -> dict[str, Any]:
    """Hold ``clients`` sockets on ``gateways`` gateway processes, then time ``tasks`` round trips at
    ``rate``/s."""
    if clients < 1 or tasks < 1 or rate <= 0 or per_process < 1 or gateways < 1:
        raise ConfigError("clients, tasks, per_process and gateways must be >= 1, rate > 0")
    file_limit = _raise_file_limit(clients)
    prefix, secret = f"mmbench-ws-{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(32)
    ports = [_free_port() for _ in range(gateways)]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    ws_urls = [f"ws://127.0.0.1:{port}/ws" for port in ports]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEETMESH_")}
    env.update(
        {
            "MEETMESH_REDIS_URL": redis_url,
            "MEETMESH_KEY_PREFIX": prefix,
            "MEETMESH_JWT_SECRET": secret,
            "MEETMESH_LOG_LEVEL": "WARNING",
            "MEETMESH_SUBMIT_RATE": "1000000",
            "MEETMESH_SUBMIT_BURST": "1000000",
        }
    )
    from gateway.auth import mint

    admin = mint(secret, "bench-admin", admin=True)
    processes = math.ceil(clients / per_process)
    shares = [clients // processes + (k < clients % processes) for k in range(processes)]
    out: dict[str, Any] = {
        "clients": clients,
        "gateways": gateways,
        "rate": rate,
        "tasks": tasks,
        "prefix": prefix,
        "client_processes": processes,
        "open_files_limit": file_limit,
    }
    children: list[_Child] = []
    with tempfile.TemporaryDirectory(prefix="mmbench-ws-") as tmp:
        work = Path(tmp)
        try:
            py = sys.executable
            gws = [
                await _Child.spawn(
                    f"gateway-{k}", [py, "-m", "meetmesh", "gateway", "--port", str(port)], env, work
                )
                for k, port in enumerate(ports)
            ]
            children.extend(gws)
            worker = await _Child.spawn(
                "worker",
                [py, "-m", "meetmesh", "worker", "--queue", NOOP_QUEUE,
                 "--app", "meetmesh.bench.ws:noop_router"],
                env,
                work,
            )
            children.append(worker)
            for base, gw in zip(bases, gws, strict=True):
                await _wait_ready(base, gw)
            for ws_url in ws_urls:
                await _warm_up(ws_url, mint(secret, "bench-warm"))
            await asyncio.sleep(0.5)
            pids = [gw.pid for gw in gws]
            out["rss_mb_before"] = round(sum(map(_rss_mb, pids)), 1)
            cpu0 = sum(map(_cpu_s, pids))

            # 1. open and hold the sockets
            started = time.perf_counter()
            first, clients_ = 0, []
            for k, share in enumerate(shares):
                child = await _Child.spawn(
                    f"client-{k}",
                    [py, "-m", "meetmesh.bench.ws", "client", ",".join(ws_urls), str(first), str(share)],
                    env,
                    work,
                    pipes=True,
                )
                children.append(child)
                clients_.append(child)
                first += share
            timeout = 120 + clients / 20
            held = await asyncio.gather(*(c.read("held", timeout) for c in clients_))
            connect_s = time.perf_counter() - started
            errors: dict[str, int] = {}
            for h in held:
                for text, n in h["errors"].items():
                    errors[text] = errors.get(text, 0) + n
            sockets = sum(h["held"] for h in held)
            await asyncio.sleep(1.0)
            rss_after = sum(map(_rss_mb, pids))
            cpu1 = sum(map(_cpu_s, pids))
            grown = rss_after - out["rss_mb_before"]
            out.update(
                {
                    "sockets_held": sockets,
                    "sockets_failed": clients - sockets,
                    "connect_errors": errors,
                    "connect_s": round(connect_s, 2),
                    "connects_per_s": round(sockets / connect_s, 1),
                    "per_message_deflate": held[0]["deflate"],
                    "rss_mb_after": round(rss_after, 1),
                    "rss_kb_per_socket": round(grown * 1024 / sockets, 1) if sockets else None,
                    "rss_mb_per_1000_sockets": round(grown * 1000 / sockets, 2) if sockets else None,
                    "gateway_cpu_ms_per_connect": round((cpu1 - cpu0) * 1000 / sockets, 3)
                    if sockets
                    else None,
                    "gateway_sessions": await _gateway_stats(bases, admin),
                }
            )

            # 2. round trips over some of the held sockets, at a fixed rate
            subset = min(LATENCY_SOCKETS, held[0]["held"])
            if subset == 0:
                raise RuntimeError("the first client process holds no socket to submit over")
            await clients_[0].tell({"cmd": "round_trips", "tasks": tasks, "rate": rate, "sockets": subset})
            await clients_[0].read("measuring", 120)
            cpu2 = await _cpu_now(pids, worker.pid, clients_[0].pid, redis_url)
            lag2 = await _loop_lag(bases, admin)
            await clients_[0].tell({"cmd": "go"})  # readings taken: now the measured tasks
            await clients_[0].read("measured", 60 + 2 * tasks / rate)
            cpu3 = await _cpu_now(pids, worker.pid, clients_[0].pid, redis_url)
            lag3 = await _loop_lag(bases, admin)
            rt = await clients_[0].read("round_trips", 60)
            completed = rt["completed"]
            out["round_trip"] = {
                "sockets": subset,
                "sent": rt["sent"],
                "accepted": rt["accepted"],
                "completed": completed,
                # accepted but no result frame by the end of the wait (e.g. updates the relay never read)
                "missing_results": rt["accepted"] - sum(rt["statuses"].values()),
                "statuses": rt["statuses"],
                "sent_per_s": rt["sent_per_s"],
                "max_send_lag_ms": rt["max_send_lag_ms"],
                **_summary(rt["round_trip_ms"]),
                # the same clock, to the task's accepted frame and to its "processing" status frame
                "to_accepted": _summary(rt["accepted_ms"]),
                "to_processing": {"frames": len(rt["processing_ms"]), **_summary(rt["processing_ms"])},
                "segments": await _segments(redis_url, prefix, rt["traces"]),
                "errors": rt["errors"],
                "error_count": rt["error_count"],
                # from the first measured submit to the last result (or the wait's end), all of each
                # process's work in that time (the gateway's pings of the held sockets too; all of
                # Redis's, whoever asked), and how many of the machine's cores were busy meanwhile
                **_cpu_window(cpu2, cpu3, tasks),
                # how late the gateways' event loops ran a timer due every 20 ms, meanwhile: the
                # part of the round trip's tail spent waiting in a gateway
                "gateway_loop_lag": _lag_summary(lag2, lag3),
                # the same, in the measuring client process: its own waits count in every figure
                "client_loop_lag": _late_summary(rt["client_loop_lag_ms"]),
                "ok": completed == tasks and rt["error_count"] == 0,
            }

            # 3. still held?
            for c in clients_:
                await c.tell({"cmd": "count"})
            counts = await asyncio.gather(*(c.read("count", 60) for c in clients_))
            out["sockets_open_at_end"] = sum(c["open"] for c in counts)
            out["rss_mb_end"] = round(sum(map(_rss_mb, pids)), 1)
            out["gateway_sessions_end"] = await _gateway_stats(bases, admin)
            for c in clients_:
                with contextlib.suppress(Exception):
                    await c.tell({"cmd": "close"})
            for c in clients_:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(c.proc.wait(), 30)
        finally:
            for child in reversed(children):  # clients first, then the worker, the gateway last
                await child.stop()
            out["keys_dropped"] = await _drop_keys(redis_url, prefix)
            # what the processes logged (warnings and up): empty on a clean run
            logged = {c.name: c.log_tail() for c in children}
            out["logged"] = {name: lines for name, lines in logged.items() if lines}
    out["targets"] = _targets(out)
    out["ok"] = (
        bool(out.get("round_trip", {}).get("ok"))
        and out.get("sockets_held") == clients
        and out.get("sockets_open_at_end") == clients
    )
    out["notes"] = [
        f"gateway: {gateways} x `python -m meetmesh gateway` (uvicorn, its defaults) with "
        "MEETMESH_SUBMIT_RATE and MEETMESH_SUBMIT_BURST 1e6 (one user per socket anyway); with more than "
        "one, sockets are spread over them round-robin and RSS and CPU are their sums",
        f"sockets: {processes} client process(es), websockets with permessage-deflate offered (as "
        "browsers do), no client pings; each counted once its welcome frame arrived",
        "rss: the gateway's VmRSS after one warm-up task, then 1 s after the last socket was welcomed",
        "cpu: per task over the round-trip phase, of the gateways, the worker, the measuring client "
        "and Redis (INFO cpu: all its work then); machine_busy_cores from /proc/stat (every process)",
        "gateway_loop_lag: the gateways' meetmesh_gateway_loop_lag_seconds over the round-trip phase "
        "(a timer due every 20 ms; how late it ran); client_loop_lag: the same in the measuring client",
        "segments: each completed task's record times (Redis's clock, 1 ms resolution) set beside the "
        "client's: ingress = sent -> enqueued, queued -> taken by the worker, running -> settled, egress -> "
        "result frame",
        f"round trip: after {WARMUP_TASKS} warm-up tasks; from just before the submit frame is sent to its "
        "result frame, in the first client process; to_accepted / to_processing: to its accepted frame "
        "/ to its processing status frame",
    ]
    return out


def _targets(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    full = out["clients"] >= TARGET_SOCKETS and out.get("gateways", 1) == 1  # a target for one process
    per_socket = out.get("rss_kb_per_socket")
    p99 = out.get("round_trip", {}).get("p99_ms")
    return {
        "sockets_held": {
            "target": TARGET_SOCKETS,
            "value": out.get("sockets_held"),
            "met": (out.get("sockets_held") or 0) >= TARGET_SOCKETS if full else None,
        },
        "rss_kb_per_socket": {
            "target": TARGET_KB_PER_SOCKET,
            "value": per_socket,
            "met": (per_socket is not None and per_socket <= TARGET_KB_PER_SOCKET) if full else None,
        },
        "p99_ms": {"target": TARGET_P99_MS, "value": p99, "met": p99 is not None and p99 <= TARGET_P99_MS},
    }


# -- the command ---------------------------------------------------------------------------------


def bench_ws_cmd(
    clients: Annotated[int, typer.Option(min=1, help="WebSockets to open and hold.")] = 10_000,
    rate: Annotated[
        float, typer.Option(min=1.0, help="Fixed submit rate of the round-trip phase, tasks/s.")
    ] = 1000.0,
    tasks: Annotated[int, typer.Option(min=1, help="Tasks sent in the round-trip phase.")] = 5000,
    redis_url: Annotated[
        str,
        typer.Option("--redis-url", help="Redis the run uses (under a prefix of its own, deleted after)."),
    ] = DEFAULT_REDIS_URL,
    gateways: Annotated[int, typer.Option(
        min=1, help="Gateway processes to spread the sockets over, round-robin (the socket and RSS "
                    "targets are judged with one).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Sockets one gateway process holds and its RSS per 1,000, then submit-to-result p50/p99 through
    gateway, dispatcher, queue and a no-op service at a fixed rate, every socket still held."""
    from ..common import echo_json
    from ..common import run as run_main

    result = run_main(lambda: run(clients=clients, rate=rate, tasks=tasks, redis_url=redis_url,
                                  gateways=gateways))
    if as_json:
        echo_json(result)
    else:
        _print(result)


def _print(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rt = r["round_trip"]
    t = Table(title=f"bench ws: {r['clients']} sockets on {r['gateways']} gateway(s), {r['tasks']} tasks "
                    f"at {r['rate']:g}/s")
    t.add_column("")
    t.add_column("value", justify="right")
    rows = [
        ("sockets held (welcomed)", f"{r['sockets_held']} of {r['clients']}"),
        ("sockets open at the end", str(r["sockets_open_at_end"])),
        ("connects/s", str(r["connects_per_s"])),
        ("gateway RSS before / after, MB", f"{r['rss_mb_before']} / {r['rss_mb_after']}"),
        ("RSS per socket, KB", str(r["rss_kb_per_socket"])),
        ("RSS per 1,000 sockets, MB", str(r["rss_mb_per_1000_sockets"])),
        ("gateway CPU per connect, ms", str(r["gateway_cpu_ms_per_connect"])),
        ("tasks completed / sent", f"{rt['completed']} / {rt['sent']}"),
        ("sent/s", str(rt["sent_per_s"])),
        (
            "round trip p50 / p95 / p99 / max, ms",
            f"{rt['p50_ms']} / {rt['p95_ms']} / {rt['p99_ms']} / {rt['max_ms']}",
        ),
        ("to accepted p50 / p99, ms", f"{rt['to_accepted']['p50_ms']} / {rt['to_accepted']['p99_ms']}"),
        ("to processing p50 / p99, ms", f"{rt['to_processing']['p50_ms']} / {rt['to_processing']['p99_ms']}"),
        ("gateway CPU per task, µs (busy %)", f"{rt['gateway_cpu_us_per_task']} ({rt['gateway_cpu_pct']}%)"),
        ("worker / Redis / measuring client CPU per task, µs",
         f"{rt['worker_cpu_us_per_task']} / {rt['redis_cpu_us_per_task']} / {rt['client_cpu_us_per_task']}"),
        ("machine: busy cores (of all)", f"{rt['machine_busy_cores']} (of {os.cpu_count()})"),
        (
            "gateway loop lag: samples, over 5 / 10 ms, p99 <=",
            f"{rt['gateway_loop_lag']['samples']}, {rt['gateway_loop_lag']['over_5ms']} / "
            f"{rt['gateway_loop_lag']['over_10ms']}, {rt['gateway_loop_lag']['p99_at_most_ms']} ms",
        ),
        *(
            (f"{name} p50 / p99, ms", f"{part['p50_ms']} / {part['p99_ms']}")
            for name, part in rt["segments"].items()
        ),
        (
            "client loop lag: samples, over 5 / 10 ms, p99",
            f"{rt['client_loop_lag']['samples']}, {rt['client_loop_lag']['over_5ms']} / "
            f"{rt['client_loop_lag']['over_10ms']}, {rt['client_loop_lag']['p99_ms']} ms",
        ),
    ]
    for row in rows:
        t.add_row(*row)
    console = Console()
    console.print(t)
    for name, target in r["targets"].items():
        verdict = (
            "n/a (needs --clients 10000 and one gateway)"
            if target["met"] is None
            else ("met" if target["met"] else "NOT met")
        )
        console.print(f"target {name} {target['target']}: {target['value']} {verdict}")
    for note in r["notes"]:
        console.print(f"note: {note}")


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m meetmesh.bench.ws", description=__doc__)
    parser.add_argument("role", choices=["client"])
    parser.add_argument("urls", help="the gateways' WebSocket URLs, comma-separated")
    parser.add_argument("first", type=int)
    parser.add_argument("count", type=int)
    a = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(_client(a.urls.split(","), a.first, a.count))


if __name__ == "__main__":
    _main()
