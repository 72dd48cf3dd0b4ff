"""Activity metrics from the FeatureManager: the analyzer's only window maths.

Every feature has one implementation in the project, so the rolling windows behind
:class:`ActivityMetrics` are the FeatureManager's (default feature set):

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
time                       the vector's time (its last trade)
=========================  ===============================================

Windows run in event time up to the token's last trade, so metrics are computed at
each trade; what happens between trades (silence) is the analyzer's timers' job.
"""

from __future__ import annotations

from pumpflow.common.activity.lifecycle import ActivityMetrics
from pumpflow.common.events import Event
from pumpflow.common.features import FeatureDef, FeatureManager, default_feature_set

#: features the metrics read; the FeatureManager's set must contain them
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


def activity_feature_set() -> tuple[FeatureDef, ...]:
    """The default set's definitions the metrics read, with their dependencies.

    The same definitions (so the same implementations) as the features service uses;
    only the subset, so a token keeps one 60 s window instead of four and an update
    computes 9 features instead of ~30.
    """
    definitions = default_feature_set()
    by_name = {d.name: d for d in definitions}
    wanted: set[str] = set()
    pending = list(REQUIRED_FEATURES)
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending.extend(by_name[name].dependencies)
    return tuple(d for d in definitions if d.name in wanted)


class FeatureActivityMetrics:
    """Folds token events into a FeatureManager and reads ActivityMetrics from it."""

    def __init__(self, manager: FeatureManager | None = None):
        self.manager = manager if manager is not None else FeatureManager(activity_feature_set())
        missing = [n for n in REQUIRED_FEATURES if n not in self.manager.names]
        if missing:
            raise ValueError(f"the feature set lacks {missing} needed for activity metrics")
        index = {name: i for i, name in enumerate(self.manager.names)}
        (
            self._tpm,
            self._buy,
            self._sell,
            self._unique,
            self._new,
            self._ret,
            self._dd,
            self._progress,
        ) = (index[n] for n in REQUIRED_FEATURES)

    def update(self, event: Event) -> ActivityMetrics | None:
        """Fold a token.created / token.trade event; its token's metrics after it."""
        state = self.manager.update_feature_history(event)
        if state is None:
            return None
        return self.metrics(event.data.mint)

    def metrics(self, mint: str) -> ActivityMetrics | None:
        """The token's metrics as of its last trade; None if unknown."""
        state = self.manager.token(mint)
        if state is None or state.n_events == 0:
            return None
        v = self.manager.values(state)
        return ActivityMetrics(
            time=state.last_time,
            trades_per_minute=v[self._tpm],
            sol_volume_per_minute=v[self._buy] + v[self._sell],
            unique_traders=int(v[self._unique]),
            new_traders=int(v[self._new]),
            price_return=v[self._ret],
            drawdown=max(0.0, v[self._dd]),
            trades_total=state.n_events,
            curve_progress=v[self._progress],
        )

    def drop(self, mint: str) -> None:
        self.manager.drop_token(mint)

    def snapshot(self, mint: str) -> bytes | None:
        return self.manager.snapshot(mint)

    def restore(self, mint: str, raw: bytes, *, seq: int = 0) -> None:
        self.manager.restore(mint, raw, seq=seq)

    def last_seq(self, mint: str) -> int:
        """Feed seq of the last event folded in for ``mint`` (0: none or unknown)."""
        return self.manager.last_seq(mint)

    @property
    def tracked(self) -> int:
        return self.manager.tracked
