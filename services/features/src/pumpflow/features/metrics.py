"""Metrics of the features service, on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from pumpflow.common.metrics import families


def _build(registry: CollectorRegistry) -> Gauge:
    return Gauge(
        "pumpflow_features_feature_set",
        "The feature set this replica computes (1), by version and feature count.",
        ["version", "features"],
        registry=registry,
    )


class FeaturesMetrics:
    """The feature set served; per-event series are the keyed consumer's."""

    def __init__(self, *, registry: CollectorRegistry | None = None):
        self.feature_set = families("features", _build, registry)

    def serving(self, version: str, features: int) -> None:
        self.feature_set.labels(version, str(features)).set(1)
