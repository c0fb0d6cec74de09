"""``meetmesh bench events``: `EventBus` publish rate and end-to-end latency, and the same for
FastStream used directly on the same topology in the same run, so our layer's overhead is measured.

Subscribers run in their own processes (``python -m meetmesh.bench.events sub ...``), one per
service, as in production. Each times every event from its ``time`` (the publisher's wall clock,
taken when the event is built) to its handler, so publisher and subscribers share this machine's clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer

from shared.bus.errors import ConfigError
from shared.bus.events.base import FASTSTREAM_LOG, EventBus
from shared.bus.events.catalogue import Event, make_event
from shared.bus.queue.records import percentile

DEFAULT_URLS = {
    "redis": "redis://127.0.0.1:6379/8",  # db 8 for benches; the tests use db 9
    "nats": "nats://127.0.0.1:4222",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/",
}
MODES = ("ours", "faststream")
PATTERN = "meeting.*"
EVENT_TYPE = "meeting.started"   # the measured events
WARMUP_TYPE = "meeting.ended"    # sent before them until every subscriber has seen WARMUP_EVENTS
WARMUP_EVENTS = 50
DATA = {"meeting_id": "m-bench"}
PUBLISHER = "bench-pub"
TARGET_PUBLISH_PER_S = 30_000    # Redis only
TARGET_P99_MS = 5.0
# as our backends build their brokers: per-message logs at DEBUG, which FASTSTREAM_LOG drops
_BROKER_OPTIONS: dict[str, Any] = {
    "logger": FASTSTREAM_LOG, "log_level": logging.DEBUG, "graceful_timeout": 5.0,
}

Send = Callable[[str], Coroutine[Any, Any, object]]  # send(type): publish one fresh event of that type
Stop = Callable[[], Awaitable[None]]


def backend_of(url: str) -> str:
    """``redis``, ``nats`` or ``amqp``: the `EventBus` backend ``url`` selects (`ConfigError` if none)."""
    return EventBus.from_url(url, service=PUBLISHER).scheme


def _body(type: str) -> bytes:
    return make_event(type, DATA, source=PUBLISHER).model_dump_json().encode()


# -- FastStream used directly, on the topology our backend declares -------------------------------
# A never-started `EventBus` of the same service and prefix (``twin``) supplies the names and options.

async def _direct_publisher(twin: EventBus) -> tuple[Send, Stop]:
    if twin.scheme == "redis":
        from faststream.redis import RedisBroker

        from shared.bus.events.redis import RedisEventBus

        assert isinstance(twin, RedisEventBus)
        redis = RedisBroker(twin.url, **_BROKER_OPTIONS)
        await redis.start()
        stream, maxlen = twin.keys.log, twin.retention.max_count

        async def send_redis(type: str) -> object:
            return await redis.publish(_body(type), stream=stream, maxlen=maxlen)

        return send_redis, redis.stop
    if twin.scheme == "nats":
        from faststream.nats import NatsBroker

        from shared.bus.events.nats import NatsEventBus

        assert isinstance(twin, NatsEventBus)
        nats = NatsBroker(twin.url, connect_timeout=3, max_reconnect_attempts=3, **_BROKER_OPTIONS)
        await nats.connect()
        js = nats.config.connection_state.stream
        await js.add_stream(config=twin.stream.config, subjects=list(twin.stream.subjects))
        await nats.start()
        subject, name = twin.subject_prefix, twin.stream.name

        async def send_nats(type: str) -> object:
            return await nats.publish(_body(type), f"{subject}{type}", stream=name)

        return send_nats, nats.stop
    from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange

    from shared.bus.events.amqp import AmqpEventBus

    assert isinstance(twin, AmqpEventBus)
    rabbit = RabbitBroker(twin.url, **_BROKER_OPTIONS)
    await rabbit.connect()
    exchange = RabbitExchange(twin.exchange, type=ExchangeType.TOPIC, durable=True)
    await rabbit.declare_exchange(exchange)
    await rabbit.start()

    async def send_amqp(type: str) -> object:
        return await rabbit.publish(_body(type), routing_key=type, exchange=exchange,
                                    persist=True, content_type="application/json")

    return send_amqp, rabbit.stop


async def _direct_subscriber(twin: EventBus, see: Callable[[Any], None]) -> Stop:
    """Start a bare FastStream subscriber of ``twin``'s service, calling ``see(decoded body)`` per event."""
    from faststream import AckPolicy

    if twin.scheme == "redis":
        from faststream.redis import RedisBroker, StreamSub

        from shared.bus.events.redis import RedisEventBus

        assert isinstance(twin, RedisEventBus)
        redis = RedisBroker(twin.url, **_BROKER_OPTIONS)
        fresh = StreamSub(twin.keys.log, group=twin.service, consumer=twin.consumer, polling_interval=1000,
                          batch=True, max_records=100)

        @redis.subscriber(stream=fresh, ack_policy=AckPolicy.NACK_ON_ERROR)
        async def on_redis_batch(body: Any) -> None:
            for item in body:
                see(item)

        await redis.start()
        return redis.stop
    if twin.scheme == "nats":
        from faststream.nats import ConsumerConfig, DeliverPolicy, NatsBroker

        from shared.bus.events.nats import NatsEventBus

        assert isinstance(twin, NatsEventBus)
        nats = NatsBroker(twin.url, connect_timeout=3, max_reconnect_attempts=3, **_BROKER_OPTIONS)
        config = ConsumerConfig(ack_wait=twin.ack_wait, deliver_policy=DeliverPolicy.NEW,
                                max_ack_pending=1_000)

        # a durable push consumer whose deliver group is the service, as NatsEventBus._declare_durable
        @nats.subscriber(f"{twin.subject_prefix}>", queue=twin.service, stream=twin.stream, config=config,
                         ack_policy=AckPolicy.NACK_ON_ERROR)
        async def on_nats(body: Any) -> None:
            see(body)

        await nats.start()
        return nats.stop
    from faststream.rabbit import Channel, ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue

    from shared.bus.events.amqp import PREFETCH, AmqpEventBus, amqp_pattern

    assert isinstance(twin, AmqpEventBus)
    rabbit = RabbitBroker(twin.url, **_BROKER_OPTIONS)
    queue = RabbitQueue(twin.queue, durable=True, arguments=twin.queue_arguments,  # type: ignore[call-overload]
                        routing_key=amqp_pattern(PATTERN))
    exchange = RabbitExchange(twin.exchange, type=ExchangeType.TOPIC, durable=True)

    # the same prefetch as AmqpEventBus's consumer, on a channel of its own, but without its
    # in-order handling and bulk acks: bare FastStream handles these concurrently, out of order
    @rabbit.subscriber(queue, exchange, channel=Channel(prefetch_count=PREFETCH),
                       ack_policy=AckPolicy.NACK_ON_ERROR)
    async def on_amqp(body: Any) -> None:
        see(body)

    await rabbit.start()
    return rabbit.stop


