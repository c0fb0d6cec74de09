"""A meeting's recordings and streams (``media.recording.*``, ``media.stream.*``): their state in SQL,
their catalogue events, and live updates on ``meeting.<id>``.

Only the meeting's participants (the participant set the meeting service keeps in Redis) start a
recording or a stream, or stop a recording; a stream is stopped by its owner. A meeting records once
at a time (a second start is 409 ``conflict``). Starting or stopping twice changes nothing and
announces nothing (a task may run twice). When a meeting ends, its streams and recording stop; when a
participant leaves, their streams stop.

| task | durable event | live update on ``meeting.<id>`` |
|---|---|---|
| ``media.recording.start`` | (none in the catalogue) | ``media.recording_started`` |
| ``media.recording.stop`` | ``media.recording_ready`` | ``media.recording_ready`` |
| ``media.stream.start`` | ``media.stream_started`` | ``media.stream_started`` (+ ``kind``) |
| ``media.stream.stop`` | ``media.stream_stopped`` | ``media.stream_stopped`` (+ ``user_id``) |

Each durable event is staged in the transaction of the change (the service's outbox publishes it
once committed); the live update follows the commit.
"""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.common import Actor, Conflict, Database, Forbidden, NotFound
from shared.bus import new_id

from .library import Library
from .models import LIVE, RECORDING, STOPPED, Recording, Stream
from .schemas import RecordingOut, StreamOut

RECORDINGS = "recordings"
ENDED_BY_MEETING = "meeting.ended"  # stopped_by when the meeting's end stopped it
LEFT_MEETING = "meeting.user_left"  # ... when its owner left the meeting


