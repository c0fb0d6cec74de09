"""The user service's REST (the gateway serves it under ``/api/v1``, same paths)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from services.common import Caller, Gateway

from .accounts import Accounts
from .schemas import LoginRequest, ProfileUpdate, RegisterRequest, RolesUpdate, TokenOut, UserOut

UserId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]


def routes(accounts: Accounts) -> APIRouter:
    router = APIRouter()

    @router.post("/auth/register", status_code=201, dependencies=[Gateway], tags=["auth"])
    async def register(body: RegisterRequest) -> TokenOut:
        return await accounts.register(body)

    @router.post("/auth/login", dependencies=[Gateway], tags=["auth"])
    async def login(body: LoginRequest) -> TokenOut:
        return await accounts.login(body)

    @router.get("/users/me", tags=["users"])
    async def me(actor: Caller) -> UserOut:
        return await accounts.get(actor)

    @router.patch("/users/me", tags=["users"])
    async def update_me(actor: Caller, body: ProfileUpdate) -> UserOut:
        return await accounts.update_profile(actor, body)

    @router.get("/users", tags=["users"])
    async def list_users(actor: Caller, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                         offset: Annotated[int, Query(ge=0)] = 0) -> list[UserOut]:
        return await accounts.list_users(actor, limit=limit, offset=offset)

    @router.get("/users/{user_id}", tags=["users"])
    async def get_user(actor: Caller, user_id: UserId) -> UserOut:
        return await accounts.get(actor, user_id)

    @router.put("/users/{user_id}/roles", tags=["users"])
    async def set_roles(actor: Caller, user_id: UserId, body: RolesUpdate) -> UserOut:
        return await accounts.set_roles(actor, user_id, body.roles)

    return router
