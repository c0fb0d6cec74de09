"""The SQL store: an async SQLAlchemy engine and session factory on SQLite (embedded, the default)
or PostgreSQL (asyncpg), chosen by URL.

- SQLite runs in WAL mode with a busy timeout, and every transaction starts with ``BEGIN
  IMMEDIATE``: SQLite has one writer at a time, and a transaction that read first and then tried
  to write would otherwise fail at once with "database is locked" instead of waiting its turn.
- PostgreSQL can keep a store's tables in its own schema (``schema=``, created if missing), so
  several environments, or test runs, share one database.
- Each service declares its tables on its own `MetaData` and creates them at start (``create_all``
  only adds what is missing); services share the store, never each other's tables.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import StaticPool

from shared.bus import ConfigError

from .errors import Unavailable

SQLITE_BUSY_SECONDS = 30.0
_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgres": "postgresql+asyncpg",
            "postgresql": "postgresql+asyncpg"}


def async_url(url: str) -> str:
    """``url`` with its async driver: ``sqlite://`` -> aiosqlite, ``postgresql://`` -> asyncpg.

    `ConfigError` (naming ``MEETMESH_DATABASE_URL``) for anything else.
    """
    scheme, sep, rest = url.partition("://")
    driver = _DRIVERS.get(scheme.lower(), scheme.lower())
    if not sep or driver not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise ConfigError(f"MEETMESH_DATABASE_URL {url!r}: use sqlite:///path/to/file.db "
                          "or postgresql://user:password@host:5432/database")
    return f"{driver}://{rest}"


class Database:
    """One engine and its sessions for a service. ``async with db.session() as s:`` for work,
    ``await db.create_all(metadata)`` at start, ``await db.dispose()`` at the end."""

    def __init__(self, url: str, *, schema: str | None = None, echo: bool = False) -> None:
        try:
            parsed = make_url(async_url(url))
        except ArgumentError as exc:
            raise ConfigError(f"MEETMESH_DATABASE_URL {url!r}: {exc}") from exc
        self.url = parsed
        self.dialect = parsed.get_backend_name()
        self.schema = schema if self.dialect == "postgresql" else None
        options: dict[str, Any] = {"echo": echo, "pool_pre_ping": True}
        if self.dialect == "sqlite":
            options["connect_args"] = {"timeout": SQLITE_BUSY_SECONDS}
            if parsed.database in (None, "", ":memory:"):
                options["poolclass"] = StaticPool
                options.pop("pool_pre_ping")
            else:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        elif self.schema:
            options["connect_args"] = {"server_settings": {"search_path": self.schema}}
        self.engine: AsyncEngine = create_async_engine(parsed, **options)
        if self.dialect == "sqlite":
            _serialise_sqlite(self.engine)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r}, schema={self.schema!r})"

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session; an unreachable database becomes `Unavailable` (503, or a retried task)."""
        async with self.sessions() as session:
            try:
                yield session
            except (OperationalError, OSError, ConnectionError) as exc:
                raise Unavailable(f"the database is unreachable: {_first_line(exc)}") from exc
            except DBAPIError as exc:
                if exc.connection_invalidated:
                    raise Unavailable(f"the database connection was lost: {_first_line(exc)}") from exc
                raise

    async def create_all(self, *metadata: MetaData) -> None:
        """Create the schema (PostgreSQL, when set) and every missing table of ``metadata``.

        Replicas starting together may race to create a table: the loser tries once more.
        """
        for attempt in (1, 2):
            try:
                async with self.engine.begin() as conn:
                    if self.schema:
                        await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
                    for md in metadata:
                        await conn.run_sync(md.create_all)
                return
            except (OperationalError, OSError, ConnectionError) as exc:
                raise Unavailable(f"cannot reach the database {self!r}: {_first_line(exc)}") from exc
            except DBAPIError:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.2)

    async def ping(self) -> bool:
        """Whether the database answers (for readiness checks); never raises."""
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    async def dispose(self) -> None:
        await self.engine.dispose()


def _serialise_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_SECONDS * 1000)}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _first_line(exc: BaseException) -> str:
    return (str(getattr(exc, "orig", None) or exc).splitlines() or [type(exc).__name__])[0]
