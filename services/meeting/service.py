"""The meeting service: meetings, participants, mutes, chat. ``python -m services.meeting``."""

from __future__ import annotations

import logging
from typing import Any

from services.common import Service, ServiceSettings
from shared.bus import Event

from . import api, tasks
from .meetings import Meetings
from .models import Base

log = logging.getLogger(__name__)


def build(settings: ServiceSettings | None = None, *, port: int | None = None) -> Service:
    """The meeting service, ready to ``run()`` (or ``start()``)."""
    service = Service("meeting", settings, metadata=[Base.metadata], port=port)
    meetings = Meetings(service)
    service.router = tasks.handlers(meetings)
    service.add_routes(api.routes(meetings))

    @service.on_start
    async def sync_presence() -> None:
        synced = await meetings.sync_presence()
        log.info("meeting service: participant sets of %d active meeting(s) rewritten", synced)

    @service.subscribe("user.registered")
    async def on_user_registered(event: Event[Any]) -> None:
        await meetings.remember_user(event.data.user_id, event.data.username)

    return service
