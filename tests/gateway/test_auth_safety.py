"""Safe by default: tokens the gateway refuses (alg=none, a wrong signature, expired, revoked), the
signing secret required outside development mode, read from ``*_FILE``, and the development secret
kept in the data folder across restarts."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from pydantic import ValidationError
from websockets.typing import Subprotocol

from gateway.auth import mint, verify
from gateway.errors import ApiError
from gateway.settings import GatewaySettings
from meetmesh.up import READY_LINE, signing_mode
from services.common import ServiceSettings
from services.user.revocation import revoke_tokens
from shared.bus import ConfigError
from shared.bus.credentials import KNOWN_DEV_SECRETS, dev_secret, signing_secret

from .conftest import SECRET, auth, free_port

ROOT = Path(__file__).resolve().parents[2]
PROBE = "/api/v1/tasks/ai.nope"   # needs a token; with a good one it answers 404 (no such task)


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.fixture
def no_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No secret in the environment, production mode, the data folder in tmp_path."""
    for name in ("MEETMESH_JWT_SECRET", "MEETMESH_JWT_SECRET_FILE", "MEETMESH_ENV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEETMESH_DATA_DIR", str(tmp_path))
    return tmp_path


# -- tokens the gateway refuses ------------------------------------------------------------------


async def test_the_gateway_refuses_forged_expired_and_unsigned_tokens(http: httpx.AsyncClient) -> None:
    now = int(time.time())
    claims = {"sub": "alice", "roles": ["user", "admin"], "iat": now, "exp": now + 3600}
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    forged = jwt.encode(claims, "someone-elses-secret-0123456789abcdef", algorithm="HS256")
    expired = mint(SECRET, "alice", ttl=-10)
    for name, token in (("alg=none", unsigned), ("wrong signature", forged), ("expired", expired),
                        ("garbage", "not.a.jwt")):
        r = await http.get(PROBE, headers=auth(token))
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (name, r.text)
    assert "expired" in (await http.get(PROBE, headers=auth(expired))).json()["error"]["message"]
    # the same claims, signed with the gateway's secret, pass: the refusals above are the tokens' own
    assert (await http.get(PROBE, headers=auth(jwt.encode(claims, SECRET, "HS256")))).status_code == 404
    with pytest.raises(ApiError, match="invalid token"):   # also verify() alone, for other algorithms
        verify(SECRET, jwt.encode(claims, SECRET, algorithm="HS512"))


async def test_tokens_issued_before_a_revocation_are_refused(
    http: httpx.AsyncClient, redis: Any, key_prefix: str
) -> None:
    """A deleted user (or one that lost a role) has its older tokens refused; newer ones work."""
    old, other = mint(SECRET, "u-gone"), mint(SECRET, "u-stays")
    assert (await http.get(PROBE, headers=auth(old))).status_code == 404
    await revoke_tokens(redis, key_prefix, "u-gone")
    r = await http.get(PROBE, headers=auth(old))
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"], r.text
    assert (await http.get(PROBE, headers=auth(other))).status_code == 404   # only that user's
    assert (await http.get(PROBE, headers=auth(mint(SECRET, "u-gone")))).status_code == 404   # issued after
    no_iat = jwt.encode({"sub": "u-gone", "roles": ["user"], "exp": int(time.time()) + 60}, SECRET, "HS256")
    assert (await http.get(PROBE, headers=auth(no_iat))).status_code == 401   # no iat: older than any


async def test_a_revoked_token_cannot_open_a_socket(gateway: str, redis: Any, key_prefix: str) -> None:
    """The WebSocket checks revocation as REST does: a deleted user's older token is closed with 1008."""
    old = mint(SECRET, "u-gone-ws")
    url = gateway.replace("http", "ws") + "/ws"
    async with websockets.connect(url, subprotocols=[Subprotocol("bearer"), Subprotocol(old)]) as ws:
        assert json.loads(await ws.recv())["type"] == "welcome"   # before the revocation: let in
    await revoke_tokens(redis, key_prefix, "u-gone-ws")
    async with websockets.connect(url, subprotocols=[Subprotocol("bearer"), Subprotocol(old)]) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert "revoked" in closed.value.rcvd.reason


