"""Finding Redis for the CLI: the configured one, or a private redis-server when none was configured.

A configured URL (``MEETMESH_REDIS_URL`` or a settings file) is used or refused, never replaced: when
nothing answers there the command fails, naming the URL. Only when no URL was configured at all is the
default local address tried, and then a private ``redis-server`` started when nothing answers there.
"""

from __future__ import annotations

import asyncio
import atexit
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Any

from shared.bus.connection import connect, redact_url
from shared.bus.errors import BusConnectionError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def ensure_redis(url: str, *, configured: bool, quiet: bool = False) -> tuple[str, Any]:
    """Connect to ``url``; returns (url in use, connected client).

    ``configured`` says whether the URL was set explicitly (`BusSettings.redis_url_configured`): then
    a Redis that does not answer raises `BusConnectionError` naming the URL (password hidden). When it
    was not, and nothing answers at the default ``url``, a private ``redis-server`` on a free port is
    started (gone when this process exits), and one line on stderr says so.
    """
    try:
        return url, await connect(url)
    except BusConnectionError as exc:
        if configured:
            raise BusConnectionError(
                f"cannot connect to Redis at MEETMESH_REDIS_URL={redact_url(url)} ({exc.__cause__ or exc}); "
                "fix the URL or start that Redis (a private Redis is only started when no URL is "
                "configured)") from exc
    binary = shutil.which("redis-server")
    if binary is None:
        raise BusConnectionError(f"MEETMESH_REDIS_URL is not set, nothing answers at the default {url}, "
                                 "and redis-server is not on PATH to start a private one")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="meetmesh-redis-")
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; start-up is awaited below
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(_stop, proc, workdir)
    private = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            client = await connect(private)
        except BusConnectionError:
            await asyncio.sleep(0.05)
            continue
        if not quiet:
            print(f"meetmesh: MEETMESH_REDIS_URL is not set and nothing answers at {url}; started a "
                  f"private redis-server at {private} (its data is gone when this process exits)",
                  file=sys.stderr)
        return private, client
    _stop(proc, workdir)
    raise BusConnectionError(f"could not start a private redis-server ({binary} --port {port})")


def _stop(proc: subprocess.Popen[bytes], workdir: str | None = None) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
