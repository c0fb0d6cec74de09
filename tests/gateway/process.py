"""`meetmesh gateway` as a real process on a free port (uvicorn as in production: its CLI, its logging),
its whole stdout and stderr captured in a file, for tests that read what a gateway logs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from .conftest import SECRET, free_port

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0


@dataclass
class GatewayProcess:
    url: str
    proc: asyncio.subprocess.Process
    log: Path

    @property
    def ws(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.asynccontextmanager
async def gateway_process(redis_url: str, key_prefix: str, log: Path,
                          **env: str) -> AsyncIterator[GatewayProcess]:
    """Start ``python -m meetmesh gateway`` (``env``: more MEETMESH_* settings); stop it with
    SIGTERM after the block (SIGKILL if it hangs)."""
    port = free_port()
    environ = {**os.environ, "MEETMESH_REDIS_URL": redis_url, "MEETMESH_KEY_PREFIX": key_prefix,
               "MEETMESH_JWT_SECRET": SECRET, "MEETMESH_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", **env}
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meetmesh", "gateway", "--host", "127.0.0.1", "--port", str(port),
            cwd=ROOT, env=environ, stdout=out, stderr=asyncio.subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            deadline = asyncio.get_running_loop().time() + START_TIMEOUT
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"the gateway exited ({proc.returncode}):\n{_tail(log)}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(url + "/ready")).status_code == 200:
                        break
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"the gateway did not get ready:\n{_tail(log)}")
                await asyncio.sleep(0.1)
        yield GatewayProcess(url, proc, log)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]
