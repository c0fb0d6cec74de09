"""The cluster-wide scheduler against the real Redis: timing, once per cluster with racing schedulers,
cron math on an injected clock, missed ticks, run-time add/remove, refusals, restarts, and the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from croniter import croniter  # type: ignore[import-untyped]
from typer.testing import CliRunner

from meetmesh.schedule import app
from shared.bus import InvalidMessage, Message, Priority, Queue, connect
from shared.bus.errors import ScheduleNotFound
from shared.bus.events.scheduler import Schedule, Scheduler
from shared.bus.keys import SchedulerKeys

ROOT = Path(__file__).resolve().parents[3]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def at(text: str) -> float:
    """Epoch seconds of a UTC time written ``2024-03-11 10:07:30``."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


async def drain(queue: Queue) -> list[Message]:
    """Every message waiting in the queue (leased, so each is seen once)."""
    deliveries, _ = await queue.dequeue(1000, "test")
    return [d.message for d in deliveries if d.message is not None]


def ticks_of(messages: list[Message]) -> list[int]:
    return sorted(int(m.headers["tick"]) for m in messages)


@contextlib.asynccontextmanager
async def running(*schedulers: Scheduler) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.run()) for s in schedulers]
    try:
        yield
    finally:
        for s in schedulers:
            s.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def keys_under(redis: Any, prefix: str) -> list[str]:
    return [k async for k in redis.scan_iter(match=f"{prefix}:*")]


# -- firing -------------------------------------------------------------------------------------


async def test_interval_schedule_fires_on_time_with_its_type_payload_and_priority(
        redis: Any, key_prefix: str, make_queue: Any) -> None:
    scheduler = Scheduler(redis, prefix=key_prefix, poll_seconds=1.0)  # wakes for ticks, not polls
    await scheduler.add(Schedule(name="beat", queue="jobs", type="health.ping", payload={"n": 1},
                                 priority="high", every=0.3))
    async with running(scheduler):
        await asyncio.sleep(1.4)
    messages = await drain(make_queue("jobs"))
    assert 3 <= len(messages) <= 5
    for m in messages:
        assert (m.type, m.payload, m.priority) == ("health.ping", {"n": 1}, Priority.HIGH)
        assert m.headers["schedule"] == "beat"
        tick = int(m.headers["tick"])
        assert tick % 300 == 0  # aligned to the epoch
        assert 0 <= m.created_at - tick / 1000 < 0.15  # fired at its tick, not a poll later
    ticks = ticks_of(messages)
    assert ticks == list(range(ticks[0], ticks[-1] + 1, 300))  # every tick, once