# -- a subscriber process ------------------------------------------------------------------------

def _mark(out: Path, what: str) -> None:
    Path(f"{out}.{what}").touch()


class _Recorder:
    """Latency samples of the measured events; a ``.warm`` file beside ``out`` once warmed up."""

    def __init__(self, count: int, out: Path) -> None:
        self.count, self.out = count, out
        self.samples: list[float] = []
        self.warm = 0
        self.done = asyncio.Event()

    def see(self, type: str, sent: float) -> None:
        lag_ms = (time.time() - sent) * 1000.0
        if type == EVENT_TYPE:
            self.samples.append(lag_ms)
            if len(self.samples) >= self.count:
                self.done.set()
        else:
            self.warm += 1
            if self.warm == WARMUP_EVENTS:
                _mark(self.out, "warm")

    def see_raw(self, body: Any) -> None:
        item = json.loads(body) if isinstance(body, bytes | str) else body
        self.see(item["type"], item["time"])


async def _subscriber(mode: str, url: str, prefix: str, service: str, count: int, out: Path,
                      deadline: float) -> None:
    rec = _Recorder(count, out)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, rec.done.set)
    bus = EventBus.from_url(url, service=service, prefix=prefix)
    if mode == "ours":
        async def on_event(event: Event[Any]) -> None:
            rec.see(event.type, event.time)

        bus.subscribe(PATTERN, on_event)
        await bus.start()
        stop: Stop = bus.stop
    else:
        stop = await _direct_subscriber(bus, rec.see_raw)  # ``bus`` only lends its topology
    _mark(out, "ready")
    cpu = time.process_time()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(rec.done.wait(), deadline)
    cpu = time.process_time() - cpu  # unlike latency, hardly changed by other processes' load
    tmp = out.with_suffix(".tmp")
    got = {"service": service, "warmup": rec.warm, "cpu_s": cpu, "samples_ms": rec.samples}
    tmp.write_text(json.dumps(got))
    tmp.replace(out)  # the publisher never reads half a file
    await stop()


