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
a price after the horizon arrives) and released once the clock is ``grace_s`` past the
horizon, never before: every label is released at its horizon whatever its outcome, so
a window of released labels is a cohort of predictions by time, not skewed towards
quick hits. The grace (2 s) covers the bus's delivery lag of a price at the horizon; a
holder that knows its token's prices come later (a backlog) releases them that much later
(``release(..., lag=)``).
Release times are rounded up to steps of ``release_step_s`` (0.25 s), so a token's
labels of one step go out together, in the order registered.

Where labels wait: each token's in a :class:`TokenLabels` (its undecided and decided
labels, the bounds a price must cross to decide one, its last price), held with the
token's state by the model service (:class:`~pumpflow.common.model.processor.ModelProcessor`
keeps it in the keyed state, so waiting labels are stored with the token's effects and
move with its partition; :meth:`LabelTracker.release` on the token's next event or its
timer) or by mint in the tracker itself (:meth:`LabelTracker.register`,
:meth:`LabelTracker.resolve_due`). Either way what is released is handed out by
:meth:`LabelTracker.resolve_due`. A stored label is its numbers and its vector packed
(float64, the token's feature names and what scored it kept once per token).

A token that retires (``token.lifecycle`` inactive or graduated) will show no more
prices, so :meth:`TokenLabels.retire` decides its waiting labels now from the prices
seen, which is what training does for a token whose trades stop: no barrier hit is a
0, the net return is at the last price seen; they are still released at their horizon.
Prices that come for it afterwards (a revived token) count only for new predictions.

Bounds and cost: a token keeps at most ``max_open`` labels waiting (the first
registered is dropped and counted beyond that). A price that decides nothing costs two
comparisons against the token's bounds (the lowest take-profit price, the highest stop
price, the earliest horizon end of a regression label); one that decides some scans
the token's list, O(k) for its k waiting labels. The scoring policy follows a token
at most once per ``label_interval_s`` (10 s), so k is at most (horizon + grace) /
interval per arm (13 at 120 s); a release is one pass over the token's list too, once
per release step that has labels of the token.

:class:`RollingPerformance` keeps the last ``window`` released labels of each model
and arm and computes, on demand, AUC, Brier score, positive rate and precision at the
trading threshold (classification) or RMSE and MAE (regression) with
:mod:`pumpflow.common.model.metrics`. Given :class:`SharedOutcomes` (the replicas of a
service that split the tokens between them), its windows are the deployment's: each
replica adds the labels it counted there (:meth:`RollingPerformance.share`, a batch a
call) and takes every replica's back, so the figures do not depend on which replica
answers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec
import numpy as np

from pumpflow.common.clock import Clock, WallClock
from pumpflow.common.model.card import LabelDefinition, Task, packer, vector_row
from pumpflow.common.model.labels import barriers, net_return
from pumpflow.common.model.metrics import (
    classification_metrics,
    precision_at,
    regression_metrics,
)

#: a bus delivers a price within this long of its event time
DEFAULT_GRACE_S = 2.0
#: labels a token keeps waiting at most: about 40 arms' worth at the scoring policy's one
#: label every 10 s over a 120 s horizon (and its grace)
DEFAULT_MAX_OPEN = 512
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
    #: or its values packed (little-endian float64), as a token's state keeps them
    packed: bytes = b""

    def vector(self) -> np.ndarray:
        """The values of the vector scored, in ``feature_names`` order (empty: none)."""
        if self.packed:
            return np.frombuffer(self.packed, dtype="<f8")
        return np.asarray(self.features, dtype=np.float64)


class LabelSource(msgspec.Struct, frozen=True, array_like=True):
    """What made some of a token's waiting predictions: kept once per token."""

    model_id: str
    version: str
    arm: str
    definition: LabelDefinition


class OpenLabel(msgspec.Struct, array_like=True, gc=False):
    """A prediction waiting for its release; ``label`` is NaN until decided."""

    time: float
    entry: float
    score: float
    #: its :class:`LabelSource` in the token's ``sources``
    source: int
    #: prices of the token observed before it (they do not count)
    observed_before: int
    horizon_end: float
    #: classification: the take-profit and stop prices; regression: +inf and -inf
    up: float
    down: float
    #: clock time it is released at (its horizon and the grace, up to a release step)
    release: float
    #: the vector scored: little-endian float64 in the token's ``names`` order
    values: bytes
    label: float = math.nan


