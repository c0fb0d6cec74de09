"""CPU per relay read, two ways: redis-py's `Pipeline` against the hand-written round trip the relay
uses (`Relay._round_trip`): acks, a non-blocking XREADGROUP and the followers check in one write.

    .venv/bin/python bench/relay_read_cost.py [redis-url]

Prints the client's CPU (process time) and wall time per read, twice each, alternating. Uses its
own keys (`relaycost:*` in the given db) and deletes them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable

import uvloop

from shared.bus import connect

READS = 5000
STREAM, FOLLOWERS = "relaycost:{s}:events", "relaycost:{s}:followers"


async def main(url: str) -> None:
    redis = await connect(url)
    await redis.delete(STREAM, FOLLOWERS)
    await redis.xgroup_create(STREAM, "g", id="$", mkstream=True)

    async def pipelined() -> None:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xack(STREAM, "g", "1-1")
            pipe.xreadgroup("g", "c", {STREAM: ">"}, count=100)
            pipe.zrangebyscore(FOLLOWERS, 0, "+inf")
            await pipe.execute()

    conn = await redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]

    async def by_hand() -> None:
        commands = [("XACK", STREAM, "g", "1-1"),
                    ("XREADGROUP", "GROUP", "g", "c", "COUNT", 100, "STREAMS", STREAM, ">"),
                    ("ZRANGEBYSCORE", FOLLOWERS, 0, "+inf")]
        await conn.send_packed_command(conn.pack_commands(commands))
        for _ in commands:
            await conn.read_response()

    runs: list[tuple[str, Callable[[], Awaitable[None]]]] = [("redis-py pipeline", pipelined),
                                                              ("by hand", by_hand)] * 2
    try:
        for name, read in runs:
            for _ in range(300):
                await read()
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(READS):
                await read()
            print(f"{name:18s} cpu {(time.process_time() - cpu) / READS * 1e6:6.1f} us   "
                  f"wall {(time.perf_counter() - wall) / READS * 1e6:6.1f} us")
    finally:
        await redis.connection_pool.release(conn)
        await redis.delete(STREAM, FOLLOWERS)
        await redis.aclose()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/8"))
