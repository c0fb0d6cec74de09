"""The media service's tables (its own `MetaData`: services share the store, not tables).

Paths are relative to the store's directory (``MEETMESH_MEDIA_DIR``), so the store can move."""

from __future__ import annotations

import time

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# cover_status
NONE, PENDING, READY, FAILED = "none", "pending", "ready", "failed"
# job status
RUNNING, DONE = "running", "done"
# recording status / stream status
RECORDING, STOPPED, LIVE = "recording", "stopped", "live"


class Base(DeclarativeBase):
    pass


class MediaItem(Base):
    """One uploaded video: its file in the store, what it is, and its cover."""

    __tablename__ = "media_items"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(256), index=True)
    meeting_id: Mapped[str | None] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))
    duration_s: Mapped[float | None] = mapped_column(Float)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=READY)
    cover_status: Mapped[str] = mapped_column(String(16), default=NONE)
    cover_path: Mapped[str | None] = mapped_column(String(512))
    cover_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class TranscodeJob(Base):
    """One ``media.transcode`` task's ffmpeg run: found again by its task id at every stage (and by a
    restarted worker); ``pid``/``pid_start``/``host`` say which process runs it."""

    __tablename__ = "media_transcodes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(128), unique=True)
    media_id: Mapped[str] = mapped_column(ForeignKey("media_items.id", ondelete="CASCADE"), index=True)
    owner_id: Mapped[str] = mapped_column(String(256))
    format: Mapped[str] = mapped_column(String(8))
    height: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=RUNNING)
    host: Mapped[str | None] = mapped_column(String(256))
    pid: Mapped[int | None] = mapped_column(Integer)
    pid_start: Mapped[str | None] = mapped_column(String(32))
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    output_path: Mapped[str] = mapped_column(String(512))
    size: Mapped[int | None] = mapped_column(BigInteger)
    duration_s: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[float] = mapped_column(Float, default=time.time)
    finished_at: Mapped[float | None] = mapped_column(Float)


class Recording(Base):
    """A meeting's recording: started and stopped by tasks; one running per meeting at a time."""

    __tablename__ = "media_recordings"
    __table_args__ = (  # one running recording per meeting, whichever replica starts it
        Index("ux_media_recordings_running", "meeting_id", unique=True,
              sqlite_where=text("status = 'recording'"), postgresql_where=text("status = 'recording'")),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    meeting_id: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default=RECORDING)
    started_by: Mapped[str] = mapped_column(String(256))
    stopped_by: Mapped[str | None] = mapped_column(String(256))
    task_id: Mapped[str | None] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(String(512))
    started_at: Mapped[float] = mapped_column(Float, default=time.time)
    stopped_at: Mapped[float | None] = mapped_column(Float)
    duration_s: Mapped[float | None] = mapped_column(Float)


class Stream(Base):
    """A participant's media stream in a meeting (camera, screen or audio)."""

    __tablename__ = "media_streams"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    meeting_id: Mapped[str] = mapped_column(String(64), index=True)
    user_id: Mapped[str] = mapped_column(String(256), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=LIVE)
    task_id: Mapped[str | None] = mapped_column(String(128))
    started_at: Mapped[float] = mapped_column(Float, default=time.time)
    stopped_at: Mapped[float | None] = mapped_column(Float)
    stopped_by: Mapped[str | None] = mapped_column(String(256))