class TokenLabels(msgspec.Struct, array_like=True, gc=False):
    """One token's predictions waiting for their labels, the bounds a price must cross
    to decide one of them, and the last price seen.

    Small enough to be stored with the token's state: the feature names and what made
    the predictions once per token, each label as its numbers and its packed vector."""

    names: tuple[str, ...] = ()
    sources: list[LabelSource] = []
    #: in the order registered; decided ones wait here for their release too
    items: list[OpenLabel] = []
    observed: int = 0
    last_price: float = math.nan
    undecided: int = 0
    #: the lowest take-profit and highest stop price, the earliest horizon end of a
    #: regression label, over the undecided labels (a scan that decides nothing
    #: tightens them)
    lowest_up: float = _INF
    highest_down: float = -_INF
    first_close: float = _INF
    #: the earliest release time of the labels waiting
    next_release: float = _INF

    def observe(self, time: float, price: float) -> None:
        """The price a trade of the token left at event ``time``: decide the labels it
        decides, tighten the bounds to the others."""
        if not 0.0 < price < _INF:
            return
        if price >= self.lowest_up or price <= self.highest_down or time > self.first_close:
            # scanned in place: a method call would cost about as much as the usual scan
            lowest_up, highest_down, first_close = _INF, -_INF, _INF
            decided = 0
            left = self.undecided
            # newest first: the undecided ones are mostly the newest, the oldest mostly
            # decided and waiting for their release
            for item in reversed(self.items):
                if not left:
                    break
                if item.label == item.label:
                    continue  # decided already
                left -= 1
                if item.up == _INF:
                    # regression: a horizon that ended before this price is decided by
                    # what came before it
                    if item.horizon_end < time:
                        item.label = self._outcome_so_far(item)
                        decided += 1
                        continue
                    if item.horizon_end < first_close:
                        first_close = item.horizon_end
                elif price <= item.down:
                    # a stop hit is a 0 whether or not the horizon passed
                    item.label = 0.0
                    decided += 1
                elif price >= item.up:
                    # a take profit is a 1 inside the horizon; after it, nothing was hit
                    # in time
                    item.label = 1.0 if time <= item.horizon_end else 0.0
                    decided += 1
                else:
                    if item.up < lowest_up:
                        lowest_up = item.up
                    if item.down > highest_down:
                        highest_down = item.down
            if decided:
                self.undecided -= decided
            # a bound stored only when it moves: a store into the struct costs several
            # times a read
            if lowest_up != self.lowest_up:
                self.lowest_up = lowest_up
            if highest_down != self.highest_down:
                self.highest_down = highest_down
            if first_close != self.first_close:
                self.first_close = first_close
        self.last_price = price
        self.observed += 1

    def retire(self) -> int:
        """No more prices will come: decide the undecided labels now; how many."""
        decided = 0
        for item in self.items:
            if item.label != item.label:
                item.label = self._outcome_so_far(item)
                decided += 1
        self.undecided = 0
        self.lowest_up, self.highest_down, self.first_close = _INF, -_INF, _INF
        return decided

    def _outcome_so_far(self, item: OpenLabel) -> float:
        """The label once no further price can count: no barrier hit, or the last price."""
        definition = self.sources[item.source].definition
        if definition.kind == "take_profit_first":
            return 0.0
        exit_price = self.last_price if self.observed > item.observed_before else item.entry
        return float(net_return(item.entry, exit_price, definition.fee_rate))


#: one token's labels released together: its mint, the clock time they were released
#: at, the token's sources and feature names, and the labels as the token kept them
Release = tuple[str, float, list[LabelSource], tuple[str, ...], list[OpenLabel]]


