"""What every ``meetmesh`` sub-command shares: the Typer apps, the console, `run`, `echo_json`,
`open_queue`; the entry module (`meetmesh.main`) and each sub-command import it, never each other."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from shared.bus.errors import BusError
from shared.bus.queue.queue import Queue
from shared.bus.settings import BusSettings

T = TypeVar("T")
app = typer.Typer(help="MeetMesh: event bus and service mesh for real-time meeting apps.",
                  no_args_is_help=True, add_completion=False)
queue_app = typer.Typer(help="Inspect and operate queues.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead letters: list, replay, purge.", no_args_is_help=True)
task_app = typer.Typer(help="One task: show, cancel.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (print a table, or JSON with --json).", no_args_is_help=True)
app.add_typer(queue_app, name="queue")
app.add_typer(dlq_app, name="dlq")
app.add_typer(task_app, name="task")
app.add_typer(bench_app, name="bench")
console = Console()

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
QueueName = Annotated[str, typer.Argument(help="Queue name.")]


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on uvloop when available; turn BusErrors into one-line exits."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        return asyncio.run(main())
    except BusError as exc:
        sys.exit(f"meetmesh: {exc}")


def open_queue(name: str, **options: Any) -> Callable[[Callable[[Queue], Awaitable[T]]], T]:
    """``open_queue("q")(fn)`` connects (or starts a private Redis), runs ``await fn(queue)``, closes."""

    def call(fn: Callable[[Queue], Awaitable[T]]) -> T:
        async def main() -> T:
            from .embedded import ensure_redis

            settings = BusSettings.load()
            _, redis = await ensure_redis(settings.redis_url, configured=settings.redis_url_configured)
            try:
                kept = settings.retention
                return await fn(Queue(name, redis, prefix=settings.key_prefix, **{**kept, **options}))
            finally:
                await redis.aclose()

        return run(main)

    return call


async def check_redis(url: str) -> None:
    """Raise `BusConnectionError` naming ``url`` (password hidden) unless a Redis answers there."""
    from shared.bus.connection import connect

    redis = await connect(url)
    await redis.aclose()


def load_app(spec: str) -> Mapping[str, Any]:
    """``module:object`` -> a Router/mapping of handlers (a callable is called to get one)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise typer.BadParameter(f"{spec!r}: use module:object, e.g. meetmesh.bench.queue:router")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise typer.BadParameter(f"cannot load {spec!r}: {exc}") from exc
    if callable(obj) and not isinstance(obj, Mapping):
        obj = obj()
    if not isinstance(obj, Mapping):
        raise typer.BadParameter(f"{spec!r} is a {type(obj).__name__}, not a Router of handlers")
    return obj


def echo_json(value: Any) -> None:
    print(json.dumps(value, default=str, indent=2))
