"""ZeroMQ CURVE between the edge bridge and its nodes: the key files ``meetmesh edge keys`` makes,
the settings that name them, and the ZAP authenticator that lets in only known nodes.

``meetmesh edge keys DIR`` writes::

    DIR/bridge/server.key, server.key_secret   the bridge's key pair (the secret file, mode 0600)
    DIR/allowed/<node>.key                     public keys of the nodes the bridge lets in
    DIR/nodes/<node>.key, <node>.key_secret    each node's key pair (give a node its own)

Settings (environment, ``MEETMESH_`` prefix)::

    bridge  MEETMESH_EDGE_SERVER_SECRET_KEY   DIR/bridge/server.key_secret
            MEETMESH_EDGE_CLIENT_KEYS_DIR     DIR/allowed (read at every handshake: add or remove
                                              a node's key without a restart)
    node    MEETMESH_EDGE_NODE_SECRET_KEY     DIR/nodes/<node>.key_secret
            MEETMESH_EDGE_SERVER_PUBLIC_KEY   DIR/bridge/server.key

Outside development mode (``MEETMESH_ENV=dev``) a bridge or node with no keys configured refuses
to start (`ConfigError` naming the settings); in development mode it runs plain and logs that it does.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import zmq
import zmq.auth
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from zmq.auth.asyncio import AsyncioAuthenticator

from ..errors import ConfigError

log = logging.getLogger("meetmesh.edge.keys")
SERVER_SECRET = "MEETMESH_EDGE_SERVER_SECRET_KEY"
CLIENT_KEYS = "MEETMESH_EDGE_CLIENT_KEYS_DIR"
NODE_SECRET = "MEETMESH_EDGE_NODE_SECRET_KEY"
SERVER_PUBLIC = "MEETMESH_EDGE_SERVER_PUBLIC_KEY"
ZAP_DOMAIN = "meetmesh-edge"
LOG_EVERY = 60.0  # seconds between two log lines about one refused key
HOW = "`meetmesh edge keys DIR` makes them; MEETMESH_ENV=dev runs without (unauthenticated, in clear)"


class EdgeKeySettings(BaseSettings):
    """Where the CURVE keys are (see the module docstring), and ``MEETMESH_ENV``."""

    model_config = SettingsConfigDict(env_prefix="MEETMESH_", extra="ignore")

    env: str = ""
    edge_server_secret_key: Path | None = None
    edge_client_keys_dir: Path | None = None
    edge_node_secret_key: Path | None = None
    edge_server_public_key: Path | None = None

    @property
    def dev(self) -> bool:
        """Development mode: keys may be missing."""
        return self.env.strip().lower() == "dev"

    @classmethod
    def load(cls) -> EdgeKeySettings:
        """From the environment (`ConfigError` naming a bad variable)."""
        try:
            return cls()
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(f"MEETMESH_{str(err['loc'][0]).upper()}: {err['msg']}") from exc


@dataclass(frozen=True)
class BridgeKeys:
    """The bridge's key pair and the folder of the nodes' public keys it accepts."""

    public: bytes
    secret: bytes
    allowed_dir: Path


@dataclass(frozen=True)
class NodeKeys:
    """A node's key pair and the bridge's public key."""

    public: bytes
    secret: bytes
    server_public: bytes


def _key_pair(path: Path, variable: str) -> tuple[bytes, bytes]:
    public, secret = _load(path, variable)
    if secret is None:
        raise ConfigError(f"{variable}: {path} holds no secret key (give the .key_secret file)")
    return public, secret


def _load(path: Path, variable: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{variable}: cannot read a CURVE key from {path}: {exc}") from exc
    return public, secret


def _missing(*pairs: tuple[str, Path | None]) -> list[str]:
    return [name for name, value in pairs if value is None]


def bridge_keys(settings: EdgeKeySettings | None = None) -> BridgeKeys | None:
    """The bridge's keys from settings; None (plain, logged) only in development mode."""
    s = settings or EdgeKeySettings.load()
    missing = _missing((SERVER_SECRET, s.edge_server_secret_key), (CLIENT_KEYS, s.edge_client_keys_dir))
    if len(missing) == 2 and s.dev:
        log.warning("edge bridge: no CURVE keys (%s, %s unset) and MEETMESH_ENV=dev: nodes connect "
                    "unauthenticated, in clear", SERVER_SECRET, CLIENT_KEYS)
        return None
    if missing:
        raise ConfigError(f"the edge bridge authenticates its nodes with CURVE: set {' and '.join(missing)} "
                          f"({HOW})")
    assert s.edge_server_secret_key is not None and s.edge_client_keys_dir is not None
    public, secret = _key_pair(s.edge_server_secret_key, SERVER_SECRET)
    if not s.edge_client_keys_dir.is_dir():
        raise ConfigError(f"{CLIENT_KEYS}: {s.edge_client_keys_dir} is not a folder")
    return BridgeKeys(public, secret, s.edge_client_keys_dir)


