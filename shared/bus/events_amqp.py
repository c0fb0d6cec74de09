"""The RabbitMQ backend of `EventBus`, through FastStream's `RabbitBroker` (aio-pika underneath).

- Durable events: a durable topic exchange ``<prefix>.events``, routing key = event type. Each
  service has one durable queue, ``<prefix>.svc.<service>``, bound once per pattern it subscribes
  to (``*`` stays, ``>`` becomes ``#``), limited by ``x-message-ttl`` and ``x-max-length``; its
  replicas are competing consumers of that queue. Messages are persistent and published with
  confirms; a replica's connection dropping puts its unacknowledged message back at once. Each
  replica takes one message at a time (prefetch 1), which is what keeps their order.
  RabbitMQ has no per-message ack deadline (only the broker-wide ``consumer_timeout``), so a long
  handler needs no keep-alive here.
- Dead letters: a durable queue per service, ``<prefix>.dead.<service>``, fed through the default
  exchange.
- Broadcasts: a topic exchange ``<prefix>.broadcast``; each process binds one exclusive,
  auto-deleted queue with ``#`` and fans out in memory.

Because a queue only receives what was published after it was bound, a service's durable
subscription begins the first time that service starts, as on the other backends.
"""

from __future__ import annotations

import logging
from typing import Any

import aio_pika
from aio_pika.exceptions import AMQPError
from faststream import AckPolicy, StreamMessage
from faststream.rabbit import Channel, ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage

from .errors import BusConnectionError
from .events import FASTSTREAM_LOG, EventBus

log = logging.getLogger(__name__)
_UNREACHABLE = (AMQPError, OSError, ConnectionError, TimeoutError)


async def raw_body(msg: StreamMessage[Any]) -> bytes:
    """Hand the body over undecoded: `EventBus` validates it, and dead-letters what is malformed.
    (FastStream's own JSON decoding would raise first, and the message would be requeued forever.)"""
    return msg.body


def amqp_pattern(pattern: str) -> str:
    """Our topic pattern in AMQP's syntax: ``>`` (the rest) is ``#``; ``*`` is the same."""
    return pattern[:-1] + "#" if pattern.endswith(">") else pattern


class AmqpEventBus(EventBus):
    scheme = "amqp"

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        p = self.prefix
        self.exchange = RabbitExchange(f"{p}.events", type=ExchangeType.TOPIC, durable=True)
        self.broadcast_exchange = RabbitExchange(f"{p}.broadcast", type=ExchangeType.TOPIC)
        arguments: dict[str, Any] = {}
        if self.retention.max_age is not None:
            arguments["x-message-ttl"] = int(self.retention.max_age * 1000)
        if self.retention.max_count is not None:
            arguments["x-max-length"] = self.retention.max_count
        self.queue = RabbitQueue(f"{p}.svc.{self.service}", durable=True,
                                 arguments=arguments)  # type: ignore[call-overload]
        self.dead_queue = RabbitQueue(f"{p}.dead.{self.service}", durable=True)
        self.broker = RabbitBroker(url, logger=FASTSTREAM_LOG, log_level=logging.DEBUG, graceful_timeout=5.0)

        async def on_broadcast(msg: RabbitMessage) -> None:
            self._fan_out(msg.body)

        # One at a time, acknowledged after the (non-blocking) fan-out: otherwise aio-pika's task per
        # delivery could reorder two updates of one topic (a task's "processing" and "completed").
        mine = RabbitQueue(f"{p}.bc.{self.consumer}", exclusive=True, auto_delete=True, routing_key="#")
        self.broker.subscriber(mine, self.broadcast_exchange, channel=Channel(prefetch_count=1),
                               ack_policy=AckPolicy.ACK, decoder=raw_body)(on_broadcast)

    def _declare_durable(self) -> None:
        async def on_event(msg: RabbitMessage) -> None:
            await self._deliver(msg.body)

        # aio-pika runs each delivery as its own task: with more than one unacknowledged message
        # per consumer they would be handled concurrently, out of order. One at a time, on a
        # channel of its own, keeps per-topic order for one consumer.
        self.broker.subscriber(self.queue, self.exchange, channel=Channel(prefetch_count=1),
                               ack_policy=AckPolicy.NACK_ON_ERROR, decoder=raw_body)(on_event)

    async def _start(self) -> None:
        try:
            await self.broker.connect()
            await self.broker.declare_exchange(self.exchange)
            await self.broker.declare_exchange(self.broadcast_exchange)
            await self.broker.declare_queue(self.dead_queue)
            if self._subscriptions:
                self._declare_durable()
            await self.broker.start()
            if self._subscriptions:
                await self._bind(self.patterns)
        except _UNREACHABLE as exc:
            raise BusConnectionError(f"cannot reach RabbitMQ for events at {self.url}: {exc!r}") from exc

    async def _bind(self, patterns: list[str]) -> None:
        """Bind the service's queue once per pattern (the subscriber binds only one routing key). On
        a channel of its own: the subscriber's channel is the queue's, and FastStream caches it."""
        channel = await self._connection().channel()
        try:
            queue = await channel.declare_queue(self.queue.name, passive=True)
            for pattern in patterns:
                await queue.bind(self.exchange.name, routing_key=amqp_pattern(pattern))
        finally:
            await channel.close()

    def _connection(self) -> aio_pika.abc.AbstractRobustConnection:
        if self.broker._connection is None:
            raise BusConnectionError(f"not connected to RabbitMQ at {self.url}")
        return self.broker._connection

    async def _stop(self) -> None:
        await self.broker.stop()

    async def _publish(self, type: str, body: bytes) -> None:
        try:
            await self.broker.publish(body, routing_key=type, exchange=self.exchange, persist=True,
                                      content_type="application/json")
        except _UNREACHABLE as exc:
            raise BusConnectionError(f"cannot publish events to RabbitMQ at {self.url}: {exc!r}") from exc

    async def _broadcast(self, topic: str, body: bytes) -> None:
        try:
            await self.broker.publish(body, routing_key=topic, exchange=self.broadcast_exchange)
        except _UNREACHABLE as exc:
            raise BusConnectionError(f"cannot broadcast on RabbitMQ at {self.url}: {exc!r}") from exc

    async def _write_dead(self, service: str, body: bytes) -> None:
        await self.broker.publish(body, routing_key=f"{self.prefix}.dead.{service}", persist=True)

    async def _read_dead(self, service: str, limit: int) -> list[bytes]:
        """A peek: take up to ``limit`` messages unacknowledged, then hand them all back in order."""
        queue = await self.broker.declare_queue(RabbitQueue(f"{self.prefix}.dead.{service}", durable=True))
        taken: list[aio_pika.abc.AbstractIncomingMessage] = []
        try:
            while len(taken) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                taken.append(message)
            return [m.body for m in taken]
        finally:
            for m in reversed(taken):
                await m.nack(requeue=True)

    async def drop(self) -> None:
        """Delete the exchanges and this service's queues (AMQP cannot list other services' queues)."""
        self._check_started()
        channel = await self._connection().channel()  # a fresh channel: a failed delete closes it
        try:
            for name in (self.queue.name, self.dead_queue.name):
                await channel.queue_delete(name)
            for exchange in (self.exchange.name, self.broadcast_exchange.name):
                await channel.exchange_delete(exchange)
        finally:
            await channel.close()
