"""The media service's task handlers (queue ``media``).

The actor is the submitting user (the message's owner, role ``user``): a task works on that user's own
uploads. A meeting's task names its meeting as the message's ``meeting_id`` or in its data (they must
agree). Bad data, missing media, a move not allowed: rejected with the reason, dead-lettered; an
ffmpeg failure: rejected with ffmpeg's last stderr line (``ffmpeg_failed: ...``).
"""

from __future__ import annotations

from typing import Any

from services.common import actor, meeting_of, payload, task
from shared.bus import Context, Reject, Router

from .ffmpeg import FfmpegFailed
from .library import Library
from .live import Live
from .schemas import (
    CoverTask,
    RecordingStart,
    RecordingStop,
    StreamStart,
    StreamStop,
    TranscodeTask,
)
from .transcode import Transcoder


def handlers(library: Library, transcoder: Transcoder, live: Live) -> Router:
    router = Router()

    @router.handler("media.cover")
    @task
    async def cover(ctx: Context) -> dict[str, Any]:
        """``{media_id}`` -> ``{media_id, cover_path, size}``; publishes ``media.cover_ready``."""
        body = payload(CoverTask, ctx)
        await ctx.progress(0.1, "extracting a frame\n")
        try:
            return await library.make_cover(actor(ctx), body.media_id)
        except FfmpegFailed as exc:
            raise Reject(f"ffmpeg_failed: {exc.reason}") from None

    @router.handler("media.transcode")
    @task
    async def transcode(ctx: Context) -> dict[str, Any]:
        """``{media_id, format?, height?, recording_id?}``: start, poll ..., finish (see `transcode`)."""
        body = payload(TranscodeTask, ctx)
        who = actor(ctx)
        if body.stage == "start":
            return await transcoder.start(ctx, who, body)
        if ctx.message.stage == 0:
            raise Reject(f"bad_request: stage: a transcode starts at 'start', not {body.stage!r}")
        if body.stage == "poll":
            return await transcoder.poll(ctx, who, body)
        return await transcoder.finish(ctx, who, body)

    @router.handler("media.recording.start")
    @task
    async def recording_start(ctx: Context) -> dict[str, Any]:
        body = payload(RecordingStart, ctx)
        out = await live.start_recording(actor(ctx), meeting_of(ctx, body.meeting_id), ctx.message.id)
        return out.model_dump(mode="json")

    @router.handler("media.recording.stop")
    @task
    async def recording_stop(ctx: Context) -> dict[str, Any]:
        body = payload(RecordingStop, ctx)
        out = await live.stop_recording(actor(ctx), meeting_of(ctx, body.meeting_id), body.recording_id)
        return out.model_dump(mode="json")

    @router.handler("media.stream.start")
    @task
    async def stream_start(ctx: Context) -> dict[str, Any]:
        body = payload(StreamStart, ctx)
        out = await live.start_stream(actor(ctx), meeting_of(ctx, body.meeting_id), body.stream_id, body.kind,
                                      ctx.message.id)
        return out.model_dump(mode="json")

    @router.handler("media.stream.stop")
    @task
    async def stream_stop(ctx: Context) -> dict[str, Any]:
        body = payload(StreamStop, ctx)
        given = body.meeting_id or ctx.message.meeting_id
        out = await live.stop_stream(actor(ctx), meeting_of(ctx, body.meeting_id) if given else None,
                                     body.stream_id)
        return out.model_dump(mode="json")

    return router
