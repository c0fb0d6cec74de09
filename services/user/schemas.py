"""The user service's request and response bodies, shared by its REST, its tasks and the gateway
(whose OpenAPI document shows them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Username = Annotated[str, Field(min_length=3, max_length=32, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                                examples=["alice"],
                                description="3-32 of A-Z a-z 0-9 _ . - (unique, whatever the case)")]
Password = Annotated[str, Field(min_length=8, max_length=256, description="8 to 256 characters")]
Email = Annotated[str, Field(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$",
                             examples=["a@example.org"])]
DisplayName = Annotated[str, Field(min_length=1, max_length=100)]
Role = Literal["user", "admin"]


class Strict(BaseModel):
    # strict: no number where a string is due; extra fields are a mistake worth reporting
    model_config = ConfigDict(extra="forbid", strict=True)


class RegisterRequest(Strict):
    """A new account. ``email`` and ``display_name`` are optional."""

    username: Username
    password: Password
    email: Email | None = None
    display_name: DisplayName | None = None


class LoginRequest(Strict):
    # Loose on purpose: a malformed username is just a wrong one (401), not a hint (400).
    username: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=256)


class ProfileUpdate(Strict):
    """The fields to change (at least one); null clears one. Also the payload of ``user.profile.update``."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"minProperties": 1})

    email: Email | None = None
    display_name: DisplayName | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> ProfileUpdate:
        if not self.model_fields_set:
            raise ValueError("nothing to update: send email and/or display_name (null clears one)")
        return self


class RolesUpdate(Strict):
    """An admin sets a user's roles (effective from the user's next token)."""

    roles: list[Role] = Field(min_length=1, max_length=2)


class UserOut(BaseModel):
    id: str
    username: str
    email: str | None = None
    display_name: str | None = None
    roles: list[str]
    created_at: float = Field(description="Unix time")
    updated_at: float = Field(description="Unix time")


class TokenOut(BaseModel):
    """A bearer token for the gateway (HS256 JWT: ``sub`` = the user id, ``roles``, ``exp``)."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_at: float = Field(description="Unix time")
    user: UserOut