def node_keys(settings: EdgeKeySettings | None = None) -> NodeKeys | None:
    """A node's keys from settings; None (plain, logged) only in development mode."""
    s = settings or EdgeKeySettings.load()
    missing = _missing((NODE_SECRET, s.edge_node_secret_key), (SERVER_PUBLIC, s.edge_server_public_key))
    if len(missing) == 2 and s.dev:
        log.warning("edge node: no CURVE keys (%s, %s unset) and MEETMESH_ENV=dev: talking to the "
                    "bridge unauthenticated, in clear", NODE_SECRET, SERVER_PUBLIC)
        return None
    if missing:
        raise ConfigError(f"an edge node talks to its bridge over CURVE: set {' and '.join(missing)} ({HOW})")
    assert s.edge_node_secret_key is not None and s.edge_server_public_key is not None
    public, secret = _key_pair(s.edge_node_secret_key, NODE_SECRET)
    server_public, _ = _load(s.edge_server_public_key, SERVER_PUBLIC)
    return NodeKeys(public, secret, server_public)


def bridge_settings(directory: str | os.PathLike[str]) -> dict[str, str]:
    """The bridge's settings for keys laid out by `create_keys` under ``directory``."""
    root = Path(directory)
    return {SERVER_SECRET: str(root / "bridge" / "server.key_secret"), CLIENT_KEYS: str(root / "allowed")}


def node_settings(directory: str | os.PathLike[str], node: str) -> dict[str, str]:
    """The settings of node ``node`` for keys laid out by `create_keys` under ``directory``."""
    root = Path(directory)
    return {NODE_SECRET: str(root / "nodes" / f"{node}.key_secret"),
            SERVER_PUBLIC: str(root / "bridge" / "server.key")}


def create_keys(directory: str | os.PathLike[str], nodes: list[str] | tuple[str, ...] = ("node",)
                ) -> dict[str, Any]:
    """Make the bridge's key pair and one per node under ``directory`` (layout in the module
    docstring); the nodes' public keys are copied into ``allowed``. Existing files are kept: an
    existing key pair is never replaced. Returns the settings: the bridge's, and ``nodes``: each
    node's."""
    root = Path(directory)
    bridge, allowed, node_dir = root / "bridge", root / "allowed", root / "nodes"
    for folder in (bridge, allowed, node_dir):
        folder.mkdir(parents=True, exist_ok=True)
    bridge.chmod(0o700)
    node_dir.chmod(0o700)
    _pair(bridge, "server")
    made: dict[str, Any] = {**bridge_settings(root), "nodes": {}}
    for name in nodes:
        if not name or "/" in name or name.startswith("."):
            raise ConfigError(f"a node key name is a plain file name, not {name!r}")
        _pair(node_dir, name)
        if not (allowed / f"{name}.key").exists():
            shutil.copyfile(node_dir / f"{name}.key", allowed / f"{name}.key")
        made["nodes"][name] = node_settings(root, name)
    return made


def _pair(folder: Path, name: str) -> None:
    if not (folder / f"{name}.key_secret").exists():
        mask = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
        try:
            zmq.auth.create_certificates(folder, name)
        finally:
            os.umask(mask)
        (folder / f"{name}.key").chmod(0o644)  # the public key may be read by anyone
    (folder / f"{name}.key_secret").chmod(0o600)


class _AllowedKeys:
    """ZAP credentials provider: a client key is allowed if a ``*.key`` file in the folder holds it
    (read at every handshake, so keys are added or removed without a restart). A refused key is
    logged, then again at most once a minute (a refused node reconnects every fraction of a second)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._logged: dict[bytes, float] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            allowed = zmq.auth.load_certificates(self.folder)
        except (OSError, ValueError) as exc:
            log.error("edge bridge: cannot read the allowed node keys in %s: %s", self.folder, exc)
            return False
        if key in allowed:
            return True
        now = time.monotonic()
        if now - self._logged.get(key, -LOG_EVERY) >= LOG_EVERY:
            if len(self._logged) > 1024:
                self._logged.clear()
            self._logged[key] = now
            log.warning("edge bridge refused a node: its CURVE key %s is not among the allowed keys in %s",
                        key.decode(errors="replace"), self.folder)
        return False


def start_authenticator(context: zmq.Context[Any], keys: BridgeKeys) -> AsyncioAuthenticator:
    """A ZAP handler on ``context`` (one per context) allowing CURVE clients whose public key is in
    ``keys.allowed_dir``; every refusal is logged with the key. Stop it with ``.stop()``."""
    auth = AsyncioAuthenticator(context, log=logging.getLogger("meetmesh.edge.zap"))
    auth.start()
    auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=_AllowedKeys(keys.allowed_dir))
    return auth


def curve_server(sock: zmq.Socket[Any], keys: BridgeKeys) -> None:
    """Make ``sock`` (before bind) a CURVE server with the bridge's key pair."""
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())


CurveOption = Literal["env", "off"]  # keys from settings (the default), or plain on purpose


def curve_client(sock: zmq.Socket[Any], keys: NodeKeys) -> None:
    """Make ``sock`` (before connect) a CURVE client of the bridge."""
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
