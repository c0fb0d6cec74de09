"""Meetings: create, join, leave, end, mute, kick, chat; the meeting service's domain, shared by its
REST and its ``meeting.*`` tasks.

Every change runs in one transaction holding the meeting's row lock (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite serialises writers anyway), which also stages its durable catalogue event in the
service's outbox (published by the relay once committed: a crash cannot lose it, and one meeting's
events go out in the order of its changes); then, once committed: the participant set in Redis
(`presence`) and the live update on ``meeting.<id>`` (``{"event", "data"}``, best effort). A request
that changes nothing (joining twice, muting the muted) announces nothing.

Who may do what: anyone signed in creates a meeting (becoming its host and first participant) and
joins an active one by id, unless the host removed them. Participants leave, mute and unmute
themselves, and chat. The host (or an admin) also mutes and unmutes others, removes (kicks) anyone
but the host, and ends the meeting. Participants, past and present, the host and admins read the
meeting and its chat; so do other services (role ``service``).

To anyone else (never in it, or removed by the host) an existing meeting answers exactly as a missing
one, 404 ``no meeting <id>``, whatever they ask, so meeting ids cannot be probed; tasks and media do
the same. Only ``join`` acts on a meeting the caller is not in: an active meeting's id is its
invitation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.common import Actor, BadRequest, Conflict, Forbidden, NotFound, Service
from shared.bus import new_id

from .models import ACTIVE, ENDED, ChatMessage, KnownUser, Meeting, Participant
from .presence import Presence
from .schemas import CHAT_PAGE_MAX, ChatMessageOut, ChatPage, MeetingOut, ParticipantOut

PRESENCE_SYNC_BATCH = 500


def topic(meeting_id: str) -> str:
    """The broadcast topic of a meeting's live updates."""
    return f"meeting.{meeting_id}"


