"""MeetMesh adapter for the peer harness in ../shared/bench/peers (same shape as its lib_rawlist.py).

    ADAPTER_DIR=$PWD/bench PY_meetmesh=$PWD/.venv/bin/python LIBS="rawlist taskiq:stream saq meetmesh" \\
        ROUNDS=1 ../shared/bench/peers/run_all.sh

Every job goes through the full reliable path: a task record, a lease renewed while it runs, a
batched fenced ack, and status events on the queue's stream. The job body is only the harness's
`await common.arecord(t)`.
"""

import asyncio
import sys
from importlib.metadata import version

import common  # the harness's: Redis location (db 15) and the per-job record script

from shared.bus import Context, Queue, Router, Worker, connect

PACKAGE = "meetmesh"
VERSION = version(PACKAGE)
CONCURRENCY = 100
CONFIG = (f"1 process, Worker(concurrency={CONCURRENCY}), leases + fenced batched acks + task records + "
          "status stream, uvloop; enqueue_batch (1,000 per script call)")
QUEUE = "peerbench"

_redis = None
_queue = None

router = Router()


@router.handler("noop")
async def noop(ctx: Context) -> None:
    await common.arecord(ctx.payload["t"])


async def setup():
    global _redis, _queue
    _redis = await connect(common.URL)
    _queue = Queue(QUEUE, _redis)


async def teardown():
    await _redis.aclose()


async def enqueue_many(n):
    await _queue.enqueue_batch("noop", [{"t": 0.0}] * n)


async def enqueue_one(t):
    await _queue.enqueue("noop", {"t": t})


def worker_argv():
    return [sys.executable, __file__, "worker"]


async def _worker():
    redis = await connect(common.URL)
    worker = Worker(Queue(QUEUE, redis), router, concurrency=CONCURRENCY, grace_seconds=2)
    worker.install_signal_handlers()
    await worker.run()
    await redis.aclose()


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    common.use_uvloop()
    asyncio.run(_worker())
