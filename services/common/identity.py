"""Who is calling a service: the gateway verifies the JWT once and forwards the user and roles in
headers; a service trusts those headers only beside the gateway key.

- ``X-MeetMesh-User``: the user id (the token's ``sub``), percent-encoded.
- ``X-MeetMesh-Roles``: comma-separated roles (``user``, ``admin``; ``service`` for another service).
- ``X-MeetMesh-Gateway-Key``: HMAC-SHA256 of a fixed label under ``MEETMESH_JWT_SECRET``. Whoever
  holds the signing secret may speak for users anyway; anyone else reaching a service's port cannot.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote, unquote

from fastapi import Depends, Request

from .errors import Unauthorized

USER_HEADER = "X-MeetMesh-User"
ROLES_HEADER = "X-MeetMesh-Roles"
KEY_HEADER = "X-MeetMesh-Gateway-Key"
ADMIN = "admin"
SERVICE = "service"  # another service reading on its own behalf (e.g. ai reading a meeting's chat)


def gateway_key(secret: str) -> str:
    """The key the gateway (or a service) sends to prove it holds ``MEETMESH_JWT_SECRET``."""
    return hmac.new(secret.encode(), b"meetmesh-gateway-v1", hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Actor:
    """A caller as a service sees it: the user id and roles the gateway verified."""

    user_id: str
    roles: frozenset[str] = frozenset({"user"})

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.roles

    @property
    def is_service(self) -> bool:
        return SERVICE in self.roles


def identity_headers(secret: str, actor: Actor | None) -> dict[str, str]:
    """The headers that carry ``actor`` (or only the key, for public endpoints) to a service."""
    headers = {KEY_HEADER: gateway_key(secret)}
    if actor is not None:
        headers[USER_HEADER] = quote(actor.user_id, safe="")
        headers[ROLES_HEADER] = ",".join(quote(r, safe="") for r in sorted(actor.roles))
    return headers


def _check_key(request: Request) -> None:
    expected: str = request.app.state.gateway_key
    if not hmac.compare_digest(request.headers.get(KEY_HEADER, ""), expected):
        raise Unauthorized("services answer the gateway only: call them through it")


def from_gateway(request: Request) -> None:
    """Dependency of public endpoints (register, login): the request came through the gateway."""
    _check_key(request)


def caller(request: Request) -> Actor:
    """Dependency of every other endpoint: the `Actor` the gateway forwarded."""
    _check_key(request)
    user = unquote(request.headers.get(USER_HEADER, ""))
    if not user:
        raise Unauthorized(f"no {USER_HEADER}: the gateway sends it for authenticated requests")
    roles = frozenset(unquote(r) for r in request.headers.get(ROLES_HEADER, "").split(",") if r)
    return Actor(user, roles)


Caller = Annotated[Actor, Depends(caller)]
Gateway = Depends(from_gateway)