# -- the secret at start-up ------------------------------------------------------------------------


def test_no_secret_outside_dev_mode_is_a_start_up_error_naming_it(no_secret: Path) -> None:
    for settings in (GatewaySettings, ServiceSettings):
        with pytest.raises(ConfigError, match=r"MEETMESH_JWT_SECRET.*not set"):
            settings.load()
        with pytest.raises(ValidationError, match="MEETMESH_JWT_SECRET"):
            settings()
        with pytest.raises(ValidationError, match="too short"):
            settings(jwt_secret="short-secret")
        for known in KNOWN_DEV_SECRETS:
            with pytest.raises(ValidationError, match="published development value"):
                settings(jwt_secret=known)
        assert settings(jwt_secret="x" * 32).jwt_secret == "x" * 32
        with pytest.raises(ValidationError, match="not set"):   # any mode but dev is production
            settings(env="staging")
    assert not (no_secret / "dev-secret").exists()   # nothing was made outside dev mode
    assert GatewaySettings(env=" DEV ").jwt_secret == (no_secret / "dev-secret").read_text().strip()


def test_meetmesh_gateway_without_a_secret_exits_with_one_line(no_secret: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEETMESH_")}
    env["MEETMESH_DATA_DIR"] = str(no_secret)
    done = subprocess.run([sys.executable, "-m", "meetmesh", "gateway", "--port", "1"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("meetmesh gateway: MEETMESH_JWT_SECRET"), done.stderr
    assert "MEETMESH_ENV=dev" in done.stderr   # the way out, named


def test_the_secret_may_come_from_a_file(no_secret: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = no_secret / "jwt-secret"
    path.write_text("s" * 40 + "\n")   # the newline an editor adds is not part of it
    monkeypatch.setenv("MEETMESH_JWT_SECRET_FILE", str(path))
    assert GatewaySettings.load().jwt_secret == ServiceSettings.load().jwt_secret == "s" * 40
    assert signing_secret() == ("s" * 40, "MEETMESH_JWT_SECRET")   # and for `meetmesh token`
    monkeypatch.setenv("MEETMESH_JWT_SECRET", "e" * 40)
    with pytest.raises(ConfigError, match="MEETMESH_JWT_SECRET and MEETMESH_JWT_SECRET_FILE are both set"):
        GatewaySettings.load()
    monkeypatch.delenv("MEETMESH_JWT_SECRET")
    monkeypatch.setenv("MEETMESH_JWT_SECRET_FILE", str(no_secret / "missing"))
    with pytest.raises(ConfigError, match="MEETMESH_JWT_SECRET_FILE: cannot read"):
        ServiceSettings.load()
    path.write_text("short\n")
    monkeypatch.setenv("MEETMESH_JWT_SECRET_FILE", str(path))
    with pytest.raises(ConfigError, match="too short"):
        GatewaySettings.load()


def test_dev_mode_signs_with_the_data_folders_secret_kept_across_restarts(
    no_secret: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert signing_secret() is None   # nothing made yet: `meetmesh token` would say what is missing
    env, note = signing_mode(no_secret)   # what `meetmesh up` does first
    assert env == {"MEETMESH_ENV": "dev"} and "made in" in note and "development mode" in note
    path = no_secret / "dev-secret"
    secret = path.read_text().strip()
    assert len(secret) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert signing_mode(no_secret) == (env, note.replace("made in", "kept in"))   # a restart keeps it
    assert path.read_text().strip() == secret
    monkeypatch.setenv("MEETMESH_ENV", "dev")   # what its processes get
    assert GatewaySettings.load().jwt_secret == ServiceSettings.load().jwt_secret == secret
    assert signing_secret() == (secret, str(path))   # `meetmesh token`/`submit` in another shell
    assert dev_secret(no_secret) == secret
    verify(GatewaySettings.load().jwt_secret, mint(secret, "alice"))   # a token of run 1 verifies in run 2
    # a dev-mode process started alone makes the secret itself, in its own data folder
    other = no_secret / "other"
    made = GatewaySettings(data_dir=other).jwt_secret
    assert ServiceSettings(data_dir=other).jwt_secret == made == (other / "dev-secret").read_text().strip()


def test_up_outside_dev_mode_needs_the_secret(no_secret: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEETMESH_ENV", "production")
    with pytest.raises(ConfigError, match="MEETMESH_ENV=production needs MEETMESH_JWT_SECRET"):
        signing_mode(no_secret)
    monkeypatch.setenv("MEETMESH_JWT_SECRET", "p" * 40)
    env, note = signing_mode(no_secret)
    assert env == {"MEETMESH_ENV": "production"} and "signed with MEETMESH_JWT_SECRET" in note
    assert not (no_secret / "dev-secret").exists()


# -- a real `meetmesh up`, twice --------------------------------------------------------------------


async def _cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "meetmesh", *args, cwd=ROOT,
                                                env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _up(port: int, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, list[str]]:
    """`meetmesh up` with the gateway and the user service only, once ready."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meetmesh", "up", "--scale", "meeting=0,media=0,ai=0", "--port-base",
        str(port), "--grace", "20", "--ready-timeout", "60", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    seen: list[str] = []
    while not any(line.startswith(READY_LINE) for line in seen):
        raw = await asyncio.wait_for(proc.stdout.readline(), 90)
        assert raw, "\n".join(seen)
        seen.append(raw.decode().rstrip())
    return proc, seen


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.communicate(), 60)


@pytest.mark.timeout(180)
async def test_up_keeps_its_dev_secret_so_tokens_outlive_a_restart(
    tmp_path: Path, redis_url: str, key_prefix: str, redis: Any
) -> None:
    """Run 1: register, and `meetmesh token` in "another shell" (nothing set but the data folder) mints
    with the kept secret. Run 2 on the same folder: that token still works; deleting the user ends it."""
    while (port := free_port()) > 65000:
        pass
    base = {k: v for k, v in os.environ.items() if not k.startswith("MEETMESH_")}
    env = {**base, "MEETMESH_REDIS_URL": redis_url, "MEETMESH_KEY_PREFIX": key_prefix,
           "MEETMESH_DATA_DIR": str(tmp_path), "COLUMNS": "200"}
    gateway = f"http://127.0.0.1:{port}/api/v1"
    proc, seen = await _up(port, env)
    try:
        assert any("MEETMESH_ENV=dev (development mode" in line and "made in" in line for line in seen)
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(f"{gateway}/auth/register", json={"username": "alice", "password": "p" * 12})
            assert r.status_code == 201, r.text
            alice = r.json()["user"]
            code, out, err = await _cli("token", "--user", "alice", env=env)
            assert code == 0 and "development secret in" in err, err
            token = out.strip()
            assert verify((tmp_path / "dev-secret").read_text().strip(), token).user == alice["id"]
            assert (await http.get(f"{gateway}/users/me", headers=auth(token))).status_code == 200
    finally:
        await _stop(proc)
    assert proc.returncode == 0
    proc, seen = await _up(port, env)
    try:
        assert any("development secret kept in" in line for line in seen), "\n".join(seen)
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(f"{gateway}/users/me", headers=auth(token))   # run 1's token
            assert r.status_code == 200 and r.json()["id"] == alice["id"], r.text
            code, out, err = await _cli("user", "delete", "alice", "--yes", env=env)
            assert code == 0 and out.startswith("deleted alice"), err
            r = await http.get(f"{gateway}/users/me", headers=auth(token))
            assert r.status_code == 401 and "revoked" in r.json()["error"]["message"], r.text
    finally:
        await _stop(proc)
