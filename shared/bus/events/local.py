"""The in-process event bus: catalogue events fanned out to asyncio handlers inside one process.

Handlers have the durable bus's signature, ``async def handler(event: Event[Any]) -> None``, and
subscribe with the catalogue's topic patterns (``meeting.*``, ``media.>``, ``>``)::

    async with LocalBus(maxsize=1000, overflow="wait") as bus:

        @bus.subscribe("meeting.*")
        async def on_meeting(event: Event[Any]) -> None: ...

        await bus.publish("meeting.started", {"meeting_id": "m1"})
        await bus.join()  # every delivery so far handled

How events flow: every subscription owns a bounded ``asyncio.Queue`` (``maxsize`` deliveries) and
one consumer task. ``emit`` puts the event into the queue of each subscription whose pattern matches,
and each consumer awaits its handler on one event at a time. So:

- one handler sees events in the order they were emitted (per emitting task), and never runs twice
  at once; different handlers run concurrently, and a slow one does not hold up the others;
- backpressure is per subscriber. With ``overflow="wait"`` ``emit`` waits until *every* matching
  queue has room and then queues the event to all of them at once (all or nothing), so the slowest
  matching handler sets the emitter's pace. With ``overflow="drop"`` ``emit`` never waits: a full
  queue loses that one delivery (counted in ``dropped``) while the other subscribers still get it;
- a handler that raises is logged and counted in ``failed``; its later events, and other handlers,
  are unaffected. `Retry` and `Reject` mean nothing here (nothing is redelivered): both count as failed.

A handler that emits, with ``overflow="wait"``, an event its own full queue would take waits for
itself forever: handlers that re-emit into their own patterns should pass ``overflow="drop"``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Literal, TypeAlias, TypeVar, get_args, overload

from ..errors import BusError, ConfigError, InvalidMessage
from .catalogue import Event, check_pattern, make_event, matches

logger = logging.getLogger(__name__)

EventHandler: TypeAlias = Callable[[Event[Any]], Awaitable[None]]
"""What a subscriber is: ``async def handler(event: Event[Any]) -> None``."""

Overflow: TypeAlias = Literal["wait", "drop"]
"""What ``emit`` does when a subscriber's queue is full: wait for room, or drop that delivery."""

H = TypeVar("H", bound=EventHandler)

_OVERFLOWS: tuple[str, ...] = get_args(Overflow)


class BusClosed(BusError):
    """The bus is not running (not started yet, stopping, or stopped): nothing can be emitted."""


class BusState(StrEnum):
    """A LocalBus's lifecycle: new -> running -> stopping -> stopped (final)."""

    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class LocalBusStats:
    """Counters since the bus was made: events are counted once, everything else per delivery.

    - ``emitted``: events accepted by `emit`/`publish`, whether or not any subscriber matched;
    - ``delivered``: deliveries queued, one per (event, matching subscription);
    - ``processed`` / ``failed``: handler calls that returned / raised;
    - ``dropped``: deliveries not queued, the subscriber's queue being full under ``overflow="drop"``;
    - ``discarded``: deliveries queued but never finished (unsubscribed; left over by `stop`);
    - ``pending``: deliveries queued or in a handler now, so
      ``delivered == processed + failed + discarded + pending``;
    - ``depths``: deliveries waiting in each live subscription's queue, by subscription name.
    """

    emitted: int
    delivered: int
    processed: int
    failed: int
    dropped: int
    discarded: int
    pending: int
    depths: dict[str, int]


class Subscription:
    """One handler subscribed to one topic pattern; `cancel` ends it. Made by `LocalBus.subscribe`."""

    __slots__ = ("_bus", "_queue", "_task", "active", "handler", "name", "pattern")

    def __init__(self, bus: LocalBus, pattern: str, handler: EventHandler, name: str) -> None:
        self._bus = bus
        self.pattern = pattern
        self.handler = handler
        self.name = name
        self.active = True
        # None is the consumer's stop sentinel; it is never counted as a delivery.
        self._queue: asyncio.Queue[Event[Any] | None] = asyncio.Queue(bus.maxsize)
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Deliveries waiting in this subscription's queue (not counting one in its handler)."""
        return self._queue.qsize()

    def cancel(self) -> None:
        """Stop delivering: queued deliveries are discarded; a handler call already running finishes."""
        self._bus._remove(self)

    def __repr__(self) -> str:
        return f"<Subscription {self.name!r} {'active' if self.active else 'cancelled'}>"


