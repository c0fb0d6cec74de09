"""A gateway SIGKILLed with sockets open: its clients see the close at once, move to another gateway,
lose nothing, run nothing twice, and read every task the dead gateway accepted over REST."""

from __future__ import annotations

import pytest

from reliability.gateway_kill import GatewayKillConfig, run_gateway_kill


@pytest.mark.timeout(180)
async def test_clients_of_a_killed_gateway_lose_nothing_and_read_their_results_elsewhere() -> None:
    config = GatewayKillConfig(clients=8, interval=0.1, before_kill=2.0, after_kill=1.5, seed=3)
    summary = await run_gateway_kill(config)
    assert summary.accepted_on_a > 0 and summary.accepted_on_b > 0, summary
    assert summary.lost == 0, summary
    assert summary.ran_twice == 0, summary  # re-sent submissions answered by the owner's dedupe key
    assert summary.readable_on_b == summary.accepted_on_a
    assert summary.clients_back == config.clients
    # The socket ends (the process is gone, so the close is 1006) and nobody is left hanging:
    assert set(summary.close_codes) == {"1006"}
    # Sessions live in the gateway that opened them: B refuses the resume with a documented error.
    assert all(answer.startswith("error:") for answer in summary.resume_answers), summary.resume_answers
    assert summary.ok
