"""Who may follow what on the WebSocket, as the services decide it: a meeting's topic only for its
participants (and admins), read from the participant sets the meeting service keeps in Redis."""

from __future__ import annotations

from typing import Any

from services.common import ServiceError
from services.meeting.presence import Presence

from ..auth import Principal
from ..errors import ApiError


async def may_follow(state: Any, principal: Principal, topic: str) -> None:
    """`ApiError` 403 unless ``principal`` may subscribe to ``topic`` (a checked pattern): a pattern that
    could take a meeting's topic must name one meeting (``meeting.<id>``) whose participants include the
    caller; admins may follow any. Other topics are not the meeting service's to guard."""
    parts = topic.split(".")
    meetingish = parts[0] == ">" or (parts[0] in ("meeting", "*") and len(parts) > 1)
    if not meetingish or principal.is_admin:
        return
    if parts[0] != "meeting" or parts[1] in ("*", ">"):
        raise ApiError(403, "forbidden", "follow one meeting at a time, as a participant: meeting.<id>")
    try:
        inside = await Presence(state.redis, state.settings.key_prefix).contains(parts[1], principal.user)
    except ServiceError as exc:
        raise ApiError(503, "unavailable", exc.message) from None
    if not inside:
        raise ApiError(403, "forbidden", f"only the participants of meeting {parts[1]} may follow it")
