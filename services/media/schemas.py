"""The media service's bodies, shared by its REST, its tasks (the payloads of ``media.*``) and the
gateway (whose OpenAPI document shows them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.tasks import MeetingId

Id = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
MediaId = Id
VIDEO_TYPES = ("video/mp4", "video/quicktime", "video/webm", "video/x-matroska")
# An upload's body may be this much larger than its file (boundaries, part headers, the small fields):
# the limit on the whole body, checked first, is MEETMESH_MEDIA_MAX_BYTES plus this.
UPLOAD_SLACK = 64 * 1024


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- tasks ----------------------------------------------------------------------------------------


class CoverTask(Strict):
    """``media.cover``: make the cover (a JPEG frame at 1 s, or the first for shorter clips) of one of
    your uploads; publishes ``media.cover_ready``."""

    media_id: MediaId


class TranscodeTask(Strict):
    """``media.transcode``: transcode one of your uploads (H.264/AAC MP4 or VP9/Opus WebM, optionally
    scaled to ``height``). ``stage`` and ``attempt`` are the pipeline's own: leave them out."""

    media_id: MediaId
    format: Literal["mp4", "webm"] = "mp4"
    height: int | None = Field(default=None, ge=16, le=4320)
    recording_id: Id | None = Field(default=None, description="the recording this upload holds, if any")
    stage: Literal["start", "poll", "finish"] = "start"
    attempt: int = Field(default=0, ge=0, le=100_000)


class RecordingStart(Strict):
    """``media.recording.start``: start recording the meeting (``meeting_id`` here or the task's)."""

    meeting_id: MeetingId | None = None


class RecordingStop(Strict):
    """``media.recording.stop``: stop the meeting's running recording (or this one)."""

    meeting_id: MeetingId | None = None
    recording_id: Id | None = None


class StreamStart(Strict):
    """``media.stream.start``: your stream in the meeting starts (``stream_id`` optional: one is made)."""

    meeting_id: MeetingId | None = None
    stream_id: Id | None = None
    kind: Literal["camera", "screen", "audio"] = "camera"


class StreamStop(Strict):
    """``media.stream.stop``: your stream stops."""

    meeting_id: MeetingId | None = None
    stream_id: Id


# -- answers --------------------------------------------------------------------------------------


class TranscodeOut(BaseModel):
    """One transcode of an upload (a rendition, once ``done``)."""

    id: str
    task_id: str
    format: str
    height: int | None = None
    status: Literal["running", "done", "failed"]
    path: str = Field(description="relative to the store (MEETMESH_MEDIA_DIR)")
    size: int | None = None
    duration_s: float | None = None
    error: str | None = None
    restarts: int = 0
    started_at: float
    finished_at: float | None = None


class MediaOut(BaseModel):
    """An uploaded video, as stored."""

    id: str
    owner_id: str
    meeting_id: str | None = None
    filename: str
    content_type: str = Field(description="from the file's own bytes, not the client's word")
    size: int
    sha256: str
    duration_s: float | None = None
    width: int | None = None
    height: int | None = None
    status: Literal["ready"]
    cover_status: Literal["none", "pending", "ready", "failed"]
    cover_path: str | None = Field(default=None, description="relative to the store, once ready")
    cover_error: str | None = None
    created_at: float = Field(description="Unix time")
    transcodes: list[TranscodeOut] = Field(default_factory=list)


class Uploaded(BaseModel):
    """A stored upload, and the ``media.cover`` task making its cover (null when none was asked for)."""

    media: MediaOut
    cover_task_id: str | None = None


class RecordingOut(BaseModel):
    id: str
    meeting_id: str
    status: Literal["recording", "stopped"]
    started_by: str
    stopped_by: str | None = None
    path: str = Field(description="where the recording is kept, relative to the store")
    started_at: float
    stopped_at: float | None = None
    duration_s: float | None = None


class StreamOut(BaseModel):
    id: str
    meeting_id: str
    user_id: str
    kind: Literal["camera", "screen", "audio"]
    status: Literal["live", "stopped"]
    started_at: float
    stopped_at: float | None = None
    stopped_by: str | None = None
