"""Property-based fuzzing of the REST API against its own OpenAPI document, with schemathesis.

Every operation gets generated requests, valid and invalid, sent to a real gateway (uvicorn, Redis,
the event bus) with an admin token, a user token, and a made-up token or none. Whatever a client
sends, the gateway must answer without a 5xx, with a status code its document lists for the
operation, the declared content type and a body that matches the declared schema
(``{"error": {"code", "message"}}`` for every error); schemathesis's other default checks run too
(invalid input rejected, valid input accepted, auth enforced, 405 with a correct ``Allow``).

The examples per operation are bounded and derandomized: the same requests every run.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from gateway import create_app
from gateway.auth import mint
from gateway.settings import GatewaySettings
from shared.bus import connect

from ..conftest import REDIS_URL
from ..services.harness import running_services
from .conftest import SECRET, serve

pytestmark = pytest.mark.slow

QUEUES = ["ai", "media", "meeting", "user"]
# The document FastAPI serves at /openapi.json (test_the_live_document_is_the_one_fuzzed checks that).
DOCUMENT = create_app(GatewaySettings(jwt_secret=SECRET)).openapi()


def load(token: str | None) -> Any:
    """The document as schemathesis sees it, sending ``token`` (or, without one, whatever it makes up)."""
    config: dict[str, Any] = {
        "generation": {"deterministic": True, "database": "none"},
        # Real queue names half of the time, so admin routes answer 200 as well as 404.
        "dictionaries": {"queues": {"values": QUEUES}},
        "parameters": {"path.name": {"dictionary": "queues", "probability": 0.5}},
        "operations": [
            {
                # A well-formed task of a type no service owns answers 400 unknown_task.
                "include-name": ["POST /api/v1/tasks", "POST /api/v1/tasks/batch"],
                "checks": {"positive_data_acceptance": {"expected-statuses": ["2XX", 400, 401, 413, 429]}},
            }
        ],
    }
    if token is not None:
        config["auth"] = {"openapi": {"HTTPBearer": {"bearer": token}}}
    return schemathesis.openapi.from_dict(DOCUMENT, config=SchemathesisConfig.from_dict(config))


ADMIN, ALICE, BOB = mint(SECRET, "root", admin=True), mint(SECRET, "alice"), mint(SECRET, "bob")
as_admin, as_user, anonymous = load(ADMIN), load(ALICE), load(None)

TIMEOUT = 10.0  # per request: the SSE stream of a live task only ends with the task
EXAMPLES = settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,
    # Others share this machine: slow generation is not the gateway's fault.
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def live() -> Iterator[str]:
    """A real gateway for the whole module, in a thread of its own: the tests here are synchronous."""
    prefix = f"mmtest-{uuid.uuid4().hex[:12]}"
    gw = GatewaySettings(
        redis_url=REDIS_URL,
        key_prefix=prefix,
        jwt_secret=SECRET,
        submit_rate=1000,
        submit_burst=1000,
        max_frame_bytes=64 * 1024,
    )
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()
    url: list[str] = []
    failure: list[BaseException] = []
    data_dir = tempfile.mkdtemp(prefix="mmschema-")

    async def main() -> None:
        try:
            async with (
                running_services(
                    redis_url=REDIS_URL,
                    key_prefix=prefix,
                    jwt_secret=SECRET,
                    data_dir=Path(data_dir),
                    workers=False,
                ),
                serve(gw) as base,
            ):
                url.append(base)
                started.set()
                await stop.wait()
        finally:
            redis = await connect(REDIS_URL)
            async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
                await redis.delete(key)
            await redis.aclose()
            shutil.rmtree(data_dir, ignore_errors=True)

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:
            failure.append(exc)
        finally:
            started.set()

    thread = threading.Thread(target=run, name="gateway-under-test", daemon=True)
    thread.start()
    started.wait(60)
    try:
        if not url:
            raise RuntimeError("the gateway did not start") from (failure[0] if failure else None)
        yield url[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        if not thread.is_alive():
            loop.close()
    if failure:
        raise failure[0]


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


@as_admin.parametrize()
@EXAMPLES
def test_as_admin(case: Any, live: str, session: requests.Session) -> None:
    case.call_and_validate(base_url=live, session=session, timeout=TIMEOUT)


@as_user.parametrize()
@EXAMPLES
def test_as_user(case: Any, live: str, session: requests.Session) -> None:
    case.call_and_validate(base_url=live, session=session, timeout=TIMEOUT)


@anonymous.parametrize()
@EXAMPLES
def test_without_a_valid_token(case: Any, live: str, session: requests.Session) -> None:
    response = case.call_and_validate(base_url=live, session=session, timeout=TIMEOUT)
    public = case.path in ("/api/v1/auth/register", "/api/v1/auth/login")
    if case.path.startswith("/api/") and not public and case.method.upper() == case.operation.method.upper():
        # 401, or 400 for a body that is not even JSON (FastAPI reads it before checking the token)
        assert response.status_code in (400, 401), response.text


def test_the_live_document_is_the_one_fuzzed(live: str, session: requests.Session) -> None:
    assert session.get(f"{live}/openapi.json", timeout=TIMEOUT).json() == DOCUMENT


def test_a_real_task_read_cancelled_and_watched(live: str, session: requests.Session) -> None:
    """Generated ids name no task: one real task's record, cancel and events are checked the same way."""

    def call(token: str, path: str, method: str, **parts: Any) -> Any:
        case = anonymous[path][method].Case(headers={"Authorization": f"Bearer {token}"}, **parts)
        return case.call_and_validate(base_url=live, session=session, timeout=TIMEOUT)

    submitted = call(ALICE, "/api/v1/tasks", "POST", body={"type": "meeting.create", "meeting_id": "m1"})
    assert submitted.status_code == 202, submitted.text
    task = {"path_parameters": {"task_id": submitted.json()["task_id"]}}
    assert call(ALICE, "/api/v1/tasks/{task_id}", "GET", **task).json()["status"] == "queued"
    # Somebody else's task: the same 404 as for no task.
    assert call(BOB, "/api/v1/tasks/{task_id}", "GET", **task).status_code == 404
    assert call(BOB, "/api/v1/tasks/{task_id}", "DELETE", **task).status_code == 404
    assert call(BOB, "/api/v1/tasks/{task_id}/events", "GET", **task).status_code == 404
    assert call(ALICE, "/api/v1/tasks/{task_id}", "DELETE", **task).json()["cancelled"] is True
    record = call(ADMIN, "/api/v1/tasks/{task_id}", "GET", **task).json()
    assert record["status"] == "cancelled" and record["error"]["code"] == "cancelled"
    # Finished: the stream is its one `result` event, then it ends.
    events = call(ALICE, "/api/v1/tasks/{task_id}/events", "GET", **task)
    assert events.status_code == 200 and events.text.startswith("event: result")
    assert '"status": "cancelled"' in events.text


