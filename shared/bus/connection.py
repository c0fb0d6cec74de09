"""Connecting to Redis: one client per process, checked once, errors translated at the boundary."""

from __future__ import annotations

from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from .errors import BusConnectionError, ConfigError

MIN_REDIS = (7, 0)


def client(url: str, **options: Any) -> Redis:
    """A redis-py asyncio client for ``url`` (not yet connected), answers decoded as text."""
    try:
        redis: Redis = Redis.from_url(url, decode_responses=True, **options)
        return redis
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {url!r}: {exc}") from exc


async def connect(url: str, **options: Any) -> Redis:
    """A connected client for ``url``; raises `BusConnectionError` or `ConfigError` (Redis < 7)."""
    redis = client(url, **options)
    try:
        info = await redis.info("server")
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        await redis.aclose()
        raise BusConnectionError(f"cannot reach Redis at {url}: {exc}") from exc
    version = tuple(int(p) for p in str(info.get("redis_version", "0.0")).split(".")[:2])
    if version < MIN_REDIS:
        await redis.aclose()
        raise ConfigError(f"Redis at {url} is {info.get('redis_version')}; MeetMesh needs Redis 7 or newer")
    return redis