class Live:
    def __init__(self, library: Library) -> None:
        self.library = library

    @property
    def db(self) -> Database:
        return self.library.service.database

    # -- recordings -------------------------------------------------------------------------------

    async def start_recording(self, actor: Actor, meeting_id: str, task_id: str | None) -> RecordingOut:
        await self.library.must_be_inside(actor, meeting_id, "record it")
        async with self.db.session() as s:
            running = await s.scalar(select(Recording).where(Recording.meeting_id == meeting_id,
                                                             Recording.status == RECORDING))
            if running is not None:
                if task_id is not None and running.task_id == task_id:
                    return _recording(running)  # this task ran before: done already
                raise Conflict(f"meeting {meeting_id} is being recorded already (recording {running.id})")
            recording_id = new_id()
            path = f"{RECORDINGS}/{recording_id}"
            recording = Recording(id=recording_id, meeting_id=meeting_id, status=RECORDING, path=path,
                                  started_by=actor.user_id, task_id=task_id, started_at=time.time())
            s.add(recording)
            try:
                await s.commit()
            except IntegrityError:
                raise Conflict(f"meeting {meeting_id} is being recorded already") from None
        await asyncio.to_thread((self.library.store.root / path).mkdir, parents=True, exist_ok=True)
        out = _recording(recording)
        await self.library.service.broadcast(
            f"meeting.{meeting_id}", "media.recording_started",
            {"meeting_id": meeting_id, "recording_id": recording.id, "started_by": actor.user_id})
        return out

    async def stop_recording(self, actor: Actor | None, meeting_id: str,
                             recording_id: str | None) -> RecordingOut:
        """Stop the meeting's running recording (``recording_id``: that one); ``actor`` None: the
        meeting ended."""
        if actor is not None:
            await self.library.must_be_inside(actor, meeting_id, "stop its recording")
        async with self.db.session() as s:
            query = select(Recording).where(Recording.meeting_id == meeting_id)
            if recording_id is not None:
                query = query.where(Recording.id == recording_id)
            else:
                query = query.where(Recording.status == RECORDING)
            recording = await s.scalar(query.order_by(Recording.started_at.desc()).limit(1))
            if recording is None:
                raise NotFound(f"no recording {recording_id} of meeting {meeting_id}" if recording_id
                               else f"meeting {meeting_id} is not being recorded")
            if recording.status == STOPPED:
                return _recording(recording)
            now = time.time()
            recording.status, recording.stopped_at = STOPPED, now
            recording.stopped_by = actor.user_id if actor is not None else ENDED_BY_MEETING
            recording.duration_s = round(max(0.0, now - recording.started_at), 3)
            data = {"meeting_id": meeting_id, "recording_id": recording.id, "path": recording.path,
                    "duration_s": recording.duration_s}
            await self.library.service.stage_event(s, "media.recording_ready", data)
            await s.commit()
        await self.library.live(meeting_id, "media.recording_ready", data)
        return _recording(recording)

    # -- streams ----------------------------------------------------------------------------------

    async def start_stream(self, actor: Actor, meeting_id: str, stream_id: str | None, kind: str,
                           task_id: str | None) -> StreamOut:
        await self.library.must_be_inside(actor, meeting_id, "stream in it")
        async with self.db.session() as s:
            if stream_id is not None:
                known = await s.get(Stream, stream_id)
                if known is not None:
                    if known.meeting_id != meeting_id or known.user_id != actor.user_id:
                        raise Conflict(f"stream id {stream_id} is taken")
                    if known.status != LIVE:
                        raise Conflict(f"stream {stream_id} has stopped: start a new one")
                    return _stream(known)
            stream = Stream(id=stream_id or new_id(), meeting_id=meeting_id, user_id=actor.user_id, kind=kind,
                            status=LIVE, task_id=task_id, started_at=time.time())
            s.add(stream)
            data = {"meeting_id": meeting_id, "stream_id": stream.id, "user_id": actor.user_id}
            try:
                await self.library.service.stage_event(s, "media.stream_started", data)
                await s.commit()
            except IntegrityError:
                raise Conflict(f"stream id {stream.id} is taken") from None
        await self.library.live(meeting_id, "media.stream_started", {**data, "kind": kind})
        return _stream(stream)

    async def stop_stream(self, actor: Actor, meeting_id: str | None, stream_id: str) -> StreamOut:
        async with self.db.session() as s:
            stream = await s.get(Stream, stream_id)
            if stream is None or (meeting_id is not None and stream.meeting_id != meeting_id):
                raise NotFound(f"no stream {stream_id}" + (f" in meeting {meeting_id}" if meeting_id else ""))
            if stream.user_id != actor.user_id:
                raise Forbidden("only its owner may stop a stream")
            if stream.status != LIVE:
                return _stream(stream)
            stream.status, stream.stopped_at, stream.stopped_by = STOPPED, time.time(), actor.user_id
            await self._stage_stopped(s, [stream])
            await s.commit()
        await self._show_stopped([stream])
        return _stream(stream)

    async def _stage_stopped(self, s: AsyncSession, streams: list[Stream]) -> None:
        """``media.stream_stopped`` for each of ``streams``, in the transaction that stops them."""
        for stream in streams:
            await self.library.service.stage_event(s, "media.stream_stopped", {
                "meeting_id": stream.meeting_id, "stream_id": stream.id})

    async def _show_stopped(self, streams: list[Stream]) -> None:
        """The live updates of stopped streams, once committed."""
        for stream in streams:
            await self.library.live(stream.meeting_id, "media.stream_stopped", {
                "meeting_id": stream.meeting_id, "stream_id": stream.id, "user_id": stream.user_id})

    # -- the meeting service's events -------------------------------------------------------------

    async def user_left(self, meeting_id: str, user_id: str) -> int:
        """Stop the streams of a participant who left (or was removed); how many."""
        return await self._stop_streams(meeting_id, user_id, LEFT_MEETING)

    async def meeting_ended(self, meeting_id: str) -> int:
        """Stop the meeting's streams and its recording; how many things stopped."""
        stopped = await self._stop_streams(meeting_id, None, ENDED_BY_MEETING)
        try:
            await self.stop_recording(None, meeting_id, None)
            stopped += 1
        except NotFound:
            pass
        return stopped

    async def _stop_streams(self, meeting_id: str, user_id: str | None, by: str) -> int:
        async with self.db.session() as s:
            query = select(Stream).where(Stream.meeting_id == meeting_id, Stream.status == LIVE)
            if user_id is not None:
                query = query.where(Stream.user_id == user_id)
            streams = list(await s.scalars(query))
            now = time.time()
            for stream in streams:
                stream.status, stream.stopped_at, stream.stopped_by = STOPPED, now, by
            await self._stage_stopped(s, streams)
            await s.commit()
        await self._show_stopped(streams)
        return len(streams)


def _recording(r: Recording) -> RecordingOut:
    return RecordingOut(id=r.id, meeting_id=r.meeting_id, status=r.status,  # type: ignore[arg-type]
                        started_by=r.started_by, stopped_by=r.stopped_by, path=r.path,
                        started_at=r.started_at, stopped_at=r.stopped_at, duration_s=r.duration_s)


def _stream(st: Stream) -> StreamOut:
    return StreamOut(id=st.id, meeting_id=st.meeting_id, user_id=st.user_id,
                     kind=st.kind, status=st.status,  # type: ignore[arg-type]
                     started_at=st.started_at, stopped_at=st.stopped_at, stopped_by=st.stopped_by)
