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
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

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
