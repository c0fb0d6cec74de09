"""The floor for RabbitMQ on this machine: bare aio-pika (no FastStream, no MeetMesh) in the shape of
`meetmesh bench events --backend amqp`'s latency phase: three consumer processes, each with its own
durable queue bound to one topic exchange, persistent messages published with confirms at 1,000/s.

    .venv/bin/python bench/raw_amqp_latency.py            # prints p50 / p99 over the three consumers
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aio_pika

URL = "amqp://guest:guest@127.0.0.1:5672/"
EXCHANGE = "rawbench.events"
N, RATE, CONSUMERS = 5000, 1000.0, 3


async def consume(name: str, out: Path) -> None:
    connection = await aio_pika.connect_robust(URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=100)
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"rawbench.{name}", durable=True)
    await queue.bind(exchange, "meeting.*")
    out.with_suffix(".ready").touch()
    latencies: list[float] = []
    async with queue.iterator() as messages:
        async for message in messages:
            latencies.append((time.time() - json.loads(message.body)["time"]) * 1000)
            await message.ack()
            if len(latencies) >= N:
                break
    out.write_text(json.dumps(latencies))  # noqa: ASYNC240 - once, at the end
    await queue.delete()
    await connection.close()


async def publish() -> None:
    connection = await aio_pika.connect_robust(URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    t0, sends = time.perf_counter(), []
    for i in range(N):
        wait = t0 + i / RATE - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        body = json.dumps({"time": time.time(), "data": {"meeting_id": "m"}}).encode()
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        sends.append(asyncio.ensure_future(exchange.publish(message, "meeting.started")))
    await asyncio.gather(*sends)
    await channel.exchange_delete(EXCHANGE)
    await connection.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"c{i}.json" for i in range(CONSUMERS)]
        procs = [subprocess.Popen([sys.executable, __file__, "consume", f"c{i}", str(out)])
                 for i, out in enumerate(outs)]
        while not all(out.with_suffix(".ready").exists() for out in outs):
            time.sleep(0.05)
        asyncio.run(publish())
        for proc in procs:
            proc.wait(timeout=120)
        samples = sorted(x for out in outs for x in json.loads(out.read_text()))
        print(f"{len(samples)} samples: p50 {samples[len(samples) // 2]:.1f} ms, "
              f"p99 {samples[int(len(samples) * 0.99)]:.1f} ms")


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if sys.argv[1:2] == ["consume"]:
        asyncio.run(consume(sys.argv[2], Path(sys.argv[3])))
    else:
        main()
