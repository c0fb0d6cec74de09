"""Crash tests: real worker processes (``python -m meetmesh worker``) killed with SIGKILL or
stopped with SIGTERM, then checked for lost, repeated or misplaced work.

The handlers live in ``tests/bus/queue/apps.py`` and count their executions in Redis under the test's
key prefix, so the counts survive the process that made them.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.bus import Context, Queue, TaskStatus

from .apps import PIPELINE_STAGES, runs_key, stages_key, started_key, total_key

ROOT = Path(__file__).resolve().parents[3]
WAIT = 30.0


class Child:
    """One worker process in its own session (so a kill reaches nothing else)."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def term(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)

    async def exited(self, timeout: float = WAIT) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {self.pid} still running after {timeout}s\n{self.tail()}")
            await asyncio.sleep(0.01)
        return code

    async def ready(self, queue: Queue, timeout: float = WAIT) -> str:
        """Wait until the worker has registered (its first heartbeat); returns its worker id."""
        mark = f":{self.pid}:"

        async def registered() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.pid} exited with {self.proc.poll()}\n{self.tail()}")
            members = await queue.redis.zrange(queue.keys.workers, 0, -1)
            return next((m for m in members if mark in m), None)

        return await until(registered, timeout, f"worker {self.pid} to register")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@pytest.fixture
