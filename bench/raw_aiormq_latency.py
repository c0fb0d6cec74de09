"""The floor for RabbitMQ on this machine with a bare client, in the shape of `meetmesh bench events
--backend amqp`'s latency phase: three consumer processes, each with its own durable queue bound to
one topic exchange, persistent messages published with confirms at 1,000/s. Prints p50 / p99 over
the three consumers, and the CPU (in cores) the broker, the publisher and each consumer used.

    .venv/bin/python bench/raw_aiormq_latency.py                # aiormq, acks in bulk every 5 ms
    MODE=pika .venv/bin/python bench/raw_aiormq_latency.py      # aio-pika, one ack per message
    PERSIST=0 CONFIRM=0 QARGS='{"x-queue-version": 2}' .venv/bin/python bench/raw_aiormq_latency.py
    # the shape of `events_amqp.py` today: quorum queues, acks in bulk every 25 ms
    QARGS='{"x-queue-type": "quorum"}' ACK_MS=25 .venv/bin/python bench/raw_aiormq_latency.py
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import aiormq.abc

URL = "amqp://guest:guest@127.0.0.1:5672/"
EXCHANGE = "rawormq.events"
N, RATE, CONSUMERS = int(os.environ.get("N", "5000")), 1000.0, 3
MODE = os.environ.get("MODE", "ormq")
PERSIST = os.environ.get("PERSIST", "1") == "1"
CONFIRM = os.environ.get("CONFIRM", "1") == "1"
QUEUE_ARGS: dict[str, Any] = json.loads(os.environ.get("QARGS", "{}"))
ACK_S = float(os.environ.get("ACK_MS", "5")) / 1000  # bulk-ack delay


def latency_ms(body: bytes) -> float:
    return (time.time() - json.loads(body)["time"]) * 1000


async def consume_aiormq(name: str, out: Path) -> None:
    connection = await aiormq.connect(URL)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=100)
    await channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    queue = f"rawormq.{name}"
    await channel.queue_declare(queue, durable=True, arguments=QUEUE_ARGS)
    await channel.queue_bind(queue, EXCHANGE, routing_key="meeting.*")
    out.with_suffix(".ready").touch()
    samples: list[float] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    last_tag, timer = 0, None
    acks: set[asyncio.Task[Any]] = set()

    def ack() -> None:
        nonlocal timer
        timer = None
        task = loop.create_task(channel.basic_ack(last_tag, multiple=True))
        acks.add(task)
        task.add_done_callback(acks.discard)

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        nonlocal last_tag, timer
        samples.append(latency_ms(message.body))
        last_tag = message.delivery_tag or 0
        if timer is None:
            timer = loop.call_later(ACK_S, ack)
        if len(samples) >= N:
            done.set()

    await channel.basic_consume(queue, on_message)
    await done.wait()
    await asyncio.sleep(0.05)  # the last bulk ack
    out.write_text(json.dumps({"samples": samples, "cpu": time.process_time()}))  # noqa: ASYNC240
    await channel.queue_delete(queue)
    await connection.close()


async def consume_aio_pika(name: str, out: Path) -> None:
    connection = await aio_pika.connect_robust(URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=100)
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"rawormq.{name}", durable=True, arguments=QUEUE_ARGS)
    await queue.bind(exchange, "meeting.*")
    out.with_suffix(".ready").touch()
    samples: list[float] = []
    async with queue.iterator() as messages:
        async for message in messages:
            samples.append(latency_ms(message.body))
            await message.ack()
            if len(samples) >= N:
                break
    out.write_text(json.dumps({"samples": samples, "cpu": time.process_time()}))  # noqa: ASYNC240
    await queue.delete()
    await connection.close()


async def publish() -> float:
    """Send N events at RATE (not waiting for earlier confirms); the CPU seconds it took."""
    connection = await aiormq.connect(URL)
    channel = await connection.channel(publisher_confirms=CONFIRM)
    await channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
    properties = aiormq.spec.Basic.Properties(delivery_mode=2 if PERSIST else 1,
                                              content_type="application/json")
    start, cpu, sends = time.perf_counter(), time.process_time(), []
    for i in range(N):
        wait = start + i / RATE - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        body = json.dumps({"time": time.time(), "data": {"meeting_id": "m"}}).encode()
        sends.append(asyncio.ensure_future(channel.basic_publish(
            body, exchange=EXCHANGE, routing_key="meeting.started", properties=properties)))
    await asyncio.gather(*sends)
    cpu = time.process_time() - cpu
    await channel.exchange_delete(EXCHANGE)
    await connection.close()
    return cpu


def broker_cpu() -> float:
    """CPU seconds the RabbitMQ node (beam.smp) has used so far."""
    pid = subprocess.check_output(["pgrep", "-f", "beam.smp"]).split()[0].decode()
    fields = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"c{i}.json" for i in range(CONSUMERS)]
        procs = [subprocess.Popen([sys.executable, __file__, "consume", f"c{i}", str(out)])
                 for i, out in enumerate(outs)]
        while not all(out.with_suffix(".ready").exists() for out in outs):
            time.sleep(0.05)
        broker, start = broker_cpu(), time.perf_counter()
        publisher = asyncio.run(publish())
        for proc in procs:
            proc.wait(timeout=120)
        wall = time.perf_counter() - start
        broker = broker_cpu() - broker
        results = [json.loads(out.read_text()) for out in outs]
        samples = sorted(x for r in results for x in r["samples"])
        consumers = [round(r["cpu"] / wall, 2) for r in results]
        print(f"{MODE} persist={PERSIST} confirm={CONFIRM}: p50 {samples[len(samples) // 2]:.1f} ms, "
              f"p99 {samples[int(len(samples) * 0.99)]:.1f} ms | cores: broker {broker / wall:.2f}, "
              f"publisher {publisher / wall:.2f}, consumers {consumers}")


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    if sys.argv[1:2] == ["consume"]:
        consume = consume_aiormq if MODE == "ormq" else consume_aio_pika
        asyncio.run(consume(sys.argv[2], Path(sys.argv[3])))
    else:
        main()
