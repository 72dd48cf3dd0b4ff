"""ModelManager: loads models with their cards, refuses what does not fit, scores features.

Usage::

    manager = ModelManager(event_bus, feature_manager, clock=clock)
    card = manager.load_model("entry", "models/entry.onnx", "classification")
    prediction = manager.get_prediction("entry", feature_vector)   # Prediction
    scores = manager.predict_batch("entry", rows)                  # rows in card order

A model is loaded only if its card's feature-set version is the live feature manager's
(:class:`FeatureSetMismatch` names both), it is the type asked for, and it has not
expired; an expired model is not served (:class:`ModelExpired`). Every row goes
through the card's preprocessing (:func:`~pumpflow.common.model.card.prepare_inputs`),
the one training used. One prediction is a batch of one: :meth:`predict_batch` is the
only scoring path. :meth:`update_model` refits in the background (an injected
:class:`Refitter`) and swaps the refit in only if it is better on held-out rows.

The manager is transport-free: the event bus is kept for the service that hosts it.
"""

from __future__ import annotations

import math
import threading
import time as _time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec
import numpy as np

from pumpflow.common.clock import Clock, WallClock
from pumpflow.common.model.card import (
    HeldOut,
    ModelCard,
    Task,
    prepare_inputs,
    vector_row,
)
from pumpflow.common.model.metrics import auc, rmse
from pumpflow.common.model.performance import LiveFigures
from pumpflow.common.model.registry import ModelRegistry, read_model
from pumpflow.common.model.runtime import ModelRuntime, ScoringSession, default_runtime

TASKS: tuple[Task, ...] = ("classification", "regression")


class ModelError(Exception):
    """A model that cannot be loaded or served."""


