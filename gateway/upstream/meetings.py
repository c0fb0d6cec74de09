"""The meeting service's routes: meetings, their participants and their chat."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Body, Path, Query, Request, Response
from pydantic import BaseModel

from services.meeting.schemas import (
    CHAT_PAGE_MAX,
    ChatMessageOut,
    ChatPage,
    ChatPost,
    KickRequest,
    MeetingCreate,
    MeetingOut,
    Target,
)

from ..auth import Principal, User
from .common import errors
from .common import proxy as _proxy

router = APIRouter(prefix="/api/v1", responses=errors(400, 503))
MeetingId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
MEETING = errors(401, 403, 404, 409)


@router.post("/meetings", status_code=201, response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def create_meeting(
    request: Request, principal: User, body: Annotated[MeetingCreate | None, Body()] = None
) -> Response:
    """Create a meeting (``{title?}``): you host it and are its first participant."""
    return await _proxy(request).call("meeting", "POST", "/meetings", principal, body=body or MeetingCreate())


@router.get("/meetings", response_model=list[MeetingOut], tags=["meetings"], responses=errors(401))
async def my_meetings(
    request: Request,
    principal: User,
    status: Literal["active", "ended"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Response:
    """The meetings you host or are in now, newest first."""
    return await _proxy(request).call(
        "meeting", "GET", "/meetings", principal, params={"status": status, "limit": limit}
    )


@router.get("/meetings/{meeting_id}", response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def get_meeting(request: Request, principal: User, meeting_id: MeetingId) -> Response:
    """A meeting and who is in it now (its participants, past and present, its host and admins)."""
    return await _proxy(request).call("meeting", "GET", f"/meetings/{meeting_id}", principal)


async def _act(
    request: Request, principal: Principal, meeting_id: str, action: str, body: BaseModel | None = None
) -> Response:
    return await _proxy(request).call(
        "meeting", "POST", f"/meetings/{meeting_id}/{action}", principal, body=body
    )


@router.post("/meetings/{meeting_id}/join", response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def join_meeting(request: Request, principal: User, meeting_id: MeetingId) -> Response:
    """Join an active meeting (again, after leaving; not after being removed). Then subscribe to
    ``meeting.<id>`` on the WebSocket for its live updates."""
    return await _act(request, principal, meeting_id, "join")


@router.post("/meetings/{meeting_id}/leave", response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def leave_meeting(request: Request, principal: User, meeting_id: MeetingId) -> Response:
    return await _act(request, principal, meeting_id, "leave")


@router.post("/meetings/{meeting_id}/end", response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def end_meeting(request: Request, principal: User, meeting_id: MeetingId) -> Response:
    """End the meeting (the host, or an admin)."""
    return await _act(request, principal, meeting_id, "end")


@router.post("/meetings/{meeting_id}/mute", response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def mute(
    request: Request, principal: User, meeting_id: MeetingId, body: Annotated[Target | None, Body()] = None
) -> Response:
    """Mute yourself, or (the host) another participant: ``{user_id}``."""
    return await _act(request, principal, meeting_id, "mute", body)


@router.post("/meetings/{meeting_id}/unmute", response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def unmute(
    request: Request, principal: User, meeting_id: MeetingId, body: Annotated[Target | None, Body()] = None
) -> Response:
    """Unmute yourself, or (the host) another participant: ``{user_id}``."""
    return await _act(request, principal, meeting_id, "unmute", body)


@router.post("/meetings/{meeting_id}/kick", response_model=MeetingOut, tags=["meetings"], responses=MEETING)
async def kick(request: Request, principal: User, meeting_id: MeetingId, body: KickRequest) -> Response:
    """Remove a participant (the host, or an admin); they may not rejoin."""
    return await _act(request, principal, meeting_id, "kick", body)


@router.post(
    "/meetings/{meeting_id}/chat",
    status_code=201,
    response_model=ChatMessageOut,
    tags=["meetings"],
    responses=MEETING,
)
async def post_chat(request: Request, principal: User, meeting_id: MeetingId, body: ChatPost) -> Response:
    """Say something in the meeting (participants): stored, and sent live on ``meeting.<id>`` as
    the event ``meeting.chat``."""
    return await _act(request, principal, meeting_id, "chat", body)


@router.get("/meetings/{meeting_id}/chat", response_model=ChatPage, tags=["meetings"], responses=MEETING)
async def read_chat(
    request: Request,
    principal: User,
    meeting_id: MeetingId,
    after: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=CHAT_PAGE_MAX)] = 100,
) -> Response:
    """The meeting's chat in order; page with ``after=next_after``."""
    return await _proxy(request).call(
        "meeting", "GET", f"/meetings/{meeting_id}/chat", principal, params={"after": after, "limit": limit}
    )
