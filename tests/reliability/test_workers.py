"""``chaos workers`` at a test's size: workers SIGKILLed while 3,000 tasks flow; nothing is lost and
the only repeats are tasks a killed worker held."""

from __future__ import annotations

import pytest

from reliability.workers import WorkersConfig, run_workers


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_killed_workers_lose_nothing_and_repeat_only_what_they_held() -> None:
    config = WorkersConfig(tasks=3_000, workers=3, concurrency=8, work_ms=(20, 60), kill_every=(1.0, 2.0),
                           lease=1.5, max_retries=20, batch=100, produce_seconds=4.0, deadline=90.0, seed=14)
    summary = await run_workers(config)
    assert summary.tasks == 3_000
    assert summary.kills >= 1, summary  # the run lasts several kill periods (3,000 x 40 ms / 24 slots)
    assert summary.lost == 0, summary
    assert summary.dead == 0, summary
    assert summary.completed == 3_000
    assert summary.executions >= 3_000
    assert summary.repeats <= summary.in_flight_at_kills, summary
    assert summary.repeats_not_in_flight == 0, summary
    assert sum(summary.by_priority.values()) == 3_000 and len(summary.by_priority) == 4
