"""Adaptive concurrency (AIMD): shrink fast when the downstream pushes back, grow slowly when quiet."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


class AdaptiveLimiter:
    """A concurrency limit that workers (or any callers) take slots from; it may be shared.

    Starts at ``initial``; every ``report_rate_limited()`` drops it by ``decrease``; after
    ``quiet_seconds`` without a report it grows by ``increase`` (and again after each further quiet
    period); it always stays within ``[minimum, maximum]``. Slots already held when the limit drops
    are not revoked: new acquisitions wait until fewer than the limit are held.
    """

    def __init__(self, *, initial: int = 12, minimum: int = 2, maximum: int = 12, decrease: int = 2,
                 increase: int = 1, quiet_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError("need 1 <= minimum <= initial <= maximum")
        if decrease < 1 or increase < 1 or quiet_seconds <= 0:
            raise ValueError("decrease and increase must be >= 1, quiet_seconds > 0")
        self.minimum, self.maximum = minimum, maximum
        self.decrease, self.increase, self.quiet_seconds = decrease, increase, quiet_seconds
        self._clock = clock
        self._limit = initial
        self._since = clock()  # start of the current quiet period
        self._held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.reports = 0

    @property
    def limit(self) -> int:
        """The current limit, after applying any growth that quiet time has earned."""
        periods = int((self._clock() - self._since) // self.quiet_seconds)
        if periods > 0:
            self._limit = min(self.maximum, self._limit + periods * self.increase)
            self._since += periods * self.quiet_seconds
        return self._limit

    @property
    def held(self) -> int:
        return self._held

    @property
    def available(self) -> int:
        return max(0, self.limit - self._held)

    def report_rate_limited(self) -> None:
        """The downstream said "slow down": decrease, and restart the quiet clock."""
        self.reports += 1
        self._limit = max(self.minimum, self.limit - self.decrease)  # from the limit quiet time earned
        self._since = self._clock()

    def try_acquire(self, n: int = 1) -> int:
        """Take up to ``n`` slots without waiting; returns how many were taken."""
        granted = max(0, min(n, self.limit - self._held))
        self._held += granted
        return granted

    def release(self, n: int = 1) -> None:
        """Give back ``n`` slots and wake waiters that now fit."""
        self._held = max(0, self._held - n)
        self._wake()

    async def acquire(self) -> None:
        """Wait for a slot. Waiters are woken by releases and by quiet time raising the limit."""
        while not self.try_acquire():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            next_growth = self._since + self.quiet_seconds - self._clock()
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout=max(0.001, next_growth))
            except TimeoutError:
                pass
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _wake(self) -> None:
        free = self.limit - self._held
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    async def __aenter__(self) -> AdaptiveLimiter:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
