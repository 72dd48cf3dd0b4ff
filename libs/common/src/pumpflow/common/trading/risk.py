"""Risk: position sizing, limits, the trading state, the kill switch and circuit breakers.

Trading states (:class:`TradingState`): ``active`` enters and exits; ``reducing``
only exits (the daily loss limit, or the operator); ``halted`` only exits (the kill
switch, or a tripped circuit breaker). No state ever blocks an exit: a halt must not
trap a position. The state in force is the most severe of the operator's, the daily
loss limit's and the breakers'.

Circuit breakers (:data:`BREAKERS`) trip on their fault and recover after
``recovery_s`` without it: ``curve`` (a frame contradicting the curve maths,
:func:`pumpflow.common.curve.frame_consistency_error`), ``stale`` (a feed lag or a
silence past the limits; the lag of a token event, a features vector or a prediction,
each stamped with the time of the trade it follows from: a prediction behind the
market scores a curve long gone, however current the token's own events; the silence
of the whole stream, or of most tokens whose lifecycle is active, at once: their trade
subscriptions lost while new tokens still come. One active token's silence is no
fault: it is how tokens die, and no entry can follow from it, since a prediction
follows a trade of its token within the feed lag limit), ``rate``
(an anomalous event rate), ``execution`` (failed orders in a row; after recovery one
more failure trips it again), ``feed`` (PumpPortal refuses the feed's trade
subscriptions, as the feed says in ``feed.trade_stream``: no token trade streams, so a
live order is never confirmed and an entry is decided on creations alone).

The ``feed`` breaker recovers on the feed's word alone (the stream accepted), never by
time: the refusal lasts until someone funds the key, and the feed says so when it
changes. A manager taking trading over starts with it as last announced
(:meth:`RiskManager.announce_start`), then hears what the feed said while no replica
traded (it waited in trading's queues): the feed's word is what recovers it, so no
entry goes in meanwhile on a stream still refused. An older word than the last heard
(the replica that held the feed's connection before, saying it late) changes nothing.

A sale the market refused on slippage (an order rejected with the ``cause``
``slippage``, by paper and live execution alike) is no failure of execution and counts
neither way: it is the token moving, not the executor or the chain failing. Exits are sold
when the market turns against a position (stop loss, trailing stop, decline, the
graceful exit's sweep), on curves that move a trade or more during an order's
latency (the graduates' ~1.7 trades/s against 0.5 s, bots making 93 of the top 100
wallets), so a falling token's re-armed sale is refused several times in a row: had
that tripped the breaker, one token's dump would halt every entry for ``recovery_s``,
and the halt does nothing for the sale (no state blocks an exit). A buy refused on
slippage still counts: the breaker's halt acts on what failed (entries chasing a
market that outruns them). Nor does a refusal the service gives itself, reconciling an
order after a restart (another executor's, a sale of nothing held): the engine does not
record it (:meth:`~pumpflow.common.trading.engine.TradingEngine.process`'s ``executed``).

Each change of a breaker or of the state is a report (a
:class:`~pumpflow.common.events.CircuitBreakerChanged` or
:class:`~pumpflow.common.events.TradingStateChanged` payload) the manager keeps until
:meth:`RiskManager.take_reports`; the service publishes, logs and counts them. A manager
that takes trading over starts with every breaker clear but ``feed``: what it tells
listeners who heard its predecessor is what differs from what they last heard
(:meth:`RiskManager.announce_start`).

Entry orders reserve the most they can spend until filled or rejected
(:meth:`RiskManager.reserve`), so a burst of signals cannot pass the limits before the
first fill is booked, nor fills dearer than their orders' SOL once they are. What an
entry order can spend at most is an :class:`EntrySpend`, and the sizing, every limit
check and the reservation read it, not the order's SOL:

- paper: the order's SOL (:class:`EntrySpend`'s default). A paper buy spends its SOL
  whole and no more (:func:`~pumpflow.common.trading.fills.fill_buy` takes the API's
  and the curve's fees out of it, and the slippage limit caps the price it pays per
  token, so a dearer market buys fewer tokens, never more SOL).
- live: the order's SOL x 1.0738 + 0.0001 SOL at the defaults
  (:func:`~pumpflow.common.trading.live.live_entry_spend`): the trade API is given the
  SOL and a 5% ``slippage``, so the price may rise 5% before the trade lands (x 1.05);
  the reference does not say whether the curve's 1.25% and the API's 1% come out of
  the SOL or on top of it, so on top (x 1.0125 x 1.01); the priority fee is paid
  whatever the size (+ 0.0001 SOL); and the matcher that takes a wallet trade for an
  order whose answer never came allows 1e-9 more for the floats' rounding. That is
  7.38% over the SOL: a full 0.4 SOL entry may cost 0.4296 SOL, and five of them
  2.148 SOL where 2 SOL were checked. Sized on it, the largest entry under the 1 SOL
  per-trade cap of 10 SOL of capital is 0.9312 SOL, and the 0.4 SOL the risk per
  trade allows at a 50% stop becomes an order of 0.3724 SOL.

Once the fill is known its reservation ends and the position carries what the fill
cost (at most the reservation; less when the price fell or the fees came out of the
SOL), so what the worst case held back is free again.

A buy booked past its limit check is booked all the same, the wallet holding its
tokens: the late fill of a live order given up as unconfirmed (its reservation
released at the give-up, its room since taken by other entries, then its trade shows
after all), or a fill dearer than its reservation (which the bound above rules out,
unless the venue charges what the reference does not say). Should it leave a limit
exceeded (:meth:`RiskManager.breaches`: each limit, its value and the excess), the
engine tells the service, which counts and logs it; :meth:`RiskManager.exceeded` names
the limits exceeded until then (the service's ``/limits``). No entry is admitted while a
limit is exceeded: an exceeded limit has no room left, so every entry that would add
to the excess is refused, naming the limit (:meth:`RiskManager.check_risk_limits`),
and entries resume as the exposure falls back under it (a sale, a capital grown).

The excess is not sold. It is at most the late order's own cost per limit (the order
passed every limit when it was sent, its room only was taken since), so a late fill
puts the total exposure at most one per-trade cap (10% of capital) over its 50%, 40% of
the capital still in SOL, and a token re-entered after its order was given up at most
twice its limit. The position is sized for its dump like any other
(the risk per trade), the daily loss limit counts its loss, and the exit's rules (stop
loss, trailing stop, time and inactivity exits, the graceful exit) sell it as they sell
any position. Selling the excess at once would pay a round trip's fees (~4.5%) and the
curve's impact twice for sure, to undo a risk the limits accepted when the order was
sent; and it would be a second way to sell beside the exit's, which owns every sale.
An operator who wants it sold asks the exit for it (``pumpflow sell``,
``exit.sale_requested``).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from pumpflow.common.clock import Clock, WallClock
from pumpflow.common.curve import CurveState, buy_for_impact, frame_consistency_error
from pumpflow.common.events import (
    SLIPPAGE,
    CircuitBreakerChanged,
    Event,
    FeedTradeStream,
    RejectionCause,
    TokenCreated,
    TokenLifecycle,
    TokenMigrated,
    TokenTrade,
    TradingStateChanged,
)
from pumpflow.common.pool import is_pool
from pumpflow.common.priority import Priority
from pumpflow.common.trading.reasons import Reason
from pumpflow.common.trading.settings import BreakerSettings, RiskLimits

SECONDS_PER_DAY = 86_400.0


class TradingState(enum.StrEnum):
    ACTIVE = "active"
    REDUCING = "reducing"
    HALTED = "halted"


_SEVERITY = {TradingState.ACTIVE: 0, TradingState.REDUCING: 1, TradingState.HALTED: 2}
#: isinstance with a union made once, not at every event
_FRAMES = TokenTrade | TokenCreated
#: besides the token events, the types stamped with the time of the trade they follow
#: from (a vector, its score), so their age is the pipeline's lag behind the market
_MARKET_STAMPED = frozenset({"features.updated", "model.prediction"})
#: a token's own events, which end its silence
_TOKEN_EVENTS = TokenTrade | TokenCreated | TokenMigrated
#: the lifecycle state whose tokens the stale breaker watches for silence
ACTIVE_LIFECYCLE = "active"

CURVE = "curve"
STALE = "stale"
RATE = "rate"
EXECUTION = "execution"
FEED = "feed"
BREAKERS = (CURVE, STALE, RATE, EXECUTION, FEED)

Report = TradingStateChanged | CircuitBreakerChanged

#: the limits :meth:`RiskManager.breaches` names: the per-trade cap (a fill's cost), a
#: token's exposure, the total exposure, the positions held or entered
PER_TRADE = "per_trade"
TOKEN_EXPOSURE = "token_exposure"
TOTAL_EXPOSURE = "total_exposure"
POSITIONS = "positions"
LIMITS = (PER_TRADE, TOKEN_EXPOSURE, TOTAL_EXPOSURE, POSITIONS)
_MEASURES = {
    PER_TRADE: "the fill's cost",
    TOKEN_EXPOSURE: "the token's exposure",
    TOTAL_EXPOSURE: "the total exposure",
}
#: relative tolerance of the limits, for the floats' rounding
_TOLERANCE = 1e-12


def exceeds(value: float, limit: float) -> bool:
    """Whether ``value`` is over ``limit``, the floats' rounding allowed."""
    return value > limit * (1 + _TOLERANCE)


