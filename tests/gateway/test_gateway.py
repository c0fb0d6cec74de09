"""The gateway end to end: a real uvicorn server, real Redis, workers running the stand-in service."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from shared.bus import Queue

from .conftest import SECRET, Client, auth, free_port

ROOT = Path(__file__).resolve().parents[2]
Token = Callable[..., str]


def is_result(frame: dict[str, Any]) -> bool:
    return frame.get("type") == "result"


# -- REST -----------------------------------------------------------------------------------------


async def test_rest_submit_runs_and_records_the_result(
    http: httpx.AsyncClient, token: Token, service: Any
) -> None:
    r = await http.post(
        "/api/v1/tasks",
        headers=auth(token()),
        json={"type": "ai.summarize", "data": {"text": "a b c"}, "priority": "high", "meeting_id": "m1"},
    )
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "queued" and accepted["task_id"].startswith("ai.")
    for _ in range(200):
        record = (await http.get(f"/api/v1/tasks/{accepted['task_id']}", headers=auth(token()))).json()
        if record["status"] == "completed":
            break
        await asyncio.sleep(0.05)
    assert record["status"] == "completed" and record["result"] == {"summary": "a b c"}
    assert record["priority"] == "high" and record["owner"] == "alice"
    assert record["queue"] == "ai" and record["attempts"] == 1


async def test_rest_refuses_bad_input_with_a_json_error(http: httpx.AsyncClient, token: Token) -> None:
    h = auth(token())
    r = await http.post("/api/v1/tasks", headers=h, json={"type": "ai.dance", "data": {}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_task"
    assert "ai.summarize" in r.json()["error"]["message"]
    r = await http.post("/api/v1/tasks", headers=h, json={"type": "ai.chat", "priority": "urgent"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    assert "priority" in r.json()["error"]["message"]
    r = await http.post(
        "/api/v1/tasks",
        headers=h,
        content=b"{not json",
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    r = await http.post("/api/v1/tasks", json={"type": "ai.chat"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = await http.post("/api/v1/tasks", headers=auth("not-a-jwt"), json={"type": "ai.chat"})
    assert r.status_code == 401
    r = await http.get("/api/v1/tasks/ai.nope", headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await http.post("/api/v1/tasks", headers=h, json={"type": "ai.chat", "data": "x" * (2 << 20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


async def test_ownership_user_b_cannot_read_cancel_or_watch(
    http: httpx.AsyncClient, token: Token, connect: Any
) -> None:
    r = await http.post(
        "/api/v1/tasks", headers=auth(token("alice")), json={"type": "meeting.create", "data": {"seconds": 5}}
    )
    task_id = r.json()["task_id"]
    bob = auth(token("bob"))
    assert (await http.get(f"/api/v1/tasks/{task_id}", headers=bob)).status_code == 404
    assert (await http.delete(f"/api/v1/tasks/{task_id}", headers=bob)).status_code == 404
    assert (await http.get(f"/api/v1/tasks/{task_id}/events", headers=bob)).status_code == 404
    assert (
        await http.get(f"/api/v1/tasks/{task_id}", headers=auth(token("root", admin=True)))
    ).status_code == 200
    async with connect(token("bob")) as client:
        await client.recv()  # welcome
        await client.send({"type": "subscribe", "id": "s1", "topic": f"task.{task_id}"})
        frame = await client.recv()
        assert frame["type"] == "error" and frame["code"] == "not_found" and frame["id"] == "s1"
        await client.send({"type": "cancel", "id": "c1", "task_id": task_id})
        frame = await client.recv()
        assert frame["type"] == "error" and frame["code"] == "not_found"
    assert (await http.get(f"/api/v1/tasks/{task_id}", headers=auth(token("alice")))).json()[
        "status"
    ] == "queued"


async def test_batch_is_all_or_nothing(http: httpx.AsyncClient, token: Token) -> None:
    h = auth(token())
    good = {"type": "ai.chat", "data": {"i": 1}}
    r = await http.post(
        "/api/v1/tasks/batch", headers=h, json={"tasks": [good, good, {"type": "media.cover"}]}
    )
    assert r.status_code == 202 and len(r.json()["tasks"]) == 3
    r = await http.post("/api/v1/tasks/batch", headers=h, json={"tasks": [good, {"type": "nope.nope"}]})
    assert r.status_code == 400
    stats = (await http.get("/api/v1/queues/ai", headers=auth(token("root", admin=True)))).json()
    assert stats["enqueued"] == 2  # the refused batch wrote nothing


async def test_cancel_and_deadline_timeout(http: httpx.AsyncClient, token: Token) -> None:
    h = auth(token())
    task_id = (await http.post("/api/v1/tasks", headers=h, json={"type": "meeting.create"})).json()["task_id"]
    r = await http.delete(f"/api/v1/tasks/{task_id}", headers=h)
    assert r.status_code == 200 and r.json() == {
        "task_id": task_id,
        "cancelled": True,
        "previous_status": "queued",
    }
    assert (await http.get(f"/api/v1/tasks/{task_id}", headers=h)).json()["status"] == "cancelled"
    # No worker runs the meeting queue here: the deadline passes while it waits.
    task_id = (
        await http.post("/api/v1/tasks", headers=h, json={"type": "meeting.create", "timeout_s": 0.3})
    ).json()["task_id"]
    for _ in range(100):
        record = (await http.get(f"/api/v1/tasks/{task_id}", headers=h)).json()
        if record["status"] != "queued":
            break
        await asyncio.sleep(0.05)
    assert record["status"] == "timeout" and record["error"]["code"] == "timeout"


async def test_sse_streams_status_progress_and_result(
    http: httpx.AsyncClient, token: Token, service: Any
) -> None:
    h = auth(token())
    task_id = (
        await http.post(
            "/api/v1/tasks", headers=h, json={"type": "ai.summarize", "data": {"text": "x y", "pause": 0.2}}
        )
    ).json()["task_id"]
    events = []
    async with http.stream("GET", f"/api/v1/tasks/{task_id}/events", headers=h) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["type"] == "result":
                    break
    assert events[-1]["status"] == "completed" and events[-1]["result"] == {"summary": "x y"}
    deltas = [e["delta"] for e in events if e["type"] == "progress"]
    assert deltas in (["x", "y"], ["y"])  # the first word may have been sent before the stream began


async def test_admin_endpoints(http: httpx.AsyncClient, token: Token) -> None:
    admin, user = auth(token("root", admin=True)), auth(token())
    assert (await http.get("/api/v1/queues", headers=user)).status_code == 403
    queues = (await http.get("/api/v1/queues", headers=admin)).json()
    assert sorted(q["name"] for q in queues) == ["ai", "media", "meeting", "user"]
    assert (await http.get("/api/v1/queues/nope", headers=admin)).status_code == 404
    assert (await http.post("/api/v1/queues/ai/pause", headers=admin)).json()["paused"] is True
    assert (await http.post("/api/v1/queues/ai/resume", headers=admin)).json()["paused"] is False
    assert (await http.get("/api/v1/queues/media/dead-letters", headers=admin)).json() == []
    assert (await http.post("/api/v1/queues/media/dead-letters/replay", headers=admin)).json() == {
        "replayed": 0
    }
    assert (await http.post("/api/v1/tasks/retry-failed", headers=admin)).json() == {"replayed": 0}
    stats = (await http.get("/api/v1/stats", headers=admin)).json()
    assert set(stats) == {"gateway", "queues"}
    assert (await http.get("/health")).json()["status"] == "ok"
    ready = await http.get("/ready")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": True, "events": True}
    assert (await http.get("/metrics")).status_code == 401  # admins only
    metrics = (await http.get("/metrics", headers=admin)).text
    assert "meetmesh_gateway_sockets" in metrics and "meetmesh_gateway_request_seconds" in metrics


async def test_dead_letters_replay_through_rest(http: httpx.AsyncClient, token: Token, service: Any) -> None:
    admin, user = auth(token("root", admin=True)), auth(token())
    task_id = (await http.post("/api/v1/tasks", headers=user, json={"type": "media.cover"})).json()["task_id"]
    for _ in range(100):
        if (await http.get(f"/api/v1/tasks/{task_id}", headers=user)).json()["status"] == "failed":
            break
        await asyncio.sleep(0.05)
    dead = (await http.get("/api/v1/queues/media/dead-letters", headers=admin)).json()
    assert [d["id"] for d in dead] == [task_id] and "no video" in dead[0]["error"]["message"]
    assert (
        await http.post("/api/v1/tasks/retry-failed", headers=admin, params={"queue": "media"})
    ).json() == {"replayed": 1}


async def test_rate_limit(settings: Any, token: Token) -> None:
    from .conftest import serve

    limited = settings.model_copy(update={"submit_rate": 0.01, "submit_burst": 2})
    async with serve(limited) as base, httpx.AsyncClient(base_url=base) as http:
        h = auth(token())
        codes = [
            (await http.post("/api/v1/tasks", headers=h, json={"type": "ai.chat"})).status_code
            for _ in range(3)
        ]
        assert codes == [202, 202, 429]
        r = await http.post("/api/v1/tasks", headers=h, json={"type": "ai.chat"})
        assert r.json()["error"]["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
        async with websockets.connect(base.replace("http", "ws") + f"/ws?token={token()}") as ws:
            client = Client(ws)
            await client.recv()
            await client.send({"type": "submit", "id": "r1", "task": "ai.chat"})
            frame = await client.recv()
            assert frame["type"] == "error" and frame["code"] == "rate_limited"


# -- WebSocket ------------------------------------------------------------------------------------


async def test_ws_submit_streams_progress_in_order_then_the_result(
    connect: Any, token: Token, service: Any
) -> None:
    async with connect(token()) as client:
        welcome = await client.recv()
        assert welcome["type"] == "welcome" and welcome["seq"] == 0 and welcome["session_id"]
        await client.send(
            {
                "type": "submit",
                "id": "r1",
                "task": "ai.summarize",
                "data": {"text": "one two three four"},
                "priority": "high",
                "timeout_s": 30,
            }
        )
        frames = await client.until(is_result)
    accepted = frames[0]
    assert accepted["type"] == "accepted" and accepted["id"] == "r1" and accepted["seq"] == 1
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert all(f["task_id"] == accepted["task_id"] for f in frames)
    assert [f["delta"] for f in frames if f["type"] == "progress"] == ["one", "two", "three", "four"]
    progress = [f["progress"] for f in frames if f["type"] == "progress"]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert "processing" in [f.get("status") for f in frames if f["type"] == "status"]
    assert frames[-1]["status"] == "completed" and frames[-1]["result"] == {"summary": "one two three four"}


async def test_ws_updates_that_come_before_the_enqueue_answers_wait_for_accepted(
    connect: Any, token: Token, service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker may start (and finish) a task, and the relay read it, before the enqueue's answer
    is back at the gateway. Here the answer comes a second late: nothing is lost, accepted is first."""
    enqueue = Queue.enqueue
    finished = asyncio.Event()

    async def late_answer(self: Queue, *args: Any, **kwargs: Any) -> Any:
        done = await enqueue(self, *args, **kwargs)
        await asyncio.wait_for(finished.wait(), 10)
        return done

    monkeypatch.setattr(Queue, "enqueue", late_answer)
    async with connect(token()) as client:
        await client.recv()  # welcome
        await client.send({"type": "submit", "id": "r1", "task": "ai.summarize", "data": {"text": "a b"}})
        ai = next(w.queue for w in service if w.queue.name == "ai")
        for _ in range(500):  # the task runs to its end while the answer is held back
            if (await ai.stats()).processed >= 1:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the task did not run")
        await asyncio.sleep(0.3)  # ...and the relay has read it
        finished.set()
        frames = await client.until(is_result)
    assert frames[0]["type"] == "accepted" and frames[0]["id"] == "r1"
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert [f.get("status") for f in frames if f["type"] == "status"] == ["processing"]
    assert [f["delta"] for f in frames if f["type"] == "progress"] == ["a", "b"]
    assert frames[-1]["status"] == "completed" and frames[-1]["task_id"] == frames[0]["task_id"]


