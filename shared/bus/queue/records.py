"""Turning raw Redis hashes into task records and queue statistics."""

from __future__ import annotations

import math

from pydantic import BaseModel
from pydantic_core import from_json

from .message import PRIORITIES, Message, Priority, TaskError, TaskRecord, TaskStatus


def _num(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def _seconds(ms: str | None) -> float | None:
    value = _num(ms)
    return None if value is None else value / 1000.0


def parse_error(text: str | None) -> TaskError | None:
    if not text:
        return None
    try:
        return TaskError.model_validate_json(text)
    except ValueError:
        return TaskError(code="unknown", message=text)


def parse_record(queue: str, task_id: str, raw: dict[str, str], position: int | None) -> TaskRecord:
    """A `TaskRecord` from a record hash. A body that no longer parses is reported, not raised."""
    message: Message | None = None
    if raw.get("msg"):
        try:
            message = Message.model_validate_json(raw["msg"])
        except ValueError:
            message = None
    status = TaskStatus(raw.get("status", "dead"))
    result = from_json(raw["result"]) if raw.get("result") else None
    return TaskRecord(
        id=task_id,
        queue=queue,
        type=raw.get("type", ""),
        status=status,
        priority=PRIORITIES[int(raw.get("prio") or 2)],
        owner=raw.get("owner") or None,
        attempts=int(raw.get("att") or 0),
        max_retries=int(raw.get("max") or 0),
        stage=int(raw.get("stage") or 0),
        position=position if status is TaskStatus.QUEUED else None,
        progress=_num(raw.get("progress")),
        result=result,
        error=parse_error(raw.get("error")),
        enqueued_at=_seconds(raw.get("enq")),
        ready_at=_seconds(raw.get("ready") or raw.get("enq")),
        started_at=_seconds(raw.get("started")),
        finished_at=_seconds(raw.get("finished")),
        worker=raw.get("worker") or None,
        message=message,
    )


class LatencyStats(BaseModel):
    """Start latency (ready -> leased) over the most recent deliveries, in milliseconds."""

    samples: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class QueueStats(BaseModel):
    """A queue at a glance, as ``meetmesh queue stats`` and ``GET /queues/{name}`` show it."""

    name: str
    paused: bool
    depth: dict[Priority, int]
    ready: int
    delayed: int
    in_flight: int
    dead_letters: int
    consumers: int
    enqueued: int
    processed: int
    failed: int
    retried: int
    cancelled: int
    reclaimed: int
    processed_per_s: float
    failed_per_s: float
    latency: LatencyStats


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100.0 * len(sorted_values)) - 1))
    return sorted_values[k]


def parse_stats(name: str, depth: dict[str, str], delayed: int, leases: int, dead: int, workers: int,
                counters: dict[str, str], paused: int, latency: list[str], rates: list[dict[str, str]],
                window: int) -> QueueStats:
    by_level = {p: max(0, int(depth.get(str(p.level), 0))) for p in PRIORITIES}
    lat = sorted(float(x) for x in latency)
    count = {k: int(v) for k, v in counters.items()}

    def rate(field: str) -> float:
        return sum(int(r.get(field, 0)) for r in rates) / max(1, window)

    return QueueStats(
        name=name, paused=bool(paused), depth=by_level, ready=sum(by_level.values()), delayed=delayed,
        in_flight=leases, dead_letters=dead, consumers=workers,
        enqueued=count.get("enqueued", 0), processed=count.get("processed", 0),
        failed=count.get("failed", 0), retried=count.get("retried", 0),
        cancelled=count.get("cancelled", 0), reclaimed=count.get("reclaimed", 0),
        processed_per_s=rate("processed"), failed_per_s=rate("failed"),
        latency=LatencyStats(samples=len(lat), p50_ms=percentile(lat, 50), p95_ms=percentile(lat, 95),
                             p99_ms=percentile(lat, 99)),
    )