class Exposures(Protocol):
    """What the risk manager reads of the position book."""

    def exposure(self, mint: str) -> float: ...

    @property
    def total_exposure(self) -> float: ...

    def holds(self, mint: str) -> bool: ...

    @property
    def open_count(self) -> int: ...

    def realized_since(self, since: float) -> float: ...

    @property
    def mints_held(self) -> Collection[str]: ...


class Holdings:
    """Positions known by their cost alone, by token (none by default; a ledger's read):
    no realised PnL."""

    def __init__(self, costs: Mapping[str, float] | None = None):
        self._costs = dict(costs or {})

    def exposure(self, mint: str) -> float:
        return self._costs.get(mint, 0.0)

    @property
    def total_exposure(self) -> float:
        return sum(self._costs.values(), 0.0)

    def holds(self, mint: str) -> bool:
        return mint in self._costs

    @property
    def open_count(self) -> int:
        return len(self._costs)

    def realized_since(self, since: float) -> float:
        return 0.0

    @property
    def mints_held(self) -> Collection[str]:
        return self._costs.keys()


@dataclass(frozen=True, slots=True)
class EntrySpend:
    """The most an entry order of ``size`` SOL can take from the wallet: ``size x factor
    + fixed_sol`` (the module docstring argues paper's and live's)."""

    #: what the SOL of the order may grow to (slippage, fees on top)
    factor: float = 1.0
    #: what each order pays whatever its size (live: the priority fee)
    fixed_sol: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.factor) and self.factor >= 1.0):
            raise ValueError(f"an entry spends its SOL at least: factor {self.factor} < 1")
        if not (math.isfinite(self.fixed_sol) and self.fixed_sol >= 0.0):
            raise ValueError(f"fixed_sol must be a finite number >= 0, got {self.fixed_sol}")

    def most(self, size: float, *, orders: int = 1) -> float:
        """The most ``orders`` entry orders of ``size`` SOL in all can spend."""
        return size * self.factor + self.fixed_sol * orders

    def size_for(self, spend: float) -> float:
        """The largest order that can spend at most ``spend`` SOL (0 when none can)."""
        return max(0.0, (spend - self.fixed_sol) / self.factor)


