"""``meetmesh up``: the whole mesh on one machine, each part its own process.

`plan` lays the mesh out (pure: names, command lines, ports, readiness checks): the gateway, the
four services (``--scale ai=2`` runs replicas), one reference edge node per ai replica and, when
nothing answers at ``MEETMESH_REDIS_URL``, a private ``redis-server``. `Supervisor` runs any such
list of processes: it starts them stage by stage (each stage ready before the next starts: Redis,
then the gateway and services, then the edge nodes), prefixes every line they print with their name
in a colour of its own (``name | line``), stops all of them gracefully on SIGINT/SIGTERM (SIGTERM,
stage by stage: the gateway and services, then the edge nodes, so running ai tasks finish, then
Redis; SIGKILL past the grace period), and stops everything when one dies on its own (no restarts),
saying which. Children run in sessions of their own: a terminal's Ctrl-C reaches `up` alone, which
stops them in that order; on Linux they also get SIGTERM should `up` itself be killed.

Ports, from ``--port-base`` B (default 8000): the gateway B; the services B+101 (user), B+102
(meeting), B+103 (media), B+104 (ai), replica k (from 0) of a service 10*k above; the edge bridge of
ai replica k at 5555+(B-8000)+k, its edge node's StackFlow TCP at 10001+(B-8000)+k.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from shared.bus.errors import ConfigError
from shared.bus.redact import redact

SERVICES = ("user", "meeting", "media", "ai")
DEFAULT_PORT_BASE = 8000
SERVICE_OFFSETS = {"user": 101, "meeting": 102, "media": 103, "ai": 104}
REPLICA_STRIDE = 10
MAX_REPLICAS = 9
EDGE_BRIDGE_PORT = 5555
STACKFLOW_PORT = 10001
EDGE_KEYS_DIR = "edge-keys"  # in the data folder: the CURVE keys of the bridges and edge nodes
READY_LINE = "meetmesh up: ready"
REDACTED_BY_UP = "[redacted by up]"  # a token or secret a child printed outside its (redacting) logging
# A child that stops on our SIGTERM/SIGINT may exit 0 or re-raise the signal (uvicorn does)
CLEAN_EXITS = frozenset({0, -signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGINT})
COLOURS = ("cyan", "green", "magenta", "yellow", "blue", "bright_red", "bright_cyan", "bright_green",
           "bright_magenta", "bright_yellow", "bright_blue", "red")
# Redis first; the gateway and services; then the edge nodes (their bridges are the ai services'). They
# stop the other way round, except that edge nodes outlive the services: running ai tasks finish.
STAGE_REDIS, STAGE_MESH, STAGE_EDGE = 0, 2, 3
STOP_REDIS, STOP_EDGE, STOP_MESH = 0, 1, 2


@dataclass
class Proc:
    """One process to supervise.

    ``stage``: processes start in increasing stages, each stage ready before the next starts.
    ``stop_stage`` (default: ``stage``): they stop in decreasing stop stages, each stage gone (or
    the grace period over) before the next gets SIGTERM. Ready means ``ready_url`` answers 2xx
    (polled) and ``ready_line`` was printed (a substring of one output line); with neither, started
    is ready. ``env`` is laid over the supervisor's environment. ``url``/``note`` are what the
    summary shows.
    """

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stage: int = STAGE_MESH
    stop_stage: int | None = None
    ready_url: str | None = None
    ready_line: str | None = None
    url: str | None = None
    note: str = ""


# -- the layout -----------------------------------------------------------------------------------


def parse_scale(values: Iterable[str]) -> dict[str, int]:
    """``["ai=2", "media=3,user=1"]`` -> ``{"ai": 2, "media": 3, "user": 1}`` (0: do not run it)."""
    scale: dict[str, int] = {}
    for value in values:
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, sep, count = item.partition("=")
            name = name.strip()
            if not sep or name not in SERVICES:
                raise typer.BadParameter(f"{item!r}: use NAME=N with NAME one of {', '.join(SERVICES)}",
                                         param_hint="--scale")
            try:
                n = int(count)
            except ValueError:
                raise typer.BadParameter(f"{item!r}: N must be a whole number",
                                         param_hint="--scale") from None
            if not 0 <= n <= MAX_REPLICAS:
                raise typer.BadParameter(f"{item!r}: N must be 0 to {MAX_REPLICAS}", param_hint="--scale")
            scale[name] = n
    return scale


def edge_model_name(spec: str | None) -> str:
    """The name a node serves ``--model spec`` under (what the ai service asks its bridge for)."""
    if spec is None:
        from edge_node.models import DEFAULT_MODEL

        return DEFAULT_MODEL
    return "echo" if spec == "echo" else Path(spec).stem


def replica_name(service: str, k: int, count: int) -> str:
    """``ai`` when it runs alone; ``ai-1``, ``ai-2``, ... when scaled (k counts from 0)."""
    return service if count == 1 else f"{service}-{k + 1}"


def _host_for_clients(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class Layout:
    """What `plan` returns: the processes, and the environment every one of them shares."""

    procs: list[Proc]
    env: dict[str, str]
    gateway_url: str


def plan(*, scale: Mapping[str, int] | None = None, port_base: int = DEFAULT_PORT_BASE,
         host: str = "127.0.0.1", service_host: str = "127.0.0.1", edge_model: str | None = None,
         edge_capacity: int = 1, edge_token_delay: float = 0.0, stackflow: bool = True,
         python: str = sys.executable, edge_keys_dir: Path | None = None) -> Layout:
    """The mesh's processes and shared ``MEETMESH_*`` ports and URLs (see the module's docstring).
    With ``edge_keys_dir`` (keys `edge_keys.create_keys` makes there, one pair per edge node, named
    as the node), each ai replica's bridge and its edge node talk CURVE with those keys."""
    from shared.bus.edge.keys import bridge_settings, node_settings

    counts = {name: 1 for name in SERVICES} | dict(scale or {})
    offset = port_base - DEFAULT_PORT_BASE
    cli = [python, "-m", "meetmesh"]
    shost = _host_for_clients(service_host)
    env: dict[str, str] = {"MEETMESH_HOST": host, "MEETMESH_PORT": str(port_base)}
    procs: list[Proc] = []
    ports: list[tuple[str, int]] = [("gateway", port_base)]
    gateway_url = _url(_host_for_clients(host), port_base)
    procs.append(Proc("gateway", [*cli, "gateway", "--host", host, "--port", str(port_base)],
                      ready_url=gateway_url + "/ready", url=gateway_url,
                      note="REST /api/v1, WebSocket /ws, OpenAPI /docs"))
    model = edge_model_name(edge_model)
    env["MEETMESH_AI_MODEL"] = model   # what the ai service asks the edge nodes for
    for service in SERVICES:
        base = port_base + SERVICE_OFFSETS[service]
        env[f"MEETMESH_{service.upper()}_PORT"] = str(base)
        # The gateway proxies one URL per service: replica 0's (tasks reach every replica by the queue).
        env[f"MEETMESH_{service.upper()}_URL"] = _url(shost, base)
        count = counts[service]
        for k in range(count):
            name, port = replica_name(service, k, count), base + REPLICA_STRIDE * k
            ports.append((name, port))
            url = _url(shost, port)
            proc = Proc(name, [*cli, "service", service, "--port", str(port)], ready_url=url + "/ready",
                        url=url)
            procs.append(proc)
            if service != "ai":
                continue
            bridge = EDGE_BRIDGE_PORT + offset + k
            sf_port = STACKFLOW_PORT + offset + k if stackflow else 0
            ports.append((f"{name} edge bridge", bridge))
            if sf_port:
                ports.append((f"{name} StackFlow", sf_port))
            endpoint = f"tcp://127.0.0.1:{bridge}"
            proc.env = {"MEETMESH_EDGE_BIND": endpoint, "MEETMESH_EDGE_PORT_OFFSET": "0"}
            if edge_keys_dir is not None:
                proc.env |= bridge_settings(edge_keys_dir)
            proc.note = f"edge bridge {endpoint}"
            edge = replica_name("edge", k, count)
            argv = [*cli, "edge-node", "--connect", endpoint, "--stackflow-port", str(sf_port),
                    "--capacity", str(edge_capacity), "--name", edge]
            if edge_model is not None:
                argv += ["--model", edge_model]
            if edge_model == "echo" and edge_token_delay:
                argv += ["--token-delay", str(edge_token_delay)]
            note = f"model {model}, capacity {edge_capacity}"
            if sf_port:
                note += f", StackFlow TCP :{sf_port}"
            if edge_keys_dir is not None:
                note += ", CURVE"
            procs.append(Proc(edge, argv, stage=STAGE_EDGE, stop_stage=STOP_EDGE,
                              env=node_settings(edge_keys_dir, edge) if edge_keys_dir is not None else {},
                              ready_line="edge node ready", url=endpoint, note=note))
    for what, port in ports:
        if not 1024 <= port <= 65535:
            raise typer.BadParameter(f"{what} would get port {port}: pick another --port-base",
                                     param_hint="--port-base")
    procs.sort(key=lambda p: p.stage)
    return Layout(procs, env, gateway_url)


