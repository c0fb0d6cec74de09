"""Who is in each meeting now, in Redis: written by the meeting service after each committed change,
read by the gateway when a client subscribes to ``meeting.<id>`` (the SQL store stays the truth; at
start the service rewrites every active meeting's set from it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from services.common import Unavailable

from .keys import MeetingKeys


@contextlib.contextmanager
def unreachable(what: str) -> Iterator[None]:
    """Redis unreachable inside the block -> `Unavailable` (503, or a retried task)."""
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        raise Unavailable(f"Redis unreachable while {what}: {exc}") from exc


class Presence:
    """The participant sets of one key prefix."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.keys = MeetingKeys(prefix)

    async def add(self, meeting_id: str, user_id: str) -> None:
        with unreachable("recording a meeting participant"):
            await self.redis.sadd(self.keys.participants(meeting_id), user_id)  # type: ignore[misc]

    async def remove(self, meeting_id: str, user_id: str) -> None:
        with unreachable("removing a meeting participant"):
            await self.redis.srem(self.keys.participants(meeting_id), user_id)  # type: ignore[misc]

    async def clear(self, meeting_id: str) -> None:
        with unreachable("clearing a meeting's participants"):
            await self.redis.delete(self.keys.participants(meeting_id))

    async def replace(self, meeting_id: str, user_ids: Iterable[str]) -> None:
        """Make the set exactly ``user_ids`` (one MULTI: readers never see it half written)."""
        key, members = self.keys.participants(meeting_id), list(user_ids)
        with unreachable("rewriting a meeting's participants"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                if members:
                    pipe.sadd(key, *members)
                await pipe.execute()

    async def members(self, meeting_id: str) -> set[str]:
        with unreachable("reading a meeting's participants"):
            return set(await self.redis.smembers(self.keys.participants(meeting_id)))  # type: ignore[misc]

    async def contains(self, meeting_id: str, user_id: str) -> bool:
        with unreachable("checking a meeting participant"):
            key = self.keys.participants(meeting_id)
            return bool(await self.redis.sismember(key, user_id))  # type: ignore[misc]
