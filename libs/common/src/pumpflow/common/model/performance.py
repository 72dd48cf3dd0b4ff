"""Live performance: each prediction's label, resolved from the token's later prices, and
rolling metrics per model and arm.

:class:`LabelTracker` follows every registered prediction. The label is the training
one, by the same code: the card's :class:`~pumpflow.common.model.card.LabelDefinition`,
its barriers (:func:`~pumpflow.common.model.labels.barriers`) and net return
(:func:`~pumpflow.common.model.labels.net_return`) with the curve fee both ways, the
first barrier a later price reaches deciding, prices up to and including
``time + horizon_s`` counting, as :func:`~pumpflow.common.model.labels.label_history`
does over a history.

Prices: ``observe(mint, time, price)`` with the price a trade left, ``vSolInBondingCurve /
vTokensInBondingCurve`` of ``token.trade``, which is the ``price`` feature of the
``features.updated`` that trade produced (and the price training labels with). Observe
a trade's price *before* registering the predictions made on it: only prices observed
after a registration count for it, as only trades after the scored one do in training.
A mint's prices come in time order (one partition, in seq order).

Resolution: a label is decided as soon as its outcome is certain (a barrier is hit, or
a price after the horizon arrives) and released by :meth:`LabelTracker.resolve_due`
once the clock is ``grace_s`` past the horizon, never before: every label is released
at its horizon whatever its outcome, so a window of released labels is a cohort of
predictions by time, not skewed towards quick hits. The grace (2 s) covers the bus's
delivery lag of a price at the horizon.

A token that retires (``token.lifecycle`` inactive or graduated) will show no more
prices, so :meth:`LabelTracker.retire` decides its pending labels now from the prices
seen, which is what training does for a token whose trades stop: no barrier hit is a
0, the net return is at the last price seen; they are still released at their horizon.
Prices that come for it afterwards (a revived token) count only for new predictions.

Bounds and cost: at most ``max_pending`` labels wait (the oldest is dropped and counted
beyond that: 200,000 covers 120 s at over 1,600 predictions a second). Each mint keeps
three heaps of its undecided labels (by take-profit price, stop price and horizon end):
a price costs O(1) when it decides nothing, and each label is pushed and popped a
constant number of times, O(log n) each, so the cost is O(log n) per prediction and
O(1) per price, amortised. A mint with nothing undecided is forgotten.

:class:`RollingPerformance` keeps the last ``window`` released labels of each model
and arm and computes, on demand, AUC, Brier score, positive rate and precision at the
trading threshold (classification) or RMSE and MAE (regression) with
:mod:`pumpflow.common.model.metrics`.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgspec
import numpy as np

from pumpflow.common.clock import Clock, WallClock
from pumpflow.common.model.card import LabelDefinition, Task
from pumpflow.common.model.labels import barriers, net_return
from pumpflow.common.model.metrics import (
    classification_metrics,
    precision_at,
    regression_metrics,
)

#: a bus delivers a price within this long of its event time
DEFAULT_GRACE_S = 2.0
DEFAULT_MAX_PENDING = 200_000


class ResolvedLabel(msgspec.Struct, frozen=True, kw_only=True):
    """A prediction and what then happened to its token's price."""

    mint: str
    model_id: str
    version: str
    arm: str
    task: Task
    score: float
    #: event time of the scored trade and the price it left
    time: float
    entry_price: float
    #: 1.0 or 0.0 (classification), the net return (regression)
    label: float
    definition: LabelDefinition
    #: clock time it was released
    resolved_at: float


class _Pending:
    __slots__ = ("arm", "decided", "definition", "down", "entry", "horizon_end", "label",
                 "mint", "model_id", "observed_before", "score", "time", "up", "version")

    def __init__(self, mint: str, time: float, entry: float, model_id: str, version: str,
                 arm: str, score: float, definition: LabelDefinition, observed_before: int):
        self.mint = mint
        self.time = time
        self.entry = entry
        self.model_id = model_id
        self.version = version
        self.arm = arm
        self.score = score
        self.definition = definition
        self.horizon_end = time + definition.horizon_s
        self.up, self.down = barriers(entry, definition)
        #: prices of the mint observed before this prediction (they do not count)
        self.observed_before = observed_before
        self.decided = False
        self.label = math.nan


