"""The StackFlow wire schema: requests, replies, error codes, streamed input, errors as signals."""

from __future__ import annotations

import json

import pytest

from shared.bus.edge.stackflow import (
    Action,
    EdgeBusy,
    EdgeStreamBroken,
    EdgeTimeout,
    EdgeUnavailable,
    ErrorCode,
    Reply,
    SetupData,
    StackFlowError,
    StreamAssembler,
    error_for,
    make_reply,
    parse_request,
    stream_data,
    to_handler_signal,
)
from shared.bus.edge.stackflow_tcp import FramingError, JsonFramer
from shared.bus.errors import BusError, RateLimited, Reject, Retry


def test_error_codes_are_stackflows() -> None:
    assert {c.name: int(c) for c in ErrorCode} == {
        "OK": 0, "JSON_FORMAT": -2, "PUSH_FAILED": -4, "MODEL_LOADING": -5, "UNIT_NOT_FOUND": -6,
        "UNIT_CALL": -9, "MODEL_RUN": -11, "NO_SUCH_ACTION": -18, "TASK_FULL": -21, "DATA_EMPTY": -24,
        "STREAM_INDEX": -25}
    assert ErrorCode.TASK_FULL.text == "task full"
    assert all(code.text for code in ErrorCode if code != ErrorCode.OK)


def test_a_request_parses_from_bytes_and_keeps_a_numeric_id_as_text() -> None:
    raw = json.dumps({"request_id": 7, "work_id": "llm", "action": "setup", "object": "llm.setup",
                      "data": {"model": "echo"}}).encode()
    req = parse_request(raw)
    assert (req.request_id, req.work_id, req.action, req.object) == ("7", "llm", Action.SETUP, "llm.setup")
    assert req.data == {"model": "echo"}
    assert parse_request({"request_id": "1", "work_id": "llm.1001", "action": "exit"}).object == "None"


@pytest.mark.parametrize(("raw", "code", "where"), [
    (b"{not json", ErrorCode.JSON_FORMAT, ("0", "sys")),
    (b"\xff\xfe", ErrorCode.JSON_FORMAT, ("0", "sys")),
    (b"[1, 2]", ErrorCode.JSON_FORMAT, ("0", "sys")),
    (b'{"request_id": "r1", "action": "setup"}', ErrorCode.JSON_FORMAT, ("0", "sys")),
    (b'{"request_id": "r2", "work_id": "llm.1001"}', ErrorCode.JSON_FORMAT, ("0", "sys")),
    (b'{"request_id": ["r"], "work_id": "llm", "action": "setup"}', ErrorCode.JSON_FORMAT, ("0", "sys")),
    (b'{"request_id": "r4", "work_id": 7, "action": "setup"}', ErrorCode.JSON_FORMAT, ("0", "sys")),
    (b'{"request_id": "r5", "work_id": "llm", "action": true}', ErrorCode.JSON_FORMAT, ("0", "sys")),
    (b"[" * 100_000 + b"]" * 100_000, ErrorCode.JSON_FORMAT, ("0", "sys")),
    (b'{"request_id": "r3", "work_id": "llm", "action": "fly"}', ErrorCode.NO_SUCH_ACTION, ("r3", "llm")),
])
def test_bad_requests_raise_stackflow_errors_that_reply(raw: bytes, code: ErrorCode,
                                                          where: tuple[str, str]) -> None:
    """Format errors name request "0" of work "sys", as StackFlow's unit manager answers them."""
    with pytest.raises(StackFlowError) as caught:
        parse_request(raw)
    exc = caught.value
    assert exc.code == code
    assert (exc.request_id, exc.work_id) == where
    reply = Reply.model_validate(exc.reply())
    assert reply.error.code == code and not reply.ok
    assert (reply.request_id, reply.work_id) == where
    assert reply.error.message.startswith(code.text)


def test_an_empty_work_id_is_sys() -> None:
    assert parse_request(b'{"request_id": "p", "work_id": "", "action": "ping"}').work_id == "sys"


def test_setup_data_defaults_extensions_and_streaming() -> None:
    setup = SetupData.model_validate({"model": "qwen", "response_format": "llm.utf-8.stream",
                                      "input": "llm.utf-8", "enoutput": True, "max_token_len": 256,
                                      "prompt": "You are helpful.", "unknown_field": 1})
    assert setup.stream and setup.template == "chat" and setup.language == "English"
    assert not SetupData(model="qwen", response_format="llm.utf-8").stream
    assert hash(setup) == hash(SetupData.model_validate(setup.model_dump()))  # a cache key
    with pytest.raises(ValueError):
        SetupData(model="qwen", max_token_len=0)
    with pytest.raises(ValueError):
        SetupData.model_validate({"model": "qwen", "template": "poem"})


