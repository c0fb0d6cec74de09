"""Connecting to Redis: one client per process, checked once, errors translated at the boundary."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, Connection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

try:
    import hiredis

    HIREDIS_PACK = hasattr(hiredis, "pack_command")
except ImportError:  # pragma: no cover - hiredis is a dependency; this keeps a bare redis-py working
    HIREDIS_PACK = False

from .backoff import backoff
from .errors import BusConnectionError, ConfigError

MIN_REDIS = (7, 0)
UNREACHABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
# Once a client has reached Redis, a command that meets a dropped connection, a refused connect or
# a Redis still loading its AOF is tried again, with jittered exponential backoff, for this long in
# all; then it raises (as `BusConnectionError`, which the gateway answers as 503 "unavailable").
# A restart of Redis shorter than this is a pause. A client that never reached Redis (a wrong URL)
# fails at once.
RETRY_SECONDS = 5.0
RETRY_BASE, RETRY_CAP = 0.05, 1.0  # seconds: the first wait, and the longest
HEALTH_CHECK_SECONDS = 10.0  # a pooled connection idle this long is PINGed before use
CONNECT_TIMEOUT = 5.0
P = ParamSpec("P")
T = TypeVar("T")
_budget: contextvars.ContextVar[float | None] = contextvars.ContextVar("redis_retry_budget", default=None)


@contextlib.contextmanager
def unreachable_as_bus_error(what: str) -> Iterator[None]:
    """Translate redis-py's connection failures inside the block into `BusConnectionError`."""
    try:
        yield
    except UNREACHABLE as exc:
        raise BusConnectionError(f"Redis unreachable during {what}: {exc}") from exc


class BoundedRetry(Retry):
    """redis-py's retry of connection failures, bounded by time rather than by count: the same
    budget holds however redis-py nests its retries (a command's retry wraps its connect's).
    Waits grow from ``base`` to ``cap`` with jitter (`backoff`), so clients that lost Redis
    together do not all come back in the same instant. Until one call of the client has
    succeeded nothing is retried: a Redis never reached is a configuration error, said at once.

    redis-py deep-copies the retry into every connection of a pool; the copies share ``reached``.
    """

    def __init__(self, seconds: float = RETRY_SECONDS, base: float = RETRY_BASE,
                 cap: float = RETRY_CAP, reached: list[bool] | None = None) -> None:
        super().__init__(NoBackoff(), -1, (redis_errors.ConnectionError, redis_errors.TimeoutError))
        self.seconds = seconds
        self.base = base
        self.cap = cap
        self.reached = [False] if reached is None else reached

    def __deepcopy__(self, memo: dict[int, Any]) -> BoundedRetry:
        return BoundedRetry(self.seconds, self.base, self.cap, self.reached)

    async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Callable[[Any], Any]) -> T:
        budget = _budget.get()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.seconds if budget is None else budget)
        failures = 0
        while True:
            try:
                answer = await do()
            except self._supported_errors as error:
                failures += 1
                await fail(error)
                delay = backoff(failures, self.base, self.cap)
                if not self.reached[0] or loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
            else:
                self.reached[0] = True
                return answer


@contextlib.contextmanager
def retry_budget(seconds: float) -> Iterator[None]:
    """Inside the block (this task), Redis commands retry for ``seconds`` in all (0: fail at once)."""
    token = _budget.set(seconds)
    try:
        yield
    finally:
        _budget.reset(token)


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

    Connecting goes through the connection's retry (`BoundedRetry`): redis-py takes a connection
    from the pool outside its command retry, so a refused connect (Redis restarting) would
    otherwise fail the command at once, however long the retry budget.
    """

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        await connection.retry.call_with_retry(connection.connect, lambda _: connection.disconnect())


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, fit for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def client(url: str, *, retry_seconds: float = RETRY_SECONDS, **options: Any) -> Redis:
    """A redis-py asyncio client for ``url`` (not yet connected), answers decoded as text.

    Connection failures are retried for ``retry_seconds`` (`BoundedRetry`); idle pooled
    connections are checked before use and kept alive by TCP keepalive, so a restarted Redis is
    found again by the next command rather than by its failure. ``options`` go to redis-py.
    """
    options.setdefault("retry", BoundedRetry(retry_seconds))
    options.setdefault("health_check_interval", HEALTH_CHECK_SECONDS)
    options.setdefault("socket_keepalive", True)
    options.setdefault("socket_connect_timeout", CONNECT_TIMEOUT)
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
        raise ConfigError(f"invalid Redis URL {redact_url(url)!r}: {exc}") from exc


async def connect(url: str, **options: Any) -> Redis:
    """A connected client for ``url``; raises `BusConnectionError` or `ConfigError` (Redis < 7).

    The check is made once, without retries: a wrong URL is a start-up error at once. Commands
    made afterwards retry through a restart of Redis (see `client`).
    """
    redis = client(url, **options)
    try:
        with retry_budget(0.0):
            info = await redis.info("server")
    except UNREACHABLE as exc:
        await redis.aclose()
        raise BusConnectionError(f"cannot reach Redis at {redact_url(url)}: {exc}") from exc
    version = tuple(int(p) for p in str(info.get("redis_version", "0.0")).split(".")[:2])
    if version < MIN_REDIS:
        await redis.aclose()
        raise ConfigError(f"Redis at {redact_url(url)} is {info.get('redis_version')}; "
                          "MeetMesh needs Redis 7 or newer")
    return redis