@dataclass(frozen=True, slots=True)
class RiskCheck:
    """Whether an entry may go ahead; false with the first limit it breaks."""

    allowed: bool
    reason: Reason | None = None

    def __bool__(self) -> bool:
        return self.allowed


_ALLOWED = RiskCheck(True)


@dataclass(frozen=True, slots=True)
class LimitBreach:
    """A limit exceeded (one of :data:`LIMITS`): what it measures now, and the limit; a
    token's exposure names its token (``mint``)."""

    limit: str
    value: float
    cap: float
    mint: str | None = None

    @property
    def excess(self) -> float:
        return self.value - self.cap

    def __str__(self) -> str:
        if self.limit == POSITIONS:
            return (
                f"{self.value:g} positions held or entered, over their limit {self.cap:g} "
                f"by {self.excess:g}"
            )
        measure = f"the exposure of {self.mint}" if self.mint else _MEASURES[self.limit]
        return (
            f"{measure} {self.value:.4f} SOL over its limit {self.cap:.4f} SOL "
            f"by {self.excess:.4f} SOL"
        )


def limit_breaches(
    limits: RiskLimits,
    capital: float,
    *,
    token_exposures: Mapping[str, float],
    total_exposure: float,
    positions: int,
    spent: float | None = None,
) -> list[LimitBreach]:
    """The limits ``limits`` of ``capital`` that these measures exceed: a fill's cost
    ``spent`` against the per-trade cap (when given), each token's exposure, the total
    exposure, the positions held or entered."""
    measured = [(PER_TRADE, None, spent, capital * limits.max_position_fraction)]
    token_cap = capital * limits.max_token_exposure_fraction
    measured += [(TOKEN_EXPOSURE, mint, sol, token_cap) for mint, sol in token_exposures.items()]
    measured += [
        (TOTAL_EXPOSURE, None, total_exposure, capital * limits.max_total_exposure_fraction),
        (POSITIONS, None, float(positions), float(limits.max_concurrent_positions)),
    ]
    return [
        LimitBreach(name, value, cap, mint)
        for name, mint, value, cap in measured
        if value is not None and exceeds(value, cap)
    ]


