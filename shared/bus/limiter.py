"""Adaptive concurrency (AIMD): shrink fast when the downstream pushes back, grow slowly when quiet."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class AdaptiveLimiter:
    """A concurrency limit that a worker (or any caller) acquires slots from.

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
        self._changed = asyncio.Condition()
        self.reports = 0

    @property
    def limit(self) -> int:
        """The current limit, after applying any growth that quiet time has earned."""
        periods = int((self._clock() - self._since) // self.quiet_seconds)
        if periods > 0 and self._limit < self.maximum:
            self._limit = min(self.maximum, self._limit + periods * self.increase)
            self._since += periods * self.quiet_seconds
        elif periods > 0:
            self._since = self._clock()
        return self._limit

    @property
    def held(self) -> int:
        return self._held

    @property
    def available(self) -> int:
        return max(0, self.limit - self._held)

    def report_rate_limited(self) -> None:
        """The downstream said "slow down": multiplicative-ish decrease, and restart the quiet clock."""
        self.reports += 1
        self._limit = max(self.minimum, self._limit - self.decrease)
        self._since = self._clock()

    async def acquire(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._held < self.limit)
            self._held += 1

    def try_acquire(self) -> bool:
        if self._held < self.limit:
            self._held += 1
            return True
        return False

    async def release(self) -> None:
        async with self._changed:
            self._held = max(0, self._held - 1)
            self._changed.notify_all()

    async def __aenter__(self) -> AdaptiveLimiter:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()