class ReleasedLabels(Sequence[ResolvedLabel]):
    """Labels released together, as their tokens kept them (:data:`Release` each).

    A sequence of :class:`ResolvedLabel`, made once when first read one by one;
    :meth:`RollingPerformance.extend` reads the numbers without them."""

    __slots__ = ("_count", "_labels", "releases")

    def __init__(self, releases: list[Release] | None = None, count: int | None = None):
        self.releases = releases or []
        self._count = sum(len(items) for *_, items in self.releases) if count is None else count
        self._labels: list[ResolvedLabel] | None = None

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        return self.labels()[index]

    def __iter__(self):
        return iter(self.labels())

    def __eq__(self, other) -> bool:
        if isinstance(other, ReleasedLabels):
            other = other.labels()
        return self.labels() == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ReleasedLabels({self.labels()!r})"

    def labels(self) -> list[ResolvedLabel]:
        """One :class:`ResolvedLabel` a label, in the order released."""
        if self._labels is None:
            tasks: dict[int, Task] = {}
            out = []
            append = out.append
            for mint, at, sources, names, items in self.releases:
                for item in items:
                    source = sources[item.source]
                    task = tasks.get(id(source))
                    if task is None:
                        task = tasks[id(source)] = task_of(source.definition)
                    append(
                        ResolvedLabel(
                            mint=mint,
                            model_id=source.model_id,
                            version=source.version,
                            arm=source.arm,
                            task=task,
                            score=item.score,
                            time=item.time,
                            entry_price=item.entry,
                            label=item.label,
                            definition=source.definition,
                            resolved_at=at,
                            feature_names=names,
                            packed=item.values,
                        )
                    )
            self._labels = out
        return self._labels


