"""The link between a worker and Redis slowed, cut past the lease and reset: nothing lost, the worker
recovers by itself, and only tasks it held at a cut run twice. And the fault proxy itself."""

from __future__ import annotations

import asyncio
import time

import pytest

from reliability.faultproxy import FaultProxy
from reliability.network import NetworkConfig, run_network


async def echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_the_proxy_delays_holds_and_resets() -> None:
    server, port = await echo_server()
    async with server, FaultProxy(port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"plain")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"plain"

        proxy.delay(0.1)
        started = time.monotonic()
        writer.write(b"slow")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"slow"
        assert time.monotonic() - started >= 0.2  # held 0.1 s each way, never less
        proxy.delay(0.0)

        proxy.partition()
        writer.write(b"held")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)
        proxy.heal()
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"  # delivered, not dropped

        assert proxy.reset() == 1
        assert await asyncio.wait_for(reader.read(10), 5) == b""  # the connection is gone
        assert proxy.counters.resets == 1 and proxy.counters.connections == 1
        writer.close()


@pytest.mark.timeout(180)
async def test_a_worker_survives_delay_partition_and_reset_and_loses_nothing() -> None:
    config = NetworkConfig(rate=100, baseline=1.0, delay_phase=1.5, delay=0.05, partition=3.0,
                           lease=2.0, after_reset=1.0, seed=7)
    summary = await run_network(config)
    assert summary.tasks > 0
    assert summary.lost == 0, summary
    assert summary.completed == summary.tasks
    assert summary.repeats_not_held == 0, summary
    assert summary.repeats <= summary.held_at_partition + summary.held_at_reset
    assert not summary.worker_restarted
    assert summary.connections_reset > 0
    assert summary.recovery_after_partition_s is not None
    assert summary.recovery_after_reset_s is not None
    assert summary.ok
