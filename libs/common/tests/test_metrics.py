"""Metric families: built once per registry, never another registry's."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, Counter

from pumpflow.common.metrics import families


def counted(registry: CollectorRegistry) -> Counter:
    return Counter("pumpflow_test_counted", "A count.", registry=registry)


def test_a_registry_shares_its_families_and_a_new_one_starts_from_nothing():
    """Objects of one registry share its families; a registry made after another is gone
    (Python may give it the same id) gets its own, at zero, not the gone one's counts."""
    registry = CollectorRegistry()
    assert families("test", counted, registry) is families("test", counted, registry)
    for _ in range(20):
        registry = CollectorRegistry()
        counter = families("test", counted, registry)
        assert counter._value.get() == 0
        counter.inc()
        del registry, counter
        gc.collect()
