"""The user service's task handlers (queue ``user``): the same operations as its REST."""

from __future__ import annotations

from typing import Any

from services.common import actor, payload, task
from shared.bus import Context, Router

from .accounts import Accounts
from .schemas import ProfileUpdate


def handlers(accounts: Accounts) -> Router:
    router = Router()

    @router.handler("user.profile.update")
    @task
    async def profile_update(ctx: Context) -> dict[str, Any]:
        """``{email?, display_name?}`` for the submitting user -> the updated profile."""
        updated = await accounts.update_profile(actor(ctx), payload(ProfileUpdate, ctx))
        return updated.model_dump(mode="json")

    return router
