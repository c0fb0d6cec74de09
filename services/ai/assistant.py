"""What the ai service does with the edge nodes: run a prompt through the bridge, streaming each
token to the task's watchers; read a meeting's chat and summarise it; announce what it finished.

Edge errors become the worker's outcomes (`to_handler_signal`): every node full (-21) is
`RateLimited`, so the worker's adaptive limiter shrinks; no node, a timeout or a broken stream is
`Retry`; anything else is `Reject`.

Its durable events (``ai.task_created``, ``ai.task_completed``) report no SQL change: each is staged
in the service's outbox in a transaction of its own (``service.emit_event``), so a broker outage
delays it, never loses it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Protocol, cast

from services.common import Service
from services.meeting.schemas import ChatMessageOut
from shared.bus import Context, Enqueued, HandlerSignal, Priority, Queue, Reject, Retry, new_id
from shared.bus.edge.pool import EdgeBridge
from shared.bus.edge.stackflow import EdgeUnavailable, StackFlowError, Template, to_handler_signal

from .schemas import Generation
from .settings import AiSettings

log = logging.getLogger(__name__)

ORIGIN_HEADER = "meetmesh-origin"   # set on the tasks the ai service queues itself (clients cannot)
MEETING_ENDED = "meeting.ended"     # ... for a meeting's summary: its chat is read, the summary posted
SERVICE_OWNER = "service:ai"        # owner of such a task when the event does not say who ended it
SUMMARY_EVENT = "ai.summary"        # the live event on meeting.<id> carrying a meeting's summary
NO_CHAT = "no chat messages to summarise"
NO_ASR = "no ASR model is available on the edge nodes: speech recognition cannot run"
NO_EMOTION = ("no emotion-detection model is available on the edge nodes: emotion detection "
              "cannot run")
PROGRESS_CAP = 0.99                 # progress while streaming stays below 1: done is the result


class Transcripts(Protocol):
    """Where a meeting's chat comes from (`services.meeting.client.MeetingClient`; tests stub it)."""

    async def transcript(self, meeting_id: str) -> list[ChatMessageOut]:
        """The meeting's chat messages, in order."""
        ...


def meeting_topic(meeting_id: str) -> str:
    """The meeting's live topic (as the meeting service names it)."""
    return f"meeting.{meeting_id}"


def kind_of(task_type: str) -> str:
    """``ai.summarize`` -> ``summarize`` (the catalogue's ``kind``)."""
    return task_type.removeprefix("ai.")


