"""A stand-in for the services in gateway tests: handlers for a few routed task types."""

from __future__ import annotations

import asyncio
from typing import Any

from shared.bus import Context, Reject, Retry, Router

router = Router()


@router.handler("ai.summarize")
async def summarize(ctx: Context) -> dict[str, Any]:
    """Streams its answer as progress deltas, then returns it whole."""
    words = str((ctx.payload or {}).get("text", "one two three")).split()
    pause = float((ctx.payload or {}).get("pause", 0.0))
    for i, word in enumerate(words, 1):
        await ctx.progress(i / len(words), word)
        if pause:
            await asyncio.sleep(pause)
    return {"summary": " ".join(words)}


@router.handler("ai.chat")
async def chat(ctx: Context) -> dict[str, Any]:
    return {"echo": ctx.payload}


@router.handler("ai.translate")
async def translate(ctx: Context) -> dict[str, Any]:
    """Fails its first attempt (asking for another at once), then answers."""
    if ctx.message.attempts <= 1:
        raise Retry(delay=0, reason="the model is warming up")
    return {"attempts": ctx.message.attempts}


@router.handler("media.cover")
async def cover(ctx: Context) -> None:
    raise Reject("no video to take a cover from")


@router.handler("meeting.create")
async def slow(ctx: Context) -> dict[str, Any]:
    await asyncio.sleep(float((ctx.payload or {}).get("seconds", 30)))
    return {"slept": True}
