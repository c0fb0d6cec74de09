"""The media service: uploads, covers, transcodes, recordings and streams. ``python -m services.media``."""

from __future__ import annotations

import logging
from typing import Any

from services.common import Service, ServiceSettings
from shared.bus import Event

from . import api, tasks
from .library import Library
from .live import Live
from .models import Base
from .settings import MediaSettings
from .transcode import Transcoder

log = logging.getLogger(__name__)


def build(settings: ServiceSettings | None = None, *, port: int | None = None) -> Service:
    """The media service, ready to ``run()`` (or ``start()``). ``settings`` without the media ones
    (``MEETMESH_MEDIA_DIR`` ...) gets them from the environment."""
    media = MediaSettings.of(settings)
    service = Service("media", media, metadata=[Base.metadata], port=port)
    library = Library(service, media)
    transcoder = Transcoder(library)
    live = Live(library)
    service.router = tasks.handlers(library, transcoder, live)
    service.add_routes(api.routes(library))

    @service.on_start
    async def prepare() -> None:
        library.store.root.mkdir(parents=True, exist_ok=True)
        ended = await transcoder.sweep()
        log.info("media service: store %s; %d abandoned transcode(s) ended", library.store.root, ended)

    @service.subscribe("meeting.ended")
    async def on_meeting_ended(event: Event[Any]) -> None:
        await live.meeting_ended(event.data.meeting_id)

    @service.subscribe("meeting.user_left")
    async def on_user_left(event: Event[Any]) -> None:
        await live.user_left(event.data.meeting_id, event.data.user_id)

    return service