async def test_ws_announces_queueing_once_and_says_why_a_task_is_queued_again(
    connect: Any, token: Token, service: Any
) -> None:
    async with connect(token()) as client:
        await client.recv()  # welcome
        await client.send({"type": "submit", "id": "r1", "task": "ai.translate", "data": {"text": "hej"}})
        frames = await client.until(is_result)
    statuses = [(f["status"], f.get("reason")) for f in frames if f["type"] == "status"]
    assert frames[0]["type"] == "accepted" and frames[0]["status"] == "queued"
    assert ("queued", None) not in statuses  # `accepted` said so already
    assert statuses == [("processing", None), ("queued", "retry"), ("processing", None)]
    assert frames[-1]["status"] == "completed" and frames[-1]["result"] == {"attempts": 2}


async def test_ws_bad_input_gets_error_frames_and_the_socket_keeps_working(
    connect: Any, token: Token
) -> None:
    async with connect(token()) as client:
        await client.recv()
        await client.send("{oops")
        assert (await client.recv())["code"] == "bad_request"
        await client.send({"type": "dance", "id": "r2"})
        frame = await client.recv()
        assert frame["code"] == "bad_request" and frame["id"] == "r2" and "submit" in frame["message"]
        await client.send({"type": "submit", "id": "r3"})
        assert (await client.recv())["code"] == "bad_request"
        await client.send({"type": "submit", "id": "r4", "task": "ai.nope"})
        assert (await client.recv())["code"] == "unknown_task"
        await client.send({"type": "submit", "id": "r5", "task": "ai.chat", "data": "x" * (100 * 1024)})
        assert (await client.recv())["code"] == "too_large"
        await client.send({"type": "subscribe", "id": "r6", "topic": "meeting.**"})
        assert (await client.recv())["code"] == "bad_request"
        await client.send({"type": "ping", "id": "r7"})
        pong = await client.recv()
        assert pong["type"] == "pong" and pong["id"] == "r7"
        assert pong["seq"] == 7


