"""``chaos redis`` at a test's size, and the bounded retry a producer meets while Redis is away."""

from __future__ import annotations

import asyncio

import pytest

from reliability.redis_restart import FSYNC_WINDOW, RedisConfig, run_redis
from reliability.servers import PrivateRedis
from shared.bus import BusConnectionError, Queue
from shared.bus.connection import client


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_redis_restarts_keep_what_was_acknowledged_and_everyone_reconnects() -> None:
    config = RedisConfig(modes=("graceful", "kill"), producers=2, rate=100.0, workers=2, concurrency=8,
                         warm=2.0, down=2.0, settle=30.0, gateway=True, deadline=60.0, seed=14)
    summary = await run_redis(config)
    graceful, kill = summary.restarts
    assert graceful.mode == "graceful" and kill.mode == "kill"
    for restart in summary.restarts:
        assert restart.acknowledged_before > 0, restart
        assert restart.producer_recovery_s is not None, restart  # producers carried on by themselves
        assert restart.worker_recovery_s is not None, restart  # the same worker processes ran tasks again
        assert restart.processes_died == 0, restart  # no worker or gateway process died meanwhile
        assert restart.gateway_not_ready_seen, restart  # /ready said not-ready while Redis was away
        assert restart.gateway_recovery_s is not None, restart  # and ready again after, by itself
        assert restart.socket_recovery_s is not None, restart  # completions pushed over its sockets again
    assert graceful.missing_after == 0, graceful
    # SIGKILL: only what was acknowledged inside the AOF's fsync window may be gone
    assert kill.missing_window_s is None or kill.missing_window_s <= FSYNC_WINDOW, kill
    assert summary.lost_to_kill == kill.missing_after
    assert summary.lost == 0, summary  # everything that survived completed
    assert summary.completed == summary.acknowledged - summary.lost_to_kill
    # a WebSocket client of the gateway, submitting throughout: each task it had accepted was pushed
    # back to it completed (none was lost to the kill here, else its push could not come)
    assert summary.socket_submitted > 0
    if summary.lost_to_kill == 0:
        assert summary.socket_completed == summary.socket_submitted, summary


async def test_a_producer_waits_out_a_short_outage_and_then_gives_up_with_unavailable() -> None:
    async with PrivateRedis() as server:
        redis = client(server.url, retry_seconds=3.0)
        queue = Queue("q", redis, prefix="t")
        try:
            await queue.enqueue("job", {"n": 0})  # a pooled connection, about to go stale
            await server.shutdown()
            waiting = asyncio.create_task(queue.enqueue("job", {"n": 1}))
            await asyncio.sleep(0.5)
            assert not waiting.done()  # still retrying, not failed
            await server.start()
            first = await waiting  # answered once Redis is back: no error reached the caller
            assert (await queue.get(first.id)).status.value == "queued"
            await server.shutdown()
            with pytest.raises(BusConnectionError, match="Redis unreachable"):
                await queue.enqueue("job", {"n": 2})  # still away after the budget: a clear error
            # the next call waits again (its connection is made anew: that connect is retried too)
            again = asyncio.create_task(queue.enqueue("job", {"n": 3}))
            await asyncio.sleep(0.5)
            assert not again.done()
            await server.start()
            assert (await queue.get((await again).id)).status.value == "queued"
        finally:
            await redis.aclose()
