"""Accounts: register, log in, profiles and roles; the user service's domain, shared by REST and tasks.

Passwords are hashed with argon2id (argon2-cffi), on a thread so a hash never stalls the event
loop. A failed login says only "invalid username or password", and takes as long for an unknown
user as for a wrong password (a dummy hash is verified), so neither the answer nor its timing tells
which part was wrong. Tokens are HS256 JWTs that `gateway.auth.verify` accepts: ``sub`` (the user
id), ``roles``, ``iat`` (to the microsecond: a revocation refuses exactly the tokens issued before
it), ``exp``, plus ``name`` (the username).

Registering never grants the admin role: an operator does (``meetmesh user grant-admin NAME``, see
`services.user.admin`), or an admin through ``PUT /users/{id}/roles``. Losing the admin role, or the
account, revokes the tokens issued before (`revocation`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from services.common import Actor, Conflict, Forbidden, NotFound, Service, Unauthorized
from services.common.errors import BadRequest
from shared.bus import new_id

from .models import User
from .revocation import revoke_tokens
from .schemas import LoginRequest, ProfileUpdate, RegisterRequest, Role, TokenOut, UserOut

ALGORITHM = "HS256"  # what gateway.auth.verify accepts
BAD_LOGIN = "invalid username or password"


def issue_token(secret: str, user: User, ttl: float) -> TokenOut:
    """A signed bearer token for ``user``, valid ``ttl`` seconds."""
    now = time.time()
    claims: dict[str, Any] = {"sub": user.id, "name": user.username, "roles": list(user.roles),
                              "iat": now, "exp": int(now + ttl)}
    return TokenOut(access_token=jwt.encode(claims, secret, algorithm=ALGORITHM),
                    expires_at=float(claims["exp"]), user=user.out())


class Accounts:
    """The user service's operations. Built with its `Service`; used once the service has started."""

    def __init__(self, service: Service) -> None:
        s = service.settings
        self.service = service
        self.hasher = PasswordHasher(time_cost=s.argon2_time_cost, memory_cost=s.argon2_memory_kib,
                                     parallelism=s.argon2_parallelism)
        self._dummy_hash: str | None = None

    async def register(self, req: RegisterRequest) -> TokenOut:
        """Create an account (role ``user``: admin is an operator's grant) and log it in."""
        key = req.username.lower()
        async with self.service.database.session() as s:
            if await s.scalar(select(User.id).where(User.username_key == key)) is not None:
                raise Conflict(f"the username {req.username!r} is taken")
        password_hash = await asyncio.to_thread(self.hasher.hash, req.password)
        roles = ["user"]
        user = User(id=new_id(), username=req.username, username_key=key, email=req.email,
                    display_name=req.display_name, password_hash=password_hash, roles=roles)
        async with self.service.database.session() as s:
            s.add(user)
            try:  # the account and its user.registered event commit together
                await self.service.stage_event(s, "user.registered", {"user_id": user.id,
                                                                      "username": user.username})
                await s.commit()
            except IntegrityError:  # registered meanwhile by someone else
                raise Conflict(f"the username {req.username!r} is taken") from None
        return self._token(user)

    async def login(self, req: LoginRequest) -> TokenOut:
        async with self.service.database.session() as s:
            user = await s.scalar(select(User).where(User.username_key == req.username.lower()))
        if user is None:
            await asyncio.to_thread(self._verify, await self._dummy(), req.password)
            raise Unauthorized(BAD_LOGIN)
        if not await asyncio.to_thread(self._verify, user.password_hash, req.password):
            raise Unauthorized(BAD_LOGIN)
        if self.hasher.check_needs_rehash(user.password_hash):  # the cost settings went up
            rehashed = await asyncio.to_thread(self.hasher.hash, req.password)
            async with self.service.database.session() as s:
                stored = await s.get(User, user.id)
                if stored is not None:
                    stored.password_hash = rehashed
                    await s.commit()
        return self._token(user)

    async def get(self, actor: Actor, user_id: str | None = None) -> UserOut:
        """A profile: the caller's own (``user_id`` None), or anyone's for an admin."""
        user_id = user_id or actor.user_id
        if user_id != actor.user_id and not actor.is_admin:
            raise Forbidden("only admins may read other users' profiles")
        async with self.service.database.session() as s:
            return (await self._user(s, user_id)).out()

    async def update_profile(self, actor: Actor, update: ProfileUpdate) -> UserOut:
        fields = update.model_dump(exclude_unset=True)
        if not fields:
            raise BadRequest("nothing to update: send email and/or display_name (null clears one)")
        async with self.service.database.session() as s:
            user = await self._user(s, actor.user_id)
            for name, value in fields.items():
                setattr(user, name, value)
            user.updated_at = time.time()
            await s.commit()
            return user.out()

    async def list_users(self, actor: Actor, *, limit: int = 100, offset: int = 0) -> list[UserOut]:
        if not actor.is_admin:
            raise Forbidden("listing users needs the admin role")
        async with self.service.database.session() as s:
            page = select(User).order_by(User.created_at, User.id).limit(limit).offset(offset)
            users = await s.scalars(page)
            return [u.out() for u in users]

    async def set_roles(self, actor: Actor, user_id: str, roles: list[Role]) -> UserOut:
        """An admin sets ``user_id``'s roles (``user`` is always kept); they apply from its next token.
        Taking a role away also refuses the tokens issued before (which still carry it)."""
        if not actor.is_admin:
            raise Forbidden("setting roles needs the admin role")
        async with self.service.database.session() as s:
            user = await self._user(s, user_id)
            before = set(user.roles)
            user.roles = sorted({"user", *roles}, key=lambda r: r != "user")
            user.updated_at = time.time()
            await s.commit()
        if before - set(user.roles):
            await revoke_tokens(self.service.redis, self.service.settings.key_prefix, user.id)
        return user.out()

    # -- helpers ----------------------------------------------------------------------------------

    def _token(self, user: User) -> TokenOut:
        s = self.service.settings
        return issue_token(s.jwt_secret, user, s.token_ttl)

    async def _user(self, session: Any, user_id: str) -> User:
        user: User | None = await session.get(User, user_id)
        if user is None:
            raise NotFound(f"no user {user_id!r}")
        return user

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return bool(self.hasher.verify(password_hash, password))
        except (VerificationError, InvalidHashError):
            return False

    async def warm(self) -> None:
        """Hash the dummy password once at start, so even the first unknown-user login takes as long."""
        await self._dummy()

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await asyncio.to_thread(self.hasher.hash, "not the password of anyone")
        return self._dummy_hash
