"""A WebSocket fuzzer for the gateway's ``/ws``: `fuzz_ws` sends malformed, oversize, deeply nested,
binary, wrongly typed, out-of-order and flood frames over many sockets and counts how each ended.

Every bad frame must end in exactly one answer (an ``error`` frame, or the answer its type has,
e.g. ``unsubscribed`` for a topic never subscribed) or in a close with a documented code
(`DOCUMENTED_CLOSES`); anything else (no answer, 1006, another code) is a failure, described in
`FuzzReport.failures`. Frames go in batches: each batch (one frame, a few, or a flood of hundreds
sent without waiting) is followed by a probe ``ping``, and the answers before the probe's ``pong``
are counted, so every answer is matched to its batch without timing. Meanwhile a control client
pings the gateway and records the slowest round trip (a liveness figure, not a speed claim).

    report = await fuzz_ws("ws://127.0.0.1:8000/ws", tokens, control_token=token, seed=1)
    report.ok, report.as_dict()

Tokens travel in ``Sec-WebSocket-Protocol: bearer, <token>``, never in the URL.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

# 1000 normal, 1001 going away, 1008 policy (token), 1009 too big, 1013 try again later (a limit),
# 4001 superseded, 4002 idle, 4003 no auth frame in time, 4008 slow client (docs/gateway.md)
DOCUMENTED_CLOSES = frozenset({1000, 1001, 1008, 1009, 1013, 4001, 4002, 4003, 4008})
ANSWERS = frozenset({"pong", "subscribed", "unsubscribed", "cancelled", "accepted"})
WS_MAX_SIZE = 4 << 20  # the gateway's uvicorn ws_max_size with its default settings (at least 4 MiB)
ANSWER_TIMEOUT_S = 30.0  # a batch with no probe answer by then is a failure (the gateway hangs)

Frame = str | bytes


@dataclass
class FuzzReport:
    """What `fuzz_ws` saw. ``frames``: bad frames sent; each ended in one of ``error_frames``,
    ``answers`` (a non-error answer) or a close counted in ``closed_frames`` (by code in ``closes``)."""

    frames: int = 0
    error_frames: int = 0
    answers: int = 0
    closed_frames: int = 0
    closes: Counter[int] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    flood_frames: int = 0  # of ``frames``, those sent in floods (100-300 without waiting)
    error_codes: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    sockets_opened: int = 0
    control_pings: int = 0
    control_max_rtt_s: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """No failure, and every frame accounted for."""
        return not self.failures and self.frames == self.error_frames + self.answers + self.closed_frames

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames, "error_frames": self.error_frames, "answers": self.answers,
            "closed_frames": self.closed_frames, "closes": dict(sorted(self.closes.items())),
            "error_codes": dict(sorted(self.error_codes.items())),
            "by_kind": dict(sorted(self.by_kind.items())), "flood_frames": self.flood_frames,
            "failures": len(self.failures), "first_failures": self.failures[:10],
            "sockets_opened": self.sockets_opened, "control_pings": self.control_pings,
            "control_max_rtt_s": round(self.control_max_rtt_s, 4), "seconds": round(self.seconds, 2),
        }


class _Socket:
    """One fuzzing socket: its own session id (for out-of-order resumes) and counters."""

    def __init__(self, ws: ClientConnection, session_id: str) -> None:
        self.ws, self.session_id = ws, session_id
        self.unanswered = 0  # frames of the current batch not answered yet (a close ends them)


def _nested(depth: int, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def _kinds(max_frame_bytes: int, own: Callable[[], str]) -> dict[str, Callable[[random.Random], Frame]]:
    """Frame makers by kind; ``own()`` is the socket's session id (for a resume of itself)."""
    valid = ['{"type":"ping","id":"p"}', '{"type":"submit","task":"fuzz.nothing","data":{"text":"hi"}}',
             '{"type":"subscribe","topic":"meeting.m1"}', '{"type":"resume","session_id":"x","last_seq":3}']

    def malformed(rng: random.Random) -> Frame:
        text = rng.choice(valid)
        choice = rng.randrange(6)
        if choice == 0:
            return text[: rng.randrange(1, len(text))]  # cut short
        if choice == 1:
            return text + rng.choice(["}", "]", ",", "x", " {}"])  # trailing junk
        if choice == 2:
            i = rng.randrange(len(text))
            return text[:i] + rng.choice("{}[]:,\"'\\") + text[i + 1:]  # one character broken
        if choice == 3:
            return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 60)))
        if choice == 4:
            return rng.choice(["", " ", "null", "true", "1", '"ping"', "[]", "{}", "{'type':'ping'}",
                               '{"type":"ping"}{"type":"ping"}', "\ufeff{}"])
        return '{"type":"ping","id":"' + "\\u" + rng.choice(["d800", "zzzz", "12"]) + '"}'

    def constants(rng: random.Random) -> Frame:
        value = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
        where = rng.randrange(3)
        if where == 0:
            return f'{{"type":"ping","id":{value}}}'
        if where == 1:
            return f'{{"type":"submit","task":"fuzz.nothing","data":{{"x":{value}}}}}'
        return f'{{"type":"resume","session_id":"s","last_seq":{value}}}'

    def long_int(rng: random.Random) -> Frame:
        digits = rng.choice([4301, 5000, 20_000, 100_000])
        number = "9" * digits
        return rng.choice([f'{{"type":"ping","id":{number}}}', f'{{"type":"ping","x":{number}}}',
                           f'{{"type":"resume","session_id":"s","last_seq":{number}}}'])

    def deep(rng: random.Random) -> Frame:
        depth = rng.choice([33, 100, 999, 1000, 1500, 5000, 50_000])
        return rng.choice([f'{{"type":"ping","x":{_nested(depth, rng)}}}',
                           f'{{"type":"submit","task":"fuzz.nothing","data":{_nested(depth, rng)}}}',
                           _nested(depth, rng)])

    def binary(rng: random.Random) -> Frame:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))

    def wrong_type(rng: random.Random) -> Frame:
        frame: Any = rng.choice([
            {"type": 5}, {"type": None}, {"type": ["ping"]}, {"type": "nope"}, {"type": "x" * 5000},
            {"id": "no-type"}, {"type": "ping", "id": {"a": 1}}, {"type": "ping", "id": [1]},
            {"type": "ping", "id": 1.5}, {"type": "ping", "id": True}, {"type": "ping", "id": 2**60},
            {"type": "ping", "id": "i" * 129}, {"type": "submit"}, {"type": "submit", "task": 5},
            {"type": "submit", "task": "fuzz.nothing", "priority": "urgent"},
            {"type": "submit", "task": "fuzz.nothing", "timeout_s": "soon"},
            {"type": "submit", "task": "no.such.type"},
            {"type": "submit", "task": "fuzz.nothing", "data": 1, "delay_s": -5},
            {"type": "cancel"}, {"type": "cancel", "task_id": 7}, {"type": "cancel", "task_id": "t" * 300},
            {"type": "subscribe"}, {"type": "subscribe", "topic": ""}, {"type": "subscribe", "topic": "a..b"},
            {"type": "subscribe", "topic": 3}, {"type": "subscribe", "topic": "task.*"},
            {"type": "unsubscribe", "topic": None}, {"type": "resume"},
            {"type": "resume", "session_id": 3, "last_seq": "x"},
            {"type": "resume", "session_id": "s", "last_seq": True},
            {"type": "auth", "token": "whatever"},
        ])
        return json.dumps(frame)

    def out_of_order(rng: random.Random) -> Frame:
        frame = rng.choice([
            {"type": "resume", "session_id": "no-such-session", "last_seq": 0},
            {"type": "resume", "session_id": own(), "last_seq": rng.choice([-1, 0, 10**9])},
            {"type": "cancel", "id": 1, "task_id": "ai.00000000000000000000000000"},
            {"type": "subscribe", "id": 2, "topic": "task.ai.00000000000000000000000000"},
            {"type": "subscribe", "id": 3, "topic": "meeting.not-mine"},
            {"type": "subscribe", "id": 4, "topic": "meeting.*"},
            {"type": "unsubscribe", "id": 5, "topic": "meeting.never-subscribed"},
        ])
        return json.dumps(frame)

    def oversize(rng: random.Random) -> Frame:  # over the gateway's frame limit, under uvicorn's
        return '{"type":"ping","pad":"' + "x" * (max_frame_bytes + rng.randrange(1, 1000)) + '"}'

    return {"malformed": malformed, "constants": constants, "long_int": long_int, "deep": deep,
            "binary": binary, "wrong_type": wrong_type, "out_of_order": out_of_order, "oversize": oversize}