class _Mint:
    """A mint's undecided labels and the last price seen of it."""

    __slots__ = ("closing", "downs", "last_price", "observed", "undecided", "ups")

    def __init__(self) -> None:
        self.observed = 0
        self.last_price = math.nan
        self.undecided = 0
        #: (take-profit price, seq, label), (-stop price, seq, label), (horizon end, ...)
        self.ups: list[tuple[float, int, _Pending]] = []
        self.downs: list[tuple[float, int, _Pending]] = []
        self.closing: list[tuple[float, int, _Pending]] = []


class LabelTracker:
    """Labels of registered predictions, resolved from later prices at their horizon."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        max_pending: int = DEFAULT_MAX_PENDING,
    ):
        if grace_s < 0 or max_pending <= 0:
            raise ValueError("need grace_s >= 0 and max_pending > 0")
        self.clock = clock or WallClock()
        self.grace_s = grace_s
        self.max_pending = max_pending
        self._mints: dict[str, _Mint] = {}
        #: (release time, seq, label) of every label not yet released
        self._due: list[tuple[float, int, _Pending]] = []
        self._seq = itertools.count()
        #: labels dropped unreleased because more than max_pending waited
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Labels registered and not yet released."""
        return len(self._due)

    @property
    def mints(self) -> int:
        """Mints with undecided labels (the ones whose prices are followed)."""
        return len(self._mints)

    def register(
        self,
        *,
        mint: str,
        time: float,
        price: float,
        model_id: str,
        version: str,
        arm: str,
        score: float,
        definition: LabelDefinition,
    ) -> None:
        """Follow a prediction of ``model_id`` on the trade of ``mint`` at ``time``/``price``."""
        if not (price > 0 and math.isfinite(price)):
            return  # no return is defined from a price that is not positive
        state = self._mints.get(mint)
        if state is None:
            state = self._mints[mint] = _Mint()
        item = _Pending(mint, time, price, model_id, version, arm, score, definition,
                        state.observed)
        seq = next(self._seq)
        state.undecided += 1
        heapq.heappush(state.closing, (item.horizon_end, seq, item))
        if definition.kind == "take_profit_first":
            heapq.heappush(state.ups, (item.up, seq, item))
            heapq.heappush(state.downs, (-item.down, seq, item))
        heapq.heappush(self._due, (item.horizon_end + self.grace_s, seq, item))
        if len(self._due) > self.max_pending:
            _, _, oldest = heapq.heappop(self._due)
            self.dropped += 1
            if not oldest.decided:
                self._decide(oldest, math.nan)
                self._forget_if_settled(oldest.mint)

    def observe(self, mint: str, time: float, price: float) -> None:
        """The price a trade of ``mint`` left at event ``time``."""
        state = self._mints.get(mint)
        if state is None or not (price > 0 and math.isfinite(price)):
            return
        # labels whose horizon ended before this price: decided by what came before it
        closing = state.closing
        while closing and closing[0][0] < time:
            item = heapq.heappop(closing)[2]
            if not item.decided:
                self._decide(item, self._outcome_so_far(item, state))
        downs = state.downs
        while downs and -downs[0][0] >= price:
            item = heapq.heappop(downs)[2]
            if not item.decided:
                self._decide(item, 0.0)
        ups = state.ups
        while ups and ups[0][0] <= price:
            item = heapq.heappop(ups)[2]
            if not item.decided:
                self._decide(item, 1.0)
        state.last_price = price
        state.observed += 1
        if state.undecided == 0:
            del self._mints[mint]
        elif max(len(closing), len(ups), len(downs)) > 2 * state.undecided + 32:
            self._compact(state)

    def retire(self, mint: str) -> int:
        """No more prices will come for ``mint``: decide its labels now; how many."""
        state = self._mints.pop(mint, None)
        if state is None:
            return 0
        decided = 0
        for _, _, item in state.closing:
            if not item.decided:
                self._decide(item, self._outcome_so_far(item, state), state=state)
                decided += 1
        return decided

    def resolve_due(self, now: float | None = None) -> list[ResolvedLabel]:
        """Release the labels whose horizon (and grace) has passed by ``now`` (the clock's)."""
        now = self.clock.now() if now is None else now
        out = []
        due = self._due
        while due and due[0][0] <= now:
            item = heapq.heappop(due)[2]
            if not item.decided:
                self._decide(item, self._outcome_so_far(item, self._mints.get(item.mint)))
                self._forget_if_settled(item.mint)
            out.append(
                ResolvedLabel(
                    mint=item.mint, model_id=item.model_id, version=item.version,
                    arm=item.arm, task=_task_of(item.definition), score=item.score,
                    time=item.time, entry_price=item.entry, label=item.label,
                    definition=item.definition, resolved_at=now,
                )
            )
        return out

    # ----------------------------------------------------------------------------------

    def _outcome_so_far(self, item: _Pending, state: _Mint | None) -> float:
        """The label once no further price can count: no barrier hit, or the last price."""
        if item.definition.kind == "take_profit_first":
            return 0.0
        seen = state is not None and state.observed > item.observed_before
        exit_price = state.last_price if seen else item.entry
        return float(net_return(item.entry, exit_price, item.definition.fee_rate))

    def _decide(self, item: _Pending, label: float, *, state: _Mint | None = None) -> None:
        item.decided = True
        item.label = label
        state = state or self._mints.get(item.mint)
        if state is not None:
            state.undecided -= 1

    def _forget_if_settled(self, mint: str) -> None:
        state = self._mints.get(mint)
        if state is not None and state.undecided == 0:
            del self._mints[mint]

    @staticmethod
    def _compact(state: _Mint) -> None:
        # decided labels linger in the heaps they were not popped from
        for name in ("ups", "downs", "closing"):
            live = [entry for entry in getattr(state, name) if not entry[2].decided]
            heapq.heapify(live)
            setattr(state, name, live)


