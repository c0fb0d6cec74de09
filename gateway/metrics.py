"""Prometheus metrics of one gateway process (``GET /metrics``), on a registry of its own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shared.bus import Priority

log = logging.getLogger(__name__)
LAG_EVERY = 0.02  # seconds between the event-loop lag samples: 50 wakeups a second, ~0.1 % of a core
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


async def sample_loop_lag(observe: Callable[[float], None], every: float = LAG_EVERY) -> None:
    """Call ``observe(seconds)`` every ``every`` seconds with how much later than asked the event loop
    woke us: a process busy (or starved of CPU) for 10 ms shows as samples of up to 10 ms."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + every
        await asyncio.sleep(every)
        observe(max(0.0, loop.time() - asked))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sockets = Gauge("meetmesh_gateway_sockets", "WebSocket connections open", registry=r)
        self.sessions = Gauge(
            "meetmesh_gateway_sessions", "Sessions held (attached or resumable)", registry=r
        )
        self.frames_in = Counter("meetmesh_gateway_frames_in", "Frames received from clients", registry=r)
        self.frames_out = Counter("meetmesh_gateway_frames_out", "Frames sent to clients", registry=r)
        self.client_errors = Counter(
            "meetmesh_gateway_client_errors", "Error frames and 4xx answers by code", ["code"], registry=r
        )
        self.requests = Histogram(
            "meetmesh_gateway_request_seconds",
            "REST request time",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.depth = Gauge("meetmesh_queue_depth", "Ready messages", ["queue", "priority"], registry=r)
        self.delayed = Gauge("meetmesh_queue_delayed", "Delayed messages", ["queue"], registry=r)
        self.in_flight = Gauge("meetmesh_queue_in_flight", "Messages being handled", ["queue"], registry=r)
        self.dead = Gauge("meetmesh_queue_dead_letters", "Dead letters", ["queue"], registry=r)
        self.rate = Gauge(
            "meetmesh_queue_processed_per_second", "Processed per second (last minute)", ["queue"], registry=r
        )
        self.latency = Gauge(
            "meetmesh_queue_start_latency_ms", "Start latency percentiles", ["queue", "quantile"], registry=r
        )
        self.loop_lag = Histogram(
            "meetmesh_gateway_loop_lag_seconds",
            f"How late the event loop ran a timer due every {LAG_EVERY} s: the wait any frame or task "
            "handled then had before the gateway got to it",
            buckets=LAG_BUCKETS,
            registry=r,
        )

    async def sample_loop_lag(self, every: float = LAG_EVERY) -> None:
        """Keep ``meetmesh_gateway_loop_lag_seconds`` current (see `sample_loop_lag`)."""
        await sample_loop_lag(self.loop_lag.observe, every)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def refresh_queues(self, queues: dict[str, Any], every: float = 5.0) -> None:
        """Keep the queue gauges current (stats are async; a scrape must not wait on Redis)."""
        while True:
            for name, queue in queues.items():
                try:
                    s = await queue.stats()
                except Exception as exc:
                    log.debug("queue stats for metrics failed: %r", exc)
                    continue
                for p in Priority:
                    self.depth.labels(name, p.value).set(s.depth.get(p, 0))
                self.delayed.labels(name).set(s.delayed)
                self.in_flight.labels(name).set(s.in_flight)
                self.dead.labels(name).set(s.dead_letters)
                self.rate.labels(name).set(s.processed_per_s)
                for q in ("p50", "p95", "p99"):
                    value = getattr(s.latency, f"{q}_ms", None)
                    if value is not None:
                        self.latency.labels(name, q).set(value)
            await asyncio.sleep(every)
