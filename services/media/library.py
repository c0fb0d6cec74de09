"""Uploads and covers: the media items, shared by the media service's REST and its ``media.cover``
task (transcodes: `transcode`; recordings and streams: `live`).

An item is its owner's: others get 404, as for no item; admins and other services (role ``service``)
may read any. An upload naming a meeting needs its uploader in that meeting now (the participant set
the meeting service keeps in Redis), since the meeting's participants hear about its cover.

Every durable event of the media service (``media.cover_ready`` here, the ``media.recording_*`` and
``media.stream_*`` of `live` and `transcode`) is staged in the transaction of the change it reports
(``service.stage_event``), so the outbox relay publishes it once that commits; the live update on
the meeting's topic (`Library.live`) follows the commit, best effort.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from services.common import Actor, Forbidden, NotFound, Service
from services.meeting.presence import Presence
from shared.bus import InvalidMessage, Queue, new_id

from . import ffmpeg
from .ffmpeg import FfmpegFailed
from .models import DONE, FAILED, NONE, PENDING, READY, MediaItem, TranscodeJob
from .schemas import MediaOut, TranscodeOut, Uploaded
from .settings import MediaSettings
from .store import Store, Unsupported

log = logging.getLogger(__name__)
COVER_FILE = "cover.jpg"
JPEG_MAGIC = b"\xff\xd8\xff"  # what a cover's bytes start with before it is served as image/jpeg
COVER_QUEUE_DELAYS = (0.25, 0.5, 1.0, 2.0)  # seconds between tries to queue an upload's cover task


def topic(meeting_id: str) -> str:
    """A meeting's live topic (the gateway lets its participants follow it)."""
    return f"meeting.{meeting_id}"


