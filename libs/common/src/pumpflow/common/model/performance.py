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
delivery lag of a price at the horizon. Labels are released in steps of
``release_step_s`` (0.25 s: at most that late, well inside the service's one-second
release loop), each step's in the order registered.

A token that retires (``token.lifecycle`` inactive or graduated) will show no more
prices, so :meth:`LabelTracker.retire` decides its pending labels now from the prices
seen, which is what training does for a token whose trades stop: no barrier hit is a
0, the net return is at the last price seen; they are still released at their horizon.
Prices that come for it afterwards (a revived token) count only for new predictions.

Bounds and cost: at most ``max_pending`` labels wait (the first due is dropped and
counted beyond that: 200,000 covers 120 s at over 1,600 predictions a second). The
labels waiting are kept by release step (a dict of deques, the steps in a heap): O(1)
per prediction. Each mint keeps a list of its undecided labels and the bounds a price
must cross to decide one (the lowest take-profit price, the highest stop price, the
earliest horizon end of a regression label): a price that decides nothing costs O(1),
one that decides some scans the mint's list, O(k) for its k undecided labels. The
scoring policy follows a token at most once per ``label_interval_s`` (5 s), so k is at
most horizon / interval per arm (24 at 120 s); a scan decides at least one label, so
the cost is O(k) per prediction at worst, and a list append and two comparisons when
the prices decide labels in bulk. Heaps per mint (O(log k) each way) cost more at this
k: four heap pushes and their tuples per prediction were a quarter of the scoring
path (docs/benchmarks.md). A mint with nothing undecided is forgotten.

:class:`RollingPerformance` keeps the last ``window`` released labels of each model
and arm and computes, on demand, AUC, Brier score, positive rate and precision at the
trading threshold (classification) or RMSE and MAE (regression) with
:mod:`pumpflow.common.model.metrics`.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
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
#: labels due within this much of each other are released together, at the later time
DEFAULT_RELEASE_STEP_S = 0.25
_INF = math.inf


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
    #: the vector scored (its names and values, as the features.updated carried them)
    feature_names: tuple[str, ...] = ()
    features: tuple[float, ...] = ()


class _Pending(msgspec.Struct, gc=False):
    """A registered prediction; ``decided`` once its label is certain."""

    mint: str
    time: float
    entry: float
    model_id: str
    version: str
    arm: str
    score: float
    definition: LabelDefinition
    #: prices of the mint observed before this prediction (they do not count)
    observed_before: int
    horizon_end: float
    #: classification: the take-profit and stop prices; regression: +inf and -inf
    up: float
    down: float
    #: regression: decided by the last price at or before the horizon end
    closes: bool
    names: tuple[str, ...]
    values: tuple[float, ...]
    decided: bool = False
    label: float = math.nan


class _Mint(msgspec.Struct, gc=False):
    """A mint's undecided labels, the bounds a price must cross to decide one of them,
    and the last price seen of it."""

    observed: int = 0
    last_price: float = math.nan
    undecided: int = 0
    #: the labels registered (decided ones linger until the next scan)
    items: list[_Pending] = msgspec.field(default_factory=list)
    #: the lowest take-profit and highest stop price, the earliest horizon end of a
    #: regression label, over the undecided labels (or lingering ones: a scan then
    #: decides nothing and tightens them)
    lowest_up: float = math.inf
    highest_down: float = -math.inf
    first_close: float = math.inf


