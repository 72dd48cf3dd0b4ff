"""ActivityProcessor: the lifecycle of one token, as a pure keyed processor.

Every per-token rule lives here once: the keyed stateful consumer
(:mod:`pumpflow.common.consumer`) runs it per mint on ``features.updated`` and
``token.migrated`` events, and :class:`~pumpflow.common.activity.analyzer.ActivityAnalyzer`
hosts the same methods over many tokens with a Clock's timers.

What follows from a step goes through :class:`~pumpflow.common.keyed.Effects`:

- ``emit``: a :class:`~pumpflow.common.events.TokenLifecycle` for every transition and
  every priority recommendation (same state, reason ``priority``), at the host's time
  (``Effects.now``: on the keyed consumer, the market's as far as it has applied it);
- ``set_priority``: the token's recommended priority, whenever it is recomputed;
- ``set_timer``: one lazy timer per token for its next possible deadline; it is moved
  only when the deadline comes earlier, and when it fires early (trades moved the
  deadline on) it re-arms, so a trade costs no timer work;
- ``retire``: an inactive token, a graduate after its linger time, and stragglers of an
  inactive token once they stop; the state kept is a small tombstone (``retired``).

Feed (un)subscribe requests go to ``on_feed_request(action, mint)``: the host batches
them across tokens. A retired token is unsubscribed, a revived one subscribed again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

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
    event_rule,
    next_deadline,
    time_rule,
)
from pumpflow.common.activity.metrics import ActivityMetricsReader, InvalidVector
from pumpflow.common.events import Event, FeaturesUpdated, LifecycleState, TokenLifecycle
from pumpflow.common.keyed import UNCHANGED, Effects, InvalidInput, StaleState, Unchanged
from pumpflow.common.priority import Priority

FeedAction = Literal["subscribe", "unsubscribe"]
FeedRequestCallback = Callable[[FeedAction, str], None]
#: (mint, its lifecycle state, None when it has none or is retired)
CountedCallback = Callable[[str, LifecycleState | None], None]

CONSUMES = ("features.updated", "token.migrated")
#: the types whose time is the tokens' market as activity sees it (the keyed consumer's
#: ``market_types``): the vectors; under a backlog the feed's migration, a hop nearer
#: the feed, overtakes them
MARKET_TYPES = ("features.updated",)
#: publishers of which only some keyed events are consumed: of the feed's per-mint seqs
#: (creations, trades, migrations) activity takes only the migration's, so they skip by
#: design, and under a backlog a migration can come before the token's first vector
PARTIAL_PUBLISHERS = ("feed",)
#: a stale tombstone re-retired by a late event still gets a usable TTL
_MIN_TTL_S = 1.0


class ActivityState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Lifecycle state of one token (live, or a retired tombstone)."""

    mint: str
    #: None until the token's first event
    state: LifecycleState | None = None
    #: host's time (``Effects.now``) the token entered ``state``
    since: float = 0.0
    created_at: float = 0.0
    #: event time of its last trade
    last_activity: float = 0.0
    retired: bool = False
    retired_at: float = 0.0
    #: activity level at the last trade, before fading with silence
    raw_level: float = 0.0
    baseline: float = 0.0
    baseline_time: float = 0.0
    priority: int = int(Priority.NORMAL)
    priority_time: float = 0.0
    metrics: ActivityMetrics | None = None
    #: rate-based declines wait until then (rolling windows refilling after a restore)
    warm_until: float = 0.0
    #: when the token's timer is set for; None: no timer
    timer_at: float | None = None


def counted(state: ActivityState) -> LifecycleState | None:
    """The state ``state`` is counted under: none before its first event or once retired."""
    return None if state.retired else state.state


