"""``chaos soak`` for two minutes with short retention: the mesh's memory levels off as retention
says it should (records expire, streams are capped, sessions of dropped sockets go)."""

from __future__ import annotations

import pytest

from reliability.soak import REDIS_SLOPE_LIMIT, RSS_SLOPE_LIMIT, SoakConfig, run_soak


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_two_minute_soak_grows_no_more_than_retention_explains() -> None:
    config = SoakConfig(minutes=2.0, ws_users=3, rate=8.0, rest_rate=4.0, reconnect_every=15.0,
                        completed_ttl=15.0, replay_window=5.0, sample_every=4.0, warmup=45.0, seed=14)
    summary = await run_soak(config)
    assert summary.submitted > 0 and summary.completed_seen > 0, summary.as_dict(with_samples=False)
    # nothing refused or failed: every submission answered, every REST result read
    assert summary.errors == 0, summary.error_kinds
    # records expire after completed_ttl: their number levels off at about rate x ttl, not with the run
    rate = config.ws_users * config.rate + config.rest_rate
    assert summary.keys_at_end < 3 * rate * config.completed_ttl + 100, summary.as_dict(with_samples=False)
    assert summary.redis_less_streams_slope <= REDIS_SLOPE_LIMIT, summary.as_dict(with_samples=False)
    assert summary.gateway_rss_slope <= RSS_SLOPE_LIMIT, summary.as_dict(with_samples=False)
    assert summary.workers_rss_slope <= RSS_SLOPE_LIMIT, summary.as_dict(with_samples=False)
