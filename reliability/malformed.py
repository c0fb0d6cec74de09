"""``meetmesh chaos malformed``: garbage written straight into Redis, where the bus's consumers read.

On a private Redis, three consumers run: a ``meetmesh worker`` process (queue records, the ready
set, its inbox list), the task relay of a `Dispatcher` (the queue's status stream) and a service's
`EventBus` on Redis (the durable event stream). Each case writes one malformed thing where one of
them reads (garbage JSON, missing fields, wrong types, dangling ids), then sends a good one down the
same path. What it proves: the good one is still handled (the consumer did not stop), the worker
process is the same one (it did not crash), and the bad one ended where it should: a task
dead-lettered with the reason on its record, an event in the service's dead letters with the
reason, a status entry skipped (status entries are notifications, not work: nothing to retry).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from faststream.redis.message import DATA_KEY

from shared.bus import Dispatcher, Event, EventBus, EventKeys, Queue, TaskUpdate, connect, new_id

from . import children
from .apps import WORK_TYPE, total_key
from .broker import EVENT
from .servers import PrivateRedis
from .workers import registered

QUEUE = "chaos"
PREFIX = "chaos"
WAIT = 15.0


@dataclass
class Case:
    consumer: str  # worker, relay or events
    name: str
    outcome: str  # what became of the bad one: "dead: <reason>", "skipped", ...
    handled: bool  # it ended where it should (dead-lettered with a reason, or skipped)
    consumer_alive: bool  # the good one sent after it was handled (and the worker is the same process)


@dataclass
class MalformedSummary:
    cases: list[Case] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.handled and c.consumer_alive for c in self.cases)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


async def _until(check: Callable[[], Awaitable[Any]], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.05)
    return None


def _message(**fields: Any) -> str:
    body = {"id": fields.pop("id"), "type": WORK_TYPE, "payload": {"ms": 1}, "created_at": time.time()}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not ...})


WORKER_CASES: dict[str, Callable[[str], dict[str, Any]]] = {
    # name -> the record fields written for a task id (the ready set gets the id too). Every body
    # that does not parse must be dead-lettered with the reason; a good body under junk bookkeeping
    # fields may run (it is a valid task) or be dead-lettered, but never stick or stop the worker.
    "body not JSON": lambda i: {"msg": '{"id": "' + i + '", "type": "chaos.work", "payload": '},
    "body not an object": lambda i: {"msg": "[1, 2, 3]"},
    "body without a type": lambda i: {"msg": _message(id=i, type=...)},
    "body with wrong types": lambda i: {"msg": _message(id=i, priority="urgent!!", timeout="soon",
                                                        attempts=-3, headers=[1])},
    "record fields of the wrong type": lambda i: {"msg": _message(id=i), "att": "many", "max": "x",
                                                  "prio": "nine"},
    "record without a body": lambda i: {},
}


async def _worker_cases(queue: Queue, worker: children.Child, worker_id: str) -> list[Case]:
    redis = queue.redis
    k = queue.keys
    cases = []
    for name, fields in WORKER_CASES.items():
        bad = new_id()
        record = {"type": WORK_TYPE, "prio": "2", "status": "queued", "score": "0",
                  "enq": str(int(time.time() * 1000)), "max": "0", **fields(bad)}
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(k.task(bad), mapping=record)
            pipe.zadd(k.ready, {bad: 0})
            pipe.hincrby(k.depth, "2", 1)
            await pipe.execute()
        cases.append(await _worker_outcome(queue, worker, name, bad))
    # a dangling id: in the ready set, no record at all
    bad = new_id()
    await redis.zadd(k.ready, {bad: 0})
    cases.append(await _worker_outcome(queue, worker, "ready id without a record", bad, dangling=True))
    # garbage handed straight to the worker's inbox list (where the enqueue script hands it work)
    await redis.lpush(k.inbox(worker_id), "garbage, not a delivery")  # type: ignore[misc]
    await redis.lpush(k.inbox(worker_id), "id\n1\n2\n{not json")  # type: ignore[misc]
    alive = await _probe_worker(queue, worker)
    left = await redis.llen(k.inbox(worker_id))  # type: ignore[misc]
    cases.append(Case("worker", "garbage in the worker's inbox",
                      f"{2 - min(left, 2)} of 2 taken and dropped", handled=left == 0, consumer_alive=alive))
    return cases


async def _worker_outcome(queue: Queue, worker: children.Child, name: str, bad: str,
                          dangling: bool = False) -> Case:
    redis = queue.redis

    async def settled() -> str | None:
        if await redis.zscore(queue.keys.ready, bad) is not None:
            return None
        if await redis.zscore(queue.keys.leases, bad) is not None:
            return None
        raw = await redis.hgetall(queue.keys.task(bad))  # type: ignore[misc]
        if dangling and not raw:
            return "dropped from the ready set"
        status = raw.get("status")
        if status in (None, "queued", "processing"):
            return None
        return f"{status}: {raw.get('error', '')}"

    outcome = await _until(settled)
    alive = await _probe_worker(queue, worker)
    if outcome is None:
        return Case("worker", name, "still waiting (not taken, or its lease never ended)", False, alive)
    dead_with_reason = outcome.startswith("dead:") and len(outcome) > len("dead: ")
    good = dead_with_reason or outcome == "dropped from the ready set" or (
        name == "record fields of the wrong type" and outcome.startswith("completed"))
    return Case("worker", name, outcome[:300], good, alive)


async def _probe_worker(queue: Queue, worker: children.Child) -> bool:
    """A good task is run by the same worker process."""
    before = int(await queue.redis.get(total_key(PREFIX)) or 0)
    probe = await queue.enqueue(WORK_TYPE, {"ms": 1})
    record = await _until(lambda: _finished(queue, probe.id))
    after = int(await queue.redis.get(total_key(PREFIX)) or 0)
    return bool(record == "completed" and after > before and worker.alive)


async def _finished(queue: Queue, task_id: str) -> str | None:
    status = await queue.redis.hget(queue.keys.task(task_id), "status")  # type: ignore[misc]
    return str(status) if status in ("completed", "failed", "dead") else None


RELAY_CASES: dict[str, dict[str, str]] = {
    "status unknown": {"status": "exploded", "id": "t-unknown"},
    "no task id": {"status": "completed"},
    "no status": {"id": "t-nostatus"},
    "result not JSON": {"status": "completed", "id": "t-result", "result": "{not json"},
    "progress not a number": {"status": "processing", "id": "t-progress", "progress": "half"},
    "attempts not a number": {"status": "queued", "id": "t-attempts", "attempts": "x"},
    "id breaking the topic": {"status": "queued", "id": "a b\u0000c"},
}


async def _relay_cases(queue: Queue, updates: list[TaskUpdate]) -> list[Case]:
    cases = []
    for name, fields in RELAY_CASES.items():
        await queue.redis.xadd(queue.keys.events, fields)  # type: ignore[arg-type]
        probe = await queue.enqueue(WORK_TYPE, {"ms": 1})

        async def relayed(task_id: str = probe.id) -> bool:
            return any(u.task_id == task_id and u.status.value == "completed" for u in updates)

        alive = bool(await _until(relayed))
        bad_id = fields.get("id")
        leaked = any(u.task_id == bad_id for u in updates) if bad_id else False
        cases.append(Case("relay", name, "relayed as an update" if leaked else "skipped (logged)",
                          handled=not leaked, consumer_alive=alive))
    return cases


EVENT_CASES: dict[str, dict[str, str | bytes]] = {
    "body not JSON": {DATA_KEY: b"\x00\xffnot json"},
    "no body field": {"something": "else"},
    "JSON, not an event": {DATA_KEY: json.dumps([1, 2, 3])},
    "event without a type": {DATA_KEY: json.dumps({"id": "e1", "source": "x", "data": {"n": 1}})},
    "payload of the wrong type": {DATA_KEY: json.dumps({"id": "e2", "type": EVENT, "source": "x",
                                                        "data": {"n": "seven"}})},
    "unknown event type": {DATA_KEY: json.dumps({"id": "e3", "type": "no.such", "source": "x", "data": {}})},
}


async def _event_cases(redis: Any, publisher: EventBus, subscriber: EventBus, got: list[int]) -> list[Case]:
    cases = []
    log = EventKeys(PREFIX).log
    for n, (name, fields) in enumerate(EVENT_CASES.items()):
        dead_before = len(await subscriber.dead_letters(1000))
        await redis.xadd(log, fields)
        await publisher.publish(EVENT, {"n": n})

        async def arrived(n: int = n) -> bool:
            return n in got

        alive = bool(await _until(arrived))

        async def new_dead(before: int = dead_before) -> Any:
            dead = await subscriber.dead_letters(1000)
            return dead[before:] if len(dead) > before else None

        dead = await _until(new_dead, 3.0) or []
        reason = dead[0].reason.splitlines()[0][:200] if dead else None
        cases.append(Case("events", name, f"dead: {reason}" if reason else "not dead-lettered",
                          handled=reason is not None, consumer_alive=alive))
    return cases


async def run_malformed(*, progress: Any = None) -> MalformedSummary:
    say = progress or (lambda text: None)
    logs = Path(tempfile.mkdtemp(prefix="meetmesh-chaos-malformed-"))
    summary = MalformedSummary()
    async with PrivateRedis() as server:
        redis = await connect(server.url)
        queue = Queue(QUEUE, redis, prefix=PREFIX, max_retries=0)
        env = children.child_env(server.url, PREFIX)
        worker = children.worker(QUEUE, env, logs / "worker.log", concurrency=4, lease=1.0, max_retries=0)
        events = EventBus.from_url(server.url, service="chaos-relay", prefix=PREFIX)
        subscriber = EventBus.from_url(server.url, service="chaos-sub", prefix=PREFIX, ack_wait=2.0,
                                       max_attempts=1)
        got: list[int] = []

        async def on_tick(event: Event[Any]) -> None:
            got.append(event.data.n)

        subscriber.subscribe(EVENT, on_tick)
        dispatcher = Dispatcher(redis, events=events, routes={WORK_TYPE: QUEUE}, prefix=PREFIX)
        updates: list[TaskUpdate] = []
        assert dispatcher.relay is not None
        dispatcher.relay.local = updates.append
        running: asyncio.Task[None] | None = None
        try:
            await registered(queue, worker)
            members = await redis.zrange(queue.keys.workers, 0, -1)
            worker_id = next(m for m in members if f":{worker.pid}:" in m)
            await events.start()
            await subscriber.start()
            running = asyncio.create_task(dispatcher.run())
            await asyncio.wait_for(dispatcher.ready.wait(), WAIT)
            summary.cases += await _worker_cases(queue, worker, worker_id)
            say(f"worker: {sum(c.handled and c.consumer_alive for c in summary.cases)} of "
                f"{len(summary.cases)} cases held")
            summary.cases += await _relay_cases(queue, updates)
            summary.cases += await _event_cases(redis, events, subscriber, got)
        finally:
            dispatcher.stop()
            if running is not None:
                await asyncio.gather(running, return_exceptions=True)
            await subscriber.stop()
            await events.stop()
            if not worker.alive:
                say(f"the worker died:\n{worker.tail()}")
            await worker.terminate(10)
            await redis.aclose()
    children.tidy(logs, summary.ok, say)
    return summary
