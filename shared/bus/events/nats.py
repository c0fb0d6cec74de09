"""The NATS JetStream backend of `EventBus`, through FastStream's `NatsBroker`.

- Durable events: one JetStream stream (``<prefix>-events``, subjects ``<prefix>.ev.>``, limited by
  ``max_age`` and ``max_msgs``), one durable push consumer per service whose deliver group is the
  service (replicas share it), created
  at the stream's end the first time the service starts (deliver policy ``new``), with explicit
  acks and ``ack_wait``; JetStream redelivers what a dead replica left unacknowledged. A replica
  still working on an event tells the server so (``+WPI``, in-progress) every ``ack_wait / 3``.
- Dead letters: a second stream (``<prefix>-dead``, subjects ``<prefix>.dead.<service>``).
- Broadcasts: core NATS subjects ``<prefix>.bc.<topic>``; each process subscribes once to
  ``<prefix>.bc.>`` and fans out in memory.
"""

from __future__ import annotations

import logging
from typing import Any

from faststream import AckPolicy
from faststream.nats import ConsumerConfig, DeliverPolicy, JStream, NatsBroker
from faststream.nats.annotations import NatsMessage
from nats.errors import Error as NatsError
from nats.js.errors import BadRequestError, NotFoundError

from ..errors import BusConnectionError
from .base import BROKER_OPTIONS, EventBus, message_itself

log = logging.getLogger(__name__)
_UNREACHABLE = (NatsError, OSError, TimeoutError)
_STREAM_NAME_IN_USE = 10058  # JetStream: "stream name already in use with a different configuration"


class NatsEventBus(EventBus):
    scheme = "nats"

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        p = self.prefix
        self.subject_prefix = f"{p}.ev."
        self.stream = JStream(f"{p}-events", subjects=[f"{p}.ev.>"], max_age=self.retention.max_age,
                              max_msgs=self.retention.max_count)
        self.dead_stream = JStream(f"{p}-dead", subjects=[f"{p}.dead.>"], max_msgs=self.retention.max_count)
        self.broker = NatsBroker(url, connect_timeout=3, max_reconnect_attempts=3, **BROKER_OPTIONS)

        async def on_broadcast(msg: NatsMessage) -> None:
            self._fan_out(msg.body)

        self.broker.subscriber(f"{p}.bc.>", decoder=message_itself)(on_broadcast)

    def _declare_durable(self) -> None:
        async def on_event(msg: NatsMessage) -> None:
            raw = msg.raw_message
            async with self._kept_alive(raw.in_progress):
                await self._deliver(raw.data)

        # A push consumer with a deliver group: the server sends as soon as an event is stored
        # (no fetch round trips), spreads them over the service's replicas, and holds back once
        # `max_ack_pending` are unacknowledged. (Pull batches were tried first: nats-py can
        # raise a bare asyncio.TimeoutError midway through a batch, which drops FastStream's
        # partial batch until ack_wait expires.)
        config = ConsumerConfig(ack_wait=self.ack_wait, deliver_policy=DeliverPolicy.NEW,
                                max_ack_pending=1_000)
        self.broker.subscriber(
            f"{self.prefix}.ev.>", queue=self.service, stream=self.stream,  # the queue is the durable name
            config=config, ack_policy=AckPolicy.NACK_ON_ERROR, decoder=message_itself,
        )(on_event)

    @property
    def _js(self) -> Any:
        return self.broker.config.connection_state.stream

    async def _start(self) -> None:
        if self._subscriptions:
            self._declare_durable()
        try:
            await self.broker.connect()
            # nats-py gives up for good after max_reconnect_attempts (3 here, ~6 s): an outage of the
            # broker longer than that left this bus dead until the process restarted. The bound is
            # for start-up only (a wrong URL fails in seconds); once connected, reconnect forever.
            self.broker.connection.options["max_reconnect_attempts"] = -1
            # Declared whether or not this process subscribes: a publisher needs the stream too.
            for stream in (self.stream, self.dead_stream):
                await self._declare(stream)
            await self.broker.start()
        except _UNREACHABLE as exc:
            raise BusConnectionError(f"cannot reach NATS for events at {self.shown_url}: {exc!r}") from exc

    async def _declare(self, stream: JStream) -> None:
        """Create the stream, or bring its limits to ours (the last process started with new
        retention settings wins, as on Redis)."""
        try:
            await self._js.add_stream(config=stream.config, subjects=list(stream.subjects))
        except BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
            await self._js.update_stream(config=stream.config, subjects=list(stream.subjects))

    async def _stop(self) -> None:
        await self.broker.stop()

    async def _publish(self, type: str, body: bytes) -> None:
        try:
            await self.broker.publish(body, f"{self.subject_prefix}{type}", stream=self.stream.name)
        except _UNREACHABLE as exc:
            raise BusConnectionError(f"cannot publish events to NATS at {self.shown_url}: {exc!r}") from exc

    async def _broadcast(self, topic: str, body: bytes) -> None:
        try:
            await self.broker.publish(body, f"{self.prefix}.bc.{topic}")
        except _UNREACHABLE as exc:
            raise BusConnectionError(f"cannot broadcast on NATS at {self.shown_url}: {exc!r}") from exc

    async def _write_dead(self, service: str, body: bytes) -> None:
        await self._js.publish(f"{self.prefix}.dead.{service}", body, stream=self.dead_stream.name)

    async def _read_dead(self, service: str, limit: int) -> list[bytes]:
        subject = f"{self.prefix}.dead.{service}"
        info = await self._js.stream_info(self.dead_stream.name)
        out: list[bytes] = []
        seq = info.state.first_seq
        while seq <= info.state.last_seq and len(out) < limit:
            try:
                msg = await self._js.get_msg(self.dead_stream.name, seq=seq)
            except NotFoundError:  # deleted, or trimmed meanwhile
                msg = None
            if msg is not None and msg.subject == subject and msg.data is not None:
                out.append(msg.data)
            seq += 1
        return out

    async def drop(self) -> None:
        self._check_started()
        for stream in (self.stream, self.dead_stream):
            try:
                await self._js.delete_stream(stream.name)
            except NotFoundError:
                pass
