"""The Redis backend of `EventBus`: one stream of durable events read by one consumer group per
service through FastStream's `RedisBroker`, and pub/sub for broadcasts.

- Durable events go to one stream (``mm:{events}:log``), capped by count on every XADD (approximate
  MAXLEN) and by age by a trim every few seconds (XTRIM MINID). One stream keeps per-topic order
  and lets a service's one group take every pattern it subscribes to; each replica filters by type
  in memory (a meeting bus publishes a few thousand events a second, which every service can read).
- Each service is a consumer group created at the end of the stream (``$``) the first time it
  starts, so a restart catches up on everything since its last ack. Two FastStream subscribers
  feed one replica: one reads new entries (XREADGROUP ``>``), the other reclaims entries left
  unacknowledged for ``ack_wait`` by a replica that died (XAUTOCLAIM). A replica still working on an
  event re-claims it for itself every ``ack_wait / 3`` (XCLAIM ... JUSTID), so a long handler is
  not taken from it.
- Publishing coalesces: concurrent ``publish`` calls share one pipeline (one round trip) while the
  previous one is in flight; each call still returns only once its own XADD is acknowledged. This
  is what FastStream does not offer for streams (its ``publish_batch`` is for lists), and what takes
  publishing from one round trip per event to tens of thousands of events per second. Each entry
  is in FastStream's own message format, encoded by FastStream, so its subscribers read it as
  theirs; the connection packs commands with hiredis (see `connection.HiredisPackingConnection`).
- Broadcasts are plain PUBLISH commands in that same pipeline, read by one PSUBSCRIBE per process
  with redis-py directly: FastStream's channel publisher and subscriber cost three times as much
  CPU per message (figures at `_listen`, `_broadcast`), and a gateway receives every task update of
  the cluster. The message is our `BroadcastMessage` JSON, not FastStream's format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from faststream import AckPolicy
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.annotations import RedisBatchStreamMessage, RedisStreamMessage
from faststream.redis.message import DATA_KEY
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from ..connection import UNREACHABLE, HiredisPackingConnection
from ..errors import BusConnectionError
from ..keys import EventKeys
from .base import BROKER_OPTIONS, EventBus, message_and_body, message_itself

log = logging.getLogger(__name__)


class RedisEventBus(EventBus):
    scheme = "redis"

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.keys = EventKeys(self.prefix)
        # Every connection of ours is named, so `_stop` can find any Redis has not yet let go of.
        self._client_name = "mm-events:" + re.sub(r"[^\w.:-]", "_", self.consumer)
        self.broker = RedisBroker(url, connection_class=HiredisPackingConnection,
                                  client_name=self._client_name, **BROKER_OPTIONS)
        self._format = self.broker.message_format
        # (channel, body, done): channel None = a durable event (XADD), else a broadcast (PUBLISH)
        self._pending: list[tuple[str | None, bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None

    def _declare_durable(self) -> None:
        stream, group = self.keys.log, self.service

        def toucher(ids: list[bytes]) -> Callable[[], Awaitable[None]]:
            async def touch() -> None:  # re-claiming for ourselves resets the entries' idle time
                await self._redis.xclaim(stream, group, self.consumer, 0, ids, justid=True)
            return touch

        async def on_batch(decoded: tuple[RedisBatchStreamMessage, list[Any]]) -> None:
            msg, items = decoded
            async with self._kept_alive(toucher(msg.raw_message["message_ids"])):
                for item in items:
                    await self._deliver(item)

        async def on_reclaimed(msg: RedisStreamMessage) -> None:
            async with self._kept_alive(toucher(msg.raw_message["message_ids"])):
                await self._deliver(msg.body)

        # Read new entries 100 at a time (one XREADGROUP, one XACK for all of them), in order.
        fresh = StreamSub(stream, group=group, consumer=self.consumer, polling_interval=1000,
                          batch=True, max_records=100)
        self.broker.subscriber(stream=fresh, ack_policy=AckPolicy.NACK_ON_ERROR,
                               decoder=message_and_body)(on_batch)
        idle_ms = int(self.ack_wait * 1000)
        reclaim = StreamSub(stream, group=group, consumer=self.consumer, polling_interval=idle_ms // 2,
                            min_idle_time=idle_ms)
        self.broker.subscriber(stream=reclaim, ack_policy=AckPolicy.NACK_ON_ERROR,
                               decoder=message_itself)(on_reclaimed)

    @property
    def _redis(self) -> Any:
        return self.broker._connection

    async def _start(self) -> None:
        if self._subscriptions:
            self._declare_durable()
        try:
            await self.broker.start()
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            await pubsub.psubscribe(self.keys.broadcast_pattern)
        except UNREACHABLE as exc:
            raise BusConnectionError(f"cannot reach Redis for events at {self.shown_url}: {exc}") from exc
        self._listener = asyncio.create_task(self._listen(pubsub))
        if self.retention.max_age is not None:
            self._janitor = asyncio.create_task(self._trim_by_age(self.retention.max_age))

    async def _stop(self) -> None:
        for task in (self._janitor, self._listener):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.broker.stop()
        await self._let_go()

    async def _let_go(self) -> None:
        """Make sure Redis holds no read of ours once `stop` returns, then hand back what we were
        given and did not acknowledge.

        FastStream's stop cancels its blocking ``XREADGROUP`` and closes the connection, but Redis
        may not have dropped that read yet when the next event is added: seen in the test suite, the
        event then went to this stopped consumer and waited ``ack_wait`` (30 s) to be reclaimed.
        So our connections still listed are killed (``CLIENT KILL`` frees them before it answers),
        and entries left pending to this consumer are marked idle for ``ack_wait``: the next
        reclaim of any replica (one runs as a replica starts) takes them at once. Best effort: a
        Redis that refuses ``CLIENT`` commands (ACLs) falls back on ``ack_wait``.
        """
        redis = Redis.from_url(self.url)
        try:
            with contextlib.suppress(ResponseError):
                for client in await redis.client_list():
                    if client.get("name") == self._client_name:
                        with contextlib.suppress(ResponseError):
                            await redis.client_kill_filter(_id=client["id"])
            if self._subscriptions:
                pending = await redis.xpending_range(self.keys.log, self.service, "-", "+", 1000,
                                                     consumername=self.consumer)
                ids = [p["message_id"] for p in pending]
                if ids:
                    await redis.xclaim(self.keys.log, self.service, self.consumer, 0, ids,
                                       idle=int(self.ack_wait * 1000), justid=True)
        except (*UNREACHABLE, ResponseError) as exc:  # nothing lost: reclaimed after ack_wait
            if "NOGROUP" not in str(exc):  # NOGROUP: the stream is gone (dropped), and all with it
                log.warning("could not hand back unacknowledged events of %s: %r", self.consumer, exc)
        finally:
            await redis.aclose()

    async def _listen(self, pubsub: Any) -> None:
        """The process's one broadcast subscription (PSUBSCRIBE), fanned out in memory. Read with
        redis-py directly: FastStream's channel subscriber cost 171 us of CPU per message here
        against 45 us, and a gateway receives every task update of the cluster."""
        try:
            while True:
                try:
                    message = await pubsub.get_message(timeout=None)
                except UNREACHABLE as exc:
                    log.warning("broadcast subscription lost (%r); resubscribing", exc)
                    await asyncio.sleep(0.5)
                    await pubsub.psubscribe(self.keys.broadcast_pattern)
                    continue
                if message is not None and message["type"] == "pmessage":
                    self._fan_out(message["data"])
        finally:
            await pubsub.aclose()

    async def _trim_by_age(self, max_age: float) -> None:
        every = min(max_age / 4, 10.0)
        while True:
            oldest = int((time.time() - max_age) * 1000)
            try:
                await self._redis.xtrim(self.keys.log, minid=f"{oldest}-0", approximate=True)
            except UNREACHABLE as exc:
                log.warning("could not trim the event stream by age: %r", exc)
            await asyncio.sleep(every)

    # -- publishing: one pipeline for all the calls waiting ---------------------------------------

    async def _publish(self, type: str, body: bytes) -> None:
        await self._send(None, body)

    async def _send(self, channel: str | None, body: bytes) -> None:
        await self._send_all([(channel, body)])

    async def _send_all(self, items: list[tuple[str | None, bytes]]) -> None:
        """Queue these for the next pipeline (in order); wait until it has run."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.extend((channel, body, done) for channel, body in items)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                pipe = self._redis.pipeline(transaction=False)
                for channel, body, _ in batch:
                    if channel is not None:
                        pipe.publish(channel, body)
                        continue
                    # FastStream's wire format, encoded by FastStream, without its per-call publish
                    # machinery (command object, middlewares: half of a publish's client CPU).
                    data = await self._format.encode(message=body, reply_to=None, headers=None,
                                                     correlation_id="")
                    pipe.xadd(self.keys.log, {DATA_KEY: data}, maxlen=self.retention.max_count,
                              approximate=True)
                await pipe.execute()
            except Exception as exc:
                error: BaseException = exc
                if isinstance(exc, UNREACHABLE):
                    error = BusConnectionError(f"cannot publish events to Redis at {self.shown_url}: {exc}")
                    error.__cause__ = exc
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(error)
            else:
                for _, _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def _broadcast(self, topic: str, body: bytes) -> None:
        # Plain PUBLISH in the shared pipeline: FastStream's publish cost 186 us of CPU per
        # broadcast against 57 (7 pipelined), and the relay sends three per task.
        await self._send(self.keys.broadcast(topic), body)

    async def _broadcast_batch(self, bodies: list[tuple[str, bytes]]) -> None:
        await self._send_all([(self.keys.broadcast(topic), body) for topic, body in bodies])

    # -- dead letters -----------------------------------------------------------------------------

    async def _write_dead(self, service: str, body: bytes) -> None:
        await self._redis.xadd(self.keys.dead(service), {"dead": body}, maxlen=self.retention.max_count)

    async def _read_dead(self, service: str, limit: int) -> list[bytes]:
        entries = await self._redis.xrange(self.keys.dead(service), count=limit)
        return [fields[b"dead"] for _, fields in entries]

    async def drop(self) -> None:
        self._check_started()
        for pattern in self.keys.all_patterns():
            async for key in self._redis.scan_iter(match=pattern, count=1000):
                await self._redis.delete(key)
