"""What only the RabbitMQ backend does by hand (it is on aiormq, not FastStream): reconnecting after
its connection drops, refusing a queue declared earlier with another retention, and its quorum
queues."""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
import pytest

from shared.bus import BusConnectionError, ConfigError, EventBus
from shared.bus.events.amqp import AmqpEventBus
from shared.bus.events.base import Retention
from shared.bus.events.catalogue import Event
from tests.bus.events.test_events import URLS, MakeBus, created, make_bus, prefix, recorder, until

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


async def test_services_queues_are_quorum_queues_of_persistent_messages(
        make_bus: MakeBus, prefix: str) -> None:
    subscriber = make_bus("meeting")
    subscriber.subscribe("meeting.*", recorder([]))
    await subscriber.start()
    await subscriber.stop()  # the service's queue exists; nobody consumes it now
    publisher = make_bus("publisher")
    await publisher.start()
    sent = [await publisher.publish("meeting.created", created(n)) for n in range(3)]

    connection = await aiormq.connect(URLS["amqp"])
    try:
        channel = await connection.channel()
        first = await channel.basic_get(f"{prefix}.svc.meeting", no_ack=False)
        assert first.header.properties.delivery_mode == 2
        await channel.close()  # hands the message back
        assert isinstance(subscriber, AmqpEventBus)
        classic = {k: v for k, v in subscriber.queue_arguments.items() if k != "x-queue-type"}
        for queue, arguments in ((subscriber.queue, classic), (subscriber.dead_queue, {})):
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="'x-queue-type'"):
                await channel.queue_declare(queue, durable=True, arguments=arguments)  # as classic
    finally:
        await connection.close()

    seen: list[Event[Any]] = []
    again = make_bus("meeting")
    again.subscribe("meeting.*", recorder(seen))
    await again.start()
    await until(lambda: len(seen) == 3, "the stopped service to catch up")
    assert [e.id for e in seen] == [e.id for e in sent]


async def test_an_unreachable_broker_is_named_without_its_password() -> None:
    bus = EventBus.from_url("amqp://guest:s3cret-pass@127.0.0.1:1/", service="pw-check")
    with pytest.raises(BusConnectionError) as caught:
        await bus.start()
    assert "s3cret-pass" not in str(caught.value) and "guest:***@127.0.0.1:1" in str(caught.value)