# -- the publisher side --------------------------------------------------------------------------

async def _flood(send: Send, n: int, concurrency: int) -> tuple[int, float]:
    """Publish ``n`` events with ``concurrency`` calls in flight: events per second, CPU µs per event."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await send(EVENT_TYPE)

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    return round(n / (time.perf_counter() - start)), round((time.process_time() - cpu) / n * 1e6, 1)


async def _paced(send: Send, n: int, rate: float) -> int:
    """Send the i-th event at start + i/rate, without waiting for earlier sends; events per second."""
    pending: set[asyncio.Task[object]] = set()
    start = time.perf_counter()
    for i in range(n):
        pause = start + i / rate - time.perf_counter()
        if pause > 0:
            await asyncio.sleep(pause)
        task = asyncio.create_task(send(EVENT_TYPE))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    return round(n / (time.perf_counter() - start))


def _spawn(mode: str, url: str, prefix: str, service: str, count: int, out: Path,
           deadline: float) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "meetmesh.bench.events", "sub", mode, url, prefix, service, str(count),
            str(out), str(deadline)]
    with open(f"{out}.stderr", "wb") as err:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the subscriber writes what it has, then exits
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _check_alive(procs: dict[Path, subprocess.Popen[bytes]], waiting: list[Path]) -> None:
    for out, proc in procs.items():
        if proc.poll() is not None and any(p.name.startswith(out.name) for p in waiting):
            tail = Path(f"{out}.stderr").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"bench subscriber {out.stem} exited with {proc.returncode}:\n{tail}")


async def _wait_files(paths: list[Path], procs: dict[Path, subprocess.Popen[bytes]], timeout: float,
                      what: str, during: Send | None = None, rate: float = 1.0) -> None:
    """Until every path exists (``send``-ing a warm-up event every 1/rate s meanwhile, if given)."""
    deadline = time.monotonic() + timeout
    while missing := [p for p in paths if not p.exists()]:
        _check_alive(procs, missing)
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench subscribers did not {what} within {timeout:.0f}s: {missing}")
        if during is not None:
            await during(WARMUP_TYPE)
        await asyncio.sleep(1 / rate if during is not None else 0.02)


def _summary(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return {"received": len(ordered), "p50_ms": ms(percentile(ordered, 50)),
            "p95_ms": ms(percentile(ordered, 95)), "p99_ms": ms(percentile(ordered, 99)),
            "max_ms": ms(ordered[-1] if ordered else None)}


async def _latency(mode: str, url: str, prefix: str, names: list[str], n: int, rate: float, work: Path,
                   send: Send) -> dict[str, Any]:
    """Subscriber processes of ``names``, warmed up; ``n`` events at ``rate``; their latencies."""
    outs = {name: work / f"{mode}-{name}.json" for name in names}
    deadline = 120 + 2 * n / rate  # a safety net: the publisher stops them sooner
    procs = {out: _spawn(mode, url, prefix, name, n, out, deadline) for name, out in outs.items()}
    try:
        await _wait_files([Path(f"{o}.ready") for o in outs.values()], procs, 60, "subscribe")
        await _wait_files([Path(f"{o}.warm") for o in outs.values()], procs, 60, "warm up", send, rate)
        await asyncio.sleep(0.2)  # let the last warm-up events drain
        sent_per_s = await _paced(send, n, rate)
        with contextlib.suppress(TimeoutError):  # a short count is reported, not raised
            await _wait_files(list(outs.values()), procs, 15 + n / rate, "receive every event")
    finally:
        for proc in procs.values():
            _stop(proc)
    result: dict[str, Any] = {"sent_per_s": sent_per_s, "services": {}}
    everything: list[float] = []
    cpu, handled = 0.0, 0
    for name, out in outs.items():
        got: dict[str, Any] = {"samples_ms": [], "cpu_s": 0.0, "warmup": 0}
        if out.exists():
            got = json.loads(out.read_text())
        samples: list[float] = got["samples_ms"]
        everything += samples
        cpu, handled = cpu + got["cpu_s"], handled + got["warmup"] + len(samples)
        result["services"][name] = {**_summary(samples), "ok": len(samples) == n}
    result["all"] = _summary(everything)
    result["cpu_us_per_event"] = round(cpu / max(1, handled) * 1e6, 1)  # per subscriber process
    result["ok"] = all(s["ok"] for s in result["services"].values())
    return result


@contextlib.asynccontextmanager
async def _publisher(mode: str, url: str, prefix: str) -> AsyncIterator[Send]:
    bus = EventBus.from_url(url, service=PUBLISHER, prefix=prefix)
    if mode == "ours":
        await bus.start()
        send: Send = functools.partial(bus.publish, data=DATA)
        stop: Stop = bus.stop
    else:
        send, stop = await _direct_publisher(bus)  # ``bus`` only lends its topology
    try:
        yield send
    finally:
        await stop()


async def _drop(url: str, prefix: str, services: list[str]) -> None:
    """Delete the run's streams/queues: one drop covers a Redis or NATS prefix; AMQP drops per service."""
    for service in services if backend_of(url) == "amqp" else services[:1]:
        bus = EventBus.from_url(url, service=service, prefix=prefix)
        await bus.start()
        try:
            await bus.drop()
        finally:
            await bus.stop()


