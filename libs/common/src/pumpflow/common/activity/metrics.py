"""Activity metrics read from a features vector (``features.updated``) by name.

Every feature has one implementation in the project, the features service's
(default feature set), so the rolling windows behind :class:`ActivityMetrics` are
computed there once and read here:

=========================  ===============================================
ActivityMetrics            feature(s)
=========================  ===============================================
trades_per_minute          ``trades_per_minute`` (60 s window)
sol_volume_per_minute      ``buy_volume_sol_60s + sell_volume_sol_60s``
unique_traders             ``unique_traders`` (distinct wallets so far)
new_traders                ``new_traders_60s`` (first-time wallets, 60 s)
price_return               ``return_60s``
drawdown                   ``drawdown_from_peak``
curve_progress             ``curve_progress``
time                       the vector's time (its token event's time)
=========================  ===============================================

A vector is computed at each token event, so the metrics are as of a trade; what
happens between trades (silence) is the lifecycle timers' job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pumpflow.common.activity.lifecycle import ActivityMetrics

#: features the metrics read; a vector must contain them (by name, in any order)
REQUIRED_FEATURES = (
    "trades_per_minute",
    "buy_volume_sol_60s",
    "sell_volume_sol_60s",
    "unique_traders",
    "new_traders_60s",
    "return_60s",
    "drawdown_from_peak",
    "curve_progress",
)

#: feature-set layouts seen at once (a rollout has two); more are rebuilt on demand
_MAX_LAYOUTS = 8


class InvalidVector(ValueError):
    """A vector without every feature of :data:`REQUIRED_FEATURES`, or malformed."""


def required_index(names: Sequence[str]) -> tuple[int, ...]:
    """Positions of :data:`REQUIRED_FEATURES` in ``names``; raise InvalidVector."""
    index = {name: i for i, name in enumerate(names)}
    missing = [n for n in REQUIRED_FEATURES if n not in index]
    if missing:
        raise InvalidVector(f"the feature set lacks {missing} needed for activity metrics")
    return tuple(index[n] for n in REQUIRED_FEATURES)


class ActivityMetricsReader:
    """Reads :class:`ActivityMetrics` from vectors, one cached index per names tuple."""

    def __init__(self) -> None:
        self._indexes: dict[tuple[str, ...], tuple[int, ...]] = {}

    def read(
        self, names: Sequence[str], values: Sequence[float], *, time: float
    ) -> ActivityMetrics:
        """The metrics of a vector as of ``time``; raise InvalidVector."""
        key = tuple(names)
        positions = self._indexes.get(key)
        if positions is None:
            positions = required_index(key)
            if len(self._indexes) >= _MAX_LAYOUTS:
                del self._indexes[next(iter(self._indexes))]
            self._indexes[key] = positions
        if len(values) != len(key):
            raise InvalidVector(f"{len(values)} values for {len(key)} feature names")
        tpm, buy, sell, unique, new, ret, dd, progress = (values[i] for i in positions)
        if not (math.isfinite(unique) and math.isfinite(new)):
            raise InvalidVector(f"trader counts must be finite, got {unique} and {new}")
        return ActivityMetrics(
            time=time,
            trades_per_minute=tpm,
            sol_volume_per_minute=buy + sell,
            unique_traders=int(unique),
            new_traders=int(new),
            price_return=ret,
            drawdown=max(0.0, dd),
            curve_progress=progress,
        )
