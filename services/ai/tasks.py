"""The ai service's task handlers (queue ``ai``).

``ai.chat`` ``{text, max_tokens?}``, ``ai.translate`` ``{text, language, max_tokens?}``,
``ai.action_items`` ``{text, max_tokens?}`` and ``ai.summarize`` ``{text, max_tokens?}`` run on the
edge nodes, streaming each token to the task's watchers as a ``progress`` frame with its ``delta``,
and answer ``{"text", "model", "tokens"}``. ``ai.speech_recognition`` and ``ai.emotion_detection``
fail at once saying no such model is available: the edge nodes serve text models only, and a
made-up answer would be worse than none.

Bad data is rejected naming the field (dead-lettered as ``failed``). Every task that ends here,
done, rejected or out of retries, is announced as ``ai.task_completed`` (one that runs past its
timeout is not: the worker ends it).
"""

from __future__ import annotations

import functools
from typing import Any, NoReturn

from services.common import payload, task
from services.common.tasks import TaskHandler
from shared.bus import Context, Reject, Retry, Router

from .assistant import MEETING_ENDED, NO_ASR, NO_CHAT, NO_EMOTION, ORIGIN_HEADER, Assistant
from .schemas import ActionItemsRequest, ChatRequest, Generation, SummarizeRequest, TranslateRequest

TASK_TYPES = ("ai.summarize", "ai.chat", "ai.translate", "ai.action_items", "ai.speech_recognition",
              "ai.emotion_detection")


def handlers(ai: Assistant) -> Router:
    router = Router()

    def final(fn: TaskHandler) -> TaskHandler:
        """Publish ``ai.task_completed`` when the task ends here: its result, rejected, or asking
        for a retry on its last attempt (dead-lettered then)."""

        @functools.wraps(fn)
        async def run(ctx: Context) -> Any:
            try:
                result = await fn(ctx)
            except Reject as exc:
                await ai.completed(ctx, error=exc.reason)
                raise
            except Retry as exc:
                m = ctx.message
                if m.attempts > (ctx.queue.max_retries if m.max_retries is None else m.max_retries):
                    await ai.completed(ctx, error=exc.reason)
                raise
            await ai.completed(ctx, result)
            return result

        return run

    @router.handler("ai.chat")
    @final
    @task
    async def chat(ctx: Context) -> dict[str, Any]:
        body = payload(ChatRequest, ctx)
        max_tokens = ai.max_tokens(body.max_tokens)
        return (await ai.generate(ctx, "chat", ai.check_text(body.text), max_tokens=max_tokens)).model_dump()

    @router.handler("ai.translate")
    @final
    @task
    async def translate(ctx: Context) -> dict[str, Any]:
        body = payload(TranslateRequest, ctx)
        max_tokens = ai.max_tokens(body.max_tokens)
        answer = await ai.generate(ctx, "translate", ai.check_text(body.text), max_tokens=max_tokens,
                                   language=body.language)
        return answer.model_dump() | {"language": body.language}

    @router.handler("ai.action_items")
    @final
    @task
    async def action_items(ctx: Context) -> dict[str, Any]:
        body = payload(ActionItemsRequest, ctx)
        max_tokens = ai.max_tokens(body.max_tokens)
        return (await ai.generate(ctx, "action_items", ai.check_text(body.text),
                                  max_tokens=max_tokens)).model_dump()

    @router.handler("ai.summarize")
    @final
    @task
    async def summarize(ctx: Context) -> dict[str, Any]:
        """``{text}``; or, queued by the ai service when a meeting ends, ``{meeting_id,
        post_to_meeting: true}``: the meeting's chat, summarised and posted on ``meeting.<id>``."""
        body = payload(SummarizeRequest, ctx)
        ours = ctx.message.headers.get(ORIGIN_HEADER) == MEETING_ENDED
        if body.post_to_meeting and not ours:
            raise Reject("bad_request: post_to_meeting: only the summaries the ai service queues itself "
                         "when a meeting ends are posted to the meeting")
        max_tokens = ai.max_tokens(body.max_tokens)
        meeting_id = body.meeting_id or ctx.message.meeting_id
        if body.text is not None:
            result = (await ai.generate(ctx, "summarize", ai.check_text(body.text),
                                        max_tokens=max_tokens)).model_dump()
        elif ours and meeting_id:
            chat, count, left_out = await ai.meeting_chat(meeting_id)
            summary = (Generation(text=NO_CHAT, model=None, tokens=0) if not count else
                       await ai.generate(ctx, "summarize", chat, max_tokens=max_tokens))
            result = summary.model_dump() | {"meeting_id": meeting_id, "messages": count,
                                             "left_out": left_out}
        else:
            raise Reject("bad_request: text: Field required (a meeting's chat is summarised by the ai "
                         "service itself when the meeting ends)")
        if body.post_to_meeting:
            if meeting_id is None:
                raise Reject("bad_request: meeting_id: Field required with post_to_meeting")
            await ai.post_summary(ctx, meeting_id, result)
        return result

    @router.handler("ai.speech_recognition")
    @final
    async def speech_recognition(ctx: Context) -> NoReturn:
        raise Reject(NO_ASR)

    @router.handler("ai.emotion_detection")
    @final
    async def emotion_detection(ctx: Context) -> NoReturn:
        raise Reject(NO_EMOTION)

    assert set(router) == set(TASK_TYPES)
    return router
