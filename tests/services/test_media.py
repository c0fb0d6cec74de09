"""The media service beside the user and meeting services and a real gateway, on SQLite and on
PostgreSQL, with Debian's ffmpeg: uploads (stored, typed by their bytes, size-limited, their owner's),
covers (a real JPEG, ``media.cover_ready``), the multi-stage transcode (progress, output, a worker
restart in the middle), bad tasks dead-lettered with the reason, and recordings and streams with their
events. No timing is asserted: every wait polls for the outcome."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.settings import GatewaySettings
from gateway.task_routes import TASK_ROUTES
from services.common import Actor, Service, ServiceSettings, identity_headers
from services.media.models import TranscodeJob
from services.media.service import build as build_media
from services.media.settings import MediaSettings
from services.meeting.service import build as build_meeting
from services.user.service import build as build_user
from shared.bus import Dispatcher, TaskRecord, TaskStatus

from ..conftest import REDIS_URL
from ..gateway.conftest import SECRET, serve
from .conftest import admin_token, bearer, recording, until

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs Debian's ffmpeg")

API = "/api/v1/media"
MAX_BYTES = 200_000  # the clip is ~7 KB


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 2 s, 160x120 MP4 made by ffmpeg's test source."""
    out = tmp_path_factory.mktemp("clip") / "out.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=duration=2:size=160x120:rate=10", str(out)], check=True, timeout=60)
    return out.read_bytes()


@dataclass
class Stack:
    """The user, meeting and media services, and a gateway in front of them."""

    media: Service
    settings: MediaSettings
    http: httpx.AsyncClient
    gateway: str

    async def user(self, name: str) -> tuple[str, dict[str, str]]:
        r = await self.http.post("/api/v1/auth/register", json={"username": name, "password": "pw-" * 4})
        assert r.status_code == 201, r.text
        return r.json()["user"]["id"], bearer(r.json()["access_token"])

    async def meeting(self, host: dict[str, str], *others: dict[str, str]) -> str:
        meeting_id: str = (await self.http.post("/api/v1/meetings", headers=host)).json()["id"]
        for h in others:
            assert (await self.http.post(f"/api/v1/meetings/{meeting_id}/join", headers=h)).status_code == 200
        return meeting_id

    async def upload(self, headers: dict[str, str], content: bytes, name: str = "clip.mp4",
                     **fields: str) -> httpx.Response:
        return await self.http.post(API, headers=headers, files={"file": (name, content, "video/mp4")},
                                    data=fields)

    def path(self, relative: str) -> Path:
        return self.settings.media_root / relative


def media_settings(settings: ServiceSettings, **overrides: Any) -> MediaSettings:
    return MediaSettings(**{**settings.model_dump(), "media_max_bytes": MAX_BYTES, **overrides})


