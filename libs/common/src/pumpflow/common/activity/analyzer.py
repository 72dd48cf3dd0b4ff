"""ActivityAnalyzer: per-token activity level, lifecycle state and priority.

Plain and transport-free: it takes :class:`ActivityMetrics` (computed by the
FeatureManager, see :mod:`pumpflow.common.activity.metrics`) and a Clock, and reports
through two callbacks:

- ``on_transition(Transition)``: a lifecycle change, or a priority recommendation
  (a Transition whose state equals its previous state, reason ``priority``);
- ``on_retire(mint, state)``: stop watching the token (unsubscribe it at the feed and
  drop its per-token state). Called when a token becomes inactive, when a graduated
  token's linger time is over, and when stragglers of an inactive token stop.

Time-driven rules run from one lazy Clock timer per token: the timer is set for the
token's next possible deadline and, when it fires early because trades moved the
deadline on, it simply re-arms. So a trade costs no timer work, and a ReplayClock
fires exactly the transitions a WallClock would.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator

import msgspec

from pumpflow.common.activity.lifecycle import (
    ACTIVE,
    DECLINING,
    GRADUATED,
    INACTIVE,
    NEW,
    ActivityChange,
    ActivityMetrics,
    LifecycleThresholds,
    Transition,
    event_rule,
    next_deadline,
    time_rule,
)
from pumpflow.common.clock import Clock, TimerHandle
from pumpflow.common.events import LifecycleState
from pumpflow.common.priority import Priority

TransitionCallback = Callable[[Transition], None]
RetireCallback = Callable[[str, LifecycleState], None]


class TokenSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Checkpointable state of one token (live or retired)."""

    mint: str
    state: LifecycleState
    since: float
    created_at: float
    last_activity: float
    retired: bool = False
    raw_level: float = 0.0
    baseline: float = 0.0
    baseline_time: float = 0.0
    priority: int = 0
    priority_time: float = 0.0
    metrics: ActivityMetrics | None = None


class TokenActivity(msgspec.Struct, frozen=True, kw_only=True):
    """A read-only view of one token for APIs and tests."""

    mint: str
    state: LifecycleState
    since: float
    created_at: float
    last_activity: float
    retired: bool
    priority: int
    activity_level: float
    metrics: ActivityMetrics | None = None


class _Token:
    __slots__ = (
        "baseline",
        "baseline_time",
        "created_at",
        "last_activity",
        "metrics",
        "mint",
        "priority",
        "priority_time",
        "raw_level",
        "since",
        "state",
        "timer",
        "timer_at",
        "warm_until",
    )

    def __init__(self, mint: str, state: LifecycleState, now: float):
        self.mint = mint
        self.state: LifecycleState = state
        self.since = now
        self.created_at = now
        self.last_activity = now
        self.metrics: ActivityMetrics | None = None
        self.raw_level = 0.0
        self.baseline = 0.0
        self.baseline_time = now
        self.priority = int(Priority.NORMAL)
        self.priority_time = now
        self.timer: TimerHandle | None = None
        self.timer_at = math.inf
        self.warm_until = -math.inf


