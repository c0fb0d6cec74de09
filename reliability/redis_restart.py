"""``meetmesh chaos redis``: a private Redis (AOF ``everysec``) restarted under load, gracefully
(``SHUTDOWN``) and with SIGKILL, while producers enqueue, workers run and a gateway serves.

What it proves: after a graceful restart every acknowledged enqueue is still there; after a SIGKILL
only enqueues acknowledged in the last second or two before it (the AOF's fsync window) may be gone;
producers, worker processes and the gateway carry on by themselves (no process is restarted), the
gateway's ``/ready`` answers 503 while Redis is away, and a WebSocket client submitting through the
gateway throughout gets its completions pushed again after; and every task that survived completes.
The time each part took to recover, counted from the moment Redis answered again, is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shared.bus import BusConnectionError, Priority, Queue
from shared.bus.connection import client

from . import children
from .apps import WORK_TYPE, total_key
from .servers import PrivateRedis, free_port
from .workers import QUEUE, registered, statuses

PREFIX = "chaos"
PRIORITIES = [Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW]
FSYNC_WINDOW = 2.0  # everysec: Redis fsyncs each second; its docs allow up to 2 s lost on a crash


@dataclass
class RedisConfig:
    modes: tuple[str, ...] = ("graceful", "kill")
    producers: int = 2
    rate: float = 200.0  # enqueues per second, per producer
    workers: int = 2
    concurrency: int = 10
    work_ms: int = 5
    lease: float = 2.0
    warm: float = 3.0  # seconds of load before each stop
    down: float = 3.0  # seconds Redis stays away
    settle: float = 20.0  # at most this long for every part to recover after a restart
    gateway: bool = True
    deadline: float = 120.0  # for the surviving tasks to complete at the end
    seed: int | None = None


@dataclass
class Restart:
    """One stop and start of Redis."""

    mode: str
    acknowledged_before: int  # enqueues acknowledged before the stop
    missing_after: int  # of those, no record after the restart
    missing_window_s: float | None  # how long before the stop the oldest missing one was acknowledged
    down_s: float  # from the stop until Redis answered again
    producer_errors: int  # enqueues answered "unavailable" meanwhile (not acknowledged: not counted)
    producer_recovery_s: float | None  # Redis back -> the first enqueue acknowledged
    worker_recovery_s: float | None  # Redis back -> the first task completed by a worker
    gateway_recovery_s: float | None  # Redis back -> /ready answers 200
    gateway_not_ready_seen: bool  # /ready answered 503 (or nothing) while Redis was away
    socket_recovery_s: float | None  # Redis back -> the first task completion pushed over a WebSocket
    processes_died: int  # worker and gateway processes that died meanwhile (0: they reconnect)


@dataclass
class RedisSummary:
    acknowledged: int
    completed: int
    lost_to_kill: int  # acknowledged, gone with a SIGKILL inside the fsync window
    lost: int  # acknowledged, survived the restarts, but never completed: must be 0
    socket_submitted: int = 0  # tasks a WebSocket client submitted through the gateway (accepted)
    socket_completed: int = 0  # of those, completions pushed back over the socket
    socket_errors: int = 0  # error frames (``unavailable`` while Redis was away)
    socket_reconnects: int = 0  # the socket closed and was opened again
    restarts: list[Restart] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        for r in self.restarts:
            if r.mode == "graceful" and r.missing_after:
                return False
            if r.missing_window_s is not None and r.missing_window_s > FSYNC_WINDOW:
                return False
            if None in (r.producer_recovery_s, r.worker_recovery_s) or r.processes_died:
                return False
            if r.gateway_recovery_s is not None and (not r.gateway_not_ready_seen
                                                     or r.socket_recovery_s is None):
                return False
        return self.lost == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def shutdown_command(port: int) -> None:
    """Send ``SHUTDOWN`` (Redis writes and fsyncs its AOF, then exits)."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"SHUTDOWN\r\n")
        s.recv(64)


class Producer:
    """Enqueues at a steady rate on its own client; remembers when each enqueue was acknowledged."""

    def __init__(self, url: str, rate: float, work_ms: int, rng: random.Random) -> None:
        self.redis = client(url)
        self.queue = Queue(QUEUE, self.redis, prefix=PREFIX)
        self.rate = rate
        self.work_ms = work_ms
        self.rng = rng
        self.acked: dict[str, float] = {}
        self.errors = 0
        self.last_ack = 0.0

    async def run(self) -> None:
        while True:
            try:
                done = await self.queue.enqueue(WORK_TYPE, {"ms": self.work_ms},
                                                priority=self.rng.choice(PRIORITIES))
            except BusConnectionError:
                self.errors += 1
            else:
                self.last_ack = time.monotonic()
                self.acked[done.id] = self.last_ack
            await asyncio.sleep(1 / self.rate)


