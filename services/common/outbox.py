"""The transactional outbox: a service's durable events commit with the change they report, and a
relay publishes them afterwards, so neither a crash nor an unreachable broker between the commit and
the publish loses one.

- **Staging.** ``await service.stage_event(session, type, data)`` (`Outbox.add`) validates ``data``
  against the catalogue and builds the `Event` at once (`make_event`): bad data raises
  `InvalidMessage` before anything is committed, and the event's id and time are fixed from then on.
  Its JSON is inserted into the service's outbox table inside the caller's open transaction, so it
  commits, or rolls back, with the change. Staging also hooks the session's ``after_commit`` to
  wake the relay: nothing else is asked of the caller. An event that reports no SQL change (ai's
  ``ai.task_completed``) is staged in a short transaction of its own (`Service.emit_event`).
- **The table.** One per service, ``<service>_outbox`` on a `MetaData` of its own that the service
  creates at start beside its tables: services sharing a store never read each other's rows. Its
  columns: an autoincrement ``id`` (the publish order), the event's id and type (for people looking),
  its JSON ``body``, and ``created_at``.
- **Relaying.** `OutboxRelay` is a task of the `Service`, started once its event bus is connected
  and stopped before the bus closes. It drains the table at start (rows a crashed process left),
  then whenever a commit wakes it, and every ``poll_seconds`` anyway (rows committed by another
  replica). Each batch is read in ``id`` order, published one by one with
  ``EventBus.publish_event`` and deleted, in the transaction that read it. A failing publish (the
  broker is down) or database stops the batch (what was published is still deleted) and the relay
  retries after a jittered, capped exponential backoff; a row is never dropped. At stop the relay
  publishes what it can for ``flush_seconds``; what is left waits for the next start.
- **Replicas.** On PostgreSQL the batch is taken with ``SELECT ... FOR UPDATE SKIP LOCKED``: replicas
  sharing the table publish disjoint batches, each holding its rows' locks while publishing them,
  until the delete commits. On SQLite every transaction is ``BEGIN IMMEDIATE`` (`db`): the relays of
  one store take turns, the batch's transaction holding the store's one write lock while it publishes
  (a batch is short: ``batch`` rows, each publish bounded by ``publish_timeout``).
- **Delivery is at least once.** A relay that crashes (or loses its database) after publishing a row
  but before its delete commits leaves the row in the table, and it is published again, with the
  same event id: subscribers that must not act twice deduplicate on ``event.id``. With one relay,
  events go out in ``id`` order, which is commit order for changes serialised by a lock (one
  meeting's row lock, SQLite's write lock); several replicas may interleave their batches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from shared.bus import ConfigError, Event, EventBus, backoff, make_event

from .db import Database

log = logging.getLogger(__name__)

MAX_TABLE_NAME = 63  # PostgreSQL's identifier limit (it would cut a longer name silently)


class Outbox:
    """The outbox table of service ``service``: stage events in a transaction, count what is pending.

    ``committed`` is set after a transaction that staged an event commits: the relay waits on it.
    """

    def __init__(self, service: str) -> None:
        name = f"{service}_outbox"
        if len(name) > MAX_TABLE_NAME:
            raise ConfigError(f"service name {service!r} is too long for its outbox table {name!r} "
                              f"(at most {MAX_TABLE_NAME} characters)")
        self.service = service
        self.metadata = MetaData()
        self.table = Table(
            name, self.metadata,
            # INTEGER on SQLite: its rowid, the only type SQLite autoincrements
            Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
                   autoincrement=True),
            Column("event_id", String(64), nullable=False),
            Column("event_type", String(128), nullable=False),
            Column("body", Text, nullable=False),
            Column("created_at", Float, nullable=False),
        )
        self.committed = asyncio.Event()
        self._hooked = f"meetmesh.outbox.hooked:{name}"  # in session.info: after_commit is hooked

    def __repr__(self) -> str:
        return f"Outbox({self.table.name!r})"

    async def add(self, session: AsyncSession, type: str, data: Any, *,
                  traceparent: str | None = None) -> Event[Any]:
        """Stage event ``type`` with ``data`` in ``session``'s transaction; it is published once that
        commits (never if it rolls back). `InvalidMessage`, before anything is written, if ``data``
        does not fit the catalogue. Returns the event as it will be published (same id, every time)."""
        staged = make_event(type, data, source=self.service, traceparent=traceparent)
        await self.add_event(session, staged)
        return staged

    async def add_event(self, session: AsyncSession, staged: Event[Any]) -> None:
        """Stage an event built beforehand (``catalogue.make_event``) in ``session``'s transaction."""
        await session.execute(insert(self.table).values(
            event_id=staged.id, event_type=staged.type, body=staged.model_dump_json(),
            created_at=time.time()))
        sync = session.sync_session
        if not sync.info.get(self._hooked):
            sync.info[self._hooked] = True
            event.listen(sync, "after_commit", self._after_commit)

    def _after_commit(self, session: Session) -> None:
        self.committed.set()

    async def pending(self, database: Database) -> int:
        """How many events wait in the table (this replica's and any other's)."""
        async with database.session() as s:
            return int(await s.scalar(select(func.count()).select_from(self.table)) or 0)


