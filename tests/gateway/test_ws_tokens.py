"""No token reaches a log line: a real ``meetmesh gateway`` process (uvicorn as in production, at INFO)
is connected to in each of the three ways a WebSocket may carry its token, and a REST call sends one
in its header; then the process's whole output is searched for every token used."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import connect

from gateway.auth import mint
from gateway.logs import REDACTED, RedactSecrets, redact

from .conftest import SECRET
from .process import gateway_process


def test_redact_hides_query_tokens_bearer_values_and_jwts() -> None:
    jwt = mint(SECRET, "ann")
    line = f'127.0.0.1:5 - "WebSocket /ws?token={jwt}&x=1" [accepted] Authorization: Bearer {jwt} {jwt}'
    cleaned = redact(line)
    assert jwt not in cleaned and jwt.split(".")[2] not in cleaned
    assert f"/ws?token={REDACTED}&x=1" in cleaned and f"Bearer {REDACTED}" in cleaned
    assert redact("GET /health 200 in 1/2 s") == "GET /health 200 in 1/2 s"  # nothing else is touched

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger("test.redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error('"WebSocket %s" [accepted]', f"/ws?token={jwt}")  # as uvicorn logs it: in the args
        try:
            raise ValueError(f"bad token {jwt}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert jwt not in out.getvalue() and f"token={REDACTED}" in out.getvalue(), out.getvalue()


async def test_no_token_in_a_gateway_process_output_whichever_way_it_came(
    tmp_path: Path, redis_url: str, key_prefix: str, redis: Any
) -> None:
    tokens = {way: mint(SECRET, f"user-{way}") for way in ("query", "protocol", "frame", "rest", "bad")}
    async with gateway_process(redis_url, key_prefix, tmp_path / "gateway.log") as gw:
        async with connect(f"{gw.ws}?token={tokens['query']}") as ws:
            assert json.loads(await ws.recv())["type"] == "welcome"
        async with connect(gw.ws, subprotocols=["bearer", tokens["protocol"]]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "bearer"
            assert json.loads(await ws.recv())["type"] == "welcome"
        async with connect(gw.ws) as ws:
            await ws.send(json.dumps({"type": "auth", "token": tokens["frame"]}))
            assert json.loads(await ws.recv())["type"] == "welcome"
        bad = tokens["bad"][:-4] + "AAAA"  # a wrong signature: refused, and its refusal logged nowhere
        async with connect(f"{gw.ws}?token={bad}") as ws:
            try:
                await ws.recv()
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 1008
        async with httpx.AsyncClient(base_url=gw.url) as http:
            r = await http.get("/api/v1/tasks/ai.nope", headers={"Authorization": f"Bearer {tokens['rest']}"})
            assert r.status_code == 404
        assert gw.proc.returncode is None
    output = gw.output()
    assert "[accepted]" in output and f"/ws?token={REDACTED}" in output, output[-2000:]  # uvicorn's line
    for way, token in {**tokens, "bad": bad}.items():
        for piece in (token, token.split(".")[2]):  # the whole token, and its signature alone
            assert piece not in output, f"the {way} token is in the gateway's output"
