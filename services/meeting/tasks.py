"""The meeting service's task handlers (queue ``meeting``): the same operations as its REST.

The meeting is the message's ``meeting_id`` (or ``meeting_id`` in the payload); the actor is the
submitting user (the message's owner), with the ``user`` role. Each answers the meeting as its
result; bad data, a missing meeting or a forbidden move is rejected with the reason (dead-lettered).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from services.common import actor, meeting_of, payload, task
from shared.bus import Context, Router

from .meetings import Meetings
from .schemas import KickRequest, MeetingCreate, NoFields, Target


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
