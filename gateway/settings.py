"""Gateway settings, read once from the environment (``MEETMESH_*``)."""

from __future__ import annotations

import logging

from pydantic import Field

from shared.bus import BusSettings

log = logging.getLogger(__name__)
DEV_SECRET = "meetmesh-development-secret-change-me-now"


class GatewaySettings(BusSettings):
    """The bus's settings plus the gateway's own."""

    jwt_secret: str = Field(default=DEV_SECRET, min_length=32)
    token_ttl: float = Field(default=24 * 3600.0, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_frame_bytes: int = Field(default=1 << 20, ge=1024)
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
    # Per-user limits, shared by every gateway through Redis (docs/gateway.md, "Limits")

    @classmethod
    def load(cls) -> GatewaySettings:
        settings = super().load()
        if settings.jwt_secret == DEV_SECRET:
            log.warning("MEETMESH_JWT_SECRET is not set: tokens are signed with the development secret")
        return settings
