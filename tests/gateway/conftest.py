"""Gateway fixtures: a real uvicorn server on a free port, a worker running `service.router` on the
routed queues, tokens, and HTTP/WebSocket clients. Everything under the test's key prefix."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import uvicorn
import websockets

from gateway import create_app
from gateway.auth import mint
from gateway.settings import GatewaySettings
from shared.bus import Queue, Worker

from .service import router

SECRET = "test-secret-0123456789abcdef-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def settings(redis_url: str, key_prefix: str) -> GatewaySettings:
    return GatewaySettings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        jwt_secret=SECRET,
        submit_rate=1000,
        submit_burst=1000,
        replay_window=30,
        max_frame_bytes=64 * 1024,
    )


@contextlib.asynccontextmanager
async def serve(settings: GatewaySettings) -> AsyncIterator[str]:
    """Run the gateway in this process on a free port; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws_max_size=4 << 20,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@pytest.fixture
async def gateway(settings: GatewaySettings) -> AsyncIterator[str]:
    async with serve(settings) as url:
        yield url


@pytest.fixture
async def service(redis: Any, key_prefix: str) -> AsyncIterator[list[Worker]]:
    """Workers for the ai, media and meeting queues running the stand-in handlers (one retry each)."""
    workers = [
        Worker(Queue(name, redis, prefix=key_prefix, max_retries=1), router, concurrency=20, grace_seconds=1)
        for name in ("ai", "media", "meeting")
    ]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    yield workers
    for w in workers:
        w.stop()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)


@pytest.fixture
def token() -> Callable[..., str]:
    def make(user: str = "alice", admin: bool = False) -> str:
        return mint(SECRET, user, admin=admin)

    return make


@pytest.fixture
async def http(gateway: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as client:
        yield client


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Client:
    """A WebSocket client that reads JSON frames."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        return frame

    async def until(
        self, check: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Frames received up to and including the first one ``check`` accepts."""
        seen = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            frame = await self.recv(max(0.01, deadline - asyncio.get_running_loop().time()))
            seen.append(frame)
            if check(frame):
                return seen


@pytest.fixture
def connect(gateway: str) -> Callable[..., Any]:
    """``async with connect(token) as client:`` a WebSocket client of the gateway."""

    @contextlib.asynccontextmanager
    async def open_client(tok: str, base: str | None = None) -> AsyncIterator[Client]:
        url = (base or gateway).replace("http://", "ws://") + f"/ws?token={tok}"
        async with websockets.connect(url, max_size=8 << 20) as ws:
            yield Client(ws)

    return open_client
