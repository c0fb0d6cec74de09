"""REST under /api/v1: tasks (submit, batch, read, cancel, SSE updates) and, for admins, queues."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from shared.bus import Priority, QueueStats, TaskRecord, TaskStatus
from shared.bus.dispatch.dispatcher import Dispatcher, Submitted

from .auth import Admin, User
from .errors import ApiError, responses
from .limits import limits_answered
from .live import Live, task_frame
from .tasks import TaskSubmit, owned_record, submit

router = APIRouter(prefix="/api/v1", responses=responses(400, 401, 503))
TaskId = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")]
QueueName = Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]


class TaskBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskSubmit] = Field(min_length=1, max_length=1000)


class Accepted(BaseModel):
    task_id: str
    status: TaskStatus
    position: int | None = None


class AcceptedBatch(BaseModel):
    tasks: list[Accepted]


class Cancelled(BaseModel):
    task_id: str
    cancelled: bool = Field(description="false when the task had already finished")
    previous_status: TaskStatus


class Replayed(BaseModel):
    replayed: int


def _dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


def _accepted(s: Submitted) -> Accepted:
    return Accepted(task_id=s.task_id, status=s.status, position=s.position)


@router.post(
    "/tasks", status_code=202, response_model=Accepted, tags=["tasks"], responses=responses(413, 429)
)
async def post_task(request: Request, principal: User, task: TaskSubmit) -> Accepted:
    """Submit a task; it is routed to the queue of the service that owns its type."""
    return _accepted(await submit(_dispatcher(request), principal, task))


@router.post(
    "/tasks/batch",
    status_code=202,
    response_model=AcceptedBatch,
    tags=["tasks"],
    responses=responses(413, 429),
)
async def post_batch(request: Request, principal: User, batch: TaskBatch) -> AcceptedBatch:
    """Submit up to 1,000 tasks at once: all are validated before any is queued."""
    items = [
        {
            "type": t.type,
            "data": t.data,
            "priority": t.priority or Priority.NORMAL.value,
            "timeout_s": t.timeout_s,
            "delay_s": t.delay_s,
            "dedupe_key": t.dedupe_key,
            "meeting_id": t.meeting_id,
        }
        for t in batch.tasks
    ]
    async with limits_answered():
        submitted = await _dispatcher(request).submit_batch(owner=principal.user, items=items)
    return AcceptedBatch(tasks=[_accepted(s) for s in submitted])


@router.post("/tasks/retry-failed", response_model=Replayed, tags=["admin"], responses=responses(403, 404))
async def retry_failed(
    request: Request, principal: Admin, queue: Annotated[str | None, Query(max_length=100)] = None
) -> Replayed:
    """Replay the dead letters of one queue (``?queue=ai``) or of every routed queue."""
    dispatcher = _dispatcher(request)
    if queue is not None and queue not in dispatcher.queues:
        raise ApiError(404, "not_found", f"no queue {queue!r}; known: {', '.join(sorted(dispatcher.queues))}")
    return Replayed(replayed=await dispatcher.retry_failed(queue))


@router.get("/tasks/{task_id}", response_model=TaskRecord, tags=["tasks"], responses=responses(404))
async def get_task(request: Request, principal: User, task_id: TaskId) -> TaskRecord:
    """The task's record: status, position, progress, result or error, attempts, timestamps."""
    return await owned_record(_dispatcher(request), principal, task_id)


@router.delete("/tasks/{task_id}", response_model=Cancelled, tags=["tasks"], responses=responses(404))
async def cancel_task(request: Request, principal: User, task_id: TaskId) -> Cancelled:
    """Cancel a queued, delayed or running task (a finished one is left as it is)."""
    dispatcher = _dispatcher(request)
    await owned_record(dispatcher, principal, task_id)
    before = await dispatcher.cancel(task_id)
    return Cancelled(task_id=task_id, cancelled=not before.terminal, previous_status=before)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