async def _open(url: str, token: str, report: FuzzReport) -> _Socket:
    ws = await connect(url, subprotocols=["bearer", token],  # type: ignore[list-item]
                       max_size=None, max_queue=None, open_timeout=30, ping_interval=None)
    report.sockets_opened += 1
    welcome = json.loads(await asyncio.wait_for(ws.recv(), ANSWER_TIMEOUT_S))
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"expected welcome, got {welcome!r}")
    return _Socket(ws, welcome["session_id"])


def _close_code(exc: ConnectionClosed) -> int:
    return exc.rcvd.code if exc.rcvd is not None else 1006


async def _batch(sock: _Socket, frames: list[tuple[str, Frame]], probe: str, report: FuzzReport) -> None:
    """Send ``frames`` and a probe ping; count the answers up to its pong. Raises ConnectionClosed."""
    sock.unanswered = len(frames)
    for _, frame in frames:
        await sock.ws.send(frame)
    await sock.ws.send(json.dumps({"type": "ping", "id": probe}))
    answered = 0
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while True:
        left = deadline - time.monotonic()
        try:
            raw = await asyncio.wait_for(sock.ws.recv(), max(left, 0.001))
        except TimeoutError:
            report.failures.append(f"no answer to a batch of {len(frames)} within {ANSWER_TIMEOUT_S:g} s "
                                   f"(kinds: {sorted({k for k, _ in frames})})")
            return
        frame = json.loads(raw)
        kind = frame.get("type")
        if kind == "pong" and frame.get("id") == probe:
            break
        if kind == "error":
            answered += 1
            sock.unanswered -= 1
            report.error_frames += 1
            report.error_codes[str(frame.get("code"))] += 1
            if not isinstance(frame.get("message"), str) or not isinstance(frame.get("code"), str):
                report.failures.append(f"an error frame without code and message: {raw[:200]!r}")
        elif kind in ANSWERS:
            answered += 1
            sock.unanswered -= 1
            report.answers += 1
    if answered != len(frames):
        report.failures.append(f"a batch of {len(frames)} frames got {answered} answers "
                               f"(kinds: {sorted({k for k, _ in frames})})")


