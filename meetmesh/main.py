"""``meetmesh``: the single front door for everything an operator runs."""

from __future__ import annotations

import json
import logging
import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from reliability.cli import register as register_chaos
from shared.bus.errors import BusError
from shared.bus.queue.message import PRIORITIES
from shared.bus.queue.queue import Queue
from shared.bus.queue.worker import Worker
from shared.bus.redact import install as install_redaction
from shared.bus.settings import BusSettings

from .bench.events import bench_events_cmd
from .bench.ws import bench_ws_cmd
from .common import (
    JsonFlag,
    QueueName,
    app,
    bench_app,
    check_redis,
    console,
    dlq_app,
    echo_json,
    load_app,
    open_queue,
    queue_app,
    run,
    task_app,
)
from .edge import register as register_edge
from .schedule import app as schedule_app
from .submit import register as register_submit
from .up import register as register_up
from .user import register as register_user


@app.command()
def worker(
    queue: Annotated[str, typer.Option(help="Queue to consume.")],
    app_spec: Annotated[str, typer.Option("--app", help="module:object holding a Router of handlers.")],
    concurrency: Annotated[int, typer.Option(min=1, help="Handlers running at once.")] = 100,
    lease: Annotated[float, typer.Option(help="Lease (visibility timeout), seconds.")] = 30.0,
    grace: Annotated[float, typer.Option(help="SIGTERM grace period, seconds.")] = 30.0,
    max_retries: Annotated[int, typer.Option(min=0, help="Default retries per message.")] = 3,
    timeout: Annotated[float, typer.Option(help="Default handler timeout, seconds.")] = 300.0,
    aging: Annotated[float | None, typer.Option(help="Promote a waiting message one level per N s.")] = None,
) -> None:
    """Run one worker process for QUEUE until SIGTERM/SIGINT (graceful: in-flight work finishes)."""
    handlers = load_app(app_spec)
    settings = BusSettings.load()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_redaction()  # no token or secret in any log line

    async def main(q: Queue) -> None:
        w = Worker(q, handlers, concurrency=concurrency, lease_seconds=lease, grace_seconds=grace)
        w.install_signal_handlers()
        await w.run()

    options = {"max_retries": max_retries, "timeout": timeout, "lease_seconds": lease, "aging_seconds": aging}
    open_queue(queue, **options)(main)


