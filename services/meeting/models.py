"""The meeting service's tables (its own `MetaData`: services share the store, not tables)."""

from __future__ import annotations

import time

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.bus import new_id

ACTIVE, ENDED = "active", "ended"


class Base(DeclarativeBase):
    pass


class Meeting(Base):
    __tablename__ = "meetings"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    title: Mapped[str] = mapped_column(String(200), default="")
    host_id: Mapped[str] = mapped_column(String(256), index=True)
    status: Mapped[str] = mapped_column(String(16), default=ACTIVE, index=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    ended_at: Mapped[float | None] = mapped_column(Float)
    ended_by: Mapped[str | None] = mapped_column(String(256))


class Participant(Base):
    """One user's place in one meeting. ``left_at`` is null while they are in it; a kicked
    participant keeps the row (``kicked``) and may not rejoin."""

    __tablename__ = "meeting_participants"

    meeting_id: Mapped[str] = mapped_column(ForeignKey("meetings.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(256), primary_key=True, index=True)
    joined_at: Mapped[float] = mapped_column(Float, default=time.time)
    left_at: Mapped[float | None] = mapped_column(Float)
    muted: Mapped[bool] = mapped_column(Boolean, default=False)
    kicked: Mapped[bool] = mapped_column(Boolean, default=False)


class ChatMessage(Base):
    __tablename__ = "meeting_chat"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    meeting_id: Mapped[str] = mapped_column(ForeignKey("meetings.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(String(256))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class KnownUser(Base):
    """Usernames learnt from ``user.registered`` events, to label participants and chat."""

    __tablename__ = "meeting_known_users"

    user_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    username: Mapped[str] = mapped_column(String(64))
