"""A simulated hour through the activity analyzer: the subscribed set stays bounded.

The simulator's market (seeded) is replayed on a ReplayClock as fast as possible;
the feed is modelled (a token streams from its creation until it is unsubscribed).
Figures are printed (run with -s) and asserted loosely; the benchmark
``benchmarks/activity_replay.py`` prints the same figures for other seeds and lengths.
"""

from __future__ import annotations

import json

import pytest

from pumpflow.activity.replay import replay_subscriptions
from pumpflow.common.activity import LifecycleThresholds
from pumpflow.simulator.market import Market, MarketConfig

pytestmark = pytest.mark.slow

TH = LifecycleThresholds()
HOUR = 3600.0
START = 1_700_000_000.0


async def test_subscribed_set_is_bounded_and_follows_activity():
    report = await replay_subscriptions(Market(MarketConfig(seed=7)).frames(HOUR), start=START)
    print("\nactivity replay, seed 7, one hour:", json.dumps(report.summary(), indent=1))
    end = START + report.duration_s

    assert report.launched > 1000
    # bounded: at most a small share of what launched is ever streamed at once
    assert report.max_watched < report.launched / 5
    assert report.mean_watched < report.max_watched

    # every token that went quiet was unsubscribed within the inactivity threshold
    # of its last trade (graduates: their linger time after migrating)
    tolerance = 1e-6
    for mint, last in report.last_activity.items():
        retired = report.retired_at.get(mint)
        if retired is None:
            assert end - last < TH.inactive_after_quiet_s + TH.graduated_linger_s, mint
        else:
            assert retired - last <= TH.inactive_after_quiet_s + tolerance, mint
    quiet_long_before_end = [
        m for m, last in report.last_activity.items() if end - last > 2 * TH.inactive_after_quiet_s
    ]
    assert quiet_long_before_end
    assert all(m in report.retired_at for m in quiet_long_before_end)

    # follows activity: a token-minute with >= 6 trades in the full stream was streamed
    assert report.hot_minutes > 1000
    assert report.hot_minutes_watched / report.hot_minutes > 0.99
    # and the set is not just "everything": quiet tokens stopped costing messages
    assert len(report.retired_at) > report.launched / 2
