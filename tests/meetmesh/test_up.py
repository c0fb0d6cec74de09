"""`meetmesh up`'s supervisor with small stand-in processes (prefixes, stages, graceful stop on SIGTERM,
stop-all when one dies, scaled replicas' names and ports), and `meetmesh submit` as a real process
against a real gateway in this process (both modes)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from gateway.auth import mint
from gateway.settings import GatewaySettings
from meetmesh.up import (
    CLEAN_EXITS,
    READY_LINE,
    Proc,
    Supervisor,
    edge_model_name,
    free_port,
    parse_scale,
    plan,
    up_cmd,
)
from shared.bus import Queue, Worker

from ..gateway.conftest import SECRET, serve
from ..gateway.service import router

ROOT = Path(__file__).resolve().parents[2]


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


# Stand-ins: each says "up" when running; TRAP also says goodbye on SIGTERM.
TRAP = """
    import signal, sys, time
    def bye(*_):
        print("{name}: got SIGTERM, cleaning up", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, bye)
    print("{name} up", flush=True)
    while True:
        time.sleep(1)
"""


def trap(name: str) -> list[str]:
    return py(TRAP.format(name=name))


def supervisor(procs: list[Proc], **options: Any) -> tuple[Supervisor, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=100, color_system=None, highlight=False)
    return Supervisor(procs, console=console, **options), out


def lines(out: io.StringIO) -> list[str]:
    return [line.rstrip() for line in out.getvalue().splitlines()]


# -- the layout ------------------------------------------------------------------------------------


def test_scale_is_parsed_and_checked() -> None:
    assert parse_scale(["ai=2", "media=3,user=1"]) == {"ai": 2, "media": 3, "user": 1}
    assert parse_scale([]) == {}
    for bad in ("ai", "gpu=2", "ai=two", "ai=-1", "ai=10"):
        with pytest.raises(typer.BadParameter):
            parse_scale([bad])


def test_the_plan_names_replicas_and_gives_each_its_ports() -> None:
    layout = plan(scale={"ai": 2, "media": 0}, port_base=20000, edge_model="echo", edge_capacity=4,
                  python="py")
    by_name = {p.name: p for p in layout.procs}
    assert list(by_name) == ["gateway", "user", "meeting", "ai-1", "ai-2", "edge-1", "edge-2"]
    assert [p.stage for p in layout.procs] == sorted(p.stage for p in layout.procs)
    assert by_name["gateway"].argv == ["py", "-m", "meetmesh", "gateway", "--host", "127.0.0.1",
                                      "--port", "20000"]
    assert by_name["gateway"].ready_url == "http://127.0.0.1:20000/ready"
    assert by_name["user"].argv[3:] == ["service", "user", "--port", "20101"]
    assert by_name["meeting"].ready_url == "http://127.0.0.1:20102/ready"
    # replica k: port + 10*k, a bridge of its own, and an edge node connected to that bridge
    assert by_name["ai-1"].argv[3:] == ["service", "ai", "--port", "20104"]
    assert by_name["ai-2"].argv[3:] == ["service", "ai", "--port", "20114"]
    assert by_name["ai-1"].env["MEETMESH_EDGE_BIND"] == "tcp://127.0.0.1:17555"
    assert by_name["ai-2"].env["MEETMESH_EDGE_BIND"] == "tcp://127.0.0.1:17556"
    edge2 = by_name["edge-2"].argv
    assert edge2[3] == "edge-node"
    assert edge2[edge2.index("--connect") + 1] == "tcp://127.0.0.1:17556"
    assert edge2[edge2.index("--stackflow-port") + 1] == "22002"
    assert edge2[edge2.index("--model") + 1] == "echo"
    assert edge2[edge2.index("--capacity") + 1] == "4"
    assert edge2[edge2.index("--name") + 1] == "edge-2"
    # one environment: every service's base port and URL (the gateway proxies to replica 0), the model
    assert layout.env["MEETMESH_AI_PORT"] == "20104"
    assert layout.env["MEETMESH_AI_URL"] == "http://127.0.0.1:20104"
    assert layout.env["MEETMESH_MEETING_URL"] == "http://127.0.0.1:20102"
    assert layout.env["MEETMESH_PORT"] == "20000" and layout.env["MEETMESH_AI_MODEL"] == "echo"
    assert layout.gateway_url == "http://127.0.0.1:20000"


def test_the_default_plan_matches_the_documented_ports() -> None:
    layout = plan(python="py")
    names = [p.name for p in layout.procs]
    assert names == ["gateway", "user", "meeting", "media", "ai", "edge"]
    by_name = {p.name: p for p in layout.procs}
    assert by_name["ai"].env["MEETMESH_EDGE_BIND"] == "tcp://127.0.0.1:5555"
    edge = by_name["edge"].argv
    assert "--model" not in edge and edge[edge.index("--stackflow-port") + 1] == "10001"
    assert [layout.env[f"MEETMESH_{s}_PORT"] for s in ("USER", "MEETING", "MEDIA", "AI")] == [
        "8101", "8102", "8103", "8104"]
    assert edge_model_name(None) == "smollm2-135m-instruct" == layout.env["MEETMESH_AI_MODEL"]
    assert edge_model_name("/models/tiny-llama.gguf") == "tiny-llama"
    with pytest.raises(typer.BadParameter):
        plan(port_base=65000, python="py")


def test_up_help_documents_every_flag() -> None:
    app = typer.Typer()
    app.command()(up_cmd)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["up-cmd", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    for flag in ("--scale", "--edge-model", "--edge-capacity", "--edge-token-delay", "--stackflow",
                 "--port-base", "--host", "--data-dir", "--grace", "--ready-timeout"):
        assert flag in result.output


# -- the supervisor --------------------------------------------------------------------------------


async def test_every_line_is_prefixed_with_its_process_name() -> None:
    procs = [
        Proc("alpha", py("""
            import sys
            print("hello from alpha", flush=True)
            print("oops on stderr", file=sys.stderr, flush=True)
            print("alpha done", flush=True)
            import time; time.sleep(60)
        """), ready_line="alpha done"),
        Proc("b", py("print('b says hi', flush=True); import time; time.sleep(60)"), ready_line="hi"),
    ]
    sup, out = supervisor(procs, grace=10)
    code = await sup.run(ready_timeout=30, on_ready=sup.request_stop, signals=False)
    assert code == 0
    seen = lines(out)
    assert "alpha | hello from alpha" in seen
    assert "alpha | oops on stderr" in seen     # stderr too
    assert "b     | b says hi" in seen          # padded to the longest name
    assert "up    | stopped" in seen


async def test_stages_start_in_order_each_ready_before_the_next(tmp_path: Path) -> None:
    port = free_port()
    server = py(f"""
        import http.server
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/ready" else 404)
                self.end_headers()
            def log_message(self, *a):
                pass
        http.server.HTTPServer(("127.0.0.1", {port}), H).serve_forever()
    """)
    client = py(f"""
        import urllib.request
        print("first said", urllib.request.urlopen("http://127.0.0.1:{port}/ready").status, flush=True)
        import time; time.sleep(60)
    """)
    procs = [Proc("later", client, stage=2, ready_line="first said"),
             Proc("first", server, stage=1, ready_url=f"http://127.0.0.1:{port}/ready")]
    sup, out = supervisor(procs, grace=10)
    assert await sup.run(ready_timeout=30, on_ready=sup.request_stop, signals=False) == 0
    assert "later | first said 200" in lines(out)


async def test_sigterm_stops_every_child_gracefully() -> None:
    procs = [Proc("one", trap("one"), ready_line="one up"), Proc("two", trap("two"), ready_line="two up")]
    sup, out = supervisor(procs, grace=30)

    def ready() -> None:
        os.kill(os.getpid(), signal.SIGTERM)   # what `kill <up>` does: handled by the supervisor

    assert await sup.run(ready_timeout=30, on_ready=ready) == 0
    seen = lines(out)
    assert "one | one: got SIGTERM, cleaning up" in seen
    assert "two | two: got SIGTERM, cleaning up" in seen
    assert all(c.returncode == 0 for c in sup.children)
    assert seen[-1] == "up  | stopped"


async def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period() -> None:
    stubborn = py("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stubborn up", flush=True)
        while True:
            time.sleep(1)
    """)
    procs = [Proc("stubborn", stubborn, ready_line="stubborn up"),
             Proc("fine", trap("fine"), ready_line="fine up")]
    sup, out = supervisor(procs, grace=0.5)
    assert await sup.run(ready_timeout=30, on_ready=sup.request_stop, signals=False) == 1
    by_name = {c.proc.name: c for c in sup.children}
    assert by_name["stubborn"].returncode == -signal.SIGKILL and by_name["stubborn"].killed
    assert by_name["fine"].returncode in CLEAN_EXITS
    assert any("stubborn still running after the grace period: SIGKILL" in line for line in lines(out))


