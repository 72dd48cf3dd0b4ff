"""Trading's counters whose label values are known are exported from 0.

Prometheus' increase() does not count a series' first sample: a counter child made at
its first increment appears already at 1, and the breaker's first trip, or the first
order rejected, would read 0 on the dashboard.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from pumpflow.common.trading import BREAKERS, LIMITS
from pumpflow.trading.metrics import TradingMetrics


def test_the_counters_of_known_labels_are_exported_from_0():
    registry = CollectorRegistry()
    TradingMetrics(registry=registry)
    for breaker in BREAKERS:
        assert (
            registry.get_sample_value("pumpflow_trading_breaker_trips_total", {"breaker": breaker})
            == 0
        ), breaker
    for side in ("buy", "sell"):
        for outcome in ("sent", "filled", "rejected", "duplicate"):
            labels = {"side": side, "outcome": outcome}
            assert registry.get_sample_value("pumpflow_trading_orders_total", labels) == 0, labels
        assert registry.get_sample_value("pumpflow_trading_fill_sol_total", {"side": side}) == 0
    for outcome in ("order", "no_order"):
        assert (
            registry.get_sample_value("pumpflow_trading_predictions_total", {"outcome": outcome})
            == 0
        ), outcome
    for limit in LIMITS:
        assert (
            registry.get_sample_value("pumpflow_trading_fills_over_limit_total", {"limit": limit})
            == 0
        ), limit
