"""Smoke test of ``meetmesh bench events`` against each real broker: tiny numbers, checking the result's
shape and that every subscriber got every event; never speed (the machine is shared)."""

from __future__ import annotations

import os

import pytest
import typer
from typer.testing import CliRunner

from meetmesh.bench.events import MODES, bench_events_cmd, run
from shared.bus import connect

URLS = {
    "redis": os.environ.get("MEETMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/9"),
    "nats": os.environ.get("MEETMESH_TEST_NATS_URL", "nats://127.0.0.1:4222"),
    "amqp": os.environ.get("MEETMESH_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(URLS))
async def test_bench_events_every_subscriber_gets_every_event(backend: str) -> None:
    result = await run(backend, URLS[backend], events=300, rate=200, duration_events=100, services=2)

    assert result["backend"] == backend
    assert result["publish"]["ours_per_s"] > 0
    assert result["publish"]["faststream_per_s"] > 0
    for mode in MODES:
        latency = result["latency"][mode]
        assert latency["ok"] is True, latency
        assert len(latency["services"]) == 2
        for figures in latency["services"].values():
            assert figures["received"] == 100
            assert figures["ok"] is True
            assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"] <= figures["max_ms"]
        assert latency["all"]["received"] == 200
    assert set(result["overhead"]) == {"publish_ratio", "p50_ms", "p99_ms", "publish_cpu_us",
                                       "subscriber_cpu_us"}
    assert set(result["targets"]) == ({"p99_ms", "publish_per_s"} if backend == "redis" else {"p99_ms"})
    if backend == "redis":  # the run removed what it declared
        redis = await connect(URLS["redis"])
        try:
            assert [k async for k in redis.scan_iter(match=f"{result['prefix']}:*")] == []
        finally:
            await redis.aclose()


def test_bench_events_refuses_an_unknown_backend() -> None:
    app = typer.Typer()
    app.command()(bench_events_cmd)
    outcome = CliRunner().invoke(app, ["--backend", "kafka"])
    assert outcome.exit_code != 0
    assert "use redis, nats or amqp" in outcome.output
