"""``chaos malformed``: garbage written straight into Redis lists, streams and records never stops the
worker, the task relay or a service's event consumer; bad tasks and events are dead-lettered with
their reason."""

from __future__ import annotations

import pytest

from reliability.malformed import EVENT_CASES, RELAY_CASES, WORKER_CASES, run_malformed
from shared.bus.queue.leases import parse_delivery


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_malformed_messages_are_dead_lettered_and_no_consumer_stops() -> None:
    summary = await run_malformed()
    by = {(c.consumer, c.name): c for c in summary.cases}
    # every case ran (worker: the records, a dangling ready id, inbox garbage)
    assert len(summary.cases) == len(WORKER_CASES) + 2 + len(RELAY_CASES) + len(EVENT_CASES)
    for case in summary.cases:
        assert case.consumer_alive, case  # the good message sent after it was handled (same worker PID)
        assert case.handled, case
    for name in ("body not JSON", "body not an object", "body without a type", "body with wrong types"):
        outcome = by["worker", name].outcome
        assert outcome.startswith("dead:") and "malformed" in outcome, outcome  # with the reason
    for name in EVENT_CASES:
        assert by["events", name].outcome.startswith("dead: "), by["events", name]


@pytest.mark.parametrize("text", ["", "garbage", "a\nb\nc", "id\nx\n2\n{}", "id\n1\n2\n{not json",
                                  'id\n1\n2\n{"type": "t", "priority": "urgent"}', "id\n1\n2\n[1]"])
def test_a_delivery_string_that_does_not_parse_is_a_delivery_without_a_message(text: str) -> None:
    delivery = parse_delivery(text)
    assert delivery.message is None and delivery.error
