"""The WebSocket fuzzer (`gateway.fuzz.fuzz_ws`) against a real ``meetmesh gateway`` process: 10,000
malformed, oversize, deeply nested, binary, wrongly typed, out-of-order and flood frames over 20
sockets. The gateway stays up (the same process, still serving), a control client's pings keep being
answered, every bad frame ends in an ``error`` frame, an answer or a documented close, and the
gateway's log holds no ASGI exception and no traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.auth import mint
from gateway.fuzz import fuzz_ws

from .conftest import SECRET
from .process import gateway_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
MAX_FRAME_BYTES = 64 * 1024
FRAMES, SOCKETS = 10_000, 20
LIVENESS_S = 5.0  # a generous bound on the control client's slowest ping: alive, not fast


async def test_ten_thousand_bad_frames_over_twenty_sockets(
    tmp_path: Path, redis_url: str, key_prefix: str, redis: Any
) -> None:
    tokens = [mint(SECRET, f"fuzz-{i}") for i in range(SOCKETS)]
    async with gateway_process(redis_url, key_prefix, tmp_path / "gateway.log",
                               MEETMESH_MAX_FRAME_BYTES=str(MAX_FRAME_BYTES)) as gw:
        pid = gw.proc.pid
        report = await fuzz_ws(gw.ws, tokens, control_token=mint(SECRET, "control"), frames=FRAMES,
                               sockets=SOCKETS, seed=14, max_frame_bytes=MAX_FRAME_BYTES)
        assert gw.proc.returncode is None and gw.proc.pid == pid  # still up, the same process
        async with httpx.AsyncClient(base_url=gw.url) as http:
            assert (await http.get("/health")).status_code == 200
    print("fuzz report:", json.dumps(report.as_dict()))
    assert report.frames == FRAMES
    assert not report.failures, report.failures[:10]
    assert report.ok
    assert report.error_frames > FRAMES // 2  # nearly every frame is plainly bad
    assert report.closes.get(1006, 0) == 0 and report.closes[1009] >= 1 and report.closes[1008] >= 1
    # Of the documented codes, only these fit these frames: a bad first frame where the token was due,
    # too big for uvicorn, or a flood left unread
    assert set(report.closes) <= {1008, 1009, 4008}, report.closes
    assert report.control_pings > 0 and report.control_max_rtt_s < LIVENESS_S
    output = gw.output()
    assert "Exception in ASGI application" not in output and "Traceback" not in output, output[-3000:]
