"""Operator actions on accounts, made straight on the user service's store (the service need not
run): find a user by name, grant or revoke the admin role, delete an account, and mint a token for a
registered user. ``meetmesh user ...`` and ``meetmesh token`` call these.

The store is the one the user service uses: ``MEETMESH_DATABASE_URL`` (and
``MEETMESH_DATABASE_SCHEMA``), else the SQLite file in the data folder (``MEETMESH_DATA_DIR``,
default ``./.meetmesh``: the folder ``meetmesh up`` uses). Revoking the admin role or deleting a user
also refuses the user's tokens issued before (`revocation`, in Redis at ``MEETMESH_REDIS_URL``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy import select

from services.common import Database, NotFound, ServiceSettings
from shared.bus import connect

from .accounts import issue_token
from .models import Base, User
from .revocation import revoke_tokens
from .schemas import TokenOut, UserOut

ADMIN = "admin"


@dataclass
class Change:
    """What an operator action did: the user as it is now, and whether anything changed."""

    user: UserOut
    changed: bool


class UserStore:
    """The user service's accounts, for operator tools. ``async with UserStore.open(settings) as users``."""

    def __init__(self, settings: ServiceSettings, database: Database) -> None:
        self.settings = settings
        self.database = database

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: ServiceSettings) -> AsyncIterator[UserStore]:
        database = Database(settings.database, schema=settings.database_schema)
        try:
            await database.create_all(Base.metadata)   # an empty store has no users (rather than no table)
            yield cls(settings, database)
        finally:
            await database.dispose()

    async def find(self, name: str) -> User:
        """The user registered as ``name`` (any case); `NotFound` saying where it looked."""
        async with self.database.session() as s:
            user = await s.scalar(select(User).where(User.username_key == name.lower()))
        if user is None:
            raise NotFound(f"no user named {name!r} in {self.database!r}: register it first "
                           "(POST /api/v1/auth/register)")
        return user

    async def set_admin(self, name: str, admin: bool) -> Change:
        """Grant (or revoke) the admin role; revoking also refuses the tokens that carry it."""
        found = await self.find(name)
        async with self.database.session() as s:
            user = await s.get(User, found.id)
            if user is None:
                raise NotFound(f"no user named {name!r}: deleted meanwhile")
            roles = [r for r in user.roles if r != ADMIN] + ([ADMIN] if admin else [])
            changed = roles != list(user.roles)
            if changed:
                user.roles, user.updated_at = roles, time.time()
                await s.commit()
        if changed and not admin:
            await self._revoke(user.id)
        return Change(user.out(), changed)

    async def delete(self, name: str) -> UserOut:
        """Delete the account; its tokens are refused from now on."""
        found = await self.find(name)
        async with self.database.session() as s:
            user = await s.get(User, found.id)
            if user is None:
                raise NotFound(f"no user named {name!r}: deleted meanwhile")
            await s.delete(user)
            await s.commit()
        await self._revoke(found.id)
        return found.out()

    async def token(self, name: str, *, ttl: float | None = None) -> TokenOut:
        """A token for the registered user ``name``, with the roles the store gives it."""
        user = await self.find(name)
        return issue_token(self.settings.jwt_secret, user, ttl or self.settings.token_ttl)

    async def _revoke(self, user_id: str) -> None:
        redis = await connect(self.settings.redis_url)
        try:
            await revoke_tokens(redis, self.settings.key_prefix, user_id)
        finally:
            await redis.aclose()