class Meetings:
    """The meeting service's operations. Built with its `Service`; used once the service has started."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._presence: Presence | None = None

    @property
    def presence(self) -> Presence:
        if self._presence is None:
            self._presence = Presence(self.service.redis, self.service.settings.key_prefix)
        return self._presence

    # -- the meeting ------------------------------------------------------------------------------

    async def create(self, actor: Actor, title: str = "") -> MeetingOut:
        now = time.time()
        meeting = Meeting(id=new_id(), title=title, host_id=actor.user_id, status=ACTIVE, created_at=now)
        async with self.service.database.session() as s:
            s.add(meeting)
            await s.flush()  # the meeting's row first: the participant refers to it
            s.add(Participant(meeting_id=meeting.id, user_id=actor.user_id, joined_at=now))
            await self.service.stage_event(s, "meeting.created", {"meeting_id": meeting.id,
                                                                  "host_id": actor.user_id, "title": title})
            joined = {"meeting_id": meeting.id, "user_id": actor.user_id}
            await self.service.stage_event(s, "meeting.user_joined", joined)
            await s.commit()
            out = await self._out(s, meeting)
        await self.presence.add(meeting.id, actor.user_id)
        await self._live(meeting.id, "meeting.user_joined", joined)
        return out

    async def get(self, actor: Actor, meeting_id: str) -> MeetingOut:
        async with self.service.database.session() as s:
            meeting = await self._meeting(s, actor, meeting_id)
            return await self._out(s, meeting)

    async def mine(self, actor: Actor, status: str | None = None, limit: int = 100) -> list[MeetingOut]:
        """The meetings the caller hosts or is in now, newest first."""
        inside = select(Participant.meeting_id).where(Participant.user_id == actor.user_id,
                                                      Participant.left_at.is_(None))
        query = select(Meeting).where(or_(Meeting.host_id == actor.user_id, Meeting.id.in_(inside)))
        if status is not None:
            query = query.where(Meeting.status == status)
        async with self.service.database.session() as s:
            meetings = await s.scalars(query.order_by(Meeting.created_at.desc(), Meeting.id).limit(limit))
            return [await self._out(s, m) for m in meetings]

    async def join(self, actor: Actor, meeting_id: str) -> MeetingOut:
        async with self.service.database.session() as s:
            meeting = await self._meeting(s, None, meeting_id, lock=True)
            p = await s.get(Participant, (meeting_id, actor.user_id))
            if meeting.status != ACTIVE:   # past its end only those who may see it learn it existed
                await self._must_see(s, actor, meeting)
                raise Conflict(f"meeting {meeting_id!r} has ended")
            changed = True
            if p is None:
                s.add(Participant(meeting_id=meeting_id, user_id=actor.user_id, joined_at=time.time()))
            elif p.kicked:
                raise Forbidden("the host removed you from this meeting")
            elif p.left_at is not None:
                p.left_at, p.joined_at, p.muted = None, time.time(), False
            else:
                changed = False
            joined = {"meeting_id": meeting_id, "user_id": actor.user_id}
            if changed:
                await self.service.stage_event(s, "meeting.user_joined", joined)
            await s.commit()
            out = await self._out(s, meeting)
        if changed:
            await self.presence.add(meeting_id, actor.user_id)
            await self._live(meeting_id, "meeting.user_joined", joined)
        return out

    async def leave(self, actor: Actor, meeting_id: str) -> MeetingOut:
        async with self.service.database.session() as s:
            meeting = await self._active(s, actor, meeting_id)
            p = await self._inside(s, meeting_id, actor.user_id, "you are not in this meeting")
            p.left_at = time.time()
            left = {"meeting_id": meeting_id, "user_id": actor.user_id, "kicked": False}
            await self.service.stage_event(s, "meeting.user_left", left)
            await s.commit()
            out = await self._out(s, meeting)
        await self.presence.remove(meeting_id, actor.user_id)
        await self._live(meeting_id, "meeting.user_left", left)
        return out

    async def end(self, actor: Actor, meeting_id: str) -> MeetingOut:
        async with self.service.database.session() as s:
            meeting = await self._active(s, actor, meeting_id)
            self._must_host(actor, meeting, "end the meeting")
            now = time.time()
            meeting.status, meeting.ended_at, meeting.ended_by = ENDED, now, actor.user_id
            for p in await s.scalars(self._present(meeting_id)):
                p.left_at = now
            ended = {"meeting_id": meeting_id, "ended_by": actor.user_id}
            await self.service.stage_event(s, "meeting.ended", ended)
            await s.commit()
            out = await self._out(s, meeting)
        await self.presence.clear(meeting_id)
        await self._live(meeting_id, "meeting.ended", ended)
        return out

    async def mute(self, actor: Actor, meeting_id: str, user_id: str | None, muted: bool) -> MeetingOut:
        """Mute (or unmute) ``user_id``, or the caller when None; others only as the host."""
        target = user_id or actor.user_id
        async with self.service.database.session() as s:
            meeting = await self._active(s, actor, meeting_id)
            if target != actor.user_id:
                self._must_host(actor, meeting, f"{'mute' if muted else 'unmute'} others")
                p = await self._inside(s, meeting_id, target, f"user {target!r} is not in this meeting")
            else:
                p = await self._inside(s, meeting_id, target, "you are not in this meeting")
            changed = p.muted != muted
            p.muted = muted
            change = {"meeting_id": meeting_id, "user_id": target, "muted": muted, "by": actor.user_id}
            if changed:
                await self.service.stage_event(s, "meeting.muted", change)
            await s.commit()
            out = await self._out(s, meeting)
        if changed:
            await self._live(meeting_id, "meeting.muted", change)
        return out

    async def kick(self, actor: Actor, meeting_id: str, user_id: str) -> MeetingOut:
        async with self.service.database.session() as s:
            meeting = await self._active(s, actor, meeting_id)
            self._must_host(actor, meeting, "remove participants")
            if user_id == meeting.host_id:
                raise BadRequest("the host cannot be removed; end the meeting instead")
            p = await self._inside(s, meeting_id, user_id, f"user {user_id!r} is not in this meeting")
            p.left_at, p.kicked = time.time(), True
            left = {"meeting_id": meeting_id, "user_id": user_id, "kicked": True}
            await self.service.stage_event(s, "meeting.user_left", left)
            await s.commit()
            out = await self._out(s, meeting)
        await self.presence.remove(meeting_id, user_id)
        await self._live(meeting_id, "meeting.user_left", left)
        return out

    # -- chat -------------------------------------------------------------------------------------

    async def post_chat(self, actor: Actor, meeting_id: str, text: str) -> ChatMessageOut:
        """Store a message from a participant and send it live on ``meeting.<id>`` as ``meeting.chat``."""
        async with self.service.database.session() as s:
            await self._active(s, actor, meeting_id)
            await self._inside(s, meeting_id, actor.user_id, "only participants in the meeting may chat",
                               error=Forbidden)
            message = ChatMessage(meeting_id=meeting_id, user_id=actor.user_id, text=text,
                                  created_at=time.time())
            s.add(message)
            await s.commit()
            out = ChatMessageOut(id=message.id, meeting_id=meeting_id, user_id=actor.user_id,
                                 username=await s.scalar(select(KnownUser.username).where(
                                     KnownUser.user_id == actor.user_id)),
                                 text=text, created_at=message.created_at)
        await self._live(meeting_id, "meeting.chat", out.model_dump(mode="json"))
        return out

    async def chat(self, actor: Actor, meeting_id: str, *, after: int | None = None,
                   limit: int = 100) -> ChatPage:
        """The meeting's messages in order, ``limit`` (up to 500) after the id ``after``."""
        limit = max(1, min(limit, CHAT_PAGE_MAX))
        async with self.service.database.session() as s:
            await self._meeting(s, actor, meeting_id)
            query = (select(ChatMessage, KnownUser.username)
                     .outerjoin(KnownUser, KnownUser.user_id == ChatMessage.user_id)
                     .where(ChatMessage.meeting_id == meeting_id))
            if after is not None:
                query = query.where(ChatMessage.id > after)
            rows = (await s.execute(query.order_by(ChatMessage.id).limit(limit + 1))).all()
        messages = [ChatMessageOut(id=m.id, meeting_id=m.meeting_id, user_id=m.user_id, username=name,
                                   text=m.text, created_at=m.created_at) for m, name in rows[:limit]]
        more = len(rows) > limit
        return ChatPage(messages=messages, next_after=messages[-1].id if more else None)

    # -- from other services ----------------------------------------------------------------------

    async def remember_user(self, user_id: str, username: str) -> None:
        """A ``user.registered`` event: keep the username to label participants and chat."""
        async with self.service.database.session() as s:
            known = await s.get(KnownUser, user_id)
            if known is None:
                s.add(KnownUser(user_id=user_id, username=username))
            else:
                known.username = username
            try:
                await s.commit()
            except IntegrityError:  # another replica stored it meanwhile
                await s.rollback()

    async def sync_presence(self) -> int:
        """Rewrite every active meeting's participant set in Redis from the store (at start: Redis may
        have lost them). Returns how many meetings were synced."""
        synced, last = 0, ""
        while True:
            async with self.service.database.session() as s:
                batch = (select(Meeting.id).where(Meeting.status == ACTIVE, Meeting.id > last)
                         .order_by(Meeting.id).limit(PRESENCE_SYNC_BATCH))
                ids = list(await s.scalars(batch))
                inside: dict[str, list[str]] = {i: [] for i in ids}
                if ids:
                    rows = await s.execute(select(Participant.meeting_id, Participant.user_id).where(
                        Participant.meeting_id.in_(ids), Participant.left_at.is_(None)))
                    for meeting_id, user_id in rows.all():
                        inside[meeting_id].append(user_id)
            for meeting_id, users in inside.items():
                await self.presence.replace(meeting_id, users)
            synced += len(ids)
            if len(ids) < PRESENCE_SYNC_BATCH:
                return synced
            last = ids[-1]

    # -- helpers ----------------------------------------------------------------------------------

    async def _live(self, meeting_id: str, event: str, data: dict[str, Any]) -> None:
        """The live update on ``meeting.<id>``, once the change (and its staged event) committed."""
        await self.service.broadcast(topic(meeting_id), event, data)

    async def _meeting(self, s: AsyncSession, actor: Actor | None, meeting_id: str, *,
                       lock: bool = False) -> Meeting:
        """The meeting, if ``actor`` may see it (None: unchecked); `NotFound` alike if missing or not."""
        query = select(Meeting).where(Meeting.id == meeting_id)
        meeting = await s.scalar(query.with_for_update() if lock else query)
        if meeting is None:
            raise NotFound(f"no meeting {meeting_id!r}")
        if actor is not None:
            await self._must_see(s, actor, meeting)
        return meeting

    async def _active(self, s: AsyncSession, actor: Actor, meeting_id: str) -> Meeting:
        """The meeting ``actor`` may see, locked for this transaction; `Conflict` once it has ended."""
        meeting = await self._meeting(s, actor, meeting_id, lock=True)
        if meeting.status != ACTIVE:
            raise Conflict(f"meeting {meeting_id!r} has ended")
        return meeting

    @staticmethod
    def _present(meeting_id: str) -> Select[Participant]:
        return select(Participant).where(Participant.meeting_id == meeting_id, Participant.left_at.is_(None))

    async def _inside(self, s: AsyncSession, meeting_id: str, user_id: str, message: str,
                      error: type[Forbidden] | type[NotFound] = NotFound) -> Participant:
        p = await s.get(Participant, (meeting_id, user_id))
        if p is None or p.left_at is not None:
            raise error(message)
        return p

    @staticmethod
    def _must_host(actor: Actor, meeting: Meeting, what: str) -> None:
        if actor.user_id != meeting.host_id and not actor.is_admin:
            raise Forbidden(f"only the host may {what}")

    async def _must_see(self, s: AsyncSession, actor: Actor, meeting: Meeting) -> None:
        """`NotFound`, as for a missing meeting, unless ``actor`` is its host, a participant (past or
        present, not removed), an admin or a service."""
        if actor.user_id == meeting.host_id or actor.is_admin or actor.is_service:
            return
        p = await s.get(Participant, (meeting.id, actor.user_id))
        if p is None or p.kicked:
            raise NotFound(f"no meeting {meeting.id!r}")

    async def _out(self, s: AsyncSession, meeting: Meeting) -> MeetingOut:
        rows: Sequence[Any] = (await s.execute(
            select(Participant, KnownUser.username)
            .outerjoin(KnownUser, KnownUser.user_id == Participant.user_id)
            .where(Participant.meeting_id == meeting.id, Participant.left_at.is_(None))
            .order_by(Participant.joined_at, Participant.user_id))).all()
        return MeetingOut(
            id=meeting.id, title=meeting.title, host_id=meeting.host_id,
            status="ended" if meeting.status == ENDED else "active",
            created_at=meeting.created_at, ended_at=meeting.ended_at, ended_by=meeting.ended_by,
            participants=[ParticipantOut(user_id=p.user_id, username=name, joined_at=p.joined_at,
                                         muted=p.muted, host=p.user_id == meeting.host_id)
                          for p, name in rows])
