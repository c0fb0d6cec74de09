"""Service settings, read once from the environment (``MEETMESH_*``); a bad value fails with its name."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from shared.bus import BusSettings, ConfigError
from shared.bus.credentials import SecretFiles, check_secret, is_dev

log = logging.getLogger(__name__)
DEFAULT_PORTS = {"user": 8101, "meeting": 8102, "media": 8103, "ai": 8104}


class ServiceSettings(BusSettings):
    """The bus's settings (Redis, events, key prefix) plus what every service shares.

    ``MEETMESH_DATABASE_URL`` picks the SQL store: ``sqlite:///path`` (the default is
    ``sqlite:///<MEETMESH_DATA_DIR>/meetmesh.db``) or ``postgresql://user@host/db``; the async driver
    (aiosqlite, asyncpg) is filled in. ``MEETMESH_DATABASE_SCHEMA`` puts a PostgreSQL store's tables
    in that schema (created if missing). Each service serves its REST on ``MEETMESH_<NAME>_PORT``.

    ``MEETMESH_JWT_SECRET`` (or a file named by ``MEETMESH_JWT_SECRET_FILE``), the gateway's too:
    required, 32+ bytes, unless ``MEETMESH_ENV=dev``, where a missing one is the data folder's
    development secret (``<MEETMESH_DATA_DIR>/dev-secret``; `shared.bus.credentials`).
    """

    env: str = Field(default="production", description="dev: development mode; anything else: production")
    data_dir: Path = Path(".meetmesh")
    database_url: str | None = None
    database_schema: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    jwt_secret: str = Field(default="", validate_default=True, repr=False)
    token_ttl: float = Field(default=24 * 3600.0, gt=0, description="lifetime of issued tokens, seconds")
    service_host: str = "127.0.0.1"
    user_port: int = Field(default=DEFAULT_PORTS["user"], ge=0, le=65535)
    meeting_port: int = Field(default=DEFAULT_PORTS["meeting"], ge=0, le=65535)
    media_port: int = Field(default=DEFAULT_PORTS["media"], ge=0, le=65535)
    ai_port: int = Field(default=DEFAULT_PORTS["ai"], ge=0, le=65535)
    worker_concurrency: int = Field(default=50, ge=1)
    grace_seconds: float = Field(default=30.0, gt=0, description="SIGTERM: how long running tasks may finish")
    # argon2id cost (argon2-cffi's defaults); tests lower them, production keeps them
    argon2_time_cost: int = Field(default=3, ge=1)
    argon2_memory_kib: int = Field(default=65536, ge=8)
    argon2_parallelism: int = Field(default=4, ge=1)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _some_dir(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a directory (it is empty)")
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _strong_secret(cls, value: str, info: ValidationInfo) -> str:
        return check_secret(value, "MEETMESH_JWT_SECRET", dev=is_dev(info.data.get("env")),
                            folder=info.data.get("data_dir"))

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, SecretFiles(settings_cls, ["jwt_secret"]), dotenv_settings,
                file_secret_settings)

    def port_for(self, service: str) -> int:
        """``MEETMESH_<NAME>_PORT`` of a known service; a service of another name gets 0 (any free port)."""
        port = getattr(self, f"{service}_port", 0)
        return int(port)

    @property
    def database(self) -> str:
        """The SQL URL as given, or the embedded SQLite file under the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'meetmesh.db').resolve()}"

    @classmethod
    def load(cls) -> ServiceSettings:
        try:
            settings = cls()
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"MEETMESH_{str(err['loc'][0]).upper()}: {err['msg']}") from exc
        if os.environ.get("MEETMESH_ADMIN_USERNAMES"):
            log.warning("MEETMESH_ADMIN_USERNAMES is no longer read: registering a name grants no admin "
                        "role; an operator grants it with `meetmesh user grant-admin NAME`")
        return settings
