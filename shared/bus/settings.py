"""Settings read once from the environment (``MEETMESH_*``), failing loudly with the variable's name."""

from __future__ import annotations

from typing import Self

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError


class BusSettings(BaseSettings):
    """``MEETMESH_REDIS_URL``, ``MEETMESH_EVENTS_URL`` (redis://, nats:// or amqp://) and friends.

    Retention of finished task records, in seconds (see `Queue`): ``MEETMESH_COMPLETED_TTL`` (1 h),
    ``MEETMESH_CANCELLED_TTL`` (24 h: cancelled, or ended by their deadline) and
    ``MEETMESH_DEAD_LETTER_TTL`` (7 d: dead letters and their records).
    """

    model_config = SettingsConfigDict(env_prefix="MEETMESH_", extra="ignore")

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", pattern=r"^rediss?://")
    events_url: str | None = Field(default=None, pattern=r"^(rediss?|nats|tls|amqps?)://")
    key_prefix: str = "mm"
    completed_ttl: float = Field(default=3_600.0, gt=0, description="seconds a completed record is kept")
    cancelled_ttl: float = Field(default=86_400.0, gt=0, description="seconds a cancelled record is kept")
    dead_letter_ttl: float = Field(default=7 * 86_400.0, gt=0, description="seconds a dead letter is kept")
    log_level: str = "INFO"

    @property
    def redis_url_configured(self) -> bool:
        """Whether ``redis_url`` was set (environment, settings file or argument) rather than defaulted.

        Only an unconfigured URL may be replaced by a private Redis (`meetmesh.embedded.ensure_redis`).
        """
        return "redis_url" in self.model_fields_set

    @property
    def retention(self) -> dict[str, float]:
        """The `Queue` options for how long finished records are kept: ``Queue(..., **s.retention)``."""
        return {"completed_ttl": self.completed_ttl, "cancelled_ttl": self.cancelled_ttl,
                "dead_letter_ttl": self.dead_letter_ttl}

    @property
    def events(self) -> str:
        """Where events travel: ``MEETMESH_EVENTS_URL``, or the Redis URL when it is not set."""
        return self.events_url or self.redis_url

    @classmethod
    def load(cls) -> Self:
        try:
            return cls()
        except ValidationError as exc:
            err = exc.errors()[0]
            name = "MEETMESH_" + str(err["loc"][0]).upper()
            raise ConfigError(f"{name}: {err['msg']}") from exc
