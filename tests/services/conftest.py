"""Service fixtures: the SQL store on SQLite (a temporary file) and on PostgreSQL (a schema of its own
on database ``test``, dropped after), service settings on the test's Redis key prefix, and the whole
mesh: the user and meeting services and a real gateway proxying to them, all in this process."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import websockets

from gateway.auth import mint
from gateway.settings import GatewaySettings
from services.common import Service, ServiceSettings
from services.meeting.service import build as build_meeting
from services.user.service import build as build_user
from shared.bus import Event, EventBus

from ..conftest import REDIS_URL
from ..gateway.conftest import SECRET, Client, serve
from .harness import CHEAP_ARGON2

POSTGRES_URL = os.environ.get("MEETMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True)
class Store:
    """Where a test's SQL lives: a URL, and for PostgreSQL the schema of its own."""

    kind: str
    url: str
    schema: str | None = None


async def _postgres() -> asyncpg.Connection:
    """A connection to the test database, created first if the server lacks it."""
    try:
        return await asyncpg.connect(POSTGRES_URL)
    except asyncpg.InvalidCatalogNameError:
        admin = await asyncpg.connect(POSTGRES_URL.rsplit("/", 1)[0] + "/postgres")
        try:
            await admin.execute(f'CREATE DATABASE "{POSTGRES_URL.rsplit("/", 1)[1]}"')
        except asyncpg.DuplicateDatabaseError:
            pass
        finally:
            await admin.close()
        return await asyncpg.connect(POSTGRES_URL)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        yield Store("sqlite", f"sqlite:///{tmp_path / 'meetmesh.db'}")
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = await _postgres()
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield Store("postgresql", POSTGRES_URL, schema)
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


@pytest.fixture
def database_url(store: Store) -> str:
    return store.url


@pytest.fixture
def make_settings(
    store: Store, key_prefix: str, redis: Any, tmp_path: Path
) -> Callable[..., ServiceSettings]:
    """``make_settings(**overrides)``: service settings on this test's store and Redis prefix (with
    cheap argon2 costs: hashing is not what these tests measure)."""

    def make(**overrides: Any) -> ServiceSettings:
        fields: dict[str, Any] = {
            "redis_url": REDIS_URL,
            "key_prefix": key_prefix,
            "database_url": store.url,
            "database_schema": store.schema,
            "data_dir": tmp_path,
            "jwt_secret": SECRET,
            **CHEAP_ARGON2,
            "worker_concurrency": 8,
            "grace_seconds": 5.0,
        }
        return ServiceSettings(**{**fields, **overrides})

    return make


@dataclass
class Mesh:
    """The running user and meeting services, and a gateway in front of them."""

    user: Service
    meeting: Service
    gateway: str
    http: httpx.AsyncClient
    settings: ServiceSettings

    async def register(
        self, username: str, password: str = "correct horse battery", **extra: Any
    ) -> dict[str, Any]:
        """Register ``username``; the answer (token and user)."""
        r = await self.http.post(
            "/api/v1/auth/register", json={"username": username, "password": password, **extra}
        )
        assert r.status_code == 201, r.text
        answer: dict[str, Any] = r.json()
        return answer

    @contextlib.asynccontextmanager
    async def socket(self, token: str) -> AsyncIterator[Client]:
        url = self.gateway.replace("http://", "ws://") + f"/ws?token={token}"
        async with websockets.connect(url) as ws:
            client = Client(ws)
            assert (await client.recv())["type"] == "welcome"
            yield client


async def until(check: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    """Wait for ``check()`` (sync or async) to be true; polls, so no timing is asserted."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def admin_token() -> str:
    return mint(SECRET, "ops-admin", admin=True)


@pytest.fixture
async def mesh(
    make_settings: Callable[..., ServiceSettings], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Mesh]:
    settings = make_settings()
    users, meetings = build_user(settings, port=0), build_meeting(settings, port=0)
    async with users.running(), meetings.running():
        monkeypatch.setenv("MEETMESH_USER_URL", str(users.url))
        monkeypatch.setenv("MEETMESH_MEETING_URL", str(meetings.url))
        gateway_settings = GatewaySettings(
            redis_url=REDIS_URL,
            key_prefix=settings.key_prefix,
            jwt_secret=SECRET,
            submit_rate=1000,
            submit_burst=1000,
        )
        async with serve(gateway_settings) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
            yield Mesh(users, meetings, base, http, settings)


@contextlib.asynccontextmanager
async def recording(settings: ServiceSettings, pattern: str) -> AsyncIterator[list[Event[Any]]]:
    """Durable events matching ``pattern`` published while the block runs, as a probe service gets them."""
    got: list[Event[Any]] = []
    name = f"probe-{uuid.uuid4().hex[:8]}"
    probe = EventBus.from_url(settings.events, service=name, prefix=settings.key_prefix)

    async def record(event: Event[Any]) -> None:
        got.append(event)

    probe.subscribe(pattern, record)
    await probe.start()
    try:
        yield got
    finally:
        await probe.stop()
