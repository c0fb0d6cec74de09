"""The meeting service's task handlers (queue ``meeting``): the same operations as its REST.

The meeting is the message's ``meeting_id`` (or ``meeting_id`` in the payload); the actor is the
submitting user (the message's owner), with the ``user`` role. Each answers the meeting as its
result; bad data, a missing meeting or a forbidden move is rejected with the reason (dead-lettered).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from services.common import actor, payload, task
from shared.bus import Context, Reject, Router

from .meetings import Meetings
from .schemas import KickRequest, MeetingCreate, MeetingId, NoFields, Target


class _Meeting(BaseModel):
    meeting_id: MeetingId


def meeting_of(ctx: Context) -> str:
    """The meeting a task is for: the message's ``meeting_id``, or the payload's (they must agree)."""
    given = ctx.payload.get("meeting_id") if isinstance(ctx.payload, dict) else None
    meeting_id = ctx.message.meeting_id or given
    if given is not None and ctx.message.meeting_id is not None and given != ctx.message.meeting_id:
        raise Reject("bad_request: the payload's meeting_id differs from the task's meeting_id")
    if meeting_id is None:
        raise Reject(f"bad_request: {ctx.message.type} needs a meeting_id (the task's, or in its data)")
    try:
        return _Meeting(meeting_id=meeting_id).meeting_id
    except ValueError:
        raise Reject(f"bad_request: invalid meeting_id {meeting_id!r}") from None


def handlers(meetings: Meetings) -> Router:
    router = Router()

    def out(meeting: BaseModel) -> dict[str, Any]:
        return meeting.model_dump(mode="json")

    @router.handler("meeting.create")
    @task
    async def create(ctx: Context) -> dict[str, Any]:
        """``{title?}`` -> the new meeting (the submitter hosts it)."""
        body = payload(MeetingCreate, ctx)
        return out(await meetings.create(actor(ctx), body.title))

    @router.handler("meeting.join")
    @task
    async def join(ctx: Context) -> dict[str, Any]:
        payload(NoFields, ctx, drop=("meeting_id",))
        return out(await meetings.join(actor(ctx), meeting_of(ctx)))

    @router.handler("meeting.leave")
    @task
    async def leave(ctx: Context) -> dict[str, Any]:
        payload(NoFields, ctx, drop=("meeting_id",))
        return out(await meetings.leave(actor(ctx), meeting_of(ctx)))

    @router.handler("meeting.end")
    @task
    async def end(ctx: Context) -> dict[str, Any]:
        payload(NoFields, ctx, drop=("meeting_id",))
        return out(await meetings.end(actor(ctx), meeting_of(ctx)))

    @router.handler("meeting.mute")
    @task
    async def mute(ctx: Context) -> dict[str, Any]:
        """``{user_id?}``: yourself, or (as the host) another participant."""
        body = payload(Target, ctx, drop=("meeting_id",))
        return out(await meetings.mute(actor(ctx), meeting_of(ctx), body.user_id, True))

    @router.handler("meeting.unmute")
    @task
    async def unmute(ctx: Context) -> dict[str, Any]:
        body = payload(Target, ctx, drop=("meeting_id",))
        return out(await meetings.mute(actor(ctx), meeting_of(ctx), body.user_id, False))

    @router.handler("meeting.kick")
    @task
    async def kick(ctx: Context) -> dict[str, Any]:
        """``{user_id}``: the host removes a participant."""
        body = payload(KickRequest, ctx, drop=("meeting_id",))
        return out(await meetings.kick(actor(ctx), meeting_of(ctx), body.user_id))

    return router
