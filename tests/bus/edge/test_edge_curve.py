"""CURVE between the edge bridge and its nodes: keys made by ``meetmesh edge keys``, a node with a
known key served, one with an unknown key (or none) refused and logged, and no keys outside
development mode a start-up error naming the settings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import typer
import zmq
import zmq.asyncio
from typer.testing import CliRunner

from edge_node.models import EchoModel
from edge_node.node import EdgeNode, EdgeUnits
from meetmesh.edge import register
from meetmesh.up import STAGE_EDGE, plan
from shared.bus.edge.keys import (
    CLIENT_KEYS,
    NODE_SECRET,
    SERVER_PUBLIC,
    SERVER_SECRET,
    EdgeKeySettings,
    NodeKeys,
    create_keys,
    node_keys,
)
from shared.bus.edge.pool import EdgeBridge
from shared.bus.edge.stackflow import EdgeUnavailable
from shared.bus.errors import ConfigError

WAIT = 20.0
VARIABLES = (SERVER_SECRET, CLIENT_KEYS, NODE_SECRET, SERVER_PUBLIC)


@pytest.fixture(autouse=True)
def production(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not development mode, and no keys in the environment unless a test sets them."""
    monkeypatch.delenv("MEETMESH_ENV", raising=False)
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)


async def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


def keys_of(made: dict[str, Any], node: str) -> NodeKeys:
    keys = node_keys(EdgeKeySettings(**{k.removeprefix("MEETMESH_").lower(): v
                                        for k, v in made["nodes"][node].items()}))
    assert keys is not None
    return keys


