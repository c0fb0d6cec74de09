"""``meetmesh chaos gateway``: a gateway SIGKILLed while its clients hold sockets and submit tasks.

Two ``meetmesh gateway`` processes (A and B) and one ``meetmesh worker`` share a private Redis. Client
sockets, one user each, connect to A and submit tasks steadily, each under a dedupe key of its own
(``data.k`` names the request, and the handler counts its runs by it). Then A is killed with SIGKILL.

Each client must see its socket end at once (a close, not a hang); it reconnects to B, asks B to resume
its session (sessions live in the gateway that opened them until they can move, so B answers with an
error, which is recorded) and sends again, with the same dedupe key, every submission A never answered:
the owner's dedupe key makes a repeat of a submission A did queue answer with that same task, so
nothing runs twice. Then it goes on submitting on B for a while.

What it proves: every request a client made ran exactly once, every task A accepted is readable over
REST on B by its owner with its result, and how long clients took to notice and to be back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from shared.bus import Context, Router
from shared.bus.connection import client as redis_client

from . import children
from .servers import PrivateRedis, free_port

PREFIX = "chaos-gw"
TASK_TYPE = "ai.chat"  # routed to the "ai" queue, which this scenario's worker serves
QUEUE = "ai"

router = Router()
_redis: dict[int, Redis] = {}


def runs_key(prefix: str) -> str:
    return f"{prefix}:chaos:gateway-runs"


@router.handler(TASK_TYPE)
async def slow_chat(ctx: Context) -> dict[str, Any]:
    """Work ``data.ms`` milliseconds, count the run under ``data.k``, answer with the key."""
    import os

    data = ctx.payload or {}
    await asyncio.sleep(float(data.get("ms", 0)) / 1000)
    loop = id(asyncio.get_running_loop())
    redis = _redis.get(loop) or _redis.setdefault(loop, redis_client(os.environ["MEETMESH_REDIS_URL"]))
    await redis.hincrby(runs_key(os.environ["MEETMESH_KEY_PREFIX"]), str(data.get("k")), 1)  # type: ignore[misc]
    return {"k": data.get("k")}


@dataclass
class GatewayKillConfig:
    clients: int = 20
    interval: float = 0.1  # seconds between one client's submissions
    before_kill: float = 4.0
    after_kill: float = 3.0
    work_ms: tuple[int, int] = (100, 400)  # so many tasks are still running when A dies
    concurrency: int = 50
    deadline: float = 90.0
    seed: int | None = None


@dataclass
class GatewayKillSummary:
    """``lost`` and ``ran_twice`` must be 0, every client back on B, every task of A readable there."""

    clients: int
    requests: int  # submissions made (one dedupe key each)
    accepted_on_a: int
    unanswered_at_kill: int  # sent to A, no `accepted` before it died: sent again on B, same key
    accepted_on_b: int
    tasks_in_flight_at_kill: int  # accepted, not yet finished, when A died
    readable_on_b: int  # tasks A accepted whose record B serves to their owner, completed with a result
    lost: int  # requests that never ran, or tasks of A not readable and completed on B
    ran_twice: int
    clients_back: int
    close_codes: dict[str, int] = field(default_factory=dict)
    resume_answers: dict[str, int] = field(default_factory=dict)
    noticed_ms_median: float | None = None  # kill -> the client's socket is closed
    noticed_ms_max: float | None = None
    back_ms_median: float | None = None  # kill -> welcome from B
    back_ms_max: float | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.ran_twice == 0 and self.clients_back == self.clients

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class _Client:
    """One user's socket: submits under its own keys, follows answers, moves to B when A dies."""

    def __init__(self, n: int, token: str, rng: random.Random, config: GatewayKillConfig) -> None:
        self.n, self.token, self.rng, self.config = n, token, rng, config
        self.sent: dict[str, float] = {}  # request key -> when it was sent (unanswered)
        self.tasks: dict[str, str] = {}  # request key -> task id
        self.on_a: set[str] = set()
        self.resent = 0
        self.session = ""
        self.last_seq = 0
        self.close_code: int | None = None
        self.noticed: float | None = None
        self.back: float | None = None
        self.resume_answer = ""
        self._count = 0

    async def open(self, url: str) -> ClientConnection:
        ws = await connect(url, subprotocols=["bearer", self.token],  # type: ignore[list-item]
                           open_timeout=30, ping_interval=None)
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"client {self.n}: first frame {welcome}")
        self.session = self.session or welcome["session_id"]
        return ws

    def _submit(self, key: str) -> str:
        return json.dumps({"type": "submit", "id": key, "task": TASK_TYPE, "dedupe_key": key,
                           "data": {"k": key, "ms": self.rng.randint(*self.config.work_ms)}})

    async def _read(self, ws: ClientConnection, *, on_a: bool) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            self.last_seq = max(self.last_seq, int(frame.get("seq", 0)))
            if frame.get("type") == "accepted":
                key = frame["id"]
                self.sent.pop(key, None)
                self.tasks[key] = frame["task_id"]
                if on_a:
                    self.on_a.add(frame["task_id"])
            elif frame.get("id") == "resume":
                kind = frame.get("type")
                self.resume_answer = f"error:{frame.get('code')}" if kind == "error" else str(kind)

    async def _submit_for(self, ws: ClientConnection, seconds: float | None) -> None:
        end = None if seconds is None else time.monotonic() + seconds
        while end is None or time.monotonic() < end:
            self._count += 1
            key = f"u{self.n}-{self._count}"
            self.sent[key] = time.monotonic()
            await ws.send(self._submit(key))
            await asyncio.sleep(self.config.interval)

    async def run_on_a(self, url: str) -> None:
        """Submit on A until its socket ends; note when and how."""
        ws = await self.open(url)
        reader = asyncio.create_task(self._read(ws, on_a=True))
        writer = asyncio.create_task(self._submit_for(ws, None))
        try:
            await reader  # ends when the socket does
        except ConnectionClosed:
            pass
        finally:
            self.noticed = time.monotonic()
            self.close_code = ws.close_code if ws.close_code is not None else 1006
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def run_on_b(self, url: str, seconds: float) -> None:
        ws = await self.open(url)
        self.back = time.monotonic()
        reader = asyncio.create_task(self._read(ws, on_a=False))
        await ws.send(json.dumps({"type": "resume", "id": "resume", "session_id": self.session,
                                  "last_seq": self.last_seq}))
        for key in list(self.sent):  # A never answered these: the same keys again
            self.resent += 1
            await ws.send(json.dumps({**json.loads(self._submit(key)), "data": {"k": key, "ms": 10}}))
        await self._submit_for(ws, seconds)
        deadline = time.monotonic() + 30
        while self.sent and time.monotonic() < deadline:  # noqa: ASYNC110 - answers come from the reader
            await asyncio.sleep(0.05)
        await ws.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        self.resume_answer = self.resume_answer or "no answer"


