"""The exit's counters whose label values are known are exported from 0.

Prometheus' increase() does not count a series' first sample: a counter child made at
its first increment appears already at 1, and an operator's first sale refused would
read 0 on the dashboard.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from pumpflow.common.clock import ReplayClock

from .helpers import START, embedded, exit_service


async def test_the_sale_requests_are_exported_from_0_once_the_service_runs():
    registry = CollectorRegistry()
    async with embedded(ReplayClock(START), exit_service(registry=registry)):
        for outcome in ("ordered", "refused"):
            labels = {"outcome": outcome}
            value = registry.get_sample_value("pumpflow_exit_sale_requests_total", labels)
            assert value == 0, outcome


#: every rule that names an exit order: the rules', an operator's sale, a graceful exit's
_ORDER_RULES = (
    "take_profit", "trailing_stop", "stop_loss", "time_stop", "stale_stop", "decline",
    "inactivity", "migration", "requested", "graceful", "deadline",
)  # fmt: skip
#: the rules whose sales' outcomes are counted (a graceful exit's tranches are not)
_SETTLED_RULES = _ORDER_RULES[:-2]


async def test_the_exit_orders_and_outcomes_of_every_rule_are_exported_from_0():
    registry = CollectorRegistry()
    async with embedded(ReplayClock(START), exit_service(registry=registry)):
        for rule in _ORDER_RULES:
            value = registry.get_sample_value("pumpflow_exit_orders_total", {"rule": rule})
            assert value == 0, rule
        for rule in _SETTLED_RULES:
            for outcome in ("filled", "rejected"):
                labels = {"rule": rule, "outcome": outcome}
                value = registry.get_sample_value("pumpflow_exit_outcomes_total", labels)
                assert value == 0, labels
