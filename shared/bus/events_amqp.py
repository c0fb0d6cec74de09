"""The RabbitMQ backend of `EventBus`, through FastStream's `RabbitBroker` (aio-pika underneath).

- Durable events: a durable topic exchange ``<prefix>.events``, routing key = event type. Each
  service has one durable queue, ``<prefix>.svc.<service>``, bound once per pattern it subscribes
  to (``*`` stays, ``>`` becomes ``#``), limited by ``x-message-ttl`` and ``x-max-length``; its
  replicas are competing consumers of that queue. Messages are persistent and published with
  confirms; a replica's connection dropping puts its unacknowledged messages back at once.
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

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aio_pika.exceptions import AMQPError
from faststream import AckPolicy, StreamMessage
from faststream.rabbit import Channel, ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue

from .errors import BusConnectionError
from .events import BROKER_OPTIONS, EventBus

log = logging.getLogger(__name__)
PREFETCH = 100  # unacknowledged messages per consumer: acks overlap the next deliveries
ACK_DELAY = 0.005  # seconds a handled message waits to be acknowledged with those after it
_UNREACHABLE = (AMQPError, OSError, ConnectionError, TimeoutError)


async def raw_message(msg: StreamMessage[Any]) -> Any:
    """Hand the handler aio-pika's message, its body undecoded: `EventBus` validates it and
    dead-letters what is malformed (FastStream's own JSON decoding would raise first, and the
    message would be requeued forever), and `InOrder` acknowledges it."""
    return msg.raw_message


class InOrder:
    """Handles one channel's deliveries one at a time, in delivery order, acknowledging in bulk.

    aio-pika runs each delivery as a task of its own, so with several unacknowledged at once they
    would be handled concurrently and out of order. A FIFO lock taken first thing in the handler
    puts them back in line: FastStream reaches the handler without suspending (apply_types off, a
    decoder that does no I/O), so the tasks queue on the lock in delivery order; the tags are
    checked anyway. One ack per message was a third of a subscriber's CPU (a socket write each,
    and as much work again for the broker), so a handled message is acknowledged ``ACK_DELAY``
    later, together with those handled meanwhile (``multiple=True``: every tag up to the last).
    A crash in between only means those few are delivered again, as at-least-once allows.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._last_tag = -1
        self._unacked: aio_pika.abc.AbstractIncomingMessage | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, message: aio_pika.abc.AbstractIncomingMessage,
                  handle: Callable[[], Awaitable[None]]) -> None:
        async with self._lock:
            tag = message.delivery_tag or 0
            in_order = tag > self._last_tag
            if not in_order:  # the channel was reopened (tags restart), or out of order: no bulk ack
                log.warning("delivery tag %d after %d: acknowledging one by one", tag, self._last_tag)
                await self.flush()
            self._last_tag = tag
            try:
                await handle()
            except BaseException:
                await self.flush()
                await message.nack(requeue=True)
                raise
            if not in_order:
                await message.ack()
                return
            self._unacked = message
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    _tasks: set[asyncio.Future[None]] = set()  # keeps the flush tasks alive until they are done

    async def flush(self) -> None:
        """Acknowledge every message handled so far (at once; also when stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._unacked is not None:
            pending, self._unacked = self._unacked, None
            try:
                await pending.ack(multiple=True)
            except Exception as exc:  # its channel is gone: the broker redelivers those messages
                log.warning("could not acknowledge handled messages: %r", exc)


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
        self.broker = RabbitBroker(url, **BROKER_OPTIONS)
        self._in_order = [InOrder()]
        broadcasts = self._in_order[0]

        async def on_broadcast(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            await broadcasts.run(msg, lambda: self._fan_out_async(msg.body))

        mine = RabbitQueue(f"{p}.bc.{self.consumer}", exclusive=True, auto_delete=True, routing_key="#")
        self.broker.subscriber(mine, self.broadcast_exchange, channel=Channel(prefetch_count=PREFETCH),
                               ack_policy=AckPolicy.MANUAL, decoder=raw_message)(on_broadcast)

    async def _fan_out_async(self, body: bytes) -> None:
        self._fan_out(body)

    def _declare_durable(self) -> None:
        events = InOrder()
        self._in_order.append(events)

        async def on_event(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            await events.run(msg, lambda: self._deliver(msg.body))

        # Each consumer on a channel of its own (a Channel object each): delivery tags then count
        # this consumer's deliveries only, which is what `InOrder`'s bulk acks rely on.
        self.broker.subscriber(self.queue, self.exchange, channel=Channel(prefetch_count=PREFETCH),
                               ack_policy=AckPolicy.MANUAL, decoder=raw_message)(on_event)

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
        connection: aio_pika.abc.AbstractRobustConnection | None = self.broker._connection
        if connection is None:
            raise BusConnectionError(f"not connected to RabbitMQ at {self.url}")
        return connection

    async def _stop(self) -> None:
        for in_order in self._in_order:
            await in_order.flush()
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
