"""Running the user and meeting services beside a gateway in tests (this suite's ``mesh`` fixture;
also what a gateway test that calls their routes, such as the OpenAPI fuzzing, needs)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from services.common import Service, ServiceSettings
from services.media.service import build as build_media
from services.meeting.service import build as build_meeting
from services.user.service import build as build_user

CHEAP_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_kib": 1024, "argon2_parallelism": 1}


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set ``MEETMESH_*`` variables for the block, then put back what was there."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.asynccontextmanager
async def running_services(
    *, redis_url: str, key_prefix: str, jwt_secret: str, data_dir: Path, workers: bool = True, **settings: Any
) -> AsyncIterator[dict[str, Service]]:
    """The user and meeting services on free ports (SQL: SQLite under ``data_dir`` unless ``settings``
    say otherwise), with ``MEETMESH_USER_URL`` / ``MEETMESH_MEETING_URL`` naming them while the block
    runs: a gateway created inside it (``create_app``) proxies to them. ``workers=False``: their REST
    only, nothing consumes their queues (tasks stay queued)."""
    config = ServiceSettings(
        redis_url=redis_url,
        key_prefix=key_prefix,
        jwt_secret=jwt_secret,
        data_dir=data_dir,
        **{**CHEAP_ARGON2, **settings},
    )
    users, meetings = build_user(config, port=0), build_meeting(config, port=0)
    media = build_media(config, port=0)  # its store: <data_dir>/media
    if not workers:
        users.router = meetings.router = media.router = None
    async with users.running(), meetings.running(), media.running():
        with environment(MEETMESH_USER_URL=str(users.url), MEETMESH_MEETING_URL=str(meetings.url),
                         MEETMESH_MEDIA_URL=str(media.url)):
            yield {"user": users, "meeting": meetings, "media": media}
