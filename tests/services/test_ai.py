"""The ai service with a real bridge and in-process echo edge nodes: a chat streamed token by token,
"task full" shrinking the worker's adaptive limiter, no node (retried, then a clear failure), the
tasks no model serves, bad payloads, and a meeting's chat summarised when it ends (the real meeting
service, and a stub for a meeting without chat). No timing assertions: waits are generous deadlines."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edge_node.models import EchoModel
from edge_node.node import EdgeNode, EdgeUnits
from services.ai.assistant import (
    MEETING_ENDED,
    NO_ASR,
    NO_CHAT,
    NO_EMOTION,
    ORIGIN_HEADER,
    SUMMARY_EVENT,
)
from services.ai.service import AiService, build
from services.ai.settings import AiSettings
from services.common import Actor, ServiceSettings, identity_headers
from services.meeting.schemas import ChatMessageOut
from services.meeting.service import build as build_meeting
from shared.bus import Context, Priority, Queue, RateLimited, TaskRecord, TaskStatus
from shared.bus.edge.keys import create_keys

from ..conftest import REDIS_URL
from ..gateway.conftest import SECRET
from .conftest import recording, until
from .harness import CHEAP_ARGON2

WAIT = 20.0
WORDS = "one two three four five six seven eight"
FAST_RETRIES = {"retry_base_seconds": 0.02, "retry_cap_seconds": 0.2}


@pytest.fixture(autouse=True)
def curve_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bridge runs with CURVE, as outside dev mode it must: keys for it and the echo node."""
    made = create_keys(tmp_path / "edge-keys", ["echo-node"])
    for name, value in {**made["nodes"]["echo-node"],
                        **{k: v for k, v in made.items() if k != "nodes"}}.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def settings(key_prefix: str, redis: Any, tmp_path: Path) -> AiSettings:
    return AiSettings(
        redis_url=REDIS_URL, key_prefix=key_prefix, data_dir=tmp_path, jwt_secret=SECRET,
        worker_concurrency=8, grace_seconds=5.0, edge_bind="tcp://127.0.0.1:*", edge_heartbeat=1.0,
        ai_model="echo", ai_request_timeout=WAIT, ai_max_tokens=64, ai_limit_initial=4, ai_limit_min=1,
        ai_limit_max=4, ai_limit_quiet_seconds=3600.0, **CHEAP_ARGON2,
    )


@contextlib.asynccontextmanager
async def ai_service(settings: AiSettings, **options: Any) -> AsyncIterator[AiService]:
    service = build(settings, port=0, queue_options=FAST_RETRIES, **options)
    async with service.running():
        yield service


@contextlib.asynccontextmanager
async def edge_node(service: AiService, *, capacity: int = 4, delay: float = 0.0) -> AsyncIterator[EdgeNode]:
    """An in-process node serving the echo model, registered with the service's bridge."""
    node = EdgeNode(EdgeUnits([EchoModel(delay=delay)], capacity=capacity), connect=service.bridge.endpoint,
                    name="echo-node")
    task = asyncio.create_task(node.run())
    try:
        await service.bridge.wait_for_nodes(1, model="echo", timeout=WAIT)
        yield node
    finally:
        node.stop()
        await asyncio.wait_for(task, WAIT)


def ai_queue(service: AiService) -> Queue:
    return Queue("ai", service.redis, prefix=service.settings.key_prefix)


async def finished(queue: Queue, task_id: str) -> TaskRecord:
    record = await queue.wait(task_id, timeout=WAIT)
    assert record.status.terminal, record
    return record


async def progress_of(queue: Queue, task_id: str) -> list[tuple[float, str]]:
    """The (progress, delta) announcements of ``task_id``, in order, from the queue's status stream."""
    out = []
    for _, fields in await queue.events("0", block_ms=0, count=10_000):
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in fields.items()}
        if f.get("id") == task_id and "delta" in f:
            out.append((float(f["progress"]), f["delta"]))
    return out