@app.command()
def enqueue(
    queue: QueueName,
    type: Annotated[str, typer.Argument(help="Message type, e.g. media.cover.")],
    data: Annotated[str, typer.Option(help="Payload as JSON.")] = "null",
    priority: Annotated[str, typer.Option(help="critical, high, normal or low.")] = "normal",
    delay: Annotated[float | None, typer.Option(help="Seconds to hold it back.")] = None,
    dedupe_key: Annotated[str | None, typer.Option(help="Idempotency key.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Enqueue one message."""
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--data is not JSON: {exc}") from exc

    async def main(q: Queue) -> None:
        done = await q.enqueue(type, payload, priority=priority, delay=delay, dedupe_key=dedupe_key)
        if as_json:
            echo_json({"id": done.id, "created": done.created, "position": done.position})
        else:
            console.print(f"{'enqueued' if done.created else 'already queued'} {done.id} "
                          f"(position {done.position})")

    open_queue(queue)(main)


@queue_app.command("stats")
def queue_stats(name: QueueName, as_json: JsonFlag = False) -> None:
    """Depth per level, delayed, in flight, dead letters, consumers, counters, rates, latency."""

    async def main(q: Queue) -> None:
        s = await q.stats()
        if as_json:
            echo_json(s.model_dump(mode="json"))
            return
        t = Table(title=f"queue {name}{' (paused)' if s.paused else ''}")
        for col in ("critical", "high", "normal", "low", "delayed", "in flight", "dead", "consumers"):
            t.add_column(col, justify="right")
        t.add_row(*(str(s.depth[p]) for p in PRIORITIES), str(s.delayed), str(s.in_flight),
                  str(s.dead_letters), str(s.consumers))
        console.print(t)
        lat = s.latency
        console.print(f"processed {s.processed} ({s.processed_per_s:.1f}/s), failed {s.failed}, "
                      f"retried {s.retried}, cancelled {s.cancelled}, reclaimed {s.reclaimed}; "
                      f"start latency p50/p95/p99 {lat.p50_ms}/{lat.p95_ms}/{lat.p99_ms} ms")

    open_queue(name)(main)


@queue_app.command("pause")
def queue_pause(name: QueueName) -> None:
    """Stop workers from taking messages from NAME."""
    open_queue(name)(lambda q: q.pause())
    console.print(f"paused {name}")


@queue_app.command("resume")
def queue_resume(name: QueueName) -> None:
    """Let workers take messages from NAME again."""
    open_queue(name)(lambda q: q.resume())
    console.print(f"resumed {name}")


@dlq_app.command("list")
def dlq_list(name: QueueName, limit: int = 50, as_json: JsonFlag = False) -> None:
    """Dead letters of NAME, oldest first, with their errors."""
    records = open_queue(name)(lambda q: q.dead_letters(limit))
    if as_json:
        echo_json([r.model_dump(mode="json") for r in records])
        return
    t = Table(title=f"dead letters of {name}")
    for col in ("id", "type", "status", "attempts", "error"):
        t.add_column(col)
    for r in records:
        err = f"{r.error.code}: {r.error.message}" if r.error else ""
        t.add_row(r.id, r.type, r.status.value, str(r.attempts), err[:80])
    console.print(t)


@dlq_app.command("replay")
def dlq_replay(name: QueueName, id: Annotated[list[str] | None, typer.Option(help="Only these ids.")] = None
               ) -> None:
    """Send dead letters (all, or --id ...) back to their queue with fresh attempts."""
    n = open_queue(name)(lambda q: q.replay_dead(id or None))
    console.print(f"replayed {n} dead letter(s) of {name}")


@dlq_app.command("purge")
def dlq_purge(name: QueueName, id: Annotated[list[str] | None, typer.Option(help="Only these ids.")] = None
              ) -> None:
    """Delete dead letters (all, or --id ...) for good."""
    n = open_queue(name)(lambda q: q.purge_dead(id or None))
    console.print(f"purged {n} dead letter(s) of {name}")


@task_app.command("show")
def task_show(queue: QueueName, task_id: str, as_json: JsonFlag = False) -> None:
    """A task's record: status, position, attempts, progress, result or error."""
    record = open_queue(queue)(lambda q: q.get(task_id))
    if as_json:
        echo_json(record.model_dump(mode="json", exclude={"message"}))
    else:
        console.print(record.model_dump(exclude={"message"}))


@task_app.command("cancel")
def task_cancel(queue: QueueName, task_id: str) -> None:
    """Cancel a queued, delayed or running task."""
    before = open_queue(queue)(lambda q: q.cancel(task_id))
    console.print(f"task {task_id} was {before.value}" + ("" if before.terminal else "; now cancelled"))


@app.command()
def demo(
    queue: Annotated[str, typer.Option(help="Queue the demo uses.")] = "demo",
    jobs: Annotated[int, typer.Option(min=1, help="Messages per round.")] = 40,
    rounds: Annotated[int, typer.Option(min=0, help="Rounds to run (0: until Ctrl-C).")] = 0,
) -> None:
    """A worker plus a producer: watch messages of all four priorities flow, highest first."""
    from .demo import run_demo

    open_queue(queue, max_retries=2, retry_base_seconds=0.2)(lambda q: run_demo(q, jobs, rounds, console))


def _bench_queue(jobs: int, concurrency: int, rate: float, latency_jobs: int, as_json: bool) -> None:
    from .bench.queue import bench_queue
    from .embedded import ensure_redis

    async def main() -> dict[str, Any]:
        settings = BusSettings.load()
        url, redis = await ensure_redis(settings.redis_url, configured=settings.redis_url_configured)
        await redis.aclose()
        return await bench_queue(url, jobs=jobs, concurrency=concurrency, rate=rate,
                                 latency_jobs=latency_jobs)

    result = run(main)
    if as_json:
        echo_json(result)
    else:
        for key, value in result.items():
            console.print(f"{key:>28}: {value}")


@bench_app.command("queue")
def bench_queue_cmd(
    jobs: Annotated[int, typer.Option(min=100, help="Jobs per throughput phase.")] = 20_000,
    concurrency: Annotated[int, typer.Option(min=1, help="Worker concurrency.")] = 100,
    rate: Annotated[float, typer.Option(help="Fixed arrival rate for the latency phase, jobs/s.")] = 500.0,
    latency_jobs: Annotated[int, typer.Option(min=10, help="Jobs sent in the latency phase.")] = 2_000,
    as_json: JsonFlag = False,
) -> None:
    """Enqueue rate (single, batched), one worker process's drain rate, start latency at a fixed rate."""
    _bench_queue(jobs, concurrency, rate, latency_jobs, as_json)


@app.command()
def asyncapi(
    out: Annotated[str | None, typer.Option("--out", "-o", help="File to write (default: stdout).")] = None,
) -> None:
    """Write the AsyncAPI 3.0 document of the event catalogue (JSON)."""
    from shared.bus.events.asyncapi import document

    text = json.dumps(document(), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    console.print(f"wrote {out} ({len(text):,} bytes)")


@app.command("gateway")
def gateway_cmd(
    host: Annotated[str | None, typer.Option(help="Interface (default MEETMESH_HOST, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default MEETMESH_PORT, 8000).")] = None,
) -> None:
    """Serve the gateway (REST, WebSocket, SSE, /metrics) with uvicorn until SIGTERM/SIGINT."""
    import uvicorn

    from gateway.settings import GatewaySettings

    try:
        settings = GatewaySettings.load()
    except BusError as exc:   # a missing or weak MEETMESH_JWT_SECRET, a bad value: one line, exit 1
        sys.exit(f"meetmesh gateway: {exc}")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(lambda: check_redis(settings.redis_url))  # a clear one-line exit, not uvicorn's startup traceback
    # A socket silent for idle_timeout is dropped: pinged every ping_interval, it has the rest to reply.
    pong_timeout = max(settings.idle_timeout - settings.ping_interval, 1.0)
    uvicorn.run(
        "gateway.app:create_app", factory=True, host=host or settings.host, port=port or settings.port,
        ws_ping_interval=settings.ping_interval, ws_ping_timeout=pong_timeout,
        ws_max_size=max(4 * settings.max_frame_bytes, 1 << 22), log_level=settings.log_level.lower(),
        loop="uvloop", timeout_graceful_shutdown=10,
        # Frames are small JSON: per-message deflate saved little and held ~45 KB of zlib state per
        # socket (78 KB -> 40 KB per socket at 10,000 sockets without it).
        ws="websockets-sansio", ws_per_message_deflate=False,
        # uvicorn's access log would print every WebSocket's ?token=; requests are in /metrics.
        access_log=False)


@app.command()
def token(
    user: Annotated[str, typer.Option(help="A registered username: the token is that user's, with its "
                                           "roles.")],
    ttl: Annotated[float | None, typer.Option(
        min=1.0, help="Lifetime, seconds (default MEETMESH_TOKEN_TTL, 24 h).")] = None,
) -> None:
    """Mint a token for a registered user (an operator's and a developer's tool).

    The user is looked up by name in the user service's store (MEETMESH_DATABASE_URL, else the SQLite
    file in MEETMESH_DATA_DIR, ./.meetmesh); the token carries its id and its roles (admin only after
    `meetmesh user grant-admin NAME`). Signed with MEETMESH_JWT_SECRET (or MEETMESH_JWT_SECRET_FILE),
    else with the development secret `meetmesh up` keeps in the data folder."""
    from .user import mint_for_user

    print(mint_for_user(user, ttl))


@app.command("service")
def service_cmd(
    name: Annotated[str, typer.Argument(help="The service: user, meeting, media or ai.")],
    port: Annotated[int | None, typer.Option(help="HTTP port (default MEETMESH_<NAME>_PORT).")] = None,
) -> None:
    """Run one service until SIGTERM/SIGINT: its queue's worker, its events, its REST, /health, /ready."""
    from services.common.service import main as run_service

    run_service(name, port=port)


app.add_typer(schedule_app, name="schedule")
bench_app.command("events")(bench_events_cmd)
register_edge(app, bench_app)
bench_app.command("ws")(bench_ws_cmd)
register_up(app)
register_submit(app)
register_chaos(app)
register_user(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()


