"""The consumer's side of a queue: leasing messages, settling them, renewing leases, hand-offs.

`LeaseOps` is mixed into `Queue`; the `Worker` is its only caller. Every method is one script or
one command, so a worker's cost per message is what these batch together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from ..connection import translates_unreachable, unreachable_as_bus_error
from ..errors import BusError, InvalidMessage, describe
from ..keys import QueueKeys
from .message import Message

MAX_DEQUEUE = 1000  # messages leased per dequeue call (dequeue-10.lua caps it too)


def to_ms(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000))


@dataclass(slots=True)
class Delivery:
    """A leased message, as a worker receives it. ``token`` fences this delivery's settlement.

    ``message`` is None when the stored body could not be parsed; ``error`` then says why.
    """

    id: str
    token: str
    message: Message | None
    error: str | None = None



def parse_delivery(text: str) -> Delivery:
    """A delivery string from the scripts ("id\\nattempt\\ntoken\\nmessage JSON") -> `Delivery`.

    Whatever the string holds, this answers a `Delivery`: one that does not parse has no message
    and says why (the worker dead-letters it with that reason), it never raises.
    """
    parts = text.split("\n", 3)
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit():
        return Delivery(parts[0], "0", None, f"malformed delivery: {text[:100]!r}")
    task_id, attempts, token, raw = parts
    try:
        message = Message.model_validate_json(raw)
    except (ValueError, BusError) as exc:  # a field validator may raise InvalidMessage (a priority)
        return Delivery(task_id, token, None, f"malformed message: {describe(exc)}")
    message.attempts = int(attempts)
    return Delivery(task_id, token, message)



def _leased(flat: list[Any]) -> tuple[list[Delivery], float | None]:
    """The dequeue script's answer: the deliveries, and the seconds until something else is due."""
    return [parse_delivery(d) for d in flat[1:]], (None if flat[0] < 0 else flat[0] / 1000)


