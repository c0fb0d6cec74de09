"""The meeting service's request and response bodies, shared by its REST, its tasks (the payloads of
``meeting.*``) and the gateway (whose OpenAPI document shows them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

UserId = Annotated[str, Field(min_length=1, max_length=256)]
CHAT_PAGE_MAX = 500


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MeetingCreate(Strict):
    """A new meeting; its creator is the host and its first participant. Payload of ``meeting.create``."""

    title: str = Field(default="", max_length=200)


class NoFields(Strict):
    """The payload of ``meeting.join``, ``meeting.leave`` and ``meeting.end`` (besides ``meeting_id``)."""


class Target(Strict):
    """Whom to mute or unmute: yourself when absent; another participant only as the host."""

    user_id: UserId | None = None


class KickRequest(Strict):
    """The participant the host removes (who may not rejoin)."""

    user_id: UserId


class ChatPost(Strict):
    text: str = Field(min_length=1, max_length=4000)


class ParticipantOut(BaseModel):
    user_id: str
    username: str | None = Field(default=None, description="from user.registered events, when seen")
    joined_at: float = Field(description="Unix time")
    muted: bool = False
    host: bool = False


class MeetingOut(BaseModel):
    id: str
    title: str
    host_id: str
    status: Literal["active", "ended"]
    created_at: float = Field(description="Unix time")
    ended_at: float | None = None
    ended_by: str | None = None
    participants: list[ParticipantOut] = Field(description="who is in the meeting now")


class ChatMessageOut(BaseModel):
    """One chat message; also the data of the live ``meeting.chat`` event on ``meeting.<id>``."""

    id: int
    meeting_id: str
    user_id: str
    username: str | None = None
    text: str
    created_at: float = Field(description="Unix time")


class ChatPage(BaseModel):
    """Messages in order; ask again with ``after=next_after`` while it is not null."""

    messages: list[ChatMessageOut]
    next_after: int | None = None
