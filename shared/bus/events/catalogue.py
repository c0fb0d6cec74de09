"""The event catalogue: the envelope every event travels in, the typed payload of each event type,
and the topic patterns subscribers use.

Topic patterns are dot-separated, as event types are: ``*`` matches exactly one segment and ``>``
(or ``#``) as the last segment matches one or more. ``meeting.*`` takes ``meeting.created`` but not
``media.cover_ready``; ``>`` takes everything. Each backend translates them to its own syntax.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InvalidMessage, describe
from ..queue.message import new_id, new_traceparent

_TYPE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
_SEGMENT = re.compile(r"^([a-z0-9_-]+|\*)$")


class Payload(BaseModel):
    """Base of every catalogue payload: unknown fields are refused, so a typo is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P")


class Event(BaseModel, Generic[P]):
    """The envelope: id, type, source service, time, W3C trace context, and the typed payload."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(default_factory=new_id)
    type: str
    source: str
    time: float = Field(default_factory=time.time, description="Unix time the event was published")
    traceparent: str = Field(default_factory=new_traceparent)
    data: P


# -- payloads -------------------------------------------------------------------------------------

class UserRegistered(Payload):
    """A user account was created."""

    user_id: str
    username: str


class MeetingCreated(Payload):
    """A meeting was created by its host."""

    meeting_id: str
    host_id: str
    title: str = ""


class MeetingStarted(Payload):
    """A meeting started."""

    meeting_id: str


class MeetingEnded(Payload):
    """A meeting ended."""

    meeting_id: str
    ended_by: str | None = None


class MeetingUserJoined(Payload):
    """A participant joined a meeting."""

    meeting_id: str
    user_id: str


class MeetingUserLeft(Payload):
    """A participant left a meeting, or was removed by the host."""

    meeting_id: str
    user_id: str
    kicked: bool = False


class MeetingMuted(Payload):
    """A participant was muted or unmuted."""

    meeting_id: str
    user_id: str
    muted: bool = True
    by: str | None = None


class MediaStreamStarted(Payload):
    """A media stream started in a meeting."""

    meeting_id: str
    stream_id: str
    user_id: str | None = None


class MediaStreamStopped(Payload):
    """A media stream stopped."""

    meeting_id: str
    stream_id: str


class MediaRecordingReady(Payload):
    """A meeting's recording is stored and ready."""

    meeting_id: str
    recording_id: str
    path: str
    duration_s: float | None = None


class MediaCoverReady(Payload):
    """A cover image was generated for an uploaded video."""

    media_id: str
    cover_path: str


class AiTaskCreated(Payload):
    """An AI task was accepted."""

    task_id: str
    kind: str
    meeting_id: str | None = None


class AiTaskCompleted(Payload):
    """An AI task finished, with its result or error."""

    task_id: str
    kind: str
    ok: bool = True
    meeting_id: str | None = None
    result: Any = None
    error: str | None = None


class TaskStatusChanged(Payload):
    """Any task's status changed (queued, processing, completed, ...)."""

    task_id: str
    queue: str
    status: str
    type: str | None = None
    owner: str | None = None
    meeting_id: str | None = None
    progress: float | None = None
    at: datetime | None = None


CATALOGUE: dict[str, type[BaseModel]] = {
    "user.registered": UserRegistered,
    "meeting.created": MeetingCreated,
    "meeting.started": MeetingStarted,
    "meeting.ended": MeetingEnded,
    "meeting.user_joined": MeetingUserJoined,
    "meeting.user_left": MeetingUserLeft,
    "meeting.muted": MeetingMuted,
    "media.stream_started": MediaStreamStarted,
    "media.stream_stopped": MediaStreamStopped,
    "media.recording_ready": MediaRecordingReady,
    "media.cover_ready": MediaCoverReady,
    "ai.task_created": AiTaskCreated,
    "ai.task_completed": AiTaskCompleted,
    "task.status": TaskStatusChanged,
}


def register(type: str, payload: type[BaseModel]) -> None:
    """Add an event type to the catalogue (a service's own events); its name must be new."""
    if not _TYPE.match(type):
        raise InvalidMessage(f"event type {type!r} must be dot-separated lowercase words, e.g. 'chat.posted'")
    if type in CATALOGUE and CATALOGUE[type] is not payload:
        raise InvalidMessage(f"event type {type!r} is already in the catalogue")
    CATALOGUE[type] = payload


def payload_model(type: str) -> type[BaseModel]:
    try:
        return CATALOGUE[type]
    except KeyError:
        raise InvalidMessage(f"unknown event type {type!r}; known: {', '.join(sorted(CATALOGUE))}") from None


def make_event(type: str, data: Any, *, source: str, traceparent: str | None = None) -> Event[Any]:
    """Validate ``data`` against ``type``'s payload model and wrap it; `InvalidMessage` if it does not fit."""
    model = payload_model(type)
    try:
        payload = data if isinstance(data, model) else model.model_validate(data)
    except ValidationError as exc:
        raise InvalidMessage(f"invalid {type!r} event: {describe(exc)}") from exc
    fields: dict[str, Any] = {"type": type, "source": source, "data": payload}
    if traceparent:
        fields["traceparent"] = traceparent
    return Event[Any](**fields)


def decode_event(raw: bytes | str | dict[str, Any]) -> Event[Any]:
    """Parse an event received from a broker (its JSON, or that JSON already decoded), validating
    its payload; `InvalidMessage` says why not."""
    try:
        if isinstance(raw, dict):  # already decoded by the broker library
            envelope = Event[dict[str, Any]].model_validate(raw)
        else:
            envelope = Event[dict[str, Any]].model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidMessage(f"malformed event: {describe(exc)}") from exc
    model = payload_model(envelope.type)
    try:
        data = model.model_validate(envelope.data)
    except ValidationError as exc:
        raise InvalidMessage(f"invalid {envelope.type!r} event: {describe(exc)}") from exc
    return envelope.model_copy(update={"data": data})


# -- topic patterns -------------------------------------------------------------------------------

def check_pattern(pattern: str) -> str:
    """Return ``pattern`` normalised (``#`` becomes ``>``), or raise `InvalidMessage` saying what is wrong."""
    parts = pattern.split(".")
    if parts and parts[-1] in (">", "#"):
        parts[-1] = ">"
        body = parts[:-1]
    else:
        body = parts
    if not pattern or not all(_SEGMENT.match(p) for p in body):
        raise InvalidMessage(f"topic pattern {pattern!r}: use dot-separated words, '*' for one word, "
                             "and '>' (or '#') last for the rest")
    return ".".join(parts)


@lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    parts = check_pattern(pattern).split(".")
    out = []
    for p in parts:
        out.append(r"[^.]+" if p == "*" else r".+" if p == ">" else re.escape(p))
    return re.compile(r"\.".join(out) + r"\Z")


def matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` (an event type or a broadcast topic) falls under ``pattern``."""
    return pattern == topic or _compiled(pattern).match(topic) is not None


def matching_types(patterns: Iterable[str]) -> list[str]:
    """The catalogue's event types that any of ``patterns`` takes, sorted."""
    return sorted(t for t in CATALOGUE if any(matches(p, t) for p in patterns))