class LocalBus:
    """An asyncio event bus inside one process; see the module docstring for how events flow.

    ``maxsize`` bounds each subscription's queue; ``overflow`` is the default for `emit` when one is
    full; ``source`` is the ``source`` of the events `publish` makes. Use ``async with LocalBus() as
    bus`` (drains on a clean exit, not after an exception), or `start` and `stop` yourself.
    """

    def __init__(self, maxsize: int = 1000, overflow: Overflow = "wait", source: str = "local") -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ConfigError(f"LocalBus maxsize must be an int >= 1, not {maxsize!r}")
        if overflow not in _OVERFLOWS:
            raise ConfigError(f"LocalBus overflow must be one of {_OVERFLOWS}, not {overflow!r}")
        if not isinstance(source, str) or not source:
            raise ConfigError("LocalBus source must be a non-empty string")
        self.maxsize = maxsize
        self.overflow: Overflow = overflow
        self.source = source
        self._state = BusState.NEW
        self._subs: list[Subscription] = []  # active ones, in subscription order
        self._retiring: set[Subscription] = set()  # cancelled, consumer not finished yet
        self._names: set[str] = set()
        self._room: list[asyncio.Future[None]] = []  # emitters waiting for queue room
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = asyncio.Event()
        self._emitted = self._delivered = self._processed = 0
        self._failed = self._dropped = self._discarded = 0

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def state(self) -> BusState:
        """Where the bus is in its lifecycle."""
        return self._state

    async def start(self) -> None:
        """Start a consumer task per subscription. Idempotent while running; a stopped bus stays stopped."""
        if self._state is BusState.RUNNING:
            return
        if self._state is not BusState.NEW:
            raise BusClosed(f"this LocalBus is {self._state}; a stopped bus cannot restart, make a new one")
        self._state = BusState.RUNNING
        for sub in self._subs:
            self._spawn(sub)

    async def stop(self, *, drain: bool = True, timeout: float = 10.0) -> None:
        """Stop the bus; from now on `emit` raises `BusClosed`, and so do emitters waiting for room.

        With ``drain`` the deliveries already queued are handled first, for at most ``timeout``
        seconds; then (or at once without ``drain``) running handlers are cancelled and whatever is
        left is discarded (counted, and logged). A handler that emits while the bus drains gets
        `BusClosed` too. Do not await this from inside a handler: it would wait for itself.
        """
        if self._state is BusState.NEW:
            self._state = BusState.STOPPED
            self._stopped.set()
        if self._state is BusState.STOPPED:
            return
        if self._state is BusState.STOPPING:
            await self._stopped.wait()
            return
        self._state = BusState.STOPPING
        self._wake_emitters()
        try:
            if drain:
                try:
                    async with asyncio.timeout(timeout):
                        await self._idle.wait()
                except TimeoutError:
                    logger.warning("LocalBus drain timed out after %ss with %d deliveries pending",
                                   timeout, self._pending)
        finally:
            await self._shutdown()
            self._state = BusState.STOPPED
            self._stopped.set()

    async def join(self) -> None:
        """Wait until every delivery queued so far, and any its handlers emit in turn, is handled."""
        await self._idle.wait()

    async def __aenter__(self) -> LocalBus:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:
        await self.stop(drain=exc_type is None)

    # -- subscribing ------------------------------------------------------------------------------

    @overload
    def subscribe(self, pattern: str, handler: None = None) -> Callable[[H], H]: ...

    @overload
    def subscribe(self, pattern: str, handler: EventHandler) -> Subscription: ...

    def subscribe(self, pattern: str, handler: EventHandler | None = None) -> Subscription | Callable[[H], H]:
        """Deliver events whose type matches ``pattern`` to ``handler``; returns the `Subscription`.

        Without ``handler`` it is a decorator (``@bus.subscribe("meeting.*")``) that returns the
        function unchanged; end that one with `unsubscribe`. A bad pattern is `InvalidMessage`.
        """
        normalised = check_pattern(pattern)
        if self._state not in (BusState.NEW, BusState.RUNNING):
            raise BusClosed(f"cannot subscribe on a LocalBus that is {self._state}")
        if handler is None:

            def register(fn: H) -> H:
                self._add(normalised, fn)
                return fn

            return register
        return self._add(normalised, handler)

    def unsubscribe(self, target: Subscription | EventHandler) -> int:
        """Cancel a subscription, or every subscription of a handler; returns how many were cancelled."""
        if isinstance(target, Subscription):
            found = [target] if target.active and target._bus is self else []
        else:
            found = [s for s in self._subs if s.handler is target]
        for sub in found:
            self._remove(sub)
        return len(found)

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """The active subscriptions, in the order they were made."""
        return tuple(self._subs)

    # -- emitting ---------------------------------------------------------------------------------

    async def publish(
        self, type: str, data: Any, *, traceparent: str | None = None, overflow: Overflow | None = None,
    ) -> Event[Any]:
        """Validate ``data`` as a ``type`` catalogue event, emit it, and return it.

        An unknown type or a payload that does not fit is `InvalidMessage`, and nothing is emitted.
        """
        event = make_event(type, data, source=self.source, traceparent=traceparent)
        await self.emit(event, overflow=overflow)
        return event

    async def emit(self, event: Event[Any], *, overflow: Overflow | None = None) -> int:
        """Queue ``event`` for every subscription matching its type; returns how many got it.

        ``overflow`` overrides the bus's default for this call. `BusClosed` if the bus is not
        running, also when it stops while this call waits for room.
        """
        if not isinstance(event, Event):
            raise InvalidMessage(f"emit takes an Event (see make_event), not {event.__class__.__name__}")
        mode = self.overflow if overflow is None else overflow
        if mode not in _OVERFLOWS:
            raise InvalidMessage(f"overflow must be one of {_OVERFLOWS}, not {mode!r}")
        while True:
            self._check_running()
            targets = [s for s in self._subs if matches(s.pattern, event.type)]
            if mode == "drop" or not any(s._queue.full() for s in targets):
                break
            waiter = asyncio.get_running_loop().create_future()
            self._room.append(waiter)
            await waiter
        queued = 0
        for sub in targets:
            if sub._queue.full():
                self._dropped += 1
                logger.debug("dropped %s event %s for %s: its queue is full", event.type, event.id, sub.name)
                continue
            sub._queue.put_nowait(event)
            queued += 1
        self._emitted += 1
        if queued:
            self._delivered += queued
            self._idle.clear()
        return queued

    # -- stats ------------------------------------------------------------------------------------

    def stats(self) -> LocalBusStats:
        """A snapshot of the counters and queue depths."""
        live = [*self._subs, *self._retiring]
        return LocalBusStats(
            emitted=self._emitted,
            delivered=self._delivered,
            processed=self._processed,
            failed=self._failed,
            dropped=self._dropped,
            discarded=self._discarded,
            pending=self._pending,
            depths={s.name: s.depth for s in live},
        )

    # -- internals --------------------------------------------------------------------------------

    @property
    def _pending(self) -> int:
        return self._delivered - self._processed - self._failed - self._discarded

    def _check_running(self) -> None:
        if self._state is not BusState.RUNNING:
            hint = "call start() or use 'async with'" if self._state is BusState.NEW else "make a new one"
            raise BusClosed(f"cannot emit on a LocalBus that is {self._state}: {hint}")

    def _add(self, pattern: str, handler: EventHandler) -> Subscription:
        base = f"{pattern}->{getattr(handler, '__qualname__', handler.__class__.__qualname__)}"
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}#{n}"
        self._names.add(name)
        sub = Subscription(self, pattern, handler, name)
        self._subs.append(sub)
        if self._state is BusState.RUNNING:
            self._spawn(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        if not sub.active:
            return
        sub.active = False
        self._subs.remove(sub)
        self._names.discard(sub.name)
        self._discard_queued(sub)
        if sub._task is not None and not sub._task.done():
            self._retiring.add(sub)
            sub._queue.put_nowait(None)  # just emptied, so there is room
        self._wake_emitters()  # the set of targets changed, and room was freed

    def _spawn(self, sub: Subscription) -> None:
        sub._task = asyncio.create_task(self._consume(sub), name=f"LocalBus consumer {sub.name}")

    async def _consume(self, sub: Subscription) -> None:
        try:
            while True:
                event = await sub._queue.get()
                if event is None:
                    return
                self._wake_emitters()
                await self._deliver(sub, event)
        finally:
            self._retiring.discard(sub)

    async def _deliver(self, sub: Subscription, event: Event[Any]) -> None:
        outcome: Literal["processed", "failed", "discarded"] = "failed"
        try:
            await sub.handler(event)
            outcome = "processed"
        except (Exception, asyncio.CancelledError) as exc:
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                outcome = "discarded"  # stop() cancelled us
                raise
            # A CancelledError the handler raised itself, with nobody cancelling us, is a failure too.
            logger.exception("handler %s failed on %s event %s", sub.name, event.type, event.id)
        finally:
            self._finish(outcome)

    def _finish(self, outcome: Literal["processed", "failed", "discarded"], count: int = 1) -> None:
        if outcome == "processed":
            self._processed += count
        elif outcome == "failed":
            self._failed += count
        else:
            self._discarded += count
        if self._pending == 0:
            self._idle.set()

    def _discard_queued(self, sub: Subscription) -> None:
        lost = 0
        while not sub._queue.empty():
            if sub._queue.get_nowait() is not None:
                lost += 1
        if lost:
            self._finish("discarded", lost)
            logger.warning("discarded %d queued deliveries for %s", lost, sub.name)

    def _wake_emitters(self) -> None:
        waiters, self._room = self._room, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _shutdown(self) -> None:
        subs = [*self._subs, *self._retiring]
        tasks = [s._task for s in subs if s._task is not None and not s._task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in subs:
            self._discard_queued(sub)
        self._retiring.clear()
        self._wake_emitters()
