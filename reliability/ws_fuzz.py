"""``meetmesh chaos fuzz-ws``: the WebSocket fuzzer (`gateway.fuzz.fuzz_ws`) against a real gateway.

A ``meetmesh gateway`` child on a private Redis takes malformed, oversize, deeply nested, binary,
wrongly typed, out-of-order and flood frames over many sockets (one user each) while a control
client pings it. What it proves: the gateway stays up (the same PID, still answering ``/health``),
every bad frame ends in an ``error`` frame, an answer or a documented close code, the control
client's pings keep being answered (the slowest round trip is reported: liveness, not speed), and
the gateway's log holds no ASGI exception or traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from . import children
from .servers import PrivateRedis, free_port

PREFIX = "mmchaos-fuzz"
READY_TIMEOUT = 60.0
LOG_ALARMS = ("Exception in ASGI application", "Traceback")


@dataclass(frozen=True)
class FuzzConfig:
    frames: int = 10_000
    sockets: int = 20
    seed: int = 14
    max_frame_bytes: int = 64 * 1024  # the gateway's MEETMESH_MAX_FRAME_BYTES for the run


async def _ready(base: str, child: children.Child) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    async with httpx.AsyncClient() as http:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{base}/ready", timeout=2)).status_code == 200:
                    return
            if not child.alive:
                raise RuntimeError(f"gateway exited with {child.proc.returncode}:\n{child.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway at {base} not ready in {READY_TIMEOUT}s:\n{child.tail()}")
            await asyncio.sleep(0.1)


async def run_fuzz_ws(config: FuzzConfig, *, progress: Any = None) -> dict[str, Any]:
    """Run the scenario on a private Redis and a gateway child; the summary (``ok``: every guarantee held)."""
    from gateway.auth import mint
    from gateway.fuzz import fuzz_ws

    say = progress or (lambda text: None)
    logs = Path(tempfile.mkdtemp(prefix="meetmesh-chaos-fuzz-"))
    secret = secrets.token_urlsafe(32)
    async with PrivateRedis() as server:
        env = children.child_env(server.url, PREFIX, MEETMESH_JWT_SECRET=secret,
                                 MEETMESH_MAX_FRAME_BYTES=str(config.max_frame_bytes))
        port = free_port()
        gw = children.gateway(env, logs / "gateway.log", port)
        base = f"http://127.0.0.1:{port}"
        try:
            await _ready(base, gw)
            pid = gw.pid
            say(f"gateway (pid {pid}) ready on {server.url}; {config.frames:,} frames over "
                f"{config.sockets} sockets")
            tokens = [mint(secret, f"fuzz-{i}") for i in range(config.sockets)]
            report = await fuzz_ws(f"ws://127.0.0.1:{port}/ws", tokens, control_token=mint(secret, "control"),
                                   frames=config.frames, sockets=config.sockets, seed=config.seed,
                                   max_frame_bytes=config.max_frame_bytes)
            async with httpx.AsyncClient() as http:
                healthy = (await http.get(f"{base}/health", timeout=10)).status_code == 200
            same_pid = gw.alive and gw.pid == pid
        finally:
            await gw.terminate()
    output = (logs / "gateway.log").read_text(errors="replace")
    alarms = sum(output.count(alarm) for alarm in LOG_ALARMS)
    found = report.as_dict()
    return {
        "frames_tried": found["frames"], "error_frames": found["error_frames"], "answers": found["answers"],
        "closed_frames": found["closed_frames"], "error_frames_by_code": found["error_codes"],
        "closes_by_code": found["closes"], "frames_by_kind": found["by_kind"],
        "flood_frames": found["flood_frames"], "failures": found["failures"],
        "first_failures": found["first_failures"], "sockets_opened": found["sockets_opened"],
        "control_pings": found["control_pings"], "control_ping_max_s": found["control_max_rtt_s"],
        "gateway_same_pid": same_pid, "gateway_healthy_after": healthy, "log_exceptions": alarms,
        "seconds": found["seconds"], "gateway_log": str(logs / "gateway.log"),
        "ok": report.ok and same_pid and healthy and alarms == 0 and report.closes.get(1006, 0) == 0,
    }
