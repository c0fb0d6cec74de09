"""The local object store (``MEETMESH_MEDIA_DIR``) and receiving uploads into it.

Layout: ``<media_id>/original.<ext>`` (the upload), ``<media_id>/cover.jpg``,
``<media_id>/transcode-<job_id>.<ext>`` (renditions; ``.part`` while ffmpeg writes them, ``.progress``
and ``.log`` beside them), ``recordings/<recording_id>/`` (where a recording is kept), and
``.incoming/`` (uploads being received). Every path kept in SQL or sent in an event is relative to the
store's directory.

An upload is ``multipart/form-data`` read as it arrives (python-multipart's streaming parser), never
whole into memory: the file part goes to ``.incoming/`` chunk by chunk (written and hashed on a thread)
and is refused as soon as it passes ``MEETMESH_MEDIA_MAX_BYTES`` (413 ``too_large``). Its type comes
from its first bytes, not from what the client says: MP4 and QuickTime (``ftyp`` brands), WebM and
Matroska (the EBML header's doctype); anything else is 415. A refused upload's remaining body is read
(up to the size limit plus `MULTIPART_SLACK`) before the answer, so a proxy streaming it to us reads
the answer rather than a broken pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from services.common import BadRequest, MeetingId, ServiceError
from shared.bus import new_id

from .schemas import UPLOAD_SLACK as MULTIPART_SLACK

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

SNIFF_BYTES = 64              # enough for an ftyp box's brand and an EBML header's doctype
FIELD_MAX = 1024              # bytes in a text field (meeting_id, cover)
FIELDS = ("file", "meeting_id", "cover")
_MEETING = TypeAdapter(MeetingId)
# ftyp major brands of MP4 video (ISO base media), and QuickTime's
_MP4_BRANDS = {b"isom", b"iso2", b"iso3", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1", b"M4V ",
               b"M4VH", b"M4VP", b"dash", b"mmp4", b"MSNV", b"f4v "}
_QT_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}  # QuickTime files without an ftyp box


class TooLarge(ServiceError):
    """413: the upload is over the size limit."""

    status, code = 413, "too_large"


class Unsupported(ServiceError):
    """415: not a video type the store takes (the code is ``bad_request``, as the gateway's is)."""

    status, code = 415, "bad_request"


def sniff(head: bytes) -> tuple[str, str] | None:
    """(content type, file extension) of a video from its first bytes, or None."""
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand == b"qt  ":
            return "video/quicktime", "mov"
        if brand in _MP4_BRANDS:
            return "video/mp4", "mp4"
        return None
    if len(head) >= 8 and head[4:8] in _QT_ATOMS:
        return "video/quicktime", "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        doctype = head.find(b"\x42\x82")  # EBML DocType element: id, size (1 byte, 0x8n), then the name
        if doctype >= 0 and doctype + 3 <= len(head):
            size = head[doctype + 2] & 0x7F
            name = head[doctype + 3: doctype + 3 + size]
            if name == b"webm":
                return "video/webm", "webm"
            if name == b"matroska":
                return "video/x-matroska", "mkv"
    return None


def describe(head: bytes) -> str:
    """A few words on what an unsupported file seems to be, for the error message."""
    known = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
             b"%PDF": "a PDF document", b"PK\x03\x04": "a ZIP archive", b"ID3": "an MP3 file",
             b"RIFF": "a RIFF (AVI or WAV) file", b"OggS": "an Ogg file", b"fLaC": "a FLAC file"}
    for magic, what in known.items():
        if head.startswith(magic):
            return what
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return f"an ISO media file of brand {head[8:12].decode('latin-1')!r}"
    if not head:
        return "empty"
    return "not a video"


