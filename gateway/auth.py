"""Bearer tokens: HS256 JWTs carrying ``sub`` (the user) and ``roles``, signed with MEETMESH_JWT_SECRET."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError

ALGORITHM = "HS256"
ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's subject and roles."""

    user: str
    roles: frozenset[str]

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
    """A signed token for ``user`` (development and tests; the user service issues them later)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user,
        "roles": [*roles, *([ADMIN] if admin else [])],
        "iat": now,
        "exp": now + int(ttl),
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
    sub, roles = claims.get("sub"), claims.get("roles", [])
    if not isinstance(sub, str) or not sub or not isinstance(roles, list):
        raise ApiError(401, "unauthorized", "invalid token: sub must be a string and roles a list")
    return Principal(sub, frozenset(str(r) for r in roles))


_bearer = HTTPBearer(auto_error=False, description="A JWT from `meetmesh token --user NAME [--admin]`")


def current_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(401, "unauthorized", "send `Authorization: Bearer <token>`")
    return verify(request.app.state.settings.jwt_secret, credentials.credentials)


def admin_principal(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    if not principal.is_admin:
        raise ApiError(403, "forbidden", "this needs the admin role")
    return principal


User = Annotated[Principal, Depends(current_principal)]
Admin = Annotated[Principal, Depends(admin_principal)]