async def _closer(url: str, token: str, report: FuzzReport, size: int) -> None:
    """One frame over uvicorn's ws_max_size: the socket must be closed with 1009."""
    sock = await _open(url, token, report)
    report.frames += 1
    report.by_kind["over_ws_max_size"] += 1
    try:
        await sock.ws.send('{"type":"ping","pad":"' + "x" * size + '"}')
        raw = await asyncio.wait_for(sock.ws.recv(), ANSWER_TIMEOUT_S)
        report.failures.append(f"a frame over ws_max_size was answered, not closed: {str(raw)[:100]!r}")
    except ConnectionClosed as exc:
        code = _close_code(exc)
        report.closes[code] += 1
        report.closed_frames += 1
        if code != 1009:
            report.failures.append(f"a frame over ws_max_size closed the socket with {code}, not 1009")
    except TimeoutError:
        report.failures.append("a frame over ws_max_size got no answer and no close")
    finally:
        await sock.ws.close()


async def _unauthenticated(url: str, frame: Frame, report: FuzzReport) -> None:
    """A bad first frame on a socket without a token: it must be closed with 1008 (policy)."""
    report.frames += 1
    report.by_kind["before_auth"] += 1
    try:
        async with connect(url, max_size=None, open_timeout=30, ping_interval=None) as ws:
            report.sockets_opened += 1
            await ws.send(frame)
            raw = await asyncio.wait_for(ws.recv(), ANSWER_TIMEOUT_S)
            report.failures.append(f"a bad first frame was answered, not closed: {str(raw)[:100]!r}")
    except ConnectionClosed as exc:
        code = _close_code(exc)
        report.closes[code] += 1
        report.closed_frames += 1
        if code != 1008:
            report.failures.append(f"a bad first frame closed the socket with {code}, not 1008")
    except TimeoutError:
        report.failures.append("a bad first frame got no answer and no close")


