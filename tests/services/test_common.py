"""The service framework: settings, the SQL store's URLs, loading a service by name, and a service
run as its own process (``python -m services.meeting``) answering health checks and stopping
gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.common import Database, Service, ServiceError, ServiceSettings, Unavailable, async_url
from services.common.service import load
from shared.bus import ConfigError, InvalidMessage

from ..conftest import REDIS_URL
from ..gateway.conftest import free_port
from .conftest import until

ROOT = Path(__file__).resolve().parents[2]


def test_settings_defaults_and_database_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEETMESH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("MEETMESH_DATABASE_URL", raising=False)
    settings = ServiceSettings.load()
    assert settings.database == f"sqlite+aiosqlite:///{tmp_path / 'data' / 'meetmesh.db'}"
    assert [settings.port_for(n) for n in ("user", "meeting", "media", "ai", "other")] == [
        8101,
        8102,
        8103,
        8104,
        0,
    ]
    monkeypatch.setenv("MEETMESH_MEETING_PORT", "9102")
    settings = ServiceSettings.load()
    assert settings.port_for("meeting") == 9102
    monkeypatch.setenv("MEETMESH_MEETING_PORT", "lots")
    with pytest.raises(ConfigError, match="MEETMESH_MEETING_PORT"):
        ServiceSettings.load()
    monkeypatch.setenv("MEETMESH_MEETING_PORT", "9102")
    monkeypatch.setenv("MEETMESH_DATA_DIR", "")
    with pytest.raises(ConfigError, match="MEETMESH_DATA_DIR"):
        ServiceSettings.load()

    assert async_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert async_url("postgresql://u@h/db") == async_url("postgres://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert async_url("postgresql+asyncpg://u@h/db") == "postgresql+asyncpg://u@h/db"
    for bad in ("mysql://u@h/db", "nonsense", "postgresql+psycopg2://u@h/db"):
        with pytest.raises(ConfigError, match="MEETMESH_DATABASE_URL"):
            Database(bad)


async def test_an_unreachable_database_is_unavailable_not_a_crash() -> None:
    db = Database(f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    try:
        with pytest.raises(Unavailable, match="cannot reach the database"):
            await db.create_all()
        assert await db.ping() is False
    finally:
        await db.dispose()


def test_loading_a_service_by_name() -> None:
    from services.meeting.service import build

    assert load("meeting") is build
    for name in ("nope", "../etc", "_private"):
        with pytest.raises(ServiceError):
            load(name)


async def test_python_m_services_meeting_serves_then_stops_gracefully_on_sigterm(
    tmp_path: Path, key_prefix: str, redis: Any
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "MEETMESH_REDIS_URL": REDIS_URL,
        "MEETMESH_KEY_PREFIX": key_prefix,
        "MEETMESH_DATA_DIR": str(tmp_path),
        "MEETMESH_MEETING_PORT": str(port),
        "MEETMESH_LOG_LEVEL": "INFO",
    }
    env.pop("MEETMESH_DATABASE_URL", None)
    log = (tmp_path / "meeting.log").open("wb")
    child = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the child is polled below
        [sys.executable, "-m", "services.meeting"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            async def ready() -> bool:
                assert child.poll() is None, (tmp_path / "meeting.log").read_text()
                try:
                    return (await http.get("/ready")).status_code == 200
                except httpx.TransportError:
                    return False

            await until(ready, "the meeting service to be ready", timeout=30)
            assert (await http.get("/health")).json()["service"] == "meeting"
        assert (tmp_path / "meetmesh.db").exists()  # the embedded SQLite store, under the data dir
        child.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(child.wait, 30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        log.close()
    text = (tmp_path / "meeting.log").read_text()
    assert code == 0, text
    assert "service meeting ready" in text and "service meeting stopping" in text
    assert "worker" in text and "stopped" in text and "Traceback" not in text


async def test_a_taken_port_is_a_clear_error_and_nothing_is_left_running(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    from services.user.service import build

    first = build(make_settings(), port=0)
    async with first.running():
        port = int(str(first.url).rsplit(":", 1)[1])
        second = build(make_settings(), port=port)
        with pytest.raises(ServiceError, match=f"cannot listen on 127.0.0.1:{port}.*MEETMESH_USER_PORT"):
            await second.start()
        assert second.worker is not None and not second.worker_running


async def test_a_service_with_no_routes_or_tasks_still_answers_health_and_handles_events(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    """The shape media and ai plug into: a name, event subscriptions (and later a router and routes)."""
    from shared.bus import Event

    seen: list[str] = []
    service = Service("media", make_settings(), port=0)

    @service.subscribe("meeting.ended")
    async def on_ended(event: Event[Any]) -> None:
        seen.append(event.data.meeting_id)

    async with service.running(), httpx.AsyncClient(base_url=str(service.url)) as http:
        await service.emit_event("meeting.ended", {"meeting_id": "m1"})  # through its outbox
        with pytest.raises(InvalidMessage, match="meeting_id"):  # not what the catalogue says
            await service.emit_event("meeting.ended", {"not": "valid"})
        await until(lambda: seen == ["m1"], "the event")
        assert (await http.get("/health")).json()["service"] == "media"
        ready = await http.get("/ready")
        assert ready.status_code == 200 and ready.json()["checks"]["worker"] is True
    assert service.worker is None
