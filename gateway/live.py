"""Live updates inside one gateway process: the one broadcast subscription, routed to WebSocket
sessions (by task watched, or by topic subscribed) and to SSE streams (by task)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from shared.bus import EventBus, TaskStatus
from shared.bus.dispatch.dispatcher import TaskUpdate
from shared.bus.dispatch.updates import SeqFilter

from .hub import SessionHub

log = logging.getLogger(__name__)
TASK_TOPIC = "task."


def task_frame(update: TaskUpdate) -> dict[str, Any]:
    """The client frame for one task status change: ``status``, ``progress`` or ``result``."""
    if update.status.terminal:
        frame: dict[str, Any] = {
            "type": "result",
            "task_id": update.task_id,
            "status": update.status.value,
            "result": update.result,
        }
        if update.error is not None:
            frame["error"] = {"code": update.error.code, "message": update.error.message}
        return frame
    if update.progress is not None or update.delta is not None:
        frame = {"type": "progress", "task_id": update.task_id, "progress": update.progress}
        if update.delta is not None:
            frame["delta"] = update.delta
        return frame
    frame = {"type": "status", "task_id": update.task_id, "status": update.status.value}
    if update.reason is not None:
        frame["reason"] = update.reason
    if update.position is not None:
        frame["position"] = update.position
    if update.attempts is not None:
        frame["attempts"] = update.attempts
    return frame


class Live:
    """Reads the process's broadcast listener and hands each message to whoever holds it here."""

    def __init__(self, events: EventBus, hub: SessionHub) -> None:
        self.events = events
        self.hub = hub
        self._sse: dict[str, set[asyncio.Queue[TaskUpdate]]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._fresh = SeqFilter()  # a new relay leader may repeat a few updates: drop them here
        self.relayed = 0

    def start(self) -> None:
        listener = self.events.listen(">", maxsize=100_000)
        self._task = asyncio.create_task(self._run(listener), name="gateway-live")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, listener: Any) -> None:
        async for message in listener:
            try:
                self._route(message.topic, message.data)
            except Exception:  # one bad message must not stop live updates for everyone
                log.exception("could not route broadcast %s", message.topic)

    def update(self, update: TaskUpdate) -> None:
        """One task update, to the sessions watching it and its SSE streams; a repeat is dropped.
        Also called directly by this gateway's relay while it holds the relay lease."""
        if not self._fresh.fresh(update):
            return
        self.relayed += 1
        if update.status is TaskStatus.QUEUED and update.reason is None:
            return  # the submission itself: its submitter had `accepted`, a watcher the current state
        self.hub.deliver_task(update.task_id, task_frame(update))
        if update.status.terminal:  # its sessions have their result: unindexed (a replay needs a new watch)
            self.hub.drop_task(update.task_id)
        for queue in self._sse.get(update.task_id, ()):
            queue.put_nowait(update)

    def _route(self, topic: str, data: Any) -> None:
        if topic.startswith(TASK_TOPIC):
            if isinstance(data, dict) and self._fresh.seen(data.get("task_id"), data.get("seq")):
                return  # our relay handed it over already
            self.update(TaskUpdate.model_validate(data))
            return
        frame: dict[str, Any] = {"type": "event", "topic": topic}
        if isinstance(data, dict) and "event" in data:
            frame["event"] = data["event"]
            frame["data"] = data.get("data")
        else:
            frame["data"] = data
        self.hub.deliver_topic(topic, frame)

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[asyncio.Queue[TaskUpdate]]:
        """The updates of ``task_id`` from now on, for an SSE stream."""
        queue: asyncio.Queue[TaskUpdate] = asyncio.Queue()
        self._sse[task_id].add(queue)
        try:
            yield queue
        finally:
            self._sse[task_id].discard(queue)
            if not self._sse[task_id]:
                del self._sse[task_id]
