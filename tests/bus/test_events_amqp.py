"""What only the RabbitMQ backend does by hand (it is on aiormq, not FastStream): reconnecting after
its connection drops, refusing a queue declared earlier with another retention, and the
``?persistent=false`` option."""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import pytest

from shared.bus import BusConnectionError, ConfigError
from shared.bus.catalogue import Event
from shared.bus.events import EventBus, Retention
from shared.bus.events_amqp import AmqpEventBus, split_options
from tests.bus.test_events import URLS, MakeBus, created, make_bus, prefix, recorder, until

__all__ = ["make_bus", "prefix"]  # the fixtures, shared with the contract suite


@pytest.fixture
def backend() -> str:
    return "amqp"


async def cut(bus: AmqpEventBus) -> None:
    """Drop the bus's connection as a network failure would."""
    connection = bus._connection
    assert connection is not None
    await connection.close(ConnectionError("cut by the test"))


async def test_a_dropped_connection_is_restored_and_the_event_in_hand_comes_again(make_bus: MakeBus) -> None:
    seen: list[Event[Any]] = []
    release = asyncio.Event()

    async def slow(event: Event[Any]) -> None:
        seen.append(event)
        if len(seen) == 1:
            await release.wait()  # the connection drops while this is in hand

    subscriber = make_bus("meeting")
    assert isinstance(subscriber, AmqpEventBus)
    subscriber.subscribe("meeting.*", slow)
    publisher = make_bus("publisher")
    assert isinstance(publisher, AmqpEventBus)
    await subscriber.start()
    await publisher.start()

    first = await publisher.publish("meeting.created", created(1))
    await until(lambda: len(seen) == 1, "the first event to be in hand")
    await cut(subscriber)
    await cut(publisher)
    with pytest.raises(BusConnectionError, match="not connected"):
        await publisher.publish("meeting.created", created(2))  # while it reconnects
    await until(lambda: subscriber.reconnects == 1 and publisher.reconnects == 1, "both to reconnect")
    release.set()

    second = await publisher.publish("meeting.created", created(3))
    await until(lambda: second.id in {e.id for e in seen}, "an event published after the reconnection")
    assert [e.id for e in seen].count(first.id) == 2  # unacknowledged when cut: delivered again
    assert await subscriber.ping() and await publisher.ping()


async def test_a_queue_made_with_another_retention_is_a_clear_error(make_bus: MakeBus) -> None:
    first = make_bus("meeting", retention=Retention(max_count=10))
    first.subscribe("meeting.*", recorder([]))
    await first.start()
    await first.stop()

    second = make_bus("meeting", retention=Retention(max_count=20))
    second.subscribe("meeting.*", recorder([]))
    with pytest.raises(ConfigError, match="exists with other arguments"):
        await second.start()


def test_the_persistent_option_is_read_from_the_url_and_kept_from_aiormq() -> None:
    assert split_options("amqp://u:p@h:5672/vh") == ("amqp://u:p@h:5672/vh", True)
    assert split_options("amqp://h/?heartbeat=5&persistent=false") == ("amqp://h/?heartbeat=5", False)
    assert split_options("amqp://h/?persistent=YES")[1] is True
    with pytest.raises(ConfigError, match="persistent='sometimes': use true or false"):
        split_options("amqp://h/?persistent=sometimes")
    bus = EventBus.from_url("amqp://guest:guest@127.0.0.1:5672/?persistent=0", service="s")
    assert isinstance(bus, AmqpEventBus)
    assert not bus.persistent and bus.url == "amqp://guest:guest@127.0.0.1:5672/"


@pytest.mark.parametrize("persistent", [True, False])
async def test_events_are_published_persistent_or_transient_and_wait_for_a_stopped_service(
        make_bus: MakeBus, prefix: str, persistent: bool) -> None:
    url = f"{URLS['amqp']}?persistent={str(persistent).lower()}"
    subscriber = make_bus("meeting")
    subscriber.subscribe("meeting.*", recorder([]))
    await subscriber.start()
    await subscriber.stop()  # the service's queue exists; nobody consumes it now
    make_bus("publisher")  # never started: only so that the fixture drops the publisher's queues
    publisher = EventBus.from_url(url, service="publisher", prefix=prefix)
    await publisher.start()
    try:
        sent = [await publisher.publish("meeting.created", created(n)) for n in range(3)]
    finally:
        await publisher.stop()

    connection = await aiormq.connect(URLS["amqp"])
    try:
        channel = await connection.channel()
        first = await channel.basic_get(f"{prefix}.svc.meeting", no_ack=False)
        assert first.header.properties.delivery_mode == (2 if persistent else 1)
    finally:
        await connection.close()  # hands the message back

    seen: list[Event[Any]] = []
    again = make_bus("meeting")
    again.subscribe("meeting.*", recorder(seen))
    await again.start()
    await until(lambda: len(seen) == 3, "the stopped service to catch up")
    assert [e.id for e in seen] == [e.id for e in sent]
