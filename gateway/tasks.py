"""Task submission, shared by REST and the WebSocket: what a client submits, the submit itself (under the
per-user limits), and the owner check on reading a task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.bus import Priority, TaskNotFound, TaskRecord
from shared.bus.dispatch.dispatcher import Dispatcher, Submitted

from .auth import Principal
from .errors import ApiError
from .limits import limits_answered

PriorityName = Literal["critical", "high", "normal", "low"]


class TaskSubmit(BaseModel):
    """One task to run: its type picks the owning service's queue."""

    # strict: no bool or string where the schema says number (lax pydantic takes `"delay_s": false`)
    model_config = ConfigDict(extra="forbid", strict=True)

    type: str = Field(min_length=1, max_length=200, examples=["ai.summarize"])
    data: Any = None
    priority: PriorityName | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    delay_s: float | None = Field(default=None, ge=0, le=30 * 24 * 3600)
    dedupe_key: str | None = Field(default=None, min_length=1, max_length=200)
    meeting_id: str | None = Field(default=None, min_length=1, max_length=100)


async def owned_record(dispatcher: Dispatcher, principal: Principal, task_id: str) -> TaskRecord:
    """The task's record if ``principal`` may see it; anyone else gets the same 404 as for no task."""
    try:
        record = await dispatcher.get(task_id)
    except TaskNotFound:
        raise ApiError(404, "not_found", f"no task with id {task_id!r}") from None
    if record.owner != principal.user and not principal.is_admin:
        raise ApiError(404, "not_found", f"no task with id {task_id!r}")
    return record


async def submit(dispatcher: Dispatcher, principal: Principal, task: TaskSubmit,
                 on_id: Callable[[str], None] | None = None) -> Submitted:
    """Submit one task for ``principal`` (REST and WebSocket). The dispatcher's admission applies the
    per-user limits, shared by every gateway (`gateway.limits`); a refusal is `ApiError` 429."""
    async with limits_answered():
        return await dispatcher.submit(
            on_id=on_id,
            owner=principal.user,
            type=task.type,
            data=task.data,
            priority=task.priority or Priority.NORMAL.value,
            timeout_s=task.timeout_s,
            delay_s=task.delay_s,
            dedupe_key=task.dedupe_key,
            meeting_id=task.meeting_id,
        )