def redis_proc(port: int, workdir: str, binary: str = "redis-server") -> Proc:
    """A private redis-server as one more supervised process, started first and stopped last. (Not
    `embedded.ensure_redis`: its server would share our process group and die at once on the
    terminal's Ctrl-C, before the services drained.)

    It keeps its data in ``workdir`` (the mesh's data folder): an append-only file fsynced every
    second, so a graceful stop (SIGTERM: Redis fsyncs and exits) loses nothing acknowledged and a
    crash at most the last second; the next start on the same folder loads it back."""
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir, "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec"]
    return Proc("redis", argv, stage=STAGE_REDIS, stop_stage=STOP_REDIS,
                ready_line="Ready to accept connections", url=f"redis://127.0.0.1:{port}/0",
                note=f"private, kept in {workdir} (append-only file, fsync every second)")


# -- the supervisor --------------------------------------------------------------------------------


@dataclass
class _Child:
    proc: Proc
    colour: str
    process: asyncio.subprocess.Process | None = None
    reader: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None
    printed: asyncio.Event = field(default_factory=asyncio.Event)   # its ready_line was seen
    killed: bool = False

    @property
    def stop_stage(self) -> int:
        return self.proc.stage if self.proc.stop_stage is None else self.proc.stop_stage

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: a ``preexec_fn`` that has the child get SIGTERM if `up` itself dies (SIGKILL, OOM)
    rather than live on. Resolved here, in the parent: the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
        prctl(pr_set_pdeathsig, sigterm)

    return preexec


