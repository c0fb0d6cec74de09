"""``meetmesh bench queue``: enqueue rates, one worker process's drain rate, start latency at a fixed rate.

The worker runs in its own process (``meetmesh worker``), exactly as in production, with leases,
renewals and batched acks on. Completion is read from the queue's own records, never assumed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

from shared.bus.connection import connect
from shared.bus.queue.handlers import Context, Router
from shared.bus.queue.message import Message
from shared.bus.queue.queue import Queue
from shared.bus.queue.records import percentile

router = Router()


@router.handler("bench.noop")
async def noop(ctx: Context) -> float | None:
    """Returns how long after its enqueue (payload ``t``, epoch seconds) the handler started, in ms."""
    t = ctx.payload["t"]
    return (time.time() - t) * 1000.0 if t else None


def _start_worker(url: str, prefix: str, queue: str, concurrency: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MEETMESH_REDIS_URL": url, "MEETMESH_KEY_PREFIX": prefix,
           "MEETMESH_LOG_LEVEL": "WARNING"}
    argv = [sys.executable, "-m", "meetmesh", "worker", "--queue", queue,
            "--app", "meetmesh.bench.queue:router", "--concurrency", str(concurrency)]
    return subprocess.Popen(argv, env=env, start_new_session=True)


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def _wait_processed(q: Queue, target: int, proc: subprocess.Popen[bytes], timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while True:
        done = int(await q.redis.hget(q.keys.stats, "processed") or 0)  # type: ignore[misc]
        if done >= target:
            return time.time()
        if proc.poll() is not None:
            raise RuntimeError(f"bench worker exited with {proc.returncode} after {done}/{target} jobs")
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {done}/{target} jobs processed after {timeout}s")
        await asyncio.sleep(0.002)


def _batch(q: Queue, n: int, t: float = 0.0) -> list[Message]:
    return [q.message("bench.noop", {"t": t}) for _ in range(n)]


async def bench_queue(url: str, *, jobs: int = 20_000, concurrency: int = 100, rate: float = 500.0,
                      latency_jobs: int = 2_000) -> dict[str, Any]:
    prefix = f"mmbench-{uuid.uuid4().hex[:8]}"
    redis = await connect(url)
    out: dict[str, Any] = {"jobs": jobs, "concurrency": concurrency, "latency_rate": rate}
    try:
        # 1. enqueue one at a time (round-trip bound), then batched
        q = Queue("enqueue", redis, prefix=prefix)
        single = min(jobs, 5_000)
        t0 = time.perf_counter()
        for _ in range(single):
            await q.enqueue("bench.noop", {"t": 0.0})
        out["enqueue_single_per_s"] = round(single / (time.perf_counter() - t0))
        await q.drop()
        t0 = time.perf_counter()
        await q.enqueue_many(_batch(q, jobs))  # Message objects, each fully validated
        out["enqueue_many_per_s"] = round(jobs / (time.perf_counter() - t0))
        await q.drop()
        q = Queue("drain", redis, prefix=prefix)
        t0 = time.perf_counter()
        backlog = await q.enqueue_batch("bench.noop", [{"t": 0.0}] * jobs)  # the bulk path
        out["enqueue_batched_per_s"] = round(jobs / (time.perf_counter() - t0))

        # 2. one worker process drains the backlog
        proc = _start_worker(url, prefix, q.name, concurrency)
        try:
            t_end = await _wait_processed(q, jobs, proc, timeout=300)
        finally:
            _stop_worker(proc)
        # one level, FIFO: the first message enqueued is the first one leased
        started = float(await redis.hget(q.keys.task(backlog[0].id), "started")) / 1000  # type: ignore[misc]
        out["process_per_s"] = round(jobs / (t_end - started))
        out["processed"] = int(await redis.hget(q.keys.stats, "processed") or 0)  # type: ignore[misc]
        await q.drop()

        # 3. start latency at a fixed arrival rate, one idle warmed-up worker
        q = Queue("latency", redis, prefix=prefix)
        proc = _start_worker(url, prefix, q.name, concurrency)
        try:
            warm = await q.enqueue_many(_batch(q, 50))
            await q.wait(warm[-1].id, 30)
            await asyncio.sleep(1.0)
            ids = []
            start = time.perf_counter()
            for i in range(latency_jobs):
                pause = start + i / rate - time.perf_counter()
                if pause > 0:
                    await asyncio.sleep(pause)
                ids.append((await q.enqueue("bench.noop", {"t": time.time()})).id)
            out["latency_sent_per_s"] = round(latency_jobs / (time.perf_counter() - start))
            await _wait_processed(q, latency_jobs + 50, proc, timeout=60)
        finally:
            _stop_worker(proc)
        async with redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hget(q.keys.task(task_id), "result")
            lats = sorted(float(x) for x in await pipe.execute() if x)
        out["latency_samples"] = len(lats)
        for p in (50, 95, 99):
            value = percentile(lats, p)
            out[f"latency_p{p}_ms"] = None if value is None else round(value, 3)
        await q.drop()
    finally:
        for name in ("enqueue", "drain", "latency"):
            await Queue(name, redis, prefix=prefix).drop()
        await redis.aclose()
    return out

