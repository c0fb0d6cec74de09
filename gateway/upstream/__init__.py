"""The services' REST under /api/v1, proxied: accounts (user service), meetings (meeting service) and
media (media service: uploads streamed through, covers passed back as JPEG).

Each route is declared here with the service's own request and response models (so the gateway's
OpenAPI document shows them and bad input is refused here, 400, before any hop), verifies the
bearer token locally (no round trip), and forwards the request with httpx to the service's port,
adding the caller in ``X-MeetMesh-User`` / ``X-MeetMesh-Roles`` and the gateway key
(`services.common.identity`). The service's answer, success or JSON error, is passed through; a
service that cannot be reached (or fails) answers 503 ``unavailable``.

Where each service is: ``MEETMESH_USER_URL`` / ``MEETMESH_MEETING_URL`` / ``MEETMESH_MEDIA_URL``, by
default ``http://127.0.0.1:<MEETMESH_USER_PORT or 8101>``, ``<MEETMESH_MEETING_PORT or 8102>`` and
``<MEETMESH_MEDIA_PORT or 8103>``.

Here: `install`. The proxy is in `proxy`, each service's routes in `users`, `meetings` and `media`
(the answers they share in `common`), and in `authz` `may_follow`, the WebSocket's check that only a
meeting's participants (and admins) subscribe to ``meeting.<id>``, read from the participant sets the
meeting service keeps in Redis.
"""

from __future__ import annotations

from fastapi import FastAPI

from ..settings import GatewaySettings
from . import media, meetings, users
from .authz import may_follow
from .proxy import ServiceProxy, ServiceUrls

__all__ = ["ServiceProxy", "ServiceUrls", "install", "may_follow"]


def install(app: FastAPI, settings: GatewaySettings) -> None:
    """Serve the services' REST on ``app`` (the proxy is ``app.state.services``)."""
    app.include_router(users.router)
    app.include_router(meetings.router)
    app.include_router(media.router)
    urls = ServiceUrls()
    app.state.services = ServiceProxy(urls.urls(), settings.jwt_secret)
    app.state.media_max_bytes = urls.media_max_bytes  # media
