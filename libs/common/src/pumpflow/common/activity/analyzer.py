"""ActivityAnalyzer: many tokens' lifecycles in one process, on a Clock's timers.

A thin host over :class:`~pumpflow.common.activity.processor.ActivityProcessor`: the
rules are the processor's; this class keeps the tokens in memory (live ones, and
retired ones as tombstones for ``tombstone_ttl_s``), carries out the processor's
effects with the injected Clock (one timer per token), and reports through callbacks:

- ``on_transition(Transition)``: a lifecycle change, or a priority recommendation
  (a Transition whose state equals its previous state, reason ``priority``);
- ``on_retire(mint, state)``: the token stopped being watched (its per-token state may
  go). Called when a token becomes inactive, when a graduated token's linger time is
  over, and when stragglers of an inactive token stop;
- ``on_feed_request(action, mint)``: subscribe a revived token again, unsubscribe a
  retired one.
"""

from __future__ import annotations

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
)
from pumpflow.common.activity.processor import (
    ActivityProcessor,
    ActivityState,
    FeedAction,
    FeedRequestCallback,
)
from pumpflow.common.clock import Clock, TimerHandle
from pumpflow.common.events import LifecycleState, Payload, TokenLifecycle
from pumpflow.common.priority import Priority

TransitionCallback = Callable[[Transition], None]
RetireCallback = Callable[[str, LifecycleState], None]
#: checkpointable state of one token (live or retired)
TokenSnapshot = ActivityState
Step = Callable[[ActivityState, "_HostEffects"], ActivityState]


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


class _HostEffects:
    """The processor's effects for one token, carried out at once by the analyzer."""

    __slots__ = ("_host", "_token", "key", "last", "now")

    #: the analyzer takes each token's events one at a time
    more = False

    def __init__(self, host: ActivityAnalyzer, token: ActivityState):
        self._host = host
        self._token = token
        self.key = token.mint
        self.now = host._clock.now()
        self.last: Transition | None = None

    def emit(self, payload: Payload, *, time: float) -> None:
        assert isinstance(payload, TokenLifecycle)
        transition = Transition(
            mint=payload.mint,
            state=payload.state,
            previous_state=payload.previous_state,
            reason=payload.reason,
            time=time,
            priority=payload.priority,
            activity_level=payload.activity_level,
        )
        self.last = transition
        self._host._emitted(transition)

    def set_timer(self, at: float) -> None:
        self._host._set_timer(self._token, at)

    def cancel_timer(self) -> None:
        self._host._cancel_timer(self.key)

    def set_priority(self, priority: int) -> None:
        pass  # callers ask recommend_priority when they schedule the token's work

    def retire(self, ttl_s: float) -> None:
        pass  # _settle moves a retired token to the tombstones, which expire on their own


