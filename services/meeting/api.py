"""The meeting service's REST (the gateway serves it under ``/api/v1``, same paths)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Body, Path, Query

from services.common import Caller

from .meetings import Meetings
from .schemas import (
    CHAT_PAGE_MAX,
    ChatMessageOut,
    ChatPage,
    ChatPost,
    KickRequest,
    MeetingCreate,
    MeetingOut,
    Target,
)

MeetingPath = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
OptionalTarget = Annotated[Target | None, Body()]


def routes(meetings: Meetings) -> APIRouter:
    router = APIRouter(prefix="/meetings", tags=["meetings"])

    @router.post("", status_code=201)
    async def create(actor: Caller, body: Annotated[MeetingCreate | None, Body()] = None) -> MeetingOut:
        return await meetings.create(actor, body.title if body else "")

    @router.get("")
    async def mine(actor: Caller, status: Literal["active", "ended"] | None = None,
                   limit: Annotated[int, Query(ge=1, le=500)] = 100) -> list[MeetingOut]:
        return await meetings.mine(actor, status, limit)

    @router.get("/{meeting_id}")
    async def get(actor: Caller, meeting_id: MeetingPath) -> MeetingOut:
        return await meetings.get(actor, meeting_id)

    @router.post("/{meeting_id}/join")
    async def join(actor: Caller, meeting_id: MeetingPath) -> MeetingOut:
        return await meetings.join(actor, meeting_id)

    @router.post("/{meeting_id}/leave")
    async def leave(actor: Caller, meeting_id: MeetingPath) -> MeetingOut:
        return await meetings.leave(actor, meeting_id)

    @router.post("/{meeting_id}/end")
    async def end(actor: Caller, meeting_id: MeetingPath) -> MeetingOut:
        return await meetings.end(actor, meeting_id)

    @router.post("/{meeting_id}/mute")
    async def mute(actor: Caller, meeting_id: MeetingPath, body: OptionalTarget = None) -> MeetingOut:
        return await meetings.mute(actor, meeting_id, body.user_id if body else None, True)

    @router.post("/{meeting_id}/unmute")
    async def unmute(actor: Caller, meeting_id: MeetingPath, body: OptionalTarget = None) -> MeetingOut:
        return await meetings.mute(actor, meeting_id, body.user_id if body else None, False)

    @router.post("/{meeting_id}/kick")
    async def kick(actor: Caller, meeting_id: MeetingPath, body: KickRequest) -> MeetingOut:
        return await meetings.kick(actor, meeting_id, body.user_id)

    @router.post("/{meeting_id}/chat", status_code=201)
    async def post_chat(actor: Caller, meeting_id: MeetingPath, body: ChatPost) -> ChatMessageOut:
        return await meetings.post_chat(actor, meeting_id, body.text)

    @router.get("/{meeting_id}/chat")
    async def chat(actor: Caller, meeting_id: MeetingPath,
                   after: Annotated[int | None, Query(ge=0)] = None,
                   limit: Annotated[int, Query(ge=1, le=CHAT_PAGE_MAX)] = 100) -> ChatPage:
        return await meetings.chat(actor, meeting_id, after=after, limit=limit)

    return router