async def _fuzzer(url: str, token: str, budget: int, rng: random.Random, report: FuzzReport,
                  max_frame_bytes: int, documented: frozenset[int], number: int) -> None:
    sock = await _open(url, token, report)
    kinds = _kinds(max_frame_bytes, lambda: sock.session_id)
    names = sorted(kinds)
    sent = 0
    try:
        while sent < budget:
            roll = rng.random()
            size = 1 if roll < 0.5 else rng.randrange(2, 12) if roll < 0.93 else rng.randrange(100, 300)
            size = min(size, budget - sent)
            chosen = [rng.choice(names) for _ in range(size)]
            if size > 20:  # a flood: cheap frames (oversize and deep ones are sent one at a time)
                chosen = [k if k not in ("oversize", "deep", "long_int") else "malformed" for k in chosen]
            frames = [(k, kinds[k](rng)) for k in chosen]
            report.frames += len(frames)
            report.by_kind.update(chosen)
            if size > 20:
                report.flood_frames += len(frames)
            sent += len(frames)
            try:
                await _batch(sock, frames, f"probe-{number}-{sent}", report)
            except ConnectionClosed as exc:
                code = _close_code(exc)
                report.closes[code] += 1
                report.closed_frames += max(sock.unanswered, 0)  # the rest of the batch ended in this close
                if code not in documented:
                    report.failures.append(f"socket closed with {code} after a batch of "
                                           f"{sorted({k for k, _ in frames})}")
                sock = await _open(url, token, report)
    finally:
        await sock.ws.close()


async def _control(url: str, token: str, report: FuzzReport, done: asyncio.Event, every: float) -> None:
    sock = await _open(url, token, report)
    try:
        n = 0
        while not done.is_set():
            n += 1
            started = time.monotonic()
            await sock.ws.send(json.dumps({"type": "ping", "id": f"control-{n}"}))
            while True:
                frame = json.loads(await asyncio.wait_for(sock.ws.recv(), ANSWER_TIMEOUT_S))
                if frame.get("type") == "pong" and frame.get("id") == f"control-{n}":
                    break
            report.control_pings += 1
            report.control_max_rtt_s = max(report.control_max_rtt_s, time.monotonic() - started)
            try:
                await asyncio.wait_for(done.wait(), every)
            except TimeoutError:
                pass
    finally:
        await sock.ws.close()


async def fuzz_ws(url: str, tokens: Sequence[str], *, control_token: str | None = None, frames: int = 10_000,
                  sockets: int = 20, seed: int = 0, max_frame_bytes: int = 1 << 20,
                  ws_max_size: int = WS_MAX_SIZE, over_ws_max_size: int = 5, before_auth: int = 20,
                  documented: frozenset[int] = DOCUMENTED_CLOSES, control_every: float = 0.1) -> FuzzReport:
    """Fuzz the gateway's WebSocket at ``url`` (``ws://host:port/ws``): ``frames`` bad frames over
    ``sockets`` sockets (socket *i* authenticates with ``tokens[i % len(tokens)]``), of which
    ``over_ws_max_size`` frames are larger than uvicorn's ``ws_max_size`` (each on a socket of its own:
    it must be closed with 1009), and ``before_auth`` are the first frame of a socket without a token
    (it must be closed with 1008). ``max_frame_bytes`` is the gateway's ``MEETMESH_MAX_FRAME_BYTES``
    (for frames just over it). With ``control_token``, a control client pings every ``control_every``
    seconds meanwhile. Deterministic for a ``seed`` (the gateway's answers aside)."""
    if not tokens or sockets < 1 or frames < over_ws_max_size + before_auth:
        raise ValueError("fuzz_ws needs tokens, sockets >= 1 and frames >= over_ws_max_size + before_auth")
    report = FuzzReport()
    started = time.monotonic()
    done = asyncio.Event()
    control = (asyncio.create_task(_control(url, control_token, report, done, control_every))
               if control_token else None)
    try:
        for i in range(over_ws_max_size):
            await _closer(url, tokens[i % len(tokens)], report, ws_max_size + 1)
        first = random.Random(seed)
        kinds = _kinds(max_frame_bytes, lambda: "none")
        names = sorted(k for k in kinds if k != "oversize")
        await asyncio.gather(*(_unauthenticated(url, kinds[first.choice(names)](first), report)
                               for _ in range(before_auth)))
        rest = frames - over_ws_max_size - before_auth
        shares = [rest // sockets + (1 if i < rest % sockets else 0) for i in range(sockets)]
        await asyncio.gather(*(
            _fuzzer(url, tokens[i % len(tokens)], shares[i], random.Random(seed * 1000 + i), report,
                    max_frame_bytes, documented, i)
            for i in range(sockets)))
    finally:
        done.set()
        if control is not None:
            try:
                await control
            except Exception as exc:  # the control socket itself failed: that is a finding
                report.failures.append(f"the control client failed: {exc!r}")
    report.seconds = time.monotonic() - started
    return report
