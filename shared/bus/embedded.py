"""Finding Redis for the CLI: the configured one, or a private redis-server when nothing answers."""

from __future__ import annotations

import asyncio
import atexit
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Any

from .connection import connect
from .errors import BusConnectionError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def ensure_redis(url: str, *, quiet: bool = False) -> tuple[str, Any]:
    """Connect to ``url``; if nothing answers and ``redis-server`` is on PATH, start a private one.

    Returns (url in use, connected client). Exits with a one-line error naming MEETMESH_REDIS_URL
    when neither works.
    """
    try:
        return url, await connect(url)
    except BusConnectionError:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit(f"meetmesh: no Redis answers at MEETMESH_REDIS_URL={url}, and redis-server is not "
                     "on PATH to start a private one")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="meetmesh-redis-")
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; start-up is awaited below
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(_stop, proc)
    private = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            client = await connect(private)
        except BusConnectionError:
            await asyncio.sleep(0.05)
            continue
        if not quiet:
            print(f"meetmesh: nothing answers at MEETMESH_REDIS_URL={url}; started a private redis-server "
                  f"at {private} (gone when this process exits)", file=sys.stderr)
        return private, client
    _stop(proc)
    sys.exit(f"meetmesh: could not start a private redis-server (MEETMESH_REDIS_URL={url} is unreachable)")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