class ActivityAnalyzer:
    """Tracks the lifecycle of every watched token; see the module docstring."""

    def __init__(
        self,
        *,
        clock: Clock,
        thresholds: LifecycleThresholds | None = None,
        on_transition: TransitionCallback | None = None,
        on_retire: RetireCallback | None = None,
        on_feed_request: FeedRequestCallback | None = None,
    ):
        self._clock = clock
        self._on_transition = on_transition
        self._on_retire = on_retire
        self._on_feed_request = on_feed_request
        self.processor = ActivityProcessor(thresholds=thresholds, on_feed_request=self._feed)
        self.thresholds = self.processor.thresholds
        self._tokens: dict[str, ActivityState] = {}
        self._timers: dict[str, TimerHandle] = {}
        #: retired tokens in retirement order: mint -> (retired at, tombstone)
        self._tombstones: OrderedDict[str, tuple[float, ActivityState]] = OrderedDict()
        self.transitions_total = 0
        self.retired_total = 0

    # ---------------------------------------------------------------- inputs

    def token_created(self, mint: str) -> Transition | None:
        """Start tracking a new token in state ``new``; a repeated create is ignored."""
        return self._step(mint, self.processor.created)

    def update_activity_metrics(self, mint: str, metrics: ActivityMetrics) -> Transition | None:
        """Take the token's latest metrics; return the transition or recommendation made."""
        return self._step(mint, lambda state, fx: self.processor.update(state, metrics, fx))

    def token_migrated(self, mint: str) -> Transition | None:
        """The token left the curve: ``graduated``, terminal."""
        return self._step(mint, self.processor.migrated)

    # ---------------------------------------------------------------- queries

    def get_token_lifecycle_state(self, mint: str) -> LifecycleState | None:
        token = self._known(mint)
        return None if token is None else token.state

    def get_activity_level(self, mint: str) -> float:
        """Activity 0..1: trade rate, breadth and volume against graduate pace, fading
        with the time since the last trade."""
        token = self._tokens.get(mint)
        return 0.0 if token is None else self.processor.activity_level(token, self._clock.now())

    def detect_activity_change(self, mint: str) -> ActivityChange | None:
        """A surge or drop of the activity level against its recent baseline, or None."""
        token = self._tokens.get(mint)
        if token is None:
            return None
        return self.processor.activity_change(token, self._clock.now())

    def recommend_priority(self, mint: str) -> Priority:
        """How important the token is to process now."""
        token = self._tokens.get(mint)
        if token is None:
            return Priority.IDLE
        return self.processor.recommended_priority(token, self._clock.now())

    def token(self, mint: str) -> TokenActivity | None:
        token = self._known(mint)
        return None if token is None else self._view(token)

    def tokens(self, state: LifecycleState | None = None) -> list[TokenActivity]:
        """Views of live tokens (and retired ones), optionally of one state."""
        views = [self._view(t) for t in self._tokens.values() if state in (None, t.state)]
        if state in (None, INACTIVE, GRADUATED):
            views.extend(
                self._view(t) for _, t in self._tombstones.values() if state in (None, t.state)
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
            if token.state is not None:
                out[token.state] += 1
        return out

    # ---------------------------------------------------------------- checkpoints

    def snapshot(self, mint: str) -> TokenSnapshot | None:
        """A copy of the token's state (live, or its tombstone)."""
        token = self._known(mint)
        return None if token is None else msgspec.structs.replace(token)

    def restore(self, snapshot: TokenSnapshot, *, warm_up: bool = True) -> None:
        """Load a checkpointed token.

        With ``warm_up`` (the metrics' rolling windows were not restored with it),
        rate-based declines wait one window while the windows refill.
        """
        mint = snapshot.mint
        if mint in self._tokens or mint in self._tombstones or snapshot.state is None:
            return
        now = self._clock.now()
        # no timer runs here for it yet, whatever the snapshot's host had set
        token = msgspec.structs.replace(snapshot, timer_at=None)
        if token.retired:
            self._tombstones[mint] = (now, token)
            return
        if warm_up:
            token.warm_until = now + self.thresholds.rate_window_s
        self._tokens[mint] = token
        self.processor.arm(token, _HostEffects(self, token))

    def suspend(self, mint: str) -> None:
        """Cancel the token's timer; its state stays, readable for a last checkpoint.

        For a token another replica is about to own: no timer-driven transition may
        happen here any more. Its next update arms the timer again.
        """
        self._cancel_timer(mint)

    def mints(self) -> list[str]:
        """Every token known here, live or retired."""
        return [*self._tokens, *self._tombstones]

    def forget(self, mint: str) -> None:
        """Drop every trace of a token (live or retired) without callbacks."""
        self._cancel_timer(mint)
        self._tokens.pop(mint, None)
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
        for mint in list(self._timers):
            self._cancel_timer(mint)

    # ---------------------------------------------------------------- internals

    def _known(self, mint: str) -> ActivityState | None:
        token = self._tokens.get(mint)
        if token is not None:
            return token
        tomb = self._tombstones.get(mint)
        return tomb[1] if tomb else None

    def _step(self, mint: str, step: Step) -> Transition | None:
        """Run one processor step on the token and keep what it leaves."""
        token = self._known(mint) or self.processor.initial(mint)
        effects = _HostEffects(self, token)
        token = step(token, effects)
        self._settle(token, effects)
        return effects.last

    def _settle(self, token: ActivityState, effects: _HostEffects) -> None:
        mint = token.mint
        if token.state is None:
            return  # a step that left an unknown token unknown
        if not token.retired:
            self._tombstones.pop(mint, None)
            self._tokens[mint] = token
            return
        if self._tokens.pop(mint, None) is None:
            return  # a tombstone that stays one keeps its place and expiry
        self._cancel_timer(mint)
        self._tombstones[mint] = (effects.now, token)
        self.retired_total += 1
        self.prune_tombstones()
        if self._on_retire is not None:
            self._on_retire(mint, token.state)

    def _view(self, token: ActivityState) -> TokenActivity:
        now = self._clock.now()
        assert token.state is not None
        return TokenActivity(
            mint=token.mint,
            state=token.state,
            since=token.since,
            created_at=token.created_at,
            last_activity=token.last_activity,
            retired=token.retired,
            priority=int(self.processor.recommended_priority(token, now)),
            activity_level=self.processor.activity_level(token, now),
            metrics=token.metrics,
        )

    def _emitted(self, transition: Transition) -> None:
        if transition.is_transition:
            self.transitions_total += 1
        if self._on_transition is not None:
            self._on_transition(transition)

    def _feed(self, action: FeedAction, mint: str) -> None:
        if self._on_feed_request is not None:
            self._on_feed_request(action, mint)

    def _set_timer(self, token: ActivityState, at: float) -> None:
        self._cancel_timer(token.mint)
        self._timers[token.mint] = self._clock.call_at(at, lambda: self._fire(token.mint, token))

    def _cancel_timer(self, mint: str) -> None:
        handle = self._timers.pop(mint, None)
        if handle is not None:
            handle.cancel()
        token = self._tokens.get(mint)
        if token is not None:
            token.timer_at = None

    def _fire(self, mint: str, token: ActivityState) -> None:
        if self._tokens.get(mint) is not token:
            return  # retired, forgotten or replaced meanwhile
        self._timers.pop(mint, None)
        effects = _HostEffects(self, token)
        self._settle(self.processor.fire(token, effects), effects)
