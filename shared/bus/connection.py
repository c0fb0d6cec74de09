"""Connecting to Redis: one client per process, checked once, errors translated at the boundary."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, Connection, ConnectionPool

try:
    import hiredis

    HIREDIS_PACK = hasattr(hiredis, "pack_command")
except ImportError:  # pragma: no cover - hiredis is a dependency; this keeps a bare redis-py working
    HIREDIS_PACK = False

from .errors import BusConnectionError, ConfigError

MIN_REDIS = (7, 0)
UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
P = ParamSpec("P")
T = TypeVar("T")


@contextlib.contextmanager
def unreachable_as_bus_error(what: str) -> Iterator[None]:
    """Translate redis-py's connection failures inside the block into `BusConnectionError`."""
    try:
        yield
    except UNREACHABLE as exc:
        raise BusConnectionError(f"Redis unreachable during {what}: {exc}") from exc


def translates_unreachable(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """The same, for a whole method whose first argument has a ``name`` (a queue)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        with unreachable_as_bus_error(f"{fn.__name__} on queue {getattr(args[0], 'name', '?')!r}"):
            return await fn(*args, **kwargs)

    return wrapper


class HiredisPackingConnection(Connection):
    """redis-py's asyncio connection, packing commands with hiredis's C packer.

    redis-py parses replies with hiredis but packs commands in pure Python (~37 us for a 28-argument
    EVALSHA here, against ~3 us for ``hiredis.pack_command``); queue scripts take many arguments,
    so packing dominated the client's cost per call. Only redis-py's own argument splitting is kept.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # a type hiredis does not pack (e.g. memoryview): redis-py's way
            return super().pack_command(*args)


class TrustingConnectionPool(ConnectionPool):
    """redis-py's pool, minus the check on every checkout that a pooled connection has no
    unread data (a zero-timeout read: about 25 us of the ~130 us a command costs here).

    A connection can only hold unread data if a command was interrupted, and redis-py already
    disconnects a connection whose read fails or is cancelled; the bus's own streaming path does
    the same. So a connection back in the pool is always clean, and only connecting is kept.
    """

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        await connection.connect()  # type: ignore[no-untyped-call]


def client(url: str, **options: Any) -> Redis:
    """A redis-py asyncio client for ``url`` (not yet connected), answers decoded as text."""
    if url.startswith("redis://"):
        if HIREDIS_PACK:
            options.setdefault("connection_class", HiredisPackingConnection)
        pool_class: type[ConnectionPool] = TrustingConnectionPool
    else:
        pool_class = ConnectionPool
    try:
        pool = pool_class.from_url(url, decode_responses=True, **options)
        redis: Redis = Redis.from_pool(pool)
        return redis
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {url!r}: {exc}") from exc


async def connect(url: str, **options: Any) -> Redis:
    """A connected client for ``url``; raises `BusConnectionError` or `ConfigError` (Redis < 7)."""
    redis = client(url, **options)
    try:
        info = await redis.info("server")
    except UNREACHABLE as exc:
        await redis.aclose()
        raise BusConnectionError(f"cannot reach Redis at {url}: {exc}") from exc
    version = tuple(int(p) for p in str(info.get("redis_version", "0.0")).split(".")[:2])
    if version < MIN_REDIS:
        await redis.aclose()
        raise ConfigError(f"Redis at {url} is {info.get('redis_version')}; MeetMesh needs Redis 7 or newer")
    return redis