class Supervisor:
    """Runs ``procs`` (see `Proc`) as child processes until asked to stop or one of them exits.

    ``run()`` returns the exit code for ``up``: 0 when stopped on request and every child stopped
    cleanly, 1 when a child died on its own, did not get ready in time, or had to be killed.
    """

    def __init__(self, procs: Sequence[Proc], *, env: Mapping[str, str] | None = None,
                 console: Console | None = None, grace: float = 40.0, cwd: str | None = None) -> None:
        names = [p.name for p in procs]
        if len(set(names)) != len(names):
            raise ValueError(f"process names must be unique: {names}")
        self.children = [_Child(p, COLOURS[i % len(COLOURS)]) for i, p in enumerate(procs)]
        self.env = dict(os.environ if env is None else env)
        self.console = console or Console(highlight=False)
        self.grace = grace
        self.cwd = cwd
        self.width = max([len(n) for n in names] + [2])
        self.failed: list[str] = []       # died on their own, or never got ready
        self._stop = asyncio.Event()
        self._kill_now = asyncio.Event()
        self._stopping = False
        self._preexec = _die_with_parent()

    # -- output --

    def say(self, message: str, style: str = "bold") -> None:
        """A line of the supervisor's own, prefixed ``up``."""
        self._line("up", "bold white", redact(message), style)

    def _line(self, name: str, colour: str, line: str, style: str = "") -> None:
        text = Text.assemble((f"{name:<{self.width}} | ", colour), (line, style))
        self.console.print(text, soft_wrap=True)

    async def _read(self, child: _Child) -> None:
        process = child.process
        assert process is not None and process.stdout is not None
        stream = process.stdout
        while True:
            try:
                raw = await stream.readline()
            except ValueError:   # a line over the limit: its start was dropped
                raw = b"[... a very long line, cut ...]\n"
            if not raw:
                return
            # A child's own logging redacts tokens and secrets; anything else it prints is caught here.
            line = redact(raw.decode(errors="replace").rstrip("\r\n"), REDACTED_BY_UP)
            self._line(child.proc.name, child.colour, line)
            if child.proc.ready_line and child.proc.ready_line in line:
                child.printed.set()

    # -- lifecycle --

    async def _spawn(self, child: _Child) -> None:
        env = {**self.env, **child.proc.env, "PYTHONUNBUFFERED": "1"}
        options: dict[str, Any] = {}
        if self._preexec is not None:
            options["preexec_fn"] = self._preexec
        try:
            child.process = await asyncio.create_subprocess_exec(
                *child.proc.argv, env=env, cwd=self.cwd, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, limit=1 << 20,
                # its own session: the terminal's Ctrl-C reaches `up` alone, which stops the children in order
                start_new_session=True, **options)
        except OSError as exc:
            self.say(f"{child.proc.name}: cannot start {child.proc.argv[0]}: {exc}", "bold red")
            self.failed.append(child.proc.name)
            self._stop.set()
            return
        child.reader = asyncio.create_task(self._read(child), name=f"up-read-{child.proc.name}")
        child.watcher = asyncio.create_task(self._watch(child), name=f"up-watch-{child.proc.name}")

    async def _watch(self, child: _Child) -> None:
        assert child.process is not None and child.reader is not None
        code = await child.process.wait()
        # the last lines (often the reason it died) print before we say it died
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(child.reader), 2.0)
        if self._stopping:
            return
        self.failed.append(child.proc.name)
        self.say(f"{child.proc.name} stopped on its own ({describe_exit(code)}): stopping everything "
                 "(no restarts)", "bold red")
        self._stop.set()

    async def _is_ready(self, child: _Child, client: httpx.AsyncClient) -> bool:
        if child.proc.ready_line and not child.printed.is_set():
            return False
        if child.proc.ready_url:
            try:
                answer = await client.get(child.proc.ready_url)
            except httpx.HTTPError:
                return False
            return answer.is_success
        return True

    async def _wait_ready(self, children: Sequence[_Child], timeout: float) -> bool:
        """True once every one of ``children`` is ready; False if stopping first or time ran out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = [c for c in children if c.process is not None]
        async with httpx.AsyncClient(timeout=2.0) as client:
            while pending:
                if self._stop.is_set():
                    return False
                checks = await asyncio.gather(*(self._is_ready(c, client) for c in pending))
                pending = [c for c, ok in zip(pending, checks, strict=True) if not ok]
                if not pending:
                    break
                if loop.time() >= deadline:
                    names = ", ".join(c.proc.name for c in pending)
                    self.say(f"not ready after {timeout:g} s: {names}; stopping everything", "bold red")
                    self.failed.extend(c.proc.name for c in pending)
                    return False
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.2)
        return not self._stop.is_set()

    def request_stop(self) -> None:
        """SIGINT/SIGTERM: stop gracefully; a second one kills whatever is left at once."""
        if self._stop.is_set() or self._stopping:
            self._kill_now.set()
            return
        self.say("stopping (again to kill at once)")
        self._stop.set()

    async def start(self, *, ready_timeout: float | None = 120.0) -> bool:
        """Start stage after stage; True when all are ready (or not waited for)."""
        for stage in sorted({c.proc.stage for c in self.children}):
            group = [c for c in self.children if c.proc.stage == stage]
            for child in group:
                if self._stop.is_set():
                    return False
                await self._spawn(child)
            if ready_timeout is not None and not await self._wait_ready(group, ready_timeout):
                return False
        return not self._stop.is_set()

    async def stop(self) -> None:
        """SIGTERM stage by stage (latest first), wait up to the grace period in all, then SIGKILL."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace
        for stage in sorted({c.stop_stage for c in self.children}, reverse=True):
            group = [c for c in self.children if c.process is not None and c.watcher is not None]
            group = [c for c in group if c.stop_stage == stage]
            for child in group:
                if child.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        child.process.send_signal(signal.SIGTERM)   # type: ignore[union-attr]
            waits: set[asyncio.Future[Any]] = {c.watcher for c in group if c.watcher is not None}
            kill = asyncio.ensure_future(self._kill_now.wait())
            try:
                while waits and not kill.done() and loop.time() < deadline:
                    _, waits = await asyncio.wait([*waits, kill], timeout=deadline - loop.time(),
                                                  return_when=asyncio.FIRST_COMPLETED)
                    waits.discard(kill)
            finally:
                kill.cancel()
        left = [c for c in self.children if c.process is not None and c.returncode is None]
        for child in left:
            child.killed = True
            self.say(f"{child.proc.name} still running after the grace period: SIGKILL", "bold red")
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()   # type: ignore[union-attr]
        watchers = [c.watcher for c in self.children if c.watcher is not None]
        if watchers:
            await asyncio.gather(*watchers, return_exceptions=True)

    async def run(self, *, ready_timeout: float | None = 120.0, on_ready: Callable[[], None] | None = None,
                  signals: bool = True) -> int:
        """Start, serve until SIGINT/SIGTERM (``request_stop``) or a child exits, stop; the exit code."""
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        if signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop)
                handled.append(sig)
        try:
            if await self.start(ready_timeout=ready_timeout):
                if on_ready is not None:
                    on_ready()
                await self._stop.wait()
        finally:
            await self.stop()
            for sig in handled:
                loop.remove_signal_handler(sig)
        unclean = [c.proc.name for c in self.children if c.process is not None
                   and c.proc.name not in self.failed and (c.killed or c.returncode not in CLEAN_EXITS)]
        for child in self.children:
            if child.proc.name in unclean and not child.killed:
                self.say(f"{child.proc.name} stopped with {describe_exit(child.returncode)}", "bold yellow")
        if self.failed:
            self.say(f"stopped; failed: {', '.join(dict.fromkeys(self.failed))}", "bold red")
            return 1
        if unclean:
            return 1
        self.say("stopped")
        return 0

