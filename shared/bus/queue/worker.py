"""The worker: leases messages in batches, runs their handlers, settles outcomes in batches.

One fetch loop leases up to the free capacity per round trip; when the queue runs dry the worker
registers as idle and blocks on its inbox list, where the next enqueue pushes a message already
leased to it (one hop, like a bare BLPOP). Each message runs in its own task; outcomes are
group-committed by one settle loop (a settle round trip carries everything that finished while
the previous one was in flight); one renew loop extends every held lease and heartbeats. A pub/sub
subscription delivers cancel requests for running tasks.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import random
import signal
import socket
import traceback
from collections.abc import Mapping
from typing import Any

from pydantic_core import PydanticSerializationError

from ..errors import BusConnectionError, RateLimited, Reject, Retry
from .handlers import Context, Handler, Router
from .leases import MAX_DEQUEUE, Delivery
from .limiter import AdaptiveLimiter
from .queue import Queue, dumps

log = logging.getLogger("meetmesh.worker")
TRACEBACK_LIMIT = 8192
COALESCE_SECONDS = 0.001  # a free slot or a finished outcome waits at most this long for company
SETTLE_BATCH = 32  # outcomes worth a round trip of their own without waiting


def _error(code: str, message: str, tb: str | None = None) -> str:
    return dumps({"code": code, "message": message, "traceback": tb})


class Worker:
    """Runs the handlers of one queue. ``await worker.run()`` until ``worker.stop()`` (or SIGTERM)."""

    def __init__(self, queue: Queue, handlers: Mapping[str, Handler], *, concurrency: int = 100,
                 limiter: AdaptiveLimiter | None = None, lease_seconds: float | None = None,
                 grace_seconds: float = 30.0, poll_seconds: float = 1.0, batch: int = 200,
                 name: str | None = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.queue = queue
        self.handlers = handlers if isinstance(handlers, Router) else Router(handlers)
        self.concurrency = concurrency
        self.limiter = limiter
        self.lease_seconds = lease_seconds or queue.lease_seconds
        self.grace_seconds = grace_seconds
        self.poll_seconds = poll_seconds
        self.batch = min(batch, MAX_DEQUEUE)
        self.id = name or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(2).hex()}"
        self.processed = 0
        self.failed = 0
        self._running: dict[str, asyncio.Task[None]] = {}
        self._held: dict[str, str] = {}  # id -> delivery token, until settled
        self._dropped: set[str] = set()  # cancelled by request or lease lost: settle nothing
        self._releasing: set[str] = set()  # interrupted by shutdown: release the lease
        self._expired: set[str] = set()  # cancelled by their timeout: a failed attempt
        self._async: dict[str, bool] = {}  # message type -> is its handler a coroutine function
        self._pending: list[Any] = []  # flat settle entries
        self._slot = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._settle_now = asyncio.Event()
        self._stopping = False
        self._started = False
        self._nudge: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop taking messages; ``run()`` then waits for running ones (up to the grace period)."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_event.set()
        self._slot.set()
        if self._started:  # unblock the inbox wait at once
            self._nudge = asyncio.get_running_loop().create_task(self.queue.nudge(self.id))

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def run(self) -> None:
        if self._started:
            raise RuntimeError("a Worker runs once")
        self._started = True
        pubsub = self.queue.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(**{self.queue.keys.control: self._on_control})
        helpers = [asyncio.create_task(c, name=f"worker-{n}") for n, c in (
            ("listen", self._listen(pubsub)), ("settle", self._settle_loop()), ("renew", self._renew_loop()))]
        log.info("worker %s consuming %r (concurrency %d)", self.id, self.queue.name, self.concurrency)
        try:
            await self._fetch_loop()
        finally:
            await self._drain()
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self._flush()
            try:
                for delivery in await self.queue.leave(self.id, self.lease_seconds):
                    self._held[delivery.id] = delivery.token
                    self._settle(delivery, "release")
                await self._flush()
                await self.queue.forget_worker(self.id)
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except Exception:  # shutting down anyway; leases will expire on their own
                log.warning("worker %s: could not deregister cleanly", self.id, exc_info=True)
            log.info("worker %s stopped (processed %d, failed %d)", self.id, self.processed, self.failed)

    async def _drain(self) -> None:
        self._stopping = True
        if self._running:
            _, pending = await asyncio.wait(list(self._running.values()), timeout=self.grace_seconds)
            for task in pending:
                self._releasing.add(task.get_name())
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # -- fetching -------------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        backoff = 0.05
        while not self._stopping:
            free = await self._free_slots()
            if free <= 0:
                continue
            try:
                await self._fetch(free)
                backoff = 0.05
            except BusConnectionError as exc:
                log.warning("worker %s: %s; retrying in %.2fs", self.id, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _free_slots(self) -> int:
        """Wait until a handler slot is free; returns how many are, reserved on the limiter if any."""
        while not self._stopping:
            free = min(self.concurrency - len(self._running), self.batch)
            if free <= 0:
                self._slot.clear()
                await self._slot.wait()
                continue
            if free < self.concurrency // 4:  # busy: let completions pile up, so one lease is a batch
                await asyncio.sleep(COALESCE_SECONDS)
                free = min(self.concurrency - len(self._running), self.batch)
            if self.limiter is None:
                return free
            granted = self.limiter.try_acquire(free)
            if granted == 0:
                if not await self._acquire_slot():
                    break
                granted = 1 + self.limiter.try_acquire(free - 1)
            return granted
        return 0

    async def _acquire_slot(self) -> bool:
        """Wait for one limiter slot; False (holding none) when the worker is stopped meanwhile."""
        assert self.limiter is not None
        acquire = asyncio.ensure_future(self.limiter.acquire())
        stopped = asyncio.ensure_future(self._stop_event.wait())
        await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not acquire.done():
            acquire.cancel()
            await asyncio.gather(acquire, return_exceptions=True)
        got = acquire.done() and not acquire.cancelled() and acquire.exception() is None
        if got and self._stopping:
            self.limiter.release()
            return False
        return got

    def _unreserve(self, n: int) -> None:
        if self.limiter and n > 0:
            self.limiter.release(n)

    async def _fetch(self, free: int) -> None:
        """Lease up to ``free`` reserved slots' worth and start them; slots not taken go back at
        once. When the queue is dry, wait (holding no slot) for a hand-off."""
        idle_seconds = self.poll_seconds + 0.5  # outlives one inbox wait, not much more
        acks, self._pending = self._pending, []  # finished outcomes ride along
        answered, got, due = False, 0, None  # the script's answer: whether it came, deliveries, due in

        def leased(deliveries: list[Delivery], due_in: float | None) -> None:
            nonlocal answered, got, due
            answered, got, due = True, len(deliveries), due_in
            self._settled(acks)
            started = sum(self._start(d) for d in deliveries)
            self._unreserve(free - started)

        handed: Delivery | None = None
        try:
            if self._stopping:
                leased(*await self.queue.dequeue(free, self.id, self.lease_seconds, idle_seconds,
                                                 settle=acks))
            else:  # the inbox wait rides in the same round trip; cut short if there is no room
                handed, cut = await self.queue.dequeue_then_wait(
                    free, self.id, self.lease_seconds, idle_seconds, acks, self.poll_seconds, leased)
                if cut and got < free:  # something falls due before the poll would end
                    timeout = self.poll_seconds if due is None else min(self.poll_seconds, due)
                    handed = await self.queue.wait_inbox(self.id, max(timeout, 0.001))
        except BaseException:
            if not answered:
                self._pending = acks + self._pending  # kept for the next try (a repeat is fenced off)
                self._unreserve(free)
            raise
        if handed is not None:
            await self._start_handed(handed)
        await asyncio.sleep(0)  # handlers start before our next round trip (so the next lease is a batch)

    async def _start_handed(self, delivery: Delivery) -> None:
        """Run a message handed to our inbox (already leased to us) once a limiter slot is ours."""
        if self.limiter and not self.limiter.try_acquire() and not await self._acquire_slot():
            self._settle(delivery, "release")  # stopping: let another worker take it at once
            return
        if not self._start(delivery):
            self._unreserve(1)

    def _start(self, delivery: Delivery) -> bool:
        """Run a delivery's handler; True when a handler task (which holds a slot) was started."""
        held = self._held.get(delivery.id)
        if held is not None and int(held) >= int(delivery.token):
            return False  # this delivery, or a newer one, is already ours
        old = self._running.get(delivery.id)
        if old is not None:  # its lease was reclaimed and it came back to us: the old run is void
            old.cancel()  # its _done sees a newer token held and settles nothing
        self._held[delivery.id] = delivery.token
        if delivery.message is None:  # unparseable body: bury it with the reason, keep going
            self._settle(delivery, "fail", _error("malformed", delivery.error or "malformed message"), "dead")
            return False
        task = asyncio.create_task(self._execute(delivery), name=delivery.id)
        self._running[delivery.id] = task
        task.add_done_callback(functools.partial(self._done, delivery))
        return True

    def _done(self, delivery: Delivery, task: asyncio.Task[None]) -> None:
        """Bookkeeping for every way a run ends, including a cancel that lands before it starts."""
        if self._running.get(delivery.id) is task:
            del self._running[delivery.id]
        if self.limiter:
            self.limiter.release()
        self._slot.set()
        if task.cancelled():
            if delivery.id in self._releasing:
                self._settle(delivery, "release")
            else:  # cancelled by request, lease lost, or superseded: nothing to settle
                self._forget(delivery.id, delivery.token)

    def _on_control(self, message: Any) -> None:
        task_id = message["data"]
        task = self._running.get(task_id)
        if task is not None:
            self._dropped.add(task_id)
            task.cancel()

    async def _listen(self, pubsub: Any) -> None:
        while True:
            try:
                await pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection lost: the fetch loop still polls; resubscribe
                log.warning("worker %s: pub/sub error %s; resubscribing", self.id, exc)
                await asyncio.sleep(0.5)
                try:
                    await pubsub.connect()
                except Exception:
                    continue

    # -- running --------------------------------------------------------------------------------

    async def _execute(self, delivery: Delivery) -> None:
        message = delivery.message
        assert message is not None
        ctx = Context(self.queue, message, delivery.token, self.id)
        timeout = message.timeout or self.queue.timeout
        # A plain timer rather than asyncio.timeout(): a third of the cost, on every message.
        loop = asyncio.get_running_loop()
        timer = loop.call_at(loop.time() + timeout, self._expire, delivery.id)
        try:
            handler = self.handlers.get(message.type)
            if handler is None:
                raise Reject(f"no handler for message type {message.type!r} on queue {self.queue.name!r}")
            if self._is_async(message.type, handler):
                result = await handler(ctx)
            else:
                result = await asyncio.to_thread(handler, ctx)
                if inspect.isawaitable(result):
                    result = await result
        except asyncio.CancelledError:
            if delivery.id not in self._expired:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            self._failure(delivery, "timeout", f"handler exceeded its timeout of {timeout}s", None)
        except Reject as exc:
            self._settle(delivery, "fail", _error("rejected", exc.reason), "failed")
        except Retry as exc:
            if isinstance(exc, RateLimited) and self.limiter:
                self.limiter.report_rate_limited()
            self._failure(delivery, "retry", exc.reason, None, exc.delay)
        except Exception as exc:
            tb = traceback.format_exc()[-TRACEBACK_LIMIT:]
            self._failure(delivery, type(exc).__name__, str(exc) or repr(exc), tb)
        else:
            if ctx._limited and self.limiter:
                self.limiter.report_rate_limited()
            self._success(delivery, ctx, result)
        finally:
            timer.cancel()
            self._expired.discard(delivery.id)

    def _expire(self, task_id: str) -> None:
        task = self._running.get(task_id)
        if task is not None and task_id not in self._dropped and task_id not in self._releasing:
            self._expired.add(task_id)
            task.cancel()

    def _is_async(self, type: str, handler: Handler) -> bool:
        known = self._async.get(type)
        if known is None:
            known = self._async[type] = inspect.iscoroutinefunction(handler)
        return known

    def _success(self, delivery: Delivery, ctx: Context, result: Any) -> None:
        try:
            body = "" if result is None else dumps(result)
        except PydanticSerializationError as exc:
            self._settle(delivery, "fail", _error("bad_result", f"result is not JSON-serialisable: {exc}"),
                         "failed")
            return
        self.processed += 1
        nxt = ctx.next_stage
        if nxt is None:
            self._settle(delivery, "done", body)
            return
        m = nxt.message
        retries = self.queue.max_retries if m.max_retries is None else m.max_retries
        meta = dumps({"type": m.type, "level": m.priority.level, "max_retries": retries,
                      "delay_ms": max(0, round(nxt.delay * 1000))})
        self._settle(delivery, "next", m.model_dump_json(exclude_none=True), meta)

    def _failure(self, delivery: Delivery, code: str, message: str, tb: str | None,
                 delay: float | None = None) -> None:
        self.failed += 1
        m = delivery.message
        assert m is not None
        max_retries = self.queue.max_retries if m.max_retries is None else m.max_retries
        error = _error(code, message, tb)
        if m.attempts <= max_retries:
            if delay is None:  # exponential backoff with full jitter
                cap = min(self.queue.retry_cap_seconds, self.queue.retry_base_seconds * 2 ** (m.attempts - 1))
                delay = random.uniform(0, cap)
            self._settle(delivery, "retry", error, str(round(delay * 1000)))
        else:
            self._settle(delivery, "fail", error, "timeout" if code == "timeout" else "dead")

    # -- settling and leases --------------------------------------------------------------------

    def _settle(self, delivery: Delivery, outcome: str, a: str = "", b: str = "") -> None:
        self._pending += (delivery.id, delivery.token, outcome, a, b)
        self._settle_now.set()

    def _forget(self, task_id: str, token: str | None = None) -> None:
        """Stop tracking a delivery (only ``token``'s, when given: a newer one may be held)."""
        if token is None or self._held.get(task_id) == token:
            self._held.pop(task_id, None)
            self._dropped.discard(task_id)

    async def _settle_loop(self) -> None:
        while True:
            await self._settle_now.wait()
            if len(self._pending) < 5 * SETTLE_BATCH and self._running:
                await asyncio.sleep(COALESCE_SECONDS)  # more outcomes are on their way: one trip
            self._settle_now.clear()
            await self._flush()

    async def _flush(self) -> None:
        """Settle everything pending; on a connection error keep it and try again (never drop an ack)."""
        delay = 0.05
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self.queue.settle(batch)
            except asyncio.CancelledError:  # keep it for the final flush (a repeat is fenced off)
                self._pending = batch + self._pending
                raise
            except BusConnectionError as exc:
                self._pending = batch + self._pending
                log.warning("worker %s: settle failed (%s); retrying in %.2fs", self.id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._settled(batch)

    def _settled(self, entries: list[Any]) -> None:
        for i in range(0, len(entries), 5):
            self._forget(entries[i], entries[i + 1])
            self._releasing.discard(entries[i])

    async def _renew_loop(self) -> None:
        interval = self.lease_seconds / 3
        while True:
            try:
                lost = await self.queue.renew(self.id, list(self._held.items()), self.lease_seconds)
            except BusConnectionError as exc:
                log.warning("worker %s: lease renewal failed: %s", self.id, exc)
                lost = []
            pending_ids = set(self._pending[0::5])
            for task_id in lost:
                if task_id in pending_ids:
                    continue  # settled meanwhile; the settle script decides
                task = self._running.get(task_id)
                if task is not None:
                    log.warning("worker %s: lost the lease of %s; cancelling its handler", self.id, task_id)
                    self._dropped.add(task_id)
                    task.cancel()
                else:
                    self._forget(task_id)
            await asyncio.sleep(interval)

