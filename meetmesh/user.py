"""``meetmesh user ...``: the operator's account actions (grant-admin, revoke-admin, delete), and the
``meetmesh token`` command's lookup; each made on the user service's store (`admin`)."""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

if TYPE_CHECKING:
    from services.common import ServiceSettings
    from services.user.admin import UserStore
    from services.user.schemas import UserOut

T = TypeVar("T")
app = typer.Typer(help="Accounts: grant or revoke the admin role, delete a user.", no_args_is_help=True)
Name = Annotated[str, typer.Argument(help="The username (as registered; any case).")]


def settings_for_tools(secret: str | None = None) -> ServiceSettings:
    """The user service's settings for a tool. Tools that sign nothing get a throwaway secret: what
    they need is the store (``MEETMESH_DATABASE_URL`` / ``MEETMESH_DATA_DIR``) and Redis."""
    from services.common import ServiceSettings
    from shared.bus import BusError

    try:
        return ServiceSettings(jwt_secret=secret or secrets.token_urlsafe(32))
    except BusError as exc:
        sys.exit(f"meetmesh: {exc}")
    except ValueError as exc:   # pydantic's ValidationError
        sys.exit(f"meetmesh: {exc}")


def run_on_store(fn: Callable[[UserStore], Awaitable[T]], secret: str | None = None, *,
                 command: str = "user") -> T:
    """``fn(store)`` on the user store; a missing user or an unreachable store is one line, exit 1."""
    from services.common import ServiceError
    from services.user.admin import UserStore

    from .common import run

    settings = settings_for_tools(secret)

    async def main() -> T:
        async with UserStore.open(settings) as store:
            return await fn(store)

    try:
        return run(main)
    except ServiceError as exc:
        sys.exit(f"meetmesh {command}: {exc.message}")


def _show(what: str, user: UserOut, as_json: bool) -> None:
    if as_json:
        print(json.dumps(user.model_dump(mode="json")))
    else:
        print(f"{what}: {user.username} ({user.id}), roles {', '.join(user.roles)}")


@app.command("grant-admin")
def grant_admin(name: Name, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Give NAME the admin role (from its next token: log in again)."""
    change = run_on_store(lambda store: store.set_admin(name, True))
    _show("granted admin" if change.changed else "already an admin", change.user, as_json)


@app.command("revoke-admin")
def revoke_admin(name: Name, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Take the admin role from NAME; its tokens issued before are refused from now on."""
    change = run_on_store(lambda store: store.set_admin(name, False))
    _show("revoked admin" if change.changed else "not an admin", change.user, as_json)


@app.command("delete")
def delete(name: Name, yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False) -> None:
    """Delete NAME's account; its tokens are refused from now on."""
    if not yes:
        typer.confirm(f"delete the user {name!r} for good?", abort=True)
    user = run_on_store(lambda store: store.delete(name))
    print(f"deleted {user.username} ({user.id}); its tokens are refused from now on")


def mint_for_user(name: str, ttl: float | None = None, *, command: str = "token") -> str:
    """A token for the registered user ``name``, signed with the configured secret, else the data
    folder's development secret (`shared.bus.credentials.signing_secret`); exits saying what is missing."""
    from shared.bus.credentials import data_dir, dev_secret_path, signing_secret

    found = signing_secret()
    if found is None:
        sys.exit(f"meetmesh {command}: no signing secret: set MEETMESH_JWT_SECRET (or "
                 f"MEETMESH_JWT_SECRET_FILE), or run `meetmesh up` first: it keeps its development secret "
                 f"in {dev_secret_path(data_dir())} (MEETMESH_DATA_DIR names the data folder)")
    secret, where = found
    if where != "MEETMESH_JWT_SECRET":
        typer.echo(f"meetmesh {command}: signing with the development secret in {where}", err=True)
    return run_on_store(lambda store: store.token(name, ttl=ttl), secret, command=command).access_token


def register(cli: typer.Typer) -> None:
    """Add ``user`` to the ``meetmesh`` app."""
    cli.add_typer(app, name="user")
