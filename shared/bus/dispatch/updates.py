"""The task-update types: `TaskUpdate`, one status change of a task as the relay broadcasts it on
``task.<task_id>``, and `SeqFilter`, which drops the repeats a receiver gets (the relay delivers at least
once; each update carries its status-stream entry id as ``seq``)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from ..errors import ConfigError
from ..queue.message import TaskError, TaskStatus

SEQ_MEMORY = 50_000        # tasks whose last seq a `SeqFilter` remembers


class TaskUpdate(BaseModel):
    """One status change of a task, as the relay broadcasts it on ``task.<task_id>``."""

    task_id: str
    queue: str
    type: str | None
    owner: str | None
    meeting_id: str | None = None
    status: TaskStatus
    progress: float | None = None
    delta: str | None = None
    result: Any = None
    error: TaskError | None = None
    attempts: int | None = None
    position: int | None = None
    reason: str | None = None  # why queued again: retry, next_stage, released, lease_expired, replay
    at: float  # server time of the change (epoch seconds)
    seq: str | None = None  # the status-stream entry id ("<ms>-<n>"): orders one task's updates


_UPDATE_FIELDS = tuple(TaskUpdate.model_fields)
# What the relay hands each update to in the process that holds the lease (`Relay.local`): the gateway
# implements it (`gateway.live.Live.update`, to its sessions); the library knows nothing of sessions.
UpdateSink = Callable[[TaskUpdate], None]


def _built_update(values: dict[str, Any]) -> TaskUpdate:
    """A `TaskUpdate` of ``values``, every field given and already converted: what
    ``TaskUpdate.model_construct(**values)`` builds (the same dict, every field counted as set), without
    its walk over the fields to find the missing ones and fill in defaults: ~1.5 us against ~7-8,
    three updates a task. tests/bus/dispatch/test_dispatcher.py checks that both build equal models."""
    update = TaskUpdate.__new__(TaskUpdate)
    object.__setattr__(update, "__dict__", values)
    object.__setattr__(update, "__pydantic_fields_set__", set(_UPDATE_FIELDS))
    object.__setattr__(update, "__pydantic_extra__", None)
    object.__setattr__(update, "__pydantic_private__", None)
    return update


def stream_id(seq: str) -> tuple[int, int]:
    """A stream entry id ``"<ms>-<n>"`` (or ``"<ms>"``) as numbers, which compare in stream order."""
    ms, dash, n = seq.partition("-")
    if not ms.isdigit() or (dash and not n.isdigit()):
        raise ValueError(f"not a stream entry id: {seq!r}")
    return int(ms), int(n or 0)


class SeqFilter:
    """Drops repeated task updates on the receiving side (the relay delivers at least once).

    ``fresh(update)`` is False when the update's ``seq`` is at or before the last one seen for its
    task, else it records it and is True. It remembers the ``size`` tasks seen most recently. An
    update without a ``seq`` (or with one that is not a stream id) cannot be ordered: it is passed.
    """

    def __init__(self, size: int = SEQ_MEMORY) -> None:
        if size < 1:
            raise ConfigError("a SeqFilter remembers at least one task")
        self.size = size
        self._last: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def seen(self, task_id: Any, seq: Any) -> bool:
        """Whether an update of ``task_id`` at ``seq`` (raw, as received) is a repeat; records nothing.
        For dropping a repeat before the work of validating it."""
        if not isinstance(task_id, str) or not isinstance(seq, str):
            return False
        last = self._last.get(task_id)
        if last is None:
            return False
        try:
            return stream_id(seq) <= last
        except ValueError:
            return False

    def fresh(self, update: TaskUpdate) -> bool:
        if update.seq is None:
            return True
        try:
            seq = stream_id(update.seq)
        except ValueError:
            return True
        last = self._last.get(update.task_id)
        if last is not None:
            self._last.move_to_end(update.task_id)
            if seq <= last:
                return False
        self._last[update.task_id] = seq
        if len(self._last) > self.size:
            self._last.popitem(last=False)
        return True
