"""The bus's exceptions, and the signals a handler raises to say how its message should end.

Errors (raised by the bus to its callers)::

    BusError
    ├── ConfigError            a setting is missing or invalid (raised at start-up)
    ├── BusConnectionError     Redis (or a broker) cannot be reached; wraps the driver's error
    ├── InvalidMessage         bad priority, type, option, schedule, or a payload that is not JSON
    │   └── MessageTooLarge    the serialised message is over the queue's size limit
    ├── TaskNotFound           no task with that id (never existed, or its record expired)
    ├── ScheduleNotFound       no schedule with that name (never added, or removed)
    ├── IllegalTransition      a task (or a client session) cannot make the move asked for
    └── StackFlowError         an edge node's StackFlow error (code, message) (stackflow.py)
        ├── EdgeBusy           -21: every live node serving the model is full (-> RateLimited)
        ├── EdgeUnavailable    -6: no live node serves the model
        ├── EdgeTimeout        -9: no complete answer within the request's timeout
        ├── EdgeBadReply       -9: the node's reply broke the protocol (malformed, out of order, too long)
        └── EdgeStreamBroken   -11: the node died after tokens were streamed

Handler signals (raised by a handler, caught by the worker)::

    HandlerSignal
    ├── Retry(delay=...)       try again after `delay` seconds (counts as an attempt)
    │   └── RateLimited        the downstream is rate-limiting us: retry, and shrink concurrency
    └── Reject(reason)         do not retry; the message goes to the dead-letter queue as `failed`
"""

from __future__ import annotations

from pydantic import ValidationError


class BusError(Exception):
    """Root of every error the bus raises."""


class ConfigError(BusError):
    """A setting is missing or invalid; raised at start-up, naming the setting."""


class BusConnectionError(BusError):
    """The backend cannot be reached. The driver's exception is the ``__cause__``."""


class InvalidMessage(BusError):
    """A message was refused before anything was written: bad priority, type, option or payload."""


class MessageTooLarge(InvalidMessage):
    """The serialised message is larger than the queue's ``max_message_bytes``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message is {size} bytes, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class TaskNotFound(BusError):
    """No task with that id exists (it never did, or its record has expired)."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task with id {task_id!r}")
        self.task_id = task_id


class ScheduleNotFound(BusError):
    """No schedule with that name exists (it was never added, or has been removed)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no schedule named {name!r}")
        self.name = name


class IllegalTransition(BusError):
    """A task cannot move from its current status to the requested one."""


class HandlerSignal(Exception):
    """Base of the exceptions a handler raises to choose how its message ends."""


class Retry(HandlerSignal):
    """Ask for another attempt after ``delay`` seconds (``None``: the queue's jittered backoff)."""

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        if delay is not None and delay < 0:
            raise ValueError("Retry delay must be >= 0")
        self.delay = delay
        self.reason = reason


class RateLimited(Retry):
    """The downstream is rate-limiting us: retry later, and let the worker's limiter back off."""

    def __init__(self, delay: float | None = None, reason: str = "rate limited by downstream") -> None:
        super().__init__(delay, reason)


class Reject(HandlerSignal):
    """Refuse the message for good: no retry; it is dead-lettered with status ``failed``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe(exc: Exception) -> str:
    """One line for a validation error: where, and what (pydantic's first complaint)."""
    if isinstance(exc, ValidationError) and exc.errors():
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "message"
        return f"{where}: {err['msg']}"
    return str(exc)
