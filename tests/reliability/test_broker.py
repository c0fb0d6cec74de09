"""``chaos broker`` at a test's size: a private nats-server restarted gracefully and with SIGKILL while
durable events are published; every acknowledged event arrives once it is back."""

from __future__ import annotations

import pytest

from reliability.broker import BrokerConfig, run_broker


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_durable_events_survive_nats_restarts() -> None:
    # away 7 s: longer than nats-py's reconnect attempts at start-up (3 x 2 s), after which a connected
    # bus used to give up for good
    summary = await run_broker(BrokerConfig(modes=("graceful", "kill"), rate=50.0, warm=1.5, down=7.0,
                                            after=1.5, settle=30.0))
    assert [r.mode for r in summary.restarts] == ["graceful", "kill"]
    assert summary.published > 0
    assert summary.missing == 0, summary
    assert summary.received == summary.published, summary
    for restart in summary.restarts:
        assert restart.publish_recovery_s is not None, restart  # the publisher carried on by itself
        assert restart.delivery_recovery_s is not None, restart  # and the subscriber, without a restart


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_durable_events_survive_rabbitmq_restarts() -> None:
    """A RabbitMQ node of our own (never the machine's), stopped gracefully and killed."""
    summary = await run_broker(BrokerConfig(backend="amqp", modes=("graceful", "kill"), rate=50.0, warm=1.5,
                                            down=2.0, after=1.5, settle=40.0))
    assert summary.backend == "amqp" and [r.mode for r in summary.restarts] == ["graceful", "kill"]
    assert summary.published > 0
    assert summary.missing == 0, summary
    assert summary.received == summary.published, summary
    for restart in summary.restarts:
        assert restart.publish_recovery_s is not None, restart
        assert restart.delivery_recovery_s is not None, restart
