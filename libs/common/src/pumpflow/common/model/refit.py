"""When a served model is refitted on its stored live labels, without anyone asking.

The model service stores every live label it resolves (the vector scored, the score,
the label; :class:`~pumpflow.common.model.performance.ResolvedLabel`) and checks, every
``check_s``, each served model against a :class:`RefitPolicy`. A refit that is due goes
to :meth:`~pumpflow.common.model.manager.ModelManager.update_model` on the newest
``window_rows`` stored rows of the model (its feature set and label definition): the
manager holds out the newest share of them by time (``update_held_out_share``, 30%),
fits a candidate on the rows whose horizon ended before that slice, and swaps it in
only if it scores strictly better on the slice than the serving version.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class RefitPolicy:
    """When a model is refitted on its stored live labels.

    A refit is due when all hold:

    - ``every_labels`` (20,000) labels of the model were stored since its last refit
      (by any replica: the count is the store's). The policy follows a token at most
      once per 5 s, so the live market's few dozen active tokens give some 5-20 labels
      a second: a refit every 20 minutes to an hour, each seeing a tenth of its window
      new.
    - ``min_interval_s`` (1,800 s) passed since the model's last refit. A refit of the
      window takes tens of seconds of one core (LightGBM's 120 trees on up to 200,000
      rows, then the ONNX check), under 2% of a core at this pace, on a thread beside
      the scoring.
    - the store holds at least ``min_rows`` (20,000) rows of the model. The held-out
      slice is then 6,000 labels: the standard error of an AUC there at a 10% positive
      rate is about 0.5 / sqrt(6000 * 0.1 * 0.9) = 0.02, so a candidate worse by more
      than that is refused with high probability (one no better is swapped in by chance
      about half the time: harmless, it scores alike).

    ``window_rows`` (200,000): the newest rows refitted on, about 3 to 11 hours of labels
    at the rates above: recent for a market whose tokens live minutes, and 46 MB of
    features (29 doubles a row) in memory while refitting. ``check_s`` (30 s): how often
    the service asks the store; a count over an index, cheap.
    """

    every_labels: int = 20_000
    min_interval_s: float = 1_800.0
    min_rows: int = 20_000
    window_rows: int = 200_000
    check_s: float = 30.0

    def __post_init__(self) -> None:
        if self.every_labels < 1 or self.min_rows < 2 or self.window_rows < self.min_rows:
            raise ValueError("need every_labels >= 1, min_rows >= 2, window_rows >= min_rows")
        if self.min_interval_s < 0 or self.check_s <= 0:
            raise ValueError("need min_interval_s >= 0 and check_s > 0")

    def due(self, *, new_labels: int, rows: int, since_last_s: float) -> bool:
        """Whether to refit a model with ``new_labels`` stored since its last refit,
        ``rows`` stored in all, its last refit ``since_last_s`` ago (inf: never)."""
        return (
            new_labels >= self.every_labels
            and rows >= self.min_rows
            and since_last_s >= self.min_interval_s
        )


__all__ = ["RefitPolicy"]
