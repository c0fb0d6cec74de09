"""``meetmesh schedule``: list, add and remove periodic jobs, and run the cluster-wide scheduler.

`cli` is imported inside the commands, not at the top: ``cli`` imports this module to register it,
and a top-level import back would meet a half-initialised ``cli``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from shared.bus.errors import BusError
from shared.bus.events.scheduler import Schedule, ScheduleInfo, Scheduler
from shared.bus.redact import install as install_redaction
from shared.bus.settings import BusSettings

T = TypeVar("T")
app = typer.Typer(help="Periodic jobs (interval or cron, fired once per cluster): list, add, remove, run.",
                  no_args_is_help=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
ScheduleName = Annotated[str, typer.Argument(help="Schedule name, unique under the key prefix.")]


def open_scheduler(fn: Callable[[Scheduler], Awaitable[T]], **options: Any) -> T:
    """Connect (or start a private Redis), run ``await fn(scheduler)``, close."""
    from .common import run
    from .embedded import ensure_redis

    async def main() -> T:
        settings = BusSettings.load()
        _, redis = await ensure_redis(settings.redis_url, configured=settings.redis_url_configured)
        try:
            return await fn(Scheduler(redis, prefix=settings.key_prefix, **options))
        finally:
            await redis.aclose()

    return run(main)


def _utc(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _row(info: ScheduleInfo) -> dict[str, Any]:
    return {**info.schedule.model_dump(mode="json"),
            **info.model_dump(mode="json", exclude={"schedule"})}


@app.command("list")
def list_schedules(as_json: JsonFlag = False) -> None:
    """Every schedule: queue, type, timing, last fire and next fire (UTC)."""
    from .common import console, echo_json

    infos = open_scheduler(lambda s: s.list())
    if as_json:
        echo_json([_row(i) for i in infos])
        return
    t = Table(title="schedules")
    for col in ("name", "queue", "type", "priority", "timing", "enabled", "last fire (UTC)",
                "next fire (UTC)"):
        t.add_column(col)
    for i in infos:
        s = i.schedule
        last = _utc(i.last_tick) + (f" (error: {i.last_error})" if i.last_error else "")
        t.add_row(s.name, s.queue, s.type, s.priority.value, s.timing, "yes" if s.enabled else "no", last,
                  _utc(i.next_fire))
    console.print(t)


@app.command()
def add(
    name: ScheduleName,
    queue: Annotated[str, typer.Option(help="Queue to enqueue into.")],
    task_type: Annotated[str, typer.Option("--type", help="Message type, e.g. reports.daily.")],
    data: Annotated[str, typer.Option(help="Payload as JSON.")] = "null",
    priority: Annotated[str, typer.Option(help="critical, high, normal or low.")] = "normal",
    every: Annotated[float | None, typer.Option(help="Fire every N seconds (ticks aligned to the epoch).")
                     ] = None,
    cron: Annotated[str | None, typer.Option(help='5-field cron expression in UTC, e.g. "*/15 * * * *".')
                    ] = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="Store it without firing it.")] = False,
    replace: Annotated[bool, typer.Option(help="Replace a different schedule of that name.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Add a periodic job: give --every or --cron. Adding the same job again changes nothing."""
    from .common import console, echo_json

    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--data is not JSON: {exc}") from exc
    try:  # refused here, before connecting: nothing is written
        schedule = Schedule(name=name, queue=queue, type=task_type, payload=payload, priority=priority,
                            every=every, cron=cron, enabled=not disabled)
    except BusError as exc:
        sys.exit(f"meetmesh: {exc}")
    stored = open_scheduler(lambda s: s.add(schedule, replace=replace))
    if as_json:
        echo_json(stored.model_dump(mode="json"))
    else:
        console.print(f"schedule {stored.name}: {stored.timing} -> {stored.type} into {stored.queue} "
                      f"({stored.priority.value}){'' if stored.enabled else ', disabled'}")


@app.command()
def remove(name: ScheduleName) -> None:
    """Delete a schedule (it stops firing within one scheduler poll)."""
    from .common import console

    open_scheduler(lambda s: s.remove(name))
    console.print(f"removed schedule {name}")


@app.command("run")
def run_scheduler(
    poll: Annotated[float, typer.Option(min=0.01, help="Most seconds between reloads of the schedules.")
                    ] = 0.5,
) -> None:
    """Run a scheduler until SIGTERM/SIGINT. Run one per replica: each tick still fires once."""
    try:
        settings = BusSettings.load()
    except BusError as exc:
        sys.exit(f"meetmesh: {exc}")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_redaction()  # no token or secret in any log line

    async def main(scheduler: Scheduler) -> None:
        scheduler.install_signal_handlers()
        await scheduler.run()

    open_scheduler(main, poll_seconds=poll)


if __name__ == "__main__":
    app()