class Assistant:
    """The ai service's work, over one `EdgeBridge` (started and closed by the service)."""

    def __init__(self, service: Service, settings: AiSettings, bridge: EdgeBridge,
                 transcripts: Transcripts) -> None:
        self.service, self.settings, self.bridge, self.transcripts = service, settings, bridge, transcripts
        self.model = settings.ai_model
        self._queue: Queue | None = None

    # -- the edge ------------------------------------------------------------------------------

    def max_tokens(self, requested: int | None) -> int:
        """The answer length of a task: ``max_tokens`` if given (at most MEETMESH_AI_MAX_TOKENS)."""
        limit = self.settings.ai_max_tokens
        if requested is None:
            return limit
        if requested > limit:
            raise Reject(f"bad_request: max_tokens: at most {limit} (MEETMESH_AI_MAX_TOKENS), "
                         f"not {requested}")
        return requested

    def check_text(self, text: str, field: str = "text") -> str:
        """``text`` if the model can take it; `Reject` naming ``field`` if it is too long."""
        limit = self.settings.ai_max_input_chars
        if len(text) > limit:
            raise Reject(f"bad_request: {field}: at most {limit} characters (the model's context), "
                         f"not {len(text)}")
        return text

    async def generate(self, ctx: Context, template: Template, text: str, *, max_tokens: int,
                       language: str = "English") -> Generation:
        """``text`` through the model under ``template``; each token is announced as it comes
        (``ctx.progress(tokens / max_tokens, delta)``, below 1 until the result)."""
        parts: list[str] = []
        stream = cast(AsyncGenerator[str, None], self.bridge.infer(
            self.model, text, max_tokens=max_tokens, task=template, language=language))
        try:
            async for delta in stream:
                parts.append(delta)
                if not await ctx.progress(min(len(parts) / max_tokens, PROGRESS_CAP), delta):
                    log.info("task %s is no longer ours (cancelled or reclaimed): stopping its stream",
                             ctx.message.id)
                    break
        except StackFlowError as exc:
            raise self.signal(exc) from exc
        finally:
            await stream.aclose()  # stops the node's work if we left early
        return Generation(text="".join(parts), model=self.model, tokens=len(parts))

    def signal(self, exc: StackFlowError) -> HandlerSignal:
        """How a task ends on an edge error (`to_handler_signal`, with a clearer reason for no node)."""
        if isinstance(exc, EdgeUnavailable):
            return Retry(reason=f"{exc}: no edge node serving {self.model!r} is connected to the "
                                f"ai service's bridge at {self.bridge.endpoint}")
        return to_handler_signal(exc)

    # -- meetings ------------------------------------------------------------------------------

    async def meeting_chat(self, meeting_id: str) -> tuple[str, int, int]:
        """The meeting's chat as ``name: text`` lines: the latest that fit MEETMESH_AI_MAX_INPUT_CHARS,
        how many messages there are, and how many of them were left out."""
        messages = await self.transcripts.transcript(meeting_id)
        return _fit(messages, self.settings.ai_max_input_chars)

    def queue(self) -> Queue:
        """The ai queue (the service's own)."""
        if self._queue is None:
            s = self.settings
            self._queue = Queue(self.service.queue_name, self.service.redis, prefix=s.key_prefix,
                                **self.service.queue_options)
        return self._queue

    async def summarize_meeting_later(self, meeting_id: str, ended_by: str | None) -> Enqueued:
        """Queue the summary of an ended meeting's chat, at low priority, once per meeting. Its owner
        is who ended the meeting (its host, or an admin), so they can follow it as their task."""
        queue = self.queue()
        done = await queue.enqueue(
            "ai.summarize", {"meeting_id": meeting_id, "post_to_meeting": True},
            id=f"{queue.name}.{new_id()}", priority=Priority.LOW, owner=ended_by or SERVICE_OWNER,
            meeting_id=meeting_id, dedupe_key=f"ai.summarize:meeting:{meeting_id}",
            headers={ORIGIN_HEADER: MEETING_ENDED})
        if done.created:
            log.info("meeting %s ended: its summary is task %s", meeting_id, done.id)
            await self.service.emit_event("ai.task_created", {"task_id": done.id, "kind": "summarize",
                                                              "meeting_id": meeting_id})
        return done

    async def post_summary(self, ctx: Context, meeting_id: str, result: dict[str, Any]) -> None:
        """Send a meeting's summary live on its topic."""
        await self.service.broadcast(meeting_topic(meeting_id), SUMMARY_EVENT,
                                     {"meeting_id": meeting_id, "task_id": ctx.message.id, **result})

    # -- outcomes ------------------------------------------------------------------------------

    async def completed(self, ctx: Context, result: Any = None, error: str | None = None) -> None:
        """Announce ``ai.task_completed`` for a task that ended here (done, or rejected for good)."""
        given = ctx.payload.get("meeting_id") if isinstance(ctx.payload, dict) else None
        meeting_id = ctx.message.meeting_id or (given if isinstance(given, str) else None)
        await self.service.emit_event("ai.task_completed", {
            "task_id": ctx.message.id, "kind": kind_of(ctx.message.type), "ok": error is None,
            "meeting_id": meeting_id, "result": result, "error": error})


def _fit(messages: Sequence[ChatMessageOut], budget: int) -> tuple[str, int, int]:
    """The latest messages' lines within ``budget`` characters (the newest one cut to fit if alone)."""
    lines: list[str] = []
    used = 0
    for message in reversed(messages):
        line = f"{message.username or message.user_id}: {message.text}"
        if used + len(line) + 1 > budget:
            if not lines:
                lines.append(line[-budget:])
            break
        lines.append(line)
        used += len(line) + 1
    return "\n".join(reversed(lines)), len(messages), len(messages) - len(lines)