def _safe(url: str) -> str:
    password = urlsplit(url).password
    return url.replace(f":{password}@", ":***@") if password else url


async def run(backend: str, url: str | None, *, events: int = 20_000, concurrency: int = 200,
              rate: float = 1000, duration_events: int = 5000, services: int = 3) -> dict[str, Any]:
    """Benchmark ``backend`` at ``url`` (default: a local server) for ours and FastStream direct.

    Publish rate: ``events`` publishes, ``concurrency`` in flight. Latency: ``services`` subscriber
    processes, ``duration_events`` events sent at ``rate`` per second. Everything the run declared
    (under a prefix of its own) is deleted at the end.
    """
    if backend not in DEFAULT_URLS:
        raise ConfigError(f"backend {backend!r}: use {', '.join(DEFAULT_URLS)}")
    url = url or DEFAULT_URLS[backend]
    if backend_of(url) != backend:
        raise ConfigError(f"{_safe(url)} is not a {backend} URL")
    if min(events, concurrency, duration_events, services) < 1 or rate <= 0:
        raise ConfigError("events, concurrency, duration_events and services must be >= 1, rate > 0")
    base = f"mmbench-{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {"backend": backend, "url": _safe(url), "prefix": base, "events": events,
                           "concurrency": concurrency, "rate": rate, "latency_events": duration_events,
                           "services": services}
    publish: dict[str, float] = {}
    latency: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mmbench-") as tmp:
        work = Path(tmp)
        # Each mode on a topology of its own, removed after, so neither pays for the other's
        # leftovers (on AMQP, the other's queues would still be bound and filling).
        for mode in MODES:
            prefix, names = f"{base}-{mode}", [f"bench-{mode}-{i}" for i in range(services)]
            try:
                async with _publisher(mode, url, prefix) as send:
                    rate_, cpu = await _flood(send, events, concurrency)
                    publish[f"{mode}_per_s"], publish[f"{mode}_cpu_us"] = rate_, cpu
                    latency[mode] = await _latency(
                        mode, url, prefix, names, duration_events, rate, work, send)
            finally:
                await _drop(url, prefix, [PUBLISHER, *names])
    ours, direct = latency["ours"]["all"], latency["faststream"]["all"]

    def minus(key: str) -> float | None:
        return None if ours[key] is None or direct[key] is None else round(ours[key] - direct[key], 3)

    ratio = round(publish["ours_per_s"] / max(1, publish["faststream_per_s"]), 2)
    out["publish"] = {**publish, "ratio": ratio}
    out["latency"] = latency
    out["overhead"] = {
        "publish_ratio": ratio, "p50_ms": minus("p50_ms"), "p99_ms": minus("p99_ms"),
        "publish_cpu_us": round(publish["ours_cpu_us"] - publish["faststream_cpu_us"], 1),
        "subscriber_cpu_us": round(
            latency["ours"]["cpu_us_per_event"] - latency["faststream"]["cpu_us_per_event"], 1),
    }
    p99 = ours["p99_ms"]
    out["targets"] = {"p99_ms": {"target": TARGET_P99_MS, "met": p99 is not None and p99 <= TARGET_P99_MS}}
    if backend == "redis":
        rate_met = publish["ours_per_s"] >= TARGET_PUBLISH_PER_S
        out["targets"]["publish_per_s"] = {"target": TARGET_PUBLISH_PER_S, "met": rate_met}
    out["notes"] = _notes(backend)
    return out


