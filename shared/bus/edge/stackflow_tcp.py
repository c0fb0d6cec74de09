"""StackFlow over TCP: JSON objects one after another, both ways, framed as StackFlow's unit manager
frames them: by brace balance, so an object needs no trailing newline and one write may carry several
(`JsonFramer`). Replies end with a newline, as StackFlow's do, for clients that read lines.

`StackFlowServer` lets StackFlow's own clients drive a node's units (setup, streamed inference,
exit on one connection); `StackFlowBackend` lets an `EdgeBridge` use a StackFlow / Edge-LLM-Infra
unit manager at ``host:port`` (10001 by default) as one more node of its pool.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import BusConnectionError
from .pool import LinkDown
from .stackflow import ErrorCode, StackFlowError, dumps

if TYPE_CHECKING:
    from .pool import EdgeBridge

log = logging.getLogger("meetmesh.edge.tcp")
DEFAULT_PORT = 10001
MAX_OBJECT = 1 << 20  # bytes; a longer object is answered with -2 and the connection closed
READ_SIZE = 1 << 16
WRITE_TIMEOUT = 30.0  # seconds a client may leave replies unread before it is disconnected
_connections = itertools.count(1)
_OPEN, _CLOSE, _QUOTE, _ESCAPE = ord("{"), ord("}"), ord('"'), ord("\\")
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
_IN_CODE = re.compile(rb'[{}"]')     # inside an object, outside strings: what changes the state
_IN_STRING = re.compile(rb'["\\]')  # inside a string


class FramingError(ValueError):
    """Bytes that cannot be framed: text outside any object, a ``}`` with no ``{`` open, or an object
    over the size limit (``fatal``: the stream cannot be resynchronised)."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class JsonFramer:
    """Cuts a byte stream into JSON objects by brace balance, as StackFlow's unit manager does, but
    aware of strings (a brace inside a string value does not count; StackFlow's counter miscounts
    it). Whitespace between objects is skipped; any other run of bytes outside an object (a stray
    ``}`` included) is one `FramingError`, and framing goes on at the next ``{``."""

    def __init__(self, max_object: int = MAX_OBJECT) -> None:
        self.max_object = max_object
        self._buf = bytearray()
        self._depth = 0
        self._in_string = self._escaped = self._garbage = False

    def feed(self, data: bytes) -> list[bytes | FramingError]:
        """What ``data`` completes, in order: each whole object's bytes, or an error."""
        out: list[bytes | FramingError] = []
        i, n = 0, len(data)
        begin = 0  # where the object being read starts in ``data`` (earlier bytes are in _buf)
        if self._escaped and n:  # the last feed ended inside a string on a backslash
            self._escaped, i = False, 1
        while i < n:
            if self._depth == 0:
                found = _NOT_SPACE.search(data, i)
                if found is None:
                    break
                j = found.start()
                if data[j] == _OPEN:
                    self._depth, self._garbage, begin, i = 1, False, j, j + 1
                    continue
                if not self._garbage:  # one error per run of stray bytes
                    self._garbage = True
                    out.append(FramingError("json format error: " + (
                        "a '}' with no '{' open" if data[j] == _CLOSE else "text outside a JSON object")))
                i = data.find(b"{", j)
                if i < 0:
                    break
                continue
            found = (_IN_STRING if self._in_string else _IN_CODE).search(data, i)
            j = n if found is None else found.start()
            if len(self._buf) + j - begin > self.max_object:
                self._reset()
                out.append(FramingError(f"json format error: an object is over {self.max_object} bytes",
                                        fatal=True))
                return out
            if found is None:
                break
            byte, i = data[j], j + 1
            if byte == _ESCAPE:  # in a string: skip the escaped byte, which may be in the next feed
                if i < n:
                    i += 1
                else:
                    self._escaped = True
            elif byte == _QUOTE:
                self._in_string = not self._in_string
            elif byte == _OPEN:
                self._depth += 1
            else:  # a closing brace
                self._depth -= 1
                if self._depth == 0:
                    out.append(bytes(self._buf) + data[begin:i])
                    self._buf.clear()
        if self._depth:
            self._buf += data[begin:]
        return out

    def _reset(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._in_string = self._escaped = False
        self._garbage = True  # what follows the cut is the rest of the oversize object


class UnitHandler(Protocol):
    """What the server serves: `EdgeUnits` (one raw request in; replies through ``send``)."""

    async def handle(self, raw: bytes | str, send: Callable[[dict[str, Any]], Awaitable[None]], *,
                     origin: str = "") -> None: ...

    def cancel(self, origin: str, request_id: str | None = None) -> int: ...


class StackFlowServer:
    """Serves ``units`` to StackFlow TCP clients at ``host:port`` (port 0: any free port, see `port`).

    Each connection is one origin: when it closes, the inferences it started are stopped. A client
    that stops reading for ``write_timeout`` seconds while replies wait for it is disconnected (its
    inferences would otherwise hold the node's capacity for ever)."""

    def __init__(self, units: UnitHandler, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 write_timeout: float = WRITE_TIMEOUT) -> None:
        self.units, self.host, self.port = units, host, port
        self.write_timeout = write_timeout
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen (`BusConnectionError` if the port is taken)."""
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
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
            try:
                await asyncio.wait_for(writer.drain(), self.write_timeout)
            except ConnectionError:
                pass
            except TimeoutError:
                log.warning("StackFlow client %s read nothing for %.0fs: disconnected", origin,
                            self.write_timeout)
                writer.transport.abort()  # the read loop ends, and stops the client's inferences

        framer = JsonFramer()
        try:
            while data := await reader.read(READ_SIZE):
                for item in framer.feed(data):
                    if isinstance(item, FramingError):
                        await send(StackFlowError(ErrorCode.JSON_FORMAT, str(item), request_id="0",
                                                  work_id="sys").reply())
                        if item.fatal:
                            return
                    else:
                        await self.units.handle(item, send, origin=origin)
        except ConnectionError:
            pass
        except asyncio.CancelledError:  # by close(): asyncio's stream callback would log it as an error
            pass
        finally:
            self.units.cancel(origin)
            writer.close()
            self._clients.discard(task)


class _TcpLink:
    """The bridge's side of one connection to a StackFlow unit manager."""

    def __init__(self, writer: asyncio.StreamWriter, write_timeout: float) -> None:
        self.writer, self.write_timeout = writer, write_timeout

    async def send(self, message: dict[str, Any]) -> None:
        if self.writer.is_closing():
            raise LinkDown("connection closed")
        self.writer.write(dumps(message) + b"\n")
        try:
            await asyncio.wait_for(self.writer.drain(), self.write_timeout)
        except ConnectionError as exc:
            raise LinkDown(str(exc)) from exc
        except TimeoutError:
            self.writer.transport.abort()
            raise LinkDown(f"the unit manager read nothing for {self.write_timeout:.0f}s") from None

    async def cancel(self, request_id: str) -> None:
        pass  # StackFlow has no per-request cancel; the unit finishes its answer, which is ignored

    async def beat(self) -> None:
        # taskinfo, not ping: Edge-LLM-Infra's unit manager has no sys ping and answers nothing to it
        await self.send({"request_id": "heartbeat", "work_id": "llm", "action": "taskinfo", "object": "None",
                         "data": "None"})

    def close(self) -> None:
        self.writer.close()


def _json_object(item: bytes | FramingError) -> dict[str, Any] | None:
    if isinstance(item, FramingError):
        return None
    try:
        message = json.loads(item)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


class StackFlowBackend:
    """A StackFlow unit manager at ``host:port`` as one node of ``bridge``: attached while connected
    (asked ``llm`` ``taskinfo`` every heartbeat, which StackFlow answers; it has no ``ping``),
    reconnected ``retry`` seconds after a loss."""

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
                    asyncio.open_connection(self.host, self.port), self.retry * 5)
            except (OSError, TimeoutError) as exc:
                log.debug("StackFlow backend %s:%d unreachable: %s", self.host, self.port, exc)
                await asyncio.sleep(self.retry)
                continue
            write_timeout = self.bridge.heartbeat * self.bridge.missed  # as long as a silence may last
            self.bridge.attach(self.key, _TcpLink(writer, write_timeout), name=self.name, models=self.models,
                               capacity=self.capacity, transport="stackflow")
            framer = JsonFramer()
            try:
                while data := await reader.read(READ_SIZE):
                    for item in framer.feed(data):
                        message = _json_object(item)
                        if message is None:
                            log.warning("StackFlow backend %s sent what is not a JSON object: %r",
                                        self.name, item if isinstance(item, FramingError) else item[:200])
                        else:
                            self.bridge.deliver(self.key, message)
            except OSError as exc:
                log.warning("StackFlow backend %s: %s", self.name, exc)
            finally:
                self.bridge.detach(self.key, "connection closed")
                writer.close()
            await asyncio.sleep(self.retry)
