"""Exit rules of one position: declared, configurable, each firing once per condition.

A position's gain is its mark price (the spot price of the token's market, SOL per
token: its curve's, or once it migrated its AMM pool's) against its entry price (SOL
paid per token, every fee included), less one. The spot price does not count what
selling would cost (the sale's own impact and fees, a few percent for a usual size);
the thresholds below are far above that. Right after a buy the gain is near zero: the
fees pull it down, the buy's own move of the price up.

Defaults, from the market figures in docs/market.md:

- **Fees**: a round trip pays the curve's 1.25% twice and the trade API's 1% twice,
  about 4.5% before any price impact. Nothing below a gain of a few times that is
  worth a sale's fees, so the first take-profit step is at +50%.
- **Take-profit ladder** (``+50%: 25%``, ``+100%: 25%``, ``+200%: 25%`` of the size
  bought): 68.7% of tokens stop trading on their launch day and most go quiet within
  minutes, so a gain is taken while it is there. Selling a quarter at +50% and a
  quarter at +100% returns ~0.875 of the stake before fees: the rest rides for free.
  The last quarter rides the trailing stop towards the curve's end, where the price is
  ~14.7x the launch price (a graduate reaches it in a median 4.4 minutes).
- **Trailing stop** (armed once the peak gain reaches +20%; gives back 30% from the
  peak, 20% once the peak gain is +100%, 12% once it is +300%): the lifecycle calls a
  50% fall from the peak a dump (``LifecycleThresholds.decline_drawdown``), so the
  stop sits well inside that. On a constant-product curve the price goes with the
  square of the SOL in it, so the SOL a peak's buyers take out moves the price twice
  as much: the further a token has run, the more there is to give back in one dump,
  and the tighter the trail.
- **Stop loss** (-30% from the entry): bots move a live token by 10-20% within
  seconds, so a stop inside that would sell on noise; a fall of 30% from the entry is
  most of the 50% the lifecycle calls a dump, and inside the 50% fall trading sizes
  a position for (``RiskLimits.assumed_stop_loss``).
- **Time stops**: a position held 300 s (past the 4.4-minute median of graduates)
  without a gain of +10% (``stale_stop``) is on a token that is not going anywhere;
  every position is sold after 600 s (``time_stop``): about 95% of tokens go quiet
  within 10-15 minutes.
- **Lifecycle**: ``declining`` sells half (a declining token can recover, the
  lifecycle has that transition; most do not); ``inactive`` sells the rest
  (``inactivity``), as does a position's own silence: no trade of its token for 60 s,
  the lifecycle's ``decline_after_quiet_s`` (none in 60 s has probability e^-6 ~ 0.25%
  for a token still at the active pace). Migration (``graduated``, the token's
  ``migrate`` frame, or its first trade on its pool when that frame never came) sells
  everything: after it the token trades on the PumpSwap pool, which paper trading only
  approximates and the curve's features no longer describe.
- **Refused sales**: a sale the venue refused gives its tokens back and its rule fires
  again: at once the first time (a refusal on slippage in a moving market wants the
  new price), then, refused again, no rule fires for 1 s, doubling to 30 s while the
  refusals go on (``refused_retry_s``, ``refused_retry_max_s``). A refusal for good (an
  API error, a wallet short of SOL for the fees) would otherwise order again at the
  pace of the round trip to trading, or of the token's trades, against PumpPortal's 25
  requests a second that every sale shares; 30 s is half the silence that sells a
  position (``quiet_s``). A refusal 30 s past the last wait starts again at once.
- **Short fills**: a sale that sells fewer tokens than it ordered (its slippage limit,
  the market's depth, trading cutting it to what is held) gives the rest back to its
  rule as tokens still held, never as tokens bought, and the rules look again at once
  with no wait (it sold: no refusal).

A full exit takes what is left; of several rules due at once the first in
:data:`FULL_EXIT_RULES` names it. The decline sells its share of what is left, a
ladder step its share of the tokens bought (all that is left at most: after a decline
the ladder sells out sooner). A rule that fired does not fire again for the same
condition: a ladder step, the trailing stop and the time stops once per position; the
decline exit again only after the token recovered to ``active``. Tokens that come back
to the rules after a full exit (a partial sale refused or filled short, an entry added
while its sale is under way) are sold by it again while it is due. A partial rule
whose sale came back (refused, or filled short) sells what came back as it fires next,
not its share again: a ladder sells its configured shares of the tokens bought however
its sales fill (a step filled at half orders the other half as that step, at once
while its gain holds, else when it comes back), and a decline the rest of its share
(unless the token recovers first: the next decline sells its share of what is left).
The tokens bought are the holding the rules first saw and the entries added to it;
what the rules have left is never more than is held (tokens sold by other means, a
graceful exit's tranches or a sale by hand, are taken from it), the ladder's steps
staying shares of the tokens bought.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import msgspec

from pumpflow.common.clock import Clock, TimerHandle
from pumpflow.common.events import LifecycleState

TAKE_PROFIT = "take_profit"
TRAILING_STOP = "trailing_stop"
STOP_LOSS = "stop_loss"
TIME_STOP = "time_stop"
STALE_STOP = "stale_stop"
DECLINE = "decline"
INACTIVITY = "inactivity"
MIGRATION = "migration"
#: not a rule: an operator's sale (``exit.sale_requested``), decided as a rule's is
REQUESTED = "requested"
#: rules that sell everything left, in the order that names an exit when several are due
FULL_EXIT_RULES = (MIGRATION, INACTIVITY, STOP_LOSS, TRAILING_STOP, TIME_STOP, STALE_STOP)
#: every rule, the partial ones first (a new rule goes here too: its metrics start at 0)
RULES = (TAKE_PROFIT, DECLINE, *FULL_EXIT_RULES)

#: a timer set for ``t + x`` must find ``x`` elapsed despite float rounding
_EPSILON_S = 1e-6


class ExitPosition(Protocol):
    """What the rules read of a position (trading's ``Position`` has these)."""

    @property
    def mint(self) -> str: ...

    @property
    def position_id(self) -> str: ...

    @property
    def opened_at(self) -> float: ...

    @property
    def tokens(self) -> float: ...

    @property
    def entry_price(self) -> float: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class TakeProfitStep:
    """Sell ``fraction`` of the tokens bought once the gain reaches ``gain``."""

    gain: float
    fraction: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TrailBand:
    """Once the peak gain reaches ``peak_gain``, sell all on a fall of ``giveback`` from it."""

    peak_gain: float
    giveback: float


def check_take_profit(steps: Iterable[TakeProfitStep]) -> None:
    """Refuse a ladder that is not steps by rising positive gain, each selling a share in
    (0, 1] of the tokens bought, all of them together the whole at most (ValueError)."""
    steps = tuple(steps)
    for step in steps:
        if not step.gain > 0:
            raise ValueError(f"a step's gain ({step.gain:g}) is not above 0 (0.5 is +50%)")
        if math.isinf(step.gain):
            raise ValueError(f"a step's gain ({step.gain:g}) is not finite: it would never sell "
                             "and still count toward the whole")  # fmt: skip
        if not 0 < step.fraction <= 1:
            raise ValueError(f"a step's share ({step.fraction:g}) is not in (0, 1]")
    if any(b.gain <= a.gain for a, b in itertools.pairwise(steps)):
        raise ValueError("the steps' gains do not rise from one step to the next")
    if (total := sum(s.fraction for s in steps)) > 1 + 1e-9:
        raise ValueError(f"the steps sell {total:g} of the tokens bought, more than the whole (1)")


def check_trailing(bands: Iterable[TrailBand]) -> None:
    """Refuse trailing bands that are not by rising peak gain (0 or more), each giving
    back a fall in (0, 1) from the peak, tightening as the peak gain grows (ValueError)."""
    bands = tuple(bands)
    for band in bands:
        if not band.peak_gain >= 0:
            raise ValueError(f"a band's peak gain ({band.peak_gain:g}) is below 0")
        if math.isinf(band.peak_gain):
            raise ValueError(
                f"a band's peak gain ({band.peak_gain:g}) is not finite: it would never be reached"
            )
        if not 0 < band.giveback < 1:
            raise ValueError(
                f"a band's giveback ({band.giveback:g}) is not in (0, 1): "
                "1 gives back the whole peak and more"
            )
    if any(b.peak_gain <= a.peak_gain for a, b in itertools.pairwise(bands)):
        raise ValueError("the bands' peak gains do not rise from one band to the next")
    if any(b.giveback > a.giveback for a, b in itertools.pairwise(bands)):
        raise ValueError(
            "a band gives back more than the one before: a trailing stop only "
            "tightens as the peak gain grows"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitRules:
    """Parameters of every exit rule; defaults argued in the module docstring.

    A rule is off when its parameter is None (or the ladder empty).
    """

    take_profit: tuple[TakeProfitStep, ...] = (
        TakeProfitStep(gain=0.5, fraction=0.25),
        TakeProfitStep(gain=1.0, fraction=0.25),
        TakeProfitStep(gain=2.0, fraction=0.25),
    )
    #: bands by rising ``peak_gain``; the first band's gain arms the stop
    trailing: tuple[TrailBand, ...] = (
        TrailBand(peak_gain=0.2, giveback=0.3),
        TrailBand(peak_gain=1.0, giveback=0.2),
        TrailBand(peak_gain=3.0, giveback=0.12),
    )
    #: fall from the entry price that sells everything
    stop_loss: float | None = 0.3
    max_hold_s: float | None = 600.0
    stale_after_s: float | None = 300.0
    #: gain a position must show after ``stale_after_s`` to be kept
    stale_min_gain: float = 0.1
    #: share of what is left sold when the token turns ``declining``
    decline_fraction: float | None = 0.5
    #: a position whose token did not trade for this long is sold
    quiet_s: float | None = 60.0
    #: share sold when the token migrates
    migration_fraction: float | None = 1.0
    #: no rule fires for this long after a second refusal in a row, doubling with each
    #: one after, to ``refused_retry_max_s``
    refused_retry_s: float = 1.0
    refused_retry_max_s: float = 30.0

    def __post_init__(self) -> None:
        check_take_profit(self.take_profit)
        check_trailing(self.trailing)
        if self.stop_loss is not None and not 0 < self.stop_loss < 1:
            raise ValueError("stop_loss must be in (0, 1)")
        for name in ("decline_fraction", "migration_fraction"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        for name in ("max_hold_s", "stale_after_s", "quiet_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive")
        if not 0 < self.refused_retry_s <= self.refused_retry_max_s:
            raise ValueError("need 0 < refused_retry_s <= refused_retry_max_s")

    def giveback(self, peak_gain: float) -> float | None:
        """The trailing stop's fall from the peak at this peak gain; None while unarmed."""
        armed = None
        for band in self.trailing:
            if peak_gain + 1e-12 >= band.peak_gain:
                armed = band.giveback
        return armed


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitDecision:
    """A sale one rule calls for."""

    mint: str
    position_id: str
    #: rule name: ``take_profit_<n>`` (n from 1), or one of the names above
    rule: str
    #: share of the tokens held before this decision
    fraction: float
    token_amount: float
    reason: str
    time: float
    #: the mark the rule saw (None for a rule of time or lifecycle before any mark)
    mark_price: float | None = None

    @property
    def full(self) -> bool:
        return self.fraction >= 1.0


class RuleWatch(msgspec.Struct, kw_only=True):
    """Per-position state of the rules (a keyed service stores it with the token's)."""

    mint: str
    position_id: str
    opened_at: float
    entry_price: float
    #: tokens bought (the holding as the rules first saw it, and entries added since);
    #: tokens a sale gave back are not bought
    bought: float
    #: tokens the decisions so far have not taken
    left: float
    last_trade_at: float
    peak_price: float = 0.0
    mark_price: float | None = None
    lifecycle: LifecycleState | None = None
    fired: set[str] = msgspec.field(default_factory=set)
    #: no rule fires before this time (a wait after refused sales)
    held_until: float = 0.0
    #: the wait after the last refused sale (0: it was ordered again at once)
    retry_s: float = 0.0
    #: rule -> tokens a partial rule's sales gave back (refused, or filled short): what
    #: it sells as it fires next (all that is left at most), not its share again
    owed: dict[str, float] = msgspec.field(default_factory=dict)

    @property
    def closed(self) -> bool:
        return self.left <= 0.0


TimedExits = Callable[[list[ExitDecision]], Awaitable[None] | None]


class ExitEvaluator:
    """The exit rules over every open position, pure but for timers on ``clock``.

    ``on_mark``, ``on_lifecycle`` and ``on_migration`` return the decisions an event
    calls for. Rules of time (time stops, silence) fire from timers on the injected
    clock, handing their decisions to ``on_timed``, so a replay on a ReplayClock takes
    the same exits as the live run; ``check_time`` evaluates them on demand.
    """

    def __init__(
        self,
        rules: ExitRules | None = None,
        *,
        clock: Clock,
        on_timed: TimedExits | None = None,
    ) -> None:
        self.rules = rules or ExitRules()
        self.clock = clock
        self.on_timed = on_timed
        self._watches: dict[str, RuleWatch] = {}
        self._timers: dict[str, TimerHandle] = {}

    # ---------------------------------------------------------------- positions

    def track(self, position: ExitPosition, *, time: float | None = None) -> None:
        """Start watching ``position`` (again: keeps what fired; a bigger holding adds)."""
        now = self.clock.now() if time is None else time
        watch = self._watches.get(position.mint)
        if watch is not None and watch.position_id == position.position_id:
            if position.tokens > watch.bought:
                watch.left += position.tokens - watch.bought
                watch.bought = position.tokens
                self._reopen(watch)
            watch.entry_price = position.entry_price
            return
        self._watches[position.mint] = RuleWatch(
            mint=position.mint,
            position_id=position.position_id,
            opened_at=position.opened_at,
            entry_price=position.entry_price,
            bought=position.tokens,
            left=position.tokens,
            last_trade_at=max(position.opened_at, now),
        )
        self._arm(self._watches[position.mint])

    def forget(self, mint: str) -> None:
        """Stop watching ``mint`` (its position closed)."""
        self._watches.pop(mint, None)
        timer = self._timers.pop(mint, None)
        if timer is not None:
            timer.cancel()

    def watch(self, mint: str) -> RuleWatch | None:
        """The rules' state of ``mint``'s position (changed in place as events come)."""
        return self._watches.get(mint)

    def adopt(self, watch: RuleWatch) -> None:
        """Watch a position as ``watch`` left it (a state stored before, say)."""
        self._watches[watch.mint] = watch
        self._arm(watch)

    def rearm(self, decision: ExitDecision) -> None:
        """Give back a decision whose sale failed: its tokens and its rule fire again."""
        watch = self._give_back(decision)
        if watch is None:
            return
        r = self.rules
        if decision.time < watch.held_until + r.refused_retry_max_s:
            # refused again soon after the last: wait longer before the rules order again
            watch.retry_s = min(max(2 * watch.retry_s, r.refused_retry_s), r.refused_retry_max_s)
        else:
            watch.retry_s = 0.0
        watch.held_until = decision.time + watch.retry_s
        self._arm(watch)

    def fell_short(self, decision: ExitDecision) -> None:
        """Give back what a decision's sale did not sell (``token_amount``: the tokens its
        fill fell short of its order by): its rule sells them as it fires next, at once
        while it is due (a sale that sold is no refusal: no wait)."""
        watch = self._give_back(decision)
        if watch is not None:
            self._arm(watch)

    def limit(self, mint: str, tokens: float) -> None:
        """Leave the rules at most ``tokens`` of ``mint``'s position: the rest of what they
        had left was sold by other means (a graceful exit's tranches, a hand sale)."""
        watch = self._watches.get(mint)
        if watch is not None and watch.left > tokens:
            watch.left = max(tokens, 0.0)
            self._arm(watch)

    def tracked(self) -> list[str]:
        return list(self._watches)

    def tokens_left(self, mint: str) -> float:
        watch = self._watches.get(mint)
        return watch.left if watch else 0.0

    def fired(self, mint: str) -> frozenset[str]:
        watch = self._watches.get(mint)
        return frozenset(watch.fired) if watch else frozenset()

    # ---------------------------------------------------------------- events

    def on_mark(self, mint: str, price: float, time: float) -> list[ExitDecision]:
        """A trade of ``mint`` at ``price`` (event time ``time``): the exits it calls for."""
        watch = self._watches.get(mint)
        if watch is None or watch.closed or not price > 0:
            return []
        watch.mark_price = price
        watch.peak_price = max(watch.peak_price, price)
        watch.last_trade_at = max(watch.last_trade_at, time)
        decisions = self._evaluate(watch, time)
        self._arm(watch)
        return decisions

    def on_lifecycle(self, mint: str, state: LifecycleState, time: float) -> list[ExitDecision]:
        """The token's lifecycle state changed: the exits it calls for."""
        watch = self._watches.get(mint)
        if watch is None or watch.closed:
            return []
        watch.lifecycle = state
        if state == "active":
            # recovered: the next decline is another, selling its share of what is left
            watch.fired.discard(DECLINE)
            watch.owed.pop(DECLINE, None)
        decisions = self._evaluate(watch, time)
        self._arm(watch)
        return decisions

    def on_migration(
        self, mint: str, time: float, *, mark_price: float | None = None
    ) -> list[ExitDecision]:
        """The token migrated off its curve (its ``migrate`` frame, or its first trade on
        its pool, whose spot ``mark_price`` the rules judge at from then)."""
        if mark_price is not None:
            self.remark(mint, mark_price)
        return self.on_lifecycle(mint, "graduated", time)

    def remark(self, mint: str, price: float) -> None:
        """``mint``'s mark is ``price`` from now (its pool's spot after a sale of ours on
        it, or after the trade that told its migration): nothing is decided here, nor is
        the token's silence broken (a trade breaks it: :meth:`on_mark`)."""
        watch = self._watches.get(mint)
        if watch is None or watch.closed or not price > 0:
            return
        watch.mark_price = price
        watch.peak_price = max(watch.peak_price, price)

    def on_request(
        self, mint: str, fraction: float, reason: str, time: float
    ) -> list[ExitDecision]:
        """An operator asks to sell ``fraction`` of what the rules have not sold of
        ``mint``'s position: that sale (none when nothing is left to them)."""
        watch = self._watches.get(mint)
        if watch is None or watch.closed or not fraction > 0:
            return []
        decision = self._decide(watch, REQUESTED, min(fraction, 1.0), reason, time)
        self._arm(watch)
        return [decision]

    def check_time(self, mint: str, time: float | None = None) -> list[ExitDecision]:
        """The exits the passage of time calls for at ``time`` (default: the clock's now)."""
        watch = self._watches.get(mint)
        if watch is None or watch.closed:
            return []
        decisions = self._evaluate(watch, self.clock.now() if time is None else time)
        self._arm(watch)
        return decisions

    def next_check_at(self, mint: str, time: float | None = None) -> float | None:
        """When the next rule of time of ``mint`` is due, seen at ``time`` (default: the
        clock's now; a host behind the market gives the time its rules judge at)."""
        watch = self._watches.get(mint)
        if watch is None or watch.closed:
            return None
        return self._next_due(watch, self.clock.now() if time is None else time)

    # ---------------------------------------------------------------- rules

    def _evaluate(self, watch: RuleWatch, time: float) -> list[ExitDecision]:
        if time < watch.held_until:
            return []
        for rule, reason in self._full_exits(watch, time):
            if rule not in watch.fired:
                return [self._decide(watch, rule, 1.0, reason, time)]
        decisions = []
        for rule, fraction, reason in self._partial_exits(watch):
            if rule in watch.fired or watch.closed:
                continue
            owed = watch.owed.get(rule)
            if owed is not None:
                # what its sale gave back: its share was taken when it fired first
                fraction = min(1.0, owed / watch.left)
            decisions.append(self._decide(watch, rule, fraction, reason, time))
        return decisions

    def _full_exits(self, watch: RuleWatch, time: float) -> Iterable[tuple[str, str]]:
        r = self.rules
        now = time + _EPSILON_S
        gain = self._gain(watch)
        if watch.lifecycle == "graduated" and r.migration_fraction == 1.0:
            yield MIGRATION, "token migrated"
        if watch.lifecycle == "inactive":
            yield INACTIVITY, "token inactive"
        if r.quiet_s is not None and now - watch.last_trade_at >= r.quiet_s:
            yield INACTIVITY, f"no trades for {now - watch.last_trade_at:.0f}s"
        if r.stop_loss is not None and gain is not None and gain <= -r.stop_loss:
            yield STOP_LOSS, f"gain {gain:+.0%} at or below -{r.stop_loss:.0%}"
        if gain is not None and watch.peak_price > 0:
            peak_gain = watch.peak_price / watch.entry_price - 1.0
            giveback = r.giveback(peak_gain)
            fall = 1.0 - watch.mark_price / watch.peak_price
            if giveback is not None and fall >= giveback - 1e-12:
                yield (
                    TRAILING_STOP,
                    f"fell {fall:.0%} from a peak gain of {peak_gain:+.0%} (trail {giveback:.0%})",
                )
        held = now - watch.opened_at
        if r.max_hold_s is not None and held >= r.max_hold_s:
            yield TIME_STOP, f"held {held:.0f}s"
        if (
            r.stale_after_s is not None
            and held >= r.stale_after_s
            and (gain is None or gain < r.stale_min_gain)
        ):
            shown = "no mark" if gain is None else f"gain {gain:+.0%}"
            yield STALE_STOP, f"{shown} after {held:.0f}s, below {r.stale_min_gain:+.0%}"

    def _partial_exits(self, watch: RuleWatch) -> Iterable[tuple[str, float, str]]:
        r = self.rules
        gain = self._gain(watch)
        if watch.lifecycle == "graduated" and r.migration_fraction is not None:
            yield MIGRATION, r.migration_fraction, "token migrated"
        if watch.lifecycle == "declining" and r.decline_fraction is not None:
            yield DECLINE, r.decline_fraction, "token declining"
        if gain is None:
            return
        for number, step in enumerate(r.take_profit, start=1):
            if gain + 1e-12 >= step.gain:
                # a step's share is of the tokens bought; of what is left it is more
                share = min(1.0, step.fraction * watch.bought / watch.left) if watch.left else 1.0
                yield f"{TAKE_PROFIT}_{number}", share, f"gain {gain:+.0%} reached {step.gain:+.0%}"

    def _give_back(self, decision: ExitDecision) -> RuleWatch | None:
        """The tokens of ``decision`` come back to the rules (never more than they took):
        its rule fires again, a partial one owing them; the watch, if it is the
        decision's position's."""
        watch = self._watches.get(decision.mint)
        if watch is None or watch.position_id != decision.position_id:
            return None
        tokens = max(0.0, min(decision.token_amount, watch.bought - watch.left))
        watch.left += tokens
        watch.fired.discard(decision.rule)
        if decision.rule not in self._full_rules() and decision.rule != REQUESTED:
            watch.owed[decision.rule] = watch.owed.get(decision.rule, 0.0) + tokens
        self._reopen(watch)
        return watch

    def _full_rules(self) -> list[str]:
        """The rules that sell everything left."""
        full = [rule for rule in FULL_EXIT_RULES if rule != MIGRATION]
        if self.rules.migration_fraction == 1.0:
            full.append(MIGRATION)
        return full

    def _reopen(self, watch: RuleWatch) -> None:
        """Tokens came back to the rules (a sale refused or filled short, an entry added):
        a full exit that fired sold only what was left then, so it sells these too while
        it is due."""
        watch.fired.difference_update(self._full_rules())

    @staticmethod
    def _gain(watch: RuleWatch) -> float | None:
        if watch.mark_price is None or watch.entry_price <= 0:
            return None
        return watch.mark_price / watch.entry_price - 1.0

    @staticmethod
    def _decide(watch: RuleWatch, rule: str, fraction: float, reason: str, time: float):
        tokens = watch.left if fraction >= 1.0 else watch.left * fraction
        watch.fired.add(rule)
        watch.owed.pop(rule, None)
        watch.left -= tokens
        if watch.left <= watch.bought * 1e-9:
            tokens += watch.left
            watch.left = 0.0
            fraction = 1.0
        return ExitDecision(
            mint=watch.mint,
            position_id=watch.position_id,
            rule=rule,
            fraction=fraction,
            token_amount=tokens,
            reason=reason,
            time=time,
            mark_price=watch.mark_price,
        )

    # ---------------------------------------------------------------- timers

    def _next_due(self, watch: RuleWatch, now: float) -> float | None:
        r = self.rules
        due = []
        if r.quiet_s is not None and INACTIVITY not in watch.fired:
            due.append(watch.last_trade_at + r.quiet_s)
        if r.max_hold_s is not None and TIME_STOP not in watch.fired:
            due.append(watch.opened_at + r.max_hold_s)
        if r.stale_after_s is not None and STALE_STOP not in watch.fired:
            stale_at = watch.opened_at + r.stale_after_s
            # past it, marks check the stale rule; the timer is for a token that is silent
            if stale_at > now:
                due.append(stale_at)
        if watch.held_until > now:
            # the rules look again as the wait after refused sales ends, not at the next
            # rule of time: a rule of price due meanwhile is due then, on a token that may
            # not trade again (and a rule of time due during the wait)
            return watch.held_until
        return min(due) if due else None

    def _arm(self, watch: RuleWatch) -> None:
        if self.on_timed is None:
            return
        due = None if watch.closed else self._next_due(watch, self.clock.now())
        mint = watch.mint
        timer = self._timers.get(mint)
        if timer is not None:
            if due is not None and timer.when == due and not timer.cancelled:
                return
            timer.cancel()
            del self._timers[mint]
        if due is None:
            return

        def fire():
            current = self._watches.get(mint)
            if current is not watch:
                return None
            self._timers.pop(mint, None)
            decisions = self.check_time(mint)
            if decisions and self.on_timed is not None:
                return self.on_timed(decisions)
            return None

        self._timers[mint] = self.clock.call_at(due, fire)
