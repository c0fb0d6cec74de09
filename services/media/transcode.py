"""``media.transcode``: a three-stage pipeline on the queue's atomic stage transitions.

1. ``start``: record a job (keyed by the task id: a stage that runs twice finds it), start ffmpeg in
   the background (`ffmpeg.spawn_transcode`: its own session, so it outlives the worker), and move the
   task to ``poll``.
2. ``poll``: is ffmpeg done? Running: report progress (media time written over the upload's duration,
   from ffmpeg's ``-progress`` file) and poll again later, with growing delays (0.2, 0.4, 0.8 ... s,
   at most `POLL_CAP`). Exited 0 (or, for a process this worker did not start, ``progress=end``
   written): on to ``finish``. Failed: the task is rejected with ffmpeg's last stderr line. Gone
   without finishing (killed by a signal, the machine restarted): started again, up to
   `MAX_RESTARTS` times, then rejected.
3. ``finish``: move the output into place, record its size and duration, stage
   ``media.recording_ready`` (for an upload in a meeting) in that same transaction (the outbox
   publishes it once committed), and complete with the rendition.

Each stage ends with ``ctx.then(...)``: the next stage is queued in the same script that completes this
one, so a crash neither loses nor doubles it. Every stage finds the job from SQL, so any worker (a
restarted one included) can take the next stage: the process it did not start is followed by pid
(and the pid's start time, as pids are reused) on the same host, and by the progress file's
heartbeat from another host (which then needs the store on a shared filesystem).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy import select

from services.common import Actor, NotFound
from shared.bus import BusError, Context, Reject, TaskNotFound, TaskStatus, new_id

from . import ffmpeg
from .ffmpeg import FfmpegFailed
from .library import Library, job_out
from .models import DONE, FAILED, RUNNING, MediaItem, TranscodeJob
from .schemas import TranscodeTask

log = logging.getLogger(__name__)
POLL_FIRST = 0.2     # seconds before the first poll; each poll waits twice as long as the one before ...
POLL_CAP = 5.0       # ... up to this
MAX_RESTARTS = 2     # a transcode whose ffmpeg vanished is started again this many times at most
STALE_SECONDS = 60.0  # from another host: no progress written for this long means ffmpeg is gone
TYPE = "media.transcode"


def poll_delay(attempt: int) -> float:
    """Seconds before poll number ``attempt`` (0, 1, 2 ...): 0.2, 0.4, 0.8 ... capped."""
    return min(POLL_CAP, POLL_FIRST * 2.0 ** min(attempt, 32))


class Transcoder:
    """The transcode stages. Keeps the ffmpeg processes this worker started (others are followed by
    their record)."""

    def __init__(self, library: Library) -> None:
        self.library = library
        self.host = socket.gethostname()
        self._processes: dict[str, asyncio.subprocess.Process] = {}

    # -- stages -----------------------------------------------------------------------------------

    async def start(self, ctx: Context, actor: Actor, body: TranscodeTask) -> dict[str, Any]:
        if ctx.message.stage != 0:
            raise Reject(f"bad_request: stage {ctx.message.stage} of {TYPE} cannot be 'start'")
        item = await self.library.item(actor, body.media_id)
        if item.owner_id != actor.user_id:
            raise NotFound(f"no media {body.media_id!r}")
        job = await self._job(ctx.message.id)
        if job is None:
            job_id = new_id()
            path = self.library.store.item_dir(item.id) / f"transcode-{job_id}.{body.format}"
            job = TranscodeJob(id=job_id, task_id=ctx.message.id, media_id=item.id, owner_id=actor.user_id,
                               format=body.format, height=body.height, status=RUNNING,
                               output_path=self.library.store.relative(path), restarts=0,
                               started_at=time.time())
            async with self.library.service.database.session() as session:
                session.add(job)
                await session.commit()
        if job.status == RUNNING and (job.pid is None or self._state(job)[0] == "gone"):
            await self._launch(job, item)  # new, or this stage ran before and its ffmpeg is gone
        await ctx.progress(0.0, f"transcode {job.id} started ({job.format})\n")
        self._next(ctx, body, "poll", 0, POLL_FIRST)
        return {"job_id": job.id, "stage": "start"}

    async def poll(self, ctx: Context, actor: Actor, body: TranscodeTask) -> dict[str, Any]:
        job = await self._own_job(ctx, actor)
        if job.status == FAILED:
            raise Reject(f"ffmpeg_failed: {job.error}")
        if job.status == DONE:
            self._next(ctx, body, "finish", body.attempt, 0.0)
            return {"job_id": job.id, "stage": "poll", "state": "done"}
        item = await self._item(job)
        if time.time() - job.started_at > self.library.settings.media_transcode_timeout:
            self._kill(job)
            limit = self.library.settings.media_transcode_timeout
            await self._fail(job, f"the transcode took longer than {limit:g} s "
                                  "(MEETMESH_MEDIA_TRANSCODE_TIMEOUT)")
        state, status = self._state(job)
        if state == "running":
            progress = await asyncio.to_thread(ffmpeg.read_progress, self._progress_file(job))
            fraction = None
            if item.duration_s:
                fraction = max(0.0, min(0.99, progress.out_time_s / item.duration_s))
            total = f" of {item.duration_s:.1f}" if item.duration_s else ""
            await ctx.progress(fraction, f"transcoding: {progress.out_time_s:.1f}{total} s\n")
            attempt = body.attempt + 1
            self._next(ctx, body, "poll", attempt, poll_delay(attempt))
            return {"job_id": job.id, "stage": "poll", "state": "running"}
        if state == "exited" and status == 0:
            self._forget(job)
            self._next(ctx, body, "finish", body.attempt, 0.0)
            return {"job_id": job.id, "stage": "poll", "state": "exited"}
        if state == "exited":
            self._forget(job)
            reason = await asyncio.to_thread(ffmpeg.log_tail, self._log_file(job))
            await self._fail(job, f"{reason} (exit status {status})")
        # gone: the process is no more, and it did not finish
        if job.restarts >= MAX_RESTARTS:
            await self._fail(job, f"ffmpeg stopped without finishing, {job.restarts + 1} times")
        job.restarts += 1
        log.warning("transcode %s: ffmpeg is gone unfinished; starting it again (%d)", job.id, job.restarts)
        await self._launch(job, item)
        await ctx.progress(None, f"ffmpeg was gone: transcode {job.id} started again\n")
        attempt = body.attempt + 1
        self._next(ctx, body, "poll", attempt, poll_delay(attempt))
        return {"job_id": job.id, "stage": "poll", "state": "restarted"}

    async def finish(self, ctx: Context, actor: Actor, body: TranscodeTask) -> dict[str, Any]:
        job = await self._own_job(ctx, actor)
        if job.status == FAILED:
            raise Reject(f"ffmpeg_failed: {job.error}")
        item = await self._item(job)
        store = self.library.store
        output = store.path(job.output_path)
        if job.status != DONE:
            part = self._part_file(job)
            try:
                await asyncio.to_thread(os.replace, part, output)
            except FileNotFoundError:
                if not await asyncio.to_thread(output.is_file):
                    await self._fail(job, "ffmpeg's output is missing from the store")
            try:
                probe = await ffmpeg.probe(self.library.settings.ffprobe, output,
                                           self.library.settings.ffmpeg_timeout)
            except FfmpegFailed as exc:
                await self._fail(job, f"the output does not play: {exc.reason}")
            size = await asyncio.to_thread(lambda: output.stat().st_size)
            async with self.library.service.database.session() as session:
                row = await session.get(TranscodeJob, job.id)
                assert row is not None
                row.status, row.size, row.duration_s = DONE, size, probe.duration_s
                row.finished_at, row.pid, row.pid_start = time.time(), None, None
                if item.meeting_id is not None:  # announced with the job done, once
                    await self.library.service.stage_event(
                        session, "media.recording_ready", self._ready(item, row, body))
                await session.commit()
                job = row
            for leftover in (self._progress_file(job), self._log_file(job)):
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(leftover.unlink, True)
        if item.meeting_id is not None:
            await self.library.live(item.meeting_id, "media.recording_ready", {
                **self._ready(item, job, body), "media_id": item.id, "job_id": job.id, "format": job.format})
        await ctx.progress(1.0, f"transcode {job.id} done: {job.output_path}\n")
        return {"media_id": item.id, "transcode": job_out(job).model_dump(mode="json")}

    # -- the job ----------------------------------------------------------------------------------

    async def sweep(self) -> int:
        """At start: end the running jobs whose task is over (cancelled, timed out, gone), killing their
        ffmpeg if it runs here. Returns how many were ended."""
        async with self.library.service.database.session() as session:
            jobs = list(await session.scalars(select(TranscodeJob).where(TranscodeJob.status == RUNNING)))
        ended = 0
        for job in jobs:
            try:
                record = await self.library.queue.get(job.task_id)
                over = record.status.terminal and record.status != TaskStatus.COMPLETED
            except TaskNotFound:
                over = True
            except BusError:
                return ended
            if over:
                self._kill(job)
                with contextlib.suppress(Reject):
                    await self._fail(job, "its task ended before the transcode did")
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(self._part_file(job).unlink, True)
                ended += 1
        return ended

    async def _job(self, task_id: str) -> TranscodeJob | None:
        async with self.library.service.database.session() as session:
            job: TranscodeJob | None = await session.scalar(
                select(TranscodeJob).where(TranscodeJob.task_id == task_id))
            return job

    async def _own_job(self, ctx: Context, actor: Actor) -> TranscodeJob:
        job = await self._job(ctx.message.id)
        if job is None:
            raise Reject(f"bad_request: task {ctx.message.id} has no transcode job: submit {TYPE} "
                         "without `stage` (it starts at 'start')")
        if job.owner_id != actor.user_id:
            raise Reject(f"not_found: task {ctx.message.id} has no transcode job of yours")
        return job

    @staticmethod
    def _ready(item: MediaItem, job: TranscodeJob, body: TranscodeTask) -> dict[str, Any]:
        """``media.recording_ready`` of a finished rendition of an upload in a meeting."""
        return {"meeting_id": item.meeting_id, "recording_id": body.recording_id or item.id,
                "path": job.output_path, "duration_s": job.duration_s}

    async def _item(self, job: TranscodeJob) -> MediaItem:
        async with self.library.service.database.session() as session:
            item = await session.get(MediaItem, job.media_id)
        if item is None:
            await self._fail(job, f"media {job.media_id} is gone")
        return item

    async def _launch(self, job: TranscodeJob, item: MediaItem) -> None:
        """(Re)start ffmpeg for ``job`` and record which process runs it."""
        s = self.library.settings
        for stale_file in (self._part_file(job), self._progress_file(job)):
            with contextlib.suppress(OSError):
                await asyncio.to_thread(stale_file.unlink, True)
        argv = ffmpeg.transcode_argv(s.ffmpeg, self.library.store.path(item.path), self._part_file(job),
                                     self._progress_file(job), job.format, job.height)
        process = await ffmpeg.spawn_transcode(argv, self._log_file(job))
        self._processes[job.id] = process
        job.pid, job.pid_start, job.host = process.pid, ffmpeg.process_start(process.pid), self.host
        async with self.library.service.database.session() as session:
            row = await session.get(TranscodeJob, job.id)
            assert row is not None
            row.pid, row.pid_start, row.host, row.restarts = job.pid, job.pid_start, job.host, job.restarts
            await session.commit()

    def _state(self, job: TranscodeJob) -> tuple[str, int | None]:
        """("running", None), ("exited", status) or ("gone", None): where ``job``'s ffmpeg is."""
        process = self._processes.get(job.id)
        if process is not None and process.pid == job.pid:
            if process.returncode is None:
                return "running", None
            if process.returncode < 0:  # killed by a signal (the OOM killer, an operator): start again
                return "gone", None
            return "exited", process.returncode
        progress = ffmpeg.read_progress(self._progress_file(job))
        if job.host == self.host:
            if job.pid is not None and ffmpeg.alive(job.pid, job.pid_start):
                return "running", None
        elif job.pid is not None and not progress.ended and not ffmpeg.stale(progress, job.started_at,
                                                                                STALE_SECONDS):
            return "running", None
        if progress.ended and self._part_file(job).is_file():
            return "exited", 0  # it wrote its trailer, then its final report
        return "gone", None

    def _kill(self, job: TranscodeJob) -> None:
        process = self._processes.pop(job.id, None)
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        elif job.host == self.host and job.pid is not None and ffmpeg.alive(job.pid, job.pid_start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(job.pid, signal.SIGKILL)

    def _forget(self, job: TranscodeJob) -> None:
        self._processes.pop(job.id, None)

    async def _fail(self, job: TranscodeJob, reason: str) -> NoReturn:
        """Record the job as failed and reject the task with ``reason``."""
        async with self.library.service.database.session() as session:
            row = await session.get(TranscodeJob, job.id)
            if row is not None:
                row.status, row.error, row.finished_at = FAILED, reason, time.time()
                row.pid = row.pid_start = None
                await session.commit()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._part_file(job).unlink, True)
        raise Reject(f"ffmpeg_failed: {reason}")

    def _next(self, ctx: Context, body: TranscodeTask, stage: str, attempt: int, delay: float) -> None:
        data = {**body.model_dump(exclude_none=True), "stage": stage, "attempt": attempt}
        ctx.then(TYPE, data, delay=delay)

    def _files(self, job: TranscodeJob) -> Path:
        return self.library.store.path(job.output_path)

    def _part_file(self, job: TranscodeJob) -> Path:
        out = self._files(job)
        return out.with_name(out.name + ".part")

    def _progress_file(self, job: TranscodeJob) -> Path:
        out = self._files(job)
        return out.with_name(out.name + ".progress")

    def _log_file(self, job: TranscodeJob) -> Path:
        out = self._files(job)
        return out.with_name(out.name + ".log")
