"""Messages, priorities, task statuses and task records: the data every part of the bus shares."""

from __future__ import annotations

import itertools
import os
import random
import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import IllegalTransition, InvalidMessage

_counter = itertools.count()  # next() on it is atomic under the GIL
_node = os.urandom(3).hex()
_random = random.Random(os.urandom(16))  # ids for tracing, not secrets: a fast PRNG is enough


def new_id() -> str:
    """A 24-hex-character id: creation time (ms), a per-process counter, a per-process random node.

    Ids sort by creation time, which keeps FIFO order within one millisecond (the ready set breaks
    score ties by member), and cannot collide, so the enqueue script need not check for them.
    """
    return f"{time.time_ns() // 1_000_000:012x}{next(_counter) & 0xFFFFFF:06x}{_node}"


def new_traceparent() -> str:
    """A fresh W3C ``traceparent`` (version 00, sampled)."""
    return f"00-{_random.getrandbits(128):032x}-{_random.getrandbits(64):016x}-01"


def new_trace() -> dict[str, str]:
    """Fresh trace context: a new W3C traceparent."""
    return {"traceparent": new_traceparent()}


class Priority(StrEnum):
    """The four strict levels, highest first."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def level(self) -> int:
        """0 for critical ... 3 for low: lower is served first."""
        return _LEVELS[self]

    @classmethod
    def parse(cls, value: Priority | str | int) -> Priority:
        """Accept a member, its name (any case) or its level 0-3; anything else is `InvalidMessage`."""
        if isinstance(value, Priority):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(_ORDER):
            return _ORDER[value]
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        raise InvalidMessage(f"invalid priority {value!r}: use one of {', '.join(p.value for p in _ORDER)}")


_ORDER = (Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW)
_LEVELS = {p: i for i, p in enumerate(_ORDER)}
PRIORITIES = _ORDER


class TaskStatus(StrEnum):
    """Where a task is. Terminal statuses never change again (a dead letter can be replayed)."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"  # rejected by its handler; kept in the dead-letter queue
    DEAD = "dead"  # out of retries; kept in the dead-letter queue
    CANCELLED = "cancelled"
    # Its last attempt ran past its handler timeout (kept in the dead-letter queue), or its deadline
    # passed first (`Queue.cancel(status=TIMEOUT)`, as the dispatcher does: ended like a cancel).
    TIMEOUT = "timeout"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    def check(self, target: TaskStatus) -> None:
        """Raise `IllegalTransition` unless moving from this status to ``target`` is allowed."""
        if target not in _MOVES[self]:
            raise IllegalTransition(f"a task cannot go from {self.value} to {target.value}")


_TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.CANCELLED,
                       TaskStatus.TIMEOUT})
_DEAD_LETTERED = frozenset({TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.TIMEOUT})
# The Lua scripts implement these moves; this table documents them and guards client-side moves.
_MOVES: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.PROCESSING, TaskStatus.CANCELLED, TaskStatus.DEAD,
                                  TaskStatus.TIMEOUT}),
    TaskStatus.PROCESSING: frozenset({TaskStatus.QUEUED, *_TERMINAL}),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
    **{s: frozenset({TaskStatus.QUEUED}) for s in _DEAD_LETTERED},  # replay
}


class Message(BaseModel):
    """One unit of work. Everything but ``type`` has a sensible default."""

    # NaN and infinities are kept (written as JSON's common NaN/Infinity extension), never nulled.
    model_config = ConfigDict(extra="forbid", validate_assignment=False, ser_json_inf_nan="constants")

    id: str = Field(default_factory=new_id, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    type: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    priority: Priority = Priority.NORMAL
    payload: Any = None
    created_at: float = Field(default_factory=time.time)
    attempts: int = Field(default=0, ge=0)
    max_retries: int | None = Field(default=None, ge=0, le=1000)
    timeout: float | None = Field(default=None, gt=0)
    dedupe_key: str | None = Field(default=None, min_length=1, max_length=512)
    trace: dict[str, str] = Field(default_factory=new_trace)
    owner: str | None = Field(default=None, max_length=256)
    meeting_id: str | None = Field(default=None, min_length=1, max_length=256)  # the meeting it serves
    stage: int = Field(default=0, ge=0)
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value: Any) -> Priority:
        return Priority.parse(value)

    @property
    def traceparent(self) -> str | None:
        return self.trace.get("traceparent")


class TaskError(BaseModel):
    """Why an attempt or a task failed."""

    code: str
    message: str
    traceback: str | None = None


class TaskRecord(BaseModel):
    """The recorded state of one task, as stored in Redis and shown to clients and operators."""

    id: str
    queue: str
    type: str
    status: TaskStatus
    priority: Priority
    owner: str | None = None
    meeting_id: str | None = None  # from the message (filled in when not given)
    attempts: int = 0
    max_retries: int = 0
    stage: int = 0
    position: int | None = None  # messages that will be served before this one (queued only)
    progress: float | None = None
    result: Any = None
    error: TaskError | None = None
    enqueued_at: float | None = None
    ready_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    message: Message | None = None

    @model_validator(mode="after")
    def _meeting_from_message(self) -> TaskRecord:
        if self.meeting_id is None and self.message is not None:
            self.meeting_id = self.message.meeting_id
        return self