class LabelTracker:
    """Follows predictions to their labels and releases them at their horizon.

    A token's waiting labels are a :class:`TokenLabels`, held by whoever holds the
    token: the model service's keyed state (:meth:`follow`, :meth:`release`, with what
    is released collected for :meth:`resolve_due`), or this tracker by mint
    (:meth:`register`, :meth:`observe`, :meth:`retire`)."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        max_open: int = DEFAULT_MAX_OPEN,
        release_step_s: float = DEFAULT_RELEASE_STEP_S,
    ):
        if grace_s < 0 or max_open <= 0 or release_step_s <= 0:
            raise ValueError("need grace_s >= 0, max_open > 0 and release_step_s > 0")
        self.clock = clock or WallClock()
        self.grace_s = grace_s
        self.max_open = max_open
        self.release_step_s = release_step_s
        self._mints: dict[str, TokenLabels] = {}
        #: released by :meth:`release`, not yet handed out by :meth:`resolve_due`: per
        #: release, (mint, time released, the token's sources and names, its labels)
        self._released: list[Release] = []
        self._released_count = 0
        self._waiting = 0
        # the barriers of the last definition followed, per unit of entry price
        self._definition: LabelDefinition | None = None
        self._barrier_factors = (_INF, -_INF, True)
        self._grace_s = float(grace_s)
        self._step = float(release_step_s)
        self._minus_step = -float(release_step_s)
        #: labels dropped unreleased because a token had more than max_open waiting
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Labels waiting in the tokens held here and released ones not yet handed out by
        :meth:`resolve_due`. Tokens held in a keyed state come and go with their
        partition (restored, handed over) without a follow or a release: their holder
        :meth:`recount` s them then."""
        return max(self._waiting, 0) + self._released_count

    def recount(self, held: Iterable[TokenLabels]) -> None:
        """Count the labels waiting afresh: those of ``held``, the tokens held in keyed
        states here, and those of the tokens this tracker holds by mint."""
        self._waiting = sum(len(tokens.items) for tokens in held) + sum(
            len(tokens.items) for tokens in self._mints.values()
        )

    @property
    def mints(self) -> int:
        """Mints held here with undecided labels (the ones whose prices count)."""
        return sum(1 for tokens in self._mints.values() if tokens.undecided)

    # ---------------------------------------------------------------- tokens held here

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
        tokens = self._mints.get(mint)
        if tokens is None:
            tokens = self._mints[mint] = TokenLabels()
        self.follow(
            tokens,
            time,
            price,
            LabelSource(model_id, version, arm, definition),
            score,
            names,
            values,
        )
        if not tokens.items:
            del self._mints[mint]

    def observe(self, mint: str, time: float, price: float) -> None:
        """The price a trade of ``mint`` left at event ``time``."""
        tokens = self._mints.get(mint)
        if tokens is not None:
            tokens.observe(time, price)

    def retire(self, mint: str) -> int:
        """No more prices will come for ``mint``: decide its labels now; how many."""
        tokens = self._mints.get(mint)
        return 0 if tokens is None else tokens.retire()

    def resolve_due(self, now: float | None = None) -> ReleasedLabels:
        """The labels released since the last call, with those of the tokens held here
        whose horizon (and grace) has passed by ``now`` (the clock's)."""
        now = self.clock.now() if now is None else now
        for mint, tokens in list(self._mints.items()):
            if tokens.next_release <= now:
                self.release(tokens, mint, now)
                if not tokens.items:
                    del self._mints[mint]
        released = ReleasedLabels(self._released, self._released_count)
        self._released, self._released_count = [], 0
        return released

    # ---------------------------------------------------------------- any token

    def follow(
        self,
        tokens: TokenLabels,
        time: float,
        price: float,
        source: LabelSource,
        score: float,
        names: tuple[str, ...],
        values: tuple[float, ...],
        packed: bytes | None = None,
    ) -> None:
        """Follow a prediction made by ``source`` on the token's trade at
        ``time``/``price``: only prices observed afterwards count for it. ``packed``:
        ``values`` packed already (little-endian float64)."""
        if not 0.0 < price < _INF:
            return  # no return is defined from a price that is not positive
        sources = tokens.sources
        try:
            # identity first, then equal fields (a token's sources decoded from its state)
            index = sources.index(source)
        except ValueError:
            index = len(sources)
            sources.append(source)
        items = tokens.items
        if not items:
            tokens.names = names
        elif names is not tokens.names:
            if names == tokens.names:
                tokens.names = names  # the vectors' own tuple: the next ones match by identity
            else:
                packed = vector_row(names, values, tokens.names).astype("<f8").tobytes()
        definition = source.definition
        if definition is not self._definition:
            self._set_definition(definition)
        horizon_end = time + definition.horizon_s
        up_factor, down_factor, closes = self._barrier_factors
        if closes:
            up, down = _INF, -_INF
            if horizon_end < tokens.first_close:
                tokens.first_close = horizon_end
        else:
            up = price * up_factor
            down = price * down_factor
            if up < tokens.lowest_up:
                tokens.lowest_up = up
            if down > tokens.highest_down:
                tokens.highest_down = down
        release = -((horizon_end + self._grace_s) // self._minus_step) * self._step
        item = OpenLabel(
            time,
            price,
            score,
            index,
            tokens.observed,
            horizon_end,
            up,
            down,
            release,
            packed or packer(len(values)).pack(*values),
        )
        # by release time, then as registered: a release takes the head of the list
        if not items:
            items.append(item)
            tokens.next_release = release
        elif items[-1].release <= release:
            items.append(item)  # the usual case: the head stays
        else:
            at = len(items) - 1
            while at and items[at - 1].release > release:
                at -= 1
            items.insert(at, item)
            if not at:
                tokens.next_release = release
        tokens.undecided += 1
        self._waiting += 1
        if len(items) > self.max_open:
            # the first due goes unreleased
            oldest = items.pop(0)
            self.dropped += 1
            self._waiting -= 1
            if oldest.label != oldest.label:
                tokens.undecided -= 1
            tokens.next_release = items[0].release

    def _set_definition(self, definition: LabelDefinition) -> None:
        self._definition = definition
        if definition.kind == "take_profit_first":
            up, down = barriers(1.0, definition)
            self._barrier_factors = (up, down, False)
        else:
            self._barrier_factors = (_INF, -_INF, True)

    def release(self, tokens: TokenLabels, mint: str, now: float, *, lag: float = 0.0) -> int:
        """Release the token's labels due by ``now`` (the undecided ones decided from the
        prices seen), for :meth:`resolve_due`; how many. ``lag``: how far behind the
        clock the token's prices come (each label is due that much later)."""
        due = now - lag
        if due < tokens.next_release:
            return 0
        items = tokens.items
        released = 0
        for item in items:
            if item.release > due:
                break
            released += 1
            if item.label != item.label:
                item.label = tokens._outcome_so_far(item)
                tokens.undecided -= 1
        # the token's released labels go out as they are kept, with what they share: a
        # ResolvedLabel each is made once per hand-out (resolve_due), off the token's step
        self._released.append((mint, now, tokens.sources, tokens.names, items[:released]))
        self._released_count += released
        del items[:released]
        if items:
            tokens.next_release = items[0].release
        else:
            tokens.next_release = _INF
            tokens.sources = []
        self._waiting -= released
        return released


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


class Outcome(msgspec.Struct, frozen=True, array_like=True):
    """A released label as the rolling figures count it: what replicas share."""

    score: float
    label: float
    version: str
    resolved_at: float
    #: a classification label's break-even threshold (None: a regression's)
    breakeven: float | None = None


class SharedOutcomes(Protocol):
    """The outcomes of every replica, the newest of each model and arm."""

    async def append(
        self, outcomes: Mapping[tuple[str, str], Sequence[Outcome]], keep: int
    ) -> None:
        """Add outcomes by (model id, arm), oldest first, in one round trip; each model
        and arm then keeps its newest ``keep``."""

    async def read(self) -> dict[tuple[str, str], list[Outcome]]:
        """The outcomes of each model and arm, oldest first."""


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
        self._resolved(label.resolved_at)
        self.cached = None

    def add_many(
        self, labels: list[float], scores: list[float], versions: list[str], resolved_at: float
    ) -> None:
        """Add labels in order, as :meth:`add` of each would (the oldest go if more than
        the window come); ``resolved_at``: the newest one's."""
        size = len(self.labels)
        count = len(labels)
        if count > size:
            labels, scores, versions = labels[-size:], scores[-size:], versions[-size:]
            count = size
        at = (self.next + np.arange(count)) % size
        self.labels[at] = labels
        self.scores[at] = scores
        window_versions = self.versions
        for i, version in zip(at.tolist(), versions, strict=True):
            window_versions[i] = version
        self.next = (self.next + count) % size
        self.filled = min(self.filled + count, size)
        self._resolved(resolved_at)
        self.cached = None

    def _resolved(self, at: float) -> None:
        # the newest, not the last added: tokens of different partitions resolve each in
        # its partition's time, so a label added later may have resolved earlier
        if not at <= self.last_resolved_at:
            self.last_resolved_at = at

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
    predictions a second the window turns over in minutes. Precision is measured at the
    trading threshold: ``thresholds`` per model id, else ``threshold`` (the score trading
    enters at), else the model's label's break-even probability
    (:func:`breakeven_threshold`).
    Adding is O(1); figures cost O(window log window) and are cached until the next add.

    ``shared``: the windows are the deployment's (see :meth:`share`); the labels added
    here count at once, and the figures are every replica's from the next share on.
    """

    def __init__(
        self,
        *,
        window: int = 2000,
        thresholds: Mapping[str, float] | None = None,
        threshold: float | None = None,
        shared: SharedOutcomes | None = None,
    ):
        if window <= 0:
            raise ValueError("window must be positive")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError("threshold must be within [0, 1]")
        self.window = window
        self.thresholds = dict(thresholds or {})
        self.default_threshold = threshold
        self._windows: dict[tuple[str, str], _Window] = {}
        self._default_thresholds: dict[str, float] = {}
        self.shared = shared
        #: outcomes added here and not shared yet, the newest ``window`` of each
        self._unshared: dict[tuple[str, str], deque[Outcome]] = {}

    def _window(self, key: tuple[str, str], task: Task) -> _Window:
        """The window of ``key``, new (empty) if it has none or one of another task."""
        window = self._windows.get(key)
        if window is None or window.task != task:
            window = self._windows[key] = _Window(
                task=task,
                labels=np.zeros(self.window),
                scores=np.zeros(self.window),
                versions=[""] * self.window,
            )
        return window

    def _queue(self, key: tuple[str, str], outcomes: Iterable[Outcome]) -> None:
        queue = self._unshared.get(key)
        if queue is None:
            queue = self._unshared[key] = deque(maxlen=self.window)
        queue.extend(outcomes)

    def add(self, label: ResolvedLabel) -> None:
        """Count one released label (a dropped one, NaN, is not a label)."""
        if math.isnan(label.label):
            return
        key = (label.model_id, label.arm)
        window = self._window(key, label.task)
        breakeven = None
        if label.task == "classification":
            breakeven = self._default_thresholds[label.model_id] = breakeven_threshold(
                label.definition
            )
        window.add(label)
        if self.shared is not None:
            self._queue(
                key,
                (Outcome(label.score, label.label, label.version, label.resolved_at, breakeven),),
            )

    def extend(self, labels: Iterable[ResolvedLabel]) -> None:
        """Count released labels, in order; labels released together
        (:class:`ReleasedLabels`) go into each window at once, from their numbers."""
        if not isinstance(labels, ReleasedLabels):
            for label in labels:
                self.add(label)
            return
        # by model and arm, in the order released: (task, labels, scores, versions,
        # release times); each source's group and task found once
        grouped: dict[tuple[str, str], tuple[Task, list, list, list, list]] = {}
        of_source: dict[int, tuple[tuple[Task, list, list, list, list], str, bool]] = {}
        definitions: dict[str, LabelDefinition] = {}
        for _, at, sources, _, items in labels.releases:
            for item in items:
                label = item.label
                if label != label:
                    continue
                source = sources[item.source]
                found = of_source.get(id(source))
                if found is None:
                    task = task_of(source.definition)
                    group = grouped.get((source.model_id, source.arm))
                    if group is None:
                        group = grouped[(source.model_id, source.arm)] = (task, [], [], [], [])
                    elif group[0] != task:
                        # a model id that changed task among them: one by one, as added
                        for each in labels:
                            self.add(each)
                        return
                    found = of_source[id(source)] = (
                        group,
                        source.version,
                        task == "classification",
                    )
                group, version, classification = found
                if classification:
                    # the model's default threshold is its last label's, as added
                    definitions[source.model_id] = source.definition
                group[1].append(label)
                group[2].append(item.score)
                group[3].append(version)
                group[4].append(at)
        for model_id, definition in definitions.items():
            self._default_thresholds[model_id] = breakeven_threshold(definition)
        for (model_id, arm), (task, values, scores, versions, ats) in grouped.items():
            self._window((model_id, arm), task).add_many(values, scores, versions, max(ats))
            if self.shared is not None:
                breakeven = self._default_thresholds[model_id] if task == "classification" else None
                self._queue(
                    (model_id, arm),
                    map(Outcome, scores, values, versions, ats, [breakeven] * len(ats)),
                )

    async def share(self, *, read: bool = True) -> None:
        """Add the labels counted here since the last call to the shared outcomes, then
        (``read``) take every window from there (every replica's labels, the newest
        ``window`` of each model and arm); those counted here meanwhile stay on top
        until the next call. What could not be added is tried again first by the next
        call. Until the next read, the windows are the last read's and the labels
        counted here since."""
        shared = self.shared
        if shared is None:
            return
        pending, self._unshared = self._unshared, {}
        if pending:
            try:
                await shared.append(
                    {key: list(queue) for key, queue in pending.items()}, self.window
                )
            except BaseException:
                for key, queue in self._unshared.items():
                    pending.setdefault(key, deque(maxlen=self.window)).extend(queue)
                self._unshared = pending
                raise
        if not read:
            return
        found = await shared.read()
        self._windows = {}
        for key, outcomes in found.items():
            self._add_outcomes(key, outcomes[-self.window :])
        for key, queue in self._unshared.items():
            self._add_outcomes(key, queue)

    def clear(self) -> None:
        """Forget every window and the labels counted here not shared yet."""
        self._windows = {}
        self._unshared = {}

    def _add_outcomes(self, key: tuple[str, str], outcomes: Sequence[Outcome]) -> None:
        """Count outcomes of ``key`` in order (those of its newest task)."""
        if not outcomes:
            return
        breakeven = outcomes[-1].breakeven
        task: Task = "regression" if breakeven is None else "classification"
        mine = [o for o in outcomes if (o.breakeven is None) == (breakeven is None)]
        self._window(key, task).add_many(
            [o.label for o in mine],
            [o.score for o in mine],
            [o.version for o in mine],
            max(o.resolved_at for o in mine),
        )
        if breakeven is not None:
            self._default_thresholds[key[0]] = breakeven

    def threshold(self, model_id: str) -> float:
        found = self.thresholds.get(model_id, self.default_threshold)
        if found is None:
            return self._default_thresholds.get(model_id, 0.5)
        return found

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
                model_id=model_id,
                arm=arm,
                task=window.task,
                labels=window.filled,
                versions=tuple(sorted({v for v in window.versions if v})),
                metrics=metrics,
                last_resolved_at=window.last_resolved_at,
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
