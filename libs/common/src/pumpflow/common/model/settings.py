"""Settings of the model's domain: which vectors are scored, the label's defaults, the
drift monitor's thresholds.

Free of numpy and of the models themselves: the model service's settings read these
defaults, and every ``pumpflow`` command reads those settings (the check of the
environment), as ``pumpflow train`` reads the label's for its flags.

Label defaults (argued from docs/market.md; the label itself:
:mod:`pumpflow.common.model.labels`): a token's organic flow fades within a minute or
two and most tokens go quiet within minutes, so a 120 s horizon; +20% net of fees is a
move worth the round trip's 2.5% and the spread of the trade it enters on, and -10% the
loss a trader would cut at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_HORIZON_S = 120.0
DEFAULT_TAKE_PROFIT = 0.20
DEFAULT_STOP_LOSS = 0.10
#: the curve's fee on the SOL leg (pumpflow.common.curve.FEE_RATE), paid both ways
DEFAULT_FEE_RATE = 0.0125


@dataclass(frozen=True, slots=True, kw_only=True)
class ScoringPolicy:
    """Which vectors are scored.

    ``min_interval_s`` (0.5 s of event time): graduates, the tokens worth trading,
    take a median 457 trades over 4.4 minutes (docs/market.md), one every 0.58 s on
    average, with bursts several times faster. Scoring at most twice a second per token
    scores such a token at about every trade in its average run and thins its bursts,
    where consecutive vectors differ by a trade or two; the market's 23 to 58 trades a
    second (bursts several times that) then bound the predictions well below the
    trades. ``retire_ttl_s`` (1 h): a retired token's record stays that long, so a late
    vector of a graduate (trades go on after migration) is still known as retired.

    ``label_interval_s`` (10 s of event time): a token's predictions are followed to
    their labels at most that often. Two predictions of a token half a second apart
    share all but half a second of their horizon (120 s for the shipped model), so
    their labels are nearly the same sample: following each would weigh a busy token by
    its trade rate and make the rolling figures (and a refit's rows) look surer than
    they are. Labels 10 s apart still share 92% of that horizon; twelve a horizon
    follow a token's run (a graduate's median run of 4.4 minutes gives 26), and the
    tracker's work is a small share of the scoring path's.
    """

    min_interval_s: float = 0.5
    retire_ttl_s: float = 3600.0
    label_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.min_interval_s < 0 or self.retire_ttl_s <= 0 or self.label_interval_s < 0:
            raise ValueError("need min_interval_s >= 0, retire_ttl_s > 0 and label_interval_s >= 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftThresholds:
    """Thresholds of the drift monitor; defaults are justified in
    :mod:`pumpflow.common.model.drift`."""

    #: PSI at or above which a feature is drifting (significant shift)
    alert_psi: float = 0.25
    #: PSI under which a drifting feature has recovered (no significant shift)
    recover_psi: float = 0.10
    #: vectors in the rolling window
    window: int = 6000
    #: vectors seen before any feature is judged
    min_observations: int = 2000
    #: vectors between two computations of the PSI
    check_every: int = 500
    #: least share a bin counts with, live or reference
    share_floor: float = 1e-4
    #: transitions kept in :attr:`DriftMonitor.transitions`
    history: int = 256
    #: market seconds the observation lasts before any feature is judged
    warmup_s: float = 1200.0

    def __post_init__(self) -> None:
        if not 0 < self.recover_psi < self.alert_psi:
            raise ValueError("need 0 < recover_psi < alert_psi")
        if not 0 < self.min_observations <= self.window:
            raise ValueError("need 0 < min_observations <= window")
        if self.check_every <= 0 or not 0 < self.share_floor < 1:
            raise ValueError("check_every must be positive and share_floor in (0, 1)")
        if not 0 <= self.warmup_s < math.inf:
            raise ValueError("warmup_s must be finite and not negative")
