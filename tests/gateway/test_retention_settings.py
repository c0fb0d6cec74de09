"""The gateway's queues keep finished records as the settings say (MEETMESH_*_TTL)."""

from __future__ import annotations

from gateway import create_app
from gateway.settings import GatewaySettings


async def test_the_dispatchers_queues_take_the_retention_settings(settings: GatewaySettings) -> None:
    settings = settings.model_copy(update={"completed_ttl": 60.0, "cancelled_ttl": 120.0,
                                           "dead_letter_ttl": 180.0})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        queues = app.state.dispatcher.queues
        assert queues
        for queue in queues.values():
            assert (queue.completed_ttl, queue.cancelled_ttl, queue.dead_letter_ttl) == (60, 120, 180)
