"""Registering handlers by message type, and the context a handler receives."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from ..errors import InvalidMessage
from .message import Message, Priority

if TYPE_CHECKING:
    from .queue import Queue

Handler: TypeAlias = Callable[["Context"], Awaitable[Any] | Any]


class Router(Mapping[str, Handler]):
    """Handlers by message type. ``@router.handler("media.cover")`` registers one."""

    def __init__(self, handlers: Mapping[str, Handler] | None = None) -> None:
        self._handlers: dict[str, Handler] = {}
        for type_, fn in (handlers or {}).items():
            self.add(type_, fn)

    def add(self, type: str, fn: Handler) -> None:
        if type in self._handlers:
            raise ValueError(f"a handler for {type!r} is already registered")
        self._handlers[type] = fn

    def handler(self, type: str) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self.add(type, fn)
            return fn

        return register

    def include(self, other: Mapping[str, Handler]) -> None:
        for type_, fn in other.items():
            self.add(type_, fn)

    def __getitem__(self, type: str) -> Handler:
        return self._handlers[type]

    def __iter__(self) -> Iterator[str]:
        return iter(self._handlers)

    def __len__(self) -> int:
        return len(self._handlers)


class NextStage:
    """The pipeline stage a handler asked for; committed atomically with this message's completion."""

    __slots__ = ("delay", "message")

    def __init__(self, message: Message, delay: float) -> None:
        self.message = message
        self.delay = delay


class Context:
    """What a handler gets: its message, and ways to report progress or chain the next stage."""

    __slots__ = ("_limited", "_queue", "message", "next_stage", "token", "worker")

    def __init__(self, queue: Queue, message: Message, token: str, worker: str) -> None:
        self._queue = queue
        self.message = message
        self.token = token
        self.worker = worker
        self.next_stage: NextStage | None = None
        self._limited = False

    @property
    def payload(self) -> Any:
        return self.message.payload

    @property
    def queue(self) -> Queue:
        return self._queue

    async def progress(self, progress: float | None = None, delta: str = "") -> bool:
        """Record progress (0..1) and/or a streamed piece of output; announced to watchers at once.

        Returns False when this worker no longer holds the message (cancelled or reclaimed).
        """
        return await self._queue.progress(self.message.id, self.token, progress, delta)

    def then(self, type: str | None = None, payload: Any = None, *, delay: float = 0.0,
             priority: Priority | str | None = None, timeout: float | None = None) -> None:
        """When this handler returns, move the same task to its next stage (``type``, default: the same
        type) with ``payload``, optionally ``delay`` seconds later. The stage transition and this
        stage's completion are one atomic script: a crash can neither lose nor double it.
        """
        if delay < 0:
            raise InvalidMessage("next-stage delay must be >= 0")
        m = self.message
        fields = m.model_dump(exclude={"type", "payload", "attempts", "stage", "priority", "timeout"})
        self.next_stage = NextStage(Message(
            **fields, type=type or m.type, payload=payload, stage=m.stage + 1, attempts=0,
            priority=m.priority if priority is None else Priority.parse(priority),
            timeout=m.timeout if timeout is None else timeout,
        ), delay)

    def report_rate_limited(self) -> None:
        """Tell the worker's adaptive limiter that the downstream is rate-limiting us."""
        self._limited = True
