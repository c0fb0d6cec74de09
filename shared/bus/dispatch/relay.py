"""The task relay: one gateway instance at a time broadcasts every task status change, in stream order.

- Leadership is a lease (``DispatchKeys.relay_lease``) taken with ``SET <instance> NX PX <ttl>``, renewed
  by its holder every ttl/3 (``lua/relay-renew-1.lua``) and released on a clean stop
  (``lua/relay-release-1.lua``); the others try to take it every ttl/3. A holder that cannot renew
  stops when the lease ends by its own clock, before Redis lets another take it, and no blocking
  read of its outlasts the lease.
- Every holder reads the status streams of the routed queues as one consumer, ``leader``, of the group
  ``relay``: first that consumer's pending entries (the last holder read them and did not acknowledge
  them), then new ones; each is acknowledged once broadcast (a `TaskUpdate` on ``task.<task_id>``).
- So updates come in stream order, at least once: after a takeover a few may come again. Each
  carries its stream entry id as ``seq``; a receiver drops repeats with `SeqFilter`.
- With ``broadcast="followed"``, processes that want the updates register as *followers*
  (`Relay.follow`, renewed while `run()` runs; a zset of instance -> until), and the holder
  broadcasts a batch only if some instance other than itself follows: a lone gateway hands its
  own sessions every update directly and sends nothing through the broker. The check rides in the
  read's pipeline, after the read: a follower registers before it submits anything, so any entry a
  read returns for it was written after it registered, and the check that follows the read sees
  it. A batch that needs no broadcast is acknowledged in the next read's pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import from_json
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from ..backoff import backoff
from ..errors import BusError, ConfigError, InvalidMessage
from ..events.base import EventBus, check_topic
from ..keys import DEFAULT_PREFIX, DispatchKeys
from ..queue.message import TaskStatus
from ..queue.queue import Queue
from ..queue.records import parse_error
from ..queue.scripts import Scripts
from .updates import TaskUpdate, UpdateSink, _built_update

log = logging.getLogger(__name__)

RELAY_GROUP = "relay"
LEADER = "leader"          # the one consumer name every lease holder reads as
LEASE_SECONDS = 3.0        # the relay lease's time to live; renewed (or retried) every third of it
RELAY_BATCH = 100          # stream entries per read, per queue
RELAY_BLOCK_MS = 1000      # at most; never past the lease
TASK_CACHE = 50_000        # tasks whose type, owner and meeting the relay remembers
FOLLOW_SECONDS = 30.0      # a follower's registration lasts this long unless renewed (every second)
FOLLOW_SLACK_MS = 30_000   # ...and counts this much longer: instances' clocks may disagree that much
BROADCAST_MODES = ("always", "followed")
_CHANGE_FIELDS = {"task_id", "queue", "status", "type", "owner", "meeting_id", "progress", "at"}
Entry = tuple[str, str, dict[str, str] | None]  # stream, entry id, fields (None once trimmed)


@dataclass
class _Batch:
    """What one read of the status streams comes to: updates to broadcast (topic, data), status
    events, tasks that finished, and the entries to acknowledge once broadcast."""

    broadcasts: list[tuple[str, Any]] = field(default_factory=list)  # empty if nobody else wants them
    changes: list[dict[str, Any]] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    acked: dict[str, list[str]] = field(default_factory=dict)

    def drop(self) -> None:
        """Not broadcast: acknowledge nothing, so every entry is read again."""
        self.acked.clear()


class Relay:
    """Broadcasts the status changes of ``queues`` while this instance (``instance``, unique per
    process) holds the relay lease. `run()` until `stop()`; ``ready`` is set once the consumer group
    exists, so changes from then on are relayed (by whichever instance holds the lease).

    ``local``, if set, is called with each update as it is relayed, before it is broadcast: a
    gateway holding the lease hands its own sessions their updates at once, without the round trip
    through the broker, and drops the broadcast copy when it comes back (by ``seq``). It must not
    block; what it raises is logged and relaying goes on.

    ``broadcast``: ``"always"`` (every update goes to the broker, for any listener), or
    ``"followed"``: only while an instance other than this one has registered with `follow` (see
    the module's docstring). Every gateway follows; a process that listens to ``task.*`` broadcasts
    some other way must follow too.
    """

    def __init__(self, redis: Redis, events: EventBus, queues: Iterable[Queue], *, instance: str,
                 prefix: str = DEFAULT_PREFIX, lease_seconds: float = LEASE_SECONDS,
                 publish_status_events: bool = False, broadcast: str = "always") -> None:
        if not (isinstance(lease_seconds, int | float) and math.isfinite(lease_seconds)
                and lease_seconds >= 0.1):
            raise ConfigError(f"relay lease_seconds {lease_seconds!r}: a number of seconds >= 0.1")
        if broadcast not in BROADCAST_MODES:
            raise ConfigError(f"relay broadcast {broadcast!r}: one of {', '.join(BROADCAST_MODES)}")
        self.broadcast = broadcast
        self.redis = redis
        self.events = events
        self.instance = instance
        self.keys = DispatchKeys(prefix)
        self.lease_seconds = float(lease_seconds)
        self.renew_every = self.lease_seconds / 3
        self._lease_ms = math.ceil(self.lease_seconds * 1000)
        self.publish_status_events = publish_status_events
        self.ready = asyncio.Event()
        self._streams = {q.keys.events: q for q in queues}
        self._scripts = Scripts(redis)
        self._tasks: dict[str, tuple[str | None, str | None, str | None]] = {}  # id -> type, owner, meeting
        self._until = 0.0  # monotonic time the lease ends by this instance's clock; 0 if not held
        self._grouped = False
        self._stopping = asyncio.Event()
        self._conn: Any = None  # the connection the relay reads on while it leads (see `_round_trip`)
        self._reader: asyncio.Task[Any] | None = None  # the task blocked in a read, which `stop()` ends
        self._interrupted = False  # `stop()` cancelled that read
        self._acking: asyncio.Future[None] | None = None  # the last batch's acknowledgement
        self._unacked: list[_Batch] = []  # relayed without a broadcast: acknowledged with the next read
        self._following = False  # registered as a follower (renewed while `run()` runs)
        self._others = True  # whether another instance followed at the last read
        self.local: UpdateSink | None = None

    @property
    def leading(self) -> bool:
        """Whether this instance holds the lease (by its own clock, which ends it early, never late)."""
        return time.monotonic() < self._until

    def remember(self, task_id: str, type: str | None, owner: str | None, meeting: str | None) -> None:
        """What a task's status entries do not carry, known at submission: saves a look-up if this
        instance relays its updates."""
        if len(self._tasks) >= TASK_CACHE:
            del self._tasks[next(iter(self._tasks))]  # the oldest: it probably finished
        self._tasks[task_id] = (type, owner, meeting)

    def stop(self) -> None:
        """Ask `run()` to finish: the batch being relayed is completed and acknowledged, then the lease
        is released. A blocking read in progress is cancelled (redis-py then drops its connection,
        which ends the read in Redis too); what it had read stays pending, for the next holder."""
        self._stopping.set()
        if self._reader is not None and not self._interrupted:
            self._interrupted = True
            self._reader.cancel()

    async def follow(self) -> None:
        """Register this instance as a follower of task updates, before it submits or serves anything
        (a gateway, at start). `run()` renews the registration every second while it runs, and
        drops it when it ends. A registration is stamped with this instance's clock, and another
        judges it with its own, with `FOLLOW_SLACK_MS` to spare: a process that dies is forgotten
        after a minute (broadcasts go on meanwhile, for nobody), and clocks up to 30 s apart are
        harmless."""
        await self._register()
        self._following = True

    async def _register(self) -> None:
        now_ms = int(time.time() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(self.keys.followers, "-inf", now_ms - FOLLOW_SLACK_MS)  # gone for good
            pipe.zadd(self.keys.followers, {self.instance: now_ms + int(FOLLOW_SECONDS * 1000)})
            await pipe.execute()

    async def _keep_following(self) -> None:
        while not self._stopping.is_set():
            await self._pause(1.0)
            if self._following and not self._stopping.is_set():
                try:
                    await self._register()
                except Exception as exc:
                    log.warning("task relay: renewing this instance's follower registration failed: %r",
                                exc)

    async def _unfollow(self) -> None:
        if not self._following:
            return
        self._following = False
        try:
            async with asyncio.timeout(self.renew_every):
                await self.redis.zrem(self.keys.followers, self.instance)
        except Exception as exc:
            log.warning("task relay: dropping this instance's follower registration failed (it lapses "
                        "by itself): %r", exc)

    async def run(self) -> None:
        """Take the lease whenever it is free and relay while holding it, until `stop()`."""
        failures = 0
        following = asyncio.create_task(self._keep_following(), name="relay-follow")
        try:
            while not self._stopping.is_set():
                try:
                    if not self._grouped:
                        await self._create_groups()
                    self.ready.set()
                    took = await self._acquire()
                    failures = 0
                    if took:
                        log.info("task relay: %s holds the relay lease", self.instance)
                        await self._lead()
                        continue  # lost (or stopping): try again at once, in case it is still ours
                except Exception as exc:
                    failures += 1
                    log.warning("task relay: taking the lease failed (%d in a row): %r", failures, exc)
                    await self._pause(backoff(failures))
                    continue
                await self._pause(self.renew_every)
        finally:
            self._until = 0.0
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
            await self._release()
            await self._unfollow()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    # -- the lease --------------------------------------------------------------------------------

    async def _acquire(self) -> bool:
        asked = time.monotonic()
        took = bool(await self.redis.set(self.keys.relay_lease, self.instance, nx=True, px=self._lease_ms))
        if not took:  # still ours (a renewal whose answer was lost): renew it
            took = await self._renew()
        if took:
            self._until = asked + self.lease_seconds
        return took

    async def _renew(self) -> bool:
        return bool(await self._scripts.run("relay-renew", [self.keys.relay_lease],
                                            [self.instance, self._lease_ms]))

    async def _keep_lease(self) -> None:
        """Renew every ttl/3; a failed renewal is retried until the lease ends; returns once it has."""
        while not self._stopping.is_set():
            await self._pause(self.renew_every)
            if self._stopping.is_set():
                return
            if not self.leading:
                log.warning("task relay: the relay lease ran out (no renewal); relaying stops here")
                return
            asked = time.monotonic()
            try:
                async with asyncio.timeout(self.renew_every):
                    held = await self._renew()
            except Exception as exc:
                log.warning("task relay: renewing the relay lease failed: %r", exc)
                continue
            if not held:
                self._until = 0.0
                log.warning("task relay: lost the relay lease; relaying stops here")
                return
            self._until = asked + self.lease_seconds

    async def _release(self) -> None:
        try:
            async with asyncio.timeout(self.renew_every):
                await self._scripts.run("relay-release", [self.keys.relay_lease], [self.instance])
        except Exception as exc:
            log.warning("task relay: releasing the relay lease failed (it ends by itself): %r", exc)

    # -- relaying ---------------------------------------------------------------------------------

    async def _lead(self) -> None:
        """Relay while the lease is held: pending entries of ``leader`` first, then new ones.

        Once past the backlog, reading the next batch overlaps broadcasting the last one
        (`_Batch`), and acknowledging rides with the next read (a batch sent nowhere) or goes on in
        the background: an update waits for one read round trip, not three. Broadcasts keep
        stream order all the same: a batch is broadcast only once the one before it was, and a
        failure drops the batch read meanwhile (unacknowledged: read again from the backlog).
        """
        heartbeat = asyncio.create_task(self._keep_lease(), name="relay-lease")
        failures, backlog = 0, True
        sending: asyncio.Future[None] | None = None  # the last batch, being broadcast
        try:
            while self.leading and not self._stopping.is_set():
                batch: _Batch | None = None
                try:
                    if not self._grouped:
                        await self._create_groups()
                    entries = await self._read("0" if backlog else ">")
                    if entries is None:
                        continue
                    if backlog and not entries:
                        backlog = False
                        continue
                    batch = await self._prepare(entries)
                    if sending is not None:
                        await sending  # raises if the last batch failed
                        sending = None
                    if backlog:  # reading "0" again must not find this batch still unacknowledged
                        await self._complete(batch, ack_now=True)
                    elif not (batch.broadcasts or batch.changes):
                        await self._complete(batch)  # nothing goes out: done in place, no task
                    else:
                        sending = asyncio.ensure_future(self._complete(batch))
                    batch = None
                    failures = 0
                except Exception as exc:
                    sending = None
                    if batch is not None:
                        batch.drop()
                    failures += 1
                    backlog = True
                    if isinstance(exc, redis_errors.ResponseError) and "NOGROUP" in str(exc):
                        self._grouped = False  # a stream was deleted: recreate the group
                    log.warning("task relay failed (%d in a row): %r", failures, exc)
                    await self._pause(backoff(failures))
        finally:
            if sending is not None:  # the batch being relayed is completed and acknowledged
                with contextlib.suppress(Exception):
                    await sending
            if self._acking is not None:
                await asyncio.gather(self._acking, return_exceptions=True)
                self._acking = None
            unacked, self._unacked = self._unacked, []
            if unacked:  # what the next read would have acknowledged
                try:
                    await self._acknowledge(*unacked)
                except Exception as exc:
                    log.warning("task relay: acknowledging %d batches failed (relayed again later): %r",
                                len(unacked), exc)
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            if self._conn is not None:
                await self.redis.connection_pool.release(self._conn)
                self._conn = None

    async def _create_groups(self) -> None:
        for stream in self._streams:
            try:
                await self.redis.xgroup_create(stream, RELAY_GROUP, id="$", mkstream=True)
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._grouped = True

    async def _read(self, last: str) -> list[Entry] | None:
        """Entries of every routed queue's stream: pending ones (``0``), or new ones (``>``, blocking
        at most until a third of the lease before it ends). None if there was nothing to wait for:
        stopping, or renewals failing (no read may outlast the lease)."""
        streams: dict[Any, Any] = dict.fromkeys(self._streams, last)
        if last != ">":
            answer = await self._read_round_trip(streams, None)
        else:
            block = min(RELAY_BLOCK_MS, int((self._until - time.monotonic() - self.renew_every) * 1000))
            if block < 1:  # no renewal lately: wait for one (or for the lease to end)
                await self._pause(min(0.05, self.renew_every))
                return None
            # The last batch's frames go out first (their writers are already scheduled): they are
            # not delayed by this send, and what arrives meanwhile makes the next read a batch.
            await asyncio.sleep(0)
            answer = await self._interruptible(self._read_round_trip(streams, block))
            if answer is None:
                return None
        return [(stream, entry_id, fields) for stream, entries in answer or []
                for entry_id, fields in entries]

    async def _interruptible(self, read: Coroutine[Any, Any, Any]) -> Any:
        """Await a blocking read that `stop()` may cancel: None if it did (or had been called), else
        the read's answer (never None: an empty read is an empty list). Awaited in place, not as a
        task of its own raced against a stop event: that took a task and two loop turns per read."""
        task = asyncio.current_task()
        if self._stopping.is_set() or task is None:
            read.close()
            return None
        self._reader = task
        try:
            return (await read) or []
        except asyncio.CancelledError:
            if self._interrupted and task.uncancel() == 0:
                return None  # stop()'s cancel, and nobody else's
            raise
        finally:
            self._reader = None
            self._interrupted = False

    async def _read_round_trip(self, streams: dict[Any, Any], block: int | None) -> Any:
        """One round trip: the acks of batches relayed without a broadcast, the read, and (broadcasting
        only when followed) who follows, asked after the read returns. A failure leaves those acks
        undone: their entries come again from the backlog, and receivers drop the repeats."""
        unacked, self._unacked = self._unacked, []
        commands = [command for batch in unacked for command in self._ack_commands(batch)]
        read: list[Any] = ["XREADGROUP", "GROUP", RELAY_GROUP, LEADER, "COUNT", RELAY_BATCH]
        if block is not None:
            read += ["BLOCK", block]
        commands.append((*read, "STREAMS", *streams, *streams.values()))
        followed = self.broadcast == "followed"
        if followed:
            commands.append(("ZRANGEBYSCORE", self.keys.followers,
                             int(time.time() * 1000) - FOLLOW_SLACK_MS, "+inf"))
        answers = await self._round_trip(commands)
        if followed:
            self._others = any(member != self.instance for member in answers.pop())
        return _stream_entries(answers[-1])

    async def _round_trip(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write on the relay's own connection and read every answer.

        A pipeline without redis-py's machinery around it (a `Pipeline` object, the pool, reply
        callbacks): that cost ~20-40 us more CPU a read here (bench/relay_read_cost.py), and the relay
        reads about once a task.
        Any failure, an error answer included, drops the connection (answers may be left unread).
        """
        conn = self._conn
        if conn is None:
            conn = self._conn = await self.redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(conn.pack_commands(commands))
            return [await conn.read_response() for _ in commands]
        except BaseException:
            await self._drop_connection()
            raise

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.disconnect()
            finally:
                await self.redis.connection_pool.release(conn)

    async def _prepare(self, entries: list[Entry]) -> _Batch:
        """The updates of ``entries``, in order, handed to ``local`` at once; broadcast by `_complete`.

        A malformed entry is logged and skipped (and acknowledged); losing the lease stops the batch
        there (the rest is left to the next holder).
        """
        looked = await self._look_up(entries)
        # Followed: broadcast if another instance follows, or if this one does without a `local`
        # hook (its own listeners hear of updates only through the broker).
        broadcast = (self.broadcast == "always" or self._others
                     or (self._following and self.local is None))
        batch = _Batch()
        for stream, entry_id, fields in entries:
            if not self.leading:
                break
            try:
                for update, changed in self._updates(stream, entry_id, fields or {}, looked):
                    topic = check_topic(f"task.{update.task_id}")  # here: a bad one skips its entry only
                    if self.local is not None:
                        self._hand_local(update)
                    if broadcast:  # else nobody else follows: no need to serialise it
                        batch.broadcasts.append((topic, update.model_dump(mode="json")))
                    if update.status.terminal:
                        batch.finished.append(update.task_id)
                    if changed and self.publish_status_events:
                        batch.changes.append(update.model_dump(include=_CHANGE_FIELDS, mode="json"))
            except BusError as exc:
                if not isinstance(exc, InvalidMessage):
                    raise  # e.g. the event bus is stopped: not this entry's fault
                log.error("task relay: skipped status entry %s of %s: %s", entry_id, stream, exc)
            except Exception:
                log.exception("task relay: skipped status entry %s of %s", entry_id, stream)
            batch.acked.setdefault(stream, []).append(entry_id)
        return batch

    async def _complete(self, batch: _Batch, *, ack_now: bool = False) -> None:
        """Broadcast a batch's updates (and publish its status events), then acknowledge its entries:
        at once with ``ack_now`` (the backlog, read again from "0"), with the next read if nothing
        went out, else in the background.

        An unreachable backend stops the batch, unacknowledged: it is read again from the backlog,
        and gateways drop the repeats (`SeqFilter`); no status event is lost either.
        """
        try:
            # All at once: on Redis, in this order, in one round trip.
            skip_self = self.local is not None  # this process's listeners had them from `local`
            await self.events.broadcast_many(batch.broadcasts, skip_self=skip_self)
            if batch.changes:
                await asyncio.gather(*(self.events.publish("task.status", c) for c in batch.changes))
        except BaseException:
            batch.drop()
            raise
        finally:
            for task_id in batch.finished:
                self._tasks.pop(task_id, None)
        if ack_now:
            await self._acknowledge(batch)
        elif not (batch.broadcasts or batch.changes):
            self._unacked.append(batch)  # nothing went out: the next read's pipeline acknowledges it
        else:
            # In the background: the next batch waits for this one's broadcasts (their order),
            # not for its acks, which took a round trip of every read's cycle.
            self._acking = asyncio.ensure_future(self._acknowledge_after(batch, self._acking))

    async def _acknowledge(self, *batches: _Batch) -> None:
        """Acknowledge relayed batches' entries and drop their finished tasks' deadlines: one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch in batches:
                for command in self._ack_commands(batch):
                    pipe.execute_command(*command)
            if len(pipe):
                await pipe.execute()

    def _ack_commands(self, batch: _Batch) -> list[tuple[Any, ...]]:
        """A relayed batch's acknowledgements, and the deadlines of its finished tasks to drop."""
        commands: list[tuple[Any, ...]] = []
        if batch.finished:
            commands.append(("ZREM", self.keys.deadlines, *batch.finished))
        for stream, ids in batch.acked.items():
            commands.append(("XACK", stream, RELAY_GROUP, *ids))
        return commands

    async def _acknowledge_after(self, batch: _Batch, before: asyncio.Future[None] | None) -> None:
        """`_acknowledge`, after the batch before it. A failure is logged: the entries stay pending,
        and are relayed again (receivers drop the repeats) when the relay next reads its backlog."""
        if before is not None:
            await asyncio.gather(before, return_exceptions=True)
        try:
            await self._acknowledge(batch)
        except Exception as exc:
            log.warning("task relay: acknowledging %d entries failed (relayed again later): %r",
                        sum(map(len, batch.acked.values())), exc)

    def _hand_local(self, update: TaskUpdate) -> None:
        assert self.local is not None
        try:
            self.local(update)
        except Exception:  # the broadcast copy still reaches every gateway, this one too
            log.exception("task relay: local delivery of an update of %s failed", update.task_id)

    async def _look_up(self, entries: list[Entry]) -> dict[str, Any]:
        """One round trip for what the entries do not say: type, owner and meeting of tasks not seen
        yet, results too large to ride in the entry, positions of queued tasks."""
        asks: list[tuple[str, Queue, str]] = []
        asked: set[str] = set()
        for stream, _, raw in entries:
            queue, fields = self._streams[stream], raw or {}
            status = fields.get("status")
            for task_id in _ids(fields):
                if task_id not in self._tasks and task_id not in asked:
                    asks.append(("meta", queue, task_id))
                    asked.add(task_id)
                if status == TaskStatus.COMPLETED and "result" not in fields:
                    asks.append(("result", queue, task_id))
                elif status == TaskStatus.QUEUED and "priority" not in fields:
                    # a retry or a reclaim; a fresh enqueue (it carries `priority`) was answered with
                    # its position already, and looking it up is three commands per task
                    asks.append(("position", queue, task_id))
        if not asks:  # the usual case: no pipeline to build
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for kind, queue, task_id in asks:
            if kind == "meta":
                pipe.hmget(queue.keys.task(task_id), ["type", "owner", "msg"])
            elif kind == "result":
                pipe.hget(queue.keys.task(task_id), "result")
            else:
                pipe.zrank(queue.keys.ready, task_id)
                pipe.zrank(queue.keys.delayed, task_id)
                pipe.zcard(queue.keys.ready)
        answers = iter(await pipe.execute())
        looked: dict[str, Any] = {}
        for kind, _, task_id in asks:
            if kind == "meta":
                typ, owner, msg = next(answers)
                self.remember(task_id, typ or None, owner or None, _meeting(msg))
            elif kind == "result":
                looked[f"result:{task_id}"] = next(answers)
            else:
                rank, delayed_rank, ready = next(answers), next(answers), next(answers)
                looked[f"position:{task_id}"] = rank if rank is not None else (
                    ready + delayed_rank if delayed_rank is not None else None)
        return looked

    def _updates(self, stream: str, entry_id: str, fields: dict[str, str], looked: dict[str, Any]
                 ) -> list[tuple[TaskUpdate, bool]]:
        """The updates of one stream entry (a batch entry names many tasks), each with whether it is a
        change of status (not a progress report)."""
        if not fields:
            raise InvalidMessage("the entry is gone (trimmed from the stream)")
        status = TaskStatus(fields["status"])
        ids = _ids(fields)
        if not ids:
            raise InvalidMessage("the entry names no task")
        changed = not (status is TaskStatus.PROCESSING and "worker" not in fields)
        result: Any = None
        if fields.get("result"):
            result = from_json(fields["result"])
        queue, at = self._streams[stream].name, int(entry_id.split("-")[0]) / 1000
        out = []
        for task_id in ids:
            typ, owner, meeting = self._tasks.get(task_id, (None, None, None))
            if status is TaskStatus.COMPLETED and "result" not in fields:
                raw = looked.get(f"result:{task_id}")
                result = from_json(raw) if raw else None
            # Every field is converted above (a bad one raises, and its entry is skipped), so the
            # model is built without validating it again: three updates a task, on the hot path.
            update = _built_update({
                "task_id": task_id, "queue": queue, "type": fields.get("type") or typ,
                "owner": fields.get("owner") or owner, "meeting_id": meeting, "status": status,
                "progress": float(fields["progress"]) if fields.get("progress") else None,
                "delta": fields.get("delta") or None, "result": result,
                "error": parse_error(fields.get("error")),
                "attempts": int(fields["attempts"]) if fields.get("attempts") else None,
                "position": looked.get(f"position:{task_id}"), "reason": fields.get("reason") or None,
                "at": at, "seq": entry_id})
            out.append((update, changed))
        return out


def _stream_entries(answer: Any) -> list[tuple[str, list[tuple[str, dict[str, str] | None]]]]:
    """An XREADGROUP answer as read off the wire (RESP2 lists, or a RESP3 map) -> [(stream, [(entry
    id, fields, or None for an entry trimmed away while pending)])]."""
    if not answer:
        return []
    pairs = answer.items() if isinstance(answer, dict) else answer
    return [(stream, [(entry_id, None if raw is None else dict(zip(raw[::2], raw[1::2], strict=True)))
                      for entry_id, raw in entries])
            for stream, entries in pairs]


def _ids(fields: Mapping[str, str]) -> list[str]:
    """The task ids of a status entry: ``id``, or the comma-separated ``ids`` of a batch (none for
    an entry that names no task: `_updates` refuses it)."""
    if "ids" in fields:
        return [i for i in fields["ids"].split(",") if i]
    return [fields["id"]] if fields.get("id") else []


def _meeting(msg: str | None) -> str | None:
    if not msg:
        return None
    with contextlib.suppress(ValueError):
        body = from_json(msg)
        if isinstance(body, dict) and isinstance(body.get("meeting_id"), str):
            return str(body["meeting_id"])
    return None

