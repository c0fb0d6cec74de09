"""Redis memory per finished task, and what the retention defaults add up to at a given rate.

Starts a private redis-server (nothing else in it), runs TASKS tasks of a typical small payload
through a real `Worker` (a cover-image job: a few ids in, a path out), then measures:

- ``MEMORY USAGE`` (every field, ``SAMPLES 0``) of the finished records: completed ones, and dead
  letters (a handler that raised: the record keeps the error and its traceback);
- the ``INFO used_memory`` delta over the whole run, divided by TASKS: the records plus each task's
  share of the event stream (3 entries a task, trimmed at ``events_maxlen``) and counters.

Then the steady state under the defaults at RATE tasks/s: completed records live 1 h, dead letters
7 d (shown for a 1 % dead-letter rate), and the event stream is capped at 100,000 entries.

    .venv/bin/python bench/retention_memory.py            # TASKS=10000 RATE=100 DEAD_SHARE=0.01
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.bus import Queue, Router, Worker, connect

TASKS = int(os.environ.get("TASKS", "10000"))
RATE = float(os.environ.get("RATE", "100"))
DEAD_SHARE = float(os.environ.get("DEAD_SHARE", "0.01"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def used_memory(redis: Any) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def record_bytes(redis: Any, queue: Queue, ids: list[str]) -> float:
    sizes = [await redis.memory_usage(queue.keys.task(i), samples=0) for i in ids]
    return sum(sizes) / len(sizes)


async def measure(url: str) -> dict[str, Any]:
    redis = await connect(url)
    queue = Queue("covers", redis, max_retries=0)
    router = Router()

    @router.handler("media.cover")
    async def cover(ctx: Any) -> dict[str, Any]:
        if ctx.payload.get("broken"):
            raise ValueError(f"cannot decode video {ctx.payload['video_id']}: moov atom not found")
        return {"cover": f"covers/{ctx.payload['video_id']}.jpg", "width": 1280, "height": 720}

    def payload(n: int, broken: bool = False) -> dict[str, Any]:
        return {"video_id": f"v-{n:08d}", "meeting_id": f"m-{n % 500:05d}", "user_id": f"u-{n % 2000:05d}",
                "broken": broken}

    await redis.execute_command("MEMORY", "PURGE")
    before = await used_memory(redis)
    messages = [queue.message("media.cover", payload(n), owner=f"u-{n % 2000:05d}") for n in range(TASKS)]
    done = [e.id for e in await queue.enqueue_many(messages)]
    dead = [(await queue.enqueue("media.cover", payload(n, True))).id for n in range(100)]
    worker = Worker(queue, router, concurrency=100)
    runner = asyncio.create_task(worker.run())
    while (s := await queue.stats()).processed + s.dead_letters < TASKS + len(dead):  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    worker.stop()
    await runner
    await redis.execute_command("MEMORY", "PURGE")
    after = await used_memory(redis)
    stream_entries = await redis.xlen(queue.keys.events)
    stream_bytes = await redis.memory_usage(queue.keys.events, samples=0)
    completed_b = await record_bytes(redis, queue, done[:: max(1, TASKS // 500)])
    dead_b = await record_bytes(redis, queue, dead)
    await redis.aclose()

    per_task = (after - before) / (TASKS + len(dead))
    entry_b = stream_bytes / max(1, stream_entries)
    completed_live = RATE * queue.completed_ttl
    dead_live = RATE * DEAD_SHARE * queue.dead_letter_ttl
    stream_cap = min(queue.events_maxlen, 3 * RATE * 86_400)
    steady = completed_live * completed_b + dead_live * dead_b + stream_cap * entry_b
    old = RATE * 86_400 * completed_b + stream_cap * entry_b  # record_ttl 24 h, dead letters forever aside
    return {
        "tasks": TASKS,
        "payload_json_bytes": len(json.dumps(payload(1))),
        "completed_record_bytes": round(completed_b),
        "dead_letter_record_bytes": round(dead_b),
        "used_memory_delta_per_task_bytes": round(per_task),
        "event_stream_bytes_per_entry": round(entry_b),
        "rate_per_s": RATE,
        "dead_letter_share": DEAD_SHARE,
        "completed_records_live": int(completed_live),
        "dead_letters_live": int(dead_live),
        "steady_state_mb": round(steady / 1e6, 1),
        "old_default_24h_mb": round(old / 1e6, 1),
        "completed_per_day_mb_if_kept": round(RATE * 86_400 * completed_b / 1e6, 1),
    }


async def main() -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on PATH")
    port, workdir = free_port(), tempfile.mkdtemp(prefix="mm-retention-")
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; start-up is awaited below
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            try:
                await (await connect(url)).aclose()
                break
            except Exception:
                await asyncio.sleep(0.05)
        print(json.dumps(await measure(url), indent=2))
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
