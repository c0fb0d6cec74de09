"""The user service through a real gateway, on SQLite and on PostgreSQL: register, log in, tokens the
gateway verifies, profiles, roles, bad input, events, and the ``user.profile.update`` task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest

from gateway.auth import verify
from gateway.task_routes import TASK_ROUTES
from services.common import ServiceSettings, gateway_key
from services.common.identity import KEY_HEADER, USER_HEADER
from services.user.admin import UserStore
from services.user.service import build as build_user
from shared.bus import Queue, TaskStatus
from shared.bus.dispatch.dispatcher import Dispatcher

from ..gateway.conftest import SECRET
from .conftest import Mesh, bearer, recording, until

API = "/api/v1"


async def test_register_login_me_and_the_token_verifies_in_the_gateway(mesh: Mesh) -> None:
    async with recording(mesh.settings, "user.*") as events:
        answer = await mesh.register("Alice", email="alice@example.org", display_name="Alice A.")
        await until(lambda: events, "user.registered")
    user = answer["user"]
    assert user["username"] == "Alice" and user["roles"] == ["user"] and user["email"] == "alice@example.org"
    assert [(e.type, e.data.user_id, e.data.username) for e in events] == [
        ("user.registered", user["id"], "Alice")
    ]

    principal = verify(SECRET, answer["access_token"])
    assert principal.user == user["id"] and principal.roles == {"user"} and not principal.is_admin
    claims = jwt.decode(answer["access_token"], SECRET, algorithms=["HS256"])
    assert claims["exp"] == answer["expires_at"] and claims["exp"] > claims["iat"]

    r = await mesh.http.post(
        f"{API}/auth/login", json={"username": "alice", "password": "correct horse battery"}
    )
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    r = await mesh.http.get(f"{API}/users/me", headers=bearer(token))
    assert r.status_code == 200 and r.json() == user

    r = await mesh.http.patch(
        f"{API}/users/me", headers=bearer(token), json={"display_name": "Al", "email": None}
    )
    assert r.status_code == 200 and r.json()["display_name"] == "Al" and r.json()["email"] is None


async def test_bad_input_answers_clear_json_errors(mesh: Mesh) -> None:
    await mesh.register("bob")
    r = await mesh.http.post(f"{API}/auth/register", json={"username": "BOB", "password": "another password"})
    assert (
        r.status_code == 409
        and r.json()["error"]["code"] == "conflict"
        and "taken" in r.json()["error"]["message"]
    )

    wrong = await mesh.http.post(f"{API}/auth/login", json={"username": "bob", "password": "not it at all"})
    nobody = await mesh.http.post(f"{API}/auth/login", json={"username": "nobody", "password": "whatever1"})
    assert wrong.status_code == nobody.status_code == 401
    assert (
        wrong.json()
        == nobody.json()
        == {"error": {"code": "unauthorized", "message": "invalid username or password"}}
    )

    cases: list[tuple[dict[str, Any], str]] = [
        ({"username": "bo", "password": "long enough"}, "username"),
        ({"username": "bob b", "password": "long enough"}, "username"),
        ({"username": "carol", "password": "short"}, "password"),
        ({"username": "carol", "password": "long enough", "email": "not-an-email"}, "email"),
        ({"username": "carol", "password": "long enough", "admin": True}, "admin"),
        ({"username": 42, "password": "long enough"}, "username"),
        ({"password": "long enough"}, "username"),
    ]
    for body, field in cases:
        r = await mesh.http.post(f"{API}/auth/register", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["code"] == "bad_request" and field in r.json()["error"]["message"], r.text
    r = await mesh.http.post(
        f"{API}/auth/register", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"

    r = await mesh.http.get(f"{API}/users/me")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = await mesh.http.patch(
        f"{API}/users/me", headers=bearer(_token(mesh, "ghost")), json={"display_name": "x"}
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    bob = (
        await mesh.http.post(
            f"{API}/auth/login", json={"username": "bob", "password": "correct horse battery"}
        )
    ).json()["access_token"]
    r = await mesh.http.patch(f"{API}/users/me", headers=bearer(bob), json={})
    assert r.status_code == 400 and "nothing to update" in r.json()["error"]["message"]


async def test_admin_role_path(mesh: Mesh) -> None:
    """Registering grants no admin role; an operator's ``meetmesh user grant-admin`` (`UserStore`) does;
    admins list users and grant roles, effective from the next token."""
    root = await mesh.register("root")
    assert root["user"]["roles"] == ["user"] and not verify(SECRET, root["access_token"]).is_admin
    async with UserStore.open(mesh.settings) as store:
        assert (await store.set_admin("root", True)).changed
    r = await mesh.http.post(f"{API}/auth/login",
                             json={"username": "root", "password": "correct horse battery"})
    root = r.json()
    assert root["user"]["roles"] == ["user", "admin"] and verify(SECRET, root["access_token"]).is_admin
    alice = await mesh.register("alice")
    for path in ("/users", f"/users/{root['user']['id']}"):
        r = await mesh.http.get(API + path, headers=bearer(alice["access_token"]))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", path
    r = await mesh.http.put(
        f"{API}/users/{alice['user']['id']}/roles",
        headers=bearer(alice["access_token"]),
        json={"roles": ["admin"]},
    )
    assert r.status_code == 403

    r = await mesh.http.get(f"{API}/users", headers=bearer(root["access_token"]))
    assert r.status_code == 200 and [u["username"] for u in r.json()] == ["root", "alice"]
    r = await mesh.http.put(
        f"{API}/users/{alice['user']['id']}/roles",
        headers=bearer(root["access_token"]),
        json={"roles": ["admin"]},
    )
    assert r.status_code == 200 and r.json()["roles"] == ["user", "admin"]
    r = await mesh.http.put(
        f"{API}/users/{alice['user']['id']}/roles",
        headers=bearer(root["access_token"]),
        json={"roles": ["superuser"]},
    )
    assert r.status_code == 400
    r = await mesh.http.get(f"{API}/users/nobody", headers=bearer(root["access_token"]))
    assert r.status_code == 404
    again = await mesh.http.post(
        f"{API}/auth/login", json={"username": "alice", "password": "correct horse battery"}
    )
    assert verify(SECRET, again.json()["access_token"]).is_admin


async def test_the_service_answers_only_the_gateway(mesh: Mesh) -> None:
    url = str(mesh.user.url)
    async with httpx.AsyncClient(base_url=url) as direct:
        r = await direct.get("/users/me", headers={USER_HEADER: "someone"})
        assert r.status_code == 401 and "gateway" in r.json()["error"]["message"]
        r = await direct.get("/users/me", headers={USER_HEADER: "someone", KEY_HEADER: "guess"})
        assert r.status_code == 401
        r = await direct.get("/users/me", headers={USER_HEADER: "someone", KEY_HEADER: gateway_key(SECRET)})
        assert r.status_code == 404  # trusted, and there is no such user
        assert (await direct.get("/health")).json()["status"] == "ok"
        ready = await direct.get("/ready")
        assert ready.status_code == 200 and all(ready.json()["checks"].values()), ready.text


async def test_profile_update_task_and_a_bad_one_dead_lettered(
    mesh: Mesh, redis: Any, make_settings: Callable[..., ServiceSettings]
) -> None:
    alice = await mesh.register("alice")
    dispatcher = Dispatcher(redis, routes=TASK_ROUTES, prefix=mesh.settings.key_prefix)
    good = await dispatcher.submit(
        owner=alice["user"]["id"], type="user.profile.update", data={"display_name": "Alice Liddell"}
    )
    bad = await dispatcher.submit(
        owner=alice["user"]["id"], type="user.profile.update", data={"nickname": "x"}
    )
    nobody = await dispatcher.submit(
        owner="no-such-user", type="user.profile.update", data={"email": "a@b.cd"}
    )

    async def finished() -> bool:
        records = [await dispatcher.get(t.task_id) for t in (good, bad, nobody)]
        return all(r.status.terminal for r in records)

    await until(finished, "the three tasks to finish")
    record = await dispatcher.get(good.task_id)
    assert record.status == TaskStatus.COMPLETED and record.result["display_name"] == "Alice Liddell"
    for task, reason in ((bad, "nickname"), (nobody, "not_found")):
        record = await dispatcher.get(task.task_id)
        assert record.status == TaskStatus.FAILED and record.error is not None
        assert record.error.code == "rejected" and reason in record.error.message
    dead = await Queue("user", redis, prefix=mesh.settings.key_prefix).dead_letters()
    assert {r.id for r in dead} == {bad.task_id, nobody.task_id}

    # Persisted: a new service on the same store reads it back.
    again = build_user(make_settings(), port=0)
    async with again.running():
        async with httpx.AsyncClient(base_url=str(again.url)) as direct:
            headers = {USER_HEADER: alice["user"]["id"], KEY_HEADER: gateway_key(SECRET)}
            assert (await direct.get("/users/me", headers=headers)).json()["display_name"] == "Alice Liddell"


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
async def test_a_token_for_an_unknown_secret_is_refused(mesh: Mesh) -> None:
    forged = jwt.encode(
        {"sub": "x", "roles": ["admin"], "exp": 2**31}, "another-secret-0123456789abcdef-01234"
    )
    r = await mesh.http.get(f"{API}/users", headers=bearer(forged))
    assert r.status_code == 401


def _token(mesh: Mesh, user: str) -> str:
    from gateway.auth import mint

    return mint(SECRET, user)
