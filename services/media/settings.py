"""The media service's settings: the service settings plus where media live, how large an upload may
be, and which ffmpeg to run (``MEETMESH_*``, read once; a bad value fails naming its variable)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, ValidationError

from services.common import ServiceSettings
from shared.bus import ConfigError

MIB = 1024 * 1024


class MediaSettings(ServiceSettings):
    """``MEETMESH_MEDIA_DIR`` (default ``<MEETMESH_DATA_DIR>/media``): the object store's directory.
    ``MEETMESH_MEDIA_MAX_BYTES``: the largest upload (100 MiB). ``MEETMESH_FFMPEG`` /
    ``MEETMESH_FFPROBE``: the programs (Debian's ``ffmpeg`` package, found on ``PATH``).
    ``MEETMESH_FFMPEG_TIMEOUT``: seconds a probe or a cover may take. ``MEETMESH_MEDIA_TRANSCODE_TIMEOUT``:
    seconds a transcode may run before it is stopped and failed. ``MEETMESH_MEDIA_FFMPEG_JOBS``: probes and
    covers run at once (default: the CPU count; transcodes run in the background, one per task)."""

    media_dir: Path | None = None
    media_max_bytes: int = Field(default=100 * MIB, ge=1, description="the largest upload, bytes")
    ffmpeg: str = Field(default="ffmpeg", min_length=1)
    ffprobe: str = Field(default="ffprobe", min_length=1)
    ffmpeg_timeout: float = Field(default=120.0, gt=0, description="seconds a probe or a cover may take")
    media_transcode_timeout: float = Field(default=3600.0, gt=0, description="seconds a transcode may run")
    media_ffmpeg_jobs: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)

    @property
    def media_root(self) -> Path:
        """The store's directory (absolute)."""
        return (self.media_dir or self.data_dir / "media").resolve()

    @classmethod
    def of(cls, settings: ServiceSettings | None) -> MediaSettings:
        """``settings`` with the media settings read from the environment (``settings`` itself when it
        has them already; `ServiceSettings.load()`'s when None). `ConfigError` names a bad variable."""
        if isinstance(settings, MediaSettings):
            return settings
        if settings is None:
            loaded = cls.load()
            assert isinstance(loaded, MediaSettings)
            return loaded
        try:
            return cls(**settings.model_dump(exclude_unset=False))
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"MEETMESH_{str(err['loc'][0]).upper()}: {err['msg']}") from exc