class LabelTracker:
    """Labels of registered predictions, resolved from later prices at their horizon."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        max_pending: int = DEFAULT_MAX_PENDING,
        release_step_s: float = DEFAULT_RELEASE_STEP_S,
    ):
        if grace_s < 0 or max_pending <= 0 or release_step_s <= 0:
            raise ValueError("need grace_s >= 0, max_pending > 0 and release_step_s > 0")
        self.clock = clock or WallClock()
        self.grace_s = grace_s
        self.max_pending = max_pending
        self.release_step_s = release_step_s
        self._mints: dict[str, _Mint] = {}
        #: the labels not yet released by release slot (release time in steps, rounded
        #: up), each slot's in the order registered; the slots in a heap
        self._slots: dict[float, deque[_Pending]] = {}
        self._slot_order: list[float] = []
        self._pending = 0
        # the barriers of the last definition registered, per unit of entry price
        self._definition: LabelDefinition | None = None
        self._barrier_factors = (_INF, -_INF, True)
        self._grace_s = float(grace_s)
        self._minus_step = -float(release_step_s)
        #: labels dropped unreleased because more than max_pending waited
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Labels registered and not yet released."""
        return self._pending

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
        names: tuple[str, ...] = (),
        values: tuple[float, ...] = (),
    ) -> None:
        """Follow a prediction of ``model_id`` on the trade of ``mint`` at ``time``/``price``.

        ``names``/``values``: the vector scored, handed back with the label.
        """
        self.follow(mint, time, price, model_id, version, arm, score, definition, names,
                    values)

    def follow(
        self, mint: str, time: float, price: float, model_id: str, version: str, arm: str,
        score: float, definition: LabelDefinition, names: tuple[str, ...],
        values: tuple[float, ...],
    ) -> None:
        """:meth:`register` with positional arguments (the scoring path's call)."""
        if not 0.0 < price < _INF:
            return  # no return is defined from a price that is not positive
        state = self._mints.get(mint)
        if state is None:
            state = self._mints[mint] = _Mint()
        if definition is not self._definition:
            self._set_definition(definition)
        horizon_end = time + definition.horizon_s
        up_factor, down_factor, closes = self._barrier_factors
        if closes:
            up, down = _INF, -_INF
            if horizon_end < state.first_close:
                state.first_close = horizon_end
        else:
            up = price * up_factor
            down = price * down_factor
            if up < state.lowest_up:
                state.lowest_up = up
            if down > state.highest_down:
                state.highest_down = down
        item = _Pending(mint, time, price, model_id, version, arm, score, definition,
                        state.observed, horizon_end, up, down, closes, names, values)
        items = state.items
        items.append(item)
        state.undecided += 1
        if len(items) > 2 * state.undecided + 32:
            self._scan(state, math.nan, -math.inf)  # drops what lingers, decides nothing
        slots = self._slots
        slot = -((horizon_end + self._grace_s) // self._minus_step)
        waiting = slots.get(slot)
        if waiting is None:
            waiting = slots[slot] = deque()
            heapq.heappush(self._slot_order, slot)
        waiting.append(item)
        if self._pending < self.max_pending:
            self._pending += 1
            return
        # the first due goes unreleased (inline: at full rate, every registration's cost)
        self.dropped += 1
        first = self._slot_order[0]
        waiting = slots[first]
        oldest = waiting.popleft()
        if not waiting:
            heapq.heappop(self._slot_order)
            del slots[first]
        if not oldest.decided:
            oldest.decided = True
            owner = self._mints[oldest.mint]
            owner.undecided -= 1
            if not owner.undecided:
                del self._mints[oldest.mint]

    def _set_definition(self, definition: LabelDefinition) -> None:
        self._definition = definition
        if definition.kind == "take_profit_first":
            up, down = barriers(1.0, definition)
            self._barrier_factors = (up, down, False)
        else:
            self._barrier_factors = (_INF, -_INF, True)

    def observe(self, mint: str, time: float, price: float) -> None:
        """The price a trade of ``mint`` left at event ``time``."""
        state = self._mints.get(mint)
        if state is None or not 0.0 < price < _INF:
            return
        if (
            price >= state.lowest_up
            or price <= state.highest_down
            or time > state.first_close
        ):
            self._scan(state, price, time)
        state.last_price = price
        state.observed += 1
        if not state.undecided:
            del self._mints[mint]

    def _scan(self, state: _Mint, price: float, time: float) -> None:
        """Decide the labels of ``state`` that the price at ``time`` decides; keep the
        others and tighten the bounds to them. NaN decides nothing."""
        kept = []
        lowest_up, highest_down, first_close = _INF, -_INF, _INF
        decided = 0
        for item in state.items:
            if item.decided:
                continue
            if item.closes:
                # regression: a horizon that ended before this price is decided by what
                # came before it
                if item.horizon_end < time:
                    item.label = self._outcome_so_far(item, state)
                    item.decided = True
                    decided += 1
                    continue
                if item.horizon_end < first_close:
                    first_close = item.horizon_end
            elif price <= item.down:
                # a stop hit is a 0 whether or not the horizon passed
                item.label = 0.0
                item.decided = True
                decided += 1
                continue
            elif price >= item.up:
                # a take profit is a 1 inside the horizon; after it, nothing was hit in time
                item.label = 1.0 if time <= item.horizon_end else 0.0
                item.decided = True
                decided += 1
                continue
            else:
                if item.up < lowest_up:
                    lowest_up = item.up
                if item.down > highest_down:
                    highest_down = item.down
            kept.append(item)
        state.items = kept
        state.undecided -= decided
        state.lowest_up, state.highest_down, state.first_close = (
            lowest_up, highest_down, first_close
        )

    def retire(self, mint: str) -> int:
        """No more prices will come for ``mint``: decide its labels now; how many."""
        state = self._mints.pop(mint, None)
        if state is None:
            return 0
        decided = 0
        for item in state.items:
            if not item.decided:
                self._decide(item, self._outcome_so_far(item, state), state=state)
                decided += 1
        return decided

    def resolve_due(self, now: float | None = None) -> list[ResolvedLabel]:
        """Release the labels whose horizon (and grace) has passed by ``now`` (the clock's)."""
        now = self.clock.now() if now is None else now
        out = []
        order = self._slot_order
        step = self.release_step_s
        released: list[_Pending] = []
        while order and order[0] * step <= now:
            released.extend(self._slots.pop(heapq.heappop(order)))
        self._pending -= len(released)
        for item in released:
            if not item.decided:
                self._decide(item, self._outcome_so_far(item, self._mints.get(item.mint)))
                self._forget_if_settled(item.mint)
            out.append(
                ResolvedLabel(
                    mint=item.mint, model_id=item.model_id, version=item.version,
                    arm=item.arm, task=task_of(item.definition), score=item.score,
                    time=item.time, entry_price=item.entry, label=item.label,
                    definition=item.definition, resolved_at=now,
                    feature_names=item.names, features=item.values,
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


def task_of(definition: LabelDefinition) -> Task:
    """The task of a model whose label is ``definition``."""
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