@router.get(
    "/tasks/{task_id}/events",
    tags=["tasks"],
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
        **responses(404),
    },
)
async def task_events(request: Request, principal: User, task_id: TaskId) -> StreamingResponse:
    """Server-Sent Events of the task's updates (``status``, ``progress``, then one ``result``), for
    clients without WebSocket. The first event is the task's current state."""
    dispatcher = _dispatcher(request)
    live: Live = request.app.state.live
    await owned_record(dispatcher, principal, task_id)

    async def stream() -> AsyncIterator[bytes]:
        async with live.watch(task_id) as updates:
            record = await dispatcher.get(task_id)  # after watching: no update falls in between
            if record.status.terminal:
                frame: dict[str, Any] = {
                    "type": "result",
                    "task_id": task_id,
                    "status": record.status.value,
                    "result": record.result,
                }
                if record.error is not None:
                    frame["error"] = record.error.model_dump()
                yield _sse("result", frame)
                return
            yield _sse(
                "status",
                {
                    "type": "status",
                    "task_id": task_id,
                    "status": record.status.value,
                    "position": record.position,
                    "progress": record.progress,
                },
            )
            while True:
                try:
                    update = await asyncio.wait_for(updates.get(), 15.0)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                frame = task_frame(update)
                yield _sse(frame["type"], frame)
                if update.status.terminal:
                    return

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# -- admin ----------------------------------------------------------------------------------------

ADMIN_QUEUE = responses(403, 404)


def _queue(request: Request, name: str) -> Any:
    dispatcher = _dispatcher(request)
    try:
        return dispatcher.queues[name]
    except KeyError:
        raise ApiError(
            404, "not_found", f"no queue {name!r}; known: {', '.join(sorted(dispatcher.queues))}"
        ) from None


@router.get("/queues", response_model=list[QueueStats], tags=["admin"], responses=responses(403))
async def list_queues(request: Request, principal: Admin) -> list[QueueStats]:
    """Every routed queue at a glance."""
    queues = _dispatcher(request).queues
    return list(await asyncio.gather(*(queues[name].stats() for name in sorted(queues))))


@router.get("/queues/{name}", response_model=QueueStats, tags=["admin"], responses=ADMIN_QUEUE)
async def get_queue(request: Request, principal: Admin, name: QueueName) -> QueueStats:
    """Depth per level, delayed, in flight, dead letters, consumers, counters, rates, start latency."""
    stats: QueueStats = await _queue(request, name).stats()
    return stats


@router.post("/queues/{name}/pause", response_model=QueueStats, tags=["admin"], responses=ADMIN_QUEUE)
async def pause_queue(request: Request, principal: Admin, name: QueueName) -> QueueStats:
    queue = _queue(request, name)
    await queue.pause()
    stats: QueueStats = await queue.stats()
    return stats


@router.post("/queues/{name}/resume", response_model=QueueStats, tags=["admin"], responses=ADMIN_QUEUE)
async def resume_queue(request: Request, principal: Admin, name: QueueName) -> QueueStats:
    queue = _queue(request, name)
    await queue.resume()
    stats: QueueStats = await queue.stats()
    return stats


@router.get(
    "/queues/{name}/dead-letters", response_model=list[TaskRecord], tags=["admin"], responses=ADMIN_QUEUE
)
async def dead_letters(
    request: Request,
    principal: Admin,
    name: QueueName,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> list[TaskRecord]:
    records: list[TaskRecord] = await _queue(request, name).dead_letters(limit=limit, offset=offset)
    return records


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=10_000, description="only these; all when absent"
    )


@router.post(
    "/queues/{name}/dead-letters/replay", response_model=Replayed, tags=["admin"], responses=ADMIN_QUEUE
)
async def replay_dead_letters(
    request: Request,
    principal: Admin,
    name: QueueName,
    replay: Annotated[ReplayRequest | None, Body()] = None,
) -> Replayed:
    count: int = await _queue(request, name).replay_dead(replay.ids if replay else None)
    return Replayed(replayed=count)


@router.get("/stats", tags=["admin"], responses=responses(403))
async def stats(request: Request, principal: Admin) -> dict[str, Any]:
    """The gateway's sessions and live traffic, and every queue's counters."""
    queues = _dispatcher(request).queues
    all_stats = await asyncio.gather(*(queues[name].stats() for name in sorted(queues)))
    return {
        "gateway": request.app.state.gateway_stats(),
        "queues": {s.name: s.model_dump(mode="json") for s in all_stats},
    }
