"""The gateway's event-loop lag metric: a stalled loop shows in it."""

from __future__ import annotations

import asyncio
import time

from gateway.metrics import Metrics


def lag_sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"meetmesh_gateway_loop_lag_seconds_{name}", labels)
    assert value is not None
    return value


async def test_the_loop_lag_sampler_sees_a_stalled_loop() -> None:
    metrics = Metrics()
    sampler = asyncio.create_task(metrics.sample_loop_lag(every=0.01))
    await asyncio.sleep(0.05)
    time.sleep(0.06)  # noqa: ASYNC251 - the point: the loop is stuck, the sample due meanwhile is late
    await asyncio.sleep(0.05)
    sampler.cancel()

    samples = lag_sample(metrics, "count")
    assert samples >= 5
    assert samples - lag_sample(metrics, "bucket", le="0.02") >= 1  # the late one
    assert lag_sample(metrics, "sum") >= 0.04
    assert b"meetmesh_gateway_loop_lag_seconds_bucket" in metrics.render()
