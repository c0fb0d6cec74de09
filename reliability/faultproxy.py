"""A TCP proxy that breaks the network between a client and a server on purpose.

Written by hand because what does this well elsewhere cannot run here: ``tc netem`` needs the kernel's
``sch_netem`` module, which this machine's kernel lacks ("Specified qdisc kind is unknown", even in a
network namespace of our own), and Toxiproxy is a Go server that is not in the registries we can reach.
What a scenario needs is small: put the proxy between one client (a worker) and Redis, and

- ``delay(seconds)``: every chunk is held that long in each direction, order kept (latency, not a
  bandwidth cap: chunks in flight overlap, as packets on a long link do);
- ``partition()`` / ``heal()``: nothing crosses in either direction, as when every packet is dropped;
  TCP would retransmit after the link comes back, so bytes are held and delivered on ``heal()``, and
  a client without its own timeouts simply waits (what a real dropped link does to it);
- ``reset()``: every open connection is aborted at once (a NAT or load balancer dropping them), so
  the client sees a connection error and must reconnect.

New connections are accepted during a partition and stall like the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from types import TracebackType


@dataclass
class ProxyCounters:
    connections: int = 0
    resets: int = 0
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client


class _Link:
    """One client connection and its upstream: two pumps, each a reader and a delayed writer."""

    def __init__(self, proxy: FaultProxy, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.proxy = proxy
        self.writers = (client[1], server[1])
        self.tasks = [asyncio.create_task(self._pump(client[0], server[1], up=True)),
                      asyncio.create_task(self._pump(server[0], client[1], up=False))]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, up: bool) -> None:
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, data = await held.get()
                if not data:
                    break
                wait = at + self.proxy.latency - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.proxy.open.wait()
                dst.write(data)
                await dst.drain()
                if up:
                    self.proxy.counters.bytes_up += len(data)
                else:
                    self.proxy.counters.bytes_down += len(data)
            with contextlib.suppress(OSError, RuntimeError):
                dst.write_eof()

        writer = asyncio.create_task(deliver())
        try:
            while data := await src.read(65536):
                held.put_nowait((loop.time(), data))
            held.put_nowait((loop.time(), b""))
            await writer
        except (ConnectionError, OSError):
            self.abort()
        finally:
            writer.cancel()

    def abort(self) -> None:
        for w in self.writers:
            w.transport.abort()


class FaultProxy:
    """``async with FaultProxy(target_port) as proxy``: clients connect to ``proxy.port``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.latency = 0.0
        self.open = asyncio.Event()
        self.open.set()
        self.counters = ProxyCounters()
        self.port = 0
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        await self.open.wait()  # a connection made during a partition waits for it to heal
        try:
            upstream = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(self, (reader, writer), upstream)
        self._links.add(link)
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            link.abort()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def delay(self, seconds: float) -> None:
        """Hold every chunk ``seconds`` in each direction from now on (0: no delay)."""
        self.latency = seconds

    def partition(self) -> None:
        """Let nothing through until ``heal()``."""
        self.open.clear()

    def heal(self) -> None:
        self.open.set()

    def reset(self) -> int:
        """Abort every open connection; how many there were."""
        links = list(self._links)
        for link in links:
            link.abort()
        self.counters.resets += len(links)
        return len(links)

    async def close(self) -> None:
        self.heal()
        self.reset()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
