"""The RabbitMQ backend of `EventBus`, on aiormq (the AMQP 0-9-1 client underneath aio-pika).

- Durable events: a durable topic exchange ``<prefix>.events``, routing key = event type. Each
  service has one durable queue, ``<prefix>.svc.<service>``, bound once per pattern it subscribes
  to (``*`` stays, ``>`` becomes ``#``), limited by ``x-message-ttl`` and ``x-max-length``; its
  replicas are competing consumers of that queue, a quorum queue (see below). Messages are
  persistent and published with confirms; a replica's connection dropping puts its
  unacknowledged messages back at once.
  RabbitMQ has no per-message ack deadline (only the broker-wide ``consumer_timeout``), so a long
  handler needs no keep-alive here.
- Dead letters: a durable queue per service, ``<prefix>.dead.<service>``, fed through the default
  exchange.
- Broadcasts: a topic exchange ``<prefix>.broadcast``; each process binds one exclusive,
  auto-deleted queue with ``#``, consumes it without acks (fire and forget) and fans out in memory.
- A dropped connection is re-established in the background (jittered, capped backoff), with the
  whole topology and the consumers; publishing meanwhile raises `BusConnectionError` at once.

Why not FastStream's `RabbitBroker`, as on Redis and NATS: measured on this machine
(``meetmesh bench events --backend amqp`` and ``bench/raw_aiormq_latency.py``), three subscribing
services at 1,000 events/s had a p99 of 436 ms through FastStream, 11-100 ms through bare aio-pika,
and 2.6 ms through aiormq with the handling below. On two cores the broker and four Python
processes share the CPU, and every microsecond per message shows up in the tail: FastStream and
aio-pika each add a layer of objects and tasks per delivery, and one ack per message doubled the
broker's work. Here a delivery is one aiormq callback that queues it; one task per consumer
handles them in order and acknowledges in bulk.

Quorum queues rather than classic ones, for the services' queues and dead letters: every message
is on disk (a Raft log, fsynced before the publish is confirmed), and on this two-core machine
they took less of the broker's CPU than persistent messages in classic queues (0.59-0.68 of a core
against 0.76-0.79 at 1,000 events/s to three services) with a lower p99 in four of five paired runs of
``bench/raw_aiormq_latency.py`` (4.2-8.7 ms against 7.5-17.5). They also need RabbitMQ 3.10 or
later for the retention by age (``x-message-ttl``).

Because a queue only receives what was published after it was bound, a service's durable
subscription begins the first time that service starts, as on the other backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
import aiormq.abc
from aiormq.exceptions import AMQPError

from ..backoff import backoff
from ..errors import BusConnectionError, ConfigError
from .base import EventBus

log = logging.getLogger(__name__)
PREFETCH = 100  # unacknowledged messages per consumer: acks overlap the next deliveries
# Seconds a handled message waits to be acknowledged with those after it. 25 ms rather than 5: in
# eight pairs of `meetmesh bench events --backend amqp` runs taken in turn, subscriber CPU per event
# was lower with 25 in all eight (2-15 %, the broker having a fifth of the acks to process) and p99
# in six. A crash redelivers at most that much more (at-least-once); PREFETCH stays well above what
# arrives meanwhile at 1,000 events/s.
ACK_DELAY = 0.025
GRACE = 5.0  # seconds `stop` lets the event in hand finish
RECONNECT_MAX = 5.0  # seconds, the longest wait between reconnection attempts
_UNREACHABLE = (AMQPError, OSError, ConnectionError, TimeoutError)
PERSISTENT = aiormq.spec.Basic.Properties(delivery_mode=2, content_type="application/json")
TRANSIENT = aiormq.spec.Basic.Properties(delivery_mode=1, content_type="application/json")
QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}  # services' queues, dead letters: see the docstring


def amqp_pattern(pattern: str) -> str:
    """Our topic pattern in AMQP's syntax: ``>`` (the rest) is ``#``; ``*`` is the same."""
    return pattern[:-1] + "#" if pattern.endswith(">") else pattern