async def test_ws_bad_token_closes_with_1008(gateway: str) -> None:
    async with websockets.connect(gateway.replace("http", "ws") + "/ws?token=bad") as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_ws_resume_after_a_dropped_connection_loses_nothing(
    connect: Any, token: Token, service: Any
) -> None:
    async with connect(token()) as client:
        session_id = (await client.recv())["session_id"]
        await client.send(
            {
                "type": "submit",
                "id": "r1",
                "task": "ai.summarize",
                "data": {"text": "a b c d e", "pause": 0.15},
            }
        )
        accepted = await client.recv()
        assert accepted["type"] == "accepted"
        last_seq = accepted["seq"]
    # Dropped: the task goes on while nobody listens.
    await asyncio.sleep(0.5)
    async with connect(token()) as client:
        await client.recv()  # a new session's welcome
        await client.send({"type": "resume", "session_id": session_id, "last_seq": last_seq})
        frames = await client.until(is_result)
    assert [f["seq"] for f in frames] == list(range(last_seq + 1, last_seq + 1 + len(frames)))
    assert [f["delta"] for f in frames if f["type"] == "progress"] == ["a", "b", "c", "d", "e"]
    assert frames[-1]["status"] == "completed"


async def test_ws_resume_of_another_users_session_is_refused(connect: Any, token: Token) -> None:
    async with connect(token("alice")) as client:
        session_id = (await client.recv())["session_id"]
    async with connect(token("bob")) as client:
        await client.recv()
        await client.send({"type": "resume", "session_id": session_id, "last_seq": 0})
        frame = await client.recv()
        assert frame["type"] == "error" and frame["code"] in ("forbidden", "not_found")
        await client.send({"type": "resume", "session_id": "nope", "last_seq": 0})
        assert (await client.recv())["code"] == "not_found"


