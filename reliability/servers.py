"""Private servers for fault scenarios: a redis-server or nats-server of our own, on a free port with
its data in a temporary folder, that a scenario may stop, kill and start again (never the machine's)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class PrivateServer:
    """One server process of ours: ``start()``, ``shutdown()`` (graceful), ``kill()`` (SIGKILL),
    ``start()`` again on the same port and data folder, and ``close()`` at the end (the folder goes too).
    Its process runs in its own session, so a signal reaches nothing else."""

    binary = ""
    start_timeout = START_TIMEOUT  # seconds a start may take before it is an error

    def __init__(self, name: str) -> None:
        if shutil.which(self.binary) is None:
            raise RuntimeError(f"{self.binary} is not on PATH")
        self.name = name
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"meetmesh-chaos-{name}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def command(self) -> list[str]:
        raise NotImplementedError

    def spawn_options(self) -> dict[str, Any]:
        """More arguments for the server's ``Popen`` (its environment, its user)."""
        return {}

    def ready(self) -> bool:
        """The server answers (a TCP connect by default)."""
        return _answers(self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> None:
        if self.running:
            return
        log = (self.dir / f"{self.name}.log").open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,  # noqa: ASYNC220
                                     **self.spawn_options(),
                                     cwd=self.dir, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.binary} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.binary} did not answer on port {self.port} "
                                   f"in {self.start_timeout}s")
            await asyncio.sleep(0.02)

    async def shutdown(self) -> None:
        """Stop it gracefully (SIGTERM: both servers write what they hold, then exit)."""
        await self._stop(signal.SIGTERM)

    async def kill(self) -> None:
        """Stop it with SIGKILL: whatever it had not written to disk is gone."""
        await self._stop(signal.SIGKILL)

    async def _stop(self, sig: signal.Signals) -> None:
        if not self.running:
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        deadline = time.monotonic() + START_TIMEOUT
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                os.killpg(self.proc.pid, signal.SIGKILL)
            await asyncio.sleep(0.01)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.dir / f"{self.name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        if self.running:
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()


class PrivateRedis(PrivateServer):
    """redis-server with AOF on (``appendfsync`` everysec by default), no RDB snapshots."""

    binary = "redis-server"

    def __init__(self, name: str = "redis", *, fsync: str = "everysec") -> None:
        super().__init__(name)
        self.fsync = fsync

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "", "--daemonize", "no",
                "--protected-mode", "no", "--logfile", ""]

    def ready(self) -> bool:
        """Answers PING with PONG (it refuses commands with LOADING while it reads the AOF)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


class PrivateNats(PrivateServer):
    """nats-server with JetStream, its store in the temporary folder."""

    binary = "nats-server"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.dir / "store")]


class PrivateRabbit(PrivateServer):
    """rabbitmq-server as a node of its own (``mmchaos-<port>@localhost``): its own AMQP and
    distribution ports, its database and logs in the temporary folder, no plugins (the machine's
    management plugin would want the machine's port). Debian's ``rabbitmq-server`` drops to the
    ``rabbitmq`` user through ``su``, which would start a session of its own that our signals do not
    reach; so, as root, the node's own script runs as that user directly, in our session, and the
    folder is handed to that user.
    Its user ``guest`` may connect from anywhere (``loopback_users = none``): the node listens on
    127.0.0.1 only."""

    binary = "rabbitmq-server"
    start_timeout = 90.0  # an Erlang node boots in ~10 s on an idle 2-core machine

    def __init__(self, name: str = "rabbit") -> None:
        super().__init__(name)
        self.dist_port = free_port()
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"loopback_users = none\nlisteners.tcp.default = 127.0.0.1:{self.port}\n")
        user = self._rabbitmq_user() if os.geteuid() == 0 else None
        if user is not None:
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def command(self) -> list[str]:
        script = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # Debian's; behind the su wrapper
        return [str(script) if script.exists() else self.binary]

    def spawn_options(self) -> dict[str, Any]:
        d = self.dir
        options: dict[str, Any] = {}
        env = dict(os.environ)
        if os.geteuid() == 0 and self._rabbitmq_user() is not None:
            options["user"] = options["group"] = "rabbitmq"
            env["HOME"] = "/var/lib/rabbitmq"  # the Erlang cookie the node and rabbitmqctl share
        options["env"] = {**env, "RABBITMQ_NODENAME": f"mmchaos-{self.port}@localhost",
                "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(d / "mnesia"), "RABBITMQ_LOG_BASE": str(d / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_PID_FILE": str(d / "pid"), "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq")}
        return options

    @staticmethod
    def _rabbitmq_user() -> Any:
        import pwd

        try:
            return pwd.getpwnam("rabbitmq")
        except KeyError:
            return None

    def ready(self) -> bool:
        """Answers the AMQP 0-9-1 header with connection.start (a method frame: type 1)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"AMQP\x00\x00\x09\x01")
                return s.recv(1) == b"\x01"
        except OSError:
            return False