@pytest.fixture
async def stack(make_settings: Callable[..., ServiceSettings],
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    settings = make_settings()
    media = media_settings(settings)
    users, meetings, service = build_user(settings, port=0), build_meeting(settings, port=0), build_media(
        media, port=0)
    async with users.running(), meetings.running(), service.running():
        monkeypatch.setenv("MEETMESH_USER_URL", str(users.url))
        monkeypatch.setenv("MEETMESH_MEETING_URL", str(meetings.url))
        monkeypatch.setenv("MEETMESH_MEDIA_URL", str(service.url))
        monkeypatch.setenv("MEETMESH_MEDIA_MAX_BYTES", str(MAX_BYTES))
        gateway = GatewaySettings(redis_url=REDIS_URL, key_prefix=settings.key_prefix, jwt_secret=SECRET,
                                  submit_rate=1000, submit_burst=1000)
        async with serve(gateway) as base, httpx.AsyncClient(base_url=base, timeout=30) as http:
            yield Stack(service, media, http, base)


async def finished(dispatcher: Dispatcher, task_id: str) -> TaskRecord:
    async def done() -> bool:
        return (await dispatcher.get(task_id)).status.terminal

    await until(done, f"task {task_id} to finish", timeout=40)
    return await dispatcher.get(task_id)


async def run(dispatcher: Dispatcher, owner: str, type: str, data: Any = None,
              meeting_id: str | None = None) -> TaskRecord:
    submitted = await dispatcher.submit(owner=owner, type=type, data=data, meeting_id=meeting_id)
    return await finished(dispatcher, submitted.task_id)


def of_type(events: list[Any], type: str) -> list[Any]:
    return [e for e in events if e.type == type]


async def test_an_upload_its_cover_and_who_may_see_them(stack: Stack, clip: bytes) -> None:
    (alice, a), (_, b) = await stack.user("alice"), await stack.user("bob")
    mid = await stack.meeting(a)
    async with recording(stack.settings, "media.*") as events:
        r = await stack.upload(a, clip, name="../../etc/standup.mp4", meeting_id=mid)
        assert r.status_code == 201, r.text
        media, task_id = r.json()["media"], r.json()["cover_task_id"]
        assert task_id and task_id.startswith("media.")
        assert media["owner_id"] == alice and media["meeting_id"] == mid
        assert media["filename"] == "standup.mp4"  # the name, without the client's directories
        assert media["content_type"] == "video/mp4" and media["size"] == len(clip)
        assert media["sha256"] == hashlib.sha256(clip).hexdigest()
        assert (media["width"], media["height"]) == (160, 120) and abs(media["duration_s"] - 2.0) < 0.2
        assert media["cover_status"] == "pending"
        await until(lambda: of_type(events, "media.cover_ready"), "media.cover_ready")

    mine = f"{API}/{media['id']}"
    ready = of_type(events, "media.cover_ready")[0]
    assert ready.data.media_id == media["id"] and ready.source == "media"
    r = await stack.http.get(f"{mine}/cover", headers=a)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content[:3] == b"\xff\xd8\xff" and len(r.content) > 500
    assert stack.path(ready.data.cover_path).read_bytes() == r.content
    got = (await stack.http.get(mine, headers=a)).json()
    assert got["cover_status"] == "ready" and got["cover_path"] == ready.data.cover_path
    assert stack.path(f"{media['id']}/original.mp4").read_bytes() == clip
    task = (await stack.http.get(f"/api/v1/tasks/{task_id}", headers=a)).json()
    assert task["status"] == "completed" and task["result"]["media_id"] == media["id"]
    assert [m["id"] for m in (await stack.http.get(API, headers=a)).json()] == [media["id"]]
    assert [m["id"] for m in (await stack.http.get(API, headers=a, params={"meeting_id": mid})).json()]

    # Somebody else's upload is no upload at all; admins see it.
    for path in (mine, f"{mine}/cover"):
        r = await stack.http.get(path, headers=b)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
    assert (await stack.http.get(API, headers=b)).json() == []
    assert (await stack.http.get(mine, headers=bearer(admin_token()))).status_code == 200
    assert (await stack.http.get(mine)).status_code == 401

    # Without a cover: no task, and the cover answers 404 saying why.
    r = await stack.upload(a, clip, cover="false")
    assert r.status_code == 201 and r.json()["cover_task_id"] is None
    r = await stack.http.get(f"{API}/{r.json()['media']['id']}/cover", headers=a)
    assert r.status_code == 404 and "submit media.cover" in r.json()["error"]["message"]


async def test_bad_uploads_answer_clear_errors_and_leave_nothing(stack: Stack, clip: bytes) -> None:
    (_, a), (_, b) = await stack.user("alice"), await stack.user("bob")
    mid = await stack.meeting(a)
    big = clip + b"\0" * (MAX_BYTES + 1 - len(clip))  # over the limit by a byte: refused mid-stream
    huge = clip + b"\0" * (3 * MAX_BYTES)  # refused by the gateway from Content-Length alone
    for content in (big, huge):
        r = await stack.upload(a, content)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text

    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
    for content, words in ((png, "PNG image"), (b"hello, world" * 10, "not a video"), (b"", "empty"),
                           (clip[:12] + b"\0" * 2000, "not a playable video")):
        r = await stack.upload(a, content)
        assert r.status_code == 415 and r.json()["error"]["code"] == "bad_request", r.text
        assert words in r.json()["error"]["message"], r.text

    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"files": {"meeting_id": (None, mid)}}, 400, "file: the video is missing"),
        ({"data": {"meeting_id": mid}}, 415, "multipart/form-data"),  # a urlencoded form
        ({"files": {"file": ("a.mp4", clip)}, "data": {"meeting_id": "bad id!"}}, 400, "meeting_id"),
        ({"files": {"file": ("a.mp4", clip)}, "data": {"cover": "maybe"}}, 400, "cover"),
        ({"files": {"file": ("a.mp4", clip)}, "data": {"title": "x"}}, 400, "unknown form field"),
        ({"files": {"file": ("a.mp4", clip), "file2": ("b.mp4", clip)}}, 400, "unknown form field"),
        ({"json": {"file": "x"}}, 415, "multipart/form-data"),
        ({"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
         400, "multipart"),
    ]
    for parts, status, words in cases:
        headers = {**a, **parts.pop("headers", {})}
        r = await stack.http.post(API, headers=headers, **parts)
        assert r.status_code == status, (parts, r.text)
        assert r.json()["error"]["code"] == "bad_request" and words in r.json()["error"]["message"], r.text

    r = await stack.upload(b, clip, meeting_id=mid)  # bob is not in alice's meeting
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = await stack.http.post(API, files={"file": ("a.mp4", clip)})
    assert r.status_code == 401
    for path in (f"{API}/bad id!", f"{API}/nope", f"{API}/nope/cover"):
        r = await stack.http.get(path, headers=a)
        assert r.status_code in (400, 404) and r.json()["error"]["message"], path

    assert (await stack.http.get(API, headers=a)).json() == []
    incoming = stack.path(".incoming")
    assert not incoming.exists() or list(incoming.iterdir()) == []
    assert [p.name for p in stack.settings.media_root.iterdir() if p.name != ".incoming"] == []
    assert stack.media.worker_running


