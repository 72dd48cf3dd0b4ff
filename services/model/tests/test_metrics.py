"""The model service's metrics carry the monitors' reports: drift, live figures, labels."""

from __future__ import annotations

import math

import numpy as np
from model_helpers import DEFAULT_CARD
from prometheus_client import CollectorRegistry

from pumpflow.common.clock import ReplayClock
from pumpflow.common.model.drift import DriftMonitor, DriftReport, FeatureDrift
from pumpflow.common.model.performance import LabelTracker, ResolvedLabel, RollingPerformance
from pumpflow.model.metrics import ModelServiceMetrics


def test_the_metrics_carry_the_drift_report_and_count_the_transitions():
    metrics = ModelServiceMetrics(registry=CollectorRegistry())
    monitor = DriftMonitor(DEFAULT_CARD, clock=ReplayClock(0.0))
    # every feature far outside the card's reference: each one drifts
    rows = np.full((3_000, len(DEFAULT_CARD.feature_names)), 1e9)
    transitions = []
    for start in range(0, len(rows), 100):
        transitions += monitor.observe(rows[start : start + 100])
    drifting = [t for t in transitions if t.state == "drifting"]
    assert drifting
    metrics.drift([monitor.report()], transitions)
    feature = drifting[0].feature
    psi = {f.name: f.psi for f in monitor.report().features}[feature]
    assert metrics.psi("entry", feature) == psi >= 0.25
    assert metrics.drift_transitions("entry", "drifting") == len(drifting)
    assert metrics.drift_transitions("entry", "recovered") == 0


def test_the_metrics_carry_the_live_figures_and_the_pending_labels():
    metrics = ModelServiceMetrics(registry=CollectorRegistry())
    performance = RollingPerformance(window=10)
    for score, label in [(0.9, 1.0), (0.2, 0.0), (0.6, 0.0), (0.7, 1.0)]:
        performance.add(
            ResolvedLabel(
                mint="m",
                model_id="entry",
                version="v1",
                arm="a",
                task="classification",
                score=score,
                time=0.0,
                entry_price=1.0,
                label=label,
                definition=DEFAULT_CARD.label,
                resolved_at=1.0,
            )
        )
    metrics.performance(performance.by_arm("entry").values())
    assert metrics.live("entry", "a", "auc") == performance.figures("entry", "a").metrics["auc"]
    tracker = LabelTracker(clock=ReplayClock(0.0))
    tracker.register(
        mint="m",
        time=0.0,
        price=1.0,
        model_id="entry",
        version="v1",
        arm="a",
        score=0.5,
        definition=DEFAULT_CARD.label,
    )
    metrics.labels(tracker)
    assert metrics.pending_labels() == 1


def _report(
    model_id: str, figures: dict[str, tuple[float, bool]], observations: int
) -> DriftReport:
    return DriftReport(
        model_id=model_id,
        version="v",
        observations=observations,
        seen=observations,
        at=0.0,
        features=tuple(
            FeatureDrift(name=name, psi=psi, drifting=drifting)
            for name, (psi, drifting) in figures.items()
        ),
    )


def test_the_drift_gauges_of_what_no_longer_serves_are_removed():
    """A model gone, a feature its reload lacks, a PSI its fresh monitor has not computed:
    their series go, so a dashboard does not show a drift of what no longer serves."""
    registry = CollectorRegistry()
    metrics = ModelServiceMetrics(registry=registry)

    def gauge(name: str, model_id: str, feature: str | None = None) -> float | None:
        labels = {"model_id": model_id} | ({} if feature is None else {"feature": feature})
        return registry.get_sample_value(f"pumpflow_model_{name}", labels)

    metrics.drift(
        [
            _report("entry", {"buys": (0.4, True), "sells": (0.3, True)}, 3_000),
            _report("candidate", {"buys": (0.5, True)}, 3_000),
        ]
    )
    assert gauge("feature_psi", "candidate", "buys") == 0.5
    assert gauge("feature_drifting", "candidate", "buys") == 1
    assert gauge("drift_warming_up", "candidate") == 0
    # entry reloaded without "sells" (its fresh monitor has no PSI yet), candidate gone
    metrics.drift([_report("entry", {"buys": (math.nan, True)}, 0)])
    assert gauge("feature_psi", "entry", "buys") is None
    assert gauge("feature_drifting", "entry", "buys") == 1
    assert gauge("drift_window_vectors", "entry") == 0
    for name in ("feature_psi", "feature_drifting"):
        assert gauge(name, "entry", "sells") is None
        assert gauge(name, "candidate", "buys") is None
    assert gauge("drift_window_vectors", "candidate") is None
    assert gauge("drift_warming_up", "candidate") is None


def test_the_scores_of_an_arm_say_which_model_and_version_gave_them():
    """An arm whose model was reloaded or refitted: its scores before and after apart."""
    registry = CollectorRegistry()
    metrics = ModelServiceMetrics(registry=registry)
    for version, score in (("v1", 0.2), ("v1", 0.3), ("v2", 0.9)):
        metrics.predicted("mine", "candidate", version, False, score)
    for version, count, total in (("v1", 2, 0.5), ("v2", 1, 0.9)):
        labels = {"arm": "mine", "model_id": "candidate", "version": version}
        assert registry.get_sample_value("pumpflow_model_score_count", labels) == count
        assert math.isclose(registry.get_sample_value("pumpflow_model_score_sum", labels), total)


def test_the_live_figures_say_which_versions_they_are_of():
    """A refit swapped in mid-window: the arm's AUC is of both versions' predictions, and
    /metrics says so; a version gone from the window is gone from the gauge."""
    registry = CollectorRegistry()
    metrics = ModelServiceMetrics(registry=registry)
    performance = RollingPerformance(window=4)

    def add(version: str, score: float, label: float) -> None:
        performance.add(
            ResolvedLabel(
                mint="m", model_id="entry", version=version, arm="a", task="classification",
                score=score, time=0.0, entry_price=1.0, label=label,
                definition=DEFAULT_CARD.label, resolved_at=1.0,
            )
        )  # fmt: skip

    for version, score, label in [("v1", 0.9, 1.0), ("v1", 0.2, 0.0), ("v2", 0.7, 1.0)]:
        add(version, score, label)
    metrics.performance(performance.by_arm("entry").values())

    def versions() -> set[str]:
        return {
            s.labels["version"]
            for m in registry.collect()
            if m.name == "pumpflow_model_live_version"
            for s in m.samples
            if s.labels["model_id"] == "entry" and s.labels["arm"] == "a" and s.value == 1
        }

    assert versions() == {"v1", "v2"}
    for score, label in [(0.8, 1.0), (0.1, 0.0), (0.6, 1.0), (0.3, 0.0)]:
        add("v2", score, label)
    metrics.performance(performance.by_arm("entry").values())
    assert versions() == {"v2"}