async def test_ws_cancel_a_running_task(connect: Any, token: Token, service: Any) -> None:
    async with connect(token()) as client:
        await client.recv()
        await client.send({"type": "submit", "id": "r1", "task": "meeting.create", "data": {"seconds": 30}})
        task_id = (await client.recv())["task_id"]
        await client.until(lambda f: f.get("status") == "processing")
        await client.send({"type": "cancel", "id": "r2", "task_id": task_id})
        frames = await client.until(is_result)
    assert frames[-1]["status"] == "cancelled" and frames[-1]["error"]["code"] == "cancelled"


async def test_ws_topic_subscription_receives_broadcast_events(
    gateway: str, connect: Any, token: Token, settings: Any, redis: Any
) -> None:
    from services.meeting.keys import MeetingKeys
    from shared.bus import EventBus

    await redis.sadd(MeetingKeys(settings.key_prefix).participants("m1"), "alice")  # only participants may

    sender = EventBus.from_url(settings.redis_url, service="meeting", prefix=settings.key_prefix)
    await sender.start()
    try:
        async with connect(token()) as client:
            await client.recv()
            await client.send({"type": "subscribe", "id": "s1", "topic": "meeting.m1"})
            assert (await client.recv())["type"] == "subscribed"
            await sender.broadcast("meeting.m2", {"event": "meeting.user_joined", "data": {"user_id": "x"}})
            await sender.broadcast("meeting.m1", {"event": "meeting.user_joined", "data": {"user_id": "bob"}})
            frame = await client.recv()
            assert frame["type"] == "event" and frame["topic"] == "meeting.m1"
            assert frame["event"] == "meeting.user_joined" and frame["data"] == {"user_id": "bob"}
            await client.send({"type": "unsubscribe", "id": "s2", "topic": "meeting.m1"})
            assert (await client.recv())["type"] == "unsubscribed"
    finally:
        await sender.stop()


