"""Processes a scenario starts and breaks: ``meetmesh worker`` and ``meetmesh gateway`` children,
each in its own session (a signal reaches it and nothing else), its output kept in a log file."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    """The environment of a child: the scenario's Redis and key prefix, this checkout importable."""
    return {**os.environ, "MEETMESH_REDIS_URL": redis_url, "MEETMESH_KEY_PREFIX": prefix,
            "MEETMESH_LOG_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **extra}


class Child:
    """One child process; ``kill()`` is SIGKILL to its whole session."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    async def kill(self) -> None:
        """SIGKILL, and wait until it is gone (nothing of it runs after this returns)."""
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
        while self.proc.poll() is None:  # noqa: ASYNC110 - a child's exit is polled, not signalled
            await asyncio.sleep(0.005)

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (a graceful stop), SIGKILL if it is still there after ``timeout``; its exit code."""
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                await self.kill()
            await asyncio.sleep(0.01)
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def worker(queue: str, env: dict[str, str], log: Path, *, concurrency: int, lease: float,
           max_retries: int, app: str = "reliability.apps:chaos") -> Child:
    """``meetmesh worker`` for ``queue`` (SIGTERM grace 5 s)."""
    return Child([sys.executable, "-m", "meetmesh", "worker", "--queue", queue, "--app", app,
                  "--concurrency", str(concurrency), "--lease", str(lease), "--grace", "5",
                  "--max-retries", str(max_retries)], env, log)


def gateway(env: dict[str, str], log: Path, port: int) -> Child:
    """``meetmesh gateway`` on 127.0.0.1:``port``."""
    return Child([sys.executable, "-m", "meetmesh", "gateway", "--host", "127.0.0.1",
                  "--port", str(port)], {**env, "MEETMESH_PORT": str(port)}, log)


def tidy(logs: Path, ok: bool, say: object = None) -> None:
    """Remove a scenario's log folder when its guarantees held; keep it (and say where) when not."""
    if ok:
        shutil.rmtree(logs, ignore_errors=True)
    elif callable(say):
        say(f"the children's logs are kept in {logs}")
