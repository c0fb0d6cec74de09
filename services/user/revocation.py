"""Revoking a user's tokens: a per-user "not before" time in Redis, written when the user is deleted
or loses a role, read by the gateway for every authenticated request (one GET; the tokens stay
stateless JWTs otherwise)."""

from __future__ import annotations

import time

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from services.common import Unavailable

from .keys import UserKeys


async def revoke_tokens(redis: Redis, prefix: str, user_id: str, *, at: float | None = None) -> float:
    """Refuse ``user_id``'s tokens issued before ``at`` (now); the time written."""
    when = time.time() if at is None else at
    try:
        await redis.set(UserKeys(prefix).tokens_not_before(user_id), repr(when))
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        raise Unavailable(f"Redis unreachable while revoking the tokens of {user_id!r}: {exc}") from exc
    return when


async def tokens_not_before(redis: Redis, prefix: str, user_id: str) -> float | None:
    """When ``user_id``'s tokens were last revoked, or None. Redis errors propagate (the caller decides:
    the gateway answers 503, never lets a token through unchecked)."""
    raw = await redis.get(UserKeys(prefix).tokens_not_before(user_id))
    if raw is None:
        return None
    return float(raw)