def spawn(redis_url: str, key_prefix: str, tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """``spawn("counting", concurrency=10, lease=1.0, ...)``: start a worker process on queue "q"."""
    children: list[Child] = []

    def start(app: str, *, queue: str = "q", concurrency: int = 10, lease: float = 1.0,
              grace: float = 10.0, max_retries: int = 3) -> Child:
        log = tmp_path / f"worker-{len(children)}.log"
        env = {**os.environ, "MEETMESH_REDIS_URL": redis_url, "MEETMESH_KEY_PREFIX": key_prefix,
               "MEETMESH_LOG_LEVEL": "WARNING",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "meetmesh", "worker", "--queue", queue,
                 "--app", f"tests.bus.queue.apps:{app}", "--concurrency", str(concurrency),
                 "--lease", str(lease), "--grace", str(grace), "--max-retries", str(max_retries)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        child = Child(proc, log)
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            child.kill()
        for child in children:
            try:
                child.proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a SIGKILLed child always exits
                pass


async def until(predicate: Callable[[], Awaitable[Any]], timeout: float, what: str,
                poll: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := await predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(poll)
    return value


async def counts(redis: Any, key_of: Callable[[str], str], ids: list[str]) -> dict[str, int]:
    values = await redis.mget([key_of(i) for i in ids])
    return {i: int(v or 0) for i, v in zip(ids, values, strict=True)}


async def all_events(queue: Queue) -> list[dict[str, str]]:
    return [fields for _, fields in await queue.redis.xrange(queue.keys.events)]


async def placement(queue: Queue, task_id: str) -> set[str]:
    k = queue.keys
    found = set()
    for name, key in (("ready", k.ready), ("delayed", k.delayed), ("leases", k.leases), ("dead", k.dead)):
        if await queue.redis.zscore(key, task_id) is not None:
            found.add(name)
    return found


async def task_states(queue: Queue, ids: list[str]) -> dict[str, TaskStatus]:
    async with queue.redis.pipeline(transaction=False) as pipe:
        for task_id in ids:
            pipe.hget(queue.keys.task(task_id), "status")
        values = await pipe.execute()
    return {i: TaskStatus(v) for i, v in zip(ids, values, strict=True)}


async def assert_consistent(queue: Queue, ids: list[str], context: str = "") -> dict[str, TaskStatus]:
    """With no worker alive, every task is in exactly the place its status says, and depth adds up."""
    states = await task_states(queue, ids)
    expected = {TaskStatus.QUEUED: ({"ready"}, {"delayed"}), TaskStatus.PROCESSING: ({"leases"},),
                TaskStatus.COMPLETED: (set(),)}
    for task_id, status in states.items():
        found = await placement(queue, task_id)
        assert found in expected[status], f"{task_id} is {status.value} but in {found or 'nothing'} {context}"
    stats = await queue.stats()
    assert stats.ready == await queue.redis.zcard(queue.keys.ready), f"depth counters are off {context}"
    return states


async def wait_all(queue: Queue, ids: list[str], timeout: float = WAIT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    records = {}
    for task_id in ids:
        records[task_id] = await queue.wait(task_id, max(0.1, deadline - time.monotonic()))
    return records


# -- 9. SIGKILL in the middle of a backlog ------------------------------------------------------


async def test_sigkill_mid_backlog_loses_nothing_and_repeats_only_what_was_in_flight(
        make_queue, redis, key_prefix, spawn):
    concurrency = 10
    queue = make_queue(lease_seconds=1.0, max_retries=3)
    tasks = await queue.enqueue_many([queue.message("count", {"sleep": 0.01}) for _ in range(300)])
    ids = [t.id for t in tasks]

    first = spawn("counting", concurrency=concurrency, lease=1.0)

    async def progressed() -> bool:
        return int(await redis.get(total_key(key_prefix)) or 0) >= 100

    await until(progressed, WAIT, "100 messages to be handled")
    first.kill()
    assert await first.exited() == -signal.SIGKILL
    await asyncio.sleep(0.2)  # let Redis apply whatever the dead process had already sent
    in_flight = set(await redis.zrange(queue.keys.leases, 0, -1))
    states = await assert_consistent(queue, ids)
    assert in_flight, "the kill should have caught messages in flight"
    assert {i for i, s in states.items() if s is TaskStatus.PROCESSING} == in_flight

    second = spawn("counting", concurrency=concurrency, lease=1.0)
    records = await wait_all(queue, ids, 60)
    second.term()
    await second.exited()

    assert {r.status for r in records.values()} == {TaskStatus.COMPLETED}, second.tail()
    runs = await counts(redis, lambda i: runs_key(key_prefix, i), ids)
    assert min(runs.values()) >= 1, "a message was lost"
    repeated = {i for i, n in runs.items() if n > 1}
    assert repeated <= in_flight, f"repeated without having been in flight: {repeated - in_flight}"
    assert len(repeated) <= concurrency * 2
    for task_id in set(ids) - in_flight:
        assert runs[task_id] == 1 and records[task_id].attempts == 1
    for task_id in in_flight:
        assert records[task_id].attempts == 2  # the killed delivery, then the one that completed
    stats = await queue.stats()
    assert stats.reclaimed == len(in_flight)
    assert stats.processed == 300
    assert stats.ready == stats.delayed == stats.in_flight == stats.dead_letters == 0


# -- 10. SIGTERM: in-flight work finishes, leases are released ----------------------------------


async def test_sigterm_finishes_in_flight_work_and_leaves_the_rest_queued(make_queue, redis, key_prefix,
                                                                            spawn):
    queue = make_queue(lease_seconds=30)  # a lease left behind would hold its task for 30 s
    # the first four (in flight together) finish 0.1 s apart: the last one's outcome is settled alone
    tasks = await queue.enqueue_many(
        [queue.message("count", {"sleep": 0.3 + 0.1 * (i % 4)}) for i in range(12)])
    ids = [t.id for t in tasks]
    first = spawn("counting", concurrency=4, lease=30, grace=10)

    async def busy() -> bool:
        return await redis.zcard(queue.keys.leases) == 4

    await until(busy, WAIT, "4 messages in flight")
    in_flight = set(await redis.zrange(queue.keys.leases, 0, -1))
    first.term()
    assert await first.exited() == 0, first.tail()

    assert await redis.zcard(queue.keys.leases) == 0, "a stopped worker left leases behind"
    states = await task_states(queue, ids)
    runs = await counts(redis, lambda i: runs_key(key_prefix, i), ids)
    finished = {i for i, s in states.items() if s is TaskStatus.COMPLETED}
    assert in_flight <= finished, "in-flight work was not finished"
    for task_id in set(ids) - finished:
        assert states[task_id] is TaskStatus.QUEUED
        assert runs[task_id] == 0
        assert (await queue.get(task_id)).attempts == 0
        assert await placement(queue, task_id) == {"ready"}

    second = spawn("counting", concurrency=4, lease=30)
    records = await wait_all(queue, ids, 20)  # well under the 30 s lease
    second.term()
    await second.exited()
    assert {r.status for r in records.values()} == {TaskStatus.COMPLETED}
    runs = await counts(redis, lambda i: runs_key(key_prefix, i), ids)
    assert set(runs.values()) == {1}, "a graceful stop must not cause repeats"
    assert {r.attempts for r in records.values()} == {1}


async def test_sigterm_past_the_grace_period_releases_leases_at_once(make_queue, redis, key_prefix, spawn):
    queue = make_queue(lease_seconds=30)
    # the first start sleeps 20 s (outlives the grace period); a later start is quick
    tasks = await queue.enqueue_many([queue.message("count", {"sleep": [20, 0.01]}) for _ in range(2)])
    ids = [t.id for t in tasks]
    first = spawn("counting", concurrency=2, lease=30, grace=0.3)

    async def both_started() -> bool:
        return set((await counts(redis, lambda i: started_key(key_prefix, i), ids)).values()) == {1}

    await until(both_started, WAIT, "both handlers to start")
    first.term()
    assert await first.exited(10) == 0, first.tail()

    assert await redis.zcard(queue.keys.leases) == 0, "the interrupted messages' leases were not released"
    for task_id in ids:
        record = await queue.get(task_id)
        assert record.status is TaskStatus.QUEUED and record.attempts == 0
        assert await placement(queue, task_id) == {"ready"}
    events = await all_events(queue)
    assert {e["id"] for e in events if e.get("reason") == "released"} == set(ids)

    second = spawn("counting", concurrency=2, lease=30)
    records = await wait_all(queue, ids, 15)  # long before the 30 s lease would have expired
    second.term()
    await second.exited()
    assert {r.status for r in records.values()} == {TaskStatus.COMPLETED}
    assert {r.attempts for r in records.values()} == {1}
    assert set((await counts(redis, lambda i: runs_key(key_prefix, i), ids)).values()) == {1}
    assert set((await counts(redis, lambda i: started_key(key_prefix, i), ids)).values()) == {2}


# -- 11. pipeline stage transitions under repeated SIGKILL ---------------------------------------


@pytest.mark.slow
async def test_pipeline_stage_transitions_survive_sigkill_at_random_moments(
        make_queue, redis, key_prefix, spawn):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    last = PIPELINE_STAGES - 1
    # max_retries leaves room for a task to be caught in flight by every kill
    queue = make_queue(lease_seconds=1.0, max_retries=10)
    tasks = await queue.enqueue_many(
        [queue.message("pipe.0", {"sleep": 0.03, "delay": 0.02}) for _ in range(30)])
    ids = [t.id for t in tasks]

    kills = []
    for _ in range(4):
        child = spawn("pipeline", concurrency=4, lease=1.0, max_retries=10)
        await child.ready(queue)
        pause = rng.uniform(0, 0.3)
        await asyncio.sleep(pause)
        child.kill()
        assert await child.exited() == -signal.SIGKILL
        kills.append(round(pause, 3))
        await asyncio.sleep(0.05)  # let Redis apply whatever the dead process had already sent
        await assert_consistent(queue, ids, f"after kill {len(kills)} (seed {seed}, {kills})")
    context = f"seed {seed}, killed after {kills} s"

    final = spawn("pipeline", concurrency=4, lease=1.0, max_retries=10)
    records = await wait_all(queue, ids, 60)
    final.term()
    await final.exited()

    events = await all_events(queue)
    for task_id in ids:
        record = records[task_id]
        assert record.status is TaskStatus.COMPLETED, f"{task_id}: {record.status} ({context})"
        assert record.stage == last and record.type == f"pipe.{last}", context
        assert record.result == {"stage": last}
        assert await placement(queue, task_id) == set(), f"{task_id} is also somewhere else ({context})"
        stages = [int(s.split(":")[1]) for s in await redis.lrange(stages_key(key_prefix, task_id), 0, -1)]
        # at-least-once may repeat a stage's execution, but never skips or goes back
        assert set(stages) == set(range(PIPELINE_STAGES)), f"{task_id} ran stages {stages} ({context})"
        assert stages == sorted(stages), f"{task_id} ran stages {stages} ({context})"
        mine = [e for e in events if e.get("id") == task_id]
        transitions = Counter(e["stage"] for e in mine if e.get("reason") == "next_stage")
        assert transitions == {str(n): 1 for n in range(1, PIPELINE_STAGES)}, f"{task_id}: {context}"
        assert sum(e["status"] == "completed" for e in mine) == 1, context
    stats = await queue.stats()
    assert stats.ready == stats.delayed == stats.in_flight == stats.dead_letters == 0, context
    assert stats.reclaimed > 0, f"no kill caught a stage in flight ({context})"


# -- 12. a long handler in a worker process keeps its lease -------------------------------------


async def test_a_handler_running_three_times_its_lease_in_a_worker_process_runs_once(
        make_queue, redis, key_prefix, spawn):
    queue = make_queue(lease_seconds=0.5)
    tasks = await queue.enqueue_many([queue.message("count", {"sleep": 1.5}) for _ in range(3)])
    ids = [t.id for t in tasks]
    # two worker processes with spare capacity: either would reclaim an expired lease at once
    workers = [spawn("counting", concurrency=4, lease=0.5) for _ in range(2)]
    for w in workers:
        await w.ready(queue)
    records = await wait_all(queue, ids, WAIT)
    for w in workers:
        w.term()
    for w in workers:
        await w.exited()

    assert {r.status for r in records.values()} == {TaskStatus.COMPLETED}
    assert {r.attempts for r in records.values()} == {1}
    assert set((await counts(redis, lambda i: started_key(key_prefix, i), ids)).values()) == {1}
    assert set((await counts(redis, lambda i: runs_key(key_prefix, i), ids)).values()) == {1}
    assert (await queue.stats()).reclaimed == 0
    events = await all_events(queue)
    assert Counter(e["id"] for e in events if e["status"] == "processing") == dict.fromkeys(ids, 1)


# -- a worker killed while idle ------------------------------------------------------------------


async def test_a_message_enqueued_just_after_an_idle_worker_dies_still_runs(make_queue, spawn, run_worker):
    queue = make_queue(lease_seconds=1.0, max_retries=0)
    dead = spawn("counting", concurrency=2, lease=1.0, max_retries=0)
    worker_id = await dead.ready(queue)

    async def idle() -> bool:
        return any(m.endswith(worker_id) for m in await queue.redis.zrange(queue.keys.idle, 0, -1))

    await until(idle, WAIT, "the worker to wait for work")
    dead.kill()
    assert await dead.exited() == -signal.SIGKILL
    task = await queue.enqueue("count", {"sleep": 0})
    ran: list[int] = []

    async def count(ctx: Context) -> str:
        ran.append(ctx.message.attempts)
        return "ran"

    async with run_worker(queue, {"count": count}, poll_seconds=0.05):
        record = await queue.wait(task.id, WAIT)
    assert record.status is TaskStatus.COMPLETED, record.error
    assert ran == [1]