class LeaseOps:
    """What a worker calls on its queue. Needs the `Queue` attributes declared below."""

    name: str
    keys: QueueKeys
    redis: Redis
    lease_seconds: float
    events_maxlen: int

    async def _run_layout(self, script: str, args: list[Any]) -> Any:
        raise NotImplementedError

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        raise NotImplementedError

    async def dequeue(self, count: int, worker: str, lease_seconds: float | None = None,
                      idle_seconds: float = 0.0, settle: list[Any] | None = None
                      ) -> tuple[list[Delivery], float | None]:
        """Lease up to ``count`` messages. Returns them and the seconds until something else is due.

        With ``idle_seconds`` > 0, a worker that got fewer than ``count`` is registered as idle for
        that long: the next enqueue leases a message to it and pushes it to its inbox. ``settle``
        entries (as for `settle`) are applied first, in the same script.
        """
        flat = await self._run_layout("dequeue", self._dequeue_args(count, worker, lease_seconds,
                                                                    idle_seconds, settle, 0))
        return _leased(flat)

    async def dequeue_then_wait(self, count: int, worker: str, lease_seconds: float | None,
                                idle_seconds: float, settle: list[Any], wait: float,
                                leased: Callable[[list[Delivery], float | None], None]
                                ) -> tuple[Delivery | None, bool]:
        """`dequeue`, then wait up to ``wait`` s for a hand-off to this worker's inbox (`wait_inbox`),
        in one round trip: the script and the ``BLPOP`` go out in one write. ``leased(deliveries,
        due_in)`` is called with the script's answer as soon as it comes, before the wait ends (its
        handlers start while the worker waits for more).

        The script cuts the wait short (an empty inbox entry) when the worker got all it asked for,
        or when something falls due before the wait would end. Returns the hand-off (None if none),
        and whether the wait was cut short (the caller then waits, if at all, as long as it needs).
        If this raises before ``leased`` was called, nothing was settled or leased by it.
        """
        wait_ms = max(1, to_ms(wait))
        args = self._dequeue_args(count, worker, lease_seconds, idle_seconds, settle, wait_ms)
        flat, got = await self._run_then_blpop("dequeue", args, self.keys.inbox(worker), wait_ms / 1000,
                                               lambda flat: leased(*_leased(flat[:-1])))
        return (parse_delivery(got[1]) if got and got[1] else None), flat[-1] == 1

    def _dequeue_args(self, count: int, worker: str, lease_seconds: float | None, idle_seconds: float,
                      settle: list[Any] | None, wait_ms: int) -> list[Any]:
        count = max(0, min(count, MAX_DEQUEUE))  # at most this many a call; 0 only does upkeep
        lease = to_ms(lease_seconds or self.lease_seconds)
        return [count, lease, worker, to_ms(idle_seconds), self.keys.rate_prefix, wait_ms, *(settle or ())]

    async def _run_then_blpop(self, script: str, args: list[Any], key: str, timeout: float,
                              answered: Callable[[Any], None]) -> tuple[Any, Any]:
        raise NotImplementedError

    async def settle(self, entries: list[Any]) -> list[int]:
        """Apply settled outcomes: a flat list of (id, token, outcome, a, b) groups. See settle-10.lua."""
        if not entries:
            return []
        return list(await self._run_layout("settle", [self.keys.rate_prefix, *entries]))

    async def renew(self, worker: str, held: Iterable[tuple[str, str]], lease_seconds: float | None = None
                    ) -> list[str]:
        """Extend the leases in ``held`` (id, token) and heartbeat; returns the ids no longer held.

        The heartbeat says the worker is alive for one more lease; workers whose heartbeat has run
        out (killed, never deregistered) are dropped from the queue's worker set by the same call."""
        args: list[Any] = [self.keys.task_prefix, to_ms(lease_seconds or self.lease_seconds), worker]
        for task_id, token in held:
            args += (task_id, token)
        return list(await self._run("renew", [self.keys.leases, self.keys.workers], args))

    async def progress(self, task_id: str, token: str, progress: float | None, delta: str = "") -> bool:
        """Record progress (0..1) and/or a streamed ``delta`` of a running task."""
        if progress is not None and not 0.0 <= progress <= 1.0:
            raise InvalidMessage(f"progress must be between 0 and 1, not {progress!r}")
        k = self.keys
        done = await self._run("progress", [k.task(task_id), k.events],
                               [task_id, token, "" if progress is None else repr(float(progress)), delta,
                                self.events_maxlen])
        return bool(done)

    async def wait_inbox(self, worker: str, timeout: float) -> Delivery | None:
        """Block up to ``timeout`` s for a message handed to this idle worker (already leased to it)."""
        with unreachable_as_bus_error(f"an inbox wait on queue {self.name!r}"):
            got = await self.redis.blpop([self.keys.inbox(worker)], timeout=timeout)  # type: ignore[misc]
        return parse_delivery(got[1]) if got and got[1] else None

    @translates_unreachable
    async def nudge(self, worker: str) -> None:
        """Wake a worker blocked in `wait_inbox` (an empty entry is not a delivery)."""
        await self.redis.lpush(self.keys.inbox(worker), "")  # type: ignore[misc]

    @translates_unreachable
    async def leave(self, worker: str, lease_seconds: float | None = None) -> list[Delivery]:
        """Deregister an idle worker and return what was handed to it but never taken (to release)."""
        member = f"{to_ms(lease_seconds or self.lease_seconds)}:{worker}"
        inbox = self.keys.inbox(worker)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.keys.idle, member)
            pipe.lrange(inbox, 0, -1)
            pipe.delete(inbox)
            _, left, _ = await pipe.execute()
        return [parse_delivery(d) for d in left if d]

    @translates_unreachable
    async def forget_worker(self, worker: str) -> None:
        await self.redis.zrem(self.keys.workers, worker)
