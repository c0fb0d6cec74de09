"""No token or secret in a whole mesh run's output: `meetmesh up` (as tests/e2e/test_mesh.py starts it:
the gateway, the four services and an edge node, each a real process) is driven with tokens the user
service issued, over REST, over the WebSocket in each of its three ways (``?token=``, the
``bearer`` subprotocol, a first ``auth`` frame), with a wrong signature and with an admin's token;
then the mesh is stopped and every line any process printed (``up`` relays each child's stdout and
stderr, prefixed with its name, and adds its own) is searched for every token, the password and
the JWT signing secret.

``up`` redacts what it relays as ``[redacted by up]``: none may be found, so each process's own
logging did the redacting. The lines that would carry a token (uvicorn's ``"WebSocket /ws?token=..."
[accepted]``) must be there, redacted, or the search proves nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import sys
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect

from meetmesh.up import REDACTED_BY_UP
from shared.bus.redact import REDACTED

from . import test_mesh as harness
from .test_mesh import ROOT, Mesh, auth, register

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
mesh = harness.mesh   # the same fixture: `meetmesh up` on its own prefix, data folder and ports
PASSWORD = "a long password"   # what `harness.register` registers with
PROCESSES = ("up", "gateway", "user", "meeting", "media", "ai", "edge")
PREFIXED = re.compile(r"^(\S+)\s+\| ")


async def _welcome(ws: Any) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert frame["type"] == "welcome", frame
    return frame


async def _login(http: httpx.AsyncClient, name: str) -> str:
    answer = await http.post("/api/v1/auth/login", json={"username": name, "password": PASSWORD})
    assert answer.status_code == 200, answer.text
    token: str = answer.json()["access_token"]
    return token


async def _grant_admin(mesh: Mesh, name: str) -> None:
    """``meetmesh user grant-admin NAME`` on the mesh's store (its data folder), as an operator would."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meetmesh", "user", "grant-admin", name, cwd=ROOT, env=mesh.env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0 and out.decode().startswith("granted admin"), out.decode()


async def _stop(mesh: Mesh) -> list[str]:
    """SIGTERM to `up`; every line it printed, once its last (``up | stopped``) is read."""
    assert mesh.proc is not None
    mesh.proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(mesh.proc.wait(), 120)
    for _ in range(200):   # the fixture's reader is draining the pipe
        if mesh.output and mesh.output[-1].endswith("| stopped"):
            break
        await asyncio.sleep(0.05)
    assert mesh.proc.returncode == 0 and mesh.output[-1].endswith("| stopped"), "\n".join(mesh.output[-40:])
    return list(mesh.output)


@pytest.mark.parametrize("mesh", ["echo"], indirect=True)
async def test_no_token_or_secret_in_any_output_of_a_mesh_run(mesh: Mesh) -> None:
    secret = mesh.env["MEETMESH_JWT_SECRET"]
    tag = secrets.token_hex(3)
    tokens: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=mesh.url, timeout=60) as http:
        # tokens the user service issued: at registering, and at logging in
        tokens["register"], user_id = await register(http, f"ann-{tag}")
        tokens["login"] = await _login(http, f"ann-{tag}")
        me = await http.get("/api/v1/users/me", headers=auth(tokens["register"]))
        assert me.status_code == 200 and me.json()["id"] == user_id, me.text
        created = await http.post("/api/v1/meetings", json={"title": "tokens"}, headers=auth(tokens["login"]))
        assert created.status_code == 201, created.text

        # the WebSocket, every way: ?token=, the bearer subprotocol, a first auth frame
        async with connect(f"{mesh.ws}?token={tokens['register']}") as ws:
            await _welcome(ws)
            await ws.send(json.dumps({"type": "submit", "id": "s1", "task": "ai.summarize",
                                      "data": {"text": "Ship it on Friday."}}))
            while (frame := json.loads(await asyncio.wait_for(ws.recv(), 60)))["type"] != "result":
                assert frame["type"] != "error", frame
            assert frame["status"] == "completed", frame
        async with connect(mesh.ws, subprotocols=["bearer", tokens["login"]]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "bearer"
            await _welcome(ws)
        tokens["frame"] = await _login(http, f"ann-{tag}")
        async with connect(mesh.ws) as ws:
            await ws.send(json.dumps({"type": "auth", "token": tokens["frame"]}))
            await _welcome(ws)

        # a wrong signature, over REST and over the WebSocket: refused, and its refusal logs no token
        tokens["bad"] = tokens["login"][:-6] + "AAAAAA"
        refused = await http.get("/api/v1/users/me", headers=auth(tokens["bad"]))
        assert refused.status_code == 401, refused.text
        async with connect(f"{mesh.ws}?token={tokens['bad']}") as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008

        # an admin's token (granted by the operator, then logged in), on an admin route and a socket
        await register(http, f"root-{tag}")
        await _grant_admin(mesh, f"root-{tag}")
        tokens["admin"] = await _login(http, f"root-{tag}")
        queues = await http.get("/api/v1/queues", headers=auth(tokens["admin"]))
        assert queues.status_code == 200, queues.text
        async with connect(f"{mesh.ws}?token={tokens['admin']}") as ws:
            await _welcome(ws)

    lines = await _stop(mesh)
    text = "\n".join(lines)
    seen = {m.group(1) for m in map(PREFIXED.match, lines) if m is not None}
    assert set(PROCESSES) <= seen, f"no output captured from {set(PROCESSES) - seen}"

    # the lines that would have carried the tokens are there, redacted by the gateway itself
    accepted = [line for line in lines if line.startswith("gateway") and "[accepted]" in line]
    assert sum(f"/ws?token={REDACTED}" in line for line in accepted) >= 3, "\n".join(accepted)
    assert len(accepted) >= 5, "\n".join(accepted)   # every socket opened above
    assert REDACTED_BY_UP not in text, [line for line in lines if REDACTED_BY_UP in line]

    for way, token in tokens.items():
        for piece in (token, token.split(".")[2], token.split(".")[1]):   # whole, signature, claims
            assert piece not in text, f"the {way} token is in the mesh's output"
    assert secret not in text, "the JWT secret is in the mesh's output"
    assert PASSWORD not in text, "a password is in the mesh's output"
