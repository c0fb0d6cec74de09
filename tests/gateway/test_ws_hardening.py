"""Frames that used to kill their socket (1006 and "Exception in ASGI application"): each now gets an
``error`` frame and the socket keeps working; and the token ways that keep it out of URLs."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

from gateway import ws as gateway_ws
from gateway.frames import MAX_DEPTH, MAX_SAFE_INT, FrameError, parse_frame, safe_id

Token = Callable[..., str]
DIGITS = sys.get_int_max_str_digits() or 4300


def test_parse_frame_refuses_what_json_loads_lets_through_or_breaks_on() -> None:
    assert parse_frame('{"type":"ping","id":1,"x":[1.5,{"y":null}]}')["x"] == [1.5, {"y": None}]
    ok_deep = '{"x":' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}"
    assert parse_frame(ok_deep)
    for text, words in [
        ('{"id":NaN}', "NaN"), ('{"id":Infinity}', "Infinity"), ('{"id":-Infinity}', "Infinity"),
        ('{"x":1e999}', "out of range"), ('{"id":' + "9" * (DIGITS + 1) + "}", "digits"),
        ('{"x":' + "[" * 100_000 + "]" * 100_000 + "}", "nested"),  # past the recursion limit
        ('{"x":' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}", "nested"),  # past ours only
        ("[1]", "JSON object"), ("{oops", "malformed JSON"),
    ]:
        with pytest.raises(FrameError, match=words):
            parse_frame(text)


def test_safe_id_echoes_only_short_strings_and_safe_integers() -> None:
    assert safe_id(None) is None and safe_id("r1") == "r1" and safe_id(-MAX_SAFE_INT) == -MAX_SAFE_INT
    for bad in (True, 1.5, MAX_SAFE_INT + 1, "x" * 129, {"a": 1}, [1]):
        with pytest.raises(FrameError):
            safe_id(bad)


async def test_frames_that_killed_the_socket_get_error_frames(
    connect: Any, token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    uvicorn_log = logging.getLogger("uvicorn.error")  # it does not propagate to caplog's root handler
    uvicorn_log.addHandler(caplog.handler)
    deadly = [
        '{"type":"ping","x":' + "[" * 20_000 + "]" * 20_000 + "}",  # past the recursion limit
        '{"type":"submit","task":"ai.summarize","data":' + '{"a":' * 900 + "1" + "}" * 900 + "}",
        '{"type":"ping","id":' + "9" * (DIGITS + 10) + "}",  # past the int-string limit
        '{"type":"ping","id":NaN}', '{"type":"ping","id":Infinity}',
        '{"type":"submit","task":"ai.summarize","data":{"x":1e999}}',
        '{"type":"ping","id":' + "9" * 4000 + "}",  # parses, but is no id to echo
        json.dumps({"type": "ping", "id": "i" * 500}), json.dumps({"type": "ping", "id": {"a": 1}}),
        json.dumps({"type": "x" * 10_000}),
        json.dumps({"type": "resume", "session_id": "s", "last_seq": 10**30}),
        json.dumps({"type": "cancel", "task_id": "t" * 10_000}),
    ]
    async with connect(token()) as client:
        session_id = (await client.recv())["session_id"]
        for n, text in enumerate(deadly):
            await client.send(text)
            frame = await client.recv()
            assert frame["type"] == "error" and frame["code"] == "bad_request", (n, frame)
            assert "id" not in frame and len(json.dumps(frame)) < 1000, (n, frame)
        # a resume of this socket's own session: the gateway used to end it, then push into it
        await client.send({"type": "resume", "id": 7, "session_id": session_id, "last_seq": 0})
        frame = await client.recv()
        assert (frame["type"], frame["code"], frame["id"]) == ("error", "conflict", 7), frame
        await client.ws.send(b"\x00\x01binary")
        assert (await client.recv())["code"] == "bad_request"
        await client.send({"type": "ping", "id": "still-here"})
        pong = await client.recv()
        assert pong == {"type": "pong", "id": "still-here", "seq": len(deadly) + 3}
    uvicorn_log.removeHandler(caplog.handler)
    broken = [r for r in caplog.records
              if r.levelno >= logging.ERROR or "Exception in ASGI" in r.getMessage()]
    assert not broken, [r.getMessage() for r in broken]


async def test_the_token_in_a_subprotocol_or_a_first_auth_frame(gateway: str, token: Token) -> None:
    url = gateway.replace("http://", "ws://") + "/ws"
    async with ws_connect(url, subprotocols=["bearer", token()]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "bearer"  # only that is echoed: never the token
        assert json.loads(await ws.recv())["type"] == "welcome"
    async with ws_connect(url) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token()}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.send(json.dumps({"type": "auth", "id": "a2", "token": token()}))
        again = json.loads(await ws.recv())
        assert (again["type"], again["code"], again["id"]) == ("error", "bad_request", "a2")
    for first in (json.dumps({"type": "ping"}), json.dumps({"type": "auth", "token": "not-a-jwt"}), "{oops"):
        async with ws_connect(url) as ws:
            await ws.send(first)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == gateway_ws.CLOSE_POLICY, first
    async with ws_connect(url, subprotocols=["bearer", "not-a-jwt"]) as ws:  # type: ignore[list-item]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == gateway_ws.CLOSE_POLICY


async def test_no_auth_frame_in_time_closes_with_its_code(
    gateway: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway_ws, "AUTH_TIMEOUT_S", 0.3)
    async with ws_connect(gateway.replace("http://", "ws://") + "/ws") as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == gateway_ws.CLOSE_AUTH_TIMEOUT == 4003
