"""``meetmesh demo``: a worker and a producer in one process, showing the four priorities flowing."""

from __future__ import annotations

import asyncio
import random
import time

from rich.console import Console

from shared.bus.errors import Retry
from shared.bus.queue.handlers import Context, Router
from shared.bus.queue.message import PRIORITIES
from shared.bus.queue.queue import Queue
from shared.bus.queue.worker import Worker

COLOURS = {"critical": "bold red", "high": "yellow", "normal": "green", "low": "blue"}


def demo_router(console: Console) -> Router:
    router = Router()

    @router.handler("demo.work")
    async def work(ctx: Context) -> dict[str, float]:
        m = ctx.message
        waited = (time.time() - m.created_at) * 1000
        style = COLOURS[m.priority.value]
        console.print(f"  [{style}]{m.priority.value:>8}[/] #{ctx.payload['n']:<3} started after "
                      f"{waited:7.1f} ms (attempt {m.attempts})")
        await asyncio.sleep(0.02)
        if ctx.payload.get("flaky") and m.attempts < 2:
            raise Retry(delay=0.1, reason="flaky dependency, try again")
        return {"waited_ms": round(waited, 1)}

    return router


async def run_demo(queue: Queue, jobs: int, rounds: int, console: Console) -> None:
    await queue.purge_dead()
    worker = Worker(queue, demo_router(console), concurrency=2)
    worker.install_signal_handlers()
    runner = asyncio.create_task(worker.run())
    console.print(f"[bold]MeetMesh demo[/]: one worker (concurrency 2) on queue {queue.name!r}; "
                  "each round enqueues a mixed batch in one round trip. Ctrl-C stops.")
    n = 0
    try:
        round_no = 0
        while not runner.done() and (rounds == 0 or round_no < rounds):
            round_no += 1
            batch = []
            levels = [PRIORITIES[i % len(PRIORITIES)] for i in range(jobs)]
            random.shuffle(levels)  # every level, in a mixed order
            for p in levels:
                n += 1
                batch.append(queue.message("demo.work", {"n": n, "flaky": n % 17 == 0}, priority=p))
            t0 = time.perf_counter()
            await queue.enqueue_many(batch)
            ms = (time.perf_counter() - t0) * 1000
            counts = {p.value: sum(m.priority is p for m in batch) for p in PRIORITIES}
            console.print(f"[bold]round {round_no}[/]: enqueued {jobs} in {ms:.1f} ms: {counts}")
            await queue.enqueue("demo.work", {"n": 0}, priority="critical", delay=0.5)
            while (s := await queue.stats()).ready + s.delayed + s.in_flight and not runner.done():  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            lat = s.latency
            console.print(f"[bold]round {round_no} done[/]: processed {s.processed}, retried {s.retried}, "
                          f"dead {s.dead_letters}; start latency p50 {lat.p50_ms} ms, p99 {lat.p99_ms} ms\n")
            await asyncio.sleep(1.0)
    finally:
        worker.stop()
        await runner
