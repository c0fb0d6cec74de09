"""The security matrix: every REST route (read from the app's route table, so a route added without
an entry here fails) and every WebSocket frame type, tried without a token, as a non-admin on admin
routes, and as user B on user A's tasks, meetings and media, which must answer exactly as things that
do not exist (404). Run against a real gateway in front of the user, meeting and media services."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import Route, WebSocketRoute

from gateway import create_app
from gateway.settings import GatewaySettings
from gateway.ws import _HANDLERS

from ..services.harness import running_services
from .conftest import SECRET, Client, auth, serve

# -- the matrix -----------------------------------------------------------------------------------
# PUBLIC: no token needed. USER: any signed-in user. ADMIN: admins only (403 for others).
# OTHERS: admin, or the caller's own (a non-admin naming another user: 403).
# TASK / MEETING / MEDIA: the caller's own task, a meeting they are in, their own upload: anyone
# else's answers as one that does not exist (404).
PUBLIC, USER, ADMIN, OTHERS = "public", "user", "admin", "others"
TASK, MEETING, MEDIA = "task", "meeting", "media"
A = "/api/v1"
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/health"): PUBLIC,
    ("GET", "/ready"): PUBLIC,
    ("POST", f"{A}/auth/login"): PUBLIC,
    ("POST", f"{A}/auth/register"): PUBLIC,
    ("GET", "/metrics"): ADMIN,
    ("POST", f"{A}/tasks"): USER,
    ("POST", f"{A}/tasks/batch"): USER,
    ("GET", f"{A}/tasks/{{task_id}}"): TASK,
    ("DELETE", f"{A}/tasks/{{task_id}}"): TASK,
    ("GET", f"{A}/tasks/{{task_id}}/events"): TASK,
    ("POST", f"{A}/tasks/retry-failed"): ADMIN,
    ("GET", f"{A}/queues"): ADMIN,
    ("GET", f"{A}/queues/{{name}}"): ADMIN,
    ("POST", f"{A}/queues/{{name}}/pause"): ADMIN,
    ("POST", f"{A}/queues/{{name}}/resume"): ADMIN,
    ("GET", f"{A}/queues/{{name}}/dead-letters"): ADMIN,
    ("POST", f"{A}/queues/{{name}}/dead-letters/replay"): ADMIN,
    ("GET", f"{A}/stats"): ADMIN,
    ("GET", f"{A}/users/me"): USER,
    ("PATCH", f"{A}/users/me"): USER,
    ("GET", f"{A}/users"): ADMIN,
    ("GET", f"{A}/users/{{user_id}}"): OTHERS,
    ("PUT", f"{A}/users/{{user_id}}/roles"): ADMIN,
    ("POST", f"{A}/meetings"): USER,
    ("GET", f"{A}/meetings"): USER,
    ("GET", f"{A}/meetings/{{meeting_id}}"): MEETING,
    ("POST", f"{A}/meetings/{{meeting_id}}/join"): USER,  # the meeting id is the invitation
    ("POST", f"{A}/meetings/{{meeting_id}}/leave"): MEETING,
    ("POST", f"{A}/meetings/{{meeting_id}}/end"): MEETING,
    ("POST", f"{A}/meetings/{{meeting_id}}/mute"): MEETING,
    ("POST", f"{A}/meetings/{{meeting_id}}/unmute"): MEETING,
    ("POST", f"{A}/meetings/{{meeting_id}}/kick"): MEETING,
    ("POST", f"{A}/meetings/{{meeting_id}}/chat"): MEETING,
    ("GET", f"{A}/meetings/{{meeting_id}}/chat"): MEETING,
    ("POST", f"{A}/media"): USER,
    ("GET", f"{A}/media"): USER,
    ("GET", f"{A}/media/{{media_id}}"): MEDIA,
    ("GET", f"{A}/media/{{media_id}}/cover"): MEDIA,
}
# The API's own description (FastAPI's pages, not in the document they describe): public on purpose.
DOCS = {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc")}
# A valid body for each route that needs one (so only the caller decides the answer).
BODIES: dict[tuple[str, str], Any] = {
    ("POST", f"{A}/tasks"): {"type": "ai.chat"},
    ("POST", f"{A}/tasks/batch"): {"tasks": [{"type": "ai.chat"}]},
    ("PATCH", f"{A}/users/me"): {"display_name": "B"},
    ("PUT", f"{A}/users/{{user_id}}/roles"): {"roles": ["user", "admin"]},
    ("POST", f"{A}/meetings/{{meeting_id}}/kick"): {"user_id": "someone"},
    ("POST", f"{A}/meetings/{{meeting_id}}/chat"): {"text": "hello"},
    ("POST", f"{A}/auth/login"): {"username": "nobody", "password": "not-a-password"},
}
# Every frame type: what user B sends about user A's things (``{task}``, ``{meeting}``, ``{session}``),
# and the answer it must get. "auth" on an authenticated socket is refused as a repeat.
FRAMES: dict[str, tuple[dict[str, Any], str]] = {
    "cancel": ({"type": "cancel", "task_id": "{task}"}, "not_found"),
    "subscribe": ({"type": "subscribe", "topic": "task.{task}"}, "not_found"),
    "resume": ({"type": "resume", "session_id": "{session}", "last_seq": 0}, "refused"),
    "submit": ({"type": "submit", "task": "ai.chat", "dedupe_key": "{dedupe}"}, "accepted"),
    "unsubscribe": ({"type": "unsubscribe", "topic": "task.{task}"}, "unsubscribed"),
    "ping": ({"type": "ping"}, "pong"),
    "auth": ({"type": "auth", "token": "{token}"}, "bad_request"),
}
MEETING_FRAME = {"type": "subscribe", "topic": "meeting.{meeting}"}  # a meeting B is not in: forbidden


def _walk(routes: Any, prefix: str = "") -> Any:
    """Every route of the table, into included routers (which FastAPI keeps as wrappers)."""
    for route in routes:
        included = getattr(route, "include_context", None)
        if included is not None:
            yield from _walk(included.included_router.routes, prefix + included.prefix)
        else:
            yield prefix, route


def app_routes() -> set[tuple[str, str]]:
    app = create_app(GatewaySettings(jwt_secret=SECRET))
    found = set()
    for prefix, route in _walk(app.routes):
        if isinstance(route, APIRoute | Route):
            found |= {(m, prefix + route.path) for m in (route.methods or ()) if m != "HEAD"}
        else:
            assert isinstance(route, APIWebSocketRoute | WebSocketRoute), route
            assert prefix + route.path == "/ws", "a WebSocket route the matrix does not know"
    return found


def test_every_route_and_frame_type_is_in_the_matrix() -> None:
    routes = app_routes()
    assert routes - set(ROUTES) - DOCS == set(), "routes with no entry in the security matrix"
    assert set(ROUTES) - routes == set(), "matrix entries for routes that are gone"
    document = create_app(GatewaySettings(jwt_secret=SECRET)).openapi()
    documented = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    assert documented == set(ROUTES)
    assert set(FRAMES) == set(_HANDLERS), "frame types with no entry in the security matrix"


# -- the mesh -------------------------------------------------------------------------------------


@dataclass
class Mesh:
    http: httpx.AsyncClient
    base: str

    async def user(self, name: str) -> tuple[str, str]:
        r = await self.http.post(f"{A}/auth/register", json={"username": name, "password": "pw-" * 4})
        assert r.status_code == 201, r.text
        return r.json()["user"]["id"], r.json()["access_token"]


@pytest.fixture
async def mesh(redis_url: str, key_prefix: str, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with running_services(redis_url=redis_url, key_prefix=key_prefix, jwt_secret=SECRET,
                                data_dir=tmp_path, workers=False):
        settings = GatewaySettings(redis_url=redis_url, key_prefix=key_prefix, jwt_secret=SECRET,
                                   submit_rate=1000, submit_burst=1000)
        async with serve(settings) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
            yield Mesh(http, base)


def fill(path: str, **values: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "x1"), path)


async def call(http: httpx.AsyncClient, method: str, path: str, template: str,
               headers: dict[str, str] | None = None) -> httpx.Response:
    body = BODIES.get((method, template))
    if method == "GET" and template.endswith("/events"):  # a stream: its status line is the answer
        async with http.stream(method, path, headers=headers) as r:
            return r
    return await http.request(method, path, headers=headers, json=body)


async def test_without_a_valid_token_only_four_routes_answer(mesh: Mesh) -> None:
    forged = jwt.encode({"sub": "alice", "roles": ["user", "admin"], "exp": 4_102_444_800}, "x" * 40,
                        algorithm="HS256")
    unsigned = jwt.encode({"sub": "alice", "roles": ["admin"], "exp": 4_102_444_800}, None, algorithm="none")
    expired = jwt.encode({"sub": "alice", "roles": ["admin"], "exp": 1}, SECRET, algorithm="HS256")
    for (method, template), kind in sorted(ROUTES.items()):
        path = fill(template, name="ai")
        for headers in (None, auth(forged), auth(unsigned), auth(expired)):
            r = await call(mesh.http, method, path, template, headers)
            if kind == PUBLIC:
                assert r.status_code != 401 or template.endswith("/login"), (method, template, r.status_code)
            else:
                assert r.status_code == 401, (method, template, headers, r.status_code)
                if method != "GET" or not template.endswith("/events"):
                    assert r.json()["error"]["code"] == "unauthorized"


async def test_a_non_admin_is_refused_every_admin_route(mesh: Mesh) -> None:
    alice_id, _ = await mesh.user("alice")
    _, bob = await mesh.user("bob")
    for (method, template), kind in sorted(ROUTES.items()):
        if kind not in (ADMIN, OTHERS):
            continue
        path = fill(template, name="ai", user_id=alice_id)
        r = await call(mesh.http, method, path, template, auth(bob))
        assert r.status_code == 403, (method, template, r.status_code, r.text)
        assert r.json()["error"]["code"] == "forbidden"
    # Bob's own profile is his to read.
    me = (await mesh.http.get(f"{A}/users/me", headers=auth(bob))).json()
    assert (await mesh.http.get(f"{A}/users/{me['id']}", headers=auth(bob))).status_code == 200


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    if shutil.which("ffmpeg") is None:
        pytest.skip("needs ffmpeg")
    out = tmp_path_factory.mktemp("clip") / "out.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=duration=1:size=64x48:rate=5", str(out)], check=True, timeout=60)
    return out.read_bytes()


async def test_user_b_on_user_as_things_gets_the_answer_for_things_that_do_not_exist(
    mesh: Mesh, clip: bytes
) -> None:
    _, alice = await mesh.user("alice")
    _, bob = await mesh.user("bob")
    submitted = await mesh.http.post(f"{A}/tasks", headers=auth(alice), json={"type": "ai.chat"})
    task = submitted.json()["task_id"]
    meeting = (await mesh.http.post(f"{A}/meetings", headers=auth(alice))).json()["id"]
    upload = await mesh.http.post(f"{A}/media", headers=auth(alice),
                                  files={"file": ("a.mp4", clip, "video/mp4")})
    assert upload.status_code == 201, upload.text
    media = upload.json()["media"]["id"]
    mine = {"task_id": task, "meeting_id": meeting, "media_id": media}
    missing = {"task_id": "ai.0000missing", "meeting_id": "nosuchmeeting", "media_id": "nosuchmedia"}
    owned = [(m, t) for (m, t), kind in sorted(ROUTES.items()) if kind in (TASK, MEETING, MEDIA)]
    for method, template in owned:
        theirs = await call(mesh.http, method, fill(template, **mine), template, auth(bob))
        absent = await call(mesh.http, method, fill(template, **missing), template, auth(bob))
        assert theirs.status_code == absent.status_code == 404, (method, template, theirs.status_code,
                                                                 absent.status_code)
        if not template.endswith("/events"):
            assert theirs.json()["error"]["code"] == absent.json()["error"]["code"] == "not_found"
            # the message says no more than for a missing one: only the id differs
            said, unknown = theirs.json()["error"]["message"], absent.json()["error"]["message"]
            for name, value in mine.items():
                said = said.replace(value, "<id>")
                unknown = unknown.replace(missing[name], "<id>")
            assert said == unknown, (method, template, said, unknown)
    # They are all there, and alice's: she is answered (not 404) on each read.
    for template in (f"{A}/tasks/{{task_id}}", f"{A}/meetings/{{meeting_id}}", f"{A}/media/{{media_id}}"):
        assert (await mesh.http.get(fill(template, **mine), headers=auth(alice))).status_code == 200
    # Bob's lists hold none of hers; nothing of hers was cancelled or ended.
    assert (await mesh.http.get(f"{A}/media", headers=auth(bob))).json() == []
    assert (await mesh.http.get(f"{A}/meetings", headers=auth(bob))).json() == []
    assert (await mesh.http.get(f"{A}/tasks/{task}", headers=auth(alice))).json()["status"] == "queued"
    assert (await mesh.http.get(f"{A}/meetings/{meeting}", headers=auth(alice))).json()["status"] != "ended"


# -- the WebSocket --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def socket(base: str, token: str | None) -> AsyncIterator[Client]:
    url = base.replace("http://", "ws://") + "/ws" + (f"?token={token}" if token else "")
    async with websockets.connect(url) as ws:
        yield Client(ws)


async def test_no_frame_type_is_served_without_a_token(mesh: Mesh) -> None:
    for kind, (frame, _) in sorted(FRAMES.items()):
        sent = {k: v.replace("{token}", "not-a-token") if isinstance(v, str) else v for k, v in frame.items()}
        async with socket(mesh.base, None) as ws:
            await ws.send({**sent, "id": "x"})
            with pytest.raises(websockets.ConnectionClosed) as closed:
                frame_back = await ws.recv()
                pytest.fail(f"{kind}: answered {frame_back} without a token")
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008, kind
        async with socket(mesh.base, "not-a-token") as ws:  # a bad token in the URL: no frame either
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_every_frame_type_of_user_b_leaves_user_as_things_alone(mesh: Mesh) -> None:
    _, alice = await mesh.user("alice")
    _, bob = await mesh.user("bob")
    task = (await mesh.http.post(f"{A}/tasks", headers=auth(alice),
                                 json={"type": "ai.chat", "dedupe_key": "k1"})).json()["task_id"]
    meeting = (await mesh.http.post(f"{A}/meetings", headers=auth(alice))).json()["id"]
    async with socket(mesh.base, alice) as hers, socket(mesh.base, bob) as his:
        session = (await hers.recv())["session_id"]
        assert (await his.recv())["type"] == "welcome"
        values = {"{task}": task, "{session}": session, "{dedupe}": "k1", "{token}": bob,
                  "{meeting}": meeting}

        def filled(frame: dict[str, Any], n: str) -> dict[str, Any]:
            return {"id": n, **{k: re.sub(r"\{\w+\}", lambda m: values[m.group(0)], v) if isinstance(v, str)
                                else v for k, v in frame.items()}}

        seen: list[dict[str, Any]] = []
        for n, (kind, (frame, expected)) in enumerate(sorted(FRAMES.items())):
            request = f"f{n}"
            await his.send(filled(frame, request))
            answer = (await his.until(lambda f, r=request: f.get("id") == r))[-1]
            seen.append(answer)
            if expected in ("not_found", "bad_request"):
                assert answer["type"] == "error" and answer["code"] == expected, (kind, answer)
            elif expected == "refused":
                assert answer["type"] == "error", (kind, answer)
                assert answer["code"] in ("not_found", "forbidden"), (kind, answer)
            else:
                assert answer["type"] == expected, (kind, answer)
            if kind == "submit":
                assert answer["task_id"] != task  # her dedupe key made him a task of his own
        await his.send(filled(MEETING_FRAME, "m"))
        answer = (await his.until(lambda f: f.get("id") == "m"))[-1]
        assert answer["type"] == "error" and answer["code"] == "forbidden"
        # Nothing of hers reached him, and her session and task are untouched.
        await his.send({"type": "ping", "id": "last"})
        seen += await his.until(lambda f: f.get("id") == "last")
        assert [f for f in seen if f.get("task_id") == task and f["type"] != "error"] == []
        await hers.send({"type": "ping", "id": "still"})
        assert (await hers.until(lambda f: f.get("id") == "still"))[-1]["type"] == "pong"
        record = (await mesh.http.get(f"{A}/tasks/{task}", headers=auth(alice))).json()
        assert record["status"] == "queued"
