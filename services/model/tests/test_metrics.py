"""The model service's metrics carry the monitors' reports: drift, live figures, labels."""

from __future__ import annotations

import numpy as np
from model_helpers import DEFAULT_CARD
from prometheus_client import CollectorRegistry

from pumpflow.common.clock import ReplayClock
from pumpflow.common.model.drift import DriftMonitor
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
    metrics.drift(monitor.report(), transitions)
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
