"""Periodic jobs (fixed intervals and cron expressions) enqueued once per cluster, however many
schedulers run.

How it works (keys in `keys.SchedulerKeys`, all under one hash tag):

- Schedules live in one Redis hash, name -> `Schedule` JSON. Every scheduler reloads it on each
  loop, so ``add`` and ``remove`` by any process (or ``meetmesh schedule add``) take effect within
  ``poll_seconds``.
- Tick identity needs no coordination: an interval schedule's ticks are the multiples of
  ``every`` since the Unix epoch; a cron schedule's ticks are the times its expression matches,
  in UTC. A tick is named by its epoch milliseconds.
- Once per cluster: a firing enqueues with ``dedupe_key="schedule:<name>:<tick ms>"``. The
  enqueue script checks and sets that key atomically, so when two schedulers race on one tick one
  task is created and the other scheduler gets its id back. The key lives for one period plus
  `DEDUPE_SLACK_SECONDS`, long enough for a racing scheduler (or one whose clock lags) to reach
  the same tick.
- Then the tick is recorded as the schedule's last fired tick (``ZADD GT``, so it only moves
  forward). A restarted scheduler never fires that tick again, even after the dedupe key is gone.
- Missed ticks: a schedule fires the ticks after max(last fired tick, ``created_at``). When
  several were missed (every scheduler was down), only the latest one is fired, once, as soon as a
  scheduler runs again; then the schedule goes on along its grid. A new (or replaced) schedule
  first fires at its first tick after it was added.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from croniter import CroniterBadDateError, croniter  # type: ignore[import-untyped]  # untyped
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticSerializationError
from redis.asyncio import Redis

from ..connection import unreachable_as_bus_error
from ..errors import BusConnectionError, BusError, InvalidMessage, ScheduleNotFound, describe
from ..keys import DEFAULT_PREFIX, SchedulerKeys, check_name
from ..queue.message import Message, Priority
from ..queue.queue import Queue

log = logging.getLogger("meetmesh.scheduler")

DEDUPE_SLACK_SECONDS = 60.0  # beyond one period: how far apart two schedulers may reach one tick
MIN_EVERY_SECONDS = 0.001  # ticks are named in whole milliseconds


class Schedule(BaseModel):
    """A periodic job: enqueue a ``type`` message with ``payload`` at ``priority`` into ``queue``,
    either ``every`` N seconds (ticks aligned to the Unix epoch) or on a 5-field ``cron`` expression
    (minute hour day-of-month month day-of-week, UTC). ``created_at`` is set by `Scheduler.add`.

    Every problem raises `InvalidMessage` (never pydantic's error), before anything is written.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    queue: str
    type: str
    payload: Any = None
    priority: Priority = Priority.NORMAL
    every: float | None = None
    cron: str | None = None
    enabled: bool = True
    created_at: float | None = None

    def __init__(self, **fields: Any) -> None:
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise InvalidMessage(f"invalid schedule: {describe(exc)}") from exc

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name("schedule name", value)

    @field_validator("queue")
    @classmethod
    def _queue(cls, value: str) -> str:
        return check_name("queue name", value)

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value: Any) -> Priority:
        return Priority.parse(value)

    @field_validator("every")
    @classmethod
    def _every(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value >= MIN_EVERY_SECONDS):
            raise InvalidMessage(f"invalid every {value!r}: give a number of seconds >= {MIN_EVERY_SECONDS}")
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None:
            return None
        fields = value.split()
        if len(fields) != 5:
            raise InvalidMessage(f"invalid cron {value!r}: give 5 fields (minute hour day-of-month month "
                                 "day-of-week), e.g. '*/15 * * * *'")
        expr = " ".join(fields)
        try:
            croniter(expr, 0.0).get_next(float)
        except CroniterBadDateError as exc:
            raise InvalidMessage(f"invalid cron {value!r}: it never matches a date") from exc
        except (ValueError, KeyError) as exc:  # croniter's errors are ValueErrors (KeyError: odd names)
            raise InvalidMessage(f"invalid cron {value!r}: {exc}") from exc
        return expr

    @model_validator(mode="after")
    def _one_timing_and_a_valid_message(self) -> Schedule:
        if (self.every is None) == (self.cron is None):
            raise InvalidMessage(f"schedule {self.name!r}: give every (seconds) or cron, exactly one")
        try:
            Message(type=self.type, payload=self.payload, priority=self.priority).model_dump_json()
        except ValidationError as exc:
            raise InvalidMessage(f"schedule {self.name!r}: {describe(exc)}") from exc
        except PydanticSerializationError as exc:
            raise InvalidMessage(f"schedule {self.name!r}: payload is not JSON-serialisable: {exc}") from exc
        return self

    @property
    def timing(self) -> str:
        """``every 30s`` or ``cron */15 * * * *``, for people."""
        return f"every {self.every:g}s" if self.every is not None else f"cron {self.cron}"

    def tick_at_or_before(self, ms: int) -> int:
        """The latest tick at or before epoch millisecond ``ms``."""
        if self.every is not None:
            step = _every_ms(self.every)
            return ms // step * step
        t = ms / 1000
        prev = croniter(self.cron, t).get_prev(float)  # strictly before t ...
        at = croniter(self.cron, prev).get_next(float)  # ... so t itself may be a tick
        return _ms(at if at <= t else prev)

    def tick_after(self, ms: int) -> int:
        """The first tick strictly after epoch millisecond ``ms``."""
        if self.every is not None:
            step = _every_ms(self.every)
            return (ms // step + 1) * step
        return _ms(croniter(self.cron, ms / 1000).get_next(float))

    def same_spec(self, other: Schedule) -> bool:
        """Whether two schedules are the same job (``created_at`` aside)."""
        def job(s: Schedule) -> dict[str, Any]:
            return s.model_dump(mode="json", exclude={"created_at"})

        return job(self) == job(other)


class ScheduleInfo(BaseModel):
    """A schedule with its firing state, as `Scheduler.list` answers it (times in epoch seconds)."""

    schedule: Schedule
    last_tick: float | None = None  # the last tick fired
    last_fired_at: float | None = None  # when it was fired (a catch-up fires after its tick)
    last_task_id: str | None = None
    last_error: str | None = None  # why the last tick could not be enqueued, if it could not
    next_fire: float | None = None  # the next tick to fire (overdue: now-ish); None while disabled


@dataclass(frozen=True, slots=True)
class Firing:
    """One tick fired: ``created`` is False when another scheduler had already enqueued it."""

    name: str
    tick: float
    task_id: str
    created: bool


class Scheduler:
    """Fires every schedule stored under ``prefix``, enqueueing into `Queue` (same prefix).

    Run as many as you like (one per replica): each tick still fires once in the cluster.
    ``clock`` (epoch seconds) is injectable so tests can drive time.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        poll_seconds: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not poll_seconds > 0:
            raise ValueError("poll_seconds must be > 0")
        self.redis = redis
        self.prefix = prefix
        self.keys = SchedulerKeys(prefix)
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.fired = 0  # ticks this scheduler enqueued itself (others' duplicates not counted)
        self._queues: dict[str, Queue] = {}
        self._parsed: dict[str, Schedule] = {}  # stored JSON -> Schedule (no re-validation per loop)
        self._next_ms: int | None = None  # the earliest tick to come, as of the last fire_due
        self._stop_event = asyncio.Event()
        self._stopping = False

    # -- managing schedules -----------------------------------------------------------------------

    async def add(self, schedule: Schedule, *, replace: bool = False) -> Schedule:
        """Store a schedule; returns it as stored, with ``created_at``.

        Adding the same job again is a no-op (the stored one is returned, so every replica may add
        its schedules at start-up). A different job under an existing name raises `InvalidMessage`
        unless ``replace``. A replaced schedule keeps its last fired tick and first fires at its
        first tick after the replacement.
        """
        stored = schedule.model_copy(update={"created_at": self.clock()})
        raw = stored.model_dump_json()
        k = self.keys
        with unreachable_as_bus_error(f"adding schedule {schedule.name!r}"):
            if await self.redis.hsetnx(k.specs, schedule.name, raw):  # type: ignore[misc]
                return stored
            existing_raw = await self.redis.hget(k.specs, schedule.name)  # type: ignore[misc]
            existing = self._parse(schedule.name, existing_raw) if existing_raw else None
            if existing is not None and existing.same_spec(schedule):
                return existing
            if existing is not None and not replace:
                raise InvalidMessage(f"schedule {schedule.name!r} already exists as {existing.timing} into "
                                     f"{existing.queue!r}; remove it first, or replace it (--replace)")
            await self.redis.hset(k.specs, schedule.name, raw)  # type: ignore[misc]
        return stored

    async def remove(self, name: str) -> None:
        """Delete a schedule and its firing state; raises `ScheduleNotFound`."""
        k = self.keys
        with unreachable_as_bus_error(f"removing schedule {name!r}"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hdel(k.specs, name)
                pipe.zrem(k.fired, name)
                pipe.hdel(k.state, name)
                removed, _, _ = await pipe.execute()
        if not removed:
            raise ScheduleNotFound(name)

    async def list(self) -> builtins.list[ScheduleInfo]:  # builtins.list: here `list` is this method
        """Every schedule, by name, with its last firing and its next fire time."""
        specs, fired, states = await self._load(with_state=True)
        now_ms = self._now_ms()
        out = []
        for name in sorted(specs):
            schedule = self._parse(name, specs[name])
            if schedule is None:
                continue
            state = json.loads(states.get(name) or "{}")
            last = fired.get(name)
            next_ms = self._next_ms_of(schedule, last, now_ms) if schedule.enabled else None
            out.append(ScheduleInfo(
                schedule=schedule, last_tick=None if last is None else last / 1000,
                last_fired_at=state.get("fired_at"), last_task_id=state.get("task_id"),
                last_error=state.get("error"), next_fire=None if next_ms is None else next_ms / 1000))
        return out

    # -- firing ------------------------------------------------------------------------------------

    async def fire_due(self) -> builtins.list[Firing]:
        """Fire every enabled schedule whose latest tick has not been fired yet (one loop's work)."""
        specs, fired, _ = await self._load(with_state=False)
        now = self.clock()
        now_ms = math.floor(now * 1000)
        out: list[Firing] = []
        upcoming: list[int] = []
        for name, raw in specs.items():
            schedule = self._parse(name, raw)
            if schedule is None or not schedule.enabled:
                continue
            upcoming.append(schedule.tick_after(now_ms))
            tick = self._due(schedule, fired.get(name), now_ms)
            if tick is None:
                continue
            try:
                out.append(await self._fire(schedule, tick, now))
            except BusConnectionError:
                raise
            except BusError as exc:  # cannot ever be enqueued (e.g. too large): skip this tick, say why
                log.error("schedule %r: tick %d not enqueued: %s", name, tick, exc)
                await self._record(name, tick, {"fired_at": now, "error": str(exc)})
        self._next_ms = min(upcoming, default=None)
        return out

    async def _fire(self, schedule: Schedule, tick: int, now: float) -> Firing:
        queue = self._queues.get(schedule.queue)
        if queue is None:
            queue = self._queues[schedule.queue] = Queue(schedule.queue, self.redis, prefix=self.prefix)
        period = (schedule.tick_after(tick) - tick) / 1000
        done = await queue.enqueue(
            schedule.type, schedule.payload, priority=schedule.priority,
            dedupe_key=f"schedule:{schedule.name}:{tick}", dedupe_ttl=period + DEDUPE_SLACK_SECONDS,
            headers={"schedule": schedule.name, "tick": str(tick)})
        await self._record(schedule.name, tick, {"fired_at": now, "task_id": done.id})
        if done.created:
            self.fired += 1
            log.info("schedule %r fired tick %d: task %s into %r", schedule.name, tick, done.id, queue.name)
        return Firing(schedule.name, tick / 1000, done.id, done.created)

    async def _record(self, name: str, tick: int, state: dict[str, Any]) -> None:
        """Move the schedule's last fired tick forward (never back); its details go with the move."""
        k = self.keys
        with unreachable_as_bus_error(f"recording a tick of schedule {name!r}"):
            if await self.redis.zadd(k.fired, {name: tick}, gt=True, ch=True):
                await self.redis.hset(k.state, name, json.dumps(state))  # type: ignore[misc]

    @staticmethod
    def _due(schedule: Schedule, last: int | None, now_ms: int) -> int | None:
        """The tick to fire now, if any: the latest one, when it is after the last fired and creation."""
        tick = schedule.tick_at_or_before(now_ms)
        created_ms = math.floor((schedule.created_at or 0.0) * 1000)
        return tick if tick > max(created_ms, -1 if last is None else last) else None

    def _next_ms_of(self, schedule: Schedule, last: int | None, now_ms: int) -> int:
        due = self._due(schedule, last, now_ms)
        return due if due is not None else schedule.tick_after(now_ms)

    # -- running -----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Make ``run()`` return after the loop it is in."""
        self._stopping = True
        self._stop_event.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    async def run(self) -> None:
        """Fire due ticks until `stop()`: wakes at the next tick, or every ``poll_seconds`` to reload."""
        log.info("scheduler running (prefix %r)", self.prefix)
        backoff = self.poll_seconds
        while not self._stopping:
            try:
                await self.fire_due()
                backoff = self.poll_seconds
                wait = self.poll_seconds
                if self._next_ms is not None:  # + 1 ms: never wake just before the tick
                    wait = min(wait, max(0.0, self._next_ms / 1000 - self.clock()) + 0.001)
            except BusConnectionError as exc:
                log.warning("scheduler: %s; retrying in %.1fs", exc, backoff)
                wait, backoff = backoff, min(backoff * 2, 30.0)
            except Exception:  # a bug must not stop every periodic job of the cluster
                log.exception("scheduler loop failed; retrying in %.1fs", self.poll_seconds)
                wait = self.poll_seconds
            try:
                await asyncio.wait_for(self._stop_event.wait(), wait)
            except TimeoutError:
                pass
        log.info("scheduler stopped (fired %d)", self.fired)

    # -- helpers -----------------------------------------------------------------------------------

    def _now_ms(self) -> int:
        return math.floor(self.clock() * 1000)

    async def _load(self, *, with_state: bool) -> tuple[dict[str, str], dict[str, int], dict[str, str]]:
        """Specs, last fired ticks (and firing details), read in one transaction: one consistent view."""
        k = self.keys
        with unreachable_as_bus_error("loading schedules"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(k.specs)
                pipe.zrange(k.fired, 0, -1, withscores=True)
                if with_state:
                    pipe.hgetall(k.state)
                specs, fired, *rest = await pipe.execute()
        return specs, {name: int(score) for name, score in fired}, rest[0] if rest else {}

    def _parse(self, name: str, raw: str) -> Schedule | None:
        """The stored schedule, or None (logged) if its JSON is not a valid schedule."""
        schedule = self._parsed.get(raw)
        if schedule is None:
            try:
                schedule = Schedule.model_validate_json(raw)
            except (ValueError, BusError) as exc:
                log.error("schedule %r is stored invalid, skipped: %s", name, describe(exc))
                return None
            if len(self._parsed) > 10_000:
                self._parsed.clear()
            self._parsed[raw] = schedule
        return schedule


def _every_ms(every: float) -> int:
    return max(1, round(every * 1000))


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
