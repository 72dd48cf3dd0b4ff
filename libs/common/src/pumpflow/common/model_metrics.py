"""Prometheus metrics of the models' drift and live performance, on an injected registry.

The monitors (:mod:`pumpflow.common.model.drift`, :mod:`pumpflow.common.model.performance`)
are pure; the service hands their reports to :class:`ModelMonitorMetrics` after each
check. Series are labelled by model id (and arm for performance), not by version: a hot
swap continues the series, and the version serving is its own gauge.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from pumpflow.common.events import ModelDrift
from pumpflow.common.metrics import families
from pumpflow.common.model.drift import DriftReport
from pumpflow.common.model.performance import LabelTracker, LiveFigures


class _Families:
    def __init__(self, registry: CollectorRegistry):
        self.psi = Gauge(
            "pumpflow_model_feature_psi",
            "Population stability index of a feature over the drift window, against the "
            "model card's reference.",
            ["model_id", "feature"],
            registry=registry,
        )
        self.drifting = Gauge(
            "pumpflow_model_feature_drifting",
            "1 while a feature of a model is drifting (PSI crossed the alert threshold and "
            "has not come back under the recovery one).",
            ["model_id", "feature"],
            registry=registry,
        )
        self.drift_window = Gauge(
            "pumpflow_model_drift_window_vectors",
            "Feature vectors in a model's drift window.",
            ["model_id"],
            registry=registry,
        )
        self.drift_transitions = Counter(
            "pumpflow_model_drift_transitions",
            "Drift transitions of a model's features, by state (drifting, recovered).",
            ["model_id", "state"],
            registry=registry,
        )
        self.live = Gauge(
            "pumpflow_model_live_metric",
            "A model's performance on an arm over its last resolved labels, by metric "
            "(auc, brier, precision, positive_rate, selected_rate, threshold; rmse, mae).",
            ["model_id", "arm", "metric"],
            registry=registry,
        )
        self.live_labels = Gauge(
            "pumpflow_model_live_labels",
            "Resolved labels in a model's rolling performance window on an arm.",
            ["model_id", "arm"],
            registry=registry,
        )
        self.pending_labels = Gauge(
            "pumpflow_model_pending_labels",
            "Predictions whose label waits for its horizon.",
            registry=registry,
        )
        self.dropped_labels = Gauge(
            "pumpflow_model_dropped_labels",
            "Predictions whose label was dropped unresolved (too many pending).",
            registry=registry,
        )


class ModelMonitorMetrics:
    """Drift and live-performance gauges of the models a service serves."""

    def __init__(self, *, registry: CollectorRegistry | None = None):
        self._f = families("model_monitor", _Families, registry)

    def drift(self, report: DriftReport, transitions: Sequence[ModelDrift] = ()) -> None:
        """Set the gauges from a drift report and count the transitions of its check."""
        for feature in report.features:
            if not math.isnan(feature.psi):
                self._f.psi.labels(report.model_id, feature.name).set(feature.psi)
            self._f.drifting.labels(report.model_id, feature.name).set(int(feature.drifting))
        self._f.drift_window.labels(report.model_id).set(report.observations)
        for transition in transitions:
            self._f.drift_transitions.labels(transition.model_id, transition.state).inc()

    def psi(self, model_id: str, feature: str) -> float:
        return self._f.psi.labels(model_id, feature)._value.get()

    def drift_transitions(self, model_id: str, state: str) -> float:
        return self._f.drift_transitions.labels(model_id, state)._value.get()

    def performance(self, figures: Iterable[LiveFigures]) -> None:
        """Set the live-performance gauges (NaN figures, like AUC of one class, skipped)."""
        for each in figures:
            for metric, value in each.metrics.items():
                if not math.isnan(value):
                    self._f.live.labels(each.model_id, each.arm, metric).set(value)
            self._f.live_labels.labels(each.model_id, each.arm).set(each.labels)

    def labels(self, tracker: LabelTracker) -> None:
        self._f.pending_labels.set(tracker.pending)
        self._f.dropped_labels.set(tracker.dropped)

    def live(self, model_id: str, arm: str, metric: str) -> float:
        return self._f.live.labels(model_id, arm, metric)._value.get()
