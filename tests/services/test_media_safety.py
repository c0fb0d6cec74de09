"""Uploads, safely: errors never carry server paths (ffprobe's and ffmpeg's put the file's path first),
a form field after the file part keeps the file's name, and an accepted upload always ends with its
cover task queued or the reason it is not on its record (Redis unreachable when it is queued)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from services.media import library as media_library
from services.media.ffmpeg import FfmpegFailed, last_line, probe, without_paths
from services.media.library import Library
from services.media.store import Store
from shared.bus import Queue

from ..gateway.conftest import free_port
from .test_media import API, Stack, clip, stack  # noqa: F401 (fixtures)

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                  reason="needs Debian's ffmpeg")
BOUNDARY = "mm-test-boundary"
MP4_HEAD = b"\x00\x00\x00\x18ftypisom" + b"\x00" * 100  # what the store's sniffing reads as MP4


def file_then_fields(content: bytes, filename: str, **fields: str) -> bytes:
    """A multipart body with the file part first and the fields after it (httpx puts fields first)."""
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: video/mp4\r\n\r\n").encode() + content + b"\r\n"
    for name, value in fields.items():
        body += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    return body + f"--{BOUNDARY}--\r\n".encode()


async def pieces(body: bytes, size: int = 37) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i:i + size]


def test_without_paths_names_known_paths_and_cuts_others_to_their_last_part() -> None:
    temp = "/srv/meetmesh/media/.incoming/01HXYZ.part"
    assert without_paths(f"{temp}: Invalid data found when processing input", {temp: "the video"}) == \
        "the video: Invalid data found when processing input"
    line = "Error opening output file /var/lib/meetmesh/media/01AB/cover.jpg.77aa.part."
    assert without_paths(line) == "Error opening output file cover.jpg.77aa.part."
    assert without_paths("frame 1/2 at 0:01, 3/4 done") == "frame 1/2 at 0:01, 3/4 done"
    assert "/srv" not in last_line(f"warning\n{temp}: moov atom not found\n".encode())


async def test_a_field_after_the_file_part_keeps_the_file_name(tmp_path: Path) -> None:
    store = Store(tmp_path)
    body = file_then_fields(MP4_HEAD, "../../standup.mp4", meeting_id="m1", cover="false")
    incoming = await store.receive(f"multipart/form-data; boundary={BOUNDARY}", str(len(body)), pieces(body),
                                   10_000)
    assert (incoming.filename, incoming.meeting_id, incoming.cover) == ("standup.mp4", "m1", False)
    assert incoming.path.read_bytes() == MP4_HEAD


@needs_ffmpeg
async def test_ffprobe_errors_name_no_server_path(tmp_path: Path) -> None:
    junk = tmp_path / "deep" / "inside" / "junk.part"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(MP4_HEAD)
    with pytest.raises(FfmpegFailed) as failed:
        await probe("ffprobe", junk, 30)
    assert str(tmp_path) not in failed.value.reason and "/" not in failed.value.reason, failed.value.reason


@needs_ffmpeg
async def test_upload_errors_carry_no_server_path_and_names_survive_fields(
    stack: Stack, clip: bytes  # noqa: F811
) -> None:
    _, a = await stack.user("alice")
    r = await stack.upload(a, clip[:12] + b"\0" * 2000)  # an MP4's first bytes, then nothing playable
    assert r.status_code == 415 and "not a playable video" in r.json()["error"]["message"], r.text
    message = r.json()["error"]["message"]
    assert str(stack.settings.media_root) not in message and ".incoming" not in message, message
    assert "/" not in message, message

    body = file_then_fields(clip, "standup.mp4", cover="false")
    r = await stack.http.post(API, headers={**a, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
                              content=body)
    assert r.status_code == 201, r.text
    assert r.json()["media"]["filename"] == "standup.mp4" and r.json()["cover_task_id"] is None


@needs_ffmpeg
async def test_an_upload_whose_cover_cannot_be_queued_says_so_on_its_record(
    stack: Stack, clip: bytes, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    nobody = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)  # no server
    tries: list[float] = []
    monkeypatch.setattr(media_library, "COVER_QUEUE_DELAYS", (0.05, 0.05))

    def unreachable(self: Library) -> Queue:
        tries.append(1)
        return Queue(self.service.queue_name, nobody, prefix=self.settings.key_prefix)

    monkeypatch.setattr(Library, "queue", property(unreachable))
    _, a = await stack.user("alice")
    try:
        r = await stack.upload(a, clip)
    finally:
        await nobody.aclose()
    assert r.status_code == 201, r.text  # the upload itself is kept
    media = r.json()["media"]
    assert r.json()["cover_task_id"] is None
    assert media["cover_status"] == "failed" and "could not be queued" in media["cover_error"], media
    stored: dict[str, Any] = (await stack.http.get(f"{API}/{media['id']}", headers=a)).json()
    assert (stored["cover_status"], stored["cover_error"]) == ("failed", media["cover_error"])
    r = await stack.http.get(f"{API}/{media['id']}/cover", headers=a)
    assert r.status_code == 404 and "submit media.cover" in r.json()["error"]["message"]
    assert tries  # the library did go to its queue
