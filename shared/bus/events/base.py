"""Service events: durable per-service delivery and ephemeral broadcast, on Redis, NATS JetStream
or RabbitMQ: Redis and NATS through FastStream's brokers, RabbitMQ on aiormq (``events_amqp.py``
says why).

Durable delivery (``subscribe``): each *service* gets every event once (its replicas share the
work, as one consumer group), at least once, acknowledged only after its handlers ran. An event
whose handler keeps failing is retried a few times in place, then sent to the service's
dead-letter destination with the reason, and acknowledged: it never blocks the topic. A replica
killed mid-handler leaves the event unacknowledged, and the broker delivers it again (at once on
RabbitMQ, after ``ack_wait`` on Redis and NATS). A service that was down catches up on what was
published meanwhile, within the retention (age or count).

Ephemeral broadcast (``broadcast`` / ``listen``): fire-and-forget fan-out to every live process,
no group, no retention. Each process holds one broker subscription and fans it out in memory to
its listeners (bounded queues: a slow listener loses messages, counted, and slows no one).

The backend is picked by URL scheme (``redis://``, ``nats://``, ``amqp://``), each in its own
module imported only when used. Backends fill in the underscored hooks at the end of `EventBus`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import socket
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar

from pydantic import BaseModel, ValidationError

from ..connection import redact_url
from ..errors import BusError, ConfigError, InvalidMessage, Reject
from .catalogue import Event, check_pattern, decode_event, make_event, matches

log = logging.getLogger(__name__)
# FastStream's own log (connections, subscriber start/stop): warnings and up unless asked for.
FASTSTREAM_LOG = logging.getLogger("shared.bus.faststream")
FASTSTREAM_LOG.setLevel(logging.WARNING)
# Brokers are built with apply_types=False and the handlers get the message object from a custom
# decoder: FastStream's dependency injection looked the message up on a worker thread for every
# call, which was ~30 % of a subscriber's CPU and most of our latency over bare FastStream.
BROKER_OPTIONS: dict[str, Any] = {"logger": FASTSTREAM_LOG, "log_level": logging.DEBUG,
                                  "graceful_timeout": 5.0, "apply_types": False}


async def message_itself(msg: Any) -> Any:
    """FastStream decoder that hands the handler the message object itself (body, ids, acks)."""
    return msg


async def message_and_body(msg: Any, default: Callable[[Any], Awaitable[Any]]) -> tuple[Any, Any]:
    """FastStream decoder that hands the handler the message and its body as FastStream decodes it."""
    return msg, await default(msg)

EventHandler = Callable[[Event[Any]], Awaitable[None]]
Body = bytes | str | dict[str, Any]  # an event as received: raw, or as the broker library decoded it
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_TOPIC = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def check_topic(topic: str) -> str:
    """A broadcast topic (``meeting.m1``, ``task.<id>``), or `InvalidMessage` saying what is wrong."""
    if not _TOPIC.match(topic):
        raise InvalidMessage(f"broadcast topic {topic!r}: use dot-separated words of A-Z a-z 0-9 _ -")
    return topic


@dataclass(frozen=True)
class Retention:
    """How long durable events are kept for services that are down: by age, by count, or both."""

    max_age: float | None = 7 * 24 * 3600.0
    max_count: int | None = 1_000_000

    def __post_init__(self) -> None:
        if self.max_age is not None and self.max_age <= 0:
            raise ConfigError("Retention.max_age must be > 0 seconds (or None)")
        if self.max_count is not None and self.max_count < 1:
            raise ConfigError("Retention.max_count must be >= 1 (or None)")


@dataclass
class EventStats:
    """Counters of one `EventBus` since it started."""

    published: int = 0
    received: int = 0
    processed: int = 0
    skipped: int = 0       # received, but no handler of this service matches it
    retried: int = 0
    dead: int = 0          # dead-lettered: malformed, or a handler kept failing
    broadcast_sent: int = 0
    broadcast_received: int = 0
    broadcast_dropped: int = 0  # a listener's buffer was full
    broadcast_skipped: int = 0  # our own, sent with skip_self


class DeadEvent(BaseModel):
    """An event a service could not handle, kept with the reason in its dead-letter destination."""

    service: str
    reason: str
    handler: str | None = None
    event_id: str | None = None
    event_type: str | None = None
    failed_at: float
    body: str


class BroadcastMessage(BaseModel):
    """One ephemeral message: a topic (``meeting.m1``, ``task.<id>``), its data, when and who sent it.

    ``origin`` (first, so a receiver can check it before decoding the rest) is the sending process's
    consumer name when that process has already handed the message to its own listeners itself
    (``broadcast(..., skip_self=True)``): it drops its own copy unread.
    """

    origin: str | None = None
    topic: str
    data: Any = None
    source: str = ""
    time: float = 0.0


class Listener:
    """The messages of one ``listen(pattern)``, as an async iterator; ``close()`` (or leaving
    ``async with``) ends it."""

    def __init__(self, bus: EventBus, pattern: str, maxsize: int) -> None:
        self.pattern = pattern
        self.dropped = 0
        self._bus = bus
        self._queue: asyncio.Queue[BroadcastMessage | None] = asyncio.Queue(maxsize)

    def _offer(self, message: BroadcastMessage) -> bool:
        try:
            self._queue.put_nowait(message)
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            return False

    async def get(self, timeout: float | None = None) -> BroadcastMessage:
        """The next message; `TimeoutError` after ``timeout`` seconds, `BusError` once closed."""
        message = await asyncio.wait_for(self._queue.get(), timeout)
        if message is None:
            raise BusError("listener is closed")
        return message

    def close(self) -> None:
        if self in self._bus._listeners:
            self._bus._listeners.remove(self)
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[BroadcastMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[BroadcastMessage]:
        while (message := await self._queue.get()) is not None:
            yield message

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Subscription:
    pattern: str
    handler: EventHandler
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = getattr(self.handler, "__qualname__", repr(self.handler))


class EventBus(abc.ABC):
    """Publish and receive events as one service. Use `EventBus.from_url`.

    ``service`` names the consumer group: replicas started with the same name share the work.
    Subscribe (``@bus.subscribe("meeting.*")``) before ``start()``; publish and broadcast after it.
    """

    scheme: ClassVar[str]
    broker: Any  # the backend's FastStream broker (Redis, NATS); RabbitMQ has its own `ping`

    def __init__(
        self,
        url: str,
        *,
        service: str,
        prefix: str = "mm",
        retention: Retention | None = None,
        ack_wait: float = 30.0,
        max_attempts: int = 3,
        retry_backoff: float = 0.05,
        consumer: str | None = None,
    ) -> None:
        if not _NAME.match(service):
            raise ConfigError(f"service name {service!r}: use 1-64 of a-z 0-9 _ -, not starting with _ or -")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", prefix):
            raise ConfigError(f"event prefix {prefix!r}: use 1-64 of A-Z a-z 0-9 _ -")
        if ack_wait <= 0 or max_attempts < 1 or retry_backoff < 0:
            raise ConfigError("ack_wait must be > 0, max_attempts >= 1 and retry_backoff >= 0")
        self.url = url
        self.shown_url = redact_url(url)  # for messages and logs: no password in them
        self.service = service
        self.prefix = prefix
        self.retention = retention or Retention()
        self.ack_wait = ack_wait
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.consumer = consumer or f"{service}-{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"
        # How our own ``skip_self`` broadcasts begin, as pydantic writes them (see BroadcastMessage)
        mine = BroadcastMessage(origin=self.consumer, topic="-").model_dump_json().encode()
        self._own_prefix = mine[:mine.index(b',"topic":') + 1]
        self.stats = EventStats()
        self._subscriptions: list[_Subscription] = []
        self._listeners: list[Listener] = []
        self._started = False

    @staticmethod
    def from_url(url: str, **options: Any) -> EventBus:
        """The backend for ``url``'s scheme: ``redis://``/``rediss://``, ``nats://``, ``amqp://``/``amqps://``."""
        scheme = url.partition("://")[0].lower()
        if scheme in ("redis", "rediss"):
            from .redis import RedisEventBus

            return RedisEventBus(url, **options)
        if scheme in ("nats", "tls"):
            from .nats import NatsEventBus

            return NatsEventBus(url, **options)
        if scheme in ("amqp", "amqps"):
            from .amqp import AmqpEventBus

            return AmqpEventBus(url, **options)
        raise ConfigError(f"MEETMESH_EVENTS_URL {url!r}: use redis://, nats:// or amqp://")

    # -- subscribing ------------------------------------------------------------------------------

    def subscribe(self, pattern: str, handler: EventHandler | None = None) -> Any:
        """Run ``handler(event)`` for every event whose type matches ``pattern``, once per service.

        Usable as ``bus.subscribe("meeting.*", handler)`` or as a decorator. A handler raising
        `Reject` dead-letters the event at once; any other exception is retried
        ``max_attempts`` times in all, then dead-letters it.
        """
        pattern = check_pattern(pattern)
        if self._started:
            raise BusError("subscribe before start(): a running consumer group cannot change its topics")

        def register(fn: EventHandler) -> EventHandler:
            self._subscriptions.append(_Subscription(pattern, fn))
            return fn

        return register(handler) if handler is not None else register

    @property
    def patterns(self) -> list[str]:
        return sorted({s.pattern for s in self._subscriptions})

    # -- publishing -------------------------------------------------------------------------------

    async def publish(self, type: str, data: Any, *, traceparent: str | None = None) -> Event[Any]:
        """Validate ``data`` against the catalogue's model for ``type`` and publish it durably.

        `InvalidMessage` (nothing sent) if it does not fit; returns the event as sent.
        """
        event = make_event(type, data, source=self.service, traceparent=traceparent)
        await self.publish_event(event)
        return event

    async def publish_event(self, event: Event[Any]) -> None:
        """Publish an event built beforehand (``catalogue.make_event``)."""
        self._check_started()
        await self._publish(event.type, event.model_dump_json().encode())
        self.stats.published += 1

    async def broadcast(self, topic: str, data: Any = None, *, skip_self: bool = False) -> None:
        """Send ``data`` to every live process listening on a pattern that takes ``topic``; no retention.

        ``skip_self``: not to this process's listeners (the caller handed it to them already).
        """
        self._check_started()
        await self._broadcast(topic, self._broadcast_body(topic, data, skip_self))
        self.stats.broadcast_sent += 1

    async def broadcast_many(self, items: Iterable[tuple[str, Any]], *, skip_self: bool = False) -> None:
        """Several broadcasts (``(topic, data)`` pairs), in this order, sent together: one round trip
        on Redis. All are checked first; one that is not valid raises and none is sent."""
        self._check_started()
        bodies = [(topic, self._broadcast_body(topic, data, skip_self)) for topic, data in items]
        if bodies:
            await self._broadcast_batch(bodies)
            self.stats.broadcast_sent += len(bodies)

    def _broadcast_body(self, topic: str, data: Any, skip_self: bool) -> bytes:
        check_topic(topic)
        try:
            body = BroadcastMessage(origin=self.consumer if skip_self else None, topic=topic, data=data,
                                    source=self.service, time=time.time())
            return body.model_dump_json().encode()
        except (ValidationError, ValueError, TypeError) as exc:
            raise InvalidMessage(f"broadcast data for {topic!r} is not JSON-serialisable: {exc}") from exc

    def listen(self, pattern: str, *, maxsize: int = 1000) -> Listener:
        """A `Listener` of the broadcasts whose topic matches ``pattern``, from now on."""
        listener = Listener(self, check_pattern(pattern), maxsize)
        self._listeners.append(listener)
        return listener

    async def dead_letters(self, limit: int = 100) -> list[DeadEvent]:
        """This service's dead-lettered events, oldest first (they stay where they are)."""
        self._check_started()
        return [DeadEvent.model_validate_json(raw) for raw in await self._read_dead(self.service, limit)]

    # -- lifecycle --------------------------------------------------------------------------------

    async def ping(self, timeout: float = 1.0) -> bool:
        """Whether the broker answers (for readiness checks); never raises."""
        if not self._started:
            return False
        try:
            return bool(await self.broker.ping(timeout=timeout))
        except Exception:
            return False

    async def start(self) -> None:
        """Connect, declare the durable topology, and start consuming (if anything is subscribed)."""
        if self._started:
            return
        await self._start()
        self._started = True

    async def stop(self) -> None:
        """Stop consuming and disconnect. An event being handled is left unacknowledged: redelivered."""
        if not self._started:
            return
        self._started = False
        for listener in list(self._listeners):
            listener.close()
        await self._stop()

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def _check_started(self) -> None:
        if not self._started:
            raise BusError("the event bus is not started: call `await bus.start()` (or use `async with`)")

    # -- delivery (shared by every backend) -------------------------------------------------------

    async def _deliver(self, body: Body) -> None:
        """Handle one durable event (raw, or as the broker library decoded it); returning means it
        may be acknowledged.

        Raises only if the dead-letter write itself failed: the backend then leaves the event
        unacknowledged, to be delivered again.
        """
        self.stats.received += 1
        try:
            event = decode_event(body)
        except InvalidMessage as exc:
            await self._dead(body, str(exc), None, None)
            return
        targets = [s for s in self._subscriptions if matches(s.pattern, event.type)]
        if not targets:
            self.stats.skipped += 1
            return
        for sub in targets:
            await self._run_handler(sub, event, body)
        self.stats.processed += 1

    @contextlib.asynccontextmanager
    async def _kept_alive(self, touch: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
        """While the block runs, tell the broker every ``ack_wait / 3`` that its events are still
        being worked on, so they are not handed to another replica."""

        async def keep() -> None:
            while True:
                await asyncio.sleep(self.ack_wait / 3)
                try:
                    await touch()
                except Exception as exc:  # the ack may still succeed; the worst case is a redelivery
                    log.warning("could not extend the ack deadline of events being handled: %r", exc)

        keeper = asyncio.create_task(keep())
        try:
            yield
        finally:
            keeper.cancel()

    async def _run_handler(self, sub: _Subscription, event: Event[Any], body: Body) -> None:
        for attempt in range(1, self.max_attempts + 1):
            try:
                await sub.handler(event)
                return
            except asyncio.CancelledError:
                raise
            except Reject as exc:
                await self._dead(body, f"rejected: {exc.reason}", sub.name, event)
                return
            except Exception as exc:
                if attempt >= self.max_attempts:
                    error = f"{type(exc).__name__}: {exc} (after {attempt} attempts)"
                    reason = f"{error}\n{traceback.format_exc()}"
                    await self._dead(body, reason, sub.name, event)
                    return
                self.stats.retried += 1
                log.warning("event %s (%s): handler %s failed (attempt %d/%d): %r", event.id, event.type,
                            sub.name, attempt, self.max_attempts, exc)
                await asyncio.sleep(random.uniform(0, self.retry_backoff * 2 ** (attempt - 1)))

    async def _dead(self, body: Body, reason: str, handler: str | None,
                    event: Event[Any] | None) -> None:
        log.error("event dead-lettered for service %s: %s", self.service, reason.splitlines()[0])
        if isinstance(body, bytes):
            text = body.decode(errors="replace")
        else:
            text = body if isinstance(body, str) else json.dumps(body, default=repr)
        dead = DeadEvent(service=self.service, reason=reason, handler=handler,
                         event_id=event.id if event else None, event_type=event.type if event else None,
                         failed_at=time.time(), body=text)
        await self._write_dead(self.service, dead.model_dump_json().encode())
        self.stats.dead += 1

    def _fan_out(self, body: bytes) -> None:
        """One broadcast received: hand it to every matching listener, without waiting."""
        if body.startswith(self._own_prefix):
            self.stats.broadcast_skipped += 1
            return
        try:
            message = BroadcastMessage.model_validate_json(body)
        except ValidationError as exc:
            log.warning("malformed broadcast ignored: %s", exc)
            return
        self.stats.broadcast_received += 1
        for listener in self._listeners:
            if matches(listener.pattern, message.topic) and not listener._offer(message):
                self.stats.broadcast_dropped += 1

    # -- backend hooks ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def _start(self) -> None:
        """Connect; declare retention and dead letters; consume durable events (into `_deliver`) when
        there are subscriptions, and broadcasts (into `_fan_out`) always."""

    @abc.abstractmethod
    async def _stop(self) -> None: ...

    @abc.abstractmethod
    async def _publish(self, type: str, body: bytes) -> None: ...

    @abc.abstractmethod
    async def _broadcast(self, topic: str, body: bytes) -> None: ...

    async def _broadcast_batch(self, bodies: list[tuple[str, bytes]]) -> None:
        """Several ``_broadcast``, in order; a backend that can send them together overrides this."""
        for topic, body in bodies:
            await self._broadcast(topic, body)

    @abc.abstractmethod
    async def _write_dead(self, service: str, body: bytes) -> None: ...

    @abc.abstractmethod
    async def _read_dead(self, service: str, limit: int) -> list[bytes]: ...

    @abc.abstractmethod
    async def drop(self) -> None:
        """Delete everything this prefix holds on the broker (streams, groups, queues). For tests and
        operators tearing an environment down; the bus must be started."""
