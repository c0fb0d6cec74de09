"""The edge wire: the StackFlow / Edge-LLM-Infra JSON schema (requests, replies, error codes,
streamed chunks), and the ZeroMQ frames the bridge and its nodes carry it in.

A request is ``{"request_id", "work_id", "action", "object", "data"}``; a reply is
``{"request_id", "work_id", "created", "object", "data", "error": {"code", "message"}}`` with code 0
for success. A streamed answer is a series of replies whose ``data`` is
``{"index": n, "delta": "...", "finish": false}``, the last one ``{"delta": "", "finish": true}``.
Input may be streamed the same way (``object`` containing ``stream``), buffered by index until
``finish`` (`StreamAssembler`).

Between bridge (ROUTER, which adds and strips the identity frame) and node (DEALER), every message
is one frame: a kind byte, then its payload (one frame, not two: a streamed token is one send)::

    node -> bridge  R{"name", "models", "capacity", "pid"}   register (again after ?)
                    H{"running": n}                          heartbeat
                    M<StackFlow reply>                       one reply (a stream is many)
                    B                                        leaving
    bridge -> node  W{"heartbeat": seconds}                  welcome: registered
                    H                                        heartbeat
                    M<StackFlow request>                     (its request_id is the bridge's own)
                    C<request_id>                            stop that inference
                    ?                                        unknown identity: register

Errors (all `BusError`s, each carrying its StackFlow ``code``)::

    StackFlowError            a StackFlow error reply (code, message), e.g. -6 unit does not exist
    ├── EdgeBusy              -21 task full: every live node serving the model is full
    ├── EdgeUnavailable       -6: no live node serves the model
    ├── EdgeTimeout           -9: no complete answer within the request's timeout
    ├── EdgeBadReply          -9: the node answered out of protocol: malformed, out of order, or
    │                         past the request's bounds (tokens, characters)
    └── EdgeStreamBroken      -11: the node died after tokens were streamed (cannot be retried)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from enum import IntEnum, StrEnum
from typing import Any, Literal

import zmq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import BusError, HandlerSignal, RateLimited, Reject, Retry, describe

UNIT = "llm"                         # the unit name; instances are "llm.1001", "llm.1002", ...
STREAM_FORMAT = "llm.utf-8.stream"   # response_format / input object of streamed text
TEXT_FORMAT = "llm.utf-8"            # ... of plain text
DEFAULT_MODEL = "smollm2-135m-instruct"  # the model name clients ask for and the reference node serves
Template = Literal["chat", "summarize", "translate", "action_items"]
REGISTER, BEAT, MESSAGE, BYE = b"R", b"H", b"M", b"B"  # ZeroMQ frame kinds
WELCOME, CANCEL, UNKNOWN = b"W", b"C", b"?"


class ErrorCode(IntEnum):
    """StackFlow's error codes (``error.code`` of a reply); 0 is success."""

    OK = 0
    JSON_FORMAT = -2
    PUSH_FAILED = -4
    MODEL_LOADING = -5
    UNIT_NOT_FOUND = -6
    UNIT_CALL = -9
    MODEL_RUN = -11
    NO_SUCH_ACTION = -18
    TASK_FULL = -21
    DATA_EMPTY = -24
    STREAM_INDEX = -25

    @property
    def text(self) -> str:
        """StackFlow's message for the code."""
        return _TEXTS[self]


_TEXTS = {
    ErrorCode.OK: "", ErrorCode.JSON_FORMAT: "json format error", ErrorCode.PUSH_FAILED:
    "inference data push false", ErrorCode.MODEL_LOADING: "model loading failed",
    ErrorCode.UNIT_NOT_FOUND: "unit does not exist", ErrorCode.UNIT_CALL: "unit call false",
    ErrorCode.MODEL_RUN: "model run failed", ErrorCode.NO_SUCH_ACTION: "no such action",
    ErrorCode.TASK_FULL: "task full", ErrorCode.DATA_EMPTY: "inference data empty",
    ErrorCode.STREAM_INDEX: "stream data index error",
}


class Action(StrEnum):
    """The actions a unit answers (``ping`` is for work_id ``sys``: a liveness check)."""

    SETUP = "setup"
    INFERENCE = "inference"
    PAUSE = "pause"
    WORK = "work"
    EXIT = "exit"
    TASKINFO = "taskinfo"
    PING = "ping"


_ACTIONS = frozenset(action.value for action in Action)


# -- errors --------------------------------------------------------------------------------------

class StackFlowError(BusError):
    """A StackFlow error: ``code`` (an `ErrorCode`) and ``message``; the reply it becomes names
    ``request_id`` and ``work_id`` when they are known."""

    default_code = ErrorCode.UNIT_CALL

    def __init__(self, code: int | None = None, message: str | None = None, *, request_id: str = "",
                 work_id: str = "") -> None:
        try:
            self.code: int = ErrorCode(self.default_code if code is None else code)
        except ValueError:  # a code of a newer StackFlow: keep it as it is
            self.code = int(code or 0)
        known = self.code.text if isinstance(self.code, ErrorCode) else f"error {self.code}"
        self.message = message or known
        self.request_id, self.work_id = request_id, work_id
        super().__init__(f"[{self.code}] {self.message}")

    def reply(self) -> dict[str, Any]:
        """This error as a StackFlow reply."""
        return make_reply(self.request_id, self.work_id or UNIT, code=self.code, message=self.message)


