"""``meetmesh chaos soak``: the mesh under steady load for N minutes, its memory sampled.

A private Redis (AOF on), one ``meetmesh gateway`` and two ``meetmesh worker`` processes (queue
``ai``), and clients: WebSocket users submitting tasks and reading their frames (each reconnects
every ``reconnect_every`` seconds, so sessions come and go), and one REST user submitting and then
reading each result over ``GET /api/v1/tasks/{id}``. Every ``sample_every`` seconds: the gateway's and the
workers' RSS, Redis ``used_memory``, the memory of the bounded streams (each queue's status stream,
the durable event log) and the number of keys.

The judge: after a warm-up (longer than the completed-record retention, so records have started to
expire), memory should not grow beyond what retention explains. Streams are capped by count and
grow until their cap, so their growth is explained; records expire after ``completed_ttl``, so their
number levels off; what is left (Redis memory less the streams) and the processes' RSS should be
flat. Reported: each slope in MB per minute over the judged window, and the key counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from shared.bus import Context, QueueKeys, Router, connect
from shared.bus.keys import EventKeys

from . import children
from .servers import PrivateRedis, free_port

PREFIX = "chaos-soak"
TASK_TYPE = "ai.chat"  # routed to the "ai" queue by the gateway's default routes
QUEUE = "ai"
MB = 1024 * 1024

router = Router()


@router.handler(TASK_TYPE)
async def chat(ctx: Context) -> dict[str, Any]:
    """A few milliseconds of work and a small answer (about the size of a short chat reply)."""
    data = ctx.payload or {}
    await asyncio.sleep(float(data.get("ms", 5)) / 1000)
    return {"text": "ok " * 20, "n": data.get("n")}


@dataclass
class SoakConfig:
    minutes: float = 10.0
    ws_users: int = 3
    rate: float = 10.0  # submissions per second per WebSocket user
    rest_rate: float = 5.0  # submissions per second of the REST user
    reconnect_every: float = 20.0
    completed_ttl: float = 60.0  # MEETMESH_COMPLETED_TTL of the workers
    replay_window: float = 5.0  # MEETMESH_REPLAY_WINDOW of the gateway: dropped sessions go after it
    sample_every: float = 5.0
    warmup: float | None = None  # seconds not judged; default max(2 x completed_ttl, a third of the run)
    workers: int = 2
    seed: int | None = None


@dataclass
class Sample:
    t: float  # seconds since the start
    gateway_rss_mb: float
    workers_rss_mb: float
    redis_used_mb: float
    streams_mb: float
    keys: int


@dataclass
class SoakSummary:
    minutes: float
    submitted: int
    completed_seen: int  # completion frames over WebSocket, and results read over REST
    errors: int  # error frames and failed requests (rate limits included)
    error_kinds: dict[str, int]
    judged_from_s: float
    gateway_rss_slope: float  # MB/min over the judged window
    workers_rss_slope: float
    redis_slope: float
    streams_slope: float  # explained: streams grow until their cap
    redis_less_streams_slope: float  # should be ~0 once records expire as fast as they come
    keys_at_judge_start: int
    keys_at_end: int
    completed_ttl: float
    samples: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.completed_seen > 0 and all(
            s <= limit for s, limit in ((self.gateway_rss_slope, RSS_SLOPE_LIMIT),
                                        (self.workers_rss_slope, RSS_SLOPE_LIMIT),
                                        (self.redis_less_streams_slope, REDIS_SLOPE_LIMIT)))

    def as_dict(self, with_samples: bool = True) -> dict[str, Any]:
        out = {**asdict(self), "ok": self.ok}
        if not with_samples:
            out.pop("samples")
        return out


# Growth the judge allows in the judged window, MB per minute: allocator noise and warm caches (the
# relay's task cache, uvloop's buffers) over a few minutes; a leak of a few hundred bytes per task at
# this load (~35 tasks/s) is ~0.6 MB/min and shows over a longer soak.
RSS_SLOPE_LIMIT = 2.0
REDIS_SLOPE_LIMIT = 1.0


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / var


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Counters:
    def __init__(self) -> None:
        self.submitted = 0
        self.completed = 0
        self.errors = 0
        self.kinds: Counter[str] = Counter()

    def error(self, kind: str) -> None:
        self.errors += 1
        self.kinds[kind] += 1


async def _ws_user(url: str, token: str, config: SoakConfig, counts: Counters, rng: random.Random) -> None:
    n = 0
    while True:
        try:
            async with ws_connect(url, subprotocols=["bearer", token]) as ws:  # type: ignore[list-item]
                opened = time.monotonic()

                async def read() -> None:
                    async for raw in ws:
                        frame = json.loads(raw)
                        if frame.get("type") == "error":
                            counts.error(f"ws {frame.get('code')}")
                        elif frame.get("status") == "completed" and frame.get("type") != "accepted":
                            counts.completed += 1

                reader = asyncio.create_task(read())
                try:
                    while time.monotonic() - opened < config.reconnect_every * rng.uniform(0.8, 1.2):
                        n += 1
                        await ws.send(json.dumps({"type": "submit", "id": f"s{n}", "task": TASK_TYPE,
                                                  "data": {"n": n, "ms": rng.randint(2, 10)}}))
                        counts.submitted += 1
                        await asyncio.sleep(1 / config.rate)
                finally:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
        except (ConnectionClosed, OSError) as exc:
            counts.error(f"ws {type(exc).__name__}")
            await asyncio.sleep(0.5)


async def _rest_user(base: str, token: str, config: SoakConfig, counts: Counters) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    waiting: list[tuple[float, str]] = []
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10.0) as http:
        n = 0
        while True:
            n += 1
            try:
                answer = await http.post("/api/v1/tasks", json={"type": TASK_TYPE, "data": {"n": n, "ms": 5}})
                if answer.status_code == 202:
                    counts.submitted += 1
                    waiting.append((time.monotonic(), answer.json()["task_id"]))
                else:
                    counts.error(f"POST {answer.status_code}")
                while waiting and time.monotonic() - waiting[0][0] > 1.0:
                    _, task_id = waiting.pop(0)
                    record = await http.get(f"/api/v1/tasks/{task_id}")
                    if record.status_code == 200 and record.json().get("status") == "completed":
                        counts.completed += 1
                    else:
                        counts.error(f"GET {record.status_code} {record.json().get('status', '')}")
            except httpx.HTTPError as exc:
                counts.error(f"http {type(exc).__name__}")
            await asyncio.sleep(1 / config.rest_rate)


async def _streams_mb(redis: Redis) -> float:
    keys = [QueueKeys(q, PREFIX).events for q in ("ai", "media", "meeting", "user")] + [EventKeys(PREFIX).log]
    total = 0
    for key in keys:
        with contextlib.suppress(Exception):
            total += int(await redis.memory_usage(key, samples=0) or 0)
    return total / MB


async def run_soak(config: SoakConfig, *, progress: Any = None) -> SoakSummary:
    from gateway.auth import mint

    say = progress or (lambda text: None)
    rng = random.Random(config.seed)
    logs = Path(tempfile.mkdtemp(prefix="meetmesh-chaos-soak-"))
    secret = secrets.token_urlsafe(32)
    counts = Counters()
    samples: list[Sample] = []
    async with PrivateRedis() as server:
        env = children.child_env(server.url, PREFIX, MEETMESH_JWT_SECRET=secret,
                                 MEETMESH_COMPLETED_TTL=str(config.completed_ttl),
                                 MEETMESH_REPLAY_WINDOW=str(config.replay_window),
                                 MEETMESH_SUBMIT_RATE=str(max(config.rate, config.rest_rate) * 4))
        port = free_port()
        gateway = children.gateway(env, logs / "gateway.log", port)
        workers = [children.worker(QUEUE, env, logs / f"worker-{n}.log", concurrency=20, lease=10.0,
                                   max_retries=3, app="reliability.soak:router")
                   for n in range(config.workers)]
        redis = await connect(server.url)
        base = f"http://127.0.0.1:{port}"
        clients: list[asyncio.Task[None]] = []
        try:
            async with httpx.AsyncClient(timeout=2.0) as http:
                deadline = time.monotonic() + 60
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get(f"{base}/ready")).status_code == 200:
                            break
                    if not gateway.alive or time.monotonic() > deadline:
                        raise RuntimeError(f"the gateway did not become ready:\n{gateway.tail()}")
                    await asyncio.sleep(0.2)
            say(f"gateway on {base}, {len(workers)} workers, Redis {server.url}")
            clients = [asyncio.create_task(_ws_user(f"ws://127.0.0.1:{port}/ws", mint(secret, f"soak-ws-{n}"),
                                                    config, counts, random.Random(rng.random())))
                       for n in range(config.ws_users)]
            clients.append(asyncio.create_task(_rest_user(base, mint(secret, "soak-rest"), config, counts)))
            started = time.monotonic()
            duration = config.minutes * 60
            while (elapsed := time.monotonic() - started) < duration:
                info = await redis.info("memory")
                samples.append(Sample(
                    t=round(elapsed, 1), gateway_rss_mb=round(rss_mb(gateway.pid), 2),
                    workers_rss_mb=round(sum(rss_mb(w.pid) for w in workers), 2),
                    redis_used_mb=round(int(info["used_memory"]) / MB, 3),
                    streams_mb=round(await _streams_mb(redis), 3), keys=int(await redis.dbsize())))
                if len(samples) % 6 == 1:
                    say(f"{samples[-1]} submitted={counts.submitted} completed={counts.completed} "
                        f"errors={counts.errors}")
                for child in (gateway, *workers):
                    if not child.alive:
                        raise RuntimeError(f"a process of the mesh died:\n{child.tail()}")
                await asyncio.sleep(config.sample_every)
        finally:
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            for child in (gateway, *workers):
                await child.terminate(10)
            await redis.aclose()
    warmup = config.warmup if config.warmup is not None else max(2 * config.completed_ttl,
                                                                  config.minutes * 60 / 3)
    judged = [s for s in samples if s.t >= warmup] or samples[-2:]

    def s_of(attr: str) -> float:
        return round(slope([(s.t, getattr(s, attr)) for s in judged]), 3)

    summary = SoakSummary(
        minutes=config.minutes, submitted=counts.submitted, completed_seen=counts.completed,
        errors=counts.errors, error_kinds=dict(counts.kinds), judged_from_s=judged[0].t if judged else 0.0,
        gateway_rss_slope=s_of("gateway_rss_mb"), workers_rss_slope=s_of("workers_rss_mb"),
        redis_slope=s_of("redis_used_mb"), streams_slope=s_of("streams_mb"),
        redis_less_streams_slope=round(slope([(s.t, s.redis_used_mb - s.streams_mb) for s in judged]), 3),
        keys_at_judge_start=judged[0].keys if judged else 0, keys_at_end=judged[-1].keys if judged else 0,
        completed_ttl=config.completed_ttl, samples=samples)
    children.tidy(logs, summary.ok, say)
    return summary

