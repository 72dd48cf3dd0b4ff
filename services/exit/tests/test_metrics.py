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