@pytest.mark.slow
async def test_two_gateway_processes_a_task_reaches_the_socket_on_the_other(
    redis_url: str, key_prefix: str, token: Token, service: Any, tmp_path: Path
) -> None:
    """Submitted over REST on gateway A; the client's socket is on gateway B."""
    ports = [free_port(), free_port()]
    env = {
        **os.environ,
        "MEETMESH_REDIS_URL": redis_url,
        "MEETMESH_KEY_PREFIX": key_prefix,
        "MEETMESH_JWT_SECRET": SECRET,
        "MEETMESH_LOG_LEVEL": "WARNING",
    }
    logs = [(tmp_path / f"gw{p}.log").open("wb") for p in ports]
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 - returns at once; the children are polled below
            [sys.executable, "-m", "meetmesh", "gateway", "--port", str(p)],
            cwd=ROOT,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        for p, log in zip(ports, logs, strict=True)
    ]
    try:
        a, b = (f"http://127.0.0.1:{p}" for p in ports)
        async with httpx.AsyncClient(timeout=5) as http:
            for base in (a, b):
                for _ in range(300):
                    try:
                        if (await http.get(f"{base}/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError((tmp_path / f"gw{base[-4:]}.log").read_text())
            async with websockets.connect(b.replace("http", "ws") + f"/ws?token={token()}") as ws:
                client = Client(ws)
                await client.recv()
                r = await http.post(
                    f"{a}/api/v1/tasks",
                    headers=auth(token()),
                    json={"type": "ai.summarize", "data": {"text": "far away", "pause": 0.3}},
                )
                task_id = r.json()["task_id"]
                await client.send({"type": "subscribe", "id": "s1", "topic": f"task.{task_id}"})
                frames = await client.until(is_result, timeout=20)
        assert frames[0]["type"] == "subscribed"
        assert frames[-1]["status"] == "completed" and frames[-1]["result"] == {"summary": "far away"}
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=20)
        for log in logs:
            log.close()


def test_a_finished_task_leaves_the_sessions_index() -> None:
    """A session submitting for hours must not keep every task it ever had: the result unindexes it."""
    from gateway.hub import SessionHub
    from gateway.live import Live
    from shared.bus.dispatch.dispatcher import TaskUpdate

    hub = SessionHub()
    live = Live(events=None, hub=hub)  # type: ignore[arg-type]  # routing only: no broadcast read here
    session = hub.open("ann")
    hub.watch_task(session, "ai.t1")
    update = {"task_id": "ai.t1", "queue": "ai", "type": "ai.summarize", "owner": "ann", "at": 1.0}
    live.update(TaskUpdate(**update, status="processing", seq="1-0"))
    assert hub.sessions_for_task("ai.t1") == [session]
    live.update(TaskUpdate(**update, status="completed", result={"ok": 1}, seq="2-0"))
    assert hub.sessions_for_task("ai.t1") == [] and session.tasks == set()
    assert [json.loads(t)["type"] for t in session._outbox or ()] == ["status", "result"]
