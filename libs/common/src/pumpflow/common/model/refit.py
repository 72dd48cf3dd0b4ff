"""When a served model is refitted on its stored live labels, without anyone asking.

The model service stores every live label it resolves (the vector scored, the score,
the label; :class:`~pumpflow.common.model.performance.ResolvedLabel`) and checks, every
``check_s``, each served model against a :class:`RefitPolicy`. A refit that is due goes
to :meth:`~pumpflow.common.model.manager.ModelManager.update_model` on the newest
``window_rows`` stored rows of the model (its feature set and label definition): the
manager holds out the newest share of them by time (``update_held_out_share``, 30%),
fits a candidate on the rows whose horizon ended before that slice, of the tokens
with no row in it, and swaps it in only if it scores better on the slice than the
serving version by more than ``min_gain``. Rows that leave nothing to compare (none to
fit on, one class to fit on or held out) and scores that are not numbers refuse the
refit: the serving version goes on, and ``min_interval_s`` counts from that try too.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class RefitPolicy:
    """When a model is refitted on its stored live labels.

    A refit is due when all hold:

    - ``every_labels`` (20,000) labels of the model were stored since its last refit
      (by any replica: the count is the store's). The policy follows a token at most
      once per 10 s, so the live market's few dozen active tokens give some 3-10 labels
      a second: a refit every 35 minutes to two hours, each seeing a tenth of its
      window new.
    - ``min_interval_s`` (1,800 s) passed since the model's last refit, or last try
      that decided nothing (a refusal is not tried again at every check). A refit of the
      window takes tens of seconds of one core (LightGBM's 120 trees on up to 200,000
      rows, then the ONNX check), under 2% of a core at this pace, on a thread beside
      the scoring.
    - the store holds at least ``min_rows`` (20,000) rows of the model. The held-out
      slice is then 6,000 labels.

    ``min_gain`` (0.01): a candidate is swapped in only if its AUC on the held-out slice
    beats the serving version's by more than this (a regressor: its RMSE lower by more
    than this share of the serving one's). Without a margin a candidate no better wins
    the comparison about half the time by chance, and each swap restarts the model's
    live figures and drift window for nothing. On the smallest slice (6,000 labels,
    about 10% positive, AUC near 0.7) the standard error of one AUC is 0.012
    (Hanley-McNeil: 600 positives, 5,400 negatives); the two models score the same rows
    and their scores are strongly correlated (0.8-0.9 for refits of one feature set),
    so the difference of their AUCs has a standard error of 0.012 * sqrt(2 * (1 - r)),
    0.005-0.008. A margin of 0.01 is 1.3-1.8 of those: a candidate no better is swapped
    in 4-10% of the time instead of 50%, and one truly better by 0.02 still 90-96% of
    the time. Larger slices (the window holds up to 200,000 rows, 60,000 held out)
    shrink the error by up to sqrt(10), so the margin is conservative there; a gain
    under 0.01 AUC is worth little to an entry signal against a swap's cost.

    ``window_rows`` (200,000): the newest rows refitted on, about 5.5 to 18.5 hours of
    labels at the rates above: the same day's market, and 46 MB of features (29 doubles
    a row) in memory while refitting. ``check_s`` (30 s): how often the service asks the
    store for a model's counts; each count stops at :attr:`counted_rows` (the most
    :meth:`due` compares), a range of an index: some milliseconds however long the
    store has run, asked by every replica.

    :attr:`kept_rows` (twice ``window_rows``, 400,000): a model's stored labels (of its
    feature set and label definition) kept; older ones by event time are deleted before
    each refit (:meth:`~pumpflow.model.labels.LabelStore.prune`, under the refit lock),
    as no refit reads them. A refit reads the newest ``window_rows`` distinct vectors,
    and a model live on an arm and shadowing every token on another labels each vector
    of its live arm twice: twice the window holds the whole window of such a model. A
    label resolved late (stored after newer ones) counts by its event time like the
    others. The table then holds per model at most these plus the labels of one refit
    interval (``every_labels``, or ``min_interval_s`` of labels): under 500,000 rows, a
    few hundred MB with its indexes, however long it runs.

    ``keep_refits`` (10): a model's newest stored refits kept after each refit; older
    ones are pruned (:meth:`prunable`), but never one whose model a serving names (a
    replica, or one restarting on an empty disk, fetches what it serves from there). A
    swapped-in refit is stored with its model (the shipped one: 128 KB of ONNX and a
    20 KB card) and written to the refitting replica's disk; at most one refit per
    ``min_interval_s`` makes up to 48 a day, 7 MB a day and 2.6 GB a year of each model
    never freed. Ten cover the last 5 hours of refits at the least (6-19 hours at the
    label rates above): the recent decisions with their scores to compare, and the
    models swapped in lately to go back to by hand (``POST /models`` with a kept file)
    once a swap shows worse in the live figures, which the alert on them tells within
    the hour (``ModelAucLow``: 30 minutes on at least 200 labels); about 1.5 MB a model.
    """

    every_labels: int = 20_000
    min_interval_s: float = 1_800.0
    min_rows: int = 20_000
    window_rows: int = 200_000
    check_s: float = 30.0
    min_gain: float = 0.01
    keep_refits: int = 10

    def __post_init__(self) -> None:
        if self.every_labels < 1 or self.min_rows < 2 or self.window_rows < self.min_rows:
            raise ValueError("need every_labels >= 1, min_rows >= 2, window_rows >= min_rows")
        if self.min_interval_s < 0 or self.check_s <= 0 or self.min_gain < 0:
            raise ValueError("need min_interval_s >= 0, check_s > 0 and min_gain >= 0")
        if self.keep_refits < 1:
            raise ValueError("need keep_refits >= 1 (the newest refit says when the next is due)")

    @property
    def kept_rows(self) -> int:
        """A model's newest stored labels kept; older ones are never refitted on."""
        return 2 * self.window_rows

    @property
    def counted_rows(self) -> int:
        """How far a model's stored labels need counting for :meth:`due` to decide."""
        return max(self.every_labels, self.min_rows)

    def due(self, *, new_labels: int, rows: int, since_last_s: float) -> bool:
        """Whether to refit a model with ``new_labels`` stored since its last refit,
        ``rows`` stored in all, its last refit ``since_last_s`` ago (inf: never)."""
        return (
            new_labels >= self.every_labels
            and rows >= self.min_rows
            and since_last_s >= self.min_interval_s
        )

    def prunable(self, models: Sequence[str | None], served: Collection[str]) -> list[int]:
        """Positions of a model's stored refits to prune, given each one's model hash
        (None: not swapped in) newest first and the hashes of the models served."""
        return [
            i
            for i, model in enumerate(models)
            if i >= self.keep_refits and (model is None or model not in served)
        ]


__all__ = ["RefitPolicy"]