def _task_of(definition: LabelDefinition) -> Task:
    return "classification" if definition.kind == "take_profit_first" else "regression"


def breakeven_threshold(definition: LabelDefinition) -> float:
    """The probability of taking profit first at which a trade breaks even.

    Winning ``take_profit`` with probability p and losing ``stop_loss`` otherwise is
    even at ``p = stop_loss / (take_profit + stop_loss)``: 1/3 for +20%/-10%. Entering
    above it is what a trader acting on the score does, so it is the default threshold
    precision is measured at.
    """
    total = definition.take_profit + definition.stop_loss
    return definition.stop_loss / total if total > 0 else 0.5


# --------------------------------------------------------------------------------------
# Rolling performance.


class LiveFigures(msgspec.Struct, frozen=True, kw_only=True):
    """A model's performance on one arm over its last resolved labels."""

    model_id: str
    arm: str
    task: Task
    #: labels in the window, and the versions that made their predictions
    labels: int
    versions: tuple[str, ...]
    #: classification: auc, brier, positive_rate, precision, threshold, selected_rate;
    #: regression: rmse, mae
    metrics: dict[str, float]
    #: clock time of the newest label in the window
    last_resolved_at: float


@dataclass(slots=True)
class _Window:
    task: Task
    labels: np.ndarray
    scores: np.ndarray
    versions: list[str]
    filled: int = 0
    next: int = 0
    last_resolved_at: float = math.nan
    cached: LiveFigures | None = None

    def add(self, label: ResolvedLabel) -> None:
        self.labels[self.next] = label.label
        self.scores[self.next] = label.score
        self.versions[self.next] = label.version
        self.next = (self.next + 1) % len(self.labels)
        self.filled = min(self.filled + 1, len(self.labels))
        self.last_resolved_at = label.resolved_at
        self.cached = None

    def ordered(self) -> tuple[np.ndarray, np.ndarray]:
        """Labels and scores of the window, oldest first."""
        if self.filled < len(self.labels):
            return self.labels[: self.filled].copy(), self.scores[: self.filled].copy()
        order = np.r_[self.next : len(self.labels), 0 : self.next]
        return self.labels[order], self.scores[order]


