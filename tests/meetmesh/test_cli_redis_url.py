"""A configured Redis URL is used or refused, never swapped for a private Redis; only an unset one is."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meetmesh.embedded import ensure_redis
from meetmesh.up import redis_proc
from shared.bus import BusConnectionError, BusSettings
from shared.bus.connection import redact_url

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-never-printed"
needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None,
                                        reason="redis-server not on PATH")


def dead_port() -> int:
    """A port nothing listens on (bound, then released: nobody else picks it in this instant)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Every command that talks to Redis, each with arguments valid enough to reach the connection.
COMMANDS = [
    ("enqueue", "q", "media.cover", "--data", '{"v": 1}'),
    ("worker", "--queue", "q", "--app", "tests.bus.queue.apps:counting"),
    ("schedule", "add", "nightly", "--queue", "q", "--type", "reports.daily", "--every", "60"),
    ("queue", "stats", "q"),
    ("dlq", "replay", "q"),
    ("task", "show", "q", "some-id"),
    ("gateway", "--port", "0"),
    ("service", "meeting", "--port", "0"),
    ("bench", "queue", "--jobs", "100", "--latency-jobs", "10"),
    ("up", "--port-base", "9300", "--ready-timeout", "5"),
]


def meetmesh(args: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meetmesh", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=50)


def test_settings_know_whether_the_url_was_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEETMESH_REDIS_URL", raising=False)
    assert not BusSettings.load().redis_url_configured
    monkeypatch.setenv("MEETMESH_REDIS_URL", "redis://127.0.0.1:6379/0")  # the default, but said so
    assert BusSettings.load().redis_url_configured


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url(f"redis://:{PASSWORD}@h:1/0") == "redis://:***@h:1/0"
    assert redact_url(f"rediss://bob:{PASSWORD}@h:1/2") == "rediss://bob:***@h:1/2"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_a_configured_url_that_does_not_answer_fails_every_command(args: tuple[str, ...], tmp_path: Path
                                                                    ) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{dead_port()}/0"
    env = {**os.environ, "MEETMESH_REDIS_URL": url, "MEETMESH_KEY_PREFIX": "mmtest-unreachable",
           "MEETMESH_DATA_DIR": str(tmp_path), "MEETMESH_JWT_SECRET": "x" * 40,
           "MEETMESH_ENV": "dev"}
    out = meetmesh(args, env)
    assert out.returncode != 0, out.stdout + out.stderr
    assert redact_url(url) in out.stderr, out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert "enqueued" not in out.stdout and "private redis-server" not in out.stdout + out.stderr
    assert not (tmp_path / "redis").exists()  # `up` started no Redis of its own


@needs_redis_server
async def test_an_unset_url_starts_a_private_redis_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    default = f"redis://127.0.0.1:{dead_port()}/0"  # stands for the default address, where nothing answers
    url, client = await ensure_redis(default, configured=False)
    try:
        assert url != default
        assert await client.set("k", "v") and await client.get("k") == "v"
    finally:
        await client.aclose()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MEETMESH_REDIS_URL is not set" in err[0] and url in err[0]


async def test_a_configured_url_is_never_replaced(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{dead_port()}/0"
    with pytest.raises(BusConnectionError) as caught:
        await ensure_redis(url, configured=True)
    assert redact_url(url) in str(caught.value) and PASSWORD not in str(caught.value)
    assert "private" not in capsys.readouterr().err


async def test_an_unset_url_uses_the_default_when_it_answers(redis_url: str) -> None:
    url, client = await ensure_redis(redis_url, configured=False)
    await client.aclose()
    assert url == redis_url


# -- `meetmesh up`'s private Redis keeps its data ---------------------------------------------------


async def _start(argv: list[str], url: str) -> asyncio.subprocess.Process:
    from shared.bus import connect

    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    for _ in range(200):
        try:
            client = await connect(url)
        except BusConnectionError:
            await asyncio.sleep(0.05)
            continue
        await client.aclose()
        return proc
    proc.kill()
    raise AssertionError(f"{argv} did not answer at {url}")


@needs_redis_server
async def test_ups_private_redis_keeps_acknowledged_writes_across_a_restart(tmp_path: Path) -> None:
    from shared.bus import Queue, connect

    folder = tmp_path / "redis"
    folder.mkdir()
    written: list[str] = []
    for run in range(2):
        spec = redis_proc(dead_port(), str(folder), shutil.which("redis-server") or "redis-server")
        assert spec.url is not None
        proc = await _start(spec.argv, spec.url)
        try:
            client: Any = await connect(spec.url)
            queue = Queue("kept", client)
            if run == 0:
                assert (await client.config_get("appendfsync"))["appendfsync"] == "everysec"
                written = [(await queue.enqueue("t", {"n": n})).id for n in range(50)]
                await client.set("plain", "still here")
            else:  # the second server, on the same folder, loaded what the first acknowledged
                assert await client.get("plain") == "still here"
                stats = await queue.stats()
                assert stats.depth["normal"] == 50
                first = (await queue.get(written[0])).message
                assert first is not None and first.payload == {"n": 0}
            await client.aclose()
        finally:
            proc.terminate()  # what `up` does: SIGTERM, Redis writes and fsyncs, then exits
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert any(folder.rglob("*.aof"))
