"""The ai service: ``ai.*`` tasks run on edge LLM nodes through the bridge it owns, under an adaptive
(AIMD) concurrency limit; a meeting's chat summarised when it ends. ``python -m services.ai``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from services.common import Service, ServiceSettings
from services.meeting.client import MeetingClient
from shared.bus import AdaptiveLimiter, BusConnectionError, Event
from shared.bus.edge.pool import EdgeBridge

from . import api, tasks
from .assistant import Assistant, Transcripts
from .settings import AiSettings

log = logging.getLogger(__name__)


class AiService(Service):
    """The ai `Service`, with the `EdgeBridge` its tasks use: bound once connected, closed at stop
    (when the bridge is its own) after running tasks have finished their streams."""

    def __init__(self, name: str, settings: ServiceSettings | None, *, limiter: AdaptiveLimiter,
                 bridge: EdgeBridge, own_bridge: bool, port: int | None = None,
                 queue_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(name, settings, port=port, queue_options=queue_options, limiter=limiter)
        self.bridge = bridge
        self._bridge_started = False
        if own_bridge:
            self.on_start(self._start_bridge)
            self.on_stop(self._close_bridge)

    async def _start_bridge(self) -> None:
        try:
            await self.bridge.start()
        except BusConnectionError as exc:
            raise BusConnectionError(f"{exc} (MEETMESH_EDGE_BIND / MEETMESH_EDGE_PORT_OFFSET)") from exc
        self._bridge_started = True
        log.info("ai service: edge nodes connect to %s (model %s)", self.bridge.endpoint,
                 getattr(self.settings, "ai_model", "?"))

    async def _close_bridge(self) -> None:
        if self._bridge_started:
            self._bridge_started = False
            await self.bridge.close()


def build(settings: ServiceSettings | None = None, *, port: int | None = None,
          bridge: EdgeBridge | None = None, transcripts: Transcripts | None = None,
          queue_options: Mapping[str, Any] | None = None) -> AiService:
    """The ai service, ready to ``run()`` (or ``start()``). ``bridge``: one the caller started and
    closes (default: the service's own at ``MEETMESH_EDGE_BIND``); ``transcripts``: where meeting chat
    comes from (default: the meeting service's REST)."""
    s = AiSettings.of(settings)
    limiter = AdaptiveLimiter(initial=s.ai_limit_initial, minimum=s.ai_limit_min, maximum=s.ai_limit_max,
                              quiet_seconds=s.ai_limit_quiet_seconds)
    own = bridge is None
    edge = bridge or EdgeBridge(s.edge_endpoint, heartbeat=s.edge_heartbeat,
                                request_timeout=s.ai_request_timeout)
    service = AiService("ai", s, limiter=limiter, bridge=edge, own_bridge=own, port=port,
                        queue_options=queue_options)
    if transcripts is None:
        meetings = MeetingClient(s, base_url=s.meeting_url)
        service.on_stop(meetings.aclose)
        transcripts = meetings
    assistant = Assistant(service, s, edge, transcripts)
    service.router = tasks.handlers(assistant)
    service.add_routes(api.routes(edge, limiter, s.ai_model))

    @service.subscribe("meeting.ended")
    async def on_meeting_ended(event: Event[Any]) -> None:
        """Queue the summary of the meeting's chat (low priority); the task posts it to the meeting."""
        await assistant.summarize_meeting_later(event.data.meeting_id, event.data.ended_by)

    return service