async def _ready(base: str, child: children.Child, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{base}/ready", timeout=2)).status_code == 200:
                    return
            if not child.alive:
                raise RuntimeError(f"gateway exited with {child.proc.returncode}:\n{child.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway at {base} not ready in {timeout}s:\n{child.tail()}")
            await asyncio.sleep(0.1)


def _ms(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return round(statistics.median(values) * 1000, 1), round(max(values) * 1000, 1)


async def run_gateway_kill(config: GatewayKillConfig, *, progress: Any = None) -> GatewayKillSummary:
    """Run the scenario on a private Redis and return its summary."""
    from gateway.auth import mint

    rng = random.Random(config.seed)
    say = progress or (lambda text: None)
    logs = Path(tempfile.mkdtemp(prefix="meetmesh-chaos-gateway-"))
    secret = secrets.token_urlsafe(32)
    async with PrivateRedis() as server:
        env = children.child_env(server.url, PREFIX, MEETMESH_JWT_SECRET=secret,
                                 MEETMESH_SUBMIT_RATE="100000", MEETMESH_SUBMIT_BURST="100000")
        ports = [free_port(), free_port()]
        a = children.gateway(env, logs / "gateway-a.log", ports[0])
        b = children.gateway(env, logs / "gateway-b.log", ports[1])
        worker = children.worker(QUEUE, env, logs / "worker.log", concurrency=config.concurrency, lease=10.0,
                                 max_retries=3, app="reliability.gateway_kill:router")
        redis = redis_client(server.url)
        started = time.monotonic()
        try:
            bases = [f"http://127.0.0.1:{p}" for p in ports]
            await asyncio.gather(_ready(bases[0], a), _ready(bases[1], b))
            say(f"gateways A (pid {a.pid}) and B (pid {b.pid}) ready on {server.url}")
            clients = [_Client(n, mint(secret, f"chaos-user-{n}"), random.Random(rng.random()), config)
                       for n in range(config.clients)]
            on_a = [asyncio.create_task(c.run_on_a(f"ws://127.0.0.1:{ports[0]}/ws")) for c in clients]
            await asyncio.sleep(config.before_kill)
            runs_before: dict[str, str] = await redis.hgetall(runs_key(PREFIX))  # type: ignore[misc]
            in_flight = sum(1 for c in clients for k in c.tasks if k not in runs_before)
            killed = time.monotonic()
            await a.kill()
            say(f"killed gateway A with {len(clients)} sockets open and ~{in_flight} tasks unfinished")
            await asyncio.wait_for(asyncio.gather(*on_a), 30)
            await asyncio.gather(*(c.run_on_b(f"ws://127.0.0.1:{ports[1]}/ws", config.after_kill)
                                   for c in clients))
            say("every client back on B; waiting for every task to finish")

            # Every task A accepted: readable on B by its owner, completed with its result.
            readable, pending = 0, {(c.token, t) for c in clients for t in c.on_a}
            deadline = time.monotonic() + config.deadline
            async with httpx.AsyncClient(base_url=f"{bases[1]}/api/v1", timeout=10) as http:
                while pending and time.monotonic() < deadline:
                    for token, task_id in list(pending):
                        answer = await http.get(f"/tasks/{task_id}",
                                                headers={"Authorization": f"Bearer {token}"})
                        record = answer.json() if answer.status_code == 200 else {}
                        if record.get("status") == "completed" and record.get("result") is not None:
                            readable += 1
                            pending.discard((token, task_id))
                    if pending:
                        await asyncio.sleep(0.2)
                keys = {k for c in clients for k in c.tasks}
                while time.monotonic() < deadline:
                    runs = await redis.hgetall(runs_key(PREFIX))  # type: ignore[misc]
                    if keys <= set(runs):
                        break
                    await asyncio.sleep(0.2)
            seconds = time.monotonic() - started
        finally:
            for child in (a, b, worker):
                await child.kill()
            await redis.aclose()
    requests = {f"u{c.n}-{i}" for c in clients for i in range(1, c._count + 1)}
    never_ran = requests - set(runs)
    noticed = [c.noticed - killed for c in clients if c.noticed is not None]
    back = [c.back - killed for c in clients if c.back is not None]
    codes: dict[str, int] = {}
    answers: dict[str, int] = {}
    for c in clients:
        codes[str(c.close_code)] = codes.get(str(c.close_code), 0) + 1
        answers[c.resume_answer] = answers.get(c.resume_answer, 0) + 1
    (n_med, n_max), (b_med, b_max) = _ms(noticed), _ms(back)
    return GatewayKillSummary(
        clients=len(clients), requests=len(requests), accepted_on_a=sum(len(c.on_a) for c in clients),
        unanswered_at_kill=sum(c.resent for c in clients),
        accepted_on_b=sum(len(c.tasks) for c in clients) - sum(len(c.on_a) for c in clients),
        tasks_in_flight_at_kill=in_flight, readable_on_b=readable,
        lost=len(never_ran) + len(pending), ran_twice=sum(1 for n in runs.values() if int(n) > 1),
        clients_back=len(back), close_codes=codes, resume_answers=answers, noticed_ms_median=n_med,
        noticed_ms_max=n_max, back_ms_median=b_med, back_ms_max=b_max, seconds=round(seconds, 2))