def clean_filename(raw: str | None) -> str:
    """The name a client gave its file, as a plain base name (no directories, no control characters)."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C").strip().strip(".")
    return name[:255] or "upload"


@dataclass
class Incoming:
    """A received upload, in ``.incoming/`` until `Store.place` moves it."""

    path: Path
    filename: str
    content_type: str
    ext: str
    size: int
    sha256: str
    meeting_id: str | None = None
    cover: bool = True


@dataclass
class _Form:
    """What the streaming parser saw so far (its callbacks are synchronous: they only collect)."""

    max_bytes: int
    headers: dict[str, bytes] = field(default_factory=dict)
    header_name: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    part: str | None = None
    filename: str | None = None
    file_seen: bool = False
    file_done: bool = False
    file_size: int = 0
    pending: list[bytes] = field(default_factory=list)
    value: bytearray = field(default_factory=bytearray)
    fields: dict[str, str] = field(default_factory=dict)
    ended: bool = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.part_begin, "on_header_field": self.header_field,
            "on_header_value": self.header_val, "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished, "on_part_data": self.data,
            "on_part_end": self.part_end, "on_end": self.end,
        }

    def part_begin(self) -> None:
        # not `filename`: it is the file part's, and a field may follow that part
        self.headers, self.part = {}, None
        self.value = bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def header_val(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def header_end(self) -> None:
        name = self.header_name.decode("latin-1").strip().lower()
        self.headers[name] = bytes(self.header_value).strip()
        self.header_name, self.header_value = bytearray(), bytearray()

    def headers_finished(self) -> None:
        disposition, params = parse_options_header(self.headers.get("content-disposition"))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if disposition != b"form-data" or not name:
            raise BadRequest("every part needs `Content-Disposition: form-data; name=...`")
        if name not in FIELDS:
            raise BadRequest(f"unknown form field {name[:64]!r}: send `file` (the video), and optionally "
                             "`meeting_id` and `cover`")
        if name == "file":
            if self.file_seen:
                raise BadRequest("send one file per upload")
            self.file_seen = True
            raw = params.get(b"filename")
            self.filename = raw.decode("utf-8", "replace") if raw is not None else None
        elif name in self.fields:
            raise BadRequest(f"{name}: given twice")
        self.part = name

    def data(self, data: bytes, start: int, end: int) -> None:
        if self.part == "file":
            self.file_size += end - start
            if self.file_size > self.max_bytes:
                raise TooLarge(f"the file is over the upload limit of {self.max_bytes} bytes")
            self.pending.append(bytes(data[start:end]))
        else:
            self.value += data[start:end]
            if len(self.value) > FIELD_MAX:
                raise BadRequest(f"{self.part}: over {FIELD_MAX} bytes")

    def part_end(self) -> None:
        if self.part == "file":
            self.file_done = True
        elif self.part is not None:
            try:
                self.fields[self.part] = self.value.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest(f"{self.part}: not UTF-8 text") from None
        self.part = None

    def end(self) -> None:
        self.ended = True


class Store:
    """Files under ``root`` (created at first use)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / ".incoming"

    def path(self, relative: str) -> Path:
        """The absolute path of a store-relative one; `BadRequest` if it would leave the store."""
        full = (self.root / relative).resolve()
        if not full.is_relative_to(self.root):
            raise BadRequest(f"path {relative!r} is outside the media store")
        return full

    def relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix()

    def item_dir(self, media_id: str) -> Path:
        return self.root / media_id

    async def receive(self, content_type: str | None, content_length: str | None,
                      body: AsyncIterator[bytes], max_bytes: int) -> Incoming:
        """Read a ``multipart/form-data`` upload from ``body`` into ``.incoming/``.

        `TooLarge` (413), `Unsupported` (415) or `BadRequest` (400) say what is wrong; nothing is left
        behind then.
        """
        kind, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise Unsupported("send multipart/form-data, with the video in a part named `file`")
        budget = max_bytes + MULTIPART_SLACK
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                raise BadRequest("Content-Length is not a number") from None
            if declared > budget:
                raise TooLarge(f"the upload is over the limit of {max_bytes} bytes")
        form = _Form(max_bytes)
        parser = MultipartParser(boundary, form.callbacks(), max_header_count=16, max_header_size=4096)
        await asyncio.to_thread(self.incoming.mkdir, parents=True, exist_ok=True)
        temp = self.incoming / f"{new_id()}.part"
        out: IO[bytes] | None = None
        hasher = hashlib.sha256()
        head = bytearray()
        detected: tuple[str, str] | None = None
        read = 0
        try:
            try:
                async for chunk in body:
                    read += len(chunk)
                    if read > budget:
                        raise TooLarge(f"the upload is over the limit of {max_bytes} bytes")
                    try:
                        parser.write(chunk)
                    except MultipartParseError as exc:
                        raise BadRequest(f"malformed multipart body: {exc}") from None
                    if form.pending or (form.file_done and detected is None and form.file_seen):
                        pieces, form.pending = form.pending, []
                        if detected is None:
                            head += b"".join(pieces)
                            if len(head) < SNIFF_BYTES and not form.file_done:
                                continue
                            detected = sniff(bytes(head[:SNIFF_BYTES]))
                            if detected is None:
                                raise Unsupported(
                                    f"the file is {describe(bytes(head[:SNIFF_BYTES]))}: send an MP4, "
                                    "QuickTime (MOV), WebM or Matroska (MKV) video")
                            pieces = [bytes(head)]
                            out = await asyncio.to_thread(open, temp, "wb")
                        await asyncio.to_thread(_write, out, hasher, pieces)
            except ServiceError:
                if read <= budget:  # read what is left, so whoever streams it to us reads our answer
                    with contextlib.suppress(Exception):
                        async for chunk in body:
                            read += len(chunk)
                            if read > budget:
                                break
                raise
            if not form.ended:
                raise BadRequest("the multipart body ended early (no closing boundary)")
            if not form.file_seen:
                raise BadRequest("file: the video is missing (a part named `file`)")
            if detected is None or out is None:
                raise Unsupported(f"the file is {describe(bytes(head))}: send an MP4, QuickTime (MOV), "
                                  "WebM or Matroska (MKV) video")
            await asyncio.to_thread(out.close)
            out = None
            meeting_id = form.fields.get("meeting_id") or None
            if meeting_id is not None:
                try:
                    meeting_id = _MEETING.validate_python(meeting_id)
                except ValidationError:
                    raise BadRequest("meeting_id: 1-64 of A-Z a-z 0-9 _ -") from None
            return Incoming(temp, clean_filename(form.filename), detected[0], detected[1], form.file_size,
                            hasher.hexdigest(), meeting_id, _flag(form.fields.get("cover")))
        except BaseException:
            if out is not None:
                await asyncio.to_thread(out.close)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(temp.unlink, True)
            raise

    async def place(self, incoming: Incoming, media_id: str) -> str:
        """Move a received upload to ``<media_id>/original.<ext>``; its store-relative path."""
        target = self.item_dir(media_id) / f"original.{incoming.ext}"

        def move() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(incoming.path, target)

        await asyncio.to_thread(move)
        return self.relative(target)

    async def discard(self, incoming: Incoming) -> None:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(incoming.path.unlink, True)

    async def remove_item(self, media_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.item_dir(media_id), True)


def _write(out: IO[bytes] | None, hasher: Any, pieces: list[bytes]) -> None:
    assert out is not None
    for piece in pieces:
        out.write(piece)
        hasher.update(piece)


def _flag(value: str | None) -> bool:
    """The ``cover`` field: true unless it says otherwise."""
    if value is None or value.strip() == "":
        return True
    text = value.strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise BadRequest(f"cover: {value[:32]!r} is not a boolean (true or false)")
