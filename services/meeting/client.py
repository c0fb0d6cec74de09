"""Another service reading the meeting service over HTTP, as itself (role ``service``).

How the ai service gets a meeting's chat to summarise on ``meeting.ended``: the event carries only
the meeting id (the catalogue's `MeetingEnded`), and ai reads the transcript here, page by page.
A transcript can be far larger than an event should be (the bus caps messages at 1 MiB), and
reading it at summary time needs no copy of the chat anywhere else::

    async with MeetingClient(settings) as meetings:
        lines = await meetings.transcript(event.data.meeting_id)
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx

from services.common import (
    Actor,
    Conflict,
    Forbidden,
    NotFound,
    ServiceError,
    ServiceSettings,
    Unauthorized,
    Unavailable,
    identity_headers,
)
from services.common.identity import SERVICE

from .schemas import CHAT_PAGE_MAX, ChatMessageOut, ChatPage, MeetingOut

_ERRORS: dict[int, type[ServiceError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict}


class MeetingClient:
    """Reads meetings and their chat. ``base_url`` defaults to ``http://<host>:MEETMESH_MEETING_PORT``;
    ``caller`` names the reading service (as the user id the meeting service sees)."""

    def __init__(self, settings: ServiceSettings, *, base_url: str | None = None, caller: str = "ai",
                 timeout: float = 10.0) -> None:
        self.base_url = base_url or f"http://{settings.service_host}:{settings.meeting_port}"
        headers = identity_headers(settings.jwt_secret, Actor(f"service:{caller}", frozenset({SERVICE})))
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def get(self, meeting_id: str) -> MeetingOut:
        return MeetingOut.model_validate(await self._get(f"/meetings/{meeting_id}"))

    async def chat(self, meeting_id: str, *, after: int | None = None,
                   limit: int = CHAT_PAGE_MAX) -> ChatPage:
        params: dict[str, Any] = {"limit": limit} | ({"after": after} if after is not None else {})
        return ChatPage.model_validate(await self._get(f"/meetings/{meeting_id}/chat", params))

    async def transcript(self, meeting_id: str, *, max_messages: int = 10_000) -> list[ChatMessageOut]:
        """The meeting's chat in order, up to ``max_messages`` (the earliest ones)."""
        messages: list[ChatMessageOut] = []
        after: int | None = None
        while len(messages) < max_messages:
            limit = min(CHAT_PAGE_MAX, max_messages - len(messages))
            page = await self.chat(meeting_id, after=after, limit=limit)
            messages.extend(page.messages)
            if page.next_after is None:
                break
            after = page.next_after
        return messages

    async def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        try:
            response = await self._http.get(path, params=params)
        except httpx.TransportError as exc:
            raise Unavailable(f"the meeting service at {self.base_url} is unreachable: {exc!r}") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            fallback = Unavailable if response.status_code >= 500 else ServiceError
            error = _ERRORS.get(response.status_code, fallback)
            raise error(f"meeting service: {message}")
        return response.json()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> MeetingClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
