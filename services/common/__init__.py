"""What every MeetMesh service shares: settings, the SQL store, caller identity, errors, task
helpers, and the `Service` runner (queue worker + events + REST, graceful on SIGTERM)."""

from .db import Database, async_url
from .errors import BadRequest, Conflict, Forbidden, NotFound, ServiceError, Unauthorized, Unavailable
from .identity import Actor, Caller, Gateway, gateway_key, identity_headers
from .service import Service
from .settings import ServiceSettings
from .tasks import MeetingId, actor, meeting_of, payload, task

__all__ = [
    "Actor",
    "BadRequest",
    "Caller",
    "Conflict",
    "Database",
    "Forbidden",
    "Gateway",
    "MeetingId",
    "NotFound",
    "Service",
    "ServiceError",
    "ServiceSettings",
    "Unauthorized",
    "Unavailable",
    "actor",
    "async_url",
    "gateway_key",
    "identity_headers",
    "meeting_of",
    "payload",
    "task",
]
