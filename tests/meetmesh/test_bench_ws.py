"""Smoke test of ``meetmesh bench ws`` (`meetmesh.bench.ws`): tiny numbers, real processes (gateway, worker,
client), checking the result's shape, that every socket was held and every task completed, and that the
run removed its keys; never speed (the machine is shared)."""

from __future__ import annotations

import os

import pytest

from meetmesh.bench.ws import run
from shared.bus import connect

REDIS_URL = os.environ.get("MEETMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
LATENCY_KEYS = {"p50_ms", "p95_ms", "p99_ms", "max_ms"}


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_bench_ws_holds_every_socket_and_completes_every_task() -> None:
    result = await run(clients=50, rate=100, tasks=100, redis_url=REDIS_URL)

    assert result["clients"] == 50 and result["client_processes"] == 1
    assert result["prefix"].startswith("mmbench-ws-")
    assert result["sockets_held"] == 50 and result["sockets_failed"] == 0, result["connect_errors"]
    assert result["sockets_open_at_end"] == 50
    assert result["gateway_sessions"]["attached"] >= 50
    assert result["rss_mb_after"] > 0 and result["rss_mb_before"] > 0
    for key in ("rss_kb_per_socket", "rss_mb_per_1000_sockets", "gateway_cpu_ms_per_connect"):
        assert isinstance(result[key], float), key

    rt = result["round_trip"]
    assert rt["sent"] == 100 and rt["accepted"] == 100
    assert rt["completed"] == 100 and rt["statuses"] == {"completed": 100} and rt["missing_results"] == 0
    assert rt["error_count"] == 0 and rt["ok"] is True, result["logged"]  # what the processes logged
    assert result["ok"] is True
    assert rt["sockets"] == 50  # fewer held than the 100 the phase would use: all of them
    for figures in (rt, rt["to_accepted"]):
        assert LATENCY_KEYS <= set(figures)
        assert 0 < figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"] <= figures["max_ms"]
    assert rt["to_accepted"]["p50_ms"] <= rt["p50_ms"]
    lag = rt["gateway_loop_lag"]  # sampled every 20 ms over a window of about a second
    assert lag["samples"] >= 10 and 0 <= lag["over_10ms"] <= lag["over_5ms"] <= lag["samples"]
    segments = rt["segments"]  # each task's record times beside the client's clock
    assert set(segments) == {"ingress", "queued", "running", "egress"}
    for part in segments.values():
        assert part["p50_ms"] is not None and part["p50_ms"] <= part["p99_ms"]
    # the parts add up to about the whole (each is rounded to Redis's milliseconds)
    assert sum(part["p50_ms"] for part in segments.values()) <= rt["p99_ms"] + 4
    client = rt["client_loop_lag"]
    assert client["samples"] >= 10 and 0 <= client["over_10ms"] <= client["over_5ms"] <= client["samples"]
    assert client["p99_ms"] >= 0
    assert LATENCY_KEYS <= set(rt["to_processing"])  # empty (None) only if no status frame came
    # what each process of the path cost per task (/proc counts in 10 ms ticks: a second of 100 small
    # tasks may show none for the worker or the client), and how busy the machine was
    assert rt["gateway_cpu_us_per_task"] > 0 and rt["redis_cpu_us_per_task"] > 0
    assert rt["worker_cpu_us_per_task"] >= 0 and rt["client_cpu_us_per_task"] >= 0
    assert 0 < rt["machine_busy_cores"] <= (os.cpu_count() or 1)

    assert set(result["targets"]) == {"sockets_held", "rss_kb_per_socket", "p99_ms"}
    assert result["targets"]["sockets_held"]["met"] is None  # judged only at 10,000 clients
    assert result["targets"]["rss_kb_per_socket"]["met"] is None
    assert isinstance(result["targets"]["p99_ms"]["met"], bool)

    redis = await connect(REDIS_URL)  # the run removed what it wrote
    try:
        assert [k async for k in redis.scan_iter(match=f"{result['prefix']}:*")] == []
    finally:
        await redis.aclose()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_bench_ws_over_two_gateways_spreads_the_sockets_and_completes_every_task() -> None:
    result = await run(clients=40, rate=100, tasks=60, redis_url=REDIS_URL, gateways=2)

    assert result["gateways"] == 2 and result["sockets_held"] == 40
    # each gateway holds its half (and the warm-up socket that may still be attached)
    assert [n // 10 * 10 for n in result["gateway_sessions"]["attached_each"]] == [20, 20]
    rt = result["round_trip"]
    # the round-trip sockets alternate between the gateways, so half the tasks cross from one to the other
    assert rt["completed"] == 60 and rt["missing_results"] == 0 and rt["ok"] is True, result["logged"]
    assert result["targets"]["sockets_held"]["met"] is None  # a one-process target
    assert any("2 x `python -m meetmesh gateway`" in note for note in result["notes"])
