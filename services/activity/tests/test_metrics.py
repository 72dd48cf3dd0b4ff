"""FeatureActivityMetrics: ActivityMetrics read from the FeatureManager's features."""

from __future__ import annotations

import pytest

from pumpflow.common.activity.metrics import FeatureActivityMetrics
from pumpflow.common.features import FeatureManager, feature


async def test_metrics_follow_the_trades(clock, tokens):
    source = FeatureActivityMetrics()
    m = source.update(tokens.created("A", sol=0.5))
    assert m.trades_total == 1 and m.unique_traders == 1 and m.time == clock.now()
    sol = 0.5
    for i in range(11):
        await clock.advance(5)
        buy = i != 10
        event = tokens.trade("A", f"w{i % 6}" if buy else "w0", buy=buy, sol=0.2)
        sol += event.data.solAmount
        m = source.update(event)
    # 12 events within the last 60 s (create at 0, trades at 5..55)
    assert m.trades_per_minute == pytest.approx(12.0)
    assert m.sol_volume_per_minute == pytest.approx(sol, rel=1e-6)
    assert m.unique_traders == 7  # creator + w0..w5
    assert m.new_traders == 7
    assert m.drawdown > 0 and m.price_return > 0  # the last trade was a sell
    assert 0 < m.curve_progress < 0.1
    assert m.time == clock.now() and m.seconds_since_last_trade == 0
    assert source.update(tokens.migrated("A")) is None
    raw = source.snapshot("A")
    source.drop("A")
    assert source.metrics("A") is None and source.tracked == 0
    source.restore("A", raw)
    assert source.metrics("A") == m


def test_a_feature_set_without_the_needed_features_is_refused():
    manager = FeatureManager([feature("price", "price")])
    with pytest.raises(ValueError, match="trades_per_minute"):
        FeatureActivityMetrics(manager)