class EdgeBusy(StackFlowError):
    """Every live node serving the model is full (-21): the AI service treats it as rate limiting."""

    default_code = ErrorCode.TASK_FULL


class EdgeUnavailable(StackFlowError):
    """No live node serves the model (-6)."""

    default_code = ErrorCode.UNIT_NOT_FOUND


class EdgeTimeout(StackFlowError):
    """The request did not complete within its timeout (-9)."""

    default_code = ErrorCode.UNIT_CALL


class EdgeBadReply(StackFlowError):
    """A node's reply broke the protocol: not a StackFlow reply, a stream chunk out of order, more
    tokens than ``max_token_len`` or more text than the bridge accepts (-9)."""

    default_code = ErrorCode.UNIT_CALL


class EdgeStreamBroken(StackFlowError):
    """The node died after tokens had been streamed to the caller, so the request was not retried (-11)."""

    default_code = ErrorCode.MODEL_RUN


def error_for(code: int, message: str | None = None, **where: str) -> StackFlowError:
    """The exception for an error reply's code (``EdgeBusy`` for -21, else `StackFlowError`)."""
    cls = EdgeBusy if code == ErrorCode.TASK_FULL else StackFlowError
    return cls(code, message, **where)


def to_handler_signal(exc: StackFlowError) -> HandlerSignal:
    """How a queue handler should end on ``exc``: `RateLimited` for -21 (the limiter backs off),
    `Retry` for a missing node, a timeout, a broken stream or a misbehaving node (another may serve
    it), `Reject` for everything else."""
    if exc.code == ErrorCode.TASK_FULL:
        return RateLimited(reason=str(exc))
    if isinstance(exc, EdgeUnavailable | EdgeTimeout | EdgeStreamBroken | EdgeBadReply):
        return Retry(reason=str(exc))
    return Reject(str(exc))


# -- messages ------------------------------------------------------------------------------------

class Request(BaseModel):
    """A StackFlow request. ``request_id`` may arrive as a number; it is kept as a string."""

    model_config = ConfigDict(extra="ignore")
    request_id: str
    work_id: str
    action: str
    object: str = "None"
    data: Any = None

    @field_validator("request_id", mode="before")
    @classmethod
    def _number_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class SetupData(BaseModel):
    """``setup.data``. ``template`` and ``language`` are MeetMesh extensions (StackFlow ignores them):
    the AI task whose prompt template wraps the input, and the target language of ``translate``."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    model: str = Field(min_length=1)
    response_format: str = STREAM_FORMAT
    input: str | tuple[str, ...] = TEXT_FORMAT
    enoutput: bool = True
    max_token_len: int = Field(256, ge=1, le=32_768)
    prompt: str = ""
    template: Template = "chat"
    language: str = "English"

    @property
    def stream(self) -> bool:
        """Whether the answer is streamed (``response_format`` contains "stream")."""
        return "stream" in self.response_format


class StreamChunk(BaseModel):
    """One piece of streamed text: ``{"index", "delta", "finish"}``."""

    model_config = ConfigDict(extra="ignore")
    index: int = Field(ge=0)
    delta: str = ""
    finish: bool = False


class ErrorBody(BaseModel):
    """A reply's ``error``."""

    code: int = 0
    message: str = ""


class Reply(BaseModel):
    """A StackFlow reply."""

    model_config = ConfigDict(extra="ignore")
    request_id: str = ""
    work_id: str = ""
    created: int = 0
    object: str = "None"
    data: Any = "None"
    error: ErrorBody = ErrorBody()

    @field_validator("request_id", mode="before")
    @classmethod
    def _number_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @property
    def ok(self) -> bool:
        """Code 0."""
        return self.error.code == 0

    def raise_for_error(self) -> Reply:
        """Raise the `StackFlowError` of a failed reply; return the reply otherwise."""
        if self.error.code:
            raise error_for(self.error.code, self.error.message, request_id=self.request_id,
                            work_id=self.work_id)
        return self


def make_reply(request_id: str, work_id: str, *, object: str = "None", data: Any = "None",
               code: int = 0, message: str = "") -> dict[str, Any]:
    """A reply as a plain dict (what goes on the wire, after ``json.dumps``)."""
    return {"request_id": request_id, "work_id": work_id, "created": int(time.time()), "object": object,
            "data": data, "error": {"code": int(code), "message": message}}


def stream_data(index: int, delta: str, finish: bool = False) -> dict[str, Any]:
    """``data`` of one streamed piece."""
    return {"index": index, "delta": delta, "finish": finish}


FORMAT_ERROR_WHERE = {"request_id": "0", "work_id": "sys"}  # what StackFlow's format errors name