async def test_chat_streams_its_tokens_in_order_then_completes_with_the_whole_text(
    settings: AiSettings,
) -> None:
    async with ai_service(settings) as service, edge_node(service), recording(settings, "ai.*") as events:
        assert service.worker is not None and service.worker.limiter is service.limiter
        queue = ai_queue(service)
        e = await queue.enqueue("ai.chat", {"text": WORDS, "max_tokens": 10}, owner="alice")
        record = await finished(queue, e.id)
        assert record.status is TaskStatus.COMPLETED, record.error
        assert record.result == {"text": WORDS, "model": "echo", "tokens": 8}

        steps = await progress_of(queue, e.id)
        assert [delta for _, delta in steps] == [w + " " for w in WORDS.split()[:-1]] + ["eight"]
        assert [p for p, _ in steps] == [n / 10 for n in range(1, 9)]  # tokens so far / max_tokens

        # max_tokens caps the answer; the progress stays below 1 until the result
        e = await queue.enqueue("ai.translate", {"text": WORDS, "language": "French", "max_tokens": 3})
        record = await finished(queue, e.id)
        assert record.result == {"text": "one two three ", "model": "echo", "tokens": 3, "language": "French"}
        assert [p for p, _ in await progress_of(queue, e.id)] == [1 / 3, 2 / 3, 0.99]

        await until(lambda: len(events) >= 2, "ai.task_completed events")
        done = {ev.data.task_id: ev.data for ev in events if ev.type == "ai.task_completed"}
        assert done[e.id].ok and done[e.id].kind == "translate" and done[e.id].result["tokens"] == 3


async def test_every_node_full_is_rate_limiting_and_shrinks_the_workers_limiter(settings: AiSettings) -> None:
    async with ai_service(settings) as service, edge_node(service, capacity=1, delay=0.2):
        limiter = service.limiter
        assert service.worker is not None and service.worker.limiter is limiter and limiter.limit == 4
        # Hold the node's only slot with a long answer of our own.
        held = service.bridge.infer("echo", " ".join(["word"] * 200), max_tokens=200)
        assert await anext(held) == "word "
        try:
            queue = ai_queue(service)
            # The handler itself: -21 from the bridge becomes RateLimited.
            message = queue.message("ai.chat", {"text": WORDS}, owner="alice")
            with pytest.raises(RateLimited, match="task full"):
                assert service.router is not None
                await service.router["ai.chat"](Context(queue, message, "token", "probe"))
            assert limiter.reports == 0  # a direct call reports nothing: the worker does

            # Through the worker: its limiter shrinks (AIMD: minus 2 per "task full", not below 1).
            e = await queue.enqueue("ai.chat", {"text": WORDS}, owner="alice", max_retries=100)
            await until(lambda: limiter.reports >= 1, "the worker to report rate limiting")
            assert limiter.limit <= 2 and limiter.limit >= limiter.minimum
        finally:
            await held.aclose()  # frees the node: the retried task gets through
        record = await finished(queue, e.id)
        assert record.status is TaskStatus.COMPLETED and record.result["text"] == WORDS
        assert record.attempts >= 2
        assert limiter.limit < 4  # quiet time (an hour here) has not earned it back yet


async def test_no_node_is_retried_then_fails_saying_so(settings: AiSettings) -> None:
    async with ai_service(settings) as service, recording(settings, "ai.*") as events:
        queue = ai_queue(service)
        e = await queue.enqueue("ai.chat", {"text": WORDS}, owner="alice", max_retries=2)
        record = await finished(queue, e.id)
        assert record.status is TaskStatus.DEAD and record.attempts == 3
        assert record.error is not None
        assert "no live edge node serves 'echo'" in record.error.message
        assert service.bridge.endpoint in record.error.message
        assert e.id in [r.id for r in await queue.dead_letters()]
        await until(lambda: events, "ai.task_completed")
        assert [(ev.data.task_id, ev.data.ok, ev.data.error) for ev in events] == [
            (e.id, False, record.error.message)]  # once: on the last attempt


async def test_speech_recognition_and_emotion_detection_fail_saying_no_model_serves_them(
    settings: AiSettings,
) -> None:
    async with ai_service(settings) as service, edge_node(service), recording(settings, "ai.*") as events:
        queue = ai_queue(service)
        asr = await queue.enqueue("ai.speech_recognition", {"audio": "UklGRg=="}, owner="alice")
        emotion = await queue.enqueue("ai.emotion_detection", {}, owner="alice")
        for task_id, reason in ((asr.id, NO_ASR), (emotion.id, NO_EMOTION)):
            record = await finished(queue, task_id)
            assert record.status is TaskStatus.FAILED and record.result is None
            assert record.error is not None and record.error.message == reason
        assert "ASR model" in NO_ASR and "speech recognition cannot run" in NO_ASR
        await until(lambda: len(events) >= 2, "ai.task_completed events")
        assert {(ev.data.kind, ev.data.ok, ev.data.error) for ev in events} == {
            ("speech_recognition", False, NO_ASR), ("emotion_detection", False, NO_EMOTION)}