class CircuitBreaker:
    """One breaker: trips on a fault, recovers after ``recovery_s`` without one (never by
    time when infinite: :meth:`clear` recovers it)."""

    def __init__(self, name: str, recovery_s: float):
        self.name = name
        self.recovery_s = recovery_s
        self.tripped = False
        self.reason = ""
        self.last_fault: float | None = None

    def fault(self, now: float, reason: str) -> CircuitBreakerChanged | None:
        self.last_fault = now
        if self.tripped:
            return None
        self.tripped = True
        self.reason = reason
        return CircuitBreakerChanged(breaker=self.name, tripped=True, reason=reason)

    def check(self, now: float) -> CircuitBreakerChanged | None:
        if not self.tripped or self.last_fault is None:
            return None
        quiet = now - self.last_fault
        if quiet < self.recovery_s:
            return None
        self.tripped = False
        self.reason = ""
        return CircuitBreakerChanged(
            breaker=self.name, tripped=False, reason=f"no fault for {quiet:.0f}s"
        )

    def clear(self, reason: str) -> CircuitBreakerChanged | None:
        """Recover now, for ``reason`` (None: not tripped)."""
        if not self.tripped:
            return None
        self.tripped = False
        self.reason = ""
        return CircuitBreakerChanged(breaker=self.name, tripped=False, reason=reason)