class RollingPerformance:
    """The last ``window`` resolved labels per model and arm, and their metrics.

    Window: 2,000 labels. The standard error of an AUC over ``n`` labels with positive
    share ``r`` is about ``0.5 / sqrt(n r (1 - r))`` at worst: 0.025 for 2,000 labels at a
    10% positive rate, fine enough to see a model lose 0.05 of AUC, and at tens of
    predictions a second the window turns over in minutes. ``thresholds``: the trading
    threshold per model id; a model without one is measured at its label's break-even
    probability (:func:`breakeven_threshold`).
    Adding is O(1); figures cost O(window log window) and are cached until the next add.
    """

    def __init__(self, *, window: int = 2000, thresholds: Mapping[str, float] | None = None):
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self.thresholds = dict(thresholds or {})
        self._windows: dict[tuple[str, str], _Window] = {}
        self._default_thresholds: dict[str, float] = {}

    def add(self, label: ResolvedLabel) -> None:
        """Count one released label (a dropped one, NaN, is not a label)."""
        if math.isnan(label.label):
            return
        key = (label.model_id, label.arm)
        window = self._windows.get(key)
        if window is None or window.task != label.task:
            window = self._windows[key] = _Window(
                task=label.task, labels=np.zeros(self.window), scores=np.zeros(self.window),
                versions=[""] * self.window,
            )
        if label.task == "classification":
            self._default_thresholds[label.model_id] = breakeven_threshold(label.definition)
        window.add(label)

    def extend(self, labels: Iterable[ResolvedLabel]) -> None:
        for label in labels:
            self.add(label)

    def threshold(self, model_id: str) -> float:
        return self.thresholds.get(model_id, self._default_thresholds.get(model_id, 0.5))

    def set_threshold(self, model_id: str, threshold: float) -> None:
        self.thresholds[model_id] = threshold
        for (model, _), window in self._windows.items():
            if model == model_id:
                window.cached = None

    def window_of(self, model_id: str, arm: str) -> tuple[np.ndarray, np.ndarray]:
        """The labels and scores in the window of ``model_id`` on ``arm``, oldest first."""
        window = self._windows.get((model_id, arm))
        if window is None:
            return np.empty(0), np.empty(0)
        return window.ordered()

    def arms(self, model_id: str) -> tuple[str, ...]:
        return tuple(sorted(arm for model, arm in self._windows if model == model_id))

    def keys(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self._windows))

    def figures(self, model_id: str, arm: str) -> LiveFigures | None:
        window = self._windows.get((model_id, arm))
        if window is None:
            return None
        if window.cached is None:
            labels, scores = window.ordered()
            if window.task == "classification":
                threshold = self.threshold(model_id)
                metrics = classification_metrics(labels, scores)
                metrics["precision"] = precision_at(labels, scores, threshold)
                metrics["threshold"] = threshold
                metrics["selected_rate"] = float(np.mean(scores >= threshold))
            else:
                metrics = regression_metrics(labels, scores)
            window.cached = LiveFigures(
                model_id=model_id, arm=arm, task=window.task, labels=window.filled,
                versions=tuple(sorted({v for v in window.versions if v})),
                metrics=metrics, last_resolved_at=window.last_resolved_at,
            )
        return window.cached

    def by_arm(self, model_id: str) -> dict[str, LiveFigures]:
        """The figures of ``model_id`` on each arm it has labels on."""
        out = {}
        for arm in self.arms(model_id):
            figures = self.figures(model_id, arm)
            if figures is not None:
                out[arm] = figures
        return out