# -- the command ----------------------------------------------------------------------------------


def signing_mode(folder: Path, environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], str]:
    """The mode and secret of a local run: the environment the processes get and a line saying so.

    ``MEETMESH_ENV`` defaults to ``dev`` here (a local run is development unless told otherwise).
    Development mode without ``MEETMESH_JWT_SECRET`` (or ``_FILE``): the processes sign with the data
    folder's development secret, ``<folder>/dev-secret`` (mode 0600), made on the first run and kept,
    so tokens stay valid across restarts and ``meetmesh token``/``submit`` in another shell find it.
    Any other mode needs the secret configured (`ConfigError` otherwise)."""
    from shared.bus.credentials import DEV, ENV_VARIABLE, dev_secret, dev_secret_path, is_dev, secret_from_env

    env = os.environ if environ is None else environ
    mode = env.get(ENV_VARIABLE) or DEV
    if secret_from_env("MEETMESH_JWT_SECRET", env) is not None:
        return {ENV_VARIABLE: mode}, f"{ENV_VARIABLE}={mode}; tokens are signed with MEETMESH_JWT_SECRET"
    if not is_dev(mode):
        raise ConfigError(f"{ENV_VARIABLE}={mode} needs MEETMESH_JWT_SECRET (or MEETMESH_JWT_SECRET_FILE): "
                          f"set one, or run in development mode ({ENV_VARIABLE}={DEV}, the default of `up`)")
    path = dev_secret_path(folder)
    kept = path.exists()
    dev_secret(folder)
    return {ENV_VARIABLE: DEV}, (f"{ENV_VARIABLE}={DEV} (development mode, for this local run): tokens are "
                                 f"signed with the development secret {'kept' if kept else 'made'} in "
                                 f"{path}; never deploy with it")