async def test_a_transcode_runs_in_stages_reporting_progress(stack: Stack, clip: bytes, redis: Any) -> None:
    alice, a = await stack.user("alice")
    mid = await stack.meeting(a)
    media_id = (await stack.upload(a, clip, meeting_id=mid, cover="false")).json()["media"]["id"]
    dispatcher = Dispatcher(redis, routes=TASK_ROUTES, prefix=stack.settings.key_prefix)
    async with recording(stack.settings, "media.recording_ready") as events:
        record = await run(dispatcher, alice, "media.transcode", {"media_id": media_id, "height": 60},
                           meeting_id=mid)
        assert record.status == TaskStatus.COMPLETED, record.error
        await until(lambda: events, "media.recording_ready")

    assert record.stage >= 2 and record.progress == 1.0  # start, poll (one or more), finish
    rendition = record.result["transcode"]
    assert rendition["status"] == "done" and rendition["format"] == "mp4" and rendition["height"] == 60
    output = stack.path(rendition["path"])
    assert output.is_file() and output.stat().st_size == rendition["size"] > 0
    assert output.read_bytes()[4:8] == b"ftyp" and abs(rendition["duration_s"] - 2.0) < 0.3
    assert [p.name for p in output.parent.iterdir() if p.name.startswith("transcode-")] == [output.name]
    assert events[0].data.path == rendition["path"] and events[0].data.meeting_id == mid
    assert events[0].data.recording_id == media_id

    changes = [fields for _, fields in await dispatcher.queues["media"].events("0-0", block_ms=1,
                                                                                 count=100_000)
               if fields.get("id") == record.id]
    progress = [float(f["progress"]) for f in changes if "progress" in f]
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)
    deltas = "".join(f.get("delta", "") for f in changes)
    assert "started" in deltas and "done" in deltas
    assert sum(1 for f in changes if f.get("reason") == "next_stage") == record.stage

    got = (await stack.http.get(f"{API}/{media_id}", headers=a)).json()
    assert [t["id"] for t in got["transcodes"]] == [rendition["id"]] and got["transcodes"][0]["size"]