class UnknownModel(ModelError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class FeatureSetMismatch(ModelError):
    """A model, or features, of another feature-set version than the live one."""

    def __init__(
        self,
        model_id: str,
        model_version: str,
        live_version: str,
        *,
        what: str,
        lacking: tuple[str, ...] = (),
    ):
        self.model_id = model_id
        self.model_version = model_version
        self.live_version = live_version
        if lacking:
            message = (
                f"model {model_id!r} takes features that feature-set version {live_version} "
                f"does not compute: {', '.join(lacking)} (its card names them)"
            )
        else:
            message = (
                f"model {model_id!r} was trained on feature-set version {model_version}, "
                f"but {what} feature-set version {live_version}"
            )
        super().__init__(message)


class NonFiniteScore(ModelError):
    """A model that scored NaN or infinity (a non-tree model given a missing feature):
    not a score trading or the live figures can read."""


class RefitRefused(ModelError):
    """A refit that cannot make a candidate worth comparing, or whose comparison would mean
    nothing: ``reason`` says which, in a word of a short fixed list (it labels a metric):
    ``too_few_rows`` (no row to fit on, or none to hold out), ``one_class`` (the rows
    fitted on hold one class), ``held_out_one_class`` (no AUC on the held-out slice),
    ``training_refused`` (the refitter's own refusal). Nothing is swapped."""

    def __init__(self, message: str, *, reason: str):
        self.reason = reason
        super().__init__(message)


class ModelExpired(ModelError):
    def __init__(self, model_id: str, version: str, expires_at: float, now: float):
        self.model_id = model_id
        self.expires_at = expires_at
        super().__init__(
            f"model {model_id!r} version {version} expired at {expires_at:.0f} "
            f"(now {now:.0f}): it is not served"
        )


class Prediction(msgspec.Struct, frozen=True, kw_only=True):
    model_id: str
    version: str
    task: Task
    score: float
    feature_set_version: str
    #: seconds spent scoring (this prediction's share of its batch)
    latency_s: float


class LiveCounts(msgspec.Struct, frozen=True, kw_only=True):
    batches: int
    rows: int
    scoring_s: float


class ModelPerformance(msgspec.Struct, frozen=True, kw_only=True):
    model_id: str
    version: str
    task: Task
    #: held-out metrics from the card, beside the rule-based baseline's
    held_out: HeldOut
    served: LiveCounts
    #: live figures per arm over the last resolved labels (empty without a live source)
    live: dict[str, LiveFigures] = {}


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelledRows:
    """Rows of feature values in a model's input order with their labels and event times."""

    rows: np.ndarray
    labels: np.ndarray
    time: np.ndarray
    #: token index per row (None: unknown)
    token: np.ndarray | None = None
    source: str = "recent labelled data"

    def __post_init__(self) -> None:
        if not len(self.rows) == len(self.labels) == len(self.time):
            raise ValueError("rows, labels and time differ in length")

    def take(self, selected: np.ndarray) -> LabelledRows:
        return LabelledRows(
            rows=self.rows[selected],
            labels=self.labels[selected],
            time=self.time[selected],
            token=None if self.token is None else self.token[selected],
            source=self.source,
        )


class LivePerformance(Protocol):
    def by_arm(self, model_id: str) -> Mapping[str, LiveFigures]:
        """A model's live figures on each arm (a RollingPerformance)."""


class Refitter(Protocol):
    def refit(
        self, card: ModelCard, fit_on: LabelledRows, held_out: LabelledRows, *, now: float
    ) -> tuple[bytes, ModelCard]:
        """A new model like ``card``'s (task, features, label), fitted on ``fit_on``;
        RefitRefused (``training_refused``) when the rows cannot make one."""


class UpdateResult(msgspec.Struct, frozen=True, kw_only=True):
    model_id: str
    swapped: bool
    #: the version serving before, and the candidate's
    serving_version: str
    candidate_version: str
    #: the metric both were compared on over the held-out slice (auc: higher is better,
    #: rmse: lower is better)
    metric: str
    serving_score: float
    candidate_score: float
    held_out_rows: int
    at: float
    #: where the candidate chosen was written (the registry; None: not chosen, or kept
    #: in memory alone)
    path: str | None = None


class ScoredBatch(msgspec.Struct, frozen=True, kw_only=True):
    """Scores of a batch of rows and the model version that made them (a struct: made
    in a tenth of a frozen dataclass's time, once a model call)."""

    card: ModelCard
    scores: np.ndarray
    #: seconds of preprocessing and scoring, the whole batch
    seconds: float


@dataclass(frozen=True, slots=True)
class ServedModel:
    card: ModelCard
    session: ScoringSession
    path: Path
    loaded_at: float


class BackgroundExecutor(Executor):
    """Runs the calls given one at a time, each on a daemon thread of its own.

    A refit is abandoned with its process: the workers of a ThreadPoolExecutor are
    joined when the interpreter exits, so a process stopped (drained and stored) during
    a refit would wait the refit out (tens of seconds to minutes) past its stop grace
    and be killed. A refit abandoned has recorded nothing (at most its model file is in
    the registry, unnamed by any serving): it is decided again later.
    """

    def __init__(self) -> None:
        self._one_at_a_time = threading.Lock()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()

        def run() -> None:
            with self._one_at_a_time:
                if not future.set_running_or_notify_cancel():
                    return
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)

        threading.Thread(target=run, name="refit", daemon=True).start()
        return future


class _Counts:
    __slots__ = ("batches", "rows", "seconds")

    def __init__(self) -> None:
        self.batches = 0
        self.rows = 0
        self.seconds = 0.0


