"""Per-user limits across gateways: two gateway apps sharing one Redis allow together what one
would (submissions over REST and WebSocket, open sockets, queued tasks), answer with the documented
code and wait, and bound request bodies and payloads. Counts, not timings: rates are set so low that
nothing refills during a test."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import websockets

from gateway.settings import GatewaySettings

from .conftest import Client, auth, serve

Token = Callable[..., str]


@contextlib.asynccontextmanager
async def two_gateways(settings: GatewaySettings, **limits: Any) -> AsyncIterator[tuple[str, str]]:
    limited = settings.model_copy(update=limits)
    async with serve(limited) as one, serve(limited) as two:
        yield one, two


@contextlib.asynccontextmanager
async def socket(base: str, token: str) -> AsyncIterator[Client]:
    async with websockets.connect(base.replace("http://", "ws://") + f"/ws?token={token}") as ws:
        yield Client(ws)


async def test_two_gateways_together_allow_only_the_configured_burst(settings: Any, token: Token) -> None:
    async with two_gateways(settings, submit_rate=0.001, submit_burst=6) as (one, two), \
            httpx.AsyncClient(base_url=one) as rest_one, httpx.AsyncClient(base_url=two) as rest_two:
        h = auth(token("alice"))
        codes = []
        for n in range(12):  # alternate gateways: a per-process limit would allow 12
            http = rest_one if n % 2 else rest_two
            codes.append((await http.post("/api/v1/tasks", headers=h, json={"type": "ai.chat"})).status_code)
        async with socket(two, token("alice")) as ws:  # the WebSocket takes from the same bucket
            assert (await ws.recv())["type"] == "welcome"
            for n in range(4):
                request = f"s{n}"
                await ws.send({"type": "submit", "id": request, "task": "ai.chat"})
                answer = (await ws.until(lambda f, r=request: f.get("id") == r))[-1]
                codes.append(202 if answer["type"] == "accepted" else 429)
                if answer["type"] == "error":
                    assert answer["code"] == "rate_limited" and answer["retry_after"] >= 1
        assert codes.count(202) == 6 and codes.count(429) == 10, codes
        refused = await rest_one.post("/api/v1/tasks", headers=h, json={"type": "ai.chat"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) > 100  # a token every 1,000 s
        # Another user has a bucket of their own, on either gateway.
        other = await rest_two.post("/api/v1/tasks", headers=auth(token("bob")), json={"type": "ai.chat"})
        assert other.status_code == 202


async def test_a_batch_costs_its_size_and_one_over_the_burst_is_refused(settings: Any, token: Token) -> None:
    async with two_gateways(settings, submit_rate=0.001, submit_burst=5) as (one, _), \
            httpx.AsyncClient(base_url=one) as http:
        h = auth(token("alice"))
        batch = {"tasks": [{"type": "ai.chat"}] * 3}
        assert (await http.post("/api/v1/tasks/batch", headers=h, json=batch)).status_code == 202
        refused = await http.post("/api/v1/tasks/batch", headers=h, json=batch)  # 2 left, 3 asked
        assert refused.status_code == 429 and "Retry-After" in refused.headers
        too_big = await http.post("/api/v1/tasks/batch", headers=h, json={"tasks": [{"type": "ai.chat"}] * 6})
        assert too_big.status_code == 400 and "burst" in too_big.json()["error"]["message"]


async def test_open_sockets_per_user_are_counted_across_gateways(settings: Any, token: Token) -> None:
    async with two_gateways(settings, max_sockets_per_user=2) as (one, two):
        async with socket(one, token("alice")) as a, socket(two, token("alice")) as b:
            assert (await a.recv())["type"] == "welcome" and (await b.recv())["type"] == "welcome"
            third = one.replace("http://", "ws://") + f"/ws?token={token('alice')}"
            async with websockets.connect(third) as ws:
                refused = json.loads(await ws.recv())
                assert refused["type"] == "error" and refused["code"] == "rate_limited"
                assert refused["retry_after"] >= 1
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            async with socket(two, token("bob")) as other:  # bob's count is his own
                assert (await other.recv())["type"] == "welcome"
        # Both closed: their slots came back (given back as each socket ended).
        for _ in range(2):
            async with socket(two, token("alice")) as again:
                assert (await again.recv())["type"] == "welcome"


async def test_queued_tasks_per_owner_are_counted_across_gateways(settings: Any, token: Token) -> None:
    async with two_gateways(settings, max_queued_tasks=3) as (one, two), \
            httpx.AsyncClient(base_url=one) as rest_one, httpx.AsyncClient(base_url=two) as rest_two:
        h = auth(token("alice"))
        ids = []
        for http in (rest_one, rest_two, rest_one):  # no worker runs: they stay queued
            r = await http.post("/api/v1/tasks", headers=h, json={"type": "ai.chat"})
            assert r.status_code == 202
            ids.append(r.json()["task_id"])
        refused = await rest_two.post("/api/v1/tasks", headers=h, json={"type": "ai.chat"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert "queued" in refused.json()["error"]["message"] and int(refused.headers["Retry-After"]) >= 1
        assert (await rest_one.delete(f"/api/v1/tasks/{ids[0]}", headers=h)).json()["cancelled"] is True
        # A finished task gives its place back (swept at most once a second: retried until it is).
        for _ in range(100):
            r = await rest_two.post("/api/v1/tasks", headers=h, json={"type": "ai.chat"})
            if r.status_code == 202:
                break
            assert r.status_code == 429
            await asyncio.sleep(0.05)
        assert r.status_code == 202


async def test_request_bodies_and_payloads_are_bounded(settings: Any, token: Token) -> None:
    limited = settings.model_copy(update={"max_request_bytes": 4096, "max_payload_bytes": 2048})
    async with serve(limited) as base, httpx.AsyncClient(base_url=base) as http:
        h = auth(token("alice"))
        big = await http.post("/api/v1/tasks", headers=h, json={"type": "ai.chat", "data": "x" * 5000})
        assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: cut off as it streams
            yield b'{"type": "ai.chat", "data": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        streamed = await http.post("/api/v1/tasks", headers={**h, "Content-Type": "application/json"},
                                   content=chunks())
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "too_large"
        payload = await http.post("/api/v1/tasks", headers=h, json={"type": "ai.chat", "data": "z" * 3000})
        assert payload.status_code == 413 and payload.json()["error"]["code"] == "too_large"
        fits = await http.post("/api/v1/tasks", headers=h, json={"type": "ai.chat", "data": "z" * 1000})
        assert fits.status_code == 202
