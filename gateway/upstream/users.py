"""The user service's routes: accounts, tokens, profiles and roles."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from services.user.schemas import (
    LoginRequest,
    ProfileUpdate,
    RegisterRequest,
    RolesUpdate,
    TokenOut,
    UserOut,
)

from ..auth import User
from .common import errors
from .common import proxy as _proxy

router = APIRouter(prefix="/api/v1", responses=errors(400, 503))
UserId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]


@router.post("/auth/register", status_code=201, response_model=TokenOut, tags=["auth"], responses=errors(409))
async def register(request: Request, body: RegisterRequest) -> Response:
    """Create an account and get a token. Usernames are unique whatever their case; 409 if taken."""
    return await _proxy(request).call("user", "POST", "/auth/register", None, body=body, public=True)


@router.post("/auth/login", response_model=TokenOut, tags=["auth"], responses=errors(401))
async def login(request: Request, body: LoginRequest) -> Response:
    """A token for a username and password (401 without saying which was wrong)."""
    return await _proxy(request).call("user", "POST", "/auth/login", None, body=body, public=True)


@router.get("/users/me", response_model=UserOut, tags=["users"], responses=errors(401, 404))
async def me(request: Request, principal: User) -> Response:
    """Your profile (404 when the token's user has no account, e.g. a token minted by hand)."""
    return await _proxy(request).call("user", "GET", "/users/me", principal)


@router.patch("/users/me", response_model=UserOut, tags=["users"], responses=errors(401, 404))
async def update_me(request: Request, principal: User, body: ProfileUpdate) -> Response:
    """Change your email and/or display name (null clears one)."""
    return await _proxy(request).call("user", "PATCH", "/users/me", principal, body=body)


@router.get("/users", response_model=list[UserOut], tags=["users"], responses=errors(401, 403))
async def list_users(
    request: Request,
    principal: User,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> Response:
    """Every account, oldest first (admins)."""
    return await _proxy(request).call(
        "user", "GET", "/users", principal, params={"limit": limit, "offset": offset}
    )


@router.get("/users/{user_id}", response_model=UserOut, tags=["users"], responses=errors(401, 403, 404))
async def get_user(request: Request, principal: User, user_id: UserId) -> Response:
    """A profile: your own, or anyone's for an admin."""
    return await _proxy(request).call("user", "GET", f"/users/{user_id}", principal)


@router.put("/users/{user_id}/roles", response_model=UserOut, tags=["users"], responses=errors(401, 403, 404))
async def set_roles(request: Request, principal: User, user_id: UserId, body: RolesUpdate) -> Response:
    """Set a user's roles (admins); they take effect with the user's next token."""
    return await _proxy(request).call("user", "PUT", f"/users/{user_id}/roles", principal, body=body)