class ModelManager:
    """Models by id, each with its card and a scoring session."""

    def __init__(
        self,
        event_bus: Any,
        feature_manager: Any,
        *,
        clock: Clock | None = None,
        runtime: ModelRuntime | None = None,
        refitter: Refitter | None = None,
        executor: Executor | None = None,
        update_held_out_share: float = 0.3,
        registry: ModelRegistry | None = None,
        timer: Callable[[], float] = _time.perf_counter,
        live_performance: LivePerformance | None = None,
    ):
        self.event_bus = event_bus
        #: anything with ``version`` (the live feature-set version), a FeatureManager
        self.feature_manager = feature_manager
        self.clock = clock or WallClock()
        self._runtime = runtime
        self._timer = timer
        self._refitter = refitter
        self._executor = executor
        self.update_held_out_share = update_held_out_share
        #: where a refitted model that was swapped in is stored (None: kept in memory)
        self.registry = registry
        #: where get_model_performance reads live figures from (None: card figures only)
        self.live_performance = live_performance
        self._models: dict[str, ServedModel] = {}
        self._counts: dict[str, _Counts] = {}
        #: every update decided, swapped or not, per model id (oldest first)
        self.updates: dict[str, list[UpdateResult]] = {}

    @property
    def runtime(self) -> ModelRuntime:
        if self._runtime is None:
            self._runtime = default_runtime()
        return self._runtime

    # ----------------------------------------------------------------------------------
    # Loading.

    def load_model(self, model_id: str, model_path: str | Path, model_type: str) -> ModelCard:
        """Load the model at ``model_path`` (its card beside it) as ``model_id``.

        Replaces a model already loaded under the id in one step: a prediction is made
        by the old or the new one, never by neither.
        """
        served = self.open_model(model_id, model_path, model_type)
        self.serve(model_id, served)
        return served.card

    def open_model(self, model_id: str, model_path: str | Path, model_type: str) -> ServedModel:
        """The model at ``model_path`` checked and ready to serve as ``model_id``, not
        served yet (:meth:`serve`): several are opened before any is served."""
        if model_type not in TASKS:
            raise ValueError(f"model_type must be one of {TASKS}, not {model_type!r}")
        model, card = read_model(model_path)
        if card.task != model_type:
            raise ModelError(
                f"model {model_id!r} at {model_path} is a {card.task} model, not {model_type}"
            )
        live = self.feature_manager.version
        if card.feature_set_version != live:
            raise FeatureSetMismatch(
                model_id, card.feature_set_version, live, what="the live features are"
            )
        # a card of the live version naming inputs it lacks would be scored with them
        # missing on every token
        computed = set(self.feature_manager.names)
        lacking = tuple(n for n in card.feature_names if n not in computed)
        if lacking:
            raise FeatureSetMismatch(
                model_id, card.feature_set_version, live, what="the live features are",
                lacking=lacking,
            )  # fmt: skip
        now = self.clock.now()
        if card.expired(now):
            raise ModelExpired(model_id, card.version, card.expires_at, now)
        session = self.runtime.open(model, card)
        return ServedModel(card=card, session=session, path=Path(model_path), loaded_at=now)

    def serve(self, model_id: str, served: ServedModel) -> None:
        """Serve ``served`` (from :meth:`open_model`) as ``model_id``, in one step."""
        self._models[model_id] = served
        self._counts.setdefault(model_id, _Counts())

    def unload_model(self, model_id: str) -> None:
        self._models.pop(model_id, None)

    def card(self, model_id: str) -> ModelCard:
        return self._served(model_id).card

    def models(self) -> dict[str, ModelCard]:
        """The loaded models' cards by id."""
        return {model_id: served.card for model_id, served in self._models.items()}

    def path(self, model_id: str) -> Path:
        """Where the model serving as ``model_id`` was read from (a refit: written to)."""
        return self._served(model_id).path

    def _served(self, model_id: str) -> ServedModel:
        try:
            return self._models[model_id]
        except KeyError:
            raise UnknownModel(f"no model {model_id!r} is loaded") from None

    def serving(self, model_id: str) -> ServedModel:
        """The model as it may be served now: ModelExpired once its card's expiry passed."""
        served = self._served(model_id)
        card = served.card
        now = self.clock.now()
        if card.expired(now):
            raise ModelExpired(model_id, card.version, card.expires_at, now)
        return served

    # ----------------------------------------------------------------------------------
    # Scoring.

    def predict_batch(self, model_id: str, rows: np.ndarray) -> np.ndarray:
        """Scores of rows of feature values in the card's order (n x features)."""
        return self._score(self.serving(model_id), model_id, rows)

    def score_batch(self, model_id: str, rows: np.ndarray) -> ScoredBatch:
        """Like :meth:`predict_batch`, with the card of the version that scored and the
        seconds it took: a swap meanwhile (:meth:`update_model`, a load) cannot mislabel."""
        served = self.serving(model_id)
        started = self._timer()
        scores = self._score(served, model_id, rows)
        return ScoredBatch(card=served.card, scores=scores, seconds=self._timer() - started)

    def _score(self, served: ServedModel, model_id: str, rows: np.ndarray) -> np.ndarray:
        inputs = prepare_inputs(rows)
        width = len(served.card.feature_names)
        if inputs.shape[1] != width:
            raise ValueError(
                f"model {model_id!r} takes {width} features per row, got {inputs.shape[1]}"
            )
        started = self._timer()
        try:
            scores = served.session.predict(inputs)
        except Exception as exc:
            # onnxruntime's own errors derive from Exception alone: as a ModelError the
            # callers skip this model, its failure counted, and score the others
            raise ModelError(f"model {model_id!r} failed to score: {exc!r}") from exc
        # a batch refused whole: the processor scores its vectors alone then, so only
        # those the model cannot score go unscored
        _check_finite(scores, f"model {model_id!r}")
        counts = self._counts[model_id]
        counts.seconds += self._timer() - started
        counts.batches += 1
        counts.rows += len(inputs)
        return scores

    def get_prediction(self, model_id: str, features: Any) -> Prediction:
        """Score one feature vector.

        ``features``: a FeatureVector or a features.updated payload (names, values and
        their feature-set version, which must be the model's), or a mapping of feature
        name to value. A feature the vector lacks, and any NaN or infinite value, is
        missing, as in training.
        """
        served = self.serving(model_id)
        card = served.card
        names, values, version = _vector_of(features)
        if version is not None and version != card.feature_set_version:
            raise FeatureSetMismatch(
                model_id, card.feature_set_version, version, what="the features scored are"
            )
        row = vector_row(names, values, card.feature_names)
        started = self._timer()
        score = self._score(served, model_id, row[None, :])[0]
        return Prediction(
            model_id=model_id,
            version=card.version,
            task=card.task,
            score=float(score),
            feature_set_version=card.feature_set_version,
            latency_s=self._timer() - started,
        )

    # ----------------------------------------------------------------------------------
    # Updating and performance.

    def update_model(
        self, model_id: str, new_data: LabelledRows, *, min_gain: float = 0.0, swap: bool = True
    ) -> Future[UpdateResult]:
        """Refit on recent labelled data in the background; swap only if better.

        The newest ``update_held_out_share`` of ``new_data`` by time is held out; the
        candidate is fitted on the rows before it whose label horizon ended before it, of
        the tokens (when known) with no row held out.
        Both the serving model and the candidate score the held-out slice; the candidate
        replaces the serving model (in one step: each prediction names its version) only
        if it scores better by more than ``min_gain``: AUC points for a classifier, a
        share of the serving model's RMSE for a regressor (0: strictly better). Every
        decision is kept in :attr:`updates`. A held-out row either scores NaN or
        infinite refuses the refit (:class:`NonFiniteScore`, naming which): nothing is
        compared or swapped. So do rows that leave nothing to fit on or hold out, rows
        fitted on of one class, and a held-out slice of one class (no AUC to compare):
        :class:`RefitRefused`, its ``reason`` saying which.

        ``swap=False``: the candidate chosen is written to the registry (the result's
        ``path``) and not served here: the caller serves it once it has recorded it
        (a service whose replicas share what they serve), so a failure before then
        leaves the serving one in place.
        """
        if min_gain < 0:
            raise ValueError(f"min_gain must be >= 0, not {min_gain}")
        served = self.serving(model_id)
        if self._refitter is None:
            raise ModelError(f"model {model_id!r}: no refitter was given to this manager")
        if self._executor is None:
            self._executor = BackgroundExecutor()
        return self._executor.submit(self._update, model_id, served, new_data, min_gain, swap)

    def _update(
        self,
        model_id: str,
        served: ServedModel,
        data: LabelledRows,
        min_gain: float,
        swap: bool,
    ) -> UpdateResult:
        card = served.card
        order = np.argsort(data.time, kind="stable")
        data = data.take(order)
        first_held = int(len(data.time) * (1.0 - self.update_held_out_share))
        if first_held <= 0 or first_held >= len(data.time):
            raise RefitRefused(
                f"model {model_id!r}: {len(data.time)} rows are too few to refit and hold out",
                reason="too_few_rows",
            )
        cut = data.time[first_held]
        held = np.arange(len(data.time)) >= first_held
        held_out = data.take(held)
        before = ~held & (data.time + card.label.horizon_s <= cut)
        if data.token is not None:
            # as training splits: a token traded across the cut is held out alone, else the
            # candidate would be judged on the later rows of tokens it was fitted on
            before &= ~np.isin(data.token, held_out.token)
        fit_on = data.take(before)
        if not len(fit_on.labels):
            raise RefitRefused(
                f"model {model_id!r}: of {len(data.time)} rows, none to fit on (each of a "
                f"token held out, or labelled within {card.label.horizon_s:g} s of the "
                "held-out slice)",
                reason="too_few_rows",
            )
        if card.task == "classification":
            if len(np.unique(fit_on.labels)) < 2:
                raise RefitRefused(
                    f"model {model_id!r}: the {len(fit_on.labels)} rows to fit on hold one "
                    f"class only ({fit_on.labels[0]:g})",
                    reason="one_class",
                )
            if len(np.unique(held_out.labels)) < 2:
                # no AUC: every comparison with NaN is false, the candidate "kept" on
                # figures that mean nothing
                raise RefitRefused(
                    f"model {model_id!r}: the {len(held_out.labels)} held-out rows hold one "
                    f"class only ({held_out.labels[0]:g}): no AUC to compare",
                    reason="held_out_one_class",
                )
        model, candidate_card = self._refitter.refit(card, fit_on, held_out, now=self.clock.now())
        candidate = self.runtime.open(model, candidate_card)
        inputs = prepare_inputs(held_out.rows)
        # a NaN is ranked by the rows' order alone: its AUC could swap in a model that
        # cannot score what it serves
        serving_scores = served.session.predict(inputs)
        _check_finite(serving_scores, f"model {model_id!r} (serving, on held-out rows)")
        candidate_scores = candidate.predict(inputs)
        _check_finite(candidate_scores, f"refit candidate of model {model_id!r}")
        if card.task == "classification":
            metric = "auc"
            old, new = auc(held_out.labels, serving_scores), auc(held_out.labels, candidate_scores)
            better = new - old > min_gain
        else:
            metric = "rmse"
            old = rmse(held_out.labels, serving_scores)
            new = rmse(held_out.labels, candidate_scores)
            better = old - new > min_gain * old
        now = self.clock.now()
        # the one that serves now may have been replaced meanwhile (a load): keep it then
        swapped = bool(better) and self._models.get(model_id) is served
        written = None
        if swapped:
            path = served.path
            if self.registry is not None:
                path = written = self.registry.register(model, candidate_card)
            if swap:
                self._models[model_id] = ServedModel(
                    card=candidate_card, session=candidate, path=path, loaded_at=now
                )
        result = UpdateResult(
            model_id=model_id,
            swapped=swapped,
            serving_version=card.version,
            candidate_version=candidate_card.version,
            metric=metric,
            serving_score=float(old),
            candidate_score=float(new),
            held_out_rows=len(held_out.labels),
            at=now,
            path=None if written is None else str(written),
        )
        self.updates.setdefault(model_id, []).append(result)
        return result

    def get_model_performance(self, model_id: str) -> ModelPerformance:
        """The card's held-out metrics and baseline, what the model has scored, and its
        live figures per arm when a live source (a RollingPerformance) was given."""
        served = self._served(model_id)
        counts = self._counts[model_id]
        live = self.live_performance

        return ModelPerformance(
            model_id=model_id,
            version=served.card.version,
            task=served.card.task,
            held_out=served.card.held_out,
            served=LiveCounts(batches=counts.batches, rows=counts.rows, scoring_s=counts.seconds),
            live=dict(live.by_arm(model_id)) if live is not None else {},
        )


def _check_finite(scores: np.ndarray, scorer: str) -> None:
    """Raise NonFiniteScore naming ``scorer`` if any of ``scores`` is NaN or infinite."""
    finite = np.isfinite(scores)
    if np.count_nonzero(finite) != finite.size:
        raise NonFiniteScore(
            f"{scorer} scored {finite.size - np.count_nonzero(finite)} of "
            f"{finite.size} rows NaN or infinite (a missing feature it cannot route)"
        )


def _vector_of(features: Any) -> tuple[tuple[str, ...], tuple[float, ...], str | None]:
    if isinstance(features, Mapping):
        names = tuple(features)
        return names, tuple(float(features[n]) for n in names), None
    names = getattr(features, "names", None)
    values = getattr(features, "values", None)
    if names is None or values is None:
        raise TypeError(
            "features must be a mapping of name to value or carry names and values, "
            f"not {type(features).__name__}"
        )
    version = getattr(features, "feature_set_version", None)
    if version is None:
        version = getattr(features, "version", None)
    if len(names) != len(values):
        raise ValueError(f"{len(names)} feature names but {len(values)} values")
    return tuple(names), tuple(v if v is not None else math.nan for v in values), version