def _summary(layout: Layout, procs: Sequence[Proc], *, redis_url: str, data_dir: Path, key_prefix: str,
             secret: str | None = None) -> list[Any]:
    """One screen: where everything is, and how to get a token (renderables for `Console.print`)."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_column(style="dim")
    for p in sorted(procs, key=lambda p: p.stage == STAGE_REDIS):   # redis last
        table.add_row(p.name, p.url or "", p.note)
    if not any(p.name == "redis" for p in procs):
        table.add_row("redis", redis_url, "")
    table.add_row("data", str(data_dir), f"key prefix {key_prefix}")
    gw = layout.gateway_url
    # `meetmesh token`/`submit` find the development secret and the store in the data folder
    env = "" if data_dir == Path(".meetmesh").resolve() else f"MEETMESH_DATA_DIR={data_dir} "
    register = ('{"username": "alice", "password": "correct horse battery"}')
    hints = [
        Text.assemble(("token   ", "bold"), f"curl -s {gw}/api/v1/auth/register "
                      f"-H 'content-type: application/json' -d '{register}'"),
        Text.assemble(("  or    ", "bold"), f"{env}meetmesh token --user alice   (a registered user)"),
        Text.assemble(("submit  ", "bold"), f"{env}meetmesh submit ai.summarize --user alice "
                      f"--data '{{\"text\": \"...\"}}' --wait --gateway {gw}"),
        Text.assemble(("stop    ", "bold"),
                      "Ctrl-C (or SIGTERM to this process) stops every process gracefully"),
    ]
    if secret:
        hints.append(Text(secret, style="yellow"))
    return [Panel(table, title="MeetMesh is up", expand=False), *hints]


def up_cmd(
    scale: Annotated[list[str] | None, typer.Option(
        help="Replicas: NAME=N for user, meeting, media or ai (0: not at all); repeat or comma-separate. "
             "Each ai replica gets an edge node of its own.", metavar="NAME=N")] = None,
    edge_model: Annotated[str | None, typer.Option(
        help="The edge nodes' model: a .gguf file or 'echo' (fast, deterministic). "
             "Default: SmolLM2-135M-Instruct.")] = None,
    edge_capacity: Annotated[int, typer.Option(min=1, help="Inferences at once per edge node.")] = 1,
    edge_token_delay: Annotated[float, typer.Option(
        min=0.0, help="--edge-model echo: seconds between streamed tokens.")] = 0.0,
    stackflow: Annotated[bool, typer.Option(
        "--stackflow/--no-stackflow", help="Edge nodes serve StackFlow TCP (port 10001+...).")] = True,
    port_base: Annotated[int, typer.Option(
        min=1024, max=65000, help="Gateway port; services at +101..+104 (replica k: +10*k), "
                                  "edge bridges at 5555+(BASE-8000)+k.")] = DEFAULT_PORT_BASE,
    host: Annotated[str, typer.Option(help="The gateway's interface.")] = "127.0.0.1",
    data_dir: Annotated[Path | None, typer.Option(
        help="Where the SQLite store and a private Redis's data live (default MEETMESH_DATA_DIR, "
             "./.meetmesh).")] = None,
    grace: Annotated[float, typer.Option(
        min=0.0, help="Seconds the processes get to stop after SIGTERM before SIGKILL.")] = 40.0,
    ready_timeout: Annotated[float, typer.Option(
        min=1.0, help="Seconds each stage may take to get ready (/ready answers).")] = 180.0,
) -> None:
    """Run the whole mesh, each part its own process, until Ctrl-C or SIGTERM.

    The gateway, the user, meeting, media and ai services and a reference edge node per ai replica,
    output prefixed by name. Uses Redis at MEETMESH_REDIS_URL (refusing to start when nothing answers
    there); when it is not set and nothing answers at the default address, starts a private
    redis-server that keeps its data in DATA_DIR/redis.
    Sets MEETMESH_ENV=dev (development mode) unless MEETMESH_ENV says otherwise; without
    MEETMESH_JWT_SECRET, tokens are then signed with the development secret kept in DATA_DIR/dev-secret
    (made once), which `meetmesh token` and `meetmesh submit` find there too.
    Ctrl-C or SIGTERM stops everything gracefully; if any process dies, everything stops
    (exit code 1)."""
    from shared.bus.connection import redact_url
    from shared.bus.settings import BusSettings

    from .common import run

    console = Console(highlight=False)
    settings = BusSettings.load()
    folder = (data_dir or Path(os.environ.get("MEETMESH_DATA_DIR") or ".meetmesh")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    layout = plan(scale=parse_scale(scale or ()), port_base=port_base, host=host,
                  service_host=os.environ.get("MEETMESH_SERVICE_HOST", "127.0.0.1"),
                  edge_model=edge_model, edge_capacity=edge_capacity, edge_token_delay=edge_token_delay,
                  stackflow=stackflow, edge_keys_dir=folder / EDGE_KEYS_DIR)
    # CURVE between the ai services' bridges and their edge nodes: a key pair each, kept for restarts
    from shared.bus.edge.keys import create_keys

    create_keys(folder / EDGE_KEYS_DIR, [p.name for p in layout.procs if p.stage == STAGE_EDGE])
    try:
        mode_env, mode_note = signing_mode(folder)
    except ConfigError as exc:
        sys.exit(f"meetmesh up: {exc}")
    from shared.bus.credentials import find_dev_secret
    from shared.bus.redact import install

    install(secrets=[find_dev_secret(folder)])  # up's own records, tracebacks and children's lines
    console.print(f"meetmesh up: {mode_note}", highlight=False, soft_wrap=True)

    async def main() -> int:
        procs = list(layout.procs)
        redis_url = settings.redis_url
        if not await _answers(redis_url):
            if settings.redis_url_configured:
                sys.exit(f"meetmesh up: no Redis answers at MEETMESH_REDIS_URL={redact_url(redis_url)}; "
                         "fix the URL or start that Redis (a private one is only started when no URL "
                         "is configured)")
            binary = shutil.which("redis-server")
            if binary is None:
                sys.exit(f"meetmesh up: MEETMESH_REDIS_URL is not set, nothing answers at {redis_url}, "
                         "and redis-server is not on PATH to start a private one")
            workdir = folder / "redis"
            workdir.mkdir(exist_ok=True)
            private = redis_proc(free_port(), str(workdir), binary)
            console.print(f"meetmesh up: MEETMESH_REDIS_URL is not set and nothing answers at {redis_url}; "
                          f"starting a private redis-server at {private.url}, data kept in {workdir}",
                          highlight=False, soft_wrap=True)
            redis_url = str(private.url)
            procs.insert(0, private)
        env = {**os.environ, **layout.env, "MEETMESH_REDIS_URL": redis_url, "MEETMESH_DATA_DIR": str(folder)}
        env.update(mode_env)
        supervisor = Supervisor(procs, env=env, console=console, grace=grace)

        def ready() -> None:
            for part in _summary(layout, procs, redis_url=redis_url, data_dir=folder,
                                 key_prefix=settings.key_prefix, secret=mode_note):
                console.print(part, soft_wrap=not isinstance(part, Panel))
            console.print(f"{READY_LINE} ({len(procs)} processes)", highlight=False)

        names = ", ".join(p.name for p in procs)
        supervisor.say(f"starting {len(procs)} process{'es' if len(procs) != 1 else ''}: {names}")
        return await supervisor.run(ready_timeout=ready_timeout, on_ready=ready)

    code = run(main)
    raise typer.Exit(code)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _answers(url: str) -> bool:
    """Does a Redis answer at ``url``?"""
    from shared.bus.connection import connect
    from shared.bus.errors import BusConnectionError

    try:
        client = await connect(url)
    except BusConnectionError:
        return False
    await client.aclose()
    return True


def register(app: typer.Typer) -> None:
    """Add ``up`` to the ``meetmesh`` app."""
    app.command("up")(up_cmd)


def main(argv: list[str] | None = None) -> Any:
    """``python -m meetmesh.up [OPTIONS]``: ``meetmesh up`` on its own."""
    standalone = typer.Typer(add_completion=False)
    standalone.command()(up_cmd)
    return standalone(argv)


if __name__ == "__main__":
    main()
