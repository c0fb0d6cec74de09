"""``meetmesh chaos network``: the link between a worker and Redis slowed, cut and reset mid-run.

One ``meetmesh worker`` process reaches a private Redis only through a `FaultProxy`; the producer and
the scenario's own reads go straight to Redis. Tasks flow at a steady rate through four phases:

1. baseline: the link is clean;
2. delay: every chunk is held ``delay`` seconds each way (throughput under latency is reported);
3. partition: nothing crosses for ``partition`` seconds, longer than the lease, so the worker's leases
   expire while it cannot reach Redis and its tasks are handed out again after the link heals;
4. reset: every connection of the worker is aborted at once, so it must reconnect by itself.

Then production stops and the scenario waits until every task is settled. What it proves: nothing is
lost, the only tasks run twice are tasks the worker held when the link was cut or reset, the worker
process recovered by itself (the same PID did all the work), and how long each recovery took.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.bus import Message, Priority, Queue, connect

from . import children
from .apps import WORK_TYPE, runs_key, total_key
from .faultproxy import FaultProxy
from .servers import PrivateRedis
from .workers import held_by, registered, statuses

QUEUE = "chaos-net"
PREFIX = "chaos-net"
PRIORITIES = [Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW]


@dataclass
class NetworkConfig:
    rate: float = 200.0  # tasks enqueued per second while producing
    baseline: float = 3.0  # seconds of each phase
    delay_phase: float = 4.0
    delay: float = 0.05  # seconds held each way during the delay phase
    partition: float = 4.0  # longer than the lease: leases expire while the worker is cut off
    after_reset: float = 2.0
    lease: float = 2.0
    concurrency: int = 20
    work_ms: tuple[int, int] = (5, 15)
    max_retries: int = 20
    deadline: float = 120.0  # for the drain after production stops
    seed: int | None = None


@dataclass
class NetworkSummary:
    """``lost`` must be 0, every repeat a task held at a cut, and the worker the same process throughout."""

    tasks: int
    completed: int
    lost: int
    executions: int
    repeats: int
    repeats_not_held: int  # repeated tasks the worker did not hold at the partition or the reset: must be 0
    held_at_partition: int
    held_at_reset: int
    connections_reset: int
    worker_restarted: bool  # the worker process died (it must not: it reconnects by itself)
    baseline_tasks_per_second: float
    delayed_tasks_per_second: float
    delay_ms_each_way: float
    partition_seconds: float
    lease_seconds: float
    recovery_after_partition_s: float | None  # heal -> the worker's next finished task
    recovery_after_reset_s: float | None  # reset -> the worker's next finished task
    proxy_connections: int
    seconds: float
    by_status: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.repeats_not_held == 0 and not self.worker_restarted
                and self.recovery_after_partition_s is not None and self.recovery_after_reset_s is not None)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


async def run_network(config: NetworkConfig, *, progress: Any = None) -> NetworkSummary:
    """Run the scenario on a private Redis (AOF on) and return its summary."""
    rng = random.Random(config.seed)
    say = progress or (lambda text: None)
    logs = Path(tempfile.mkdtemp(prefix="meetmesh-chaos-network-"))
    async with PrivateRedis() as server, FaultProxy(server.port) as proxy:
        redis = await connect(server.url)
        queue = Queue(QUEUE, redis, prefix=PREFIX, lease_seconds=config.lease, max_retries=config.max_retries)
        worker = children.worker(QUEUE, children.child_env(proxy.url(), PREFIX), logs / "worker.log",
                                 concurrency=config.concurrency, lease=config.lease,
                                 max_retries=config.max_retries)
        ids: list[str] = []
        try:
            await registered(queue, worker)
            say(f"worker {worker.pid} up, reaching {server.url} through the proxy on port {proxy.port}")

            async def produce() -> None:
                tick = 0.05
                owed = 0.0
                while True:
                    owed += config.rate * tick
                    n, owed = int(owed), owed - int(owed)
                    if n:
                        messages = [Message(type=WORK_TYPE, priority=rng.choice(PRIORITIES),
                                            payload={"ms": rng.randint(*config.work_ms)}) for _ in range(n)]
                        ids.extend(e.id for e in await queue.enqueue_many(messages))
                    await asyncio.sleep(tick)

            async def total() -> int:
                return int(await redis.get(total_key(PREFIX)) or 0)

            async def rate_over(seconds: float) -> float:
                before, started = await total(), time.monotonic()
                await asyncio.sleep(seconds)
                return (await total() - before) / (time.monotonic() - started)

            async def recovery(since: float) -> float | None:
                """Seconds from ``since`` until the worker finishes its next task (None: not within 60 s)."""
                start = await total()
                while time.monotonic() - since < 60:
                    if await total() > start:
                        return round(time.monotonic() - since, 3)
                    await asyncio.sleep(0.01)
                return None

            started = time.monotonic()
            producer = asyncio.create_task(produce())
            try:
                baseline = await rate_over(config.baseline)
                say(f"baseline: {baseline:.0f} tasks/s")
                proxy.delay(config.delay)
                delayed = await rate_over(config.delay_phase)
                proxy.delay(0.0)
                say(f"{config.delay * 1000:.0f} ms each way: {delayed:.0f} tasks/s")

                proxy.partition()
                await asyncio.sleep(0.1)  # what was on the wire before the cut reaches Redis first
                at_partition = await held_by(queue, worker.pid)
                await asyncio.sleep(config.partition)
                proxy.heal()
                healed = time.monotonic()
                after_partition = await recovery(healed)
                say(f"partition of {config.partition}s with {len(at_partition)} tasks held: "
                    f"working again {after_partition}s after it healed")

                await asyncio.sleep(0.5)
                at_reset = await held_by(queue, worker.pid)
                reset_at = time.monotonic()
                resets = proxy.reset()
                after_reset = await recovery(reset_at)
                say(f"reset {resets} connections with {len(at_reset)} tasks held: "
                    f"working again {after_reset}s after")
                await asyncio.sleep(config.after_reset)
            finally:
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)

            drain_from = time.monotonic()
            while True:
                k = queue.keys
                async with redis.pipeline(transaction=False) as pipe:
                    pipe.hlen(runs_key(PREFIX))
                    pipe.zcard(k.ready)
                    pipe.zcard(k.delayed)
                    pipe.zcard(k.leases)
                    ran, ready, delayed_n, leased = await pipe.execute()
                if ran >= len(ids) and ready + delayed_n + leased == 0:
                    break
                if time.monotonic() - drain_from > config.deadline:
                    say(f"deadline of {config.deadline}s passed: reporting what is missing")
                    break
                await asyncio.sleep(0.1)
            seconds = time.monotonic() - started
            restarted = not worker.alive
            await worker.terminate()
            runs = {i: int(n) for i, n in (await redis.hgetall(runs_key(PREFIX))).items()}  # type: ignore[misc]
            states: Counter[str] = await statuses(queue, ids)
        finally:
            await worker.kill()
            await redis.aclose()
    repeated = {i for i, n in runs.items() if n > 1}
    completed = states.get("completed", 0)
    return NetworkSummary(
        tasks=len(ids), completed=completed, lost=len(ids) - completed, executions=sum(runs.values()),
        repeats=sum(n - 1 for n in runs.values() if n > 1),
        repeats_not_held=len(repeated - at_partition - at_reset), held_at_partition=len(at_partition),
        held_at_reset=len(at_reset), connections_reset=resets, worker_restarted=restarted,
        baseline_tasks_per_second=round(baseline, 1), delayed_tasks_per_second=round(delayed, 1),
        delay_ms_each_way=config.delay * 1000, partition_seconds=config.partition,
        lease_seconds=config.lease, recovery_after_partition_s=after_partition,
        recovery_after_reset_s=after_reset, proxy_connections=proxy.counters.connections,
        seconds=round(seconds, 2), by_status=dict(states))