def parse_request(raw: bytes | str | dict[str, Any]) -> Request:
    """A `Request` from the wire. Malformed JSON, or a missing or ill-typed ``request_id``,
    ``work_id`` or ``action``, raise -2 naming request "0" of work "sys", as StackFlow's unit manager
    answers them; an empty ``work_id`` is "sys"; an unknown action raises -18 naming the request.
    A numeric ``request_id`` is taken as text (StackFlow would refuse it)."""
    try:
        body = json.loads(raw) if isinstance(raw, bytes | str) else raw
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise StackFlowError(ErrorCode.JSON_FORMAT, "json format error: not JSON", **FORMAT_ERROR_WHERE
                             ) from exc
    if not isinstance(body, dict):
        raise StackFlowError(ErrorCode.JSON_FORMAT, "json format error: a request is a JSON object",
                             **FORMAT_ERROR_WHERE)
    for key in ("request_id", "work_id", "action"):
        value = body.get(key)
        if not (isinstance(value, str) or (key == "request_id" and isinstance(value, int)
                and not isinstance(value, bool))):
            raise StackFlowError(ErrorCode.JSON_FORMAT, f"json format error: no {key} string",
                                 **FORMAT_ERROR_WHERE)
    if not body["work_id"]:
        body = {**body, "work_id": "sys"}
    try:
        request = Request.model_validate(body)
    except ValidationError as exc:
        raise StackFlowError(ErrorCode.JSON_FORMAT, f"json format error: {describe(exc)}",
                             **FORMAT_ERROR_WHERE) from exc
    if request.action not in _ACTIONS:
        raise StackFlowError(ErrorCode.NO_SUCH_ACTION, f"no such action: {request.action!r}",
                             request_id=request.request_id, work_id=request.work_id)
    return request


class StreamAssembler:
    """Buffers streamed input chunks by index until the one with ``finish``, then joins them in order.

    A repeated index, or a gap when ``finish`` arrives, raises -25 (stream data index error) and
    empties the buffer."""

    def __init__(self) -> None:
        self._parts: dict[int, str] = {}

    def add(self, chunk: StreamChunk | dict[str, Any]) -> str | None:
        """Add one chunk; the whole text once ``finish`` has arrived, else ``None``."""
        try:
            piece = chunk if isinstance(chunk, StreamChunk) else StreamChunk.model_validate(chunk)
        except ValidationError as exc:
            self._parts.clear()
            raise StackFlowError(ErrorCode.STREAM_INDEX, f"stream data index error: {describe(exc)}") from exc
        if piece.index in self._parts:
            self._parts.clear()
            raise StackFlowError(ErrorCode.STREAM_INDEX,
                                 f"stream data index error: index {piece.index} twice")
        self._parts[piece.index] = piece.delta
        if not piece.finish:
            return None
        parts, self._parts = self._parts, {}
        if sorted(parts) != list(range(len(parts))):
            missing = sorted(set(range(max(parts) + 1)) - set(parts))
            raise StackFlowError(ErrorCode.STREAM_INDEX, f"stream data index error: missing {missing}")
        return "".join(parts[i] for i in range(len(parts)))

    def __len__(self) -> int:
        return len(self._parts)

    @property
    def size(self) -> int:
        """Characters buffered."""
        return sum(map(len, self._parts.values()))


# -- the ZeroMQ link ---------------------------------------------------------------------------------

def dumps(value: Any) -> bytes:
    """Compact JSON bytes, as every payload is sent."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class FrameSocket:
    """A ZeroMQ socket on the event loop without zmq.asyncio's futures per message (a third of a
    streamed token's cost): ``on_frames`` is called for each message as it arrives, drained in
    bursts when the socket's (edge-triggered) descriptor fires; `send` never waits."""

    BURST = 256  # messages per drain before other callbacks get a turn
    _EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: no enum arithmetic per message

    def __init__(self, sock: zmq.Socket[bytes], on_frames: Callable[[list[bytes]], None]) -> None:
        self.sock, self._on_frames = sock, on_frames
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._pending = False
        self._loop.add_reader(self._fd, self._drain)
        self._soon()

    def send(self, frames: list[bytes]) -> None:
        """Queue ``frames`` for sending; `zmq.ZMQError` (e.g. Again at the high-water mark) if it cannot."""
        self.sock.send_multipart(frames, zmq.NOBLOCK)
        self._soon()  # a send can swallow the descriptor's signal for messages already in

    def _soon(self) -> None:
        if not self._pending:
            self._pending = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._pending = False
        if self.sock.closed:
            return
        sock, events, pollin = self.sock, self._EVENTS, self._POLLIN
        for _ in range(self.BURST):
            if not sock.getsockopt(events) & pollin:  # type: ignore[operator]
                return
            self._on_frames(sock.recv_multipart(zmq.NOBLOCK))
        self._soon()

    def close(self, linger: int = 0) -> None:
        """Stop reading; close the socket, giving unsent messages ``linger`` ms."""
        if not self.sock.closed:
            self._loop.remove_reader(self._fd)
            self.sock.close(linger=linger)
