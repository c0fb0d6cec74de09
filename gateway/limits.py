"""The gateway's per-user limits (docs/gateway.md, "Limits"): the Redis-backed `UserLimits` made from
the settings, its refusals answered as clients are told (429 ``rate_limited`` with ``Retry-After``;
on the WebSocket an ``error`` frame with ``retry_after``), and a bound on REST request bodies."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import WebSocket
from redis.asyncio import Redis

from shared.bus import BusConnectionError
from shared.bus.dispatch.ratelimit import LimitExceeded, UserLimits

from .errors import ApiError, body
from .settings import GatewaySettings

CLOSE_TRY_AGAIN = 1013  # a socket refused by a limit (or while Redis is away): try again later
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def user_limits(redis: Redis, settings: GatewaySettings) -> UserLimits:
    return UserLimits(
        redis,
        prefix=settings.key_prefix,
        submit_rate=settings.submit_rate,
        submit_burst=settings.submit_burst,
        max_sockets=settings.max_sockets_per_user,
        socket_ttl=settings.socket_slot_ttl,
        max_queued_tasks=settings.max_queued_tasks,
    )


def retry_after(seconds: float) -> str:
    """``Retry-After`` is whole seconds; never 0 for a refusal."""
    return str(max(1, math.ceil(seconds)))


def refused(exc: LimitExceeded) -> ApiError:
    return ApiError(429, "rate_limited", str(exc), headers={"Retry-After": retry_after(exc.retry_after)})


@contextlib.asynccontextmanager
async def limits_answered() -> AsyncIterator[None]:
    """Turn a limit's refusal inside the block into the client's 429."""
    try:
        yield
    except LimitExceeded as exc:
        raise refused(exc) from None


@contextlib.asynccontextmanager
async def socket_slot(ws: WebSocket, user: str) -> AsyncIterator[bool]:
    """Hold one of ``user``'s socket slots for the block (True), or refuse the socket (False): an
    ``error`` frame (``rate_limited`` with ``retry_after``, or ``unavailable``), then close 1013."""
    limits: UserLimits = ws.app.state.limits
    try:
        member = await limits.open_socket(user)
    except (LimitExceeded, BusConnectionError) as exc:
        frame: dict[str, Any] = {"type": "error", "code": "unavailable",
                                 "message": "a backend is unreachable; try again shortly"}
        if isinstance(exc, LimitExceeded):
            frame = {"type": "error", "code": "rate_limited", "message": str(exc),
                     "retry_after": int(retry_after(exc.retry_after))}
        with contextlib.suppress(Exception):
            await ws.send_text(json.dumps(frame))
            await ws.close(CLOSE_TRY_AGAIN, str(frame["code"]))
        yield False
        return
    try:
        yield True
    finally:
        await limits.close_socket(user, member)


class BodyLimit:
    """ASGI middleware: REST request bodies over ``max_bytes`` answer 413 ``too_large`` (by their
    Content-Length before any is read, or as soon as the streamed body passes it). Paths in
    ``exempt`` (the media upload, which has its own limit) are left alone."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *, max_bytes: int,
                 exempt: frozenset[str] = frozenset()) -> None:
        self.app, self.max_bytes, self.exempt = app, max_bytes, exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(send)
            return
        seen = 0
        answered = False

        async def counted() -> MutableMapping[str, Any]:
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes and not answered:
                    answered = True
                    await self._too_large(send)
                    return {"type": "http.disconnect"}  # the app stops reading; its answer is dropped
            return message

        async def guarded(message: MutableMapping[str, Any]) -> None:
            if not answered:
                await send(message)

        await self.app(scope, counted, guarded)

    async def _too_large(self, send: Send) -> None:
        content = json.dumps(body("too_large", f"the request body is over {self.max_bytes} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})
