"""The service runner: one process that consumes its priority queue, handles and publishes events,
and serves its REST, built only on `shared.bus`'s public API.

A service module (``services/<name>/service.py``) has ``build(settings) -> Service``; then both
``python -m services.<name>`` and ``meetmesh service <name>`` run it (`main`). Starting connects
Redis, the SQL store (creating missing tables, its outbox's too) and the event bus, starts the outbox
relay, runs the ``on_start`` hooks, then the worker and the HTTP server; SIGTERM or SIGINT stops it
gracefully in the reverse order: the HTTP server stops taking requests, the worker finishes its
running tasks (``MEETMESH_GRACE_SECONDS``), the relay publishes what it can, then the event bus,
Redis and the database close.

Durable events go through the service's transactional outbox (`outbox`): staged in the transaction
of the change they report (``stage_event``), published by the relay once committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import uvicorn
from fastapi import APIRouter, FastAPI
from redis.asyncio import Redis
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncSession

from shared.bus import (
    AdaptiveLimiter,
    BusConnectionError,
    BusError,
    Event,
    EventBus,
    Handler,
    Queue,
    Router,
    Worker,
    connect,
    make_event,
)
from shared.bus.redact import install as install_redaction

from .api import service_app
from .db import Database
from .errors import ServiceError, Unavailable
from .outbox import Outbox, OutboxRelay
from .settings import ServiceSettings

log = logging.getLogger(__name__)
EventHandler = Callable[[Event[Any]], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]
R = TypeVar("R")


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handlers: the `Service` owns SIGTERM (uvicorn would re-raise it
    after its own shutdown, killing the process before the worker drained)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Service:
    """One MeetMesh service. ``name`` names its queue (unless ``queue`` says otherwise), its event
    consumer group and its port (``MEETMESH_<NAME>_PORT``; ``port=0`` takes any free one).

    ``router``: task handlers for its queue. ``routers``: its REST, served with ``/health`` and
    ``/ready`` (those are served without any).
    ``metadata``: its tables, created at start. ``queue_options`` go to its `Queue`.
    Subscribe to events with ``@service.subscribe("user.*")``; run code once connected with
    ``@service.on_start``. After ``start()``: ``redis``, ``events``, ``database``, ``url``.
    Publish durable events with ``stage_event`` (in a change's transaction) or ``emit_event``;
    ``outbox`` is its outbox table, ``relay`` the task publishing it.
    """

    def __init__(self, name: str, settings: ServiceSettings | None = None, *,
                 router: Mapping[str, Handler] | None = None, routers: Iterable[APIRouter] = (),
                 metadata: Iterable[MetaData] = (), queue: str | None = None, port: int | None = None,
                 queue_options: Mapping[str, Any] | None = None,
                 limiter: AdaptiveLimiter | None = None) -> None:
        self.name = name
        self.settings = settings or ServiceSettings.load()
        self.router = router if router is None or isinstance(router, Router) else Router(router)
        self.routers = list(routers)
        self.metadata = list(metadata)
        self.queue_name = queue or name
        self.port = self.settings.port_for(name) if port is None else port
        self.queue_options = dict(queue_options or {})
        self.limiter = limiter  # bounds the worker's concurrency (AIMD), e.g. in front of edge calls
        self.outbox = Outbox(name)
        self.relay = OutboxRelay(self.outbox)
        self.url: str | None = None
        self.worker: Worker | None = None
        self._app: FastAPI | None = None
        self._subscriptions: list[tuple[str, EventHandler]] = []
        self._on_start: list[Hook] = []
        self._on_stop: list[Hook] = []
        self._redis: Redis | None = None
        self._events: EventBus | None = None
        self._database: Database | None = None
        self._server: _Server | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self._started = False

    def __repr__(self) -> str:
        return f"Service({self.name!r}, queue={self.queue_name!r}, url={self.url!r})"

    # -- declaring --------------------------------------------------------------------------------

    def subscribe(self, pattern: str) -> Callable[[EventHandler], EventHandler]:
        """``@service.subscribe("user.registered")``: handle those events, once per service."""

        def register(fn: EventHandler) -> EventHandler:
            self._subscriptions.append((pattern, fn))
            return fn

        return register

    def add_routes(self, router: APIRouter) -> None:
        """Serve ``router``'s REST too (before ``start()``)."""
        if self._app is not None:
            raise RuntimeError(f"service {self.name}: add routes before its HTTP app is built")
        self.routers.append(router)

    @property
    def app(self) -> FastAPI:
        """The HTTP app: the routes added, ``/health`` and ``/ready``; built on first use."""
        if self._app is None:
            self._app = service_app(self, self.routers)
        return self._app

    def on_start(self, fn: Hook) -> Hook:
        """``@service.on_start``: run once connected (store, Redis, events), before work is taken."""
        self._on_start.append(fn)
        return fn

    def on_stop(self, fn: Hook) -> Hook:
        """``@service.on_stop``: run at stop, once requests and running tasks are done, before the
        connections close; each runs even if one before it failed."""
        self._on_stop.append(fn)
        return fn

    # -- resources --------------------------------------------------------------------------------

    @property
    def redis(self) -> Redis:
        return _started(self._redis, self.name)

    @property
    def events(self) -> EventBus:
        return _started(self._events, self.name)

    @property
    def database(self) -> Database:
        return _started(self._database, self.name)

    async def stage_event(self, session: AsyncSession, type: str, data: Any, *,
                          traceparent: str | None = None) -> Event[Any]:
        """Stage durable catalogue event ``type`` in ``session``'s open transaction, before its commit:
        the relay publishes it once that commits (at least once, under the id returned), and never if
        it rolls back. Data that does not fit the catalogue raises `InvalidMessage` here, before
        anything is committed: that is a bug to see."""
        return await self.outbox.add(session, type, data, traceparent=traceparent)

    async def emit_event(self, type: str, data: Any, *, traceparent: str | None = None) -> Event[Any]:
        """A durable event that reports no SQL change (a task done, a task queued in Redis): staged
        in a short transaction of its own, so a broker outage does not lose it.

        If the store is unreachable the event is published directly instead, and if the broker is
        too, that is logged, not raised: failing the request (or retrying the task) would only make
        its caller repeat what is done. `InvalidMessage` for data that does not fit the catalogue.
        """
        staged = make_event(type, data, source=self.name, traceparent=traceparent)
        try:
            async with self.database.session() as session:
                await self.outbox.add_event(session, staged)
                await session.commit()
            return staged
        except Unavailable as exc:
            log.warning("service %s: %s not staged (%s): publishing it directly", self.name, type, exc)
        try:
            await self.events.publish_event(staged)
        except BusConnectionError as exc:
            log.error("service %s: %s is lost: the store and the broker are unreachable: %s",
                      self.name, type, exc)
        return staged

    async def broadcast(self, topic: str, event: str, data: Any) -> None:
        """Send a live update to ``topic``'s subscribers as ``{"event", "data"}`` (what the gateway
        turns into a client ``event`` frame). Best effort, not durable: an unreachable broker is
        logged, not raised."""
        try:
            await self.events.broadcast(topic, {"event": event, "data": data})
        except BusConnectionError as exc:
            log.error("service %s: could not broadcast %s on %s: %s", self.name, event, topic, exc)

    @property
    def worker_running(self) -> bool:
        task = self._tasks.get("worker")
        return self.router is None or (task is not None and not task.done())

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect everything, then take work: tasks from the queue, requests on the port."""
        if self._started:
            raise RuntimeError(f"service {self.name} is already started")
        self._started = True
        s = self.settings
        try:
            self._redis = await connect(s.redis_url)
            self._database = Database(s.database, schema=s.database_schema)
            await self._database.create_all(*self.metadata, self.outbox.metadata)
            self._events = EventBus.from_url(s.events, service=self.name, prefix=s.key_prefix)
            for pattern, handler in self._subscriptions:
                self._events.subscribe(pattern, handler)
            await self._events.start()
            self.relay.start(self._database, self._events)
            for hook in self._on_start:
                await hook()
            if self.router is not None:
                queue = Queue(self.queue_name, self._redis, prefix=s.key_prefix,
                              **{**s.retention, **self.queue_options})
                self.worker = Worker(queue, self.router, concurrency=s.worker_concurrency,
                                     grace_seconds=s.grace_seconds, name=None, limiter=self.limiter)
                self._tasks["worker"] = asyncio.create_task(self.worker.run(), name=f"{self.name}-worker")
            await self._serve(self.app)
        except BaseException:
            await self.stop()
            raise
        log.info("service %s ready: queue %r, events %s, %s", self.name, self.queue_name,
                 ", ".join(p for p, _ in self._subscriptions) or "none", self.url)

    async def _serve(self, app: FastAPI) -> None:
        host = self.settings.service_host
        # Bound here, not by uvicorn, which answers a taken port with sys.exit() from inside its task.
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, self.port))
        except OSError as exc:
            sock.close()
            raise ServiceError(f"the {self.name} service cannot listen on {host}:{self.port} "
                               f"(MEETMESH_{self.name.upper()}_PORT): {exc.strerror or exc}") from exc
        config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5)
        install_redaction(secrets=[self.settings.jwt_secret])  # again: uvicorn's Config set up its loggers
        server = self._server = _Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name=f"{self.name}-http")
        self._tasks["http"] = task
        while not server.started:
            if task.done():
                sock.close()
                task.result()
                raise ServiceError(f"the {self.name} service's HTTP server stopped at start")
            await asyncio.sleep(0.01)
        port = sock.getsockname()[1]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    async def stop(self) -> None:
        """Stop taking requests and tasks, let running tasks finish, then close the connections."""
        if self._server is not None:
            self._server.should_exit = True
        if self.worker is not None:
            self.worker.stop()
        for name in ("http", "worker"):
            task = self._tasks.pop(name, None)
            if task is not None:
                results = await asyncio.gather(task, return_exceptions=True)
                if isinstance(results[0], Exception):
                    log.error("service %s: %s ended with %r", self.name, name, results[0])
        for hook in self._on_stop:
            try:
                await hook()
            except Exception:
                log.exception("service %s: a stop hook failed", self.name)
        await self.relay.stop()
        if self._events is not None:
            await self._events.stop()
        if self._redis is not None:
            await self._redis.aclose()
        if self._database is not None:
            await self._database.dispose()
        self._server = None

    def request_stop(self) -> None:
        """Ask ``run()`` to stop gracefully (what SIGTERM and SIGINT do)."""
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or ``request_stop()``), then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        worker = self._tasks.get("worker")
        waits = [asyncio.ensure_future(self._stop.wait())] + ([worker] if worker else [])
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if worker is not None and worker.done() and not self._stop.is_set():
            log.error("service %s: the worker stopped unexpectedly; stopping", self.name)
        log.info("service %s stopping", self.name)
        await self.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Service]:
        """``async with service.running():`` started for the block (tests, embedding)."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()


def _started(resource: R | None, name: str) -> R:
    if resource is None:
        raise RuntimeError(f"service {name} is not started: call `await service.start()`")
    return resource


def load(name: str) -> Callable[[ServiceSettings], Service]:
    """``build`` of ``services.<name>.service``; `ServiceError` saying which services exist if none."""
    if not name.isidentifier() or name.startswith("_"):
        raise ServiceError(f"invalid service name {name!r}")
    try:
        module = importlib.import_module(f"services.{name}.service")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"services.{name}", f"services.{name}.service"):
            raise
        raise ServiceError(f"no service {name!r}: services/{name}/service.py with build(settings) "
                           "is what `meetmesh service NAME` runs") from None
    build: Callable[[ServiceSettings], Service] = module.build
    return build


def main(name: str, *, port: int | None = None) -> None:
    """Run service ``name`` until SIGTERM/SIGINT: ``python -m services.NAME``, ``meetmesh service NAME``."""
    try:
        settings = ServiceSettings.load()
        logging.basicConfig(level=settings.log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        install_redaction(secrets=[settings.jwt_secret])  # no token or secret in any log line
        service = load(name)(settings)
        if port is not None:
            service.port = port
    except (BusError, ServiceError) as exc:
        sys.exit(f"meetmesh service {name}: {exc}")
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    try:
        asyncio.run(service.run())
    except (BusError, ServiceError) as exc:
        sys.exit(f"meetmesh service {name}: {exc}")
