"""Admin rights come only from an operator (``meetmesh user grant-admin NAME``), never from registering
a name; revoking them or deleting the user refuses the user's older tokens at the gateway; ``meetmesh
token`` mints only for registered users."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import pytest

from gateway.auth import verify
from services.common import ServiceSettings
from services.user.admin import UserStore

from ..gateway.conftest import SECRET
from .conftest import Mesh, Store, bearer

API = "/api/v1"
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery"
SQLITE_ONLY = pytest.mark.parametrize("store", ["sqlite"], indirect=True)   # the CLI's process, once


async def meetmesh(*args: str, mesh: Mesh, store: Store) -> tuple[int, str, str]:
    """``meetmesh ARGS`` in a process of its own, on the mesh's store, Redis prefix and secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEETMESH_")}
    env |= {"MEETMESH_DATABASE_URL": store.url, "MEETMESH_REDIS_URL": mesh.settings.redis_url,
            "MEETMESH_KEY_PREFIX": mesh.settings.key_prefix, "MEETMESH_JWT_SECRET": SECRET}
    if store.schema:
        env["MEETMESH_DATABASE_SCHEMA"] = store.schema
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meetmesh", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def login(mesh: Mesh, name: str) -> str:
    r = await mesh.http.post(f"{API}/auth/login", json={"username": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    token: str = r.json()["access_token"]
    return token


async def test_registering_an_admin_listed_name_grants_nothing(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MEETMESH_ADMIN_USERNAMES", "root,ops")   # the old way: no longer read
    with caplog.at_level(logging.WARNING):
        ServiceSettings.load()
    assert "MEETMESH_ADMIN_USERNAMES is no longer read" in caplog.text
    for name in ("root", "Ops"):
        answer = await mesh.register(name)
        assert answer["user"]["roles"] == ["user"] and not verify(SECRET, answer["access_token"]).is_admin
        r = await mesh.http.get(f"{API}/users", headers=bearer(answer["access_token"]))
        assert r.status_code == 403


@SQLITE_ONLY
async def test_grant_admin_by_the_operator_then_revoke_refuses_the_admin_token(
    mesh: Mesh, store: Store
) -> None:
    await mesh.register("root")
    code, out, err = await meetmesh("user", "grant-admin", "ROOT", mesh=mesh, store=store)
    assert code == 0 and out.startswith("granted admin: root") and "admin" in out, err
    admin = await login(mesh, "root")
    assert verify(SECRET, admin).is_admin
    assert (await mesh.http.get(f"{API}/users", headers=bearer(admin))).status_code == 200
    code, out, _ = await meetmesh("user", "grant-admin", "root", mesh=mesh, store=store)
    assert code == 0 and out.startswith("already an admin")

    code, out, err = await meetmesh("user", "revoke-admin", "root", mesh=mesh, store=store)
    assert code == 0 and out.startswith("revoked admin: root"), err
    r = await mesh.http.get(f"{API}/users", headers=bearer(admin))   # the token still says admin
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"], r.text
    fresh = await login(mesh, "root")
    assert not verify(SECRET, fresh).is_admin
    assert (await mesh.http.get(f"{API}/users/me", headers=bearer(fresh))).status_code == 200
    assert (await mesh.http.get(f"{API}/users", headers=bearer(fresh))).status_code == 403

    code, _, err = await meetmesh("user", "grant-admin", "nobody", mesh=mesh, store=store)
    assert code == 1 and "no user named 'nobody'" in err and "Traceback" not in err


@SQLITE_ONLY
async def test_meetmesh_token_mints_only_for_registered_users(mesh: Mesh, store: Store) -> None:
    alice = (await mesh.register("alice"))["user"]
    code, out, err = await meetmesh("token", "--user", "Alice", mesh=mesh, store=store)
    assert code == 0, err
    principal = verify(SECRET, out.strip())
    assert principal.user == alice["id"] and principal.roles == {"user"}   # her id and stored roles
    r = await mesh.http.post(f"{API}/meetings", headers=bearer(out.strip()), json={"title": "t"})
    assert r.status_code == 201 and r.json()["host_id"] == alice["id"]   # no phantom host
    code, out, err = await meetmesh("token", "--user", "eve", mesh=mesh, store=store)
    assert code == 1 and out == "" and "no user named 'eve'" in err
    code, _, err = await meetmesh("token", "--user", "alice", "--admin", mesh=mesh, store=store)
    assert code != 0 and "--admin" in err   # admin comes from grant-admin only


async def test_a_deleted_users_tokens_are_refused(mesh: Mesh) -> None:
    alice = await mesh.register("alice")
    bob = await mesh.register("bob")
    headers = bearer(alice["access_token"])
    assert (await mesh.http.get(f"{API}/users/me", headers=headers)).status_code == 200
    async with UserStore.open(mesh.settings) as store:
        deleted = await store.delete("alice")
        assert deleted.id == alice["user"]["id"]
    for path in (f"{API}/users/me", f"{API}/meetings", f"{API}/tasks/ai.nope"):
        r = await mesh.http.get(path, headers=headers)
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"], (path, r.text)
    r = await mesh.http.post(f"{API}/auth/login", json={"username": "alice", "password": PASSWORD})
    assert r.status_code == 401
    assert (await mesh.http.get(f"{API}/users/me", headers=bearer(bob["access_token"]))).status_code == 200
    again = await mesh.register("alice")   # the name is free again: a new account, a new id
    assert again["user"]["id"] != alice["user"]["id"]
    assert (await mesh.http.get(f"{API}/users/me", headers=bearer(again["access_token"]))).status_code == 200


async def test_an_admin_taking_the_admin_role_away_refuses_the_old_token(mesh: Mesh) -> None:
    root, carol = await mesh.register("root"), await mesh.register("carol")
    async with UserStore.open(mesh.settings) as store:
        await store.set_admin("root", True)
        await store.set_admin("carol", True)
    root_token, carol_token = await login(mesh, "root"), await login(mesh, "carol")
    r = await mesh.http.put(f"{API}/users/{carol['user']['id']}/roles", headers=bearer(root_token),
                            json={"roles": ["user"]})
    assert r.status_code == 200 and r.json()["roles"] == ["user"], r.text
    r = await mesh.http.get(f"{API}/users", headers=bearer(carol_token))
    assert r.status_code == 401, r.text
    assert (await mesh.http.get(f"{API}/users", headers=bearer(root_token))).status_code == 200
    assert root["user"]["roles"] == ["user"]   # as registered
