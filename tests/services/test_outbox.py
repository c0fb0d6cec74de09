"""The transactional outbox (`services.common.outbox`), on SQLite and on PostgreSQL, against the test's
Redis: an event staged in a transaction is published once it commits (with the id it was staged
with), never if it rolls back; bad data fails before the commit; events committed while no relay runs,
or while the broker is down, wait in the table and go out in order later; two replicas sharing the
table publish each event once; and a real operation (registering a user) still announces itself.

"Published exactly once" is checked by publishing a sentinel directly once the outbox is empty: the
event log is ordered, so when the sentinel arrives, anything the relays sent has arrived before it.
No timing is asserted: every wait polls for the outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import Column, MetaData, String, Table, insert, select
from sqlalchemy.exc import IntegrityError

from services.common import Service, ServiceSettings, Unavailable
from shared.bus import BusConnectionError, Event, InvalidMessage

from .conftest import Mesh, recording, until

NOTES = Table("outbox_test_notes", MetaData(), Column("key", String(32), primary_key=True))
ENDED = "meeting.ended"  # any catalogue event does: its meeting_id labels it here


def orders(settings: ServiceSettings) -> Service:
    """A bare service (no queue, no routes) with a table of its own, its relay retrying quickly."""
    service = Service("orders", settings, metadata=[NOTES.metadata], port=0)
    service.relay.poll_seconds = 0.2
    service.relay.backoff_base, service.relay.backoff_cap = 0.02, 0.1
    return service


async def commit_event(service: Service, label: str) -> Event[Any]:
    """Stage ``meeting.ended`` for meeting ``label`` in a transaction of its own and commit it."""
    async with service.database.session() as s:
        staged = await service.stage_event(s, ENDED, {"meeting_id": label})
        await s.commit()
    return staged


async def notes(service: Service) -> list[str]:
    async with service.database.session() as s:
        return list(await s.scalars(select(NOTES.c.key).order_by(NOTES.c.key)))


async def pending(service: Service) -> int:
    return await service.outbox.pending(service.database)


async def quiet(service: Service, got: list[Event[Any]]) -> list[Event[Any]]:
    """Everything the relays published, once the outbox is empty: a sentinel published directly
    after that arrives behind all of it."""

    async def empty() -> bool:
        return await pending(service) == 0

    await until(empty, "the outbox to be empty")
    sentinel = await service.events.publish(ENDED, {"meeting_id": "sentinel"})
    await until(lambda: any(e.id == sentinel.id for e in got), "the sentinel")
    return [e for e in got if e.id != sentinel.id]


async def test_a_committed_event_is_published_once_with_its_id_a_rolled_back_one_never(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    settings = make_settings()
    service = orders(settings)
    service.relay.poll_seconds = 3600.0  # the commit wakes the relay: no poll gets there first
    async with recording(settings, ENDED) as got, service.running():
        async with service.database.session() as s:  # rolled back: neither the note nor its event
            await s.execute(insert(NOTES).values(key="undone"))
            await service.stage_event(s, ENDED, {"meeting_id": "undone"})
            await s.rollback()
        async with service.database.session() as s:  # committed together
            await s.execute(insert(NOTES).values(key="n1"))
            staged = await service.stage_event(s, ENDED, {"meeting_id": "n1"})
            await s.commit()
        with pytest.raises(IntegrityError):  # the change fails after staging: its event goes with it
            async with service.database.session() as s:
                await service.stage_event(s, ENDED, {"meeting_id": "failed"})
                await s.execute(insert(NOTES).values(key="n1"))
                await s.commit()
        published = await quiet(service, got)
        assert await notes(service) == ["n1"]
    assert [(e.id, e.type, e.source, e.data.meeting_id) for e in published] == [
        (staged.id, ENDED, "orders", "n1")
    ]
    assert (published[0].time, published[0].traceparent) == (staged.time, staged.traceparent)
    assert service.relay.published == 1 and service.relay.failures == 0


async def test_invalid_data_raises_before_anything_is_committed(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    service = orders(make_settings())
    async with service.running():
        with pytest.raises(InvalidMessage, match="meeting_id"):
            async with service.database.session() as s:
                await s.execute(insert(NOTES).values(key="n1"))
                await service.stage_event(s, ENDED, {"not": "valid"})
                await s.commit()
        with pytest.raises(InvalidMessage, match="unknown event type"):
            async with service.database.session() as s:
                await s.execute(insert(NOTES).values(key="n2"))
                await service.stage_event(s, "meeting.renamed", {"meeting_id": "m1"})
                await s.commit()
        with pytest.raises(InvalidMessage, match="meeting_id"):  # nor outside a change of its own
            await service.emit_event(ENDED, {"not": "valid"})
        assert await notes(service) == [] and await pending(service) == 0


async def test_events_committed_while_no_relay_runs_are_published_in_order_by_the_next_start(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    settings = make_settings()
    crashed = orders(settings)
    async with recording(settings, ENDED) as got:
        async with crashed.running():
            await crashed.relay.stop()  # the process dies before its relay gets to them
            staged = [await commit_event(crashed, f"m{i}") for i in range(5)]
            assert await pending(crashed) == 5
        assert got == []
        restarted = orders(settings)
        async with restarted.running():  # drains at start
            published = await quiet(restarted, got)
    assert [(e.id, e.data.meeting_id) for e in published] == [(e.id, e.data.meeting_id) for e in staged]


async def test_a_broker_outage_delays_events_and_loses_none(
    make_settings: Callable[..., ServiceSettings], monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings()
    service = orders(settings)
    async with recording(settings, ENDED) as got, service.running(), \
            httpx.AsyncClient(base_url=str(service.url)) as http:
        attempts = 0

        async def unreachable(event: Event[Any]) -> None:
            nonlocal attempts
            attempts += 1
            raise BusConnectionError("cannot publish events to Redis: connection refused")

        monkeypatch.setattr(service.events, "publish_event", unreachable)
        staged = [await commit_event(service, f"m{i}") for i in range(5)]
        staged.append(await service.emit_event(ENDED, {"meeting_id": "task-done"}))  # no SQL change
        await until(lambda: attempts >= 3, "the relay to try (and fail) a few times")
        assert await pending(service) == 6
        ready = (await http.get("/ready")).json()
        assert ready["outbox"]["pending"] == 6 and "BusConnectionError" in ready["outbox"]["last_error"]
        assert ready["checks"]["outbox"] is True and got == []

        monkeypatch.undo()  # the broker is back
        published = await quiet(service, got)
        ready = (await http.get("/ready")).json()
    assert [(e.id, e.data.meeting_id) for e in published] == [(e.id, e.data.meeting_id) for e in staged]
    assert ready["outbox"] == {"pending": 0, "published": 6, "last_error": None}


async def test_a_publish_that_may_have_happened_is_repeated_with_the_same_event_id(
    make_settings: Callable[..., ServiceSettings], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At least once: the event went out, but the relay did not learn it (it crashed, the answer was
    lost) before deleting its row. It goes out again under the id subscribers deduplicate on."""
    settings = make_settings()
    service = orders(settings)
    async with recording(settings, ENDED) as got, service.running():
        real = service.events.publish_event
        lost = 0

        async def answer_lost(event: Event[Any]) -> None:
            nonlocal lost
            await real(event)
            if not lost:
                lost += 1
                raise BusConnectionError("connection reset before the reply")

        monkeypatch.setattr(service.events, "publish_event", answer_lost)
        staged = await commit_event(service, "m1")
        published = await quiet(service, got)
    assert [(e.id, e.data.meeting_id) for e in published] == [(staged.id, "m1")] * 2


