"""``meetmesh chaos``: fault scenarios that run the mesh's parts, break them, and print a summary."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

T = TypeVar("T")
app = typer.Typer(help="Fault scenarios: break parts of the mesh on purpose and report what survived.",
                  no_args_is_help=True)
console = Console(stderr=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the summary as JSON for scripts.")]
Seed = Annotated[int | None, typer.Option(help="Random seed (kill times, priorities, work).")]


def register(root: typer.Typer) -> None:
    """Add ``chaos`` to the ``meetmesh`` command."""
    root.add_typer(app, name="chaos")


def _run(main: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(main)


def _progress(as_json: bool) -> Any:
    return None if as_json else (lambda text: console.print(f"[dim]{text}[/dim]"))


def show(title: str, summary: dict[str, Any], as_json: bool) -> None:
    """Print a summary (a table, or JSON); exit 1 when its guarantees did not hold."""
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        table = Table(title=title, show_header=False)
        for key, value in summary.items():
            if key == "ok":
                value = "[green]yes[/green]" if value else "[red]NO[/red]"
            table.add_row(key.replace("_", " "), str(value))
        Console().print(table)
    if not summary.get("ok", True):
        raise typer.Exit(1)


def _pair(text: str, kind: type[Any]) -> tuple[Any, Any]:
    low, _, high = text.partition("-")
    return kind(low), kind(high or low)


@app.command()
def workers(
    tasks: Annotated[int, typer.Option(min=1, help="Tasks to run, of mixed priority.")] = 20_000,
    count: Annotated[int, typer.Option("--workers", min=1, help="Worker processes.")] = 4,
    concurrency: Annotated[int, typer.Option(min=1, help="Handlers per worker.")] = 10,
    work_ms: Annotated[str, typer.Option(help="Work per task, ms (a range: 10-60).")] = "10-60",
    kill_every: Annotated[str, typer.Option(help="Seconds between kills (a range: 2-4).")] = "2-4",
    lease: Annotated[float, typer.Option(help="Lease seconds (reclaim delay after a kill).")] = 2.0,
    deadline: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 600.0,
    seed: Seed = None,
    as_json: JsonFlag = False,
) -> None:
    """SIGKILL a random worker every few seconds (and start a replacement) while TASKS flow: reports
    tasks run, kills, lost (must be 0) and repeats against the tasks in flight at the kills."""
    from .workers import WorkersConfig, run_workers

    config = WorkersConfig(tasks=tasks, workers=count, concurrency=concurrency, work_ms=_pair(work_ms, int),
                           kill_every=_pair(kill_every, float), lease=lease, deadline=deadline, seed=seed)
    summary = _run(run_workers(config, progress=_progress(as_json)))
    show("chaos workers", summary.as_dict(), as_json)


@app.command()
def redis(
    mode: Annotated[list[str] | None,
                    typer.Option(help="graceful and/or kill (default: both, in turn).")] = None,
    producers: Annotated[int, typer.Option(min=1, help="Producer clients.")] = 2,
    rate: Annotated[float, typer.Option(help="Enqueues per second per producer.")] = 200.0,
    count: Annotated[int, typer.Option("--workers", min=1, help="Worker processes.")] = 2,
    down: Annotated[float, typer.Option(help="Seconds Redis stays away each time.")] = 3.0,
    warm: Annotated[float, typer.Option(help="Seconds of load before each stop.")] = 3.0,
    gateway: Annotated[bool, typer.Option(help="Run a gateway and watch its /ready.")] = True,
    seed: Seed = None,
    as_json: JsonFlag = False,
) -> None:
    """Restart a private Redis (AOF everysec) under load, gracefully and with SIGKILL: reports what was
    acknowledged against what survived, and how long producers, workers and a gateway took to recover."""
    from .redis_restart import RedisConfig, describe, run_redis

    config = RedisConfig(modes=tuple(mode or ("graceful", "kill")), producers=producers, rate=rate,
                         workers=count, down=down, warm=warm, gateway=gateway, seed=seed)
    for m in config.modes:
        if m not in ("graceful", "kill"):
            raise typer.BadParameter(f"--mode {m!r}: use graceful or kill")
    summary = _run(run_redis(config, progress=_progress(as_json)))
    show("chaos redis", summary.as_dict() if as_json else describe(summary), as_json)


@app.command()
def broker(
    backend: Annotated[str, typer.Option(help="nats (a private nats-server) or amqp (a private RabbitMQ "
                                              "node).")] = "nats",
    mode: Annotated[list[str] | None,
                    typer.Option(help="graceful and/or kill (default: both, in turn).")] = None,
    rate: Annotated[float, typer.Option(help="Durable events published per second.")] = 100.0,
    down: Annotated[float, typer.Option(help="Seconds the broker stays away each time.")] = 2.0,
    warm: Annotated[float, typer.Option(help="Seconds of publishing before each stop.")] = 2.0,
    as_json: JsonFlag = False,
) -> None:
    """Restart a private broker (nats-server with JetStream, or a RabbitMQ node) mid-run, gracefully and
    with SIGKILL: every durable event acknowledged before, while or after must reach the subscribing
    service once it is back."""
    from .broker import BrokerConfig, run_broker

    config = BrokerConfig(backend=backend, modes=tuple(mode or ("graceful", "kill")), rate=rate, down=down,
                          warm=warm)
    summary = _run(run_broker(config, progress=_progress(as_json)))
    show("chaos broker", summary.as_dict(), as_json)

@app.command()
def malformed(as_json: JsonFlag = False) -> None:
    """Write garbage straight into a private Redis where the worker, the task relay and a service's
    event consumer read: each bad message must be dead-lettered with its reason (or skipped, for
    status entries), and each consumer must go on handling the good message sent after it."""
    from .malformed import run_malformed

    summary = _run(run_malformed(progress=_progress(as_json)))
    if as_json:
        show("chaos malformed", summary.as_dict(), as_json)
        return
    table = Table(title="chaos malformed")
    for column in ("consumer", "case", "what became of it", "handled", "consumer alive"):
        table.add_column(column)
    for c in summary.cases:
        table.add_row(c.consumer, c.name, c.outcome, _yes(c.handled), _yes(c.consumer_alive))
    Console().print(table)
    if not summary.ok:
        raise typer.Exit(1)


def _yes(value: bool) -> str:
    return "[green]yes[/green]" if value else "[red]NO[/red]"

@app.command()
def soak(
    minutes: Annotated[float, typer.Option(help="How long the load runs.")] = 10.0,
    users: Annotated[int, typer.Option(min=1, help="WebSocket users (plus one REST user).")] = 3,
    rate: Annotated[float, typer.Option(help="Submissions per second per WebSocket user.")] = 10.0,
    completed_ttl: Annotated[float, typer.Option(help="MEETMESH_COMPLETED_TTL for the run, seconds.")] = 60.0,
    samples: Annotated[bool, typer.Option(help="With --json, include every sample.")] = False,
    seed: Seed = None,
    as_json: JsonFlag = False,
) -> None:
    """A gateway, workers and clients (WebSocket and REST) under steady load for MINUTES: gateway and
    worker RSS and Redis memory sampled; reports slopes (MB/min) against what retention explains."""
    from .soak import SoakConfig, run_soak

    config = SoakConfig(minutes=minutes, ws_users=users, rate=rate, completed_ttl=completed_ttl, seed=seed)
    summary = _run(run_soak(config, progress=_progress(as_json)))
    show("chaos soak", summary.as_dict(with_samples=samples and as_json), as_json)

@app.command()
def network(
    rate: Annotated[float, typer.Option(min=1, help="Tasks enqueued per second.")] = 200.0,
    delay: Annotated[float, typer.Option(min=0, help="Seconds held each way (delay phase).")] = 0.05,
    partition: Annotated[float, typer.Option(min=0.1, help="Seconds cut off (> lease).")] = 4.0,
    lease: Annotated[float, typer.Option(help="Lease seconds.")] = 2.0,
    phase: Annotated[float, typer.Option(help="Seconds of the baseline and of the delay phase.")] = 4.0,
    seed: Seed = None,
    as_json: JsonFlag = False,
) -> None:
    """Put a fault proxy between a worker and Redis: delay, then a partition longer than the lease, then
    every connection reset; reports lost (must be 0), repeats against the tasks held at each cut, and
    the worker's time to recover."""
    from .network import NetworkConfig, run_network

    config = NetworkConfig(rate=rate, delay=delay, partition=partition, lease=lease, baseline=phase,
                           delay_phase=phase, seed=seed)
    summary = _run(run_network(config, progress=_progress(as_json)))
    show("chaos network", summary.as_dict(), as_json)


