"""Bearer tokens: HS256 JWTs carrying ``sub`` (the user) and ``roles``, signed with MEETMESH_JWT_SECRET.

`verify` checks a token locally (signature, HS256 only, ``exp``); `authenticate` also refuses the
tokens a user lost by being deleted or losing a role (`services.user.revocation`: one Redis GET per
authenticated request: one round trip, as long as a PING, 0.23 ms measured on a loaded 2-core host;
a Redis that does not answer is a 503, never a token let through unchecked).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import exceptions as redis_errors

from services.user.revocation import tokens_not_before

from .errors import ApiError

ALGORITHM = "HS256"
ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's subject and roles, and when the token was issued (``iat``)."""

    user: str
    roles: frozenset[str]
    issued_at: float = 0.0

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.roles


def mint(
    secret: str,
    user: str,
    *,
    admin: bool = False,
    ttl: float = 24 * 3600.0,
    roles: tuple[str, ...] = ("user",),
) -> str:
    """A signed token naming ``user`` as is (tests and benchmarks; users get theirs from the user
    service, operators from ``meetmesh token``, which mints only for registered users)."""
    now = time.time()
    claims: dict[str, Any] = {
        "sub": user,
        "roles": [*roles, *([ADMIN] if admin else [])],
        "iat": now,
        "exp": int(now + ttl),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str) -> Principal:
    """The token's `Principal`, or `ApiError` 401 saying why not (checked locally: no round trip)."""
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError:
        raise ApiError(401, "unauthorized", "the token has expired") from None
    except jwt.InvalidTokenError as exc:
        raise ApiError(401, "unauthorized", f"invalid token: {exc}") from None
    sub, roles, issued = claims.get("sub"), claims.get("roles", []), claims.get("iat", 0.0)
    if not isinstance(sub, str) or not sub or not isinstance(roles, list):
        raise ApiError(401, "unauthorized", "invalid token: sub must be a string and roles a list")
    issued_at = float(issued) if isinstance(issued, int | float) and not isinstance(issued, bool) else 0.0
    return Principal(sub, frozenset(str(r) for r in roles), issued_at)


async def authenticate(state: Any, token: str) -> Principal:
    """`verify`, then refuse (401) a token issued before its user's tokens were revoked (the user was
    deleted, or lost a role). ``state``: the app's state (``settings``, ``redis``)."""
    principal = verify(state.settings.jwt_secret, token)
    try:
        revoked = await tokens_not_before(state.redis, state.settings.key_prefix, principal.user)
    except (redis_errors.RedisError, OSError):
        raise ApiError(503, "unavailable", "cannot check the token now (Redis is unreachable)") from None
    if revoked is not None and principal.issued_at < revoked:
        raise ApiError(401, "unauthorized", "the token was revoked (the user was deleted or lost a "
                       "role): log in again")
    return principal


_bearer = HTTPBearer(auto_error=False, description="A JWT from `POST /api/v1/auth/login` (or, for an "
                     "operator, `meetmesh token --user NAME`)")


async def current_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(401, "unauthorized", "send `Authorization: Bearer <token>`")
    return await authenticate(request.app.state, credentials.credentials)


def admin_principal(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    if not principal.is_admin:
        raise ApiError(403, "forbidden", "this needs the admin role")
    return principal


User = Annotated[Principal, Depends(current_principal)]
Admin = Annotated[Principal, Depends(admin_principal)]
