"""Gateway settings, read once from the environment (``MEETMESH_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from shared.bus import BusSettings
from shared.bus.credentials import SecretFiles, check_secret, is_dev


class GatewaySettings(BusSettings):
    """The bus's settings plus the gateway's own.

    ``MEETMESH_JWT_SECRET`` (or a file named by ``MEETMESH_JWT_SECRET_FILE``) signs and verifies
    tokens: required, 32+ bytes, unless ``MEETMESH_ENV=dev``, where a missing one is the data
    folder's development secret (``MEETMESH_DATA_DIR``/dev-secret; `shared.bus.credentials`).
    """

    env: str = Field(default="production", description="dev: development mode; anything else: production")
    data_dir: Path = Path(".meetmesh")
    jwt_secret: str = Field(default="", validate_default=True, repr=False)
    token_ttl: float = Field(default=24 * 3600.0, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_frame_bytes: int = Field(default=1 << 20, ge=1024)
    # Per-user limits, shared by every gateway through Redis (docs/gateway.md, "Limits")
    submit_rate: float = Field(default=50.0, gt=0, description="submissions per second per user, sustained")
    submit_burst: int = Field(default=200, ge=1, description="submissions per user at once")
    max_sockets_per_user: int = Field(default=20, ge=1, description="WebSockets open at once per user")
    socket_slot_ttl: float = Field(default=60.0, ge=3, description="seconds a killed gateway's sockets count")
    max_queued_tasks: int = Field(default=1000, ge=1, description="tasks per user queued or running")
    max_payload_bytes: int = Field(default=1 << 20, ge=1024, description="a task's serialised message")
    max_request_bytes: int = Field(default=8 << 20, ge=1024, description="a REST request body (not uploads)")
    replay_window: float = Field(default=30.0, gt=0, description="seconds a dropped session can resume")
    replay_max: int = Field(default=1000, ge=1)
    send_buffer: int = Field(default=256, ge=1, description="frames queued for one slow socket")
    idle_timeout: float = Field(default=60.0, gt=0)
    ping_interval: float = Field(default=30.0, gt=0)

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
