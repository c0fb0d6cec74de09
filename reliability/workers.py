"""``meetmesh chaos workers``: worker processes SIGKILLed at random while tasks of mixed priority flow.

What it proves: every task completes (none lost), and the only tasks run more than once are tasks
that a killed worker held at the moment it died (leased to it, unsettled). The in-flight set of a
kill is read right after the worker is gone, from the queue's leases and each leased task's record
(its ``worker``); nothing of the dead process can change it after that, and its leases have not
expired yet (they are several times longer than a renewal period).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.bus import Message, Priority, Queue, connect

from . import children
from .apps import WORK_TYPE, runs_key
from .servers import PrivateRedis

QUEUE = "chaos"
PREFIX = "chaos"
PRIORITIES = [Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW]


@dataclass
class WorkersConfig:
    tasks: int = 20_000
    workers: int = 4
    concurrency: int = 10
    work_ms: tuple[int, int] = (10, 60)  # each task's simulated work, drawn uniformly
    kill_every: tuple[float, float] = (2.0, 4.0)  # seconds between kills, drawn uniformly
    lease: float = 2.0  # lease seconds: a dead worker's tasks are reclaimed this long after it died
    max_retries: int = 20  # attempts a task may be charged by kills before it is dead-lettered
    batch: int = 250  # tasks per enqueue call
    produce_seconds: float = 0.0  # spread the enqueues over this long (0: as fast as Redis takes them)
    deadline: float = 600.0  # give up (and report what is missing) after this long
    seed: int | None = None


@dataclass
class WorkersSummary:
    """What ``chaos workers`` reports; ``lost`` must be 0 and ``repeats`` at most ``in_flight_at_kills``."""

    tasks: int
    completed: int
    lost: int  # enqueued but not completed when the run ended
    dead: int  # dead-lettered (counted in lost)
    executions: int  # handler executions that finished their work
    repeats: int  # executions beyond each task's first
    repeated_tasks: int
    kills: int
    in_flight_at_kills: int  # tasks held by a worker when it was killed, summed over the kills
    repeats_not_in_flight: int  # repeated tasks that no killed worker held: must be 0
    workers: int
    concurrency: int
    lease_seconds: float
    seconds: float
    tasks_per_second: float
    by_priority: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.repeats <= self.in_flight_at_kills and self.repeats_not_in_flight == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


async def held_by(queue: Queue, pid: int) -> set[str]:
    """The tasks leased to the worker process ``pid`` (worker ids are ``host:pid:random``)."""
    ids: list[str] = await queue.redis.zrange(queue.keys.leases, 0, -1)
    if not ids:
        return set()
    async with queue.redis.pipeline(transaction=False) as pipe:
        for task_id in ids:
            pipe.hget(queue.keys.task(task_id), "worker")
        owners = await pipe.execute()
    mark = f":{pid}:"
    return {i for i, w in zip(ids, owners, strict=True) if w and mark in w}


async def registered(queue: Queue, child: children.Child, timeout: float = 60.0) -> None:
    """Wait for the worker's first heartbeat."""
    mark = f":{child.pid}:"
    deadline = time.monotonic() + timeout
    while not any(mark in m for m in await queue.redis.zrange(queue.keys.workers, 0, -1)):
        if not child.alive:
            raise RuntimeError(f"worker {child.pid} exited with {child.proc.returncode}:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker {child.pid} did not register in {timeout}s:\n{child.tail()}")
        await asyncio.sleep(0.05)


