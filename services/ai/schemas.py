"""The payloads of the ``ai.*`` tasks and what they answer. Unknown fields are refused, so a typo is
rejected naming the field rather than ignored."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services.common.tasks import MeetingId

Text = Annotated[str, StringConstraints(min_length=1)]
MaxTokens = Annotated[int, Field(ge=1, description="answer length in tokens (<= MEETMESH_AI_MAX_TOKENS)")]
Language = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=40,
                                            pattern=r"^[^\x00-\x1f{}]+$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ChatRequest(Strict):
    """``ai.chat``: a question or message for the assistant."""

    text: Text
    max_tokens: MaxTokens | None = None


class TranslateRequest(Strict):
    """``ai.translate``: ``text`` into ``language`` (a language's name, e.g. "French")."""

    text: Text
    language: Language
    max_tokens: MaxTokens | None = None


class ActionItemsRequest(Strict):
    """``ai.action_items``: the action items in a transcript or notes."""

    text: Text
    max_tokens: MaxTokens | None = None


class SummarizeRequest(Strict):
    """``ai.summarize``: ``text`` in two or three sentences.

    Without ``text``, the chat of ``meeting_id`` is read from the meeting service: only for the tasks
    the ai service queues itself when a meeting ends, which also carry ``post_to_meeting`` (the
    summary is then sent live on ``meeting.<id>`` as ``ai.summary``)."""

    text: Text | None = None
    meeting_id: MeetingId | None = None
    post_to_meeting: bool = False
    max_tokens: MaxTokens | None = None


class Generation(BaseModel):
    """What an LLM task answers: the whole text, the model that wrote it and its length in tokens
    (``model`` is None when no model was asked, e.g. a meeting without chat)."""

    text: str
    model: str | None
    tokens: int