class ActivityAnalyzer:
    """Tracks the lifecycle of every watched token; see the module docstring."""

    def __init__(
        self,
        *,
        clock: Clock,
        thresholds: LifecycleThresholds | None = None,
        on_transition: TransitionCallback | None = None,
        on_retire: RetireCallback | None = None,
    ):
        self._clock = clock
        self.thresholds = thresholds or LifecycleThresholds()
        self._on_transition = on_transition
        self._on_retire = on_retire
        self._tokens: dict[str, _Token] = {}
        #: retired tokens in retirement order: mint -> snapshot
        self._tombstones: OrderedDict[str, tuple[float, TokenSnapshot]] = OrderedDict()
        self.transitions_total = 0
        self.retired_total = 0

    # ---------------------------------------------------------------- inputs

    def token_created(self, mint: str) -> Transition | None:
        """Start tracking a new token in state ``new``; a repeated create is ignored."""
        if mint in self._tokens or mint in self._tombstones:
            return None
        token = _Token(mint, NEW, self._clock.now())
        self._tokens[mint] = token
        transition = self._emit(token, None, "created")
        self._arm(token)
        return transition

    def update_activity_metrics(self, mint: str, metrics: ActivityMetrics) -> Transition | None:
        """Take the token's latest metrics; return the transition or recommendation made."""
        now = self._clock.now()
        token = self._tokens.get(mint)
        emitted: Transition | None = None
        if token is None:
            tomb = self._tombstones.get(mint)
            if tomb is not None and tomb[1].state == GRADUATED:
                return None  # terminal: trades after migration change nothing
            if tomb is not None:
                # stragglers of an inactive token: measure them, maybe revive it
                token = self._from_snapshot(tomb[1])
                del self._tombstones[mint]
            else:
                token = _Token(mint, NEW, now)
                emitted = self._emit(token, None, "first seen")
            self._tokens[mint] = token
        th = self.thresholds
        token.last_activity = max(token.last_activity, metrics.last_trade_time)
        if now > token.baseline_time:
            weight = 1.0 - math.exp(-(now - token.baseline_time) / th.change_baseline_s)
            token.baseline += (self._level(token, now) - token.baseline) * weight
            token.baseline_time = now
        token.metrics = metrics
        token.raw_level = self._raw_level(metrics)
        rule = event_rule(token.state, metrics, th, warming=now < token.warm_until)
        if rule is not None:
            emitted = self._move(token, *rule)
        elif emitted is None:
            emitted = self._maybe_recommend(token, now)
        if mint in self._tokens:
            self._arm(token)
        return emitted

    def token_migrated(self, mint: str) -> Transition | None:
        """The token left the curve: ``graduated``, terminal."""
        now = self._clock.now()
        token = self._tokens.get(mint)
        if token is None:
            tomb = self._tombstones.pop(mint, None)
            if tomb is not None and tomb[1].state == GRADUATED:
                self._tombstones[mint] = tomb
                return None
            token = self._from_snapshot(tomb[1]) if tomb else _Token(mint, NEW, now)
            if tomb is None:
                token.state = GRADUATED  # first heard of at its migration
                token.since = now
                self._tokens[mint] = token
                transition = self._emit(token, None, "migrated")
                self._arm(token)
                return transition
            self._tokens[mint] = token
        if token.state == GRADUATED:
            return None
        return self._move(token, GRADUATED, "migrated")

    # ---------------------------------------------------------------- queries

    def get_token_lifecycle_state(self, mint: str) -> LifecycleState | None:
        token = self._tokens.get(mint)
        if token is not None:
            return token.state
        tomb = self._tombstones.get(mint)
        return tomb[1].state if tomb else None

    def get_activity_level(self, mint: str) -> float:
        """Activity 0..1: trade rate, breadth and volume against graduate pace, fading
        with the time since the last trade."""
        token = self._tokens.get(mint)
        return 0.0 if token is None else self._level(token, self._clock.now())

    def detect_activity_change(self, mint: str) -> ActivityChange | None:
        """A surge or drop of the activity level against its recent baseline, or None."""
        token = self._tokens.get(mint)
        if token is None:
            return None
        now = self._clock.now()
        level = self._level(token, now)
        delta = level - token.baseline
        if abs(delta) < self.thresholds.change_min_delta:
            return None
        kind = "surge" if delta > 0 else "drop"
        return ActivityChange(mint=mint, kind=kind, level=level, baseline=token.baseline, time=now)

    def recommend_priority(self, mint: str) -> Priority:
        """How important the token is to process now."""
        token = self._tokens.get(mint)
        if token is None:
            return Priority.IDLE
        return self._priority(token, self._clock.now())

    def token(self, mint: str) -> TokenActivity | None:
        token = self._tokens.get(mint)
        if token is not None:
            return self._view(token)
        tomb = self._tombstones.get(mint)
        if tomb is None:
            return None
        snap = tomb[1]
        return TokenActivity(
            mint=mint,
            state=snap.state,
            since=snap.since,
            created_at=snap.created_at,
            last_activity=snap.last_activity,
            retired=True,
            priority=int(Priority.IDLE),
            activity_level=0.0,
            metrics=None,
        )

    def tokens(self, state: LifecycleState | None = None) -> list[TokenActivity]:
        """Views of live tokens (and retired ones), optionally of one state."""
        views = [self._view(t) for t in self._tokens.values() if state in (None, t.state)]
        if state in (None, INACTIVE, GRADUATED):
            views.extend(
                v for m in self._tombstones if (v := self.token(m)) and state in (None, v.state)
            )
        return views

    def is_live(self, mint: str) -> bool:
        """True while the token has live (not retired) state."""
        return mint in self._tokens

    def watched(self) -> Iterator[str]:
        """Mints still streamed from the feed (live, not inactive)."""
        return (m for m, t in self._tokens.items() if t.state != INACTIVE)

    @property
    def live_count(self) -> int:
        return len(self._tokens)

    @property
    def tombstone_count(self) -> int:
        return len(self._tombstones)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys((NEW, ACTIVE, DECLINING, INACTIVE, GRADUATED), 0)
        for token in self._tokens.values():
            out[token.state] += 1
        return out

    # ---------------------------------------------------------------- checkpoints

    def snapshot(self, mint: str) -> TokenSnapshot | None:
        token = self._tokens.get(mint)
        if token is not None:
            return TokenSnapshot(
                mint=mint,
                state=token.state,
                since=token.since,
                created_at=token.created_at,
                last_activity=token.last_activity,
                raw_level=token.raw_level,
                baseline=token.baseline,
                baseline_time=token.baseline_time,
                priority=token.priority,
                priority_time=token.priority_time,
                metrics=token.metrics,
            )
        tomb = self._tombstones.get(mint)
        return tomb[1] if tomb else None

    def restore(self, snapshot: TokenSnapshot, *, warm_up: bool = True) -> None:
        """Load a checkpointed token.

        With ``warm_up`` (the metrics' rolling windows were not restored with it),
        rate-based declines wait one window while the windows refill.
        """
        mint = snapshot.mint
        if mint in self._tokens or mint in self._tombstones:
            return
        if snapshot.retired:
            self._tombstones[mint] = (self._clock.now(), snapshot)
            return
        token = self._from_snapshot(snapshot)
        if warm_up:
            token.warm_until = self._clock.now() + self.thresholds.rate_window_s
        self._tokens[mint] = token
        self._arm(token)

    def suspend(self, mint: str) -> None:
        """Cancel the token's timer; its state stays, readable for a last checkpoint.

        For a token another replica is about to own: no timer-driven transition may
        happen here any more. Its next update arms the timer again.
        """
        token = self._tokens.get(mint)
        if token is not None and token.timer is not None:
            token.timer.cancel()
            token.timer = None
            token.timer_at = math.inf

    def mints(self) -> list[str]:
        """Every token known here, live or retired."""
        return [*self._tokens, *self._tombstones]

    def forget(self, mint: str) -> None:
        """Drop every trace of a token (live or retired) without callbacks."""
        token = self._tokens.pop(mint, None)
        if token is not None and token.timer is not None:
            token.timer.cancel()
        self._tombstones.pop(mint, None)

    def prune_tombstones(self) -> list[str]:
        """Forget retired tokens older than ``tombstone_ttl_s``; return their mints."""
        horizon = self._clock.now() - self.thresholds.tombstone_ttl_s
        dropped: list[str] = []
        while self._tombstones:
            mint, (retired_at, _) = next(iter(self._tombstones.items()))
            if retired_at > horizon:
                break
            del self._tombstones[mint]
            dropped.append(mint)
        return dropped

    def close(self) -> None:
        """Cancel every timer (the state stays readable)."""
        for token in self._tokens.values():
            if token.timer is not None:
                token.timer.cancel()
                token.timer = None
                token.timer_at = math.inf

    # ---------------------------------------------------------------- internals

    def _from_snapshot(self, snap: TokenSnapshot) -> _Token:
        token = _Token(snap.mint, snap.state, snap.since)
        token.created_at = snap.created_at
        token.last_activity = snap.last_activity
        token.raw_level = snap.raw_level
        token.baseline = snap.baseline
        token.baseline_time = snap.baseline_time
        token.priority = snap.priority
        token.priority_time = snap.priority_time
        token.metrics = snap.metrics
        return token

    def _view(self, token: _Token) -> TokenActivity:
        now = self._clock.now()
        return TokenActivity(
            mint=token.mint,
            state=token.state,
            since=token.since,
            created_at=token.created_at,
            last_activity=token.last_activity,
            retired=False,
            priority=int(self._priority(token, now)),
            activity_level=self._level(token, now),
            metrics=token.metrics,
        )

    def _raw_level(self, m: ActivityMetrics) -> float:
        th = self.thresholds
        rate = min(1.0, m.trades_per_minute / th.hot_trades_per_min)
        breadth = min(1.0, m.new_traders / th.hot_new_traders_per_min)
        volume = min(1.0, m.sol_volume_per_minute / th.hot_sol_per_min)
        return 0.5 * rate + 0.25 * breadth + 0.25 * volume

    def _level(self, token: _Token, now: float) -> float:
        quiet = max(0.0, now - token.last_activity)
        return token.raw_level * math.exp(-quiet / self.thresholds.decline_after_quiet_s)

    def _priority(self, token: _Token, now: float) -> Priority:
        th = self.thresholds
        if token.state == ACTIVE:
            level = self._level(token, now)
            progress = token.metrics.curve_progress if token.metrics else None
            if level >= th.urgent_level or (progress or 0.0) >= th.urgent_curve_progress:
                return Priority.URGENT
            return Priority.HIGH
        if token.state == NEW:
            surging = self._level(token, now) - token.baseline >= th.change_min_delta
            return Priority.HIGH if surging else Priority.NORMAL
        if token.state == DECLINING:
            return Priority.LOW
        return Priority.IDLE

    def _emit(self, token: _Token, previous: LifecycleState | None, reason: str) -> Transition:
        now = self._clock.now()
        token.priority = int(self._priority(token, now))
        token.priority_time = now
        transition = Transition(
            mint=token.mint,
            state=token.state,
            previous_state=previous,
            reason=reason,
            time=now,
            priority=token.priority,
            activity_level=self._level(token, now),
        )
        if previous != token.state:
            self.transitions_total += 1
        if self._on_transition is not None:
            self._on_transition(transition)
        return transition

    def _move(self, token: _Token, state: LifecycleState, reason: str) -> Transition:
        previous = token.state
        token.state = state
        token.since = self._clock.now()
        transition = self._emit(token, previous, reason)
        if state == INACTIVE:
            self._retire(token)
        else:
            self._arm(token)
        return transition

    def _maybe_recommend(self, token: _Token, now: float) -> Transition | None:
        priority = int(self._priority(token, now))
        if priority == token.priority:
            return None
        if now - token.priority_time < self.thresholds.priority_min_interval_s:
            return None
        return self._emit(token, token.state, "priority")

    def _retire(self, token: _Token) -> None:
        snapshot = self.snapshot(token.mint)
        assert snapshot is not None
        if token.timer is not None:
            token.timer.cancel()
            token.timer = None
        del self._tokens[token.mint]
        now = self._clock.now()
        self._tombstones[token.mint] = (
            now,
            msgspec.structs.replace(snapshot, retired=True, metrics=None, raw_level=0.0),
        )
        self.retired_total += 1
        self.prune_tombstones()
        if self._on_retire is not None:
            self._on_retire(token.mint, token.state)

    def _deadline(self, token: _Token) -> float | None:
        return next_deadline(
            token.state,
            since=token.since,
            created_at=token.created_at,
            last_activity=token.last_activity,
            th=self.thresholds,
        )

    def _arm(self, token: _Token) -> None:
        deadline = self._deadline(token)
        if deadline is None:
            return
        if token.timer is not None:
            if token.timer_at <= deadline:
                return  # fires early and re-arms: cheaper than moving it on every trade
            token.timer.cancel()
        token.timer_at = deadline
        token.timer = self._clock.call_at(deadline, lambda: self._on_timer(token))

    def _on_timer(self, token: _Token) -> None:
        token.timer = None
        token.timer_at = math.inf
        if self._tokens.get(token.mint) is not token:
            return
        now = self._clock.now()
        deadline = self._deadline(token)
        if deadline is not None and now + 1e-9 < deadline:
            self._arm(token)
            return
        if token.state in (INACTIVE, GRADUATED):
            self._retire(token)
            return
        rule = time_rule(
            token.state,
            now=now,
            since=token.since,
            created_at=token.created_at,
            last_activity=token.last_activity,
            th=self.thresholds,
        )
        if rule is not None:
            self._move(token, *rule)
        elif deadline is not None and deadline > now:
            self._arm(token)