class InOrder:
    """One consumer's deliveries, handled one at a time in delivery order, acknowledged in bulk.

    aiormq runs the consumer callback as a task per delivery; the callback only appends the
    message to a queue (tasks start in the order they were created, so the queue keeps delivery
    order), and one task handles the queue. One ack per message was a third of a subscriber's CPU
    (a socket write each, and as much work again for the broker), so a handled message is
    acknowledged ``ACK_DELAY`` later, together with those handled meanwhile (``multiple=True``:
    every tag up to the last). A crash in between only means those few are delivered again, as
    at-least-once allows. A message whose handling raised is acknowledged up to the one before it
    and handed back (``nack``, requeued).
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel,
                 handle: Callable[[bytes], Awaitable[None]]) -> None:
        self.channel = channel
        self.handle = handle
        self.tag: str | None = None  # the consumer tag, once consuming
        self.inbox: asyncio.Queue[aiormq.abc.DeliveredMessage] = asyncio.Queue()
        self.handled = 0  # the last delivery tag handled and not yet acknowledged (0: none)
        self._idle = asyncio.Event()
        self._idle.set()
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Future[None] | None = None
        self._task = asyncio.create_task(self._run(), name="amqp-events-consumer")

    async def consume(self, queue: str, **options: Any) -> None:
        ok = await self.channel.basic_consume(queue, self.deliver, **options)
        self.tag = ok.consumer_tag

    async def deliver(self, message: aiormq.abc.DeliveredMessage) -> None:
        """aiormq's consumer callback."""
        self.inbox.put_nowait(message)

    async def _run(self) -> None:
        while True:
            message = await self.inbox.get()
            self._idle.clear()
            tag = message.delivery_tag or 0
            try:
                await self.handle(message.body)
            except Exception as exc:  # the dead letter could not be written: deliver it again
                log.warning("event left for redelivery: %r", exc)
                await self.flush()
                with contextlib.suppress(*_UNREACHABLE):
                    await self.channel.basic_nack(tag, requeue=True)
            else:
                self.handled = tag
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._flush_soon)
            finally:
                self._idle.set()

    def _flush_soon(self) -> None:
        self._timer = None
        self._flushing = asyncio.ensure_future(self.flush())

    async def flush(self) -> None:
        """Acknowledge every message handled so far (at once; also when stopping)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.handled:
            tag, self.handled = self.handled, 0
            try:
                await self.channel.basic_ack(tag, multiple=True)
            except _UNREACHABLE as exc:  # the channel is gone: the broker delivers those again
                log.warning("could not acknowledge handled events: %r", exc)

    def abandon(self) -> None:
        """The channel is gone: its deliveries come again, elsewhere or to a new consumer."""
        self._task.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def stop(self, grace: float) -> None:
        """Stop consuming; let the message in hand finish (up to ``grace`` seconds); acknowledge
        what was handled. Messages still queued stay unacknowledged: the broker delivers them again."""
        if self.tag is not None and not self.channel.is_closed:
            with contextlib.suppress(*_UNREACHABLE):
                await self.channel.basic_cancel(self.tag)
        while not self.inbox.empty():
            self.inbox.get_nowait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._flushing is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._flushing
        await self.flush()


class AmqpEventBus(EventBus):
    scheme = "amqp"

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        p = self.prefix
        self.exchange = f"{p}.events"
        self.broadcast_exchange = f"{p}.broadcast"
        self.queue = f"{p}.svc.{self.service}"
        self.dead_queue = f"{p}.dead.{self.service}"
        self.broadcast_queue = f"{p}.bc.{self.consumer}"
        self.queue_arguments: dict[str, Any] = dict(QUORUM)
        if self.retention.max_age is not None:
            self.queue_arguments["x-message-ttl"] = int(self.retention.max_age * 1000)
        if self.retention.max_count is not None:
            self.queue_arguments["x-max-length"] = self.retention.max_count
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._confirmed: aiormq.abc.AbstractChannel | None = None  # durable publishes, with confirms
        self._fire: aiormq.abc.AbstractChannel | None = None  # broadcasts, without
        self._consumers: list[InOrder] = []
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self.reconnects = 0

    # -- connection -------------------------------------------------------------------------------

    async def _start(self) -> None:
        self._stopping = False
        try:
            await self._connect()
        except _UNREACHABLE as exc:
            raise BusConnectionError(f"cannot reach RabbitMQ for events at {self.shown_url}: "
                                     f"{exc!r}") from exc
        self._watcher = asyncio.create_task(self._keep_connected(), name=f"amqp-events-{self.service}")

    async def _connect(self) -> None:
        """Connect; declare the exchanges, the dead-letter queue and (if subscribed) the service's
        queue and bindings; start both consumers. All or nothing: a failure closes the connection."""
        connection = await aiormq.connect(self.url, client_properties={"connection_name": self.consumer})
        try:
            confirmed = await connection.channel(publisher_confirms=True)
            fire = await connection.channel(publisher_confirms=False)
            await confirmed.exchange_declare(self.exchange, exchange_type="topic", durable=True)
            await confirmed.exchange_declare(self.broadcast_exchange, exchange_type="topic")
            await confirmed.queue_declare(self.dead_queue, durable=True, arguments=QUORUM)
            consumers = []
            if self._subscriptions:
                channel = await connection.channel()
                await self._declare_queue(channel)
                for pattern in self.patterns:
                    await channel.queue_bind(self.queue, self.exchange, routing_key=amqp_pattern(pattern))
                await channel.basic_qos(prefetch_count=PREFETCH)
                events = InOrder(channel, self._deliver)
                consumers.append(events)
                await events.consume(self.queue)
            await fire.queue_declare(self.broadcast_queue, exclusive=True, auto_delete=True)
            await fire.queue_bind(self.broadcast_queue, self.broadcast_exchange, routing_key="#")
            await fire.basic_consume(self.broadcast_queue, self._on_broadcast, no_ack=True)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        self._connection, self._confirmed, self._fire = connection, confirmed, fire
        self._consumers = consumers

    async def _declare_queue(self, channel: aiormq.abc.AbstractChannel) -> None:
        try:
            await channel.queue_declare(self.queue, durable=True, arguments=self.queue_arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise ConfigError(f"RabbitMQ queue {self.queue!r} exists with other arguments than this "
                              f"service's {self.queue_arguments} (its retention, or a classic queue "
                              f"from before quorum queues): delete it or keep the retention it was "
                              f"made with ({exc})") from exc

    async def _on_broadcast(self, message: aiormq.abc.DeliveredMessage) -> None:
        self._fan_out(message.body)

    async def _keep_connected(self) -> None:
        """Wait for the connection to drop; then connect again, with backoff, until it works."""
        while not self._stopping:
            connection = self._connection
            assert connection is not None
            await asyncio.wait([connection.closing])
            if self._stopping:
                return
            log.warning("RabbitMQ connection for events at %s lost: reconnecting", self.shown_url)
            for consumer in self._consumers:
                consumer.abandon()
            failures = 0
            while not self._stopping:
                try:
                    await self._connect()
                except _UNREACHABLE as exc:
                    failures += 1
                    delay = backoff(failures, cap=RECONNECT_MAX)
                    log.warning("RabbitMQ at %s still unreachable (%r): retrying in %.1f s",
                                self.shown_url, exc, delay)
                    await asyncio.sleep(delay)
                    continue
                self.reconnects += 1
                log.warning("RabbitMQ connection for events at %s restored", self.shown_url)
                break

    def _channel(self, confirmed: bool) -> aiormq.abc.AbstractChannel:
        channel = self._confirmed if confirmed else self._fire
        if channel is None or channel.is_closed:
            raise BusConnectionError(f"not connected to RabbitMQ at {self.shown_url} (reconnecting)")
        return channel

    async def ping(self, timeout: float = 1.0) -> bool:
        if not self._started:
            return False
        try:
            channel = self._channel(confirmed=False)
            await asyncio.wait_for(channel.exchange_declare(self.broadcast_exchange, passive=True), timeout)
            return True
        except Exception:
            return False

    async def _stop(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        connection = self._connection
        await asyncio.gather(*(consumer.stop(GRACE) for consumer in self._consumers))
        self._consumers = []
        if connection is not None:
            with contextlib.suppress(*_UNREACHABLE):
                await connection.close()
        self._connection = self._confirmed = self._fire = None

    # -- sending ----------------------------------------------------------------------------------

    async def _publish(self, type: str, body: bytes) -> None:
        await self._send(True, self.exchange, type, body, "publish events")

    async def _broadcast(self, topic: str, body: bytes) -> None:
        await self._send(False, self.broadcast_exchange, topic, body, "broadcast")

    async def _write_dead(self, service: str, body: bytes) -> None:
        await self._send(True, "", f"{self.prefix}.dead.{service}", body, "dead-letter an event")

    async def _send(self, confirmed: bool, exchange: str, routing_key: str, body: bytes, what: str) -> None:
        channel = self._channel(confirmed)
        try:
            await channel.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                        properties=PERSISTENT if confirmed else TRANSIENT)
        except _UNREACHABLE as exc:
            raise BusConnectionError(f"cannot {what} to RabbitMQ at {self.shown_url}: {exc!r}") from exc

    # -- dead letters and teardown ----------------------------------------------------------------

    async def _read_dead(self, service: str, limit: int) -> list[bytes]:
        """A peek: take up to ``limit`` messages unacknowledged, then hand them all back in order
        (closing the channel requeues them at their places)."""
        channel = await self._open_channel()
        try:
            await channel.queue_declare(f"{self.prefix}.dead.{service}", durable=True, arguments=QUORUM)
            bodies: list[bytes] = []
            while len(bodies) < limit:
                message = await channel.basic_get(f"{self.prefix}.dead.{service}", no_ack=False)
                if not isinstance(message.delivery, aiormq.spec.Basic.GetOk):
                    break
                bodies.append(message.body)
            return bodies
        finally:
            with contextlib.suppress(*_UNREACHABLE):
                await channel.close()

    async def _open_channel(self) -> aiormq.abc.AbstractChannel:
        connection = self._connection
        if connection is None or connection.is_closed:
            raise BusConnectionError(f"not connected to RabbitMQ at {self.shown_url} (reconnecting)")
        return await connection.channel()

    async def drop(self) -> None:
        """Delete the exchanges and this service's queues (AMQP cannot list other services' queues)."""
        self._check_started()
        channel = await self._open_channel()  # a fresh channel: a failed delete closes it
        try:
            for name in (self.queue, self.dead_queue):
                await channel.queue_delete(name)
            for exchange in (self.exchange, self.broadcast_exchange):
                await channel.exchange_delete(exchange)
        finally:
            with contextlib.suppress(*_UNREACHABLE):
                await channel.close()