class RiskManager:
    """Sizes entries, holds the limits, the trading state and the circuit breakers.

    ``capital`` is the SOL the limits are fractions of (the service keeps it current
    with :meth:`update_capital`: the account's SOL, on paper the starting capital plus
    realised PnL); ``max_risk_per_trade`` and ``max_concurrent_positions`` override
    ``limits``. ``positions`` is the position book (read only); ``entry_spend`` what an
    entry order can spend at most (default: its SOL, as on paper); the clock stamps
    breakers and the trading day (UTC).
    """

    def __init__(
        self,
        capital: float,
        max_risk_per_trade: float,
        max_concurrent_positions: int,
        *,
        limits: RiskLimits | None = None,
        breakers: BreakerSettings | None = None,
        positions: Exposures | None = None,
        entry_spend: EntrySpend | None = None,
        clock: Clock | None = None,
    ):
        self.limits = replace(
            limits or RiskLimits(),
            max_risk_per_trade=max_risk_per_trade,
            max_concurrent_positions=max_concurrent_positions,
        )
        self.breaker_settings = breakers or BreakerSettings()
        self.positions: Exposures = positions if positions is not None else Holdings()
        self.entry_spend = entry_spend or EntrySpend()
        self.clock = clock or WallClock()
        self.capital = 0.0
        self.update_capital(capital)
        recovery = {
            STALE: self.breaker_settings.stale_recovery_s,
            # the feed's word recovers it, no time
            FEED: math.inf,
        }
        self.breakers = {
            name: CircuitBreaker(name, recovery.get(name, self.breaker_settings.recovery_s))
            for name in BREAKERS
        }
        #: event time of the feed's last word on its trade stream
        self.feed_heard_at: float | None = None
        #: order id -> (mint, the most it can spend) of entries sent and not yet filled
        #: or rejected
        self.reservations: dict[str, tuple[str, float]] = {}
        self.operator_state = TradingState.ACTIVE
        self.operator_reason = ""
        self.daily_loss_hit = False
        self.state = TradingState.ACTIVE
        self.consecutive_failures = 0
        self.last_event_time: float | None = None
        #: mint -> when its last event was observed, of the tokens whose lifecycle is
        #: active now (the stale breaker's watch on their silence)
        self.active_tokens: dict[str, float] = {}
        self._event_seconds: deque[list[float]] = deque()
        self._events_in_window = 0
        self._reports: list[Report] = []

    # ---------------------------------------------------------------- the interface

    def calculate_position_size(
        self,
        token_id: str,
        entry_price: float,
        stop_loss: float,
        *,
        confidence: float = 1.0,
        priority: int = Priority.URGENT,
        curve: CurveState | None = None,
    ) -> float:
        """SOL of an entry order of ``token_id`` (the order's amount); 0 when none fits.

        At most, the order spends (:attr:`entry_spend`) ``max_risk_per_trade`` of capital
        down to ``stop_loss``, capped at ``max_position_fraction``, scaled by
        ``confidence`` (0..1) and the lifecycle ``priority``, within the token's and the
        total exposure left; its price impact on ``curve`` stays under the limit.
        """
        lim = self.limits
        if not (entry_price > 0 and 0 <= stop_loss < entry_price) or self.capital <= 0:
            return 0.0
        stop_distance = (entry_price - stop_loss) / entry_price
        spend = min(
            self.capital * lim.max_risk_per_trade / stop_distance,
            self.capital * lim.max_position_fraction,
        )
        confidence = min(max(confidence, 0.0), 1.0)
        spend *= lim.min_confidence_scale + (1.0 - lim.min_confidence_scale) * confidence
        spend *= lim.priority_scale[min(max(int(priority), 0), len(lim.priority_scale) - 1)]
        spend = min(spend, self._token_room(token_id), self._total_room())
        size = self.entry_spend.size_for(spend)
        if curve is not None:
            size = min(size, buy_for_impact(curve, lim.max_entry_price_impact))
        return size if size >= lim.min_order_sol else 0.0

    def check_risk_limits(self, token_id: str, position_size: float) -> RiskCheck:
        """Whether an entry order of ``position_size`` SOL into ``token_id`` may go ahead
        now: the most it can spend (:attr:`entry_spend`) within every limit."""
        lim = self.limits
        if self.state is not TradingState.ACTIVE:
            return RiskCheck(False, self.state_refusal())
        spend = self.entry_spend.most(position_size)
        if exceeds(spend, self.capital * lim.max_position_fraction):
            return RiskCheck(
                False,
                Reason.observed(
                    "size {} SOL over the per-trade limit (at the most it spends)",
                    f"{position_size:.4f}",
                ),
            )
        new_token = not self._holds_or_reserved(token_id)
        if not new_token and not lim.add_to_positions:
            return RiskCheck(
                False, Reason.fixed("held already (or an entry is in flight): one entry a token")
            )
        if new_token and lim.reentry_cooldown_s > 0.0:
            closed = self.positions.last_closed_at(token_id)
            if closed is not None and (ago := self.clock.now() - closed) < lim.reentry_cooldown_s:
                return RiskCheck(
                    False,
                    Reason.observed(
                        "closed {}s ago, in the re-entry cooldown of {cooldown:.0f}s",
                        f"{ago:.0f}",
                        cooldown=lim.reentry_cooldown_s,
                    ),
                )
        if new_token and self.open_positions() >= lim.max_concurrent_positions:
            return RiskCheck(
                False, Reason.fixed(f"{lim.max_concurrent_positions} positions already open")
            )
        # a minimum order at least: a limit with no room left (exceeded, say, by a late
        # fill) is named, not the size under the minimum the sizing left
        least = self.entry_spend.most(max(position_size, lim.min_order_sol))
        if exceeds(least, self._token_room(token_id)):
            return RiskCheck(False, Reason.fixed("over the token's exposure limit"))
        if exceeds(least, self._total_room()):
            return RiskCheck(False, Reason.fixed("over the total exposure limit"))
        if not position_size >= lim.min_order_sol:
            return RiskCheck(
                False,
                Reason.observed(
                    "size {} SOL under {least}", f"{position_size:.4f}", least=lim.min_order_sol
                ),
            )
        return _ALLOWED

    def breaches(self, token_id: str, *, spent: float | None = None) -> list[LimitBreach]:
        """The limits exceeded now, by the book and the entries in flight, where a buy of
        ``token_id`` costing ``spent`` SOL was booked (past its limit check: a late
        fill): its cost against the per-trade cap, the token's and the total exposure,
        the positions held or entered. None is exceeded after a checked entry."""
        return limit_breaches(
            self.limits,
            self.capital,
            token_exposures={token_id: self.exposure(token_id)},
            total_exposure=self.total_exposure,
            positions=self.open_positions(),
            spent=spent,
        )

    def exceeded(self) -> list[LimitBreach]:
        """The limits the book and the entries in flight exceed now (left so by a buy
        booked past its limit check): each token's exposure, the total exposure, the
        positions held or entered. A fill's cost against the per-trade cap is told as
        the fill is booked (:meth:`breaches`), and measures nothing after it."""
        engaged = {*self.positions.mints_held, *(m for m, _ in self.reservations.values())}
        return limit_breaches(
            self.limits,
            self.capital,
            token_exposures={mint: self.exposure(mint) for mint in sorted(engaged)},
            total_exposure=self.total_exposure,
            positions=self.open_positions(),
        )

    def set_limits(self, limits: RiskLimits) -> None:
        """Decide by ``limits`` from the next check on (an operator's change): nothing held
        is sold, and an exposure over a limit lowered shows in :meth:`exceeded` and
        refuses the entries that would add to it, as a late fill's does."""
        self.limits = limits

    def update_capital(self, new_capital: float) -> None:
        """Set the capital the limits are fractions of (the account's SOL, marked)."""
        if not math.isfinite(new_capital) or new_capital < 0:
            raise ValueError(f"capital must be a finite number >= 0, got {new_capital}")
        self.capital = float(new_capital)

    # ---------------------------------------------------------------- reservations

    def reserve(self, order_id: str, token_id: str, size: float) -> None:
        """Count an entry order of ``size`` SOL sent against the limits, at the most it can
        spend, until it is filled or rejected."""
        self.reservations[order_id] = (token_id, self.entry_spend.most(size))

    def release(self, order_id: str) -> float | None:
        """The entry order was filled (the book holds what it cost now) or rejected: the
        SOL it reserved, None when it reserved none (given up already, or not an entry)."""
        reserved = self.reservations.pop(order_id, None)
        return None if reserved is None else reserved[1]

    def exposure(self, token_id: str) -> float:
        reserved = sum(s for m, s in self.reservations.values() if m == token_id)
        return self.positions.exposure(token_id) + reserved

    @property
    def total_exposure(self) -> float:
        return self.positions.total_exposure + sum((s for _, s in self.reservations.values()), 0.0)

    def open_positions(self) -> int:
        """Tokens held or with an entry in flight."""
        reserved = {m for m, _ in self.reservations.values()}
        held = {m for m in reserved if self.positions.holds(m)}
        return self.positions.open_count + len(reserved - held)

    # ---------------------------------------------------------------- trading state

    @property
    def entries_allowed(self) -> bool:
        return self.state is TradingState.ACTIVE

    def kill(self, reason: str = "kill switch") -> list[Report]:
        """Halt entries at once (the kill switch)."""
        return self.set_state(TradingState.HALTED, reason)

    def set_state(self, state: TradingState | str, reason: str) -> list[Report]:
        """The operator's state: ``active`` resumes (breakers and loss limit still apply)."""
        mark = len(self._reports)
        self.operator_state = TradingState(state)
        self.operator_reason = reason
        self._settle(reason)
        return self._reports[mark:]

    def resume(self, reason: str = "resumed") -> list[Report]:
        return self.set_state(TradingState.ACTIVE, reason)

    def state_reason(self) -> str:
        return self.state_cause().text

    def state_cause(self) -> Reason:
        """Why trading is in its state: the operator's word, the breakers tripped (of
        kind their names: a fault's text says values and tokens), the daily loss limit."""
        if self.operator_state is self.state and self.operator_state is not TradingState.ACTIVE:
            return Reason.fixed(self.operator_reason)
        tripped = [b for b in self.breakers.values() if b.tripped]
        if tripped:
            return Reason(
                "; ".join(f"{b.name}: {b.reason}" for b in tripped),
                "; ".join(f"{b.name} breaker" for b in tripped),
            )
        if self.daily_loss_hit:
            return Reason.fixed("daily loss limit")
        return Reason.fixed(self.operator_reason)

    def state_refusal(self) -> Reason:
        """Why an entry is refused in the state trading is in (other than active)."""
        cause = self.state_cause()
        said = f"trading is {self.state}: "
        return Reason(said + cause.text, said + cause.kind)

    # ---------------------------------------------------------------- breakers

    def observe(self, event: Event, *, now: float | None = None) -> list[Report]:
        """Feed the breakers a consumed event (token events are checked against the curve)."""
        now = self.clock.now() if now is None else now
        mark = len(self._reports)
        data = event.data
        if type(data) is FeedTradeStream:
            # the feed's word, not the market's: it ends no silence and counts toward no rate
            self.follow_feed(data, source=event.source, said_at=event.time)
            self._check(now)
            return self._reports[mark:]
        self.last_event_time = now
        if isinstance(data, _FRAMES) and not is_pool(data.pool):
            self._check_frame(data, now)
        if isinstance(data, _TOKEN_EVENTS):
            if data.mint in self.active_tokens:
                self.active_tokens[data.mint] = now
        elif isinstance(data, TokenLifecycle):
            self.follow_lifecycle(data, now=now)
        lagging = False
        if event.type.startswith("token.") or event.type in _MARKET_STAMPED:
            lag = now - event.time
            lagging = lag > self.breaker_settings.max_feed_lag_s
            if lagging:
                self._fault(STALE, now, f"feed lag {lag:.1f}s ({event.type})")
        self._count_event(now, add=not lagging)
        rate = self._rate()
        if rate > self.breaker_settings.max_events_per_s:
            self._fault(RATE, now, f"{rate:.0f} events/s")
        # the window counted just now, and no silence: the event is ``now``'s
        self._check(now, counted=True)
        return self._reports[mark:]

    def follow_feed(self, stream: FeedTradeStream, *, source: str, said_at: float) -> None:
        """Trip the feed breaker while PumpPortal refuses the trade subscriptions of the
        feed (``source``, the replica holding the connection), recover it once they are
        accepted; a word said before the last one heard changes nothing."""
        if self.feed_heard_at is not None and said_at < self.feed_heard_at:
            return
        self.feed_heard_at = said_at
        whose = f"the trade subscriptions of {source}: {stream.reason}"
        if stream.refused:
            self._fault(FEED, said_at, f"PumpPortal refuses {whose}")
            return
        change = self.breakers[FEED].clear(f"PumpPortal accepts {whose}")
        if change is not None:
            self._reports.append(change)
            self._settle(f"{FEED} breaker recovered")

    def follow_lifecycle(self, lifecycle: TokenLifecycle, *, now: float) -> None:
        """Watch the token for silence from ``now`` while ``lifecycle`` is active (a token
        watched already keeps the time of its last event), no longer once it is not."""
        if lifecycle.state == ACTIVE_LIFECYCLE:
            self.active_tokens.setdefault(lifecycle.mint, now)
        else:
            self.active_tokens.pop(lifecycle.mint, None)

    def observe_frame(
        self, v_sol: float, v_tokens: float, market_cap_sol: float, *, now: float | None = None
    ) -> list[Report]:
        """Check one frame's curve fields against the curve maths."""
        now = self.clock.now() if now is None else now
        mark = len(self._reports)
        error = frame_consistency_error(v_sol, v_tokens, market_cap_sol)
        if error > self.breaker_settings.max_curve_error:
            self._fault(CURVE, now, f"frame off the curve maths by {error:.3g}")
        self.check(now)
        return self._reports[mark:]

    def record_execution(
        self,
        ok: bool,
        *,
        reason: str = "",
        side: str | None = None,
        cause: RejectionCause | None = None,
        now: float | None = None,
    ) -> list[Report]:
        """An order's outcome: a failure counts toward the execution breaker, but for a
        sale the market refused on slippage (``cause``; see the module)."""
        now = self.clock.now() if now is None else now
        mark = len(self._reports)
        if ok:
            self.consecutive_failures = 0
        elif side == "sell" and cause == SLIPPAGE:
            pass
        else:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.breaker_settings.max_consecutive_failures:
                what = f"{self.consecutive_failures} failed orders in a row"
                self._fault(EXECUTION, now, f"{what}, last: {reason}")
        self.check(now)
        return self._reports[mark:]

    def check(self, now: float | None = None) -> list[Report]:
        """Time-driven checks: silence, recoveries, the daily loss limit (from a timer too)."""
        now = self.clock.now() if now is None else now
        mark = len(self._reports)
        self._check(now)
        return self._reports[mark:]

    def _check(self, now: float, *, counted: bool = False) -> None:
        """:meth:`check`'s work; ``counted``: an event of ``now`` was just observed (its
        window moved on to ``now`` and no silence is possible)."""
        if not counted:
            self._count_event(now, add=False)
            if self.last_event_time is not None:
                silence = now - self.last_event_time
                if silence > self.breaker_settings.max_silence_s:
                    self._fault(STALE, now, f"no event for {silence:.0f}s")
            self._check_active_tokens(now)
        recovered = []
        #: a breaker still tripped after the checks (the settled state's halt, found here
        #: rather than by a second pass over the breakers on every event)
        halted = False
        for name, breaker in self.breakers.items():
            if not breaker.tripped:
                continue  # nothing to recover from (every event checks)
            if name == RATE and self._rate() > self.breaker_settings.max_events_per_s:
                halted = True
                continue
            change = breaker.check(now)
            if change is None:
                halted = True
                continue
            if name == EXECUTION:
                # half open: the next failure trips it again
                self.consecutive_failures = self.breaker_settings.max_consecutive_failures - 1
            self._reports.append(change)
            recovered.append(name)
        day_start = math.floor(now / SECONDS_PER_DAY) * SECONDS_PER_DAY
        loss = -self.positions.realized_since(day_start)
        limit = self.capital * self.limits.max_daily_loss_fraction
        self.daily_loss_hit = limit > 0 and loss >= limit
        if self._settled_state(halted) is self.state:
            return  # every event checks: the reason only for a change
        if self.daily_loss_hit:
            reason = f"daily loss {loss:.4f} SOL reached the limit {limit:.4f} SOL"
        elif recovered:
            reason = f"{', '.join(recovered)} breaker recovered"
        else:
            reason = "daily loss limit reset"
        self._settle(reason)

    def _check_active_tokens(self, now: float) -> None:
        """Trip the stale breaker when most active tokens have gone silent at once (their
        trade subscriptions lost while the rest of the stream flows; see the module)."""
        settings = self.breaker_settings
        active = len(self.active_tokens)
        if active < settings.min_active_tokens:
            return
        since = now - settings.max_token_silence_s
        silent = sum(1 for seen in self.active_tokens.values() if seen < since)
        if silent >= settings.silent_tokens_share * active:
            what = f"{silent} of {active} active tokens"
            self._fault(STALE, now, f"{what} silent for over {settings.max_token_silence_s:.0f}s")

    def take_reports(self) -> list[Report]:
        """Every state and breaker change since the last call, oldest first."""
        reports, self._reports = self._reports, []
        return reports

    def announce_start(
        self, state: TradingState | str | None, tripped: Collection[str], why: str
    ) -> list[Report]:
        """What tells listeners who last heard the state ``state`` (None: none, which is
        active, as every manager starts) and the breakers ``tripped`` what holds as this
        manager starts trading (another's heir): each breaker whose trip differs, then the
        state in force if it differs, their reasons ``why`` and what holds; nothing where
        nothing differs.

        The feed breaker, heard tripped, trips here first (as last announced, without a
        report): only the feed's word recovers it."""
        feed = self.breakers[FEED]
        if FEED in tripped and not feed.tripped:
            mark = len(self._reports)
            self._fault(
                FEED,
                self.clock.now(),
                f"{why}: as last announced, until the feed announces its trade stream",
            )
            # the listeners heard the trip: nothing of it is theirs to hear again
            del self._reports[mark:]
        reports: list[Report] = []
        for name, breaker in self.breakers.items():
            if breaker.tripped != (name in tripped):
                holds = f"starts tripped: {breaker.reason}" if breaker.tripped else "starts clear"
                reports.append(
                    CircuitBreakerChanged(
                        breaker=name, tripped=breaker.tripped, reason=f"{why}: {holds}"
                    )
                )
        # a breaker heard tripped that this version does not have holds nothing back
        for name in sorted(set(tripped) - self.breakers.keys()):
            reports.append(
                CircuitBreakerChanged(breaker=name, tripped=False, reason=f"{why}: no such breaker")
            )
        heard = TradingState.ACTIVE if state is None else TradingState(state)
        if heard is not self.state:
            holds = f"starts {self.state}"
            if self.state is not TradingState.ACTIVE:
                holds += f": {self.state_reason()}"
            reports.append(
                TradingStateChanged(
                    state=self.state.value, previous_state=heard.value, reason=f"{why}: {holds}"
                )
            )
        return reports

    # ---------------------------------------------------------------- internals

    def _holds_or_reserved(self, token_id: str) -> bool:
        return self.positions.holds(token_id) or any(
            m == token_id for m, _ in self.reservations.values()
        )

    def _token_room(self, token_id: str) -> float:
        cap = self.capital * self.limits.max_token_exposure_fraction
        return max(0.0, cap - self.exposure(token_id))

    def _total_room(self) -> float:
        cap = self.capital * self.limits.max_total_exposure_fraction
        return max(0.0, cap - self.total_exposure)

    def _check_frame(self, data: TokenTrade | TokenCreated, now: float) -> None:
        error = frame_consistency_error(
            data.vSolInBondingCurve, data.vTokensInBondingCurve, data.marketCapSol
        )
        if error > self.breaker_settings.max_curve_error:
            self._fault(CURVE, now, f"{data.mint} frame off the curve maths by {error:.3g}")

    def _fault(self, name: str, now: float, reason: str) -> None:
        change = self.breakers[name].fault(now, reason)
        if change is not None:
            self._reports.append(change)
            self._settle(f"{name} breaker: {reason}")

    def _rate(self) -> float:
        return self._events_in_window / self.breaker_settings.rate_window_s

    def _count_event(self, now: float, *, add: bool = True) -> None:
        buckets = self._event_seconds
        second = math.floor(now)
        if add:
            if buckets and buckets[-1][0] == second:
                buckets[-1][1] += 1
            else:
                buckets.append([second, 1])
            self._events_in_window += 1
        # a second reaching past the window goes whole (kept, the window would count up
        # to a second more than rate_window_s and trip on a steady rate under the limit),
        # the current one aside: a second is the finest count there is
        horizon = min(now - self.breaker_settings.rate_window_s, second)
        while buckets and buckets[0][0] < horizon:
            self._events_in_window -= int(buckets.popleft()[1])

    def _settled_state(self, halted: bool | None = None) -> TradingState:
        """The state the operator's, the daily loss limit and the breakers call for
        (``halted``: whether a breaker is tripped, when the caller knows)."""
        state = self.operator_state
        if self.daily_loss_hit and _SEVERITY[TradingState.REDUCING] > _SEVERITY[state]:
            state = TradingState.REDUCING
        if halted is None:
            halted = any(b.tripped for b in self.breakers.values())
        if halted:
            state = TradingState.HALTED
        return state

    def _settle(self, reason: str) -> None:
        state = self._settled_state()
        if state is self.state:
            return
        change = TradingStateChanged(
            state=state.value, previous_state=self.state.value, reason=reason
        )
        self.state = state
        self._reports.append(change)