async def test_an_event_of_no_sql_change_goes_out_directly_when_the_store_is_unreachable(
    make_settings: Callable[..., ServiceSettings], monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings()
    service = orders(settings)
    async with recording(settings, ENDED) as got, service.running():

        async def store_down(session: Any, event: Event[Any]) -> None:
            raise Unavailable("the database is unreachable: connection refused")

        monkeypatch.setattr(service.outbox, "add_event", store_down)
        emitted = await service.emit_event(ENDED, {"meeting_id": "m1"})
        await until(lambda: got, "the event")
        assert await pending(service) == 0
    assert [(e.id, e.data.meeting_id) for e in got] == [(emitted.id, "m1")]
    assert service.relay.published == 0


async def test_two_replicas_sharing_the_outbox_publish_each_event_once(
    make_settings: Callable[..., ServiceSettings],
) -> None:
    settings = make_settings()
    a, b = orders(settings), orders(settings)
    async with recording(settings, ENDED) as got, a.running(), b.running():
        staged = await asyncio.gather(*(commit_event((a, b)[i % 2], f"m{i}") for i in range(40)))
        published = await quiet(a, got)
    assert sorted(e.id for e in published) == sorted(e.id for e in staged)
    assert len(published) == 40 == a.relay.published + b.relay.published


async def test_registering_a_user_announces_it_through_the_outbox(mesh: Mesh) -> None:
    users = mesh.user
    async with recording(mesh.settings, "user.registered") as got:
        answer = await mesh.register("alice")
        await until(lambda: got, "user.registered")

        async def drained() -> bool:
            return await users.outbox.pending(users.database) == 0

        await until(drained, "the user service's outbox to be empty")
    assert [(e.source, e.data.user_id, e.data.username) for e in got] == [
        ("user", answer["user"]["id"], "alice")
    ]
    assert users.relay.published == 1
    async with httpx.AsyncClient(base_url=str(users.url)) as http:
        ready = (await http.get("/ready")).json()
    assert ready["checks"]["outbox"] is True and ready["outbox"]["pending"] == 0