class OutboxRelay:
    """Publishes an `Outbox`'s rows and deletes them: started by `Service.start` once its event bus is
    connected (``start(database, bus)``), stopped before the bus closes (``stop()``).

    ``published``: events this relay published; ``failures``: batches that failed (broker or store);
    ``last_error``: the latest failure, or None once a batch went through again.
    """

    def __init__(self, outbox: Outbox, *, batch: int = 100, poll_seconds: float = 2.0,
                 backoff_base: float = 0.2, backoff_cap: float = 10.0, publish_timeout: float = 10.0,
                 flush_seconds: float = 5.0) -> None:
        if batch < 1 or poll_seconds <= 0 or backoff_base <= 0 or backoff_cap < backoff_base \
                or publish_timeout <= 0 or flush_seconds < 0:
            raise ConfigError("outbox relay: batch >= 1, poll_seconds, backoff_base and publish_timeout "
                              "> 0, backoff_cap >= backoff_base, flush_seconds >= 0")
        self.outbox = outbox
        self.batch = batch
        self.poll_seconds = poll_seconds
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.publish_timeout = publish_timeout
        self.flush_seconds = flush_seconds
        self.published = 0
        self.failures = 0
        self.last_error: str | None = None
        self._database: Database | None = None
        self._bus: EventBus | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, database: Database, bus: EventBus) -> None:
        """Relay in the background: at once (what an earlier process left), then on every wake-up."""
        if self.running:
            raise RuntimeError(f"the relay of {self.outbox!r} is already running")
        self._database, self._bus = database, bus
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=f"{self.outbox.service}-outbox")

    def wake(self) -> None:
        """Look at the table now (a commit does this by itself)."""
        self.outbox.committed.set()

    async def stop(self) -> None:
        """Publish what can be for ``flush_seconds``, then stop; what is left waits in the table."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        done, _ = await asyncio.wait({task}, timeout=self.flush_seconds)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            log.warning("service %s: the outbox relay was stopped before it caught up; the next start "
                        "publishes the rest", self.outbox.service)

    async def relay_batch(self) -> int:
        """Publish up to ``batch`` of the oldest pending rows and delete them; how many went.

        Raises what failed (the broker, the store) once the rows published before it are deleted.
        """
        if self._database is None or self._bus is None:
            raise RuntimeError(f"the relay of {self.outbox!r} is not started")
        table, bus = self.outbox.table, self._bus
        query = select(table.c.id, table.c.body).order_by(table.c.id).limit(self.batch)
        if self._database.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        failure: Exception | None = None
        published: list[int] = []
        async with self._database.session() as s:
            for row_id, body in (await s.execute(query)).all():
                try:
                    await asyncio.wait_for(bus.publish_event(Event[Any].model_validate_json(body)),
                                           self.publish_timeout)
                except Exception as exc:  # published (maybe) or not: the row stays, tried again later
                    failure = exc
                    break
                published.append(row_id)
            if published:
                await s.execute(delete(table).where(table.c.id.in_(published)))
                await s.commit()
        self.published += len(published)
        if failure is not None:
            raise failure
        return len(published)

    async def _run(self) -> None:
        failures = 0
        while True:
            self.outbox.committed.clear()
            try:
                moved = await self.relay_batch()
            except Exception as exc:
                failures += 1
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if self._stopping.is_set():
                    log.error("service %s: stopping with events left in the outbox (%s); the next start "
                              "publishes them", self.outbox.service, self.last_error)
                    return
                delay = backoff(failures, self.backoff_base, self.backoff_cap)
                log.warning("service %s: outbox events not published (%s); trying again in %.1f s",
                            self.outbox.service, self.last_error, delay)
                await self._pause(delay, wakeable=False)
                continue
            if failures:
                log.info("service %s: outbox events are published again after %d failure(s)",
                         self.outbox.service, failures)
                failures, self.last_error = 0, None
            if moved >= self.batch:
                continue  # there may be more
            if self._stopping.is_set():
                return
            await self._pause(self.poll_seconds, wakeable=True)

    async def _pause(self, seconds: float, *, wakeable: bool) -> None:
        """Wait ``seconds``, or less: until stop is asked, or (``wakeable``) a commit staged events."""
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if wakeable:
            waits.append(asyncio.ensure_future(self.outbox.committed.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
