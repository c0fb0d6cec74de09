"""The task dispatcher: routes each task type to its service's queue, ends tasks at their deadline,
and runs the relay (`relay.Relay`) that pushes every status change to the gateway instances.

- Task ids carry their queue (``ai.0190...``), so reading or cancelling a task needs no lookup.
- Deadlines live in one sorted set (``keys.DispatchKeys``); every instance sweeps it, and whoever
  removes a due member ends that task as ``timeout`` (unless it finished), so each is handled once.
- Every instance runs a relay; one at a time (the holder of a lease) broadcasts the changes, in
  stream order, as `TaskUpdate` on ``task.<id>`` (see `relay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from pydantic import BaseModel
from redis.asyncio import Redis

from ..backoff import backoff
from ..connection import unreachable_as_bus_error
from ..errors import BusConnectionError, ConfigError, InvalidMessage, TaskNotFound
from ..events.base import EventBus
from ..keys import DEFAULT_PREFIX, DispatchKeys
from ..queue.message import Message, TaskRecord, TaskStatus, new_id
from ..queue.queue import Enqueued, Queue
from .relay import LEASE_SECONDS, Relay
from .updates import TaskUpdate

__all__ = ["Admission", "Dispatcher", "Submitted", "TaskUpdate"]

log = logging.getLogger(__name__)

SWEEP_EVERY = 0.05        # seconds between deadline sweeps
SWEEP_BATCH = 500         # due deadlines taken per read
_QUEUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")  # no dots: ids are "<queue>.<id>"
_ITEM_FIELDS = frozenset({"type", "data", "priority", "timeout_s", "delay_s", "dedupe_key", "meeting_id"})


class Submitted(BaseModel):
    """What a submission answers. ``created`` is False when a live dedupe key answered an existing task."""

    task_id: str
    queue: str
    status: TaskStatus
    position: int | None
    created: bool


class Admission(Protocol):
    """What may refuse a submission before anything is written (`ratelimit.UserLimits`, per-user
    limits): ``admit`` raises to refuse (given which of the owner's held ids are unfinished, if it
    asks), ``release`` gives back ids admitted but never queued (a dedupe hit, a refused enqueue)."""

    async def admit(self, owner: str, task_ids: Sequence[str],
                    unfinished: Callable[[Sequence[str]], Awaitable[list[bool]]] | None = None,
                    delay: float = 0.0) -> None: ...

    async def release(self, owner: str, task_ids: Sequence[str]) -> None: ...


class Dispatcher:
    """Routes tasks to their service's queue and follows them. One per gateway process.

    ``routes`` (task type -> queue name) is the application's configuration, required (the gateway
    passes the services' task routes); ``queue_options`` are passed to
    every `Queue`. ``run()`` sweeps deadlines and, given ``events``, runs the relay (``relay``), which
    broadcasts status changes while it holds the cluster's relay lease (``relay_lease_seconds``):
    every one, or with ``relay_broadcast="followed"`` only while another instance follows them
    (`Relay.follow`). ``admission`` (per-user limits) is asked before every submission is written.
    """

    def __init__(self, redis: Redis, *, events: EventBus | None = None,
                 routes: Mapping[str, str] | None = None, prefix: str = DEFAULT_PREFIX,
                 queue_options: Mapping[str, Any] | None = None, publish_status_events: bool = False,
                 relay_lease_seconds: float = LEASE_SECONDS, relay_broadcast: str = "always",
                 admission: Admission | None = None) -> None:
        if routes is None:
            raise ConfigError("the dispatcher needs routes= (task type -> queue name): which queue serves "
                              "each task type is the application's configuration")
        self.routes: dict[str, str] = dict(routes)
        if not self.routes:
            raise ConfigError("the dispatcher needs at least one route")
        for type_, queue in self.routes.items():
            if not _QUEUE.match(queue):
                raise ConfigError(f"route {type_!r} -> {queue!r}: a queue name is 1-100 of A-Z a-z 0-9 _ -")
            try:
                Message(type=type_)
            except ValueError as exc:
                raise ConfigError(f"route {type_!r}: not a valid task type") from exc
        self.redis = redis
        self.events = events
        self.keys = DispatchKeys(prefix)
        self.publish_status_events = publish_status_events
        self.admission = admission
        self.queues: dict[str, Queue] = {name: Queue(name, redis, prefix=prefix, **(queue_options or {}))
                                         for name in sorted(set(self.routes.values()))}
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"  # this instance
        self.relay: Relay | None = None if events is None else Relay(
            redis, events, self.queues.values(), instance=self.consumer, prefix=prefix,
            lease_seconds=relay_lease_seconds, publish_status_events=publish_status_events,
            broadcast=relay_broadcast)
        # Set once the relay's group exists: changes from then on are relayed (by the lease holder).
        self.ready = asyncio.Event() if self.relay is None else self.relay.ready
        self._known = ", ".join(sorted(self.routes))
        self._stopping = asyncio.Event()

    def __repr__(self) -> str:
        return f"Dispatcher(queues={sorted(self.queues)})"

    # -- submitting -------------------------------------------------------------------------------

    def queue_for(self, type: str) -> Queue:
        """The queue that owns ``type``; `InvalidMessage` listing the known types if none does."""
        name = self.routes.get(type) if isinstance(type, str) else None
        if name is None:
            raise InvalidMessage(f"unknown task type {type!r}; known: {self._known}")
        return self.queues[name]

    async def submit(self, *, owner: str, type: str, data: Any = None, priority: str | int = "normal",
                     timeout_s: float | None = None, delay_s: float | None = None,
                     dedupe_key: str | None = None, meeting_id: str | None = None,
                     on_id: Callable[[str], None] | None = None) -> Submitted:
        """Queue one task on its service's queue. ``timeout_s`` is its deadline from now (waiting
        and running), also its handler's timeout; ``delay_s`` holds it back that long.

        ``on_id`` is called with the new task's id just before it is queued: a caller that routes
        the task's updates registers for them there, as they may come before this call returns. (A
        ``dedupe_key`` already in use returns the existing task instead, and the new id is unused.)

        Dedupe keys are the owner's own (the queues' default ``dedupe_scope="owner"``): another
        owner's equal key makes a new task. On a queue with shared keys (``"queue"``), a hit on a
        task that is not ``owner``'s is refused with `InvalidMessage`, never answered.
        """
        queue, message = self._build(owner, type, data, priority, timeout_s, dedupe_key, meeting_id)
        delay = _delay(delay_s)
        await self._admit(owner, [message.id], delay)
        self._remember([message])
        if on_id is not None:
            on_id(message.id)
        await self._set_deadlines([message])
        try:
            done = await queue.enqueue(message, delay=delay)
        except InvalidMessage:  # e.g. a payload that is not JSON: nothing was queued
            if message.timeout:
                with unreachable_as_bus_error("dropping a task deadline"):
                    await self.redis.zrem(self.keys.deadlines, message.id)
            await self._release(owner, [message.id])
            raise
        return (await self._settled([(queue, message)], [done]))[0]

    async def submit_batch(self, *, owner: str, items: Sequence[Mapping[str, Any]]) -> list[Submitted]:
        """Queue several tasks (each item has ``type`` and optionally the other `submit` arguments).

        Every item is validated and serialised first: if one is bad, `InvalidMessage` names its index
        and nothing is written. Then one `enqueue_many` per queue (and delay), concurrently.
        """
        built: list[tuple[Queue, Message]] = []
        delays: list[float | None] = []
        for n, item in enumerate(items):
            try:
                if not isinstance(item, Mapping):
                    raise InvalidMessage("a batch item must be an object")
                unknown = set(item) - _ITEM_FIELDS
                if unknown:
                    raise InvalidMessage(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
                if "type" not in item:
                    raise InvalidMessage("a batch item needs a type")
                queue, message = self._build(owner, item["type"], item.get("data"),
                                             item.get("priority") or "normal", item.get("timeout_s"),
                                             item.get("dedupe_key"), item.get("meeting_id"))
                delays.append(_delay(item.get("delay_s")))
                # Serialised now, so a bad payload in a later queue's group cannot follow a write.
                queue._checked(message.type, functools.partial(message.model_dump_json, exclude_none=True))
            except InvalidMessage as exc:
                exc.args = (f"{exc} (batch item {n})",)
                raise
            built.append((queue, message))
        groups: dict[tuple[str, float | None], list[int]] = {}
        for n, ((queue, _), delay) in enumerate(zip(built, delays, strict=True)):
            groups.setdefault((queue.name, delay), []).append(n)
        await self._admit(owner, [m.id for _, m in built], max((d or 0.0 for d in delays), default=0.0))
        await self._set_deadlines([m for _, m in built])
        self._remember([m for _, m in built])
        answers = await asyncio.gather(*(
            self.queues[name].enqueue_many([built[n][1] for n in members], delay=delay, positions=True)
            for (name, delay), members in groups.items()))
        done: list[Enqueued | None] = [None] * len(built)
        for members, answer in zip(groups.values(), answers, strict=True):
            for n, enqueued in zip(members, answer, strict=True):
                done[n] = enqueued
        return await self._settled(built, [d for d in done if d is not None])

    def _build(self, owner: str, type: Any, data: Any, priority: Any, timeout_s: Any, dedupe_key: Any,
               meeting_id: Any) -> tuple[Queue, Message]:
        queue = self.queue_for(type)
        if timeout_s is not None and (not _number(timeout_s) or timeout_s <= 0):
            raise InvalidMessage(f"invalid timeout_s {timeout_s!r}: a number of seconds > 0")
        message = queue.message(type, data, id=f"{queue.name}.{new_id()}", priority=priority, owner=owner,
                                timeout=timeout_s, dedupe_key=dedupe_key, meeting_id=meeting_id)
        return queue, message

    async def _admit(self, owner: str, ids: Sequence[str], delay: float | None) -> None:
        if self.admission is not None and ids:
            await self.admission.admit(owner, ids, self.unfinished, delay or 0.0)

    async def _release(self, owner: str | None, ids: Sequence[str]) -> None:
        if self.admission is not None and ids and owner is not None:
            await self.admission.release(owner, ids)

    async def unfinished(self, task_ids: Sequence[str]) -> list[bool]:
        """For each id, whether its task is still queued or running (one pipelined read). Gone,
        finished or naming no routed queue: False."""
        async with self.redis.pipeline(transaction=False) as pipe:
            asked = []
            for task_id in task_ids:
                queue = self._queue_of(task_id)
                if queue is not None:
                    pipe.hget(queue.keys.task(task_id), "status")
                    asked.append(task_id)
            with unreachable_as_bus_error("reading task statuses"):
                statuses = dict(zip(asked, await pipe.execute(), strict=True)) if asked else {}
        return [_open_status(statuses.get(task_id)) for task_id in task_ids]

    def _remember(self, messages: Sequence[Message]) -> None:
        """Tell this instance's relay what the tasks' status entries do not say, before they are
        queued: a worker may start one, and the relay read that, before the enqueue's answer is back
        (then the relay had to look the task up: a round trip more for that whole batch)."""
        if self.relay is not None:
            for m in messages:
                self.relay.remember(m.id, m.type, m.owner, m.meeting_id)

    async def _set_deadlines(self, messages: Sequence[Message]) -> None:
        """Record the deadlines before enqueueing: a task never runs without its deadline known."""
        now = time.time()
        deadlines = {m.id: math.ceil((now + m.timeout) * 1000) for m in messages if m.timeout}
        if deadlines:
            with unreachable_as_bus_error("recording task deadlines"):
                await self.redis.zadd(self.keys.deadlines, deadlines)

    async def _settled(self, built: Sequence[tuple[Queue, Message]], done: Sequence[Enqueued]
                       ) -> list[Submitted]:
        """Answers for enqueued messages; a dedupe hit drops the deadline set for the id never used,
        and answers the existing task's status."""
        unused = [m.id for (_, m), d in zip(built, done, strict=True) if not d.created and m.timeout]
        if unused:
            with unreachable_as_bus_error("dropping unused task deadlines"):
                await self.redis.zrem(self.keys.deadlines, *unused)
        never_queued = [m.id for (_, m), d in zip(built, done, strict=True) if not d.created]
        if never_queued:  # their admission slots (the existing tasks hold their own)
            await self._release(built[0][1].owner, never_queued)
        hits = [(q, d.id) for (q, _), d in zip(built, done, strict=True) if not d.created]
        existing: dict[str, TaskRecord | None] = {}
        if hits:  # a dedupe hit: answer the existing task's status
            records = await asyncio.gather(*(_record_or_none(q, task_id) for q, task_id in hits))
            existing = {task_id: r for (_, task_id), r in zip(hits, records, strict=True)}
        for n, ((queue, message), d) in enumerate(zip(built, done, strict=True)):
            if not d.created and not _theirs(queue, existing.get(d.id), message.owner):
                # Only a queue whose dedupe keys are shared ("queue" scope) gets here: the task the
                # key names is someone else's (or unknown), and the caller must learn nothing of it.
                where = f" (batch item {n})" if len(built) > 1 else ""
                raise InvalidMessage(f"dedupe_key {message.dedupe_key!r} is in use on queue "
                                     f"{queue.name!r} by a task that is not yours{where}")
        out = []
        for (queue, _), d in zip(built, done, strict=True):
            if d.created:
                out.append(Submitted(task_id=d.id, queue=queue.name, status=TaskStatus.QUEUED,
                                     position=d.position, created=True))
            else:
                record = existing.get(d.id)
                out.append(Submitted(task_id=d.id, queue=queue.name, created=False,
                                     status=record.status if record else TaskStatus.QUEUED,
                                     position=record.position if record else d.position))
        return out

    # -- following --------------------------------------------------------------------------------

    def _queue_of(self, task_id: str) -> Queue | None:
        name, dot, rest = task_id.partition(".")
        return self.queues.get(name) if dot and rest else None

    async def get(self, task_id: str) -> TaskRecord:
        """The task's record (status, position, progress, result, error, attempts, times, meeting);
        `TaskNotFound` if it does not exist, expired, or its id names no routed queue."""
        queue = self._queue_of(task_id)
        if queue is None:
            raise TaskNotFound(task_id)
        return await queue.get(task_id)

    async def cancel(self, task_id: str, reason: str = "cancelled by request") -> TaskStatus:
        """Cancel a queued or running task; returns its status before (a finished one is left alone)."""
        queue = self._queue_of(task_id)
        if queue is None:
            raise TaskNotFound(task_id)
        before = await queue.cancel(task_id, reason)
        if not before.terminal:
            with unreachable_as_bus_error("dropping a task deadline"):
                await self.redis.zrem(self.keys.deadlines, task_id)
        return before

    async def retry_failed(self, queue: str | None = None) -> int:
        """Replay the dead letters (failed, dead, timed out) of ``queue``, or of every routed queue."""
        if queue is not None and queue not in self.queues:
            raise InvalidMessage(f"unknown queue {queue!r}; known: {', '.join(sorted(self.queues))}")
        total = 0
        for q in [self.queues[queue]] if queue else list(self.queues.values()):
            with unreachable_as_bus_error(f"counting the dead letters of {q.name!r}"):
                left = int(await self.redis.zcard(q.keys.dead))
            while left > 0:  # what was dead when asked, 1,000 per script call
                n = await q.replay_dead(limit=min(left, 1000))
                total, left = total + n, (left - n if n else 0)
        return total

    async def sweep_timeouts(self) -> int:
        """One pass: end every task past its deadline and not finished as ``timeout``; returns how many.

        A due deadline is handled by whoever removes it from the set, so concurrent sweepers (one
        per gateway instance) never handle one twice.
        """
        marked = 0
        while True:
            now = int(time.time() * 1000)
            with unreachable_as_bus_error("the deadline sweep"):
                due = await self.redis.zrangebyscore(self.keys.deadlines, "-inf", now, start=0,
                                                     num=SWEEP_BATCH)
                if not due:
                    return marked
                async with self.redis.pipeline(transaction=False) as pipe:
                    for task_id in due:
                        pipe.zrem(self.keys.deadlines, task_id)
                    removed = await pipe.execute()
            mine = [task_id for task_id, gone in zip(due, removed, strict=True) if gone]
            marked += sum(await asyncio.gather(*(self._time_out(task_id) for task_id in mine)))
            if len(due) < SWEEP_BATCH:
                return marked

    async def _time_out(self, task_id: str) -> int:
        queue = self._queue_of(task_id)
        if queue is None:
            return 0
        try:
            before = await queue.cancel(task_id, "its deadline passed before it finished",
                                        status=TaskStatus.TIMEOUT)
        except TaskNotFound:
            return 0
        except BusConnectionError:  # put it back for the next sweep, if Redis lets us
            with contextlib.suppress(Exception):
                await self.redis.zadd(self.keys.deadlines, {task_id: 0})
            raise
        return 0 if before.terminal else 1

    # -- running ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Sweep deadlines every ~50 ms and, with an event bus, run the relay, until `stop()`."""
        tasks = [asyncio.create_task(self._sweep_forever(), name="dispatcher-sweep")]
        if self.relay is not None:
            tasks.append(asyncio.create_task(self.relay.run(), name="dispatcher-relay"))
        else:
            self.ready.set()
        try:
            await self._stopping.wait()
        finally:
            self.stop()  # also when run() itself is cancelled
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Ask `run()` to finish: the batch being relayed is completed and acknowledged first, then
        the relay lease is released (another instance takes over at once)."""
        self._stopping.set()
        if self.relay is not None:
            self.relay.stop()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def _sweep_forever(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                await self.sweep_timeouts()
                failures = 0
            except Exception as exc:
                failures += 1
                log.warning("deadline sweep failed (%d in a row): %r", failures, exc)
            await self._pause(backoff(failures) if failures else SWEEP_EVERY)


def _open_status(status: str | None) -> bool:
    try:
        return status is not None and not TaskStatus(status).terminal
    except ValueError:  # a record with a status we do not know: not ours to count
        return False


def _theirs(queue: Queue, record: TaskRecord | None, owner: str | None) -> bool:
    """Whether a dedupe hit's task may be answered to ``owner``: it is theirs. A hit whose record is
    gone is theirs only where the key itself names the owner (scope "owner")."""
    if record is None:
        return queue.dedupe_scope == "owner"
    return record.owner == owner


async def _record_or_none(queue: Queue, task_id: str) -> TaskRecord | None:
    with contextlib.suppress(TaskNotFound):
        return await queue.get(task_id)
    return None


def _delay(delay_s: Any) -> float | None:
    if delay_s is None:
        return None
    if not _number(delay_s) or delay_s < 0:
        raise InvalidMessage(f"invalid delay_s {delay_s!r}: a number of seconds >= 0")
    return float(delay_s)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

