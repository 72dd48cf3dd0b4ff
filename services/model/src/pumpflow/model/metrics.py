"""Metrics of the model service, on an injected registry.

What it scores (predictions, scores, skipped vectors, arms, versions served, the changes
of the serving it made, tokens handed to another arm when theirs left), its refits
(by outcome and reason, :mod:`pumpflow.model.outcomes`) and stored labels, and its
models' drift and live performance: the monitors (:mod:`pumpflow.common.model.drift`,
:mod:`pumpflow.common.model.performance`) are pure, and the service hands their reports
here after each check. Drift and performance series
are labelled by model id (and arm for performance), not by version: a hot swap continues
the series, and the version serving and the versions behind an arm's live figures are
gauges of their own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pumpflow.common.events import DriftState, ModelDrift
from pumpflow.common.metrics import families
from pumpflow.common.model.drift import DriftReport
from pumpflow.common.model.performance import LabelTracker, LiveFigures
from pumpflow.common.model.processor import SKIP_REASONS
from pumpflow.model.outcomes import REFIT_REASONS

#: the changes of the serving a replica makes (the counter's label values): a model
#: loaded, the arm table put whole, weights, a promotion, an arm removed, a model
#: unloaded, a refit swapped in
SERVING_CHANGES = ("load", "arms", "weights", "promote", "remove_arm", "unload", "refit")
#: when a stored serving could not be served, and why (the counter's label values)
UNAVAILABLE_WHEN = ("start", "follow")
UNAVAILABLE_REASONS = ("missing", "refused")
#: the states a model.drift announces (the transitions counter's label values)
DRIFT_STATES = get_args(DriftState)
#: scores are probabilities (classification); a regression's returns fall in the ends
_SCORE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


class _Families:
    def __init__(self, registry: CollectorRegistry):
        self.predictions = Counter(
            "pumpflow_model_predictions",
            "model.prediction events published, by arm, model id, version and shadow",
            ["arm", "model_id", "version", "shadow"],
            registry=registry,
        )
        self.scores = Histogram(
            "pumpflow_model_score",
            "Scores published (classification: the probability of the label; regression: "
            "the net return predicted), by arm, model id and version",
            ["arm", "model_id", "version"],
            buckets=_SCORE_BUCKETS,
            registry=registry,
        )
        self.skipped = Counter(
            "pumpflow_model_vectors_skipped",
            "features.updated not scored, by reason of the scoring policy",
            ["reason"],
            registry=registry,
        )
        self.failed = Counter(
            "pumpflow_model_prediction_failures",
            "Predictions an arm's model could not make (not loaded, expired, scored NaN), by "
            "model and error",
            ["model_id", "error"],
            registry=registry,
        )
        self.batch_rows = Counter(
            "pumpflow_model_batched_rows",
            "Vectors scored ahead in delivery batches (one model call per batch and model)",
            registry=registry,
        )
        self.arm_share = Gauge(
            "pumpflow_model_arm_share",
            "Expected share of live tokens of each arm (0 for a shadow arm)",
            ["arm", "model_id", "shadow"],
            registry=registry,
        )
        self.serving_changes = Counter(
            "pumpflow_model_serving_changes",
            "Changes of the serving (models and arms) this replica made and stored for "
            "every replica, by change: load, arms (the table put whole), weights, promote, "
            "remove_arm, unload, refit (a refit swapped in); the replicas following one do "
            "not count it, so sum over the replicas",
            ["change"],
            registry=registry,
        )
        self.reassigned = Counter(
            "pumpflow_model_tokens_reassigned",
            "Tokens scored by another live arm once the arm that scored them left the "
            "table (removed, or made a shadow by a promotion), by the arm they left; a "
            "token stays with its arm through any change of the shares",
            ["arm"],
            registry=registry,
        )
        self.refits = Counter(
            "pumpflow_model_refits",
            "Automatic refits tried, by model id, outcome (swapped, kept, refused, failed) "
            "and reason (pumpflow.model.outcomes); a swap counts once marked in the refits "
            "stored, by the replica marking it (after a failed mark, the next check's)",
            ["model_id", "outcome", "reason"],
            registry=registry,
        )
        self.pruned = Counter(
            "pumpflow_model_refits_pruned",
            "Stored refits pruned by the replica that refitted (refit), and their model "
            "files it removed from its registry (file), by model id",
            ["model_id", "what"],
            registry=registry,
        )
        self.stored_labels = Counter(
            "pumpflow_model_labels_stored",
            "Live labels stored (new ones; a label stored already is not counted)",
            registry=registry,
        )
        self.refused_labels = Counter(
            "pumpflow_model_labels_refused",
            "Released labels the label store refused alone (for what they hold, not an "
            "outage), dropped unstored",
            registry=registry,
        )
        self.serving_unavailable = Counter(
            "pumpflow_model_serving_unavailable",
            "Stored servings this replica could not serve, by when: start (the settings' "
            "models served instead) or follow (the one serving kept), and reason: missing "
            "(a model file missing here and not in the database) or refused (a model or "
            "arm table refused: another feature set, expired, a broken file)",
            ["when", "reason"],
            registry=registry,
        )
        self.serving = Gauge(
            "pumpflow_model_serving",
            "The model version served under each model id (1)",
            ["model_id", "version"],
            registry=registry,
        )
        self.psi = Gauge(
            "pumpflow_model_feature_psi",
            "Population stability index of a feature over this replica's drift window "
            "(the vectors of its partitions), against the model card's reference.",
            ["model_id", "feature"],
            registry=registry,
        )
        self.drifting = Gauge(
            "pumpflow_model_feature_drifting",
            "1 while a feature of a model is drifting (PSI crossed the alert threshold and "
            "has not come back under the recovery one) in this replica's window (the "
            "vectors of its partitions; a feature the deployment announced drifting "
            "counts as drifting until this window shows its recovery).",
            ["model_id", "feature"],
            registry=registry,
        )
        self.drift_window = Gauge(
            "pumpflow_model_drift_window_vectors",
            "Feature vectors in a model's drift window.",
            ["model_id"],
            registry=registry,
        )
        self.drift_warming_up = Gauge(
            "pumpflow_model_drift_warming_up",
            "1 while a model's drift monitor waits for the market it watches to have been "
            "observed long enough to hold tokens of every age its reference holds: no "
            "feature is judged meanwhile (a fresh feed's first 20 market minutes; a replica "
            "joining a running feed sees old tokens at once and judges at its first check).",
            ["model_id"],
            registry=registry,
        )
        self.drift_transitions = Counter(
            "pumpflow_model_drift_transitions",
            "Drift transitions of a model's features announced (model.drift) by this "
            "replica, by state (drifting, recovered): each crossing is announced once in "
            "the deployment, by one replica, so sum over the replicas. Without a database "
            "the announced drift is kept in the state store only: after it lost its "
            "contents a recovery of a drift announced before is not announced (nor counted), "
            "and a drift still there is announced again by a monitor made after.",
            ["model_id", "state"],
            registry=registry,
        )
        self.live = Gauge(
            "pumpflow_model_live_metric",
            "A model's performance on an arm over the deployment's last resolved labels "
            "(every replica's, shared through the state store: each replica exports the "
            "same figures, so aggregate with max, not sum), by metric (auc, brier, "
            "precision, positive_rate, selected_rate, threshold; rmse, mae).",
            ["model_id", "arm", "metric"],
            registry=registry,
        )
        self.live_labels = Gauge(
            "pumpflow_model_live_labels",
            "Resolved labels in a model's rolling performance window on an arm, the "
            "deployment's (every replica exports the same window: max, not sum).",
            ["model_id", "arm"],
            registry=registry,
        )
        self.live_version = Gauge(
            "pumpflow_model_live_version",
            "1 for each model version whose predictions are among the labels of a model's "
            "live figures on an arm (pumpflow_model_live_metric): more than one after a "
            "refit or a reload swapped a version in within the window.",
            ["model_id", "arm", "version"],
            registry=registry,
        )
        self.pending_labels = Gauge(
            "pumpflow_model_pending_labels",
            "Predictions of this replica's tokens whose label waits for its horizon.",
            registry=registry,
        )
        self.dropped_labels = Gauge(
            "pumpflow_model_dropped_labels",
            "Predictions whose label was dropped unresolved (too many pending).",
            registry=registry,
        )


class ModelServiceMetrics:
    """Per-arm predictions and scores, skipped vectors, arm shares, versions served,
    refits, stored labels, drift and live performance."""

    def __init__(self, *, registry: CollectorRegistry | None = None):
        self._f = families("model", _Families, registry)
        # at 0 from the start: the first one counted is an increase to the dashboard
        for when in UNAVAILABLE_WHEN:
            for reason in UNAVAILABLE_REASONS:
                self._f.serving_unavailable.labels(when, reason)
        for change in SERVING_CHANGES:
            self._f.serving_changes.labels(change)
        for reason in SKIP_REASONS:
            self._f.skipped.labels(reason)
        self._skipped: dict[str, int] = {}
        self._reassigned: dict[str, int] = {}
        self._failed: dict[tuple[str, str], int] = {}
        self._batched = 0
        #: (arm, model id, version, shadow) -> its prediction counter and score histogram
        self._predicted: dict[tuple[str, str, str, bool], tuple[Any, Any]] = {}
        self._published = 0
        #: this service's own: the families are shared by the services of a process
        self._published_by: dict[tuple[str, str, str, bool], int] = {}

    def predicted(self, arm: str, model_id: str, version: str, shadow: bool, score: float) -> None:
        key = (arm, model_id, version, shadow)
        found = self._predicted.get(key)
        if found is None:
            found = self._predicted[key] = (
                self._f.predictions.labels(arm, model_id, version, "true" if shadow else "false"),
                self._f.scores.labels(arm, model_id, version),
            )
        found[0].inc()
        found[1].observe(score)
        self._published += 1
        self._published_by[key] = self._published_by.get(key, 0) + 1

    def predictions(self, arm: str, model_id: str, version: str, shadow: bool = False) -> float:
        labels = (arm, model_id, version, "true" if shadow else "false")
        return self._f.predictions.labels(*labels)._value.get()

    def published(self) -> int:
        """The predictions this service published, every arm and model."""
        return self._published

    def published_by_arm(self) -> dict[tuple[str, str], dict[str, int]]:
        """The predictions this service published by (model id, arm), by the version of
        the model that made them."""
        found: dict[tuple[str, str], dict[str, int]] = {}
        for (arm, model_id, version, _), count in self._published_by.items():
            versions = found.setdefault((model_id, arm), {})
            versions[version] = versions.get(version, 0) + count
        return found

    def sync(
        self,
        skipped: Mapping[str, int],
        failed: Mapping[tuple[str, str], int],
        batched: int,
        reassigned: Mapping[str, int] | None = None,
    ) -> None:
        """Advance the counters to the processor's running totals."""
        for reason, total in skipped.items():
            if total > self._skipped.get(reason, 0):
                self._f.skipped.labels(reason).inc(total - self._skipped.get(reason, 0))
                self._skipped[reason] = total
        for arm, total in (reassigned or {}).items():
            if total > self._reassigned.get(arm, 0):
                self._f.reassigned.labels(arm).inc(total - self._reassigned.get(arm, 0))
                self._reassigned[arm] = total
        for key, total in failed.items():
            if total > self._failed.get(key, 0):
                self._f.failed.labels(*key).inc(total - self._failed.get(key, 0))
                self._failed[key] = total
        if batched > self._batched:
            self._f.batch_rows.inc(batched - self._batched)
            self._batched = batched

    def arms(self, shares: list[tuple[str, str, bool, float]]) -> None:
        self._f.arm_share.clear()
        for arm, model_id, shadow, share in shares:
            self._f.arm_share.labels(arm, model_id, "true" if shadow else "false").set(share)
            # from 0 while it serves: its tokens moved once it leaves are an increase
            self._f.reassigned.labels(arm)

    def serving_changed(self, change: str) -> None:
        self._f.serving_changes.labels(change).inc()

    def serving_changes(self, change: str) -> float:
        return self._f.serving_changes.labels(change)._value.get()

    def refitted(self, model_id: str, outcome: str, reason: str) -> None:
        self._f.refits.labels(model_id, outcome, reason).inc()

    def refits_of(self, model_ids: Iterable[str]) -> None:
        """Export every outcome and reason of these models' refits, and their drift
        transitions, from 0: the first of each is an increase to the dashboard and the
        alert."""
        for model_id in model_ids:
            for outcome, reasons in REFIT_REASONS.items():
                for reason in reasons:
                    self._f.refits.labels(model_id, outcome, reason)
            for state in DRIFT_STATES:
                self._f.drift_transitions.labels(model_id, state)

    def refits(self, model_id: str, outcome: str, reason: str | None = None) -> float:
        """Refits of ``model_id`` of ``outcome`` counted here, for ``reason`` (None: any)."""
        reasons = REFIT_REASONS[outcome] if reason is None else (reason,)
        return sum(self._f.refits.labels(model_id, outcome, r)._value.get() for r in reasons)

    def pruned(self, model_id: str, *, refits: int, files: int) -> None:
        self._f.pruned.labels(model_id, "refit").inc(refits)
        self._f.pruned.labels(model_id, "file").inc(files)

    def pruned_count(self, model_id: str, what: str) -> float:
        return self._f.pruned.labels(model_id, what)._value.get()

    def unavailable(self, when: str, reason: str) -> None:
        self._f.serving_unavailable.labels(when, reason).inc()

    def unavailable_count(self, when: str, reason: str | None = None) -> float:
        """Servings this replica could not serve ``when``, for ``reason`` (None: any)."""
        reasons = UNAVAILABLE_REASONS if reason is None else (reason,)
        return sum(self._f.serving_unavailable.labels(when, r)._value.get() for r in reasons)

    def labels_stored(self, count: int) -> None:
        self._f.stored_labels.inc(count)

    def label_refused(self) -> None:
        self._f.refused_labels.inc()

    def refused_count(self) -> float:
        return self._f.refused_labels._value.get()

    def serving(self, versions: Mapping[str, str]) -> None:
        self._f.serving.clear()
        for model_id, version in versions.items():
            self._f.serving.labels(model_id, version).set(1)

    def drift(self, reports: Iterable[DriftReport], transitions: Sequence[ModelDrift] = ()) -> None:
        """Set the gauges to the drift reports of every model served and count the
        transitions announced. The series of a model not reported, of a feature its
        report lacks and of a PSI not computed (NaN: a fresh monitor's) are removed: a
        model unloaded or replaced would otherwise show its last drift for ever."""
        psi: dict[tuple[str, ...], float] = {}
        drifting: dict[tuple[str, ...], float] = {}
        window: dict[tuple[str, ...], float] = {}
        warming_up: dict[tuple[str, ...], float] = {}
        for report in reports:
            for feature in report.features:
                key = (report.model_id, feature.name)
                if not math.isnan(feature.psi):
                    psi[key] = feature.psi
                drifting[key] = int(feature.drifting)
            window[(report.model_id,)] = report.observations
            warming_up[(report.model_id,)] = int(report.warming_up)
        _set_only(self._f.psi, psi)
        _set_only(self._f.drifting, drifting)
        _set_only(self._f.drift_window, window)
        _set_only(self._f.drift_warming_up, warming_up)
        for transition in transitions:
            self._f.drift_transitions.labels(transition.model_id, transition.state).inc()

    def psi(self, model_id: str, feature: str) -> float:
        return self._f.psi.labels(model_id, feature)._value.get()

    def drift_transitions(self, model_id: str, state: str) -> float:
        return self._f.drift_transitions.labels(model_id, state)._value.get()

    def performance(self, figures: Iterable[LiveFigures]) -> None:
        """Set the live-performance gauges to ``figures`` with the versions they are of,
        those of any other model, arm and version gone (NaN figures, like AUC of one
        class, left out)."""
        self._f.live.clear()
        self._f.live_labels.clear()
        self._f.live_version.clear()
        for each in figures:
            for metric, value in each.metrics.items():
                if not math.isnan(value):
                    self._f.live.labels(each.model_id, each.arm, metric).set(value)
            self._f.live_labels.labels(each.model_id, each.arm).set(each.labels)
            for version in each.versions:
                self._f.live_version.labels(each.model_id, each.arm, version).set(1)

    def labels(self, tracker: LabelTracker) -> None:
        self._f.pending_labels.set(tracker.pending)
        self._f.dropped_labels.set(tracker.dropped)

    def live(self, model_id: str, arm: str, metric: str) -> float:
        return self._f.live.labels(model_id, arm, metric)._value.get()

    def pending_labels(self) -> float:
        return self._f.pending_labels._value.get()


def _set_only(gauge: Gauge, values: Mapping[tuple[str, ...], float]) -> None:
    """Set ``gauge``'s series to ``values`` (by label values), removing every other."""
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
    # the series set, read as a scrape reads them
    for labels in {tuple(s.labels.values()) for m in gauge.collect() for s in m.samples}:
        if labels not in values:
            gauge.remove(*labels)
