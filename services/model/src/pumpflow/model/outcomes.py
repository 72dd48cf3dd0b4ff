"""What came of an automatic refit: an outcome and its reason, words of a short fixed list.

Every refit tried is counted under them (``pumpflow_model_refits_total{model_id,outcome,
reason}``, every pair exported from 0 for each model served) and listed with them by
``GET /refits``:

- ``swapped``, ``better``: the candidate beat the serving model on the held-out slice by
  more than the margin, and serves everywhere.
- ``kept``, ``not_better``: it did not. ``kept``, ``not_served``: it did, but its serving
  could not be stored (the state store away, the model loaded anew meanwhile), so the
  serving model goes on everywhere.
- ``refused``: the refit decided nothing for what its rows or models are, and is tried
  again after the policy's interval: ``too_few_rows``, ``one_class`` (the rows fitted on),
  ``held_out_one_class`` (no AUC to compare), ``non_finite_score`` (a held-out row scored
  NaN or infinite by either model), ``model_expired`` (the serving model's card expired),
  ``training_refused`` (the refitter's own refusal).
- ``failed``: an error, not a refusal: ``dependency_unavailable`` (Postgres or the state
  store away) or ``error`` (anything else: the log holds its traceback).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from pumpflow.common.dependencies import transient_dependency
from pumpflow.common.model import ModelExpired, NonFiniteScore, RefitRefused
from pumpflow.model.labels import StoredRefit, UndecidedRefit

#: every outcome of a refit and the reasons it comes with
REFIT_REASONS: dict[str, tuple[str, ...]] = {
    "swapped": ("better",),
    "kept": ("not_better", "not_served"),
    "refused": (
        "too_few_rows",
        "one_class",
        "held_out_one_class",
        "non_finite_score",
        "model_expired",
        "training_refused",
    ),
    "failed": ("dependency_unavailable", "error"),
}
#: the longest message kept with a refit that decided nothing
DETAIL_MAX_CHARS = 1_000


def decided(refit: StoredRefit) -> tuple[str, str]:
    """The outcome and reason of a refit decided, as stored."""
    if refit.swapped:
        return "swapped", "better"
    # chosen (its model stored with it) and still kept: its serving was not stored
    return "kept", "not_better" if refit.sha256 is None else "not_served"


def undecided(error: BaseException) -> tuple[str, str]:
    """The outcome and reason of a refit that ended in ``error``."""
    if isinstance(error, RefitRefused):
        # a refitter's own word is its refusal, counted under the word for it
        known = error.reason in REFIT_REASONS["refused"]
        return "refused", error.reason if known else "training_refused"
    if isinstance(error, NonFiniteScore):
        return "refused", "non_finite_score"
    if isinstance(error, ModelExpired):
        return "refused", "model_expired"
    if transient_dependency(error) is not None:
        return "failed", "dependency_unavailable"
    return "failed", "error"


def detail_of(error: BaseException) -> str:
    """What a refit that decided nothing is stored with: the error's class and message."""
    text = str(error) if isinstance(error, RefitRefused | NonFiniteScore | ModelExpired) else ""
    return (text or f"{type(error).__name__}: {error}")[:DETAIL_MAX_CHARS]


class RefitAttempt(msgspec.Struct, frozen=True, kw_only=True):
    """A refit tried, as ``GET /refits`` lists it (null: not known for its outcome)."""

    model_id: str
    at: float
    outcome: str
    reason: str
    detail: str
    serving_version: str
    #: the labels it was given
    rows: int | None = None
    candidate_version: str | None = None
    swapped: bool = False
    metric: str | None = None
    serving_score: float | None = None
    candidate_score: float | None = None
    held_out_rows: int | None = None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def attempt_of(refit: StoredRefit | UndecidedRefit) -> RefitAttempt:
    if isinstance(refit, UndecidedRefit):
        return RefitAttempt(
            model_id=refit.model_id,
            at=refit.at,
            outcome=refit.outcome,
            reason=refit.reason,
            detail=refit.detail,
            serving_version=refit.serving_version,
            rows=refit.rows,
        )
    outcome, reason = decided(refit)
    return RefitAttempt(
        model_id=refit.model_id,
        at=refit.at,
        outcome=outcome,
        reason=reason,
        detail=(
            f"{refit.metric} on {refit.held_out_rows} held-out rows: candidate "
            f"{refit.candidate_score:.4f}, serving {refit.serving_score:.4f}"
        ),
        serving_version=refit.serving_version,
        rows=refit.rows,
        candidate_version=refit.candidate_version,
        swapped=refit.swapped,
        metric=refit.metric,
        serving_score=_finite(refit.serving_score),
        candidate_score=_finite(refit.candidate_score),
        held_out_rows=refit.held_out_rows,
    )


def attempts(
    decided_refits: Sequence[StoredRefit], undecided_refits: Sequence[UndecidedRefit], limit: int
) -> list[RefitAttempt]:
    """The newest ``limit`` of both, newest first."""
    merged = sorted([*decided_refits, *undecided_refits], key=lambda refit: refit.at, reverse=True)
    return [attempt_of(refit) for refit in merged[:limit]]


__all__ = [
    "REFIT_REASONS",
    "RefitAttempt",
    "attempt_of",
    "attempts",
    "decided",
    "detail_of",
    "undecided",
]