async def test_bad_payloads_are_dead_lettered_with_the_reason_and_the_service_goes_on(
    settings: AiSettings,
) -> None:
    bad: list[tuple[str, Any, str]] = [
        ("ai.chat", {}, "bad_request: text: Field required"),
        ("ai.chat", None, "bad_request: text: Field required"),
        ("ai.chat", "hello", "must be a JSON object"),
        ("ai.chat", {"text": ""}, "bad_request: text: String should have at least 1 character"),
        ("ai.chat", {"text": "hi", "temperature": 2}, "bad_request: temperature: Extra inputs"),
        ("ai.chat", {"text": "hi", "max_tokens": "10"}, "bad_request: max_tokens: Input should be"),
        ("ai.chat", {"text": "hi", "max_tokens": 1000}, "bad_request: max_tokens: at most 64"),
        ("ai.chat", {"text": "x" * 6001}, "bad_request: text: at most 6000 characters"),
        ("ai.translate", {"text": "hi"}, "bad_request: language: Field required"),
        ("ai.action_items", {"text": 5}, "bad_request: text: Input should be a valid string"),
        ("ai.summarize", {}, "bad_request: text: Field required"),
        ("ai.summarize", {"meeting_id": "m1"}, "bad_request: text: Field required"),
        ("ai.summarize", {"text": "hi", "meeting_id": "m1", "post_to_meeting": True},
         "bad_request: post_to_meeting: only the summaries the ai service queues itself"),
        ("ai.summarize", {"text": "hi", "meeting_id": "not/an id"}, "bad_request: meeting_id:"),
    ]
    async with ai_service(settings) as service, edge_node(service):
        queue = ai_queue(service)
        ids = [(await queue.enqueue(kind, data, owner="mallory")).id for kind, data, _ in bad]
        for task_id, (kind, data, reason) in zip(ids, bad, strict=True):
            record = await finished(queue, task_id)
            assert record.status is TaskStatus.FAILED, (kind, data, record)
            assert record.error is not None and reason in record.error.message, (kind, data, record.error)
            assert record.attempts == 1
        assert set(ids) <= {r.id for r in await queue.dead_letters(limit=100)}
        assert service.worker_running
        e = await queue.enqueue("ai.summarize", {"text": WORDS}, owner="alice")
        assert (await finished(queue, e.id)).result == {"text": WORDS, "model": "echo", "tokens": 8}


async def test_a_meetings_chat_is_summarised_when_it_ends_and_posted_to_the_meeting(
    settings: AiSettings, tmp_path: Path,
) -> None:
    meeting_settings = ServiceSettings(**settings.model_dump(include=set(ServiceSettings.model_fields)))
    meetings = build_meeting(meeting_settings, port=0)
    async with meetings.running():
        settings = settings.model_copy(update={"meeting_url": meetings.url})
        async with ai_service(settings) as service, edge_node(service), \
                recording(settings, "ai.*") as events:
            alice = identity_headers(SECRET, Actor("alice"))
            bob = identity_headers(SECRET, Actor("bob"))
            async with httpx.AsyncClient(base_url=str(meetings.url), timeout=10) as http:
                r = await http.post("/meetings", headers=alice, json={"title": "Planning"})
                assert r.status_code == 201, r.text
                mid = r.json()["id"]
                assert (await http.post(f"/meetings/{mid}/join", headers=bob)).status_code == 200
                for who, text in ((alice, "ship the beta on friday"), (bob, "I will write the notes")):
                    assert (await http.post(f"/meetings/{mid}/chat", headers=who,
                                            json={"text": text})).status_code in (200, 201)
                async with service.events.listen(f"meeting.{mid}") as live:
                    assert (await http.post(f"/meetings/{mid}/end", headers=alice)).status_code == 200
                    summary = None
                    while summary is None:
                        message = await live.get(timeout=WAIT)
                        if message.data["event"] == SUMMARY_EVENT:
                            summary = message.data["data"]
            # published through the outbox once the task settles: wait while still recording
            await until(lambda: any(ev.type == "ai.task_completed" for ev in events), "ai.task_completed")
        transcript = "alice: ship the beta on friday\nbob: I will write the notes"
        assert summary["meeting_id"] == mid and summary["text"] == transcript  # echo: the model's input
        assert summary["model"] == "echo" and summary["messages"] == 2 and summary["left_out"] == 0

        record = await finished(ai_queue(service), summary["task_id"])  # posted just before it settles
        assert record.type == "ai.summarize" and record.priority is Priority.LOW
        assert record.status is TaskStatus.COMPLETED and record.owner == "alice" and record.meeting_id == mid
        assert record.id.startswith("ai.")  # the dispatcher's ids: the gateway finds its queue
        assert record.message is not None and record.message.headers[ORIGIN_HEADER] == MEETING_ENDED
        created = [ev.data for ev in events if ev.type == "ai.task_created"]
        completed = [ev.data for ev in events if ev.type == "ai.task_completed"]
        assert [(c.task_id, c.kind, c.meeting_id) for c in created] == [(record.id, "summarize", mid)]
        assert [(c.task_id, c.ok, c.result["text"]) for c in completed] == [(record.id, True, transcript)]


