"""The meeting service through a real gateway, on SQLite and on PostgreSQL: the meeting's life over
REST (host-only moves refused to others), persisted across restarts, its events, live updates on a
WebSocket for participants only, chat and its transcript, and the ``meeting.*`` tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx

from gateway.task_routes import TASK_ROUTES
from services.common import ServiceSettings, gateway_key
from services.common.identity import KEY_HEADER, USER_HEADER
from services.meeting.client import MeetingClient
from services.meeting.presence import Presence
from services.meeting.service import build as build_meeting
from shared.bus import TaskStatus
from shared.bus.dispatch.dispatcher import Dispatcher

from ..gateway.conftest import SECRET
from .conftest import Mesh, admin_token, bearer, recording, until

API = "/api/v1/meetings"


async def users(mesh: Mesh, *names: str) -> list[tuple[str, dict[str, str]]]:
    """Register each name: (user id, auth headers)."""
    out = []
    for name in names:
        answer = await mesh.register(name)
        out.append((answer["user"]["id"], bearer(answer["access_token"])))
    return out


def who(meeting: dict[str, Any]) -> dict[str, bool]:
    """Participants now -> muted."""
    return {p["user_id"]: p["muted"] for p in meeting["participants"]}


async def test_a_meeting_from_start_to_end_with_its_events_and_a_restart(
    mesh: Mesh, redis: Any, make_settings: Callable[..., ServiceSettings]
) -> None:
    (alice, a), (bob, b), (carol, c), (_, d) = await users(mesh, "alice", "bob", "carol", "dave")
    http = mesh.http
    async with recording(mesh.settings, "meeting.*") as events:
        r = await http.post(API, headers=a, json={"title": "Standup"})
        assert r.status_code == 201, r.text
        meeting = r.json()
        mid = meeting["id"]
        assert (
            meeting["host_id"] == alice and meeting["status"] == "active" and who(meeting) == {alice: False}
        )
        assert meeting["participants"][0]["host"] is True

        for h in (b, c):
            assert (await http.post(f"{API}/{mid}/join", headers=h)).status_code == 200
        r = await http.post(f"{API}/{mid}/join", headers=b)  # again: nothing changes, nothing announced
        assert who(r.json()) == {alice: False, bob: False, carol: False}

        assert who((await http.post(f"{API}/{mid}/mute", headers=b)).json())[bob] is True
        assert who((await http.post(f"{API}/{mid}/unmute", headers=b, json={})).json())[bob] is False
        # Host-only moves, tried by a participant who is not the host:
        for path, body in (
            ("mute", {"user_id": carol}),
            ("unmute", {"user_id": carol}),
            ("kick", {"user_id": carol}),
            ("end", None),
        ):
            r = await http.post(f"{API}/{mid}/{path}", headers=b, json=body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (path, r.text)
            assert "host" in r.json()["error"]["message"]

        assert who((await http.post(f"{API}/{mid}/mute", headers=a, json={"user_id": carol})).json())[carol]
        r = await http.post(f"{API}/{mid}/kick", headers=a, json={"user_id": carol})
        assert r.status_code == 200 and carol not in who(r.json())
        r = await http.post(f"{API}/{mid}/join", headers=c)
        assert r.status_code == 403 and "removed" in r.json()["error"]["message"]
        r = await http.post(f"{API}/{mid}/kick", headers=a, json={"user_id": alice})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
        r = await http.post(f"{API}/{mid}/kick", headers=a, json={"user_id": "nobody"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"

        assert who((await http.post(f"{API}/{mid}/leave", headers=b)).json()) == {alice: False}
        r = await http.post(f"{API}/{mid}/leave", headers=b)
        assert r.status_code == 404 and "not in this meeting" in r.json()["error"]["message"]
        # dave was never in it: the meeting answers him as a missing one would (ids cannot be probed)
        r = await http.get(f"{API}/{mid}", headers=d)
        assert r.status_code == 404 and r.json()["error"]["message"] == f"no meeting {mid!r}", r.text
        assert (await http.get(f"{API}/{mid}", headers=b)).status_code == 200  # a past participant
        assert (await http.get(f"{API}/nope", headers=a)).status_code == 404
        assert [m["id"] for m in (await http.get(API, headers=a)).json()] == [mid]

        r = await http.post(f"{API}/{mid}/end", headers=a)
        assert r.status_code == 200 and r.json()["status"] == "ended" and r.json()["participants"] == []
        for path, h in (("join", b), ("end", a), ("mute", a)):
            r = await http.post(f"{API}/{mid}/{path}", headers=h)
            assert r.status_code == 409 and r.json()["error"]["code"] == "conflict", path
        await until(lambda: any(e.type == "meeting.ended" for e in events), "meeting.ended")

    assert [(e.type, getattr(e.data, "user_id", None)) for e in events] == [
        ("meeting.created", None),
        ("meeting.user_joined", alice),
        ("meeting.user_joined", bob),
        ("meeting.user_joined", carol),
        ("meeting.muted", bob),
        ("meeting.muted", bob),
        ("meeting.muted", carol),
        ("meeting.user_left", carol),
        ("meeting.user_left", bob),
        ("meeting.ended", None),
    ]
    assert [e.data.muted for e in events if e.type == "meeting.muted"] == [True, False, True]
    assert [e.data.kicked for e in events if e.type == "meeting.user_left"] == [True, False]
    assert events[-1].data.ended_by == alice and all(e.source == "meeting" for e in events)

    # A second, active meeting; Redis loses its participant set; a new service rebuilds it from SQL.
    second = (await http.post(API, headers=a, json={"title": "Retro"})).json()["id"]
    await http.post(f"{API}/{second}/join", headers=b)
    presence = Presence(redis, mesh.settings.key_prefix)
    assert await presence.members(second) == {alice, bob}
    await redis.delete(presence.keys.participants(second))
    again = build_meeting(make_settings(), port=0)
    async with again.running(), httpx.AsyncClient(base_url=str(again.url)) as direct:
        headers = {USER_HEADER: alice, KEY_HEADER: gateway_key(SECRET)}
        ended = (await direct.get(f"/meetings/{mid}", headers=headers)).json()
        assert ended["status"] == "ended" and ended["ended_by"] == alice and ended["title"] == "Standup"
        assert who((await direct.get(f"/meetings/{second}", headers=headers)).json()) == {
            alice: False,
            bob: False,
        }
        assert await presence.members(second) == {alice, bob}
        assert await presence.members(mid) == set()


async def test_live_updates_reach_participants_and_only_them(mesh: Mesh) -> None:
    (alice, a), (_, b), (carol, c) = await users(mesh, "alice", "bob", "carol")
    mid = (await mesh.http.post(API, headers=a, json={"title": "Live"})).json()["id"]
    await mesh.http.post(f"{API}/{mid}/join", headers=b)
    bob_token, carol_token = b["Authorization"].split()[1], c["Authorization"].split()[1]

    async with mesh.socket(bob_token) as bob_ws, mesh.socket(carol_token) as carol_ws:
        await bob_ws.send({"type": "subscribe", "id": "s1", "topic": f"meeting.{mid}"})
        assert (await bob_ws.recv())["type"] == "subscribed"
        for n, topic in enumerate((f"meeting.{mid}", "meeting.*", "meeting.>", ">", "*.x", "meeting.nope")):
            await carol_ws.send({"type": "subscribe", "id": f"c{n}", "topic": topic})
            frame = await carol_ws.recv()
            assert frame["type"] == "error" and frame["code"] == "forbidden" and frame["id"] == f"c{n}", topic
        await carol_ws.send({"type": "subscribe", "id": "c9", "topic": "media.m1"})  # not a meeting topic
        assert (await carol_ws.recv())["type"] == "subscribed"

        await mesh.http.post(f"{API}/{mid}/join", headers=c)
        await carol_ws.send({"type": "subscribe", "id": "c10", "topic": f"meeting.{mid}"})
        assert (await carol_ws.recv())["type"] == "subscribed"
        await mesh.http.post(f"{API}/{mid}/mute", headers=a, json={"user_id": carol})
        await mesh.http.post(f"{API}/{mid}/chat", headers=c, json={"text": "can you hear me?"})
        await mesh.http.post(f"{API}/{mid}/leave", headers=c)

        frames = await bob_ws.until(lambda f: f.get("event") == "meeting.user_left")
        events = [(f["event"], f["data"]) for f in frames if f["type"] == "event"]
        assert all(f["topic"] == f"meeting.{mid}" for f in frames if f["type"] == "event")
        assert [e for e, _ in events] == [
            "meeting.user_joined",
            "meeting.muted",
            "meeting.chat",
            "meeting.user_left",
        ]
        assert events[0][1] == {"meeting_id": mid, "user_id": carol}
        assert events[1][1] == {"meeting_id": mid, "user_id": carol, "muted": True, "by": alice}
        assert events[2][1]["text"] == "can you hear me?" and events[2][1]["user_id"] == carol
        assert events[3][1] == {"meeting_id": mid, "user_id": carol, "kicked": False}

    async with mesh.socket(admin_token()) as admin_ws:  # admins may follow any meeting
        await admin_ws.send({"type": "subscribe", "id": "a1", "topic": f"meeting.{mid}"})
        assert (await admin_ws.recv())["type"] == "subscribed"
        await admin_ws.send({"type": "subscribe", "id": "a2", "topic": "meeting.*"})
        assert (await admin_ws.recv())["type"] == "subscribed"


async def test_chat_is_stored_paged_and_readable_by_another_service(mesh: Mesh) -> None:
    (alice, a), (_, b), (_, d) = await users(mesh, "alice", "bob", "dave")
    mid = (await mesh.http.post(API, headers=a)).json()["id"]
    await mesh.http.post(f"{API}/{mid}/join", headers=b)
    for h, text in ((a, "hello"), (b, "hi alice"), (a, "let's start")):
        r = await mesh.http.post(f"{API}/{mid}/chat", headers=h, json={"text": text})
        assert r.status_code == 201, r.text
    r = await mesh.http.post(f"{API}/{mid}/chat", headers=d, json={"text": "let me in"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"   # as if there were none
    assert (await mesh.http.get(f"{API}/{mid}/chat", headers=d)).status_code == 404
    for bad in ({"text": ""}, {"text": "x" * 4001}, {"text": 3}, {}):
        r = await mesh.http.post(f"{API}/{mid}/chat", headers=a, json=bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", bad

    page = (await mesh.http.get(f"{API}/{mid}/chat", headers=b, params={"limit": 2})).json()
    assert [m["text"] for m in page["messages"]] == ["hello", "hi alice"] and page["next_after"] is not None
    rest = (await mesh.http.get(f"{API}/{mid}/chat", headers=b, params={"after": page["next_after"]})).json()
    assert [m["text"] for m in rest["messages"]] == ["let's start"] and rest["next_after"] is None

    await mesh.http.post(f"{API}/{mid}/end", headers=a)
    r = await mesh.http.post(f"{API}/{mid}/chat", headers=b, json={"text": "too late"})
    assert r.status_code == 409
    # The meeting service learnt the usernames from user.registered events.
    await until(lambda: _named(mesh, alice, mid), "the meeting service to learn alice's name")
    async with MeetingClient(mesh.settings, base_url=str(mesh.meeting.url)) as client:
        transcript = await client.transcript(mid)
        assert [(m.username, m.text) for m in transcript] == [
            ("alice", "hello"),
            ("bob", "hi alice"),
            ("alice", "let's start"),
        ]
        assert [m.text for m in await client.transcript(mid, max_messages=2)] == ["hello", "hi alice"]
        assert (await client.get(mid)).status == "ended"


async def _named(mesh: Mesh, user_id: str, meeting_id: str) -> bool:
    async with MeetingClient(mesh.settings, base_url=str(mesh.meeting.url)) as client:
        page = await client.chat(meeting_id)
    return any(m.user_id == user_id and m.username for m in page.messages)


async def test_bad_input_answers_clear_json_errors(mesh: Mesh) -> None:
    ((_, a),) = await users(mesh, "alice")
    mid = (await mesh.http.post(API, headers=a)).json()["id"]
    cases: list[tuple[str, str, Any]] = [
        ("POST", API, {"title": "x" * 201}),
        ("POST", API, {"title": 7}),
        ("POST", API, {"topic": "typo"}),
        ("POST", f"{API}/{mid}/kick", None),
        ("POST", f"{API}/{mid}/kick", {"user_id": ""}),
        ("POST", f"{API}/{mid}/mute", {"user_id": 5}),
        ("POST", f"{API}/bad id!/join", None),
        ("GET", f"{API}/{mid}/chat?limit=0", None),
        ("GET", f"{API}?status=paused", None),
    ]
    for method, path, body in cases:
        r = await mesh.http.request(method, path, headers=a, json=body)
        assert r.status_code == 400, (method, path, r.text)
        assert r.json()["error"]["code"] == "bad_request" and r.json()["error"]["message"], r.text
    r = await mesh.http.post(API, headers={**a, "Content-Type": "application/json"}, content=b"{oops")
    assert r.status_code == 400
    assert (await mesh.http.post(API, json={})).status_code == 401


async def test_tasks_do_what_rest_does_and_bad_ones_are_dead_lettered(mesh: Mesh, redis: Any) -> None:
    dispatcher = Dispatcher(redis, routes=TASK_ROUTES, prefix=mesh.settings.key_prefix)

    async def run(owner: str, type: str, data: Any = None, meeting_id: str | None = None) -> Any:
        submitted = await dispatcher.submit(owner=owner, type=type, data=data, meeting_id=meeting_id)

        async def done() -> bool:
            return (await dispatcher.get(submitted.task_id)).status.terminal

        await until(done, f"{type} to finish")
        return await dispatcher.get(submitted.task_id)

    created = await run("u-alice", "meeting.create", {"title": "by task"})
    assert created.status == TaskStatus.COMPLETED, created.error
    mid = created.result["id"]
    assert created.result["host_id"] == "u-alice" and created.result["title"] == "by task"
    joined = await run("u-bob", "meeting.join", meeting_id=mid)
    assert joined.status == TaskStatus.COMPLETED and set(who(joined.result)) == {"u-alice", "u-bob"}
    muted = await run("u-alice", "meeting.mute", {"user_id": "u-bob", "meeting_id": mid})
    assert muted.status == TaskStatus.COMPLETED and who(muted.result)["u-bob"] is True
    assert (await run("u-alice", "meeting.unmute", {"user_id": "u-bob"}, mid)).status == TaskStatus.COMPLETED

    bad: list[tuple[str, str, Any, str | None, str]] = [
        ("u-bob", "meeting.kick", {"user_id": "u-alice"}, mid, "forbidden: only the host"),
        ("u-alice", "meeting.kick", {}, mid, "user_id"),
        ("u-alice", "meeting.join", None, "no-such-meeting", "not_found"),
        ("u-alice", "meeting.create", "not an object", None, "JSON object"),
        ("u-alice", "meeting.create", {"title": ["x"]}, None, "title"),
        ("u-alice", "meeting.mute", None, None, "needs a meeting_id"),
        ("u-alice", "meeting.leave", {"meeting_id": "other"}, mid, "differs"),
        ("u-alice", "meeting.end", {"now": True}, mid, "now"),
    ]
    records = [await run(*case[:4]) for case in bad]
    for record, case in zip(records, bad, strict=True):
        assert record.status == TaskStatus.FAILED, (case, record)
        assert (
            record.error is not None and record.error.code == "rejected" and case[4] in record.error.message
        ), (case, record.error)
    dead = {r.id for r in await dispatcher.queues["meeting"].dead_letters()}
    assert dead == {r.id for r in records}

    ended = await run("u-alice", "meeting.end", meeting_id=mid)
    assert ended.status == TaskStatus.COMPLETED and ended.result["status"] == "ended"
    # What the tasks did, as REST sees it (an admin may read any meeting).
    r = await mesh.http.get(f"{API}/{mid}", headers=bearer(admin_token()))
    assert r.json()["status"] == "ended" and r.json()["ended_by"] == "u-alice"
    assert mesh.meeting.worker is not None and mesh.meeting.worker_running


async def test_concurrent_joins_all_land(mesh: Mesh) -> None:
    """Many joins at once (SQLite serialises its writers, PostgreSQL locks the meeting's row)."""
    people = await users(mesh, *(f"user{i}" for i in range(8)))
    host = people[0][1]
    mid = (await mesh.http.post(API, headers=host)).json()["id"]
    answers = await asyncio.gather(
        *(mesh.http.post(f"{API}/{mid}/join", headers=h) for _, h in people[1:] * 2)
    )
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    final = (await mesh.http.get(f"{API}/{mid}", headers=host)).json()
    assert set(who(final)) == {uid for uid, _ in people}
    assert await Presence(mesh.meeting.redis, mesh.settings.key_prefix).members(mid) == {
        uid for uid, _ in people
    }


async def test_a_non_member_cannot_tell_a_meeting_from_a_missing_one(mesh: Mesh) -> None:
    """To someone never in it (or removed from it), an existing meeting, active or ended, answers every
    request exactly as a missing one does: meeting ids cannot be probed."""
    (alice, a), (_, b), (carol, c) = await users(mesh, "alice", "bob", "carol")
    active = (await mesh.http.post(API, headers=a, json={"title": "private"})).json()["id"]
    ended = (await mesh.http.post(API, headers=a)).json()["id"]
    assert (await mesh.http.post(f"{API}/{ended}/end", headers=a)).status_code == 200
    assert (await mesh.http.post(f"{API}/{active}/join", headers=c)).status_code == 200
    r = await mesh.http.post(f"{API}/{active}/kick", headers=a, json={"user_id": carol})
    assert r.status_code == 200   # carol was removed: she sees it as bob does, below
    requests: list[tuple[str, str, Any]] = [
        ("GET", "", None), ("GET", "/chat", None), ("POST", "/chat", {"text": "hi"}),
        ("POST", "/leave", None), ("POST", "/end", None), ("POST", "/mute", None),
        ("POST", "/unmute", {"user_id": alice}), ("POST", "/kick", {"user_id": alice}),
    ]
    for headers in (b, c):
        for method, path, body in requests:
            answers = []
            for target in (active, ended, "no-such-meeting"):
                r = await mesh.http.request(method, f"{API}/{target}{path}", headers=headers, json=body)
                error = r.json()["error"]
                answers.append((r.status_code, error["code"], error["message"].replace(target, "<id>")))
            assert answers[0] == answers[1] == answers[2] == (404, "not_found", "no meeting '<id>'"), \
                (method, path, answers)
    r = await mesh.http.post(f"{API}/{ended}/join", headers=b)   # past its end: not an invitation
    assert (r.status_code, r.json()["error"]["message"]) == (404, f"no meeting {ended!r}")
    assert (await mesh.http.post(f"{API}/{active}/join", headers=b)).status_code == 200   # the id invites
    r = await mesh.http.get(f"{API}/{ended}", headers=a)   # the host still reads both
    assert r.status_code == 200 and r.json()["status"] == "ended"