async def test_a_transcode_survives_a_worker_restart(
    make_settings: Callable[..., ServiceSettings], redis: Any, tmp_path: Path, clip: bytes
) -> None:
    """ffmpeg waits (a wrapper holds it) while its worker stops. A new worker takes the next stage: one
    transcode's ffmpeg was killed meanwhile (started again), the other's goes on by itself (followed by
    its pid and progress file)."""
    gate = tmp_path / "gate"
    wrapper = tmp_path / "ffmpeg-gated"
    wrapper.write_text(f'#!/bin/sh\nwhile [ ! -e "{gate}" ]; do sleep 0.05; done\n'
                       f'exec "{shutil.which("ffmpeg")}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    settings = media_settings(make_settings(), ffmpeg=str(wrapper))
    dispatcher = Dispatcher(redis, routes=TASK_ROUTES, prefix=settings.key_prefix)
    owner = identity_headers(SECRET, Actor("u-alice"))

    first = build_media(settings, port=0)
    async with first.running(), httpx.AsyncClient(base_url=str(first.url), headers=owner) as direct:
        r = await direct.post("/media", files={"file": ("a.mp4", clip)}, data={"cover": "false"})
        assert r.status_code == 201, r.text
        media_id = r.json()["media"]["id"]
        tasks = [(await dispatcher.submit(owner="u-alice", type="media.transcode",
                                          data={"media_id": media_id, "format": fmt})).task_id
                 for fmt in ("mp4", "webm")]

        async def jobs() -> list[TranscodeJob]:
            async with first.database.session() as s:
                rows = [await s.scalar(_job_of(t)) for t in tasks]
            return [j for j in rows if j is not None and j.pid is not None]

        await until(lambda: _count(jobs(), 2), "both transcodes to start")
        killed, kept = await jobs()
    os.kill(killed.pid or 0, signal.SIGKILL)  # gone while no worker watched
    gate.touch()

    second = build_media(settings, port=0)
    async with second.running():
        records = [await finished(dispatcher, t) for t in tasks]
    for record in records:
        assert record.status == TaskStatus.COMPLETED, record.error
        assert (settings.media_root / record.result["transcode"]["path"]).stat().st_size > 0
    by_task = {r.id: r.result["transcode"] for r in records}
    assert by_task[killed.task_id]["restarts"] == 1 and by_task[kept.task_id]["restarts"] == 0
    assert by_task[kept.task_id]["format"] == "webm"


def _job_of(task_id: str) -> Any:
    from sqlalchemy import select

    return select(TranscodeJob).where(TranscodeJob.task_id == task_id)


async def _count(items: Any, n: int) -> bool:
    return len(await items) == n


async def test_bad_tasks_are_dead_lettered_with_the_reason(stack: Stack, clip: bytes, redis: Any) -> None:
    (alice, a), (bob, _) = await stack.user("alice"), await stack.user("bob")
    dispatcher = Dispatcher(redis, routes=TASK_ROUTES, prefix=stack.settings.key_prefix)
    media_id = (await stack.upload(a, clip, cover="false")).json()["media"]["id"]
    broken_id = (await stack.upload(a, clip, cover="false")).json()["media"]["id"]
    stack.path(f"{broken_id}/original.mp4").write_bytes(b"\0" * 4096)  # the store lost it

    bad: list[tuple[str, str, Any, str | None, str]] = [
        (alice, "media.cover", {"media_id": "no-such-media"}, None, "not_found: no media"),
        (bob, "media.cover", {"media_id": media_id}, None, "not_found"),  # alice's
        (alice, "media.cover", {}, None, "bad_request: media_id"),
        (alice, "media.cover", "not an object", None, "JSON object"),
        (alice, "media.cover", {"media_id": broken_id}, None, "ffmpeg_failed: "),
        (alice, "media.transcode", {"media_id": "no-such-media"}, None, "not_found: no media"),
        (alice, "media.transcode", {"media_id": broken_id}, None, "(exit status 1)"),  # at the poll stage
        (alice, "media.transcode", {"media_id": media_id, "format": "avi"}, None, "format"),
        (alice, "media.transcode", {"media_id": media_id, "stage": "poll"}, None, "starts at 'start'"),
        (alice, "media.recording.start", {}, None, "needs a meeting_id"),
        (alice, "media.recording.start", {"meeting_id": "m1"}, "m2", "differs"),
        (alice, "media.stream.stop", {"stream_id": "nope"}, None, "not_found: no stream"),
    ]
    records = [await run(dispatcher, *case[:4]) for case in bad]
    for record, case in zip(records, bad, strict=True):
        assert record.status == TaskStatus.FAILED, (case, record)
        assert record.error is not None and record.error.code == "rejected", (case, record.error)
        assert case[4] in record.error.message, (case, record.error)
    dead = {r.id for r in await dispatcher.queues["media"].dead_letters(limit=1000)}
    assert dead == {r.id for r in records}

    broken = (await stack.http.get(f"{API}/{broken_id}", headers=a)).json()
    assert broken["cover_status"] == "failed" and broken["cover_error"]
    r = await stack.http.get(f"{API}/{broken_id}/cover", headers=a)
    assert r.status_code == 404 and "failed" in r.json()["error"]["message"]
    assert stack.media.worker_running
    ok = await run(dispatcher, alice, "media.cover", {"media_id": media_id})  # the service goes on
    assert ok.status == TaskStatus.COMPLETED, ok.error


async def test_recordings_and_streams_with_their_events(stack: Stack, redis: Any) -> None:
    (alice, a), (bob, b), (carol, _) = [await stack.user(n) for n in ("alice", "bob", "carol")]
    mid = await stack.meeting(a, b)
    dispatcher = Dispatcher(redis, routes=TASK_ROUTES, prefix=stack.settings.key_prefix)
    token = a["Authorization"].split()[1]
    url = stack.gateway.replace("http://", "ws://") + f"/ws?token={token}"
    async with recording(stack.settings, "media.*") as events, _socket(url) as ws:
        await ws.send({"type": "subscribe", "id": "s1", "topic": f"meeting.{mid}"})
        assert (await ws.recv())["type"] == "subscribed"

        started = await run(dispatcher, alice, "media.recording.start", meeting_id=mid)
        assert started.status == TaskStatus.COMPLETED, started.error
        rec = started.result
        assert rec["status"] == "recording" and rec["started_by"] == alice
        again = await run(dispatcher, bob, "media.recording.start", {"meeting_id": mid})
        assert again.status == TaskStatus.FAILED and "conflict: " in again.error.message  # type: ignore[union-attr]
        outsider = await run(dispatcher, carol, "media.recording.start", meeting_id=mid)
        assert "forbidden: only the participants" in outsider.error.message  # type: ignore[union-attr]

        stream = await run(dispatcher, bob, "media.stream.start", {"kind": "screen", "stream_id": "bob-s"},
                           meeting_id=mid)
        assert stream.status == TaskStatus.COMPLETED and stream.result["kind"] == "screen"
        twice = await run(dispatcher, bob, "media.stream.start", {"stream_id": "bob-s"}, meeting_id=mid)
        assert twice.status == TaskStatus.COMPLETED and twice.result["status"] == "live"  # nothing new
        not_yours = await run(dispatcher, alice, "media.stream.stop", {"stream_id": "bob-s"}, meeting_id=mid)
        assert "forbidden" in not_yours.error.message  # type: ignore[union-attr]
        stopped = await run(dispatcher, bob, "media.stream.stop", {"stream_id": "bob-s", "meeting_id": mid})
        assert stopped.status == TaskStatus.COMPLETED and stopped.result["status"] == "stopped"

        ready = await run(dispatcher, bob, "media.recording.stop", meeting_id=mid)
        assert ready.status == TaskStatus.COMPLETED and ready.result["id"] == rec["id"]
        assert ready.result["status"] == "stopped" and ready.result["duration_s"] >= 0
        assert stack.path(ready.result["path"]).is_dir()
        none = await run(dispatcher, bob, "media.recording.stop", meeting_id=mid)
        assert "not_found: meeting" in none.error.message  # type: ignore[union-attr]

        # The meeting's end stops what still runs.
        live = await run(dispatcher, alice, "media.stream.start", meeting_id=mid)
        await run(dispatcher, alice, "media.recording.start", meeting_id=mid)
        assert (await stack.http.post(f"/api/v1/meetings/{mid}/end", headers=a)).status_code == 200
        await until(lambda: len(of_type(events, "media.recording_ready")) == 2, "the end's recording_ready")
        await until(lambda: len(of_type(events, "media.stream_stopped")) == 2, "the end's stream_stopped")
        frames = await ws.until(lambda f: f.get("event") == "media.recording_ready"
                                and f["data"]["recording_id"] != rec["id"])

    assert [(e.type, e.data.stream_id) for e in events if e.type.startswith("media.stream")] == [
        ("media.stream_started", "bob-s"),
        ("media.stream_stopped", "bob-s"),
        ("media.stream_started", live.result["id"]),
        ("media.stream_stopped", live.result["id"]),
    ]
    assert of_type(events, "media.stream_started")[0].data.user_id == bob
    first = of_type(events, "media.recording_ready")[0].data
    assert (first.meeting_id, first.recording_id, first.path) == (mid, rec["id"], rec["path"])
    media_frames = [f for f in frames if f["type"] == "event" and f["event"].startswith("media.")]
    assert [f["event"] for f in media_frames] == [
        "media.recording_started",
        "media.stream_started",
        "media.stream_stopped",
        "media.recording_ready",
        "media.stream_started",
        "media.recording_started",
        "media.stream_stopped",  # the meeting ended: its streams, then its recording
        "media.recording_ready",
    ]
    assert all(f["topic"] == f"meeting.{mid}" for f in media_frames)
    assert media_frames[1]["data"] == {"meeting_id": mid, "stream_id": "bob-s", "user_id": bob,
                                       "kind": "screen"}


@contextlib.asynccontextmanager
async def _socket(url: str) -> AsyncIterator[Any]:
    import websockets

    from ..gateway.conftest import Client

    async with websockets.connect(url) as ws:
        client = Client(ws)
        assert (await client.recv())["type"] == "welcome"
        yield client


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEETMESH_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MEETMESH_MEDIA_DIR", raising=False)
    settings = MediaSettings.of(ServiceSettings())
    assert settings.media_root == (tmp_path / "media").resolve() and settings.media_max_bytes == 100 << 20
    monkeypatch.setenv("MEETMESH_MEDIA_MAX_BYTES", "0")
    from shared.bus import ConfigError

    with pytest.raises(ConfigError, match="MEETMESH_MEDIA_MAX_BYTES"):
        MediaSettings.of(ServiceSettings())
