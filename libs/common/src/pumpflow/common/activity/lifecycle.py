"""Token lifecycle: states, thresholds, activity metrics and the transition rules.

States (``pumpflow.common.events.LifecycleState``)::

    new ──activity──► active ◄──recovered──► declining ──quiet/stalled──► inactive
     │                  │  ▲                     ▲                          │
     │                  │  └──────revived────────┼──────────────────────────┘
     │                  └──quiet/rate/drawdown───┘
     ├──dump/stalled──► declining
     └──quiet────────────────────────────────────────────────────────────► inactive
    any ──migrated──► graduated (terminal)

Event-driven rules look at the activity metrics of each update (trading frequency,
SOL volume, unique traders, price pattern); time-driven rules (nothing traded for a
while, stuck in declining) run from timers on the host's time, so a replay on a
ReplayClock takes exactly the transitions the live run took on the WallClock. On the
keyed consumer that time is the market's as far as activity has applied it (see
:mod:`pumpflow.common.consumer.keyed`): behind the market (a backlog) a token is not
found quiet while its vectors are still queued.

What ``inactive`` means: the token is no longer worth watching. Its trade
subscription at the feed is dropped (subscriptions cost money per message) and its
per-token state is dropped; only a small tombstone remains (``tombstone_ttl_s``).
Inactive is not terminal: trades that still arrive for it (a straggler before the
unsubscribe took effect, a replay, another subscription path) are measured again, and
once they meet the *active* criteria the token is revived (inactive -> active,
reason ``revived``) and resubscribed. A few stragglers that do not meet them leave it
inactive; it is retired again after ``revive_window_s`` without trades.

Threshold defaults, from the market figures in docs/market.md (sections 2 and 3):

- Graduates take a median of ~457 trades in ~4.4 minutes: ~104 trades/min and
  ~85 SOL in 4.4 min (~19 SOL/min). That is the "hot" pace the activity level is
  normalised to (``hot_*``).
- ``active_min_trades_per_min = 6``: a trade every 10 s, ~6% of graduate pace, by at
  least 3 distinct wallets (a creator and one bot trading back and forth are not
  activity) and ``active_min_sol_per_min = 0.1`` (many bot trades are dust).
  ~457 trades / 4.4 min with ~85 SOL is the hot pace the activity level is measured
  against: trade rate (weight 1/2), new wallets per minute (1/4), SOL volume (1/4).
- Declining on rate at <= 2 trades/min or on volume at <= 0.02 SOL/min (hysteresis
  below the active thresholds so a token near the edge does not flap); on price when
  the price is >= 50% below its peak and not bouncing (a dump or rug). A dumped token
  recovers once back within 40% of its peak, or bouncing: bots move a live token by
  10-20% within seconds, so one edge would flap on every trade.
- ``decline_after_quiet_s = 60``: at the active pace 6 trades are expected per minute;
  none in 60 s has probability e^-6 ~ 0.25% for a token that is still active.
- ``inactive_after_quiet_s = 180``: e^-18 ~ 1.5e-8 at the active pace. ~95% of tokens
  go quiet within 10-15 minutes; a token that dies at minute 10 is unsubscribed by
  minute 13, inside that window, and a silent launch costs 3 minutes of stream.
- ``new_max_age_s = 300``: a token that has not reached the active pace by 5 minutes
  (past the 4.4-minute median of graduates) is declining; ``declining_max_s = 300``
  then ends a token that only trickles. So a trickling token is watched at most
  10 minutes, a silent one 3 minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import msgspec

from pumpflow.common.events import LifecycleState

NEW: LifecycleState = "new"
ACTIVE: LifecycleState = "active"
DECLINING: LifecycleState = "declining"
INACTIVE: LifecycleState = "inactive"
GRADUATED: LifecycleState = "graduated"
STATES: tuple[LifecycleState, ...] = get_args(LifecycleState)
#: states in which the token is still watched (subscribed at the feed)
WATCHED_STATES: frozenset[str] = frozenset({NEW, ACTIVE, DECLINING})


@dataclass(frozen=True, slots=True, kw_only=True)
class LifecycleThresholds:
    """Thresholds of the lifecycle rules; defaults are justified in the module docstring."""

    #: window the per-minute metrics cover (rolling window of the feature set)
    rate_window_s: float = 60.0
    active_min_trades_per_min: float = 6.0
    active_min_unique_traders: int = 3
    active_min_sol_per_min: float = 0.1
    decline_max_trades_per_min: float = 2.0
    decline_max_sol_per_min: float = 0.02
    #: fall from the peak price (0..1) that makes a token decline
    decline_drawdown: float = 0.5
    #: window return that lets a dumped token count as recovering
    recover_min_return: float = 0.1
    #: fall from the peak price (0..1) below which a dumped token counts as recovering
    recover_drawdown: float = 0.4
    decline_after_quiet_s: float = 60.0
    inactive_after_quiet_s: float = 180.0
    new_max_age_s: float = 300.0
    declining_max_s: float = 300.0
    #: an inactive token that got stragglers is retired again after this long quiet
    revive_window_s: float = 60.0
    #: a graduated token stays watched this long (trading and exit may still hold it)
    graduated_linger_s: float = 120.0
    #: how long a retired token is remembered as inactive/graduated
    tombstone_ttl_s: float = 3600.0
    hot_trades_per_min: float = 104.0
    hot_sol_per_min: float = 19.0
    hot_new_traders_per_min: float = 30.0
    #: activity level at or above which an active token is urgent
    urgent_level: float = 0.5
    #: curve progress at or above which an active token is urgent (close to graduating)
    urgent_curve_progress: float = 0.8
    #: time constant of the activity baseline change detection compares against
    change_baseline_s: float = 60.0
    #: change of activity level against the baseline that counts as a surge or drop
    change_min_delta: float = 0.15
    #: least time between two priority recommendations of a token without a transition
    priority_min_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.decline_max_trades_per_min >= self.active_min_trades_per_min:
            raise ValueError("decline_max_trades_per_min must be below active_min_trades_per_min")
        if not 0 <= self.recover_drawdown <= self.decline_drawdown:
            raise ValueError("need 0 <= recover_drawdown <= decline_drawdown")
        if not 0 < self.decline_after_quiet_s <= self.inactive_after_quiet_s:
            raise ValueError("need 0 < decline_after_quiet_s <= inactive_after_quiet_s")
        for name in ("new_max_age_s", "declining_max_s", "revive_window_s", "rate_window_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


class ActivityMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """Activity of one token as of ``time``, read from its features vector."""

    #: event time the metrics are as of
    time: float
    #: trades in the last ``rate_window_s``, per minute
    trades_per_minute: float = 0.0
    sol_volume_per_minute: float = 0.0
    #: distinct wallets that traded the token so far
    unique_traders: int = 0
    #: wallets trading the token for the first time within the window
    new_traders: int = 0
    #: price return over the window (0.1 = +10%)
    price_return: float = 0.0
    #: fall of the price from its peak, 0..1
    drawdown: float = 0.0
    seconds_since_last_trade: float = 0.0
    #: bonding-curve progress 0..1, when known
    curve_progress: float | None = None

    @property
    def last_trade_time(self) -> float:
        return self.time - self.seconds_since_last_trade


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    """A lifecycle change of one token, or a priority recommendation (same state)."""

    mint: str
    state: LifecycleState
    previous_state: LifecycleState | None
    reason: str
    time: float
    priority: int
    activity_level: float

    @property
    def is_transition(self) -> bool:
        return self.state != self.previous_state


class ActivityChange(msgspec.Struct, frozen=True, kw_only=True):
    """A marked change of a token's activity level against its recent baseline."""

    mint: str
    kind: str  # "surge" or "drop"
    level: float
    baseline: float
    time: float


