"""StackFlow over TCP: newline-delimited JSON, one request or reply per line, both ways.

`StackFlowServer` lets StackFlow's own clients drive a node's units (setup, streamed inference,
exit on one connection); `StackFlowBackend` lets an `EdgeBridge` use a StackFlow / Edge-LLM-Infra
unit manager at ``host:port`` (10001 by default) as one more node of its pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from .edge import LinkDown
from .errors import BusConnectionError
from .stackflow import ErrorCode, StackFlowError, dumps

if TYPE_CHECKING:
    from .edge import EdgeBridge

log = logging.getLogger("meetmesh.edge.tcp")
DEFAULT_PORT = 10001
MAX_LINE = 1 << 20  # bytes; a longer line is answered with -2 and the connection closed
_connections = itertools.count(1)


class UnitHandler(Protocol):
    """What the server serves: `EdgeUnits` (one raw request in; replies through ``send``)."""

    async def handle(self, raw: bytes | str, send: Callable[[dict[str, Any]], Awaitable[None]], *,
                     origin: str = "") -> None: ...

    def cancel(self, origin: str, request_id: str | None = None) -> int: ...


class StackFlowServer:
    """Serves ``units`` to StackFlow TCP clients at ``host:port`` (port 0: any free port, see `port`).

    Each connection is one origin: when it closes, the inferences it started are stopped."""

    def __init__(self, units: UnitHandler, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self.units, self.host, self.port = units, host, port
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen (`BusConnectionError` if the port is taken)."""
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_LINE)
        except OSError as exc:
            where = f"{self.host}:{self.port}"
            raise BusConnectionError(f"StackFlow TCP cannot listen on {where}: {exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every client."""
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        peer = writer.get_extra_info("peername")
        origin = f"tcp:{peer[0]}:{peer[1]}#{next(_connections)}" if peer else f"tcp#{next(_connections)}"

        async def send(reply: dict[str, Any]) -> None:
            if writer.is_closing():
                return  # the client left; its inferences are being stopped
            writer.write(dumps(reply) + b"\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()

        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await send(StackFlowError(ErrorCode.JSON_FORMAT, f"json format error: a line is over "
                                              f"{MAX_LINE} bytes").reply())
                    break
                if not line:
                    break
                if line.strip():
                    await self.units.handle(line, send, origin=origin)
        except ConnectionError:
            pass
        finally:
            self.units.cancel(origin)
            writer.close()
            self._clients.discard(task)


class _TcpLink:
    """The bridge's side of one connection to a StackFlow unit manager."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    async def send(self, message: dict[str, Any]) -> None:
        if self.writer.is_closing():
            raise LinkDown("connection closed")
        self.writer.write(dumps(message) + b"\n")
        try:
            await self.writer.drain()
        except ConnectionError as exc:
            raise LinkDown(str(exc)) from exc

    async def cancel(self, request_id: str) -> None:
        pass  # StackFlow has no per-request cancel; the unit finishes its answer, which is ignored

    async def beat(self) -> None:
        await self.send({"request_id": "heartbeat", "work_id": "sys", "action": "ping", "object": "None",
                         "data": "None"})

    def close(self) -> None:
        self.writer.close()


class StackFlowBackend:
    """A StackFlow unit manager at ``host:port`` as one node of ``bridge``: attached while connected
    (pinged every heartbeat through ``sys`` ``ping``), reconnected ``retry`` seconds after a loss."""

    def __init__(self, bridge: EdgeBridge, host: str, port: int = DEFAULT_PORT, *, models: list[str],
                 capacity: int = 1, name: str | None = None, retry: float = 1.0) -> None:
        self.bridge, self.host, self.port = bridge, host, port
        self.models, self.capacity, self.retry = models, capacity, retry
        self.name = name or f"stackflow@{host}:{port}"
        self.key = f"stackflow://{host}:{port}".encode()

    async def run(self) -> None:
        """Connect, serve, reconnect: until cancelled."""
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port, limit=MAX_LINE), self.retry * 5)
            except (OSError, TimeoutError) as exc:
                log.debug("StackFlow backend %s:%d unreachable: %s", self.host, self.port, exc)
                await asyncio.sleep(self.retry)
                continue
            self.bridge.attach(self.key, _TcpLink(writer), name=self.name, models=self.models,
                               capacity=self.capacity, transport="stackflow")
            try:
                while line := await reader.readline():
                    try:
                        message = json.loads(line)
                    except ValueError:
                        log.warning("StackFlow backend %s sent a line that is not JSON: %r", self.name,
                                    line[:200])
                        continue
                    if isinstance(message, dict):
                        self.bridge.deliver(self.key, message)
            except (OSError, ValueError, asyncio.LimitOverrunError) as exc:
                log.warning("StackFlow backend %s: %s", self.name, exc)
            finally:
                self.bridge.detach(self.key, "connection closed")
                writer.close()
            await asyncio.sleep(self.retry)
