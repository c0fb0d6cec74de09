"""Shared fixtures: every test gets its own Redis key prefix on the machine's real Redis, removed after."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from shared.bus import Queue, Router, Worker, connect

REDIS_URL = os.environ.get("MEETMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
# Outside development mode (MEETMESH_ENV=dev) settings refuse to start without a signing secret of
# 32+ bytes: the tests sign with this one. A test of start-up without a secret removes it.
TEST_JWT_SECRET = "tests-only-jwt-secret-not-for-any-deployment"
os.environ["MEETMESH_JWT_SECRET"] = TEST_JWT_SECRET
os.environ.pop("MEETMESH_JWT_SECRET_FILE", None)
os.environ.pop("MEETMESH_ENV", None)


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def key_prefix() -> str:
    """A prefix no other test (or test run) uses."""
    return f"mmtest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis(key_prefix: str) -> AsyncIterator[Any]:
    client = await connect(REDIS_URL)
    yield client
    async for key in client.scan_iter(match=f"{key_prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
def make_queue(redis: Any, key_prefix: str) -> Callable[..., Queue]:
    """Factory: ``make_queue("name", max_retries=1, ...)`` -> a Queue under this test's prefix."""

    def make(name: str = "q", **options: Any) -> Queue:
        return Queue(name, redis, prefix=key_prefix, **options)

    return make


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    """Run ``worker`` in the background for the block, then stop it gracefully."""
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture
def run_worker() -> Callable[..., contextlib.AbstractAsyncContextManager[Worker]]:
    """``async with run_worker(queue, router, concurrency=4) as worker: ...``"""

    def start(queue: Queue, handlers: Router | dict[str, Any], **options: Any) -> Any:
        return running(Worker(queue, handlers, **options))

    return start