def meets_active(m: ActivityMetrics, th: LifecycleThresholds) -> bool:
    """Trading frequency, breadth and volume of an active token."""
    return (
        m.trades_per_minute >= th.active_min_trades_per_min
        and m.unique_traders >= th.active_min_unique_traders
        and m.sol_volume_per_minute >= th.active_min_sol_per_min
    )


def is_dumping(m: ActivityMetrics, th: LifecycleThresholds) -> bool:
    return m.drawdown >= th.decline_drawdown and m.price_return < th.recover_min_return


def is_recovering(m: ActivityMetrics, th: LifecycleThresholds) -> bool:
    """Back within ``recover_drawdown`` of the peak, or bouncing (hysteresis of the dump)."""
    return m.drawdown < th.recover_drawdown or m.price_return >= th.recover_min_return


def event_rule(
    state: LifecycleState, m: ActivityMetrics, th: LifecycleThresholds, *, warming: bool
) -> tuple[LifecycleState, str] | None:
    """The transition an update of the metrics calls for, as (state, reason), or None.

    ``warming`` is true right after state was restored from a checkpoint, while the
    rolling windows refill: rate-based declines wait for a full window then.
    """
    if state == GRADUATED:
        return None
    dumping = is_dumping(m, th)
    if state == NEW:
        if dumping:
            return DECLINING, f"drawdown {m.drawdown:.0%} from peak"
        if meets_active(m, th):
            return ACTIVE, f"{m.trades_per_minute:.0f} trades/min, {m.unique_traders} traders"
        return None
    if state == ACTIVE:
        if dumping:
            return DECLINING, f"drawdown {m.drawdown:.0%} from peak"
        if warming:
            return None
        if m.trades_per_minute <= th.decline_max_trades_per_min:
            return DECLINING, f"rate fell to {m.trades_per_minute:.1f} trades/min"
        if m.sol_volume_per_minute <= th.decline_max_sol_per_min:
            return DECLINING, f"volume fell to {m.sol_volume_per_minute:.3f} SOL/min"
        return None
    if state in (DECLINING, INACTIVE) and meets_active(m, th) and is_recovering(m, th):
        reason = "recovered" if state == DECLINING else "revived"
        return ACTIVE, f"{reason}: {m.trades_per_minute:.0f} trades/min"
    return None