class Library:
    """The media service's items. Built with its `Service`; used once the service has started."""

    def __init__(self, service: Service, settings: MediaSettings) -> None:
        self.service = service
        self.settings = settings
        self.store = Store(settings.media_root)
        self._presence: Presence | None = None
        self._queue: Queue | None = None
        self._ffmpeg = asyncio.Semaphore(settings.media_ffmpeg_jobs)  # probes and covers at once

    @property
    def presence(self) -> Presence:
        if self._presence is None:
            self._presence = Presence(self.service.redis, self.settings.key_prefix)
        return self._presence

    @property
    def queue(self) -> Queue:
        """The service's own queue, to enqueue follow-up tasks (an upload's ``media.cover``)."""
        if self._queue is None:
            self._queue = Queue(self.service.queue_name, self.service.redis, prefix=self.settings.key_prefix,
                                **self.service.queue_options)
        return self._queue

    async def live(self, meeting_id: str | None, event: str, data: dict[str, Any]) -> None:
        """The live update on a meeting's topic (none for media of no meeting), after the commit of
        the change, whose durable event was staged in its transaction."""
        if meeting_id is not None:
            await self.service.broadcast(topic(meeting_id), event, data)

    async def must_be_inside(self, actor: Actor, meeting_id: str, what: str) -> None:
        if not actor.is_admin and not await self.presence.contains(meeting_id, actor.user_id):
            raise Forbidden(f"only the participants of meeting {meeting_id} may {what}")

    # -- uploads ----------------------------------------------------------------------------------

    async def upload(self, actor: Actor, content_type: str | None, content_length: str | None,
                     body: AsyncIterator[bytes]) -> Uploaded:
        """Store an upload (multipart ``file``, optional ``meeting_id`` and ``cover``), record it, and
        queue its ``media.cover`` task unless ``cover`` is false."""
        s = self.settings
        incoming = await self.store.receive(content_type, content_length, body, s.media_max_bytes)
        try:
            if incoming.meeting_id is not None:
                await self.must_be_inside(actor, incoming.meeting_id, "add media to it")
            try:
                async with self._ffmpeg:
                    probe = await ffmpeg.probe(s.ffprobe, incoming.path, s.ffmpeg_timeout)
            except FfmpegFailed as exc:
                raise Unsupported(f"the file is not a playable video: {exc.reason}") from None
            media_id = new_id()
            path = await self.store.place(incoming, media_id)
        except BaseException:
            await self.store.discard(incoming)
            raise
        item = MediaItem(
            id=media_id, owner_id=actor.user_id, meeting_id=incoming.meeting_id, filename=incoming.filename,
            content_type=incoming.content_type, size=incoming.size, sha256=incoming.sha256, path=path,
            duration_s=probe.duration_s, width=probe.width, height=probe.height, status=READY,
            cover_status=PENDING if incoming.cover else NONE, created_at=time.time())
        try:
            async with self.service.database.session() as session:
                session.add(item)
                await session.commit()
        except BaseException:
            await self.store.remove_item(media_id)
            raise
        task_id = await self._queue_cover(item) if incoming.cover else None
        return Uploaded(media=self._out(item, []), cover_task_id=task_id)

    async def _queue_cover(self, item: MediaItem) -> str | None:
        """Queue ``media.cover`` for a new item as its owner, trying again after each of
        `COVER_QUEUE_DELAYS`; None if it could not, the item's cover then ``failed`` with the reason
        (on the record and on ``item``): an upload never ends with a pending cover nobody makes."""
        queue = self.queue
        failure: Exception | None = None
        try:
            message = queue.message("media.cover", {"media_id": item.id}, id=f"{queue.name}.{new_id()}",
                                    owner=item.owner_id, meeting_id=item.meeting_id)
            for delay in (*COVER_QUEUE_DELAYS, None):
                try:
                    await queue.enqueue(message)
                    return message.id
                except InvalidMessage:
                    raise
                except Exception as exc:  # Redis unreachable (BusConnectionError), or its driver's error
                    failure = exc
                    if delay is None:
                        break
                    await asyncio.sleep(delay)
        except BaseException as exc:  # cancelled, or refused outright: still say so on the record
            reason = ("the upload was interrupted before its cover task was queued: submit media.cover"
                      if not isinstance(exc, Exception) else f"its cover task was refused: {exc}")
            await asyncio.shield(self._cover_not_queued(item, reason))
            raise
        log.error("media %s stored, but its cover task could not be queued after %d tries: %s", item.id,
                  len(COVER_QUEUE_DELAYS) + 1, failure)
        await self._cover_not_queued(item, "its cover task could not be queued (the task queue is "
                                     "unreachable): submit media.cover to make it")
        return None

    async def _cover_not_queued(self, item: MediaItem, reason: str) -> None:
        item.cover_status, item.cover_error = FAILED, reason
        async with self.service.database.session() as session:
            await session.execute(update(MediaItem).where(MediaItem.id == item.id,
                                                          MediaItem.cover_status == PENDING)
                                  .values(cover_status=FAILED, cover_error=reason))
            await session.commit()

    # -- reading ----------------------------------------------------------------------------------

    async def item(self, actor: Actor, media_id: str) -> MediaItem:
        """The item, if ``actor`` may see it; `NotFound` otherwise (whether or not it exists)."""
        async with self.service.database.session() as session:
            item = await session.get(MediaItem, media_id)
        if item is None or not (item.owner_id == actor.user_id or actor.is_admin or actor.is_service):
            raise NotFound(f"no media {media_id!r}")
        return item

    async def get(self, actor: Actor, media_id: str) -> MediaOut:
        item = await self.item(actor, media_id)
        async with self.service.database.session() as session:
            jobs = list(await session.scalars(select(TranscodeJob).where(TranscodeJob.media_id == item.id)
                                              .order_by(TranscodeJob.started_at, TranscodeJob.id)))
        return self._out(item, jobs)

    async def mine(self, actor: Actor, meeting_id: str | None, limit: int) -> list[MediaOut]:
        """The caller's uploads (of one meeting, if given), newest first."""
        query = select(MediaItem).where(MediaItem.owner_id == actor.user_id)
        if meeting_id is not None:
            query = query.where(MediaItem.meeting_id == meeting_id)
        async with self.service.database.session() as session:
            newest = query.order_by(MediaItem.created_at.desc(), MediaItem.id.desc()).limit(limit)
            items = list(await session.scalars(newest))
        return [self._out(i, []) for i in items]

    async def cover_file(self, actor: Actor, media_id: str) -> Path:
        """The cover JPEG's path; `NotFound` until it is ready (saying why not)."""
        item = await self.item(actor, media_id)
        if item.cover_status != READY or item.cover_path is None:
            why = {NONE: "none was asked for: submit media.cover", PENDING: "it is being made",
                   FAILED: f"making it failed: {item.cover_error}"}.get(item.cover_status, item.cover_status)
            raise NotFound(f"media {media_id} has no cover yet: {why}")
        path = self.store.path(item.cover_path)
        if not await asyncio.to_thread(path.is_file):
            raise NotFound(f"media {media_id}'s cover is missing from the store")
        if await asyncio.to_thread(_head, path, len(JPEG_MAGIC)) != JPEG_MAGIC:  # served as image/jpeg only
            raise NotFound(f"media {media_id}'s cover in the store is not a JPEG")
        return path

    # -- covers -----------------------------------------------------------------------------------

    async def make_cover(self, actor: Actor, media_id: str) -> dict[str, Any]:
        """Make the item's cover, record it, publish ``media.cover_ready``. `FfmpegFailed` (recorded on
        the item) when ffmpeg cannot."""
        item = await self.item(actor, media_id)
        if item.owner_id != actor.user_id:  # tasks act as their owner: only for one's own uploads
            raise NotFound(f"no media {media_id!r}")
        source = self.store.path(item.path)
        target = self.store.item_dir(item.id) / COVER_FILE
        try:
            async with self._ffmpeg:
                await ffmpeg.cover(self.settings.ffmpeg, source, target, item.duration_s,
                                   self.settings.ffmpeg_timeout)
        except FfmpegFailed as exc:
            await self._set_cover(item.id, FAILED, None, exc.reason)
            raise
        cover_path = self.store.relative(target)
        data = {"media_id": item.id, "cover_path": cover_path}
        await self._set_cover(item.id, READY, cover_path, None, ready=data)
        await self.live(item.meeting_id, "media.cover_ready", data)
        size = await asyncio.to_thread(lambda: target.stat().st_size)
        return {**data, "size": size}

    async def _set_cover(self, media_id: str, status: str, path: str | None, error: str | None, *,
                         ready: dict[str, Any] | None = None) -> None:
        """Record the cover's state; with ``ready``, stage ``media.cover_ready`` in that transaction."""
        async with self.service.database.session() as session:
            await session.execute(update(MediaItem).where(MediaItem.id == media_id)
                                  .values(cover_status=status, cover_path=path, cover_error=error))
            if ready is not None:
                await self.service.stage_event(session, "media.cover_ready", ready)
            await session.commit()

    @staticmethod
    def _out(item: MediaItem, jobs: list[TranscodeJob]) -> MediaOut:
        return MediaOut(
            id=item.id, owner_id=item.owner_id, meeting_id=item.meeting_id, filename=item.filename,
            content_type=item.content_type, size=item.size, sha256=item.sha256, duration_s=item.duration_s,
            width=item.width, height=item.height, status="ready",
            cover_status=item.cover_status,  # type: ignore[arg-type]
            cover_path=item.cover_path if item.cover_status == READY else None, cover_error=item.cover_error,
            created_at=item.created_at, transcodes=[job_out(j) for j in jobs])


def job_out(job: TranscodeJob) -> TranscodeOut:
    return TranscodeOut(
        id=job.id, task_id=job.task_id, format=job.format, height=job.height,
        status=job.status,  # type: ignore[arg-type]
        path=job.output_path, size=job.size if job.status == DONE else None, duration_s=job.duration_s,
        error=job.error, restarts=job.restarts, started_at=job.started_at, finished_at=job.finished_at)


def _head(path: Path, size: int) -> bytes:
    with path.open("rb") as f:
        return f.read(size)