async def test_a_second_stop_request_kills_at_once() -> None:
    stubborn = py("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
    """)
    sup, _ = supervisor([Proc("s", stubborn, ready_line="ready")], grace=600)

    def twice() -> None:
        sup.request_stop()
        sup.request_stop()

    assert await sup.run(ready_timeout=30, on_ready=twice, signals=False) == 1
    assert sup.children[0].returncode == -signal.SIGKILL


async def test_when_one_child_dies_everything_stops_and_it_is_named() -> None:
    procs = [
        Proc("steady", trap("steady"), stage=0, ready_line="steady up"),
        Proc("flaky", py("print('flaky: giving up', flush=True); raise SystemExit(3)"), stage=1),
    ]
    sup, out = supervisor(procs, grace=30)
    ready: list[bool] = []
    code = await sup.run(ready_timeout=30, on_ready=lambda: ready.append(True), signals=False)
    seen = lines(out)
    assert code == 1, seen
    assert "flaky  | flaky: giving up" in seen, seen
    assert any("flaky stopped on its own (exit code 3): stopping everything" in line for line in seen), seen
    assert "steady | steady: got SIGTERM, cleaning up" in seen, seen
    assert sup.failed == ["flaky"], seen
    assert seen[-1].endswith("stopped; failed: flaky"), seen


async def test_a_child_not_ready_in_time_stops_everything() -> None:
    closed = free_port()   # nothing listens there
    procs = [Proc("waiting", trap("waiting"), ready_url=f"http://127.0.0.1:{closed}/ready"),
             Proc("never", trap("never"), stage=3)]
    sup, out = supervisor(procs, grace=30)
    assert await sup.run(ready_timeout=1, on_ready=pytest.fail, signals=False) == 1
    assert any("not ready after 1 s: waiting" in line for line in lines(out))
    assert sup.failed == ["waiting"]
    assert sup.children[1].process is None   # the next stage never started


async def test_a_program_that_cannot_start_is_reported() -> None:
    sup, out = supervisor([Proc("ghost", ["/nonexistent/program"])], grace=5)
    assert await sup.run(ready_timeout=5, on_ready=pytest.fail, signals=False) == 1
    assert any("ghost: cannot start /nonexistent/program" in line for line in lines(out))


# -- meetmesh up, the process ---------------------------------------------------------------------


def up_argv(*args: str) -> list[str]:
    """``meetmesh up`` once meetmesh.main registers it; until then its module's own entry point."""
    if _registered("up"):
        return [sys.executable, "-m", "meetmesh", "up", *args]
    return [sys.executable, "-m", "meetmesh.up", *args]


def gateway_only(port: int, data_dir: Path) -> list[str]:
    return up_argv("--scale", "user=0,meeting=0,media=0,ai=0", "--port-base", str(port),
                   "--data-dir", str(data_dir), "--grace", "30", "--ready-timeout", "60")


def low_free_port() -> int:
    """A free port that --port-base takes (up to 65000)."""
    while (port := free_port()) > 65000:
        pass
    return port


@pytest.fixture
def up_env(redis_url: str, key_prefix: str, redis: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEETMESH_")}
    return {**env, "MEETMESH_REDIS_URL": redis_url, "MEETMESH_KEY_PREFIX": key_prefix, "COLUMNS": "200"}


async def test_up_starts_the_gateway_and_sigterm_stops_it_gracefully(up_env: dict[str, str],
                                                                     tmp_path: Path) -> None:
    port = low_free_port()
    proc = await asyncio.create_subprocess_exec(*gateway_only(port, tmp_path), cwd=ROOT, env=up_env,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        while not any(line.startswith(READY_LINE) for line in seen):
            raw = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert raw, "\n".join(seen)
            seen.append(raw.decode().rstrip())
        text = "\n".join(seen)
        assert f"http://127.0.0.1:{port}" in text and "MEETMESH_ENV=dev (development mode" in text
        secret = (tmp_path / "dev-secret").read_text().strip()   # kept in the data folder
        async with httpx.AsyncClient() as http:   # the printed secret signs tokens the gateway takes
            answer = await http.get(f"http://127.0.0.1:{port}/api/v1/tasks/ai.nope",
                                    headers={"Authorization": f"Bearer {mint(secret, 'alice')}"})
            assert answer.status_code == 404, answer.text
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    seen += out.decode().splitlines()
    assert proc.returncode == 0, "\n".join(seen)
    assert any("gateway | INFO:     Shutting down" in line for line in seen), "\n".join(seen)
    assert seen[-1].rstrip().endswith("| stopped")


async def test_up_stops_and_exits_1_when_a_process_dies(up_env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if port > 65000:
            pytest.skip("the free port is above --port-base's range")
        proc = await asyncio.create_subprocess_exec(*gateway_only(port, tmp_path), cwd=ROOT, env=up_env,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 1, text
    assert "gateway stopped on its own (exit code 3): stopping everything" in text, text   # uvicorn's 3
    assert text.rstrip().endswith("stopped; failed: gateway"), text


# -- meetmesh submit -------------------------------------------------------------------------------


def _registered(command: str) -> bool:
    from meetmesh.main import app

    return any(c.name == command for c in app.registered_commands)


def submit_argv(*args: str) -> list[str]:
    """``meetmesh submit`` once meetmesh.main registers it; until then its module's own entry point."""
    if _registered("submit"):
        return [sys.executable, "-m", "meetmesh", "submit", *args]
    return [sys.executable, "-m", "meetmesh.submit", *args]


async def meetmesh_submit(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *submit_argv(*args), cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def mesh(redis_url: str, key_prefix: str, redis: Any) -> AsyncIterator[dict[str, str]]:
    """A real gateway in this process, workers running the gateway tests' stand-in handlers, and the
    environment a `meetmesh submit` process needs to reach them."""
    settings = GatewaySettings(redis_url=redis_url, key_prefix=key_prefix, jwt_secret=SECRET,
                               submit_rate=1000, submit_burst=1000)
    workers = [Worker(Queue(name, redis, prefix=key_prefix, max_retries=0), router, concurrency=10,
                      grace_seconds=1) for name in ("ai", "media")]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        async with serve(settings) as url:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MEETMESH_")}
            yield {**env, "MEETMESH_GATEWAY_URL": url, "MEETMESH_JWT_SECRET": SECRET, "COLUMNS": "120",
                   "MEETMESH_TOKEN": mint(SECRET, "cli")}
    finally:
        for w in workers:
            w.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)


async def test_submit_without_wait_prints_the_task_and_its_position(mesh: dict[str, str]) -> None:
    code, out, err = await meetmesh_submit("ai.chat", "--data", '{"q": 1}', "--json", env=mesh)
    assert code == 0, err
    accepted = json.loads(out)
    assert accepted["task_id"].startswith("ai.") and accepted["status"] == "queued"
    assert isinstance(accepted["position"], int)
    code, out, err = await meetmesh_submit("ai.chat", "--data", '{"q": 2}', "--priority", "high", env=mesh)
    assert code == 0, err
    assert out.startswith("queued ai.") and "(position " in out


async def test_submit_wait_streams_progress_then_the_result(mesh: dict[str, str]) -> None:
    code, out, err = await meetmesh_submit(
        "ai.summarize", "--data", '{"text": "alpha beta gamma"}', "--wait", "--json", env=mesh)
    assert code == 0, err
    frames = [json.loads(line) for line in out.splitlines()]
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "welcome" and "accepted" in kinds and kinds[-1] == "result"
    deltas = [f["delta"] for f in frames if f["type"] == "progress" and "delta" in f]
    assert deltas == ["alpha", "beta", "gamma"]
    assert frames[-1]["status"] == "completed"
    assert frames[-1]["result"] == {"summary": "alpha beta gamma"}
    # the live display: the streamed text, the status, then the result as JSON
    code, out, err = await meetmesh_submit(
        "ai.summarize", "--data", '{"text": "one two"}', "--wait", "--timeout", "30", env=mesh)
    assert code == 0, err
    assert "onetwo" in out and "result completed" in out and '"summary": "one two"' in out


async def test_submit_wait_exits_1_when_the_task_fails(mesh: dict[str, str]) -> None:
    code, out, err = await meetmesh_submit("media.cover", "--data", "{}", "--wait", env=mesh)
    assert code == 1, err
    assert "result failed" in out and "no video to take a cover from" in out


async def test_submit_refusals_are_one_line_and_exit_1(mesh: dict[str, str]) -> None:
    code, _, err = await meetmesh_submit("nope.task", "--wait", env=mesh)
    assert code == 1 and "unknown_task: unknown task type" in err and "Traceback" not in err
    code, _, err = await meetmesh_submit("nope.task", env=mesh)
    assert code == 1 and "unknown_task" in err
    code, _, err = await meetmesh_submit("ai.chat", "--wait", "--token", "not-a-jwt", env=mesh)
    assert code == 1 and "unauthorized" in err
    no_secret = {k: v for k, v in mesh.items() if k not in ("MEETMESH_JWT_SECRET", "MEETMESH_TOKEN")}
    code, _, err = await meetmesh_submit("ai.chat", env=no_secret)
    assert code != 0 and "no token" in err
    code, _, err = await meetmesh_submit("ai.chat", "--data", "{oops", env=mesh)
    assert code != 0 and "not JSON" in err