class Transcripts:
    """A meeting service stand-in."""

    def __init__(self, chats: dict[str, list[ChatMessageOut]]) -> None:
        self.chats, self.asked = chats, []

    async def transcript(self, meeting_id: str) -> list[ChatMessageOut]:
        self.asked.append(meeting_id)
        return self.chats.get(meeting_id, [])


async def test_a_meeting_without_chat_gets_a_clear_summary_without_the_model(settings: AiSettings) -> None:
    stub = Transcripts({})
    async with ai_service(settings, transcripts=stub) as service:  # no edge node: the model is not asked
        async with service.events.listen("meeting.quiet") as live:
            await service.events.publish("meeting.ended", {"meeting_id": "quiet", "ended_by": "carol"})
            message = await live.get(timeout=WAIT)
        assert message.data["event"] == SUMMARY_EVENT
        summary = message.data["data"]
        assert summary["text"] == NO_CHAT and summary["model"] is None and summary["tokens"] == 0
        assert summary["messages"] == 0 and stub.asked == ["quiet"]
        record = await finished(ai_queue(service), summary["task_id"])
        assert record.status is TaskStatus.COMPLETED and record.owner == "carol"
        assert record.priority is Priority.LOW


async def test_long_chats_keep_their_latest_messages_within_the_models_input(settings: AiSettings) -> None:
    settings = settings.model_copy(update={"ai_max_input_chars": 100})
    chat = [ChatMessageOut(id=n, meeting_id="long", user_id=f"u{n}", text=f"message {n:02d} " * 2,
                           created_at=0.0) for n in range(20)]
    async with ai_service(settings, transcripts=Transcripts({"long": chat})) as service, edge_node(service):
        async with service.events.listen("meeting.long") as live:
            await service.events.publish("meeting.ended", {"meeting_id": "long"})
            summary = (await live.get(timeout=WAIT)).data["data"]
        lines = summary["text"].split("\n")
        assert len(summary["text"]) <= 100 and lines[-1] == "u19: message 19 message 19 "
        assert summary["messages"] == 20 and summary["left_out"] == 20 - len(lines)
        record = await ai_queue(service).get(summary["task_id"])
        assert record.owner == "service:ai"  # nobody was named as ending it


async def test_a_taken_edge_port_fails_the_start_naming_the_setting(settings: AiSettings) -> None:
    import zmq

    from shared.bus import BusConnectionError

    context = zmq.Context()
    taken = context.socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        service = build(settings.model_copy(update={"edge_bind": f"tcp://127.0.0.1:{port}"}), port=0)
        with pytest.raises(BusConnectionError, match="MEETMESH_EDGE_BIND"):
            await service.start()
    finally:
        taken.close(linger=0)
        context.term()


def test_settings_name_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.bus import ConfigError

    base = ServiceSettings(jwt_secret=SECRET)
    ai = AiSettings.of(base)
    assert ai.edge_endpoint == "tcp://127.0.0.1:5555" and ai.ai_model == "smollm2-135m-instruct"
    monkeypatch.setenv("MEETMESH_EDGE_PORT_OFFSET", "2")
    monkeypatch.setenv("MEETMESH_AI_MODEL", "echo")
    ai = AiSettings.of(base)
    assert ai.edge_endpoint == "tcp://127.0.0.1:5557" and ai.ai_model == "echo"
    monkeypatch.setenv("MEETMESH_EDGE_BIND", "tcp://0.0.0.0:*")
    assert AiSettings.of(base).edge_endpoint == "tcp://0.0.0.0:*"
    monkeypatch.setenv("MEETMESH_AI_LIMIT_MIN", "9")
    with pytest.raises(ConfigError, match="MEETMESH_AI_LIMIT_MIN"):
        AiSettings.of(base)
    monkeypatch.setenv("MEETMESH_AI_MAX_TOKENS", "lots")
    with pytest.raises(ConfigError, match="MEETMESH_AI_MAX_TOKENS"):
        AiSettings.of(base)

