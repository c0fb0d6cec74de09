"""The reliable priority queue on Redis: what producers, workers and operators call.

Data layout (all keys in `keys.QueueKeys`, one hash tag per queue):

- ``ready``: one sorted set ordered by ``level * level_weight + ready time (ms)``, ties broken by
  the time-sortable id. Without aging ``level_weight`` is centuries, so levels are strict and each
  level is FIFO; with ``aging_seconds`` it is that many ms, so a message that has waited that long
  competes as if it were one level higher (two periods: two levels), and low never starves.
- ``delayed`` (due time), ``leases`` (lease deadline), ``dead`` (time of death): sorted sets of ids.
- one hash per task (the record), kept after the task ends for as long as its retention class says:
  ``completed_ttl`` (1 h) once completed, ``cancelled_ttl`` (24 h) once cancelled or past its deadline,
  ``dead_letter_ttl`` (7 d) once dead-lettered (failed, dead, timeout), after which the dead letter
  itself goes too. Nothing expires while a task is queued or running.
- ``workers``: a sorted set of worker id -> when that worker is judged dead (its last heartbeat plus
  its lease); renewals drop the members whose time has passed.

Every state change happens inside one Lua script and is appended to the queue's event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, to_json
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, ResponseError

from ..connection import translates_unreachable, unreachable_as_bus_error
from ..errors import BusConnectionError, InvalidMessage, MessageTooLarge, TaskNotFound, describe
from ..keys import DEDUPE_SCOPES, DEFAULT_PREFIX, QueueKeys, dedupe_suffix
from .leases import LeaseOps, to_ms
from .message import Message, TaskRecord, TaskStatus, new_id, new_traceparent
from .records import QueueStats, parse_record, parse_stats
from .scripts import Scripts

STRICT_LEVEL_WEIGHT_US = 10 * 365 * 86_400 * 10**6  # 10 years: no message ever ages past a level
# (3 levels of it plus a microsecond clock stay below 2**53, so every score is an exact double)
ARGS_PER_MESSAGE = 9  # see enqueue-10.lua
MAX_BATCH_ARGS = ARGS_PER_MESSAGE * 1000  # 1,000 messages per enqueue script call


@dataclass(frozen=True, slots=True)
class Enqueued:
    """What ``enqueue`` answers: the id (the first message's, when deduplicated) and its position."""

    id: str
    created: bool
    position: int | None


class Queue(LeaseOps):
    """A named priority queue. Cheap to create; all state lives in Redis.

    Per-queue defaults apply to messages that do not set their own ``max_retries`` or ``timeout``.
    Finished records are kept ``completed_ttl`` seconds (completed), ``cancelled_ttl`` (cancelled, or
    ended by their deadline) or ``dead_letter_ttl`` (dead letters: failed, dead, timeout; the dead
    letter is dropped with its record). ``record_ttl`` is deprecated: it sets the first two.
    """

    def __init__(
        self,
        name: str,
        redis: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        max_retries: int = 3,
        timeout: float = 300.0,
        lease_seconds: float = 30.0,
        aging_seconds: float | None = None,
        retry_base_seconds: float = 1.0,
        retry_cap_seconds: float = 300.0,
        completed_ttl: float = 3_600.0,
        cancelled_ttl: float = 86_400.0,
        dead_letter_ttl: float = 7 * 86_400.0,
        record_ttl: float | None = None,
        dedupe_ttl: float = 3_600.0,
        dedupe_scope: str = "owner",
        max_message_bytes: int = 1 << 20,
        events_maxlen: int = 100_000,
    ) -> None:
        if aging_seconds is not None and aging_seconds <= 0:
            raise ValueError("aging_seconds must be > 0 (or None for strict levels)")
        if lease_seconds <= 0 or timeout <= 0:
            raise ValueError("lease_seconds and timeout must be > 0")
        if dedupe_scope not in DEDUPE_SCOPES:
            raise ValueError(f"dedupe_scope must be one of {', '.join(DEDUPE_SCOPES)}, not {dedupe_scope!r}")
        self.name = name
        self.keys = QueueKeys(name, prefix)
        self.redis = redis
        self.max_retries = max_retries
        self.timeout = timeout
        self.lease_seconds = lease_seconds
        self.aging_seconds = aging_seconds
        self.retry_base_seconds = retry_base_seconds
        self.retry_cap_seconds = retry_cap_seconds
        if record_ttl is not None:
            warnings.warn("Queue(record_ttl=...) is deprecated: use completed_ttl and cancelled_ttl "
                          "(dead letters are kept dead_letter_ttl)", DeprecationWarning, stacklevel=2)
            completed_ttl = cancelled_ttl = record_ttl
        if min(completed_ttl, cancelled_ttl, dead_letter_ttl) <= 0:
            raise ValueError("completed_ttl, cancelled_ttl and dead_letter_ttl must be > 0")
        self.completed_ttl = completed_ttl
        self.cancelled_ttl = cancelled_ttl
        self.dead_letter_ttl = dead_letter_ttl
        self.dedupe_ttl = dedupe_ttl
        self.dedupe_scope = dedupe_scope  # "owner": a dedupe key is its owner's alone (keys.dedupe_suffix)
        self.max_message_bytes = max_message_bytes
        self.events_maxlen = events_maxlen
        self._weight = round(aging_seconds * 1e6) if aging_seconds else STRICT_LEVEL_WEIGHT_US
        self._scripts = Scripts(redis)
        self._layout = self.keys.layout()
        self._head = [self.keys.task_prefix, self.keys.inbox_prefix, events_maxlen, self._weight,
                      to_ms(completed_ttl), to_ms(dead_letter_ttl)]  # see lua/_lib.lua
        # enqueue calls made while one is in flight, sent together next (see `_enqueue_call`)
        self._enqueuing = False
        self._riders: list[tuple[list[Any], asyncio.Future[Any]]] = []
        self._rider_task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Queue({self.name!r})"

    async def _run_layout(self, script: str, args: list[Any]) -> Any:
        """Run one of the queue scripts that share the KEYS/ARGV layout of lua/_lib.lua."""
        return await self._run(script, self._layout, self._head + args)

    @contextlib.asynccontextmanager
    async def _borrowed(self) -> AsyncIterator[Any]:
        """A pool connection for commands sent and read by hand, given back after. If the block
        fails the connection is dropped: answers may be left unread, so it is not reusable."""
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            yield conn
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    async def _stream(self, script: str, calls: Iterable[list[Any]]) -> list[Any]:
        """Run a layout script once per element of ``calls``, in order, on one connection: each call
        is sent as soon as it is built and the answers are read at the end, so Redis runs call k
        while call k+1 is being built (a pipeline builds them all before sending any)."""
        with unreachable_as_bus_error(f"{script} on queue {self.name!r}"):
            sha = await self._scripts.load(script)
            async with self._borrowed() as conn:
                sent = 0
                for args in calls:
                    await conn.send_command("EVALSHA", sha, len(self._layout), *self._layout, *self._head,
                                            *args)
                    sent += 1
                return [await conn.read_response() for _ in range(sent)]

    async def _run_then_blpop(self, script: str, args: list[Any], key: str, timeout: float,
                              answered: Callable[[Any], None]) -> tuple[Any, Any]:
        """Run a layout script and ``BLPOP key timeout`` behind it, both in one write (one round trip
        where there were two); ``answered`` gets the script's answer as soon as it comes, before the
        BLPOP's. A script Redis does not have cached is loaded and the pair sent again: the BLPOP
        behind the refused call would block to no purpose, so that connection is dropped."""
        with unreachable_as_bus_error(f"{script} and an inbox wait on queue {self.name!r}"):
            for attempt in range(2):
                command = ("EVALSHA", self._scripts.sha(script), len(self._layout), *self._layout,
                           *self._head, *args)
                async with self._borrowed() as conn:
                    await conn.send_packed_command(conn.pack_commands([command, ("BLPOP", key, timeout)]))
                    try:
                        first = await conn.read_response()
                    except NoScriptError:
                        if attempt:
                            raise
                        await conn.disconnect()  # the BLPOP behind it would block to no purpose
                        await self._scripts.load(script)
                        continue
                    answered(first)
                    return first, await conn.read_response()
            raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        with unreachable_as_bus_error(f"{script} on queue {self.name!r}"):
            return await self._scripts.run(script, keys, args)

    async def _run_each(self, script: str, calls: list[list[Any]]) -> list[Any]:
        """Run a layout script once per element of ``calls``, in order, all in one write on one
        connection; each answer in its place, an error answer as its exception. Calls that Redis
        refused because it no longer has the script cached (NOSCRIPT: they did not run) are sent
        again once it is loaded."""
        answers: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        with unreachable_as_bus_error(f"{script} on queue {self.name!r}"):
            for attempt in range(2):
                sha = self._scripts.sha(script)
                async with self._borrowed() as conn:
                    await conn.send_packed_command(conn.pack_commands(
                        [("EVALSHA", sha, len(self._layout), *self._layout, *self._head, *calls[n])
                         for n in todo]))
                    for n in todo:
                        try:
                            answers[n] = await conn.read_response()
                        except ResponseError as exc:  # read in full: the next answer is next
                            answers[n] = exc
                todo = [n for n in todo if isinstance(answers[n], NoScriptError)]
                if not todo or attempt:
                    break
                await self._scripts.load(script)
        return answers

    async def _enqueue_call(self, args: list[Any]) -> Any:
        """One call of the enqueue script. Calls made while another is in flight wait, and then go
        together in one write (`_run_each`, in the order they were made): under a burst, say a
        gateway catching up after a stall, a write and a read are paid per batch, not per call. A
        lone call goes at once, as before."""
        if self._enqueuing:
            rider: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._riders.append((args, rider))
            return await rider
        self._enqueuing = True
        try:
            return await self._run_layout("enqueue", args)
        finally:
            if self._riders:
                self._rider_task = asyncio.create_task(self._send_riders())
            else:
                self._enqueuing = False

    async def _send_riders(self) -> None:
        try:
            while self._riders:
                batch = [(args, rider) for args, rider in self._riders if not rider.done()]  # not given up
                self._riders = []
                if not batch:
                    continue
                try:
                    answers = await self._run_each("enqueue", [args for args, _ in batch])
                except BaseException as exc:
                    for _, rider in batch:
                        if not rider.done():
                            rider.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, rider), answer in zip(batch, answers, strict=True):
                    if rider.done():
                        continue
                    if isinstance(answer, Exception):
                        rider.set_exception(answer)
                    else:
                        rider.set_result(answer)
        finally:
            self._enqueuing = False
            for _, rider in self._riders:  # only if cancelled midway: nothing may wait forever
                if not rider.done():
                    rider.set_exception(BusConnectionError(f"enqueue on queue {self.name!r} was interrupted"))
            self._riders = []

    # -- producing ------------------------------------------------------------------------------

    def message(self, type: str, payload: Any = None, **fields: Any) -> Message:
        """Build a `Message`, turning pydantic's validation error into `InvalidMessage`."""
        try:
            return Message(type=type, payload=payload, **fields)
        except ValidationError as exc:
            raise InvalidMessage(f"invalid message: {describe(exc)}") from exc

    async def enqueue(
        self,
        type: str | Message,
        payload: Any = None,
        *,
        delay: float | None = None,
        at: float | None = None,
        dedupe_ttl: float | None = None,
        **fields: Any,
    ) -> Enqueued:
        """Enqueue one message; ``fields`` are `Message` fields (priority, owner, dedupe_key ...).

        A ``dedupe_key`` is its owner's (the queue's ``dedupe_scope="owner"``, the default: two
        owners' equal keys are two tasks); with ``"queue"`` every producer of the queue shares them,
        for trusted internal producers only (the dispatcher refuses a user a hit on another's task).

        ``delay`` (seconds) or ``at`` (epoch seconds) hold it back until then.
        """
        message = type if isinstance(type, Message) else self.message(type, payload, **fields)
        return (await self.enqueue_many([message], delay=delay, at=at, dedupe_ttl=dedupe_ttl,
                                        positions=True))[0]

    async def enqueue_many(
        self,
        messages: Iterable[Message],
        *,
        delay: float | None = None,
        at: float | None = None,
        dedupe_ttl: float | None = None,
        positions: bool = False,
    ) -> list[Enqueued]:
        """Enqueue a batch: validated first (nothing is written if one is bad), then 1,000 messages
        per script call, each call atomic, all calls in one write (one round trip, in order).
        ``positions=True`` also answers each message's position (one more lookup per message).
        """
        delay_ms = self._delay_ms(delay, at)
        ttl_ms = str(to_ms(self.dedupe_ttl if dedupe_ttl is None else dedupe_ttl) or 1)
        args: list[Any] = []
        for m in messages:
            args.extend(self._pack(m, delay_ms, ttl_ms))
        return await self._send(args, positions)

    async def enqueue_batch(
        self,
        type: str,
        payloads: Iterable[Any],
        *,
        delay: float | None = None,
        at: float | None = None,
        positions: bool = False,
        **fields: Any,
    ) -> list[Enqueued]:
        """Enqueue one message of ``type`` per payload, sharing ``fields`` (priority, owner, ...).

        The bulk path: the shared fields are validated once, through one `Message`, and each
        message is only its payload serialised and spliced into their JSON, a few microseconds
        instead of a full model validation. Every payload is serialised before anything is sent,
        so nothing is written if one is not JSON or too large. Then chunks of 1,000 (each one
        atomic) are built and sent in order on one connection while Redis runs the one before;
        should the connection drop midway, the chunks before the drop stay enqueued.
        """
        if "id" in fields or "dedupe_key" in fields:
            raise InvalidMessage("enqueue_batch gives every message its own id and no dedupe key; "
                                 "use enqueue_many for those")
        proto = self.message(type, None, **fields)
        common = dumps(proto.model_dump(mode="json", exclude_none=True,
                                        exclude={"id", "payload", "created_at", "trace"}))[1:-1]
        retries = self.max_retries if proto.max_retries is None else proto.max_retries
        head = [proto.priority.level, self._delay_ms(delay, at), "", "", retries, type, proto.owner or ""]
        # 1. Serialise every payload first: nothing is written if one is bad.
        now = repr(time.time())
        overhead = len(_batch_body(new_id(), "", now, new_traceparent(), common).encode())
        bodies = [self._checked(type, functools.partial(dumps, p), overhead) for p in payloads]
        if not bodies:
            return []
        ids = [new_id() for _ in bodies]

        # 2. Each body is the shared fields' JSON with this message's own spliced in (all JSON
        #    already: hex ids, a float, the serialised payload), built chunk by chunk while Redis
        #    runs the previous chunk.
        def chunks() -> Iterable[list[Any]]:
            per_call = MAX_BATCH_ARGS // ARGS_PER_MESSAGE
            for start in range(0, len(bodies), per_call):
                args: list[Any] = [self.keys.dedupe_prefix, "1" if positions else "0"]
                for i in range(start, min(start + per_call, len(bodies))):
                    args.append("+" + ids[i])  # made here, never seen by anyone: no need to look it up
                    args.extend(head)
                    args.append(_batch_body(ids[i], bodies[i], now, new_traceparent(), common))
                yield args

        answers = await self._stream("enqueue", chunks())
        return [Enqueued(task_id, True, None) for task_id in ids] if not positions else [
            Enqueued(task_id, True, where[n] if where[n] >= 0 else None)
            for (_, where), chunk_ids in zip(answers, _split(ids, 1000), strict=True)
            for n, task_id in enumerate(chunk_ids)]

    async def _send(self, args: list[Any], positions: bool) -> list[Enqueued]:
        """Run the enqueue script over packed messages, 1,000 per call, in order, in one write."""
        if not args:
            return []
        head = [self.keys.dedupe_prefix, "1" if positions else "0"]
        chunks = [args[i:i + MAX_BATCH_ARGS] for i in range(0, len(args), MAX_BATCH_ARGS)]
        if len(chunks) == 1:
            answers = [await self._enqueue_call(head + chunks[0])]
        else:  # one write: one round trip, chunks applied in order
            answers = await self._run_each("enqueue", [head + c for c in chunks])
            failed = next((a for a in answers if isinstance(a, Exception)), None)
            if failed is not None:
                raise failed
        out: list[Enqueued] = []
        for chunk, (dups, where) in zip(chunks, answers, strict=True):
            existing = {dups[j] - 1: dups[j + 1] for j in range(0, len(dups), 2)}
            for n in range(len(chunk) // ARGS_PER_MESSAGE):
                task_id = existing.get(n) or chunk[n * ARGS_PER_MESSAGE].lstrip("+")
                position = where[n] if where and where[n] >= 0 else None
                out.append(Enqueued(task_id, n not in existing, position))
        return out

    def _checked(self, type: str, dump: Callable[[], str], overhead: int = 0) -> str:
        """Serialise a message body (or a payload, with ``overhead`` bytes around it), refusing
        one that is not JSON or over the size limit."""
        try:
            body = dump()
        except PydanticSerializationError as exc:
            raise InvalidMessage(f"payload of {type!r} is not JSON-serialisable: {exc}") from exc
        size = overhead + (len(body) if body.isascii() else len(body.encode()))
        if size > self.max_message_bytes:
            raise MessageTooLarge(size, self.max_message_bytes)
        return body

    def _pack(self, m: Message, delay_ms: int, ttl_ms: str) -> list[Any]:
        body = self._checked(m.type, lambda: m.model_dump_json(exclude_none=True))
        retries = self.max_retries if m.max_retries is None else m.max_retries
        dedupe = dedupe_suffix(m.dedupe_key, m.owner, self.dedupe_scope) if m.dedupe_key else ""
        return [m.id, m.priority.level, delay_ms, dedupe, ttl_ms, retries, m.type, m.owner or "", body]

    @staticmethod
    def _delay_ms(delay: float | None, at: float | None) -> int:
        if delay is not None and at is not None:
            raise InvalidMessage("give delay or at, not both")
        if at is not None:
            delay = at - time.time()
        if delay is None:
            return 0
        if not math.isfinite(delay):
            raise InvalidMessage(f"invalid delay {delay!r}")
        return to_ms(delay)

    # -- tasks ----------------------------------------------------------------------------------

    @translates_unreachable
    async def get(self, task_id: str) -> TaskRecord:
        """The task's `TaskRecord` (with its position while queued); raises `TaskNotFound`."""
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(k.task(task_id))
            pipe.zrank(k.ready, task_id)
            pipe.zrank(k.delayed, task_id)
            pipe.zcard(k.ready)
            raw, rank, delayed_rank, ready_count = await pipe.execute()
        if not raw:
            raise TaskNotFound(task_id)
        position = rank if rank is not None else (
            ready_count + delayed_rank if delayed_rank is not None else None)
        return parse_record(self.name, task_id, raw, position)

    async def cancel(self, task_id: str, reason: str = "cancelled by request", *,
                     status: TaskStatus = TaskStatus.CANCELLED) -> TaskStatus:
        """Cancel a queued, delayed or running task; returns the status it had before.

        ``status`` is what it ends as: `TaskStatus.CANCELLED`, or `TaskStatus.TIMEOUT` when its
        deadline passed (the error code is the status either way; it is not dead-lettered).
        A finished task is left alone (its status is returned); an unknown id raises `TaskNotFound`.
        """
        if status not in (TaskStatus.CANCELLED, TaskStatus.TIMEOUT):
            raise InvalidMessage(f"a task can be ended as cancelled or timeout, not {status}")
        k = self.keys
        code, before = await self._run(
            "cancel", [k.task(task_id), k.ready, k.delayed, k.leases, k.depth, k.events, k.stats],
            [task_id, to_ms(self.cancelled_ttl), self.events_maxlen, k.control, reason,
             TaskStatus(status).value])
        if code < 0:
            raise TaskNotFound(task_id)
        return TaskStatus(before)

    async def wait(self, task_id: str, timeout: float = 30.0, poll: float = 0.02) -> TaskRecord:
        """Poll until the task reaches a terminal status; returns its record or raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            record = await self.get(task_id)
            if record.status.terminal:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} still {record.status.value} after {timeout}s")
            await asyncio.sleep(poll)

    # -- dead letters ---------------------------------------------------------------------------

    @translates_unreachable
    async def dead_letters(self, limit: int = 100, offset: int = 0) -> list[TaskRecord]:
        """Dead letters, oldest first, each with its error and traceback."""
        ids = await self.redis.zrange(self.keys.dead, offset, offset + limit - 1)
        async with self.redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hgetall(self.keys.task(task_id))
            raws = await pipe.execute()
        return [parse_record(self.name, i, raw, None) for i, raw in zip(ids, raws, strict=True) if raw]

    async def replay_dead(self, ids: Sequence[str] | None = None, limit: int = 1000) -> int:
        """Send dead letters (these ids, or the oldest ``limit``) back to their level; returns how many."""
        return int(await self._run_layout("replay", [limit, *(ids or [])]))

    async def purge_dead(self, ids: Sequence[str] | None = None, limit: int = 10_000) -> int:
        """Delete dead letters (these ids, or the oldest ``limit``) and their records."""
        return int(await self._run("purge", [self.keys.dead], [self.keys.task_prefix, limit, *(ids or [])]))

    # -- operations -----------------------------------------------------------------------------

    @translates_unreachable
    async def pause(self) -> None:
        """Workers stop taking messages from this queue (running ones finish)."""
        await self.redis.set(self.keys.paused, "1")

    @translates_unreachable
    async def resume(self) -> None:
        await self.redis.delete(self.keys.paused)
        await self._run_layout("wake", [])

    @translates_unreachable
    async def is_paused(self) -> bool:
        return bool(await self.redis.exists(self.keys.paused))

    @translates_unreachable
    async def stats(self, window: int = 60) -> QueueStats:
        """Depths, counters, per-second rates over the last ``window`` seconds, start-latency percentiles."""
        k = self.keys
        now = time.time()
        second = int(now)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(k.depth)
            pipe.zcard(k.delayed)
            pipe.zcard(k.leases)
            pipe.zcard(k.dead)
            pipe.zcount(k.workers, now * 1000, "+inf")  # not yet judged dead
            pipe.hgetall(k.stats)
            pipe.exists(k.paused)
            pipe.lrange(k.latency, 0, -1)
            for s in range(second - window + 1, second + 1):
                pipe.hgetall(k.rate(s))
            depth, delayed, leases, dead, workers, counters, paused, lat, *rates = await pipe.execute()
        return parse_stats(self.name, depth, delayed, leases, dead, workers, counters, paused, lat, rates,
                           window)

    @translates_unreachable
    async def events(self, last_id: str = "$", block_ms: int = 1000, count: int = 100) -> list[Any]:
        """Read status-change events after ``last_id`` from the queue's stream (blocking up to block_ms)."""
        answer = await self.redis.xread({self.keys.events: last_id}, count=count, block=block_ms)
        return [(entry_id, fields) for _, entries in answer for entry_id, fields in entries]

    @translates_unreachable
    async def drop(self) -> int:
        """Delete every key of this queue (tests and tear-down). Returns the number of keys deleted."""
        deleted = 0
        for pattern in self.keys.all_patterns():
            async for key in self.redis.scan_iter(match=pattern, count=1000):
                deleted += await self.redis.delete(key)
        return deleted

def dumps(value: Any) -> str:
    """JSON text of a handler's result or an error (pydantic-core: fast, and knows datetimes etc.)."""
    return to_json(value, inf_nan_mode="constants").decode()


def _batch_body(task_id: str, payload: str, now: str, traceparent: str, common: str) -> str:
    """A message body for enqueue_batch: JSON pieces spliced into the shared fields' JSON."""
    return (f'{{"id":"{task_id}","payload":{payload},"created_at":{now},'
            f'"trace":{{"traceparent":"{traceparent}"}},{common}}}')


def _split(items: list[str], size: int) -> Iterable[list[str]]:
    return (items[i:i + size] for i in range(0, len(items), size))
