"""The user service's tables (its own `MetaData`: services share the store, not tables)."""

from __future__ import annotations

import time

from sqlalchemy import JSON, Float, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.bus import new_id

from .schemas import UserOut


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    username: Mapped[str] = mapped_column(String(32))
    # lower-cased: "Alice" and "alice" are one account name
    username_key: Mapped[str] = mapped_column(String(32), unique=True)
    email: Mapped[str | None] = mapped_column(String(254))
    display_name: Mapped[str | None] = mapped_column(String(100))
    password_hash: Mapped[str] = mapped_column(String(256))
    roles: Mapped[list[str]] = mapped_column(JSON, default=lambda: ["user"])
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)

    def out(self) -> UserOut:
        return UserOut(id=self.id, username=self.username, email=self.email, display_name=self.display_name,
                       roles=list(self.roles), created_at=self.created_at, updated_at=self.updated_at)