class SocketClient:
    """A WebSocket user of the gateway: submits a task every 100 ms (``ai.chat``, served by a worker
    of queue ``ai``) and notes when each completion is pushed back; reconnects if the socket ends."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.accepted: set[str] = set()
        self.completed: dict[str, float] = {}
        self.errors = 0
        self.reconnects = 0

    async def run(self) -> None:
        from websockets.asyncio.client import connect as ws_connect
        from websockets.exceptions import ConnectionClosed

        n = 0
        while True:
            try:
                async with ws_connect(self.url, subprotocols=["bearer", self.token]) as ws:  # type: ignore[list-item]
                    reader = asyncio.create_task(self._read(ws))
                    try:
                        while not reader.done():
                            n += 1
                            await ws.send(json.dumps({"type": "submit", "id": f"s{n}", "task": "ai.chat",
                                                      "data": {"n": n, "ms": 2}}))
                            await asyncio.sleep(0.1)
                    finally:
                        reader.cancel()
                        await asyncio.gather(reader, return_exceptions=True)
            except (ConnectionClosed, OSError):
                pass
            self.reconnects += 1
            await asyncio.sleep(0.2)

    async def _read(self, ws: Any) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            kind, task_id = frame.get("type"), frame.get("task_id")
            if kind == "error":
                self.errors += 1
            elif kind == "accepted" and task_id:
                self.accepted.add(task_id)
            elif frame.get("status") == "completed" and task_id:
                self.completed.setdefault(task_id, time.monotonic())


async def _ready_loop(url: str, seen: list[tuple[float, int]]) -> None:
    """Poll the gateway's /ready every 50 ms: (time, status; 0 for no answer)."""
    async with httpx.AsyncClient(timeout=2.0) as http:
        while True:
            try:
                status = (await http.get(url)).status_code
            except httpx.HTTPError:
                status = 0
            seen.append((time.monotonic(), status))
            await asyncio.sleep(0.05)


