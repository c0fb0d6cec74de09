"""Per-user limits in Redis (`UserLimits`): the submission bucket, socket slots that age out, queued
tasks given back lazily, and two instances (two gateways) sharing one Redis. Counts, not timings:
rates are set so low that no refill can happen during a test."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.task_routes import TASK_ROUTES
from shared.bus import InvalidMessage, LimitExceeded, LimitKeys, UserLimits
from shared.bus.dispatch.dispatcher import Dispatcher

SLOW = 0.001  # tokens a second: nothing refills within a test


def make(redis: Any, key_prefix: str, **options: Any) -> UserLimits:
    options = {"submit_rate": SLOW, "submit_burst": 5, "max_sockets": 2, "max_queued_tasks": None, **options}
    return UserLimits(redis, prefix=key_prefix, **options)


async def admitted(limits: UserLimits, user: str, n: int = 1) -> bool:
    try:
        await limits.admit(user, [f"ai.{time.perf_counter_ns()}-{i}" for i in range(n)])
    except LimitExceeded:
        return False
    return True


async def test_two_instances_share_one_bucket_per_user(redis: Any, key_prefix: str) -> None:
    one, two = make(redis, key_prefix), make(redis, key_prefix)
    answers = [await admitted(one if n % 2 else two, "alice") for n in range(20)]
    assert answers.count(True) == 5 and answers.count(False) == 15  # the burst, not twice it
    assert answers[:5] == [True] * 5
    assert await admitted(one, "bob")  # every user has their own bucket
    with pytest.raises(LimitExceeded) as refused:
        await one.admit("alice", ["ai.x"])
    assert refused.value.limit == "submit_rate" and refused.value.retry_after > 100  # 1 token at 0.001/s


async def test_a_refused_cost_spends_nothing_and_a_batch_costs_its_size(redis: Any, key_prefix: str) -> None:
    limits = make(redis, key_prefix)
    assert await admitted(limits, "alice", 3)
    assert not await admitted(limits, "alice", 3)  # 2 left: refused whole
    assert await admitted(limits, "alice", 2)
    assert not await admitted(limits, "alice", 1)
    with pytest.raises(InvalidMessage, match="burst"):
        await limits.admit("alice", [f"ai.{i}" for i in range(6)])


async def test_the_bucket_refills_at_its_rate(redis: Any, key_prefix: str) -> None:
    limits = make(redis, key_prefix, submit_rate=50.0, submit_burst=1)
    assert await admitted(limits, "alice")
    with pytest.raises(LimitExceeded) as refused:
        await limits.admit("alice", ["ai.x"])
    assert 0 < refused.value.retry_after <= 0.02 + 1e-9
    deadline = time.monotonic() + 10
    while not await admitted(limits, "alice"):  # refilled, sooner or later: no timing asserted
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_socket_slots_are_shared_and_given_back(redis: Any, key_prefix: str) -> None:
    one, two = make(redis, key_prefix), make(redis, key_prefix)
    a = await one.open_socket("alice")
    await two.open_socket("alice")
    with pytest.raises(LimitExceeded) as refused:
        await one.open_socket("alice")
    assert refused.value.limit == "sockets" and refused.value.retry_after > 0
    await one.open_socket("bob")
    await one.close_socket("alice", a)
    await one.open_socket("alice")
    assert one.open_sockets == 2 and two.open_sockets == 1
    assert await redis.zcard(LimitKeys("alice", key_prefix).sockets) == 2


async def test_a_killed_gateways_sockets_age_out_unless_renewed(redis: Any, key_prefix: str) -> None:
    killed = make(redis, key_prefix, socket_ttl=0.5)
    alive = make(redis, key_prefix, socket_ttl=0.5)
    await killed.open_socket("alice")  # its process dies: no close, no renewal
    await alive.open_socket("alice")
    with pytest.raises(LimitExceeded):
        await alive.open_socket("alice")
    deadline = time.monotonic() + 15
    while True:
        assert await alive.renew_sockets() == 1  # the live one keeps its slot
        try:
            await alive.open_socket("alice")
            break
        except LimitExceeded:
            assert time.monotonic() < deadline, "the killed gateway's socket never aged out"
            await asyncio.sleep(0.05)
    assert await redis.zcard(LimitKeys("alice", key_prefix).sockets) == 2


async def test_queued_tasks_are_held_until_they_finish(redis: Any, key_prefix: str) -> None:
    limits = make(redis, key_prefix, submit_rate=None, max_queued_tasks=3)
    d = Dispatcher(redis, routes=TASK_ROUTES, prefix=key_prefix, admission=limits)
    held = LimitKeys("alice", key_prefix)
    keyed = await d.submit(owner="alice", type="ai.chat", dedupe_key="k")
    # A dedupe hit answers a task already held: the id it was given is handed back.
    assert not (await d.submit(owner="alice", type="ai.chat", dedupe_key="k")).created
    assert await redis.zrange(held.tasks, 0, -1) == [keyed.task_id]
    more = [await d.submit(owner="alice", type="ai.chat") for _ in range(2)]
    with pytest.raises(LimitExceeded) as refused:
        await d.submit(owner="alice", type="ai.chat")
    assert refused.value.limit == "queued_tasks" and refused.value.retry_after > 0
    assert (await d.submit(owner="bob", type="ai.chat")).created  # bob's count is his own
    await d.cancel(keyed.task_id)  # finished: its slot comes back at the next sweep
    await redis.delete(held.swept)  # as if a sweep period had passed
    assert (await d.submit(owner="alice", type="ai.chat")).created
    # Refused batches take nothing; the records of tasks that are gone count as finished.
    with pytest.raises(LimitExceeded):
        await d.submit_batch(owner="alice", items=[{"type": "ai.chat"}])
    assert await redis.zcard(held.tasks) == 3
    await redis.delete(d.queues["ai"].keys.task(more[0].task_id))
    await redis.delete(held.swept)
    assert (await d.submit_batch(owner="alice", items=[{"type": "ai.chat"}]))[0].created
    assert await d.unfinished([more[1].task_id, keyed.task_id, "nowhere.x"]) == [True, False, False]


async def test_a_user_at_the_limit_is_swept_at_most_once_a_period(redis: Any, key_prefix: str) -> None:
    limits = make(redis, key_prefix, submit_rate=None, max_queued_tasks=1, sweep_every=3600)
    calls: list[int] = []

    async def unfinished(ids: Any) -> list[bool]:
        calls.append(len(ids))
        return [True] * len(ids)

    await limits.admit("alice", ["ai.1"], unfinished)
    for _ in range(5):
        with pytest.raises(LimitExceeded):
            await limits.admit("alice", ["ai.2"], unfinished)
    assert calls == [1]  # one status read, not one per refusal


def test_user_ids_cannot_break_the_hash_tag() -> None:
    plain, odd = LimitKeys("alice", "mm"), LimitKeys("a}b{c", "mm")
    assert plain.submit == "mm:{_limits:alice}:submit"
    assert "}" not in odd.tag.split("{", 1)[1][:-1] and odd.tag.startswith("mm:{_limits:h:")
    for keys in (plain, odd):  # every key of a user shares its tag: one Cluster slot
        assert {k.split("}")[0] for k in (keys.submit, keys.sockets, keys.tasks, keys.swept)} == {
            keys.tag.split("}")[0]}