def time_rule(
    state: LifecycleState,
    *,
    now: float,
    since: float,
    created_at: float,
    last_activity: float,
    th: LifecycleThresholds,
) -> tuple[LifecycleState, str] | None:
    """The transition due at ``now`` from the passage of time alone, or None."""
    # a timer set for `t + x` must find `x` elapsed despite float rounding
    now += 1e-6
    quiet = now - last_activity
    if state == NEW:
        if quiet >= th.inactive_after_quiet_s:
            return INACTIVE, f"no trades for {quiet:.0f}s"
        if now - created_at >= th.new_max_age_s:
            return DECLINING, f"never active in {now - created_at:.0f}s"
    elif state == ACTIVE:
        if quiet >= th.decline_after_quiet_s:
            return DECLINING, f"no trades for {quiet:.0f}s"
    elif state == DECLINING:
        if quiet >= th.inactive_after_quiet_s:
            return INACTIVE, f"no trades for {quiet:.0f}s"
        if now - since >= th.declining_max_s:
            return INACTIVE, f"declining for {now - since:.0f}s"
    return None


def next_deadline(
    state: LifecycleState,
    *,
    since: float,
    created_at: float,
    last_activity: float,
    th: LifecycleThresholds,
) -> float | None:
    """When the next time rule (or retirement) of a token in ``state`` may be due."""
    if state == NEW:
        return min(last_activity + th.inactive_after_quiet_s, created_at + th.new_max_age_s)
    if state == ACTIVE:
        return last_activity + th.decline_after_quiet_s
    if state == DECLINING:
        return min(last_activity + th.inactive_after_quiet_s, since + th.declining_max_s)
    if state == INACTIVE:
        return last_activity + th.revive_window_s
    if state == GRADUATED:
        return since + th.graduated_linger_s
    return None
