"""Uploaded files, as the issue's Security bullet says: checked by their content (never by their name or
the type the client declares), never executable, never served with an unchecked content type (the
cover is served as ``image/jpeg`` only when its bytes are a JPEG, with ``nosniff`` and a
``Content-Disposition`` of our own), and no name a client gives can put a file outside the media
folder (the client's name is kept as text only; files are stored under ids)."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from services.common import BadRequest
from services.media.store import Store, Unsupported, clean_filename

from .conftest import until
from .test_media import API, Stack, clip, stack  # noqa: F401 (fixtures)
from .test_media_safety import BOUNDARY, MP4_HEAD, file_then_fields, pieces

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                  reason="needs Debian's ffmpeg")
FORM = f"multipart/form-data; boundary={BOUNDARY}"
WEBM_HEAD = b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm" + b"\x00" * 64
ESCAPES = ["../../etc/passwd", "..\\..\\x", "..\\x", "/etc/cron.d/evil.mp4", "C:\\Windows\\evil.mp4",
           "a/../../b.mp4", "..", "...", "./", "\x00../x\x1f.mp4", "%2e%2e%2fetc%2fpasswd"]


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def executable(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o111 != 0


def test_a_client_file_name_becomes_a_plain_base_name() -> None:
    cleaned = {raw: clean_filename(raw) for raw in ESCAPES}
    assert cleaned == {
        "../../etc/passwd": "passwd", "..\\..\\x": "x", "..\\x": "x", "/etc/cron.d/evil.mp4": "evil.mp4",
        "C:\\Windows\\evil.mp4": "evil.mp4", "a/../../b.mp4": "b.mp4", "..": "upload", "...": "upload",
        "./": "upload", "\x00../x\x1f.mp4": "x.mp4", "%2e%2e%2fetc%2fpasswd": "%2e%2e%2fetc%2fpasswd",
    }
    for name in cleaned.values():
        assert "/" not in name and "\\" not in name and name not in (".", "..")


def test_store_paths_cannot_leave_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "media")
    (tmp_path / "media").mkdir()
    for relative in ("../x", "/etc/passwd", "a/../../x", "01AB/../../../etc/passwd"):
        with pytest.raises(BadRequest, match="outside the media store"):
            store.path(relative)
    assert store.path("01AB/cover.jpg") == (tmp_path / "media" / "01AB" / "cover.jpg").resolve()


@pytest.mark.parametrize("name", ESCAPES)
async def test_an_upload_lands_inside_the_store_whatever_its_name(tmp_path: Path, name: str) -> None:
    root = tmp_path / "media"
    store = Store(root)
    body = file_then_fields(MP4_HEAD, name)
    incoming = await store.receive(FORM, str(len(body)), pieces(body), 10_000)
    assert incoming.filename == clean_filename(name) and incoming.path.parent == root / ".incoming"
    placed = await store.place(incoming, "01MEDIA")
    assert placed == "01MEDIA/original.mp4"   # named by id and sniffed type, never by the client
    files = files_under(tmp_path)
    assert files == [root / "01MEDIA" / "original.mp4"], files
    assert not executable(files[0])


BAD_CONTENT = {
    "a shell script": b"#!/bin/sh\nrm -rf / --no-preserve-root\n" * 4,
    "an ELF program": b"\x7fELF\x02\x01\x01" + b"\x00" * 120,
    "an HTML page": b"<!doctype html><html><script>alert(document.cookie)</script></html>" * 2,
    "a PNG image": b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,
    "a ZIP archive": b"PK\x03\x04" + b"\x00" * 100,
}


@pytest.mark.parametrize("name", ["clip.mp4", "clip.webm", "clip.mov", "clip.mkv"])
async def test_an_allowed_extension_with_other_content_is_refused(tmp_path: Path, name: str) -> None:
    store = Store(tmp_path)
    for what, content in BAD_CONTENT.items():
        body = file_then_fields(content, name)   # declared as video/mp4 too
        with pytest.raises(Unsupported) as refused:
            await store.receive(FORM, str(len(body)), pieces(body), 10_000)
        assert "send an MP4" in str(refused.value), what
    assert list((tmp_path / ".incoming").iterdir()) == []   # nothing kept of any


async def test_the_type_comes_from_the_bytes_not_the_name(tmp_path: Path) -> None:
    store = Store(tmp_path)
    body = file_then_fields(WEBM_HEAD, "clip.mp4")   # named .mp4, declared video/mp4: a WebM
    incoming = await store.receive(FORM, str(len(body)), pieces(body), 10_000)
    assert (incoming.content_type, incoming.ext, incoming.filename) == ("video/webm", "webm", "clip.mp4")
    assert await store.place(incoming, "01W") == "01W/original.webm"


@needs_ffmpeg
async def test_uploads_through_the_gateway_stay_inside_and_covers_are_served_checked(
    stack: Stack, clip: bytes  # noqa: F811
) -> None:
    _, a = await stack.user("alice")
    root = stack.settings.media_root.resolve()
    ids = []
    for name in ("../../etc/passwd", "..\\..\\x"):
        r = await stack.upload(a, clip, name=name)
        assert r.status_code == 201, r.text
        media = r.json()["media"]
        assert media["filename"] == clean_filename(name) and media["content_type"] == "video/mp4"
        ids.append(media["id"])
    # a script named like a video, declared as one: refused by its bytes
    r = await stack.upload(a, BAD_CONTENT["a shell script"], name="run.mp4")
    assert r.status_code == 415 and "not a video" in r.json()["error"]["message"], r.text

    files = files_under(root)
    stored = [p.relative_to(root).as_posix() for p in files]
    assert [p for p in stored if p.endswith("original.mp4")] == sorted(f"{i}/original.mp4" for i in ids)
    assert all(p.split("/")[0] in ids for p in stored), stored   # nothing anywhere else
    assert not any(executable(p) for p in files)

    async def cover_ready() -> bool:
        got = (await stack.http.get(f"{API}/{ids[0]}", headers=a)).json()
        return bool(got["cover_status"] == "ready")

    await until(cover_ready, "the cover", timeout=40)
    r = await stack.http.get(f"{API}/{ids[0]}/cover", headers=a)
    assert r.status_code == 200 and r.content[:3] == b"\xff\xd8\xff"
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-disposition"] == 'inline; filename="cover.jpg"'   # ours, not the client's

    # a cover file whose bytes are not a JPEG is never served as one
    cover = root / ids[0] / "cover.jpg"
    cover.write_bytes(BAD_CONTENT["an HTML page"])
    r = await stack.http.get(f"{API}/{ids[0]}/cover", headers=a)
    assert r.status_code == 404 and "not a JPEG" in r.json()["error"]["message"], r.text
    assert r.headers["content-type"] == "application/json" and b"<script>" not in r.content
