"""The floor for `meetmesh bench ws`'s round trip on this machine: the same shape of path, with the same
libraries and the same measuring client, and nothing of MeetMesh's in between.

- server: uvicorn (websockets-sansio, uvloop, pings every 30 s as the gateway) serving a bare ASGI
  app: a ``welcome`` per socket; a ``submit`` frame is parsed, its task pushed with one LPUSH, and
  ``accepted`` sent; one reader follows the status stream (XREAD BLOCK) and sends each task's
  ``status`` and ``result`` frames to the socket that submitted it. No tokens checked, no records,
  no pydantic, no relay lease, no broadcast, no acks, no replay buffer, no writer task.
- worker: BRPOP a task (and RPOP up to 99 more), XADD "processing" for each, then XADD "completed"
  for each (a pipeline each: the worker's lease and settle).
- clients: `python -m meetmesh.bench.ws client` processes, exactly as `meetmesh bench ws` runs them:
  10,000 sockets held, 100 of them submitting at 1,000 tasks/s.

    .venv/bin/python bench/raw_ws_floor.py                  # CLIENTS=10000 RATE=1000 TASKS=5000

Prints JSON: round trip p50 / p99, CPU per task of the server, the worker, the measuring client and
Redis, and the machine's busy cores, as `meetmesh bench ws` reports them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

CLIENTS = int(os.environ.get("CLIENTS", "10000"))
RATE = float(os.environ.get("RATE", "1000"))
TASKS = int(os.environ.get("TASKS", "5000"))
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/8")
PREFIX = os.environ.get("FLOOR_PREFIX", f"floor-{uuid.uuid4().hex[:8]}")
QUEUE, STREAM = f"{PREFIX}:q", f"{PREFIX}:s"
ME = str(Path(__file__).resolve())


# -- the server ------------------------------------------------------------------------------------

def make_app() -> Any:
    from redis.asyncio import Redis

    redis: Redis | None = None
    owners: dict[str, tuple[Any, list[int]]] = {}  # task id -> (send, [next seq]) of its socket

    async def follow() -> None:
        assert redis is not None
        last = "$"
        while True:
            answer = await redis.xread({STREAM: last}, count=100, block=1000)
            for _, entries in answer or []:
                for entry_id, fields in entries:
                    last = entry_id
                    task_id, status = fields["id"], fields["status"]
                    owner = owners.get(task_id)
                    if owner is None:
                        continue
                    send, seq = owner
                    seq[0] += 1
                    if status == "completed":
                        del owners[task_id]
                        frame = {"type": "result", "task_id": task_id, "status": status, "result": None}
                    else:
                        frame = {"type": "status", "task_id": task_id, "status": status}
                    frame["seq"] = seq[0]
                    await send({"type": "websocket.send", "text": json.dumps(frame)})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal redis
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    redis = Redis.from_url(REDIS_URL, decode_responses=True)
                    asyncio.get_running_loop().create_task(follow())
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        assert redis is not None
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        seq = [0]
        await send({"type": "websocket.send", "text": json.dumps({"type": "welcome", "seq": 0})})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            frame = json.loads(message["text"])
            if frame.get("type") != "submit":
                continue
            task_id = uuid.uuid4().hex
            owners[task_id] = (send, seq)
            task = {"id": task_id, "type": frame["task"], "data": frame["data"]}
            await redis.lpush(QUEUE, json.dumps(task))  # type: ignore[misc]
            seq[0] += 1
            await send({"type": "websocket.send", "text": json.dumps(
                {"type": "accepted", "id": frame["id"], "task_id": task_id, "status": "queued",
                 "seq": seq[0]})})

    return app


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(make_app(), host="127.0.0.1", port=port, ws="websockets-sansio", ws_per_message_deflate=False,
                ws_ping_interval=30.0, ws_ping_timeout=30.0, log_level="warning", lifespan="on",
                backlog=4096)


# -- the worker ------------------------------------------------------------------------------------

async def work() -> None:
    from redis.asyncio import Redis

    redis = Redis.from_url(REDIS_URL, decode_responses=True)
    while True:
        got = await redis.brpop([QUEUE], timeout=1)
        if got is None:
            continue
        tasks = [json.loads(raw) for raw in [got[1], *(await redis.rpop(QUEUE, 99) or [])]]
        for status in ("processing", "completed"):  # the lease, then the settle: a round trip each
            async with redis.pipeline(transaction=False) as pipe:
                for task in tasks:
                    pipe.xadd(STREAM, {"id": task["id"], "status": status}, maxlen=10_000, approximate=True)
                await pipe.execute()


# -- the run ---------------------------------------------------------------------------------------

async def run() -> dict[str, Any]:
    import httpx

    from meetmesh.bench.ws import _Child, _cpu_now, _cpu_window, _free_port, _raise_file_limit, _summary

    _raise_file_limit(CLIENTS)
    port = _free_port()
    env = {**os.environ, "MEETMESH_JWT_SECRET": "floor", "FLOOR_PREFIX": PREFIX}
    py, me = sys.executable, ME
    children: list[Any] = []
    out: dict[str, Any] = {"clients": CLIENTS, "rate": RATE, "tasks": TASKS}
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        work_dir = Path(tmp)
        try:
            server = await _Child.spawn("server", [py, me, "serve", str(port)], env, work_dir)
            worker = await _Child.spawn("worker", [py, me, "work"], env, work_dir)
            children += [server, worker]
            async with httpx.AsyncClient() as http:
                for _ in range(300):
                    try:
                        if (await http.get(f"http://127.0.0.1:{port}/")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        await asyncio.sleep(0.1)
            url, per = f"ws://127.0.0.1:{port}/ws", 2500
            clients, first = [], 0
            while first < CLIENTS:
                share = min(per, CLIENTS - first)
                argv = [py, "-m", "meetmesh.bench.ws", "client", url, str(first), str(share)]
                child = await _Child.spawn(f"client-{first}", argv, env, work_dir, pipes=True)
                children.append(child)
                clients.append(child)
                first += share
            held = await asyncio.gather(*(c.read("held", 600) for c in clients))
            out["sockets_held"] = sum(h["held"] for h in held)
            await clients[0].tell({"cmd": "round_trips", "tasks": TASKS, "rate": RATE, "sockets": 100})
            await clients[0].read("measuring", 120)
            cpu0 = await _cpu_now([server.pid], worker.pid, clients[0].pid, REDIS_URL)
            await clients[0].tell({"cmd": "go"})
            await clients[0].read("measured", 60 + 2 * TASKS / RATE)
            cpu1 = await _cpu_now([server.pid], worker.pid, clients[0].pid, REDIS_URL)
            rt = await clients[0].read("round_trips", 60)
            out["round_trip"] = {
                "completed": rt["completed"], "errors": rt["error_count"],
                **_summary(rt["round_trip_ms"]),
                "to_accepted": _summary(rt["accepted_ms"]),
                # as `meetmesh bench ws` reports them ("gateway" is the server here)
                **_cpu_window(cpu0, cpu1, TASKS),
            }
            for c in clients:
                await c.tell({"cmd": "close"})
        finally:
            for child in reversed(children):
                await child.stop()
            from redis.asyncio import Redis

            redis = Redis.from_url(REDIS_URL)
            await redis.delete(QUEUE, STREAM)
            await redis.aclose()
    return out


def main() -> None:
    import uvloop

    if sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]))
    elif sys.argv[1:2] == ["work"]:
        uvloop.run(work())
    else:
        print(json.dumps(uvloop.run(run()), indent=1))


if __name__ == "__main__":
    main()
