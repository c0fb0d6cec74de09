"""Dedupe keys are their owner's own, through the gateway: bob sending alice's dedupe_key gets a
task of his own over REST and over the WebSocket, and never hears of hers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx

from .conftest import auth

Token = Callable[..., str]


async def test_rest_two_owners_same_key_two_tasks_same_owner_one(
    http: httpx.AsyncClient, token: Token
) -> None:
    alice, bob = auth(token("alice")), auth(token("bob"))
    task = {"type": "ai.summarize", "data": {"text": "alice private words"}, "dedupe_key": "m1:summary"}
    first = (await http.post("/api/v1/tasks", headers=alice, json=task)).json()
    again = (await http.post("/api/v1/tasks", headers=alice, json=task)).json()
    assert again["task_id"] == first["task_id"]
    theirs = await http.post("/api/v1/tasks", headers=bob, json={**task, "data": {"text": "bob"}})
    assert theirs.status_code == 202
    assert theirs.json()["task_id"] != first["task_id"]
    record = (await http.get(f"/api/v1/tasks/{theirs.json()['task_id']}", headers=bob)).json()
    assert record["owner"] == "bob"
    # A batch takes the same path.
    batch = (await http.post("/api/v1/tasks/batch", headers=bob, json={"tasks": [task]})).json()
    assert batch["tasks"][0]["task_id"] == theirs.json()["task_id"]
    # And alice's task stays hers alone.
    assert (await http.get(f"/api/v1/tasks/{first['task_id']}", headers=bob)).status_code == 404


async def test_ws_submit_with_anothers_key_watches_only_ones_own_task(
    http: httpx.AsyncClient, connect: Any, token: Token, service: Any
) -> None:
    # Alice's task streams slowly, so it is running (and sending progress) while bob submits.
    task = {"type": "ai.summarize", "dedupe_key": "m1:summary",
            "data": {"text": "alice secret one two three four", "pause": 0.05}}
    hers = (await http.post("/api/v1/tasks", headers=auth(token("alice")), json=task)).json()["task_id"]
    async with connect(token("bob")) as bob:
        assert (await bob.recv())["type"] == "welcome"
        await bob.send({"type": "submit", "id": "b1", "task": "ai.summarize", "dedupe_key": "m1:summary",
                        "data": {"text": "bob words"}})
        accepted = (await bob.until(lambda f: f.get("type") == "accepted"))[-1]
        mine = accepted["task_id"]
        assert mine != hers
        frames = await bob.until(lambda f: f.get("type") == "result" and f.get("task_id") == mine)
        # Hold the socket until alice's task has finished too, then ask once more: by now every
        # frame of hers that bob could have been sent has been.
        for _ in range(400):
            status = (await http.get(f"/api/v1/tasks/{hers}", headers=auth(token("alice")))).json()["status"]
            if status == "completed":
                break
            await asyncio.sleep(0.05)
        assert status == "completed"
        await bob.send({"type": "ping", "id": "p"})
        frames += await bob.until(lambda f: f.get("type") == "pong")
        text = json.dumps(frames)
        assert hers not in text and "alice" not in text and "secret" not in text
        assert {f["task_id"] for f in frames if "task_id" in f} == {mine}
        # Asking for her task by name is refused like a task that does not exist.
        await bob.send({"type": "subscribe", "id": "s", "topic": f"task.{hers}"})
        refused = (await bob.until(lambda f: f.get("id") == "s"))[-1]
        assert refused["type"] == "error" and refused["code"] == "not_found"