@pytest.mark.parametrize(
    ("method", "path", "parts"),
    [
        # 500: Redis refused the offset ("value is not an integer or out of range")
        (
            "GET",
            "/api/v1/queues/{name}/dead-letters",
            {"path_parameters": {"name": "ai"}, "query": {"offset": 10**32}},
        ),
        # 202: lax pydantic took a bool or a string for a number
        ("POST", "/api/v1/tasks", {"body": {"type": "ai.chat", "delay_s": False}}),
        ("POST", "/api/v1/tasks/batch", {"body": {"tasks": [{"type": "ai.chat", "timeout_s": "30"}]}}),
    ],
)
def test_what_fuzzing_found_stays_fixed(
    method: str, path: str, parts: dict[str, Any], live: str, session: requests.Session
) -> None:
    case = as_admin[path][method].Case(headers={"Authorization": f"Bearer {ADMIN}"}, **parts)
    response = case.call_and_validate(base_url=live, session=session, timeout=TIMEOUT)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"


def test_a_405_allows_every_method_of_the_path(live: str, session: requests.Session) -> None:
    """Starlette's ``Allow`` named only the first route's methods: GET but not DELETE here."""
    response = session.request("PUT", f"{live}/api/v1/tasks/ai.x", timeout=TIMEOUT)
    assert response.status_code == 405 and response.headers["Allow"] == "GET, DELETE"
    assert response.json()["error"]["code"] == "bad_request"
    response = session.request("PUT", f"{live}/api/v1/tasks/batch", timeout=TIMEOUT)
    assert response.status_code == 405 and response.headers["Allow"] == "POST"
