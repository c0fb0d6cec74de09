"""``meetmesh chaos fuzz-ws``: the WebSocket fuzzer through the chaos CLI, on its own private Redis and
gateway child, with fewer frames than the default 10,000 (tests/gateway/test_ws_fuzz.py sends those)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRAMES, SOCKETS = 1_000, 5


@pytest.mark.timeout(180)
def test_chaos_fuzz_ws_prints_a_summary_and_the_gateway_survives() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meetmesh", "chaos", "fuzz-ws", "--frames", str(FRAMES),
         "--sockets", str(SOCKETS), "--seed", "3", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["ok"] is True
    assert summary["frames_tried"] == FRAMES and summary["failures"] == 0, summary["first_failures"]
    assert summary["frames_tried"] == (summary["error_frames"] + summary["answers"]
                                       + summary["closed_frames"])
    assert summary["error_frames"] > FRAMES // 2 and sum(summary["error_frames_by_code"].values()) > 0
    # the first frames of sockets without a token (1008) and frames over uvicorn's limit (1009)
    assert summary["closes_by_code"].get("1008", 0) >= 1 and summary["closes_by_code"].get("1009", 0) >= 1
    assert "1006" not in summary["closes_by_code"]
    assert summary["gateway_same_pid"] is True and summary["gateway_healthy_after"] is True
    assert summary["log_exceptions"] == 0
    assert summary["control_pings"] > 0 and summary["control_ping_max_s"] > 0
