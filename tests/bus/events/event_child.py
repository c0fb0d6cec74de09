"""A subscriber process for the crash test:
``python -m tests.bus.events.event_child URL PREFIX SERVICE MARK``.

It subscribes ``SERVICE`` to ``meeting.*``; on its first event it writes the event id to MARK and
then hangs in the handler until it is killed, so the event is never acknowledged.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from shared.bus.events.base import EventBus


async def main(url: str, prefix: str, service: str, mark: str) -> None:
    bus = EventBus.from_url(url, service=service, prefix=prefix, ack_wait=1.0)

    @bus.subscribe("meeting.*")
    async def hang(event: Any) -> None:
        written = Path(mark + ".part")  # then renamed: the test never sees MARK exist but empty
        written.write_text(event.id)  # noqa: ASYNC240 - a few bytes, once
        written.replace(mark)  # noqa: ASYNC240 - once
        await asyncio.Event().wait()

    await bus.start()
    Path(mark + ".ready").write_text("ready")  # noqa: ASYNC240 - a few bytes, once
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
