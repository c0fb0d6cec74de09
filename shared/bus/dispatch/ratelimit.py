"""Per-user limits kept in Redis, so every gateway instance enforces the same ones: a submission
token bucket, open sockets, and tasks queued and not yet finished.

One Lua script (``lua/ratelimit-2.lua``) admits a request: it refills the user's bucket from the
server's clock, checks the user's held slots (a sorted set of member -> expiry) and takes both or
neither, in one round trip. Written by hand: the maintained Python libraries do not fit. ``limits``
offers fixed, moving and sliding windows (no token bucket with its own burst), needs a second call
for the wait to report as ``Retry-After``, and counts nothing that is held (sockets, queued tasks);
``pyredis-rate-limiter`` (GCRA) is one author's 1.0 and pulls in loguru.

- **Submissions**: a bucket of ``submit_burst`` tokens refilled at ``submit_rate`` a second; each
  task costs one (a batch of n costs n). Refused: `LimitExceeded` with the wait until it would pass.
- **Sockets**: each open socket holds a member with an expiry of ``socket_ttl`` seconds, renewed by
  its gateway (`run`) every third of that; a killed gateway's members age out on their own.
- **Queued tasks**: each task admitted holds its id until it finishes. Nothing on the finish path
  tells us (the queue's scripts stay the queue's), so finished ids are swept lazily: only when a
  user is at the limit, at most once per ``sweep_every`` seconds per user, one pipelined status
  read of that user's held ids (`Dispatcher.unfinished`). Ids of tasks that expired or vanished
  count as finished; an id is also dropped after ``task_ttl`` (plus its delay) whatever happens.

The dispatcher calls `admit` / `release` (its ``admission``); the gateway calls `open_socket` /
`close_socket` and runs `run` for the renewals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Awaitable, Callable, Sequence

from redis.asyncio import Redis

from ..connection import unreachable_as_bus_error
from ..errors import BusError, InvalidMessage
from ..keys import DEFAULT_PREFIX, LimitKeys
from ..queue.scripts import Scripts

__all__ = ["LimitExceeded", "UserLimits"]

log = logging.getLogger(__name__)
Unfinished = Callable[[Sequence[str]], Awaitable[list[bool]]]


class LimitExceeded(BusError):
    """A per-user limit refused the request. ``limit`` is ``"submit_rate"``, ``"queued_tasks"`` or
    ``"sockets"``; ``retry_after`` is the seconds to wait before trying again (for the rate, when it
    would pass; for held slots, a hint: one has to be given back first)."""

    def __init__(self, limit: str, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after


class UserLimits:
    """The limits of every user, under one key prefix. ``None`` for a limit turns it off.

    ``held_retry_after`` is the ``retry_after`` given when a user's sockets or queued tasks are at
    their limit (no wait can be computed: the user has to close a socket or see a task finish).
    """

    def __init__(self, redis: Redis, *, prefix: str = DEFAULT_PREFIX, submit_rate: float | None = 50.0,
                 submit_burst: int = 200, max_sockets: int | None = 20, socket_ttl: float = 60.0,
                 max_queued_tasks: int | None = 1000, task_ttl: float = 7 * 86_400.0,
                 sweep_every: float = 1.0, held_retry_after: float = 1.0) -> None:
        if submit_rate is not None and not (math.isfinite(submit_rate) and submit_rate > 0
                                            and submit_burst >= 1):
            raise ValueError("a submission rate needs rate > 0 and burst >= 1")
        for name, value in (("max_sockets", max_sockets), ("max_queued_tasks", max_queued_tasks)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None for no limit)")
        if socket_ttl <= 0 or task_ttl <= 0 or sweep_every <= 0 or held_retry_after <= 0:
            raise ValueError("socket_ttl, task_ttl, sweep_every and held_retry_after must be > 0")
        self.redis = redis
        self.prefix = prefix
        self.submit_rate, self.submit_burst = submit_rate, submit_burst
        self.max_sockets, self.socket_ttl = max_sockets, socket_ttl
        self.max_queued_tasks, self.task_ttl = max_queued_tasks, task_ttl
        self.sweep_every, self.held_retry_after = sweep_every, held_retry_after
        self._scripts = Scripts(redis)
        self._instance = os.urandom(6).hex()  # this process: socket members are "<instance>:<n>"
        self._opened = 0
        self._sockets: dict[str, set[str]] = {}  # user -> members this process holds (renewed by run)
        self._stopping = asyncio.Event()

    def __repr__(self) -> str:
        return (f"UserLimits(submit_rate={self.submit_rate}, submit_burst={self.submit_burst}, "
                f"max_sockets={self.max_sockets}, max_queued_tasks={self.max_queued_tasks})")

    def keys(self, user: str) -> LimitKeys:
        return LimitKeys(user, self.prefix)

    async def _call(self, keys: LimitKeys, slots: str, *, cost: int = 0, limit: int | None,
                    ttl: float, members: Sequence[str]) -> list[int]:
        rate = "" if self.submit_rate is None or cost == 0 else repr(float(self.submit_rate))
        args = [rate, self.submit_burst, cost, "" if limit is None else limit,
                math.ceil(ttl * 1000), *members]
        with unreachable_as_bus_error("checking a user's limits"):
            answer: list[int] = await self._scripts.run("ratelimit", [keys.submit, slots], args)
        return answer

    # -- submissions (the dispatcher's admission) --------------------------------------------------

    async def admit(self, owner: str, task_ids: Sequence[str], unfinished: Unfinished | None = None,
                    delay: float = 0.0) -> None:
        """Let ``owner`` submit these tasks, or raise `LimitExceeded` (nothing taken). Takes one token
        per task and, with a queued-task limit, holds each id until it finishes (``unfinished`` tells
        which of the held ids have not: asked only when the user is at the limit)."""
        cost = len(task_ids)
        if cost == 0:
            return
        if self.submit_rate is not None and cost > self.submit_burst:
            raise InvalidMessage(f"{cost} tasks at once is more than the submission burst "
                                 f"({self.submit_burst}); send them in smaller batches")
        if self.max_queued_tasks is not None and cost > self.max_queued_tasks:
            raise InvalidMessage(f"{cost} tasks at once is more than the queued-task limit "
                                 f"({self.max_queued_tasks}); send them in smaller batches")
        keys = self.keys(owner)
        members = task_ids if self.max_queued_tasks is not None else ()
        ttl = self.task_ttl + max(0.0, delay)
        for attempt in range(2):
            code, a, _ = await self._call(keys, keys.tasks, cost=cost, limit=self.max_queued_tasks, ttl=ttl,
                                          members=members)
            if code == 1:
                return
            if code == -1:
                raise LimitExceeded("submit_rate", f"too many submissions: {self.submit_rate:g} a second, "
                                    f"bursts of {self.submit_burst}; slow down", a / 1000)
            if attempt == 0 and unfinished is not None and await self._sweep(keys, unfinished):
                continue  # some had finished: try again
            break
        raise LimitExceeded("queued_tasks", f"{self.max_queued_tasks} of your tasks are queued or running "
                            "already; wait for some to finish", self.held_retry_after)

    async def release(self, owner: str, task_ids: Sequence[str]) -> None:
        """Give back ids admitted but never queued (a dedupe hit answered another, or the enqueue
        refused them)."""
        if self.max_queued_tasks is not None and task_ids:
            with unreachable_as_bus_error("releasing queued-task slots"):
                await self.redis.zrem(self.keys(owner).tasks, *task_ids)

    async def _sweep(self, keys: LimitKeys, unfinished: Unfinished) -> bool:
        """Drop the user's held ids whose tasks finished; whether any were. At most once per
        ``sweep_every`` per user, across every gateway (whoever sets the marker sweeps)."""
        with unreachable_as_bus_error("sweeping finished tasks"):
            if not await self.redis.set(keys.swept, "1", nx=True, px=math.ceil(self.sweep_every * 1000)):
                return False
            held = await self.redis.zrange(keys.tasks, 0, -1)
            if not held:
                return False
            open_ = await unfinished(held)
            done = [task_id for task_id, still in zip(held, open_, strict=True) if not still]
            if done:
                await self.redis.zrem(keys.tasks, *done)
            return bool(done)

    # -- sockets -----------------------------------------------------------------------------------

    async def open_socket(self, user: str) -> str:
        """Count one more open socket for ``user``; its member id (give it to `close_socket`), or
        `LimitExceeded` when the user has ``max_sockets`` open already (on any gateway)."""
        self._opened += 1
        member = f"{self._instance}:{self._opened}"
        if self.max_sockets is not None:
            keys = self.keys(user)
            code, held, _ = await self._call(keys, keys.sockets, limit=self.max_sockets, ttl=self.socket_ttl,
                                             members=[member])
            if code != 1:
                raise LimitExceeded("sockets", f"you have {held} sockets open already (the limit is "
                                    f"{self.max_sockets}); close one first", self.held_retry_after)
            self._sockets.setdefault(user, set()).add(member)
        return member

    async def close_socket(self, user: str, member: str) -> None:
        """The socket is closed: give its slot back (if Redis cannot be reached, it ages out)."""
        held = self._sockets.get(user)
        if held is None or member not in held:
            return
        held.discard(member)
        if not held:
            del self._sockets[user]
        try:
            with unreachable_as_bus_error("closing a socket's slot"):
                await self.redis.zrem(self.keys(user).sockets, member)
        except BusError as exc:
            log.warning("socket slot of %r not given back (it expires in %ss): %s", user, self.socket_ttl,
                        exc)

    @property
    def open_sockets(self) -> int:
        """Sockets this process holds slots for."""
        return sum(len(m) for m in self._sockets.values())

    async def renew_sockets(self) -> int:
        """Push the expiry of every socket this process holds; how many. Members gone meanwhile (given
        back, or expired while this process stalled) are not brought back."""
        if not self._sockets:
            return 0
        ttl_ms = math.ceil(self.socket_ttl * 1000)
        with unreachable_as_bus_error("renewing socket slots"):
            seconds, micros = await self.redis.time()  # the server's clock, as the script's
            expiry = int(seconds) * 1000 + int(micros) // 1000 + ttl_ms
            async with self.redis.pipeline(transaction=False) as pipe:
                for user, members in list(self._sockets.items()):
                    key = self.keys(user).sockets
                    pipe.zadd(key, dict.fromkeys(members, expiry), xx=True)
                    pipe.pexpire(key, ttl_ms + 1000, gt=True)
                await pipe.execute()
        return self.open_sockets

    async def run(self) -> None:
        """Renew this process's socket slots every third of ``socket_ttl`` until `stop`."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.socket_ttl / 3):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            try:
                await self.renew_sockets()
            except Exception as exc:
                log.warning("renewing socket slots failed (they expire in %ss): %r", self.socket_ttl, exc)

    def stop(self) -> None:
        self._stopping.set()