async def _wait_for(check: Any, timeout: float) -> float | None:
    """Seconds until ``await check()`` is true, or None after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    return None


async def run_redis(config: RedisConfig, *, progress: Any = None) -> RedisSummary:
    say = progress or (lambda text: None)
    rng = random.Random(config.seed)
    logs = Path(tempfile.mkdtemp(prefix="meetmesh-chaos-redis-"))
    restarts: list[Restart] = []
    async with PrivateRedis() as server:
        secret = secrets.token_hex(32)
        env = children.child_env(server.url, PREFIX, MEETMESH_JWT_SECRET=secret, MEETMESH_ENV="dev")
        pool = [children.worker(QUEUE, env, logs / f"worker-{n}.log", concurrency=config.concurrency,
                                lease=config.lease, max_retries=20) for n in range(config.workers)]
        if config.gateway:  # the WebSocket client's tasks (ai.chat) go to queue "ai"
            pool.append(children.worker("ai", env, logs / "worker-ai.log", concurrency=config.concurrency,
                                        lease=config.lease, max_retries=20, app="reliability.soak:router"))
        port = free_port()
        gateway = children.gateway(env, logs / "gateway.log", port) if config.gateway else None
        watcher = client(server.url)  # the scenario's own eyes; reconnects like everyone else
        queue = Queue(QUEUE, watcher, prefix=PREFIX)
        producers = [Producer(server.url, config.rate, config.work_ms, rng) for _ in range(config.producers)]
        tasks: list[asyncio.Task[None]] = []
        ready_seen: list[tuple[float, int]] = []
        socket: SocketClient | None = None
        socket_task: asyncio.Task[None] | None = None
        try:
            ai = Queue("ai", watcher, prefix=PREFIX)
            await asyncio.gather(*(registered(queue if n < config.workers else ai, c)
                                   for n, c in enumerate(pool)))
            if gateway is not None:
                ready_url = f"http://127.0.0.1:{port}/ready"
                tasks.append(asyncio.create_task(_ready_loop(ready_url, ready_seen)))
                if await _wait_for(lambda: _last_status(ready_seen, 200), 60.0) is None:
                    raise RuntimeError(f"the gateway never became ready:\n{gateway.tail()}")
                from gateway.auth import mint

                socket = SocketClient(f"ws://127.0.0.1:{port}/ws", mint(secret, "chaos-socket"))
                socket_task = asyncio.create_task(socket.run())
                tasks.append(socket_task)
            say(f"{len(pool)} workers{' and a gateway' if gateway else ''} up on {server.url}")
            tasks += [asyncio.create_task(p.run()) for p in producers]
            for mode in config.modes:
                await asyncio.sleep(config.warm)
                watched = [*pool, *([gateway] if gateway else [])]
                restarts.append(await _restart(mode, server, producers, watched, watcher, ready_seen,
                                               socket, config))
                say(f"{mode}: {restarts[-1]}")
            for t in tasks:
                if t is not socket_task:
                    t.cancel()  # the socket client goes on until its tasks are drained
            if socket_task is not None:
                await asyncio.sleep(0.5)  # its last submissions answered
                socket_task.cancel()
            acked = {i: t for p in producers for i, t in p.acked.items()}

            async def drained() -> bool:
                k = queue.keys
                async with watcher.pipeline(transaction=False) as pipe:
                    for key in (k.ready, k.delayed, k.leases):
                        pipe.zcard(key)
                    return bool(sum(await pipe.execute()) == 0)

            await _wait_for(drained, config.deadline)
            if socket is not None:  # the last completions are pushed just after their tasks settle
                await _wait_for(lambda: _all_pushed(socket), 5.0)
            states = await statuses(queue, list(acked))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for child in [*pool, *([gateway] if gateway else [])]:
                await child.terminate(10)
            for p in producers:
                await p.redis.aclose()
            await watcher.aclose()
    missing = states.get("None", 0)
    completed = states.get("completed", 0)
    summary = RedisSummary(acknowledged=len(acked), completed=completed, lost_to_kill=missing,
                           lost=len(acked) - completed - missing, restarts=restarts)
    if socket is not None:
        summary.socket_submitted = len(socket.accepted)
        summary.socket_completed = len(socket.accepted & socket.completed.keys())
        summary.socket_errors, summary.socket_reconnects = socket.errors, socket.reconnects
    children.tidy(logs, summary.ok, say)
    return summary


async def _pushed_after(socket: SocketClient, back: float) -> bool:
    return any(t > back for t in socket.completed.values())


async def _all_pushed(socket: SocketClient) -> bool:
    return socket.accepted <= socket.completed.keys()


async def _last_status(seen: list[tuple[float, int]], status: int) -> bool:
    return bool(seen) and seen[-1][1] == status


async def _restart(mode: str, server: PrivateRedis, producers: list[Producer], pool: list[children.Child],
                   watcher: Any, ready_seen: list[tuple[float, int]], socket: SocketClient | None,
                   config: RedisConfig) -> Restart:
    with_gateway = socket is not None
    errors_before = sum(p.errors for p in producers)
    stopped = time.monotonic()
    before = {i: t for p in producers for i, t in p.acked.items() if t <= stopped}
    if mode == "graceful":
        shutdown_command(server.port)
        await server.shutdown()  # waits for the exit (SIGTERM is also a graceful shutdown)
    else:
        await server.kill()
    ready_mark = len(ready_seen)
    await asyncio.sleep(config.down)
    await server.start()
    back = time.monotonic()
    total_then = int(await _retrying(lambda: watcher.get(total_key(PREFIX))) or 0)

    async def produced() -> bool:
        return any(p.last_ack > back for p in producers)

    async def worked() -> bool:
        return int(await _retrying(lambda: watcher.get(total_key(PREFIX))) or 0) > total_then

    async def gateway_ready() -> bool:
        return any(t > back and s == 200 for t, s in ready_seen[ready_mark:])

    _, worker_s = await asyncio.gather(_wait_for(produced, config.settle), _wait_for(worked, config.settle))
    if with_gateway:
        await _wait_for(gateway_ready, config.settle)
    # recoveries read off the timelines: the first acknowledged enqueue, the first 200 from /ready
    first_ack = min((t for p in producers for t in p.acked.values() if t > back), default=None)
    first_ready = min((t for t, s in ready_seen[ready_mark:] if t > back and s == 200), default=None)
    producer_s = None if first_ack is None else first_ack - back
    gateway_s = None if first_ready is None else first_ready - back
    socket_s = None
    if socket is not None:
        await _wait_for(lambda: _pushed_after(socket, back), config.settle)
        first_push = min((t for t in socket.completed.values() if t > back), default=None)
        socket_s = None if first_push is None else first_push - back
    not_ready_seen = any(t < back and s != 200 for t, s in ready_seen[ready_mark:])
    present = await _exists(watcher, Queue(QUEUE, watcher, prefix=PREFIX), list(before))
    gone = [i for i in before if i not in present]
    return Restart(
        mode=mode, acknowledged_before=len(before), missing_after=len(gone),
        missing_window_s=round(stopped - min(before[i] for i in gone), 3) if gone else None,
        down_s=round(back - stopped, 2), producer_errors=sum(p.errors for p in producers) - errors_before,
        producer_recovery_s=_round(producer_s), worker_recovery_s=_round(worker_s),
        gateway_recovery_s=_round(gateway_s), gateway_not_ready_seen=not_ready_seen,
        socket_recovery_s=_round(socket_s),
        processes_died=sum(not c.alive for c in pool))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


async def _retrying(call: Any, attempts: int = 50) -> Any:
    for n in range(attempts):
        try:
            return await call()
        except Exception:
            if n == attempts - 1:
                raise
            await asyncio.sleep(0.1)
    return None


async def _exists(redis: Any, queue: Queue, ids: list[str]) -> set[str]:
    present: set[str] = set()
    for start in range(0, len(ids), 5000):
        chunk = ids[start:start + 5000]
        async with redis.pipeline(transaction=False) as pipe:
            for task_id in chunk:
                pipe.exists(queue.keys.task(task_id))
            present.update(i for i, e in zip(chunk, await pipe.execute(), strict=True) if e)
    return present


def describe(summary: RedisSummary) -> dict[str, Any]:
    """The summary flattened for the CLI's table (one row per restart)."""
    flat: dict[str, Any] = {k: v for k, v in summary.as_dict().items() if k != "restarts"}
    for r in summary.restarts:
        flat[r.mode] = ", ".join(f"{k}={v}" for k, v in asdict(r).items() if k != "mode")
    return flat

