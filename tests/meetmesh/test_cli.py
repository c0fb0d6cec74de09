"""The `meetmesh` front door, run as a real process against the test's Redis and prefix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.bus import Queue

ROOT = Path(__file__).resolve().parents[2]


def meetmesh(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meetmesh", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(redis_url: str, key_prefix: str, redis: Any) -> dict[str, str]:
    """The child's environment; asking for `redis` makes the prefix's keys go when the test ends."""
    return {**os.environ, "MEETMESH_REDIS_URL": redis_url, "MEETMESH_KEY_PREFIX": key_prefix}


async def test_enqueue_show_cancel_and_stats_as_json(env: dict[str, str], make_queue: Any) -> None:
    queue: Queue = make_queue("ops")
    out = meetmesh("enqueue", "ops", "media.cover", "--data", '{"video": "v1"}', "--priority", "high",
                   "--json", env=env)
    assert out.returncode == 0, out.stderr
    sent = json.loads(out.stdout)
    assert sent["created"] and sent["position"] == 0
    shown = json.loads(meetmesh("task", "show", "ops", sent["id"], "--json", env=env).stdout)
    assert shown["status"] == "queued" and shown["priority"] == "high" and shown["position"] == 0
    stats = json.loads(meetmesh("queue", "stats", "ops", "--json", env=env).stdout)
    assert stats["depth"]["high"] == 1 and stats["enqueued"] == 1
    out = meetmesh("task", "cancel", "ops", sent["id"], env=env)
    assert out.returncode == 0 and "now cancelled" in out.stdout
    assert (await queue.get(sent["id"])).status.value == "cancelled"


async def test_bad_input_is_one_clear_line(env: dict[str, str]) -> None:
    out = meetmesh("enqueue", "ops", "t", "--priority", "urgent", env=env)
    assert out.returncode != 0
    assert "invalid priority 'urgent'" in out.stderr and "Traceback" not in out.stderr
    out = meetmesh("task", "show", "ops", "no-such-task", env=env)
    assert out.returncode != 0 and "no task with id 'no-such-task'" in out.stderr
    out = meetmesh("enqueue", "ops", "t", "--data", "{not json", env=env)
    assert out.returncode != 0 and "--data is not JSON" in out.stderr


async def test_pause_resume_and_dead_letters(env: dict[str, str], make_queue: Any) -> None:
    queue: Queue = make_queue("ops")
    assert meetmesh("queue", "pause", "ops", env=env).returncode == 0
    assert await queue.is_paused()
    assert meetmesh("queue", "resume", "ops", env=env).returncode == 0
    assert not await queue.is_paused()
    sent = await queue.enqueue("t", {"n": 1})
    (delivery,), _ = await queue.dequeue(1, "w")
    await queue.settle([delivery.id, delivery.token, "fail", '{"code":"boom","message":"it broke"}', "dead"])
    listed = json.loads(meetmesh("dlq", "list", "ops", "--json", env=env).stdout)
    assert [r["id"] for r in listed] == [sent.id] and listed[0]["error"]["message"] == "it broke"
    assert "replayed 1" in meetmesh("dlq", "replay", "ops", env=env).stdout
    assert (await queue.get(sent.id)).status.value == "queued"


def test_a_configured_unreachable_redis_is_an_error_not_a_private_one(env: dict[str, str]) -> None:
    # (A private Redis is only started when no URL is configured: tests/meetmesh/test_cli_redis_url.py.)
    env = {**env, "MEETMESH_REDIS_URL": "redis://127.0.0.1:1/0"}
    out = meetmesh("queue", "stats", "ops", "--json", env=env)
    assert out.returncode != 0 and out.stdout == ""
    notice = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(notice) == 1 and "MEETMESH_REDIS_URL=redis://127.0.0.1:1/0" in notice[0]
    assert "private redis-server" not in notice[0] and "Traceback" not in out.stderr


def test_unreachable_redis_without_redis_server_is_a_one_line_error(env: dict[str, str], tmp_path: Path
                                                                    ) -> None:
    env = {**env, "MEETMESH_REDIS_URL": "redis://127.0.0.1:1/0", "PATH": str(tmp_path)}
    out = meetmesh("queue", "stats", "ops", env=env)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "MEETMESH_REDIS_URL" in lines[0]


def test_demo_shows_all_four_priorities_flowing(env: dict[str, str]) -> None:
    out = meetmesh("demo", "--queue", "demo", "--jobs", "24", "--rounds", "1", env=env, timeout=90)
    assert out.returncode == 0, out.stderr
    started = [line.split()[0] for line in out.stdout.splitlines() if "started after" in line]
    assert set(started) == {"critical", "high", "normal", "low"}
    assert "round 1 done" in out.stdout


@pytest.mark.slow
def test_bench_queue_reports_every_figure(env: dict[str, str]) -> None:
    out = meetmesh("bench", "queue", "--jobs", "600", "--concurrency", "20", "--rate", "200",
                   "--latency-jobs", "100", "--json", env=env, timeout=180)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert figures["processed"] == 600
    for key in ("enqueue_single_per_s", "enqueue_many_per_s", "enqueue_batched_per_s", "process_per_s",
                "latency_p50_ms", "latency_p95_ms", "latency_p99_ms"):
        assert figures[key] > 0, key