def _notes(backend: str) -> list[str]:
    notes = ["publish: both sides build a fresh catalogue event per call (make_event + JSON), same bytes",
             f"latency: Event.time to handler start, same clock; after {WARMUP_EVENTS} {WARMUP_TYPE} "
             "warm-up events per service; each service is its own process"]
    if backend == "redis":
        notes.append("publish: ours coalesces concurrent calls into one pipeline; FastStream's publish is "
                     "one XADD round trip each")
    if backend == "amqp":
        notes.append("publish: no queue is bound yet, so RabbitMQ routes these messages nowhere; the rate "
                     "is publish + confirm without the queue write")
    return notes


# -- the command ---------------------------------------------------------------------------------

def bench_events_cmd(
    backend: Annotated[str, typer.Option(help="redis, nats or amqp.")] = "redis",
    url: Annotated[str | None, typer.Option(
        help="Broker URL; default: MEETMESH_EVENTS_URL if of this backend, else the local server.")] = None,
    events: Annotated[int, typer.Option(min=1, help="Publishes per publish-rate phase.")] = 20_000,
    concurrency: Annotated[int, typer.Option(min=1, help="Publish calls in flight.")] = 200,
    rate: Annotated[float, typer.Option(min=1.0, help="Fixed rate of the latency phase, events/s.")] = 1000.0,
    latency_events: Annotated[int, typer.Option(min=1, help="Events sent in each latency phase.")] = 5000,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Publish rate, and p50/p99 from publish to handler in three subscribing services at a fixed rate,
    for EventBus and for FastStream used directly (the overhead of our layer)."""
    from shared.bus.settings import BusSettings

    from ..common import echo_json
    from ..common import run as run_main

    if backend not in DEFAULT_URLS:
        raise typer.BadParameter(f"{backend!r}: use redis, nats or amqp", param_hint="'--backend'")
    env = BusSettings.load().events_url
    url = url or (env if env and backend_of(env) == backend else None)
    result = run_main(lambda: run(backend, url, events=events, concurrency=concurrency, rate=rate,
                                  duration_events=latency_events))
    if as_json:
        echo_json(result)
    else:
        _print(result)


def _print(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    lat = r["latency"]
    t = Table(title=f"bench events: {r['backend']} ({r['url']}), {r['services']} services, "
                    f"{r['latency_events']} events at {r['rate']:g}/s")
    for col in ("", "ours (EventBus)", "FastStream direct", "overhead"):
        t.add_column(col, justify="right")
    pub = r["publish"]
    t.add_row(f"publish/s ({r['concurrency']} in flight)", str(pub["ours_per_s"]),
              str(pub["faststream_per_s"]), f"x{pub['ratio']}")
    t.add_row("publish CPU µs/event", str(pub["ours_cpu_us"]), str(pub["faststream_cpu_us"]),
              f"{r['overhead']['publish_cpu_us']:+}")
    for p in ("p50", "p95", "p99", "max"):
        a, b = lat["ours"]["all"][f"{p}_ms"], lat["faststream"]["all"][f"{p}_ms"]
        diff = "" if a is None or b is None else f"{a - b:+.3f}"
        t.add_row(f"latency {p} ms (all)", str(a), str(b), diff)
    t.add_row("subscriber CPU µs/event", str(lat["ours"]["cpu_us_per_event"]),
              str(lat["faststream"]["cpu_us_per_event"]), f"{r['overhead']['subscriber_cpu_us']:+}")
    t.add_row("every service got every event", str(lat["ours"]["ok"]), str(lat["faststream"]["ok"]), "")
    s = Table(title="per service")
    for col in ("service", "received", "p50 ms", "p95 ms", "p99 ms", "max ms", "ok"):
        s.add_column(col, justify="right")
    for mode in MODES:
        for name, v in lat[mode]["services"].items():
            s.add_row(name, str(v["received"]), str(v["p50_ms"]), str(v["p95_ms"]), str(v["p99_ms"]),
                      str(v["max_ms"]), str(v["ok"]))
    console = Console()
    console.print(t, s)
    for name, target in r["targets"].items():
        console.print(f"target {name} {target['target']}: {'met' if target['met'] else 'NOT met'}")
    for note in r["notes"]:
        console.print(f"note: {note}")


def _main() -> None:
    parser = argparse.ArgumentParser(prog="python -m meetmesh.bench.events", description=__doc__)
    parser.add_argument("role", choices=["sub"])
    parser.add_argument("mode", choices=MODES)
    for name in ("url", "prefix", "service"):
        parser.add_argument(name)
    parser.add_argument("count", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("deadline", type=float)
    a = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(_subscriber(a.mode, a.url, a.prefix, a.service, a.count, a.out, a.deadline))


if __name__ == "__main__":
    _main()
