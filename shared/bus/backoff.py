"""How long to wait before trying again after failures in a row, shared by every loop of the bus
and its services that retries a backend (the relay, the deadline sweeper, RabbitMQ reconnects, a
service's outbox)."""

from __future__ import annotations

import random


def backoff(failures: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Seconds to wait after ``failures`` failures in a row: ``base * 2**(failures - 1)``, at most
    ``cap``, jittered down to half of it (so processes failing together retry apart)."""
    delay = min(cap, base * 2 ** min(max(failures, 1) - 1, 32))
    return random.uniform(delay / 2, delay)
