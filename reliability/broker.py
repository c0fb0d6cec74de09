"""``meetmesh chaos broker``: the event broker restarted mid-run, gracefully and with SIGKILL: a
private nats-server with JetStream, or a private RabbitMQ node, its data in a temporary folder.

A publisher service publishes numbered durable events before, while and after each restart (one
that is not acknowledged is published again until it is, as a caller of ``publish`` would); a
subscriber service, running throughout, must receive every acknowledged one once the broker is
back. Neither is restarted: both reconnect by themselves. Reports what was acknowledged, what
arrived (and how many twice), the publish attempts refused meanwhile and the time to recover.

The machine's own brokers are never touched: RabbitMQ runs as a node of its own
(`servers.PrivateRabbit`: its own name, ports and database), so restarting it hits nobody else.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.bus import BusConnectionError, BusError, Event, EventBus, Payload
from shared.bus.events.catalogue import CATALOGUE, register

from .servers import PrivateNats, PrivateRabbit, PrivateServer

EVENT = "chaos.tick"
PREFIX = "chaos"


class Tick(Payload):
    """A numbered event of the broker scenario."""

    n: int


if EVENT not in CATALOGUE:
    register(EVENT, Tick)


@dataclass
class BrokerConfig:
    backend: str = "nats"  # or "amqp" (RabbitMQ)
    modes: tuple[str, ...] = ("graceful", "kill")
    rate: float = 100.0  # publishes per second
    warm: float = 2.0  # seconds of publishing before each stop
    down: float = 2.0  # seconds the broker stays away
    after: float = 2.0  # seconds of publishing after the last restart
    settle: float = 30.0  # at most this long for everything acknowledged to arrive
    ack_wait: float = 5.0  # redelivery of an event handed to a consumer but not acknowledged


@dataclass
class BrokerRestart:
    mode: str
    down_s: float
    refused: int  # publish attempts refused while the broker was away (published again after)
    publish_recovery_s: float | None  # broker back -> the first publish acknowledged
    delivery_recovery_s: float | None  # broker back -> the first event received


@dataclass
class BrokerSummary:
    backend: str
    published: int  # acknowledged by the broker
    received: int  # distinct events received
    missing: int  # acknowledged, never received: must be 0
    duplicates: int  # received more than once (at-least-once delivery allows it)
    restarts: list[BrokerRestart] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.missing == 0 and all(
            r.publish_recovery_s is not None and r.delivery_recovery_s is not None for r in self.restarts)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


async def _until(check: Any, timeout: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    return None


async def run_broker(config: BrokerConfig, *, progress: Any = None) -> BrokerSummary:
    say = progress or (lambda text: None)
    seen: Counter[int] = Counter()
    last_seen = [0.0]
    acked: list[int] = []
    refused = [0]
    last_ack = [0.0]
    restarts: list[BrokerRestart] = []

    async def on_tick(event: Event[Any]) -> None:
        seen[event.data.n] += 1
        last_seen[0] = time.monotonic()

    if config.backend not in ("nats", "amqp"):
        raise ValueError(f"backend must be nats or amqp, not {config.backend!r}")
    broker: PrivateServer = PrivateNats("nats") if config.backend == "nats" else PrivateRabbit("rabbit")
    async with broker as server:
        assert isinstance(server, PrivateNats | PrivateRabbit)
        subscriber = EventBus.from_url(server.url, service="chaos-sub", prefix=PREFIX,
                                       ack_wait=config.ack_wait)
        subscriber.subscribe(EVENT, on_tick)
        publisher = EventBus.from_url(server.url, service="chaos-pub", prefix=PREFIX)
        await subscriber.start()
        await publisher.start()

        async def publish_forever() -> None:
            n = 0
            while True:
                try:
                    await publisher.publish(EVENT, {"n": n})
                except (BusConnectionError, BusError, TimeoutError, OSError):
                    refused[0] += 1
                    await asyncio.sleep(0.05)
                    continue  # the same n again: an unacknowledged publish is retried by its caller
                acked.append(n)
                last_ack[0] = time.monotonic()
                n += 1
                await asyncio.sleep(1 / config.rate)

        publishing = asyncio.create_task(publish_forever())
        try:
            for mode in config.modes:
                await asyncio.sleep(config.warm)
                refused_before, stopped = refused[0], time.monotonic()
                await (server.shutdown() if mode == "graceful" else server.kill())
                await asyncio.sleep(config.down)
                await server.start()
                back = time.monotonic()
                pub_s, sub_s = await asyncio.gather(_until(lambda b=back: last_ack[0] > b, config.settle),
                                                    _until(lambda b=back: last_seen[0] > b, config.settle))
                restarts.append(BrokerRestart(mode=mode, down_s=round(back - stopped, 2),
                                              refused=refused[0] - refused_before,
                                              publish_recovery_s=None if pub_s is None else round(pub_s, 3),
                                              delivery_recovery_s=None if sub_s is None else round(sub_s, 3)))
                say(f"{mode}: {restarts[-1]}")
            await asyncio.sleep(config.after)
        finally:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
        await _until(lambda: all(n in seen for n in acked), config.settle)
        await publisher.stop()
        await subscriber.stop()
    missing = sum(1 for n in acked if n not in seen)
    return BrokerSummary(backend=config.backend, published=len(acked), received=len(seen), missing=missing,
                         duplicates=sum(c - 1 for c in seen.values() if c > 1), restarts=restarts)
