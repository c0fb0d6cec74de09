"""Dedupe keys scoped to their owner (the default) or shared by a queue ("queue" scope), and the
dispatcher never answering a user with another user's task, whatever the queue's scope."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway.task_routes import TASK_ROUTES
from shared.bus import InvalidMessage, Queue, TaskStatus
from shared.bus.dispatch.dispatcher import Dispatcher
from shared.bus.keys import dedupe_suffix

MakeQueue = Callable[..., Queue]


def test_scoped_keys_cannot_collide_across_owners() -> None:
    # The owner's length comes first: "a:b" + "c" and "a" + "b:c" are different keys.
    assert dedupe_suffix("c", "a:b") != dedupe_suffix("b:c", "a")
    assert dedupe_suffix("k", "alice") == "5:alice:k"
    assert dedupe_suffix("k", None) == dedupe_suffix("k", "") == "0::k"
    assert dedupe_suffix("k", "alice", "queue") == "k"


async def test_two_owners_same_key_are_two_tasks_one_owner_is_one(make_queue: MakeQueue, redis: Any) -> None:
    queue = make_queue()
    alice = await queue.enqueue("t", {"n": 1}, owner="alice", dedupe_key="summary")
    bob = await queue.enqueue("t", {"n": 2}, owner="bob", dedupe_key="summary")
    again = await queue.enqueue("t", {"n": 3}, owner="alice", dedupe_key="summary")
    assert alice.created and bob.created and bob.id != alice.id
    assert (again.created, again.id) == (False, alice.id)
    assert (await queue.stats()).ready == 2
    # The Redis key holds the owner, in the queue's hash tag (one Cluster slot with the queue).
    key = queue.keys.dedupe("summary", "alice")
    assert key.startswith(queue.keys.tag + ":") and await redis.get(key) == alice.id
    assert await redis.get(queue.keys.dedupe("summary", "bob")) == bob.id
    assert await redis.get(queue.keys.dedupe_prefix + "summary") is None  # nothing shared


async def test_queue_scope_shares_keys_between_producers(make_queue: MakeQueue, redis: Any) -> None:
    queue = make_queue(dedupe_scope="queue")
    first = await queue.enqueue("t", owner="scheduler", dedupe_key="tick:1")
    second = await queue.enqueue("t", owner="other-service", dedupe_key="tick:1")
    assert first.created and (second.created, second.id) == (False, first.id)
    assert await redis.get(queue.keys.dedupe("tick:1", scope="queue")) == first.id


def test_an_unknown_scope_is_refused(make_queue: MakeQueue) -> None:
    with pytest.raises(ValueError, match="dedupe_scope"):
        make_queue(dedupe_scope="user")


async def test_dispatcher_two_owners_same_key_never_share_a_task(redis: Any, key_prefix: str) -> None:
    d = Dispatcher(redis, routes=TASK_ROUTES, prefix=key_prefix)
    alice = await d.submit(owner="alice", type="ai.summarize", dedupe_key="sum:m1", timeout_s=30)
    bob = await d.submit(owner="bob", type="ai.summarize", dedupe_key="sum:m1", timeout_s=30)
    assert alice.created and bob.created and bob.task_id != alice.task_id
    assert (await d.get(bob.task_id)).owner == "bob"
    again = await d.submit(owner="alice", type="ai.summarize", dedupe_key="sum:m1")
    assert (again.created, again.task_id) == (False, alice.task_id)
    # A batch takes the same path: bob's item is his own task, alice's the one she has.
    batch = await d.submit_batch(owner="bob", items=[{"type": "ai.summarize", "dedupe_key": "sum:m1"}])
    assert (batch[0].created, batch[0].task_id) == (False, bob.task_id)
    batch = await d.submit_batch(owner="carol", items=[{"type": "ai.summarize", "dedupe_key": "sum:m1"}])
    assert batch[0].created and batch[0].task_id not in (alice.task_id, bob.task_id)


async def test_dispatcher_on_shared_keys_refuses_a_hit_on_another_owners_task(
    redis: Any, key_prefix: str
) -> None:
    d = Dispatcher(redis, routes=TASK_ROUTES, prefix=key_prefix, queue_options={"dedupe_scope": "queue"})
    alice = await d.submit(owner="alice", type="ai.summarize", dedupe_key="sum:m1", timeout_s=30)
    with pytest.raises(InvalidMessage, match="not yours") as refused:
        await d.submit(owner="bob", type="ai.summarize", dedupe_key="sum:m1")
    assert alice.task_id not in str(refused.value)  # nothing of her task is told
    with pytest.raises(InvalidMessage, match=r"not yours \(batch item 1\)"):
        await d.submit_batch(owner="bob", items=[{"type": "ai.chat"},
                                                 {"type": "ai.summarize", "dedupe_key": "sum:m1"}])
    # Her own hit is answered as before; her task was left alone.
    again = await d.submit(owner="alice", type="ai.summarize", dedupe_key="sum:m1")
    assert (again.created, again.task_id, again.status) == (False, alice.task_id, TaskStatus.QUEUED)
    # A hit whose record is gone cannot be shown to be anyone's: refused too.
    await redis.delete(d.queues["ai"].keys.task(alice.task_id))
    with pytest.raises(InvalidMessage, match="not yours"):
        await d.submit(owner="alice", type="ai.summarize", dedupe_key="sum:m1")
