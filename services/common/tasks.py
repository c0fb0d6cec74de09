"""Task handlers that share a service's domain code with its REST: payloads parsed into the same
request models, errors turned into the worker's outcomes.

A `ServiceError` 4xx (bad data, not allowed, not found, conflict) is final: ``Reject(reason)``, so the
task is dead-lettered as ``failed`` with ``"<code>: <message>"``. `Unavailable` (the database is down)
is ``Retry``: it may work later. Anything else escapes to the worker, which retries it and
dead-letters it with its traceback once the retries are spent; a handler never takes a service down.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from shared.bus import Context, Reject, Retry

from .errors import ServiceError, Unavailable
from .identity import Actor

M = TypeVar("M", bound=BaseModel)
TaskHandler = Callable[[Context], Awaitable[Any]]


def payload(model: type[M], ctx: Context, *, drop: tuple[str, ...] = ()) -> M:
    """The task's payload as ``model`` (a missing payload is ``{}``); `Reject` naming the bad field.

    ``drop``: keys of the payload that are read elsewhere (e.g. ``meeting_id``), not by ``model``.
    """
    data = ctx.payload if ctx.payload is not None else {}
    if not isinstance(data, dict):
        raise Reject(f"bad_request: the payload of {ctx.message.type} must be a JSON object")
    try:
        return model.model_validate({k: v for k, v in data.items() if k not in drop})
    except ValidationError as exc:
        raise Reject(f"bad_request: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """Where and what: pydantic's first complaint, in one line."""
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or 'payload'}: {err['msg']}"


MeetingId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
_MEETING_ID: TypeAdapter[str] = TypeAdapter(MeetingId)


def meeting_of(ctx: Context, given: str | None = None) -> str:
    """The meeting a task is for: the message's ``meeting_id``, or the one in its data (``given``, or
    the payload's ``meeting_id``); when both are there they must agree."""
    if given is None and isinstance(ctx.payload, dict):
        given = ctx.payload.get("meeting_id")
    own = ctx.message.meeting_id
    if given is not None and own is not None and given != own:
        raise Reject("bad_request: the payload's meeting_id differs from the task's meeting_id")
    meeting_id = own or given
    if meeting_id is None:
        raise Reject(f"bad_request: {ctx.message.type} needs a meeting_id (the task's, or in its data)")
    try:
        return _MEETING_ID.validate_python(meeting_id)
    except ValidationError:
        raise Reject(f"bad_request: invalid meeting_id {meeting_id!r}") from None


def actor(ctx: Context) -> Actor:
    """The submitting user (the message's ``owner``); tasks act with the ``user`` role only."""
    owner = ctx.message.owner
    if not owner:
        raise Reject(f"bad_request: {ctx.message.type} needs an owner (the submitting user)")
    return Actor(owner)


def task(fn: TaskHandler) -> TaskHandler:
    """Wrap a handler: `ServiceError` 4xx -> `Reject`, `Unavailable` -> `Retry`."""

    @functools.wraps(fn)
    async def run(ctx: Context) -> Any:
        try:
            return await fn(ctx)
        except Unavailable as exc:
            raise Retry(reason=exc.message) from exc
        except ServiceError as exc:
            raise Reject(f"{exc.code}: {exc.message}") from exc

    return run