def test_make_reply_is_stackflows_shape() -> None:
    reply = make_reply("4", "llm.1001", object="llm.utf-8.stream", data=stream_data(2, "hi"))
    assert set(reply) == {"request_id", "work_id", "created", "object", "data", "error"}
    assert reply["error"] == {"code": 0, "message": ""}
    assert reply["data"] == {"index": 2, "delta": "hi", "finish": False}
    assert Reply.model_validate(reply).raise_for_error().ok


def test_replies_raise_the_error_of_their_code() -> None:
    with pytest.raises(EdgeBusy) as busy:
        Reply.model_validate(make_reply("1", "llm", code=-21, message="task full")).raise_for_error()
    assert busy.value.code == ErrorCode.TASK_FULL
    with pytest.raises(StackFlowError) as other:
        Reply.model_validate(make_reply("1", "llm.9", code=-6, message="gone")).raise_for_error()
    assert (other.value.code, other.value.message, other.value.work_id) == (-6, "gone", "llm.9")
    assert error_for(-99, "new").code == -99  # a code from a newer StackFlow is kept


def test_the_edge_errors_are_bus_errors_with_their_codes() -> None:
    expected = {EdgeBusy: -21, EdgeUnavailable: -6, EdgeTimeout: -9, EdgeStreamBroken: -11}
    for cls, code in expected.items():
        exc = cls()
        assert isinstance(exc, StackFlowError) and isinstance(exc, BusError)
        assert exc.code == code and str(exc).startswith(f"[{code}]")


def test_edge_errors_map_to_handler_signals() -> None:
    assert isinstance(to_handler_signal(EdgeBusy()), RateLimited)
    for transient in (EdgeUnavailable(), EdgeTimeout(), EdgeStreamBroken()):
        signal = to_handler_signal(transient)
        assert isinstance(signal, Retry) and not isinstance(signal, RateLimited)
    assert isinstance(to_handler_signal(StackFlowError(-5)), Reject)


def test_stream_assembler_joins_chunks_by_index_whatever_their_order() -> None:
    buffer = StreamAssembler()
    assert buffer.add({"index": 1, "delta": "lo, ", "finish": False}) is None
    assert buffer.add({"index": 0, "delta": "hel", "finish": False}) is None
    assert len(buffer) == 2
    assert buffer.add({"index": 2, "delta": "world", "finish": True}) == "hello, world"
    assert len(buffer) == 0
    assert buffer.add({"index": 0, "delta": "again", "finish": True}) == "again"  # reusable


@pytest.mark.parametrize("chunks", [
    [{"index": 0, "delta": "a"}, {"index": 2, "delta": "c", "finish": True}],  # a gap
    [{"index": 0, "delta": "a"}, {"index": 0, "delta": "b"}],                  # an index twice
    [{"index": -1, "delta": "a", "finish": True}],                              # not an index
    [{"delta": "a", "finish": True}],                                           # no index
])
def test_stream_assembler_refuses_bad_indexes_with_minus_25(chunks: list[dict[str, object]]) -> None:
    buffer = StreamAssembler()
    with pytest.raises(StackFlowError) as caught:
        for chunk in chunks:
            buffer.add(chunk)
    assert caught.value.code == ErrorCode.STREAM_INDEX
    assert len(buffer) == 0


# -- framing by brace balance (StackFlow's unit manager reads TCP this way) --------------------------

def test_the_framer_reads_objects_without_newlines_and_several_in_one_write() -> None:
    framer = JsonFramer()
    assert framer.feed(b'{"a": 1}{"b": {"c": 2}}\n  {"d"') == [b'{"a": 1}', b'{"b": {"c": 2}}']
    assert framer.feed(b": 3}") == [b'{"d": 3}']
    assert framer.feed(b"") == []


def test_the_framer_ignores_braces_and_escaped_quotes_inside_strings() -> None:
    framer = JsonFramer()
    message = json.dumps({"delta": 'a } brace, a { brace, a \\ and a " quote', "n": {"x": "}"}}).encode()
    out: list[object] = []
    for i in range(len(message)):  # one byte at a time: every split point, escapes included
        out += framer.feed(message[i:i + 1])
    assert out == [message]
    assert json.loads(message)["n"] == {"x": "}"}


def test_the_framer_reports_stray_bytes_once_per_run_and_goes_on() -> None:
    framer = JsonFramer()
    items = framer.feed(b'} junk }} {"ok": 1} more\n{"ok": 2}')
    assert [type(i) for i in items] == [FramingError, bytes, FramingError, bytes]
    errors = [i for i in items if isinstance(i, FramingError)]
    assert all(str(e).startswith("json format error") and not e.fatal for e in errors)
    assert [i for i in items if isinstance(i, bytes)] == [b'{"ok": 1}', b'{"ok": 2}']


def test_the_framer_cuts_an_oversize_object_with_a_fatal_error() -> None:
    framer = JsonFramer(max_object=100)
    assert framer.feed(b'{"x": "' + b"y" * 60) == []
    (error,) = framer.feed(b"y" * 60 + b'"}')
    assert isinstance(error, FramingError) and error.fatal
