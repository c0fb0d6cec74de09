"""What the services' routes share: their documented error answers and the proxy of the request's app."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel

from ..errors import ErrorBody
from .proxy import ServiceProxy


class ConflictInfo(BaseModel):
    code: Literal["conflict"]
    message: str


class ConflictBody(BaseModel):
    """409: the current state forbids the request."""

    error: ConflictInfo


_DESCRIPTIONS = {
    400: "bad_request: malformed or invalid input (`details` says where), or a request that makes no sense",
    401: "unauthorized: no valid bearer token",
    403: "forbidden: not allowed (only the host, a participant or an admin may)",
    404: "not_found: no such user, meeting or participant",
    503: "unavailable: the service is unreachable; try again shortly",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorBody, "description": _DESCRIPTIONS[s]} for s in statuses if s != 409
    }
    if 409 in statuses:
        out[409] = {
            "model": ConflictBody,
            "description": "conflict: the current state forbids it "
            "(a taken username, a meeting that has ended, a user not in the meeting)",
        }
    return out


def proxy(request: Request) -> ServiceProxy:
    proxy: ServiceProxy = request.app.state.services
    return proxy