@contextlib.asynccontextmanager
async def curve_bridge(made: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[EdgeBridge]:
    """A bridge taking its keys from the environment, as the ai service's does."""
    monkeypatch.setenv(SERVER_SECRET, made[SERVER_SECRET])
    monkeypatch.setenv(CLIENT_KEYS, made[CLIENT_KEYS])
    async with EdgeBridge("tcp://127.0.0.1:*", heartbeat=0.3, request_timeout=WAIT) as bridge:
        assert bridge.keys is not None
        yield bridge


@contextlib.asynccontextmanager
async def node(endpoint: str, name: str, keys: NodeKeys) -> AsyncIterator[EdgeNode]:
    edge = EdgeNode(EdgeUnits([EchoModel()]), connect=endpoint, name=name, heartbeat=0.3, curve=keys)
    task = asyncio.create_task(edge.run())
    try:
        yield edge
    finally:
        edge.stop()
        await asyncio.wait_for(task, WAIT)


def refusals(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def test_edge_keys_makes_key_pairs_and_prints_the_settings(tmp_path: Path) -> None:
    app, bench = typer.Typer(), typer.Typer()
    app.add_typer(bench, name="bench")
    register(app, bench)
    result = CliRunner().invoke(app, ["edge", "keys", str(tmp_path / "keys"), "--node", "a", "--node", "b",
                                      "--json"])
    assert result.exit_code == 0, result.output
    made = json.loads(result.output)
    allowed = Path(made[CLIENT_KEYS])
    assert sorted(p.name for p in allowed.iterdir()) == ["a.key", "b.key"]  # public keys only
    for secret in [Path(made[SERVER_SECRET])] + [Path(n[NODE_SECRET]) for n in made["nodes"].values()]:
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert "secret-key" in secret.read_text()
    assert all("secret-key" not in p.read_text() for p in allowed.iterdir())
    assert keys_of(made, "a").public != keys_of(made, "b").public
    again = create_keys(tmp_path / "keys", ["a"])  # run again: the pairs are kept
    assert keys_of(again, "a") == keys_of(made, "a")


async def test_meetmesh_up_wires_keys_so_its_nodes_are_served(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``meetmesh up``'s layout: each ai replica's bridge and its edge node get the settings of keys
    made in the data folder; with exactly those settings, the node is let in and served."""
    layout = plan(scale={"ai": 2}, edge_model="echo", python="py", edge_keys_dir=tmp_path / "edge-keys")
    by_name = {p.name: p for p in layout.procs}
    made = create_keys(tmp_path / "edge-keys", [p.name for p in layout.procs if p.stage == STAGE_EDGE])
    assert sorted(made["nodes"]) == ["edge-1", "edge-2"]
    for k in (1, 2):
        assert {v: by_name[f"ai-{k}"].env[v] for v in (SERVER_SECRET, CLIENT_KEYS)} == {
            v: made[v] for v in (SERVER_SECRET, CLIENT_KEYS)}
        assert by_name[f"edge-{k}"].env == made["nodes"][f"edge-{k}"]
    for variable in (SERVER_SECRET, CLIENT_KEYS):
        monkeypatch.setenv(variable, by_name["ai-2"].env[variable])
    async with EdgeBridge("tcp://127.0.0.1:*", heartbeat=0.3, request_timeout=WAIT) as bridge:
        for variable in (NODE_SECRET, SERVER_PUBLIC):  # the node reads its own from the environment
            monkeypatch.setenv(variable, by_name["edge-2"].env[variable])
        edge = EdgeNode(EdgeUnits([EchoModel()]), connect=bridge.endpoint, name="edge-2", heartbeat=0.3)
        task = asyncio.create_task(edge.run())
        try:
            await bridge.wait_for_nodes(1, model="echo", timeout=WAIT)
            assert bridge.keys is not None and edge.keys is not None
            assert await bridge.complete("echo", "the minutes of the meeting") == "the minutes of the meeting"
        finally:
            edge.stop()
            await asyncio.wait_for(task, WAIT)


async def test_a_node_with_an_unknown_key_is_refused_and_logged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    made = create_keys(tmp_path / "mesh", ["good"])
    stranger = keys_of(create_keys(tmp_path / "elsewhere", ["rogue"]), "rogue")
    async with curve_bridge(made, monkeypatch) as bridge:
        # the bridge's public key is no secret: a stranger may well have it
        rogue_keys = NodeKeys(stranger.public, stranger.secret, bridge.keys.public)  # type: ignore[union-attr]
        async with node(bridge.endpoint, "rogue", rogue_keys) as rogue:
            await until(lambda: bool(refusals(caplog, "refused a node")), "the refusal logged")
            (line,) = refusals(caplog, "refused a node")[:1]
            assert stranger.public.decode() in line and made[CLIENT_KEYS] in line
            assert bridge.nodes() == [] and bridge.stats().nodes_joined == 0
            with pytest.raises(EdgeUnavailable):  # nothing of the meeting is sent its way
                await bridge.complete("echo", "the confidential minutes")
            assert not rogue.registered.is_set() and rogue.units.units == {} and rogue.units.served == 0
            async with node(bridge.endpoint, "good", keys_of(made, "good")):  # the known node gets in
                await bridge.wait_for_nodes(1, model="echo", timeout=WAIT)
                assert [n.name for n in bridge.nodes()] == ["good"]


async def test_a_plain_client_is_refused_and_logged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    made = create_keys(tmp_path, ["good"])
    async with curve_bridge(made, monkeypatch) as bridge:
        context = zmq.asyncio.Context()
        plain = context.socket(zmq.DEALER)
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(bridge.endpoint)
        try:
            await plain.send_multipart([b'R{"name": "plain", "models": ["echo"], "capacity": 1}'])
            await until(lambda: bool(refusals(caplog, "handshake failed")), "the refusal logged")
            assert bridge.nodes() == [] and bridge.stats().nodes_joined == 0
            assert await plain.poll(100) == 0  # not a byte came back
        finally:
            plain.close(linger=0)
            context.term()


async def test_without_keys_outside_development_mode_nothing_starts(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as bridge_error:
        await EdgeBridge("tcp://127.0.0.1:*").start()
    assert SERVER_SECRET in str(bridge_error.value) and CLIENT_KEYS in str(bridge_error.value)
    assert "meetmesh edge keys" in str(bridge_error.value)
    with pytest.raises(ConfigError) as node_error:
        await EdgeNode(EdgeUnits([EchoModel()]), connect="tcp://127.0.0.1:1").run()
    assert NODE_SECRET in str(node_error.value) and SERVER_PUBLIC in str(node_error.value)
    made = create_keys(tmp_path, ["n"])
    monkeypatch.setenv(SERVER_SECRET, made[SERVER_SECRET])  # half the settings: the other one named
    with pytest.raises(ConfigError) as half:
        await EdgeBridge("tcp://127.0.0.1:*").start()
    assert CLIENT_KEYS in str(half.value) and SERVER_SECRET not in str(half.value).split("set ", 1)[1]
    monkeypatch.setenv(CLIENT_KEYS, made["nodes"]["n"][NODE_SECRET])  # a file, not a folder
    with pytest.raises(ConfigError, match=CLIENT_KEYS):
        await EdgeBridge("tcp://127.0.0.1:*").start()


async def test_in_development_mode_the_bridge_runs_plain_and_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MEETMESH_ENV", "dev")
    async with EdgeBridge("tcp://127.0.0.1:*") as bridge:
        assert bridge.keys is None
    assert refusals(caplog, "no CURVE keys")