async def statuses(queue: Queue, ids: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for start in range(0, len(ids), 5000):
        async with queue.redis.pipeline(transaction=False) as pipe:
            for task_id in ids[start:start + 5000]:
                pipe.hget(queue.keys.task(task_id), "status")
            counts.update(str(s) for s in await pipe.execute())
    return counts


async def run_workers(config: WorkersConfig, *, progress: Any = None) -> WorkersSummary:
    """Run the scenario on a private Redis (AOF on) and return its summary."""
    rng = random.Random(config.seed)
    say = progress or (lambda text: None)
    logs = Path(tempfile.mkdtemp(prefix="meetmesh-chaos-workers-"))
    async with PrivateRedis() as server:
        redis = await connect(server.url)
        queue = Queue(QUEUE, redis, prefix=PREFIX, lease_seconds=config.lease, max_retries=config.max_retries)
        env = children.child_env(server.url, PREFIX)
        spawned = 0

        def spawn() -> children.Child:
            nonlocal spawned
            spawned += 1
            return children.worker(QUEUE, env, logs / f"worker-{spawned}.log", concurrency=config.concurrency,
                                   lease=config.lease, max_retries=config.max_retries)

        pool = [spawn() for _ in range(config.workers)]
        try:
            await asyncio.gather(*(registered(queue, c) for c in pool))
            say(f"{len(pool)} workers up on {server.url}")
            ids: list[str] = []
            by_priority: Counter[str] = Counter()
            kills: list[set[str]] = []
            started = time.monotonic()

            async def produce() -> None:
                pause = config.produce_seconds * config.batch / max(config.tasks, 1)
                while len(ids) < config.tasks:
                    n = min(config.batch, config.tasks - len(ids))
                    messages = [Message(type=WORK_TYPE, priority=rng.choice(PRIORITIES),
                                        payload={"ms": rng.randint(*config.work_ms)}) for _ in range(n)]
                    done = await queue.enqueue_many(messages)
                    ids.extend(e.id for e in done)
                    by_priority.update(m.priority.value for m in messages)
                    await asyncio.sleep(pause)

            async def kill_forever() -> None:
                while True:
                    await asyncio.sleep(rng.uniform(*config.kill_every))
                    victim = pool.pop(rng.randrange(len(pool)))
                    await victim.kill()
                    held = await held_by(queue, victim.pid)
                    kills.append(held)
                    say(f"killed worker {victim.pid} holding {len(held)} tasks "
                        f"({len(kills)} kills, {await redis.hlen(runs_key(PREFIX))} tasks run)")  # type: ignore[misc]
                    pool.append(spawn())  # not waited for: the next kill comes on time regardless

            async def finished() -> bool:
                k = queue.keys
                async with redis.pipeline(transaction=False) as pipe:
                    pipe.hlen(runs_key(PREFIX))
                    pipe.zcard(k.ready)
                    pipe.zcard(k.delayed)
                    pipe.zcard(k.leases)
                    ran, ready, delayed, leased = await pipe.execute()
                produced = len(ids) == config.tasks
                return bool(produced and ran >= config.tasks and ready + delayed + leased == 0)

            killer = asyncio.create_task(kill_forever())
            producer = asyncio.create_task(produce())
            try:
                while not await finished():
                    if time.monotonic() - started > config.deadline:
                        say(f"deadline of {config.deadline}s passed: reporting what is missing")
                        break
                    if producer.done() and producer.exception() is not None:
                        raise producer.exception()  # type: ignore[misc]
                    if killer.done() and killer.exception() is not None:
                        raise killer.exception()  # type: ignore[misc]
                    await asyncio.sleep(0.1)
            finally:
                killer.cancel()
                producer.cancel()
                await asyncio.gather(killer, producer, return_exceptions=True)
            seconds = time.monotonic() - started
            for child in pool:
                await child.terminate()
            runs = {i: int(n) for i, n in (await redis.hgetall(runs_key(PREFIX))).items()}  # type: ignore[misc]
            states = await statuses(queue, ids)
        finally:
            for child in pool:
                await child.kill()
            await redis.aclose()
    in_flight = set().union(*kills) if kills else set()
    repeated = {i for i, n in runs.items() if n > 1}
    completed = states.get("completed", 0)
    summary = WorkersSummary(
        tasks=len(ids), completed=completed, lost=len(ids) - completed, dead=states.get("dead", 0),
        executions=sum(runs.values()), repeats=sum(n - 1 for n in runs.values() if n > 1),
        repeated_tasks=len(repeated), kills=len(kills), in_flight_at_kills=sum(len(k) for k in kills),
        repeats_not_in_flight=len(repeated - in_flight), workers=config.workers,
        concurrency=config.concurrency, lease_seconds=config.lease, seconds=round(seconds, 2),
        tasks_per_second=round(len(ids) / seconds, 1) if seconds else 0.0, by_priority=dict(by_priority))
    children.tidy(logs, summary.ok, say)
    return summary