async def test_two_schedulers_fire_each_tick_once(redis: Any, redis_url: str, key_prefix: str,
                                                  make_queue: Any) -> None:
    other = await connect(redis_url)
    try:
        a = Scheduler(redis, prefix=key_prefix, poll_seconds=0.05)
        b = Scheduler(other, prefix=key_prefix, poll_seconds=0.05)
        added = await a.add(Schedule(name="tick", queue="jobs", type="t", every=0.2))
        async with running(a, b):
            await asyncio.sleep(2.0)
        stopped = time.time()
    finally:
        await other.aclose()
    ticks = ticks_of(await drain(make_queue("jobs")))
    assert added.created_at is not None
    first = (int(added.created_at * 1000) // 200 + 1) * 200
    assert ticks[0] == first and ticks == list(range(first, ticks[-1] + 1, 200))  # no gap, no double
    assert ticks[-1] >= int(stopped * 1000) // 200 * 200 - 200  # and none missing at the end
    assert a.fired + b.fired == len(ticks)


async def test_racing_schedulers_share_one_task_through_the_dedupe_key(redis: Any, key_prefix: str,
                                                                      make_queue: Any) -> None:
    clock = Clock(at("2024-03-11 10:00:00.500"))
    a, b = (Scheduler(redis, prefix=key_prefix, clock=clock) for _ in range(2))
    await a.add(Schedule(name="r", queue="jobs", type="t", every=60))
    clock.now += 60
    first, second = await asyncio.gather(a.fire_due(), b.fire_due())
    firings = first + second
    assert [f.created for f in firings].count(True) == 1
    task_id = firings[0].task_id
    assert {f.task_id for f in firings} == {task_id}
    # A scheduler that enqueued, then died before recording the tick: the next one finds the task.
    await redis.delete(SchedulerKeys(key_prefix).fired)
    (again,) = await b.fire_due()
    assert not again.created and again.task_id == task_id
    assert len(await drain(make_queue("jobs"))) == 1


async def test_cron_ticks_follow_croniter_and_missed_ticks_fire_once(redis: Any, key_prefix: str,
                                                                     make_queue: Any) -> None:
    start = at("2024-03-11 10:07:30")
    clock = Clock(start)
    scheduler = Scheduler(redis, prefix=key_prefix, clock=clock)
    await scheduler.add(Schedule(name="quarter", queue="jobs", type="t", cron="*/15 * * * *"))
    await scheduler.add(Schedule(name="monday", queue="jobs", type="t", cron="0 9 * * 1"))
    infos = {i.schedule.name: i for i in await scheduler.list()}
    quarter, monday = croniter("*/15 * * * *", start), croniter("0 9 * * 1", start)
    assert infos["quarter"].next_fire == quarter.get_next(float) == at("2024-03-11 10:15")
    assert infos["monday"].next_fire == monday.get_next(float) == at("2024-03-18 09:00")
    assert infos["quarter"].last_tick is None

    assert await scheduler.fire_due() == []  # 10:00 is before the schedule existed
    clock.now = at("2024-03-11 10:15:00.200")
    (fired,) = await scheduler.fire_due()
    assert (fired.name, fired.tick) == ("quarter", at("2024-03-11 10:15"))
    assert await scheduler.fire_due() == []
    clock.now = at("2024-03-11 13:40")  # every scheduler was down: 10:30 ... 13:30 were missed
    (fired,) = await scheduler.fire_due()
    assert fired.tick == at("2024-03-11 13:30")  # one catch-up, the latest tick
    assert await scheduler.fire_due() == []
    info = {i.schedule.name: i for i in await scheduler.list()}["quarter"]
    assert (info.last_tick, info.last_fired_at, info.next_fire) == (
        at("2024-03-11 13:30"), at("2024-03-11 13:40"), at("2024-03-11 13:45"))
    assert info.last_task_id == fired.task_id
    assert ticks_of(await drain(make_queue("jobs"))) == [int(at("2024-03-11 10:15") * 1000),
                                                         int(at("2024-03-11 13:30") * 1000)]


async def test_restart_does_not_fire_a_fired_tick_again(redis: Any, key_prefix: str, make_queue: Any) -> None:
    clock = Clock(at("2024-03-11 10:00:10"))
    await Scheduler(redis, prefix=key_prefix, clock=clock).add(
        Schedule(name="r", queue="jobs", type="t", every=60))
    clock.now = at("2024-03-11 10:01:05")
    assert len(await Scheduler(redis, prefix=key_prefix, clock=clock).fire_due()) == 1
    queue = make_queue("jobs")
    for key in [k async for k in redis.scan_iter(match=queue.keys.dedupe_prefix.replace("{", "\\{")
                                                 .replace("}", "\\}") + "*")]:
        await redis.delete(key)  # long gone: only the recorded tick can stop a second firing
    restarted = Scheduler(redis, prefix=key_prefix, clock=clock)
    assert await restarted.fire_due() == []
    clock.now = at("2024-03-11 10:02:00")
    assert [f.tick for f in await restarted.fire_due()] == [at("2024-03-11 10:02")]
    assert len(await drain(queue)) == 2


async def test_interval_list_shows_last_and_next_fire(redis: Any, key_prefix: str) -> None:
    clock = Clock(1_700_000_030.0)
    scheduler = Scheduler(redis, prefix=key_prefix, clock=clock)
    await scheduler.add(Schedule(name="m", queue="jobs", type="t", every=60))
    await scheduler.add(Schedule(name="off", queue="jobs", type="t", every=60, enabled=False))
    m, off = await scheduler.list()
    assert (m.next_fire, m.last_tick, m.last_task_id) == (1_700_000_040.0, None, None)
    assert off.next_fire is None
    clock.now = 1_700_000_041.0
    (fired,) = await scheduler.fire_due()  # the disabled one does not fire
    m, off = await scheduler.list()
    assert (m.last_tick, m.last_fired_at, m.last_task_id, m.next_fire) == (
        1_700_000_040.0, 1_700_000_041.0, fired.task_id, 1_700_000_100.0)
    assert off.last_tick is None


# -- managing schedules -------------------------------------------------------------------------


async def test_add_and_remove_take_effect_while_running(redis: Any, key_prefix: str, make_queue: Any
                                                        ) -> None:
    running_one = Scheduler(redis, prefix=key_prefix, poll_seconds=0.1)
    operator = Scheduler(redis, prefix=key_prefix)  # another process
    queue = make_queue("jobs")
    async with running(running_one):
        await asyncio.sleep(0.3)
        assert await drain(queue) == []
        await operator.add(Schedule(name="late", queue="jobs", type="t", every=0.2))
        await asyncio.sleep(0.9)
        before = len(await drain(queue))
        assert before >= 3
        await operator.remove("late")
        await asyncio.sleep(0.9)
        after = len(await drain(queue))
    assert after <= 1  # at most one firing already under way when it was removed


@pytest.mark.parametrize(("fields", "complaint"), [
    ({"cron": "61 * * * *"}, "invalid cron '61 * * * *'"),
    ({"cron": "* * * *"}, "give 5 fields"),
    ({"cron": "*/5 * * * * *"}, "give 5 fields"),
    ({"cron": "0 0 31 4 *"}, "never matches"),
    ({"every": 0}, "invalid every 0"),
    ({"every": -1.5}, "invalid every -1.5"),
    ({"every": float("nan")}, "invalid every nan"),
    ({"every": 5, "cron": "* * * * *"}, "exactly one"),
    ({}, "exactly one"),
    ({"every": 5, "priority": "urgent"}, "invalid priority 'urgent'"),
    ({"every": 5, "queue": "bad queue!"}, "invalid queue name 'bad queue!'"),
    ({"every": 5, "name": ""}, "invalid schedule name ''"),
    ({"every": 5, "type": "no spaces"}, "type"),
    ({"every": 5, "payload": object()}, "not JSON"),
    ({"every": "often"}, "every"),
])
async def test_invalid_specs_are_refused_and_nothing_written(
        redis: Any, key_prefix: str, fields: dict[str, Any], complaint: str) -> None:
    spec: dict[str, Any] = {"name": "s", "queue": "jobs", "type": "t", **fields}
    with pytest.raises(InvalidMessage) as refused:
        await Scheduler(redis, prefix=key_prefix).add(Schedule(**spec))
    assert complaint in str(refused.value)
    assert await keys_under(redis, key_prefix) == []


async def test_add_is_idempotent_refuses_a_different_job_and_remove_clears_state(
        redis: Any, key_prefix: str) -> None:
    clock = Clock(1_700_000_000.0)
    scheduler = Scheduler(redis, prefix=key_prefix, clock=clock)
    first = await scheduler.add(Schedule(name="s", queue="jobs", type="t", every=10))
    clock.now += 5
    assert await scheduler.add(Schedule(name="s", queue="jobs", type="t", every=10)) == first
    with pytest.raises(InvalidMessage, match="already exists as every 10s"):
        await scheduler.add(Schedule(name="s", queue="jobs", type="t", every=20))
    assert [i.schedule for i in await scheduler.list()] == [first]
    replaced = await scheduler.add(Schedule(name="s", queue="jobs", type="t", every=20), replace=True)
    assert replaced.every == 20 and replaced.created_at == clock.now
    clock.now += 20
    assert len(await scheduler.fire_due()) == 1
    await scheduler.remove("s")
    assert await scheduler.list() == [] and await keys_under(redis, key_prefix) != []  # the task stays
    assert not await redis.exists(SchedulerKeys(key_prefix).fired, SchedulerKeys(key_prefix).state)
    with pytest.raises(ScheduleNotFound, match="no schedule named 's'"):
        await scheduler.remove("s")


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def env(redis_url: str, key_prefix: str, redis: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The commands' environment; asking for `redis` makes the prefix's keys go when the test ends."""
    try:
        import uvloop

        monkeypatch.setattr(uvloop, "install", lambda: None)  # in-process: keep the test's loop policy
    except ImportError:
        pass
    return {"MEETMESH_REDIS_URL": redis_url, "MEETMESH_KEY_PREFIX": key_prefix}


async def cli(env: dict[str, str], *args: str) -> Any:
    """Run ``meetmesh schedule ARGS`` in-process (in a thread: it runs its own event loop)."""
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


async def test_cli_add_list_remove(env: dict[str, str], redis: Any, key_prefix: str) -> None:
    out = await cli(env, "add", "nightly", "--queue", "reports", "--type", "reports.build",
                    "--data", '{"kind": "daily"}', "--priority", "low", "--cron", "30 2 * * *")
    assert out.exit_code == 0, out.output
    assert "nightly: cron 30 2 * * * -> reports.build into reports (low)" in out.output
    out = await cli(env, "add", "beat", "--queue", "ops", "--type", "ping", "--every", "30", "--json")
    assert out.exit_code == 0 and json.loads(out.stdout)["every"] == 30
    listed = json.loads((await cli(env, "list", "--json")).stdout)
    assert [r["name"] for r in listed] == ["beat", "nightly"]
    nightly = listed[1]
    assert (nightly["queue"], nightly["type"], nightly["payload"], nightly["priority"], nightly["cron"]) == (
        "reports", "reports.build", {"kind": "daily"}, "low", "30 2 * * *")
    assert nightly["next_fire"] == croniter("30 2 * * *", time.time()).get_next(float)
    assert nightly["last_tick"] is None
    table = (await cli(env, "list")).stdout
    assert "nightly" in table and "beat" in table
    out = await cli(env, "remove", "nightly")
    assert out.exit_code == 0 and "removed schedule nightly" in out.output
    assert [r["name"] for r in json.loads((await cli(env, "list", "--json")).stdout)] == ["beat"]


async def test_cli_bad_input_is_one_clear_line_and_writes_nothing(env: dict[str, str], redis: Any,
                                                                  key_prefix: str) -> None:
    for args, complaint in [
        (["--cron", "99 * * * *"], "invalid cron '99 * * * *'"),
        (["--every", "0"], "invalid every 0"),
        (["--every", "5", "--cron", "* * * * *"], "exactly one"),
        ([], "exactly one"),
        (["--every", "5", "--priority", "urgent"], "invalid priority 'urgent'"),
    ]:
        out = await cli(env, "add", "s", "--queue", "jobs", "--type", "t", *args)
        assert out.exit_code != 0 and complaint in out.output, (args, out.output)
        assert "Traceback" not in out.output
    out = await cli(env, "add", "s", "--queue", "bad queue", "--type", "t", "--every", "5")
    assert out.exit_code != 0 and "invalid queue name 'bad queue'" in out.output
    assert await keys_under(redis, key_prefix) == []
    out = await cli(env, "remove", "missing")
    assert out.exit_code != 0 and "no schedule named 'missing'" in out.output


async def test_cli_run_fires_and_stops_on_sigterm(env: dict[str, str], redis: Any, key_prefix: str,
                                                 make_queue: Any) -> None:
    await Scheduler(redis, prefix=key_prefix).add(Schedule(name="s", queue="jobs", type="t", every=0.2))
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the child is watched below
        [sys.executable, "-m", "meetmesh.schedule", "run", "--poll", "0.1"], cwd=ROOT,
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        queue = make_queue("jobs")
        deadline = time.monotonic() + 20
        while (await queue.stats()).enqueued < 2 and time.monotonic() < deadline:  # noqa: ASYNC110 - polls Redis
            await asyncio.sleep(0.1)
        assert (await queue.stats()).enqueued >= 2
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "scheduler stopped" in stderr