@app.command()
def gateway(
    clients: Annotated[int, typer.Option(min=1, help="Client sockets (one user each) on gateway A.")] = 20,
    before: Annotated[float, typer.Option(help="Seconds of submissions before A is killed.")] = 4.0,
    after: Annotated[float, typer.Option(help="Seconds of submissions on B after.")] = 3.0,
    seed: Seed = None,
    as_json: JsonFlag = False,
) -> None:
    """SIGKILL a gateway while its clients hold sockets and submit: they move to a second gateway, send
    again what was unanswered (same dedupe keys); reports lost (must be 0), tasks run twice (must be 0),
    results readable on the other gateway, and how fast clients noticed and came back."""
    from .gateway_kill import GatewayKillConfig, run_gateway_kill

    config = GatewayKillConfig(clients=clients, before_kill=before, after_kill=after, seed=seed)
    summary = _run(run_gateway_kill(config, progress=_progress(as_json)))
    show("chaos gateway", summary.as_dict(), as_json)


@app.command("fuzz-ws")
def fuzz_ws(
    frames: Annotated[int, typer.Option(min=25, help="Bad frames to send in all.")] = 10_000,
    sockets: Annotated[int, typer.Option(min=1, help="Fuzzing sockets, one user each.")] = 20,
    max_frame_bytes: Annotated[int, typer.Option(
        min=1024, help="The gateway's MEETMESH_MAX_FRAME_BYTES for the run.")] = 64 * 1024,
    seed: Annotated[int, typer.Option(help="Random seed (which frames, in which order).")] = 14,
    as_json: JsonFlag = False,
) -> None:
    """Fuzz a gateway's WebSocket: malformed, oversize, deeply nested, binary, out-of-order and flood
    frames over many sockets; reports frames tried, error frames by code, closes by code, failures
    (must be 0), the control client's slowest ping and whether the gateway kept its PID."""
    from .ws_fuzz import FuzzConfig, run_fuzz_ws

    config = FuzzConfig(frames=frames, sockets=sockets, seed=seed, max_frame_bytes=max_frame_bytes)
    summary = _run(run_fuzz_ws(config, progress=_progress(as_json)))
    show("chaos fuzz-ws", summary, as_json)