class ActivityProcessor:
    """Per-token lifecycle rules as a :class:`~pumpflow.common.keyed.KeyedProcessor`."""

    def __init__(
        self,
        *,
        on_feed_request: FeedRequestCallback,
        thresholds: LifecycleThresholds | None = None,
        on_counted: CountedCallback | None = None,
    ):
        self.thresholds = thresholds or LifecycleThresholds()
        self._on_feed_request = on_feed_request
        #: told a token's :func:`counted` state whenever an apply or a fire changes it
        #: (its host keeps counts by state instead of reading every token)
        self._on_counted = on_counted
        self._reader = ActivityMetricsReader()
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(ActivityState).decode

    # ---------------------------------------------------------------- KeyedProcessor

    def initial(self, key: str) -> ActivityState:
        return ActivityState(mint=key)

    def apply(
        self, state: ActivityState, event: Event, effects: Effects
    ) -> ActivityState | Unchanged:
        """Take a ``features.updated`` (the token's metrics) or a ``token.migrated``.

        A vector is a snapshot: of a token's vectors delivered together
        (``Effects.more``) only the newest is read.
        """
        if event.type == "token.migrated":
            return self._counting(state, lambda: self.migrated(state, effects))
        if event.type != "features.updated" or not isinstance(event.data, FeaturesUpdated):
            raise InvalidInput(f"activity does not consume {event.type}")
        if effects.more:
            return UNCHANGED  # a newer vector of the token follows in this batch: decide on that
        data = event.data
        try:
            metrics = self._reader.read(data.names, data.values, time=event.time)
        except InvalidVector as exc:
            raise InvalidInput(str(exc)) from exc
        return self._counting(state, lambda: self.update(state, metrics, effects))

    def _counting(self, state: ActivityState, step: Callable[[], ActivityState]) -> ActivityState:
        """Run ``step`` on ``state``; tell ``on_counted`` if the token's counted state moved."""
        if self._on_counted is None:
            return step()
        before = counted(state)
        state = step()
        after = counted(state)
        if after != before:
            self._on_counted(state.mint, after)
        return state

    def fire(self, state: ActivityState, effects: Effects) -> ActivityState:
        """Run the time rules due now; re-arm when the deadline moved on meanwhile."""
        return self._counting(state, lambda: self._fire(state, effects))

    def _fire(self, state: ActivityState, effects: Effects) -> ActivityState:
        token = state
        token.timer_at = None
        if token.state is None or token.retired:
            return token
        now = effects.now
        deadline = self._deadline(token)
        if deadline is not None and now + 1e-9 < deadline:
            self._arm(token, effects)
            return token
        if token.state in (INACTIVE, GRADUATED):
            self._retire(token, effects)
            return token
        rule = time_rule(
            token.state,
            now=now,
            since=token.since,
            created_at=token.created_at,
            last_activity=token.last_activity,
            th=self.thresholds,
        )
        if rule is not None:
            self._move(token, *rule, effects)
        elif deadline is not None and deadline > now:
            self._arm(token, effects)
        return token

    def encode(self, state: ActivityState) -> bytes:
        return self._encode(state)

    def compact(self, state: ActivityState, now: float) -> bytes | None:
        return None  # a few hundred bytes already

    def decode(self, raw: bytes) -> ActivityState:
        try:
            return self._decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StaleState(f"unreadable activity state: {exc}") from exc

    # ---------------------------------------------------------------- steps

    def created(self, state: ActivityState, effects: Effects) -> ActivityState:
        """Start a token never seen before in ``new``; anything known stays as it is."""
        if state.state is None:
            self._start(state, NEW, effects.now)
            self._emit(state, None, "created", effects)
            self._arm(state, effects)
        return state

    def update(
        self, state: ActivityState, metrics: ActivityMetrics, effects: Effects
    ) -> ActivityState:
        """Take the token's latest metrics: event rules, baseline, priority, timer."""
        token = state
        now = effects.now
        th = self.thresholds
        announced = False
        if token.state is None:
            self._start(token, NEW, now)
            self._emit(token, None, "first seen", effects)
            announced = True
        elif token.retired:
            if token.state == GRADUATED:
                # terminal: trades after migration change nothing
                self._keep_retired(token, effects)
                return token
            # stragglers of an inactive token: measure them, maybe revive it
            token.retired = False
        token.last_activity = max(token.last_activity, metrics.last_trade_time)
        if now > token.baseline_time:
            weight = 1.0 - math.exp(-(now - token.baseline_time) / th.change_baseline_s)
            token.baseline += (self.activity_level(token, now) - token.baseline) * weight
            token.baseline_time = now
        token.metrics = metrics
        token.raw_level = self._raw_level(metrics)
        rule = event_rule(token.state, metrics, th, warming=now < token.warm_until)
        if rule is not None:
            self._move(token, *rule, effects)
        elif not announced:
            self._maybe_recommend(token, now, effects)
        if not token.retired:
            self._arm(token, effects)
        return token

    def migrated(self, state: ActivityState, effects: Effects) -> ActivityState:
        """The token left the curve: ``graduated``, terminal."""
        token = state
        if token.state is None:
            # first heard of at its migration
            self._start(token, GRADUATED, effects.now)
            self._emit(token, None, "migrated", effects)
            self._arm(token, effects)
            return token
        if token.state == GRADUATED:
            if token.retired:
                self._keep_retired(token, effects)
            return token
        token.retired = False
        self._move(token, GRADUATED, "migrated", effects)
        return token

    def arm(self, state: ActivityState, effects: Effects) -> None:
        """Set the timer of a live token for its next deadline (its host had none)."""
        state.timer_at = None
        if state.state is not None and not state.retired:
            self._arm(state, effects)

    # ---------------------------------------------------------------- queries

    def activity_level(self, state: ActivityState, now: float) -> float:
        """Activity 0..1: trade rate, breadth and volume against graduate pace, fading
        with the time since the last trade."""
        quiet = max(0.0, now - state.last_activity)
        return state.raw_level * math.exp(-quiet / self.thresholds.decline_after_quiet_s)

    def recommended_priority(self, state: ActivityState, now: float) -> Priority:
        """How important the token is to process now."""
        th = self.thresholds
        if state.retired:
            return Priority.IDLE
        if state.state == ACTIVE:
            level = self.activity_level(state, now)
            progress = state.metrics.curve_progress if state.metrics else None
            if level >= th.urgent_level or (progress or 0.0) >= th.urgent_curve_progress:
                return Priority.URGENT
            return Priority.HIGH
        if state.state == NEW:
            surging = self.activity_level(state, now) - state.baseline >= th.change_min_delta
            return Priority.HIGH if surging else Priority.NORMAL
        if state.state == DECLINING:
            return Priority.LOW
        return Priority.IDLE

    def activity_change(self, state: ActivityState, now: float) -> ActivityChange | None:
        """A surge or drop of the activity level against its recent baseline, or None."""
        level = self.activity_level(state, now)
        delta = level - state.baseline
        if state.retired or abs(delta) < self.thresholds.change_min_delta:
            return None
        kind = "surge" if delta > 0 else "drop"
        return ActivityChange(
            mint=state.mint, kind=kind, level=level, baseline=state.baseline, time=now
        )

    # ---------------------------------------------------------------- internals

    @staticmethod
    def _start(token: ActivityState, state: LifecycleState, now: float) -> None:
        token.state = state
        token.since = token.created_at = token.last_activity = now
        token.baseline_time = token.priority_time = now

    def _raw_level(self, m: ActivityMetrics) -> float:
        th = self.thresholds
        rate = min(1.0, m.trades_per_minute / th.hot_trades_per_min)
        breadth = min(1.0, m.new_traders / th.hot_new_traders_per_min)
        volume = min(1.0, m.sol_volume_per_minute / th.hot_sol_per_min)
        return 0.5 * rate + 0.25 * breadth + 0.25 * volume

    def _emit(
        self,
        token: ActivityState,
        previous: LifecycleState | None,
        reason: str,
        effects: Effects,
    ) -> None:
        now = effects.now
        assert token.state is not None
        token.priority = int(self.recommended_priority(token, now))
        token.priority_time = now
        effects.set_priority(token.priority)
        payload = TokenLifecycle(
            mint=token.mint,
            state=token.state,
            previous_state=previous,
            reason=reason,
            priority=token.priority,
            activity_level=round(self.activity_level(token, now), 6),
        )
        effects.emit(payload, time=now)

    def _move(
        self, token: ActivityState, state: LifecycleState, reason: str, effects: Effects
    ) -> None:
        previous = token.state
        token.state = state
        token.since = effects.now
        self._emit(token, previous, reason, effects)
        if state == INACTIVE:
            self._retire(token, effects)
            return
        if previous == INACTIVE and state == ACTIVE:
            self._on_feed_request("subscribe", token.mint)
        self._arm(token, effects)

    def _maybe_recommend(self, token: ActivityState, now: float, effects: Effects) -> None:
        priority = int(self.recommended_priority(token, now))
        if priority == token.priority:
            return
        if now - token.priority_time < self.thresholds.priority_min_interval_s:
            return
        self._emit(token, token.state, "priority", effects)

    def _retire(self, token: ActivityState, effects: Effects) -> None:
        token.retired = True
        token.retired_at = effects.now
        token.metrics = None
        token.raw_level = 0.0
        token.timer_at = None
        effects.cancel_timer()
        effects.retire(self.thresholds.tombstone_ttl_s)
        # stragglers retiring again mean the feed still streams the token: ask again
        self._on_feed_request("unsubscribe", token.mint)

    def _keep_retired(self, token: ActivityState, effects: Effects) -> None:
        """A tombstone loaded by a late event goes again, keeping its expiry."""
        remaining = token.retired_at + self.thresholds.tombstone_ttl_s - effects.now
        effects.retire(max(_MIN_TTL_S, remaining))

    def _deadline(self, token: ActivityState) -> float | None:
        assert token.state is not None
        return next_deadline(
            token.state,
            since=token.since,
            created_at=token.created_at,
            last_activity=token.last_activity,
            th=self.thresholds,
        )

    def _arm(self, token: ActivityState, effects: Effects) -> None:
        deadline = self._deadline(token)
        if deadline is None:
            return
        if token.timer_at is not None and token.timer_at <= deadline:
            return  # fires early and re-arms: cheaper than moving it on every trade
        token.timer_at = deadline
        effects.set_timer(deadline)
