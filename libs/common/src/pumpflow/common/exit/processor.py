"""The exit rules of each position as a keyed processor: one state per mint.

Why per mint: everything a position's rules read (the position, its token's marks,
lifecycle and migration, its sales' outcomes) is keyed by the token's mint, so the
library's keyed consumer runs them in per-mint order, stores the rules' state with
the tracking record (a restart or a partition move resumes them, fired rules and
all), runs the rules' timers (time stops, silence) on the partition's owner only, in
the market's time as far as exit has applied the tokens' trades (``Effects.now``, see
:mod:`pumpflow.common.consumer.keyed`: behind a backlog no position is sold for a
silence its queued trades break), and publishes each ``exit.order`` from the key's
outbox once the state that decided it is stored: a redelivered event never orders the
same sale twice, and a replay on a ReplayClock takes the same exits as the live run.

Consumes :data:`CONSUMES`; emits ``exit.order`` (critical lane) for each rule's
decision with the order id ``<position_id>:rule:<n>`` (n counted per position). A
graceful exit (the service's, across positions) takes over with :attr:`halted`: the
rules then decide nothing, and the service reads the positions held from here.

Entries in flight: trading's buy ``order.requested`` is held per mint
(:attr:`ExitState.entries`) until the order is refused, or fills and the position it
opened (or added to) is here: a graceful exit waits for what such an entry opens.
What has ended here (entries refused or landed, positions closed) is remembered per
mint (:attr:`ExitState.ended`): trading's shutdown barrier lists what it had in flight
and held, and the graceful exit waits until this consumer has seen each of them. A
token retired with ids ended hands them out in :attr:`ExitProcessor.retired_ended`;
the service stores them before the retirement is written, so an entry that ended and
whose token retired before the barrier came is seen all the same, after a restart too.

Retirement: exit sees every token's trades, so each token is a key here. A token retired
by activity (``token.lifecycle`` to ``inactive`` or ``graduated``) with nothing in play
here (no position, no entry in flight, no rule's sale unsettled, no graceful exit under
way) leaves memory and the partition's index; its record stays ``retire_ttl_s`` (so
does one an operator's request for a token never heard of made). A late
event of it (a trade on its pool after the migration) loads it and lets it go again; a
position, an entry or a lifecycle state past the retirement keeps it.

Fills: the position's tokens follow trading's position events and the exit's own
sales' fills. A rule's sale that fills short of its order gives the rest back to its
rule (the rules then look again at once, as after a first refusal), so what the rules
have left plus their sales under way is what is held: more held than that is an entry
added (tokens bought), less is tokens sold by other means (a graceful exit's tranches,
a hand sale), which the rules no longer sell. The mark is the spot price of the
token's market after each trade: its curve's as its frame reports it, once migrated
its PumpSwap pool's, followed from :data:`~pumpflow.common.curve.MIGRATION_POOL` as
paper trading follows it (:mod:`pumpflow.common.pool`; a pool trade's frame reports no
reserves), not the trade's average price. The pool moves by the trades on it and by
the orders filled on it that the stream does not report: a paper sale, the exit's or
another, moves the pool trading fills the next sale on, and what is held is marked at
the spot after it; a live sale's trade shows in the stream (its fill names its
signature) and moves the pool once, as that trade. A migration its first pool trade
tells (its frame lost, or late) is decided at the pool's spot after that trade.

Outcomes come after the trades they settled on, so a sale given back (refused, or
filled short) is judged at a mark at least as new as the market it settled on, with no
wait and no mark taken from the outcome (a fill's price is an average, not a spot):
trading settles a sale on the token's trades it applied (a paper sale on the market
before the trade that shows its latency passed, or at its tick; a live one once the
stream shows its trade) and publishes the outcome after them, and its order and
position events are no critical types, so the outcome waits in the token's partition
queue behind those trades, however long the backlog there. On the critical lane it
would overtake them, and a ladder's step given back would be ordered again at once at
the mark before a dump the queued trades show.

Operators' sales: an ``exit.sale_requested`` (the service's ``POST
/positions/{mint}/sell``) is decided by the rules' evaluator as one more rule,
:data:`~pumpflow.common.exit.rules.REQUESTED`: a share of what the rules have not
ordered sold, its ``exit.order`` numbered and stored as theirs, a refused one given
back to them. Nothing is sold without a position (of the id asked, if one is), nor
while a graceful exit sells every position. A request has no seq (any replica's API
publishes it), so the state keeps the ids of the latest requests and a copy sells
nothing.

Hooks (the service's, called as events apply; they must not change the state):
``on_market`` (the curve as each frame reports it, or the pool as it moves here, which
counts the exit's own sales) and ``on_lifecycle`` feed the graceful exit's plan, and
``on_closed`` tells it that trading closed a position (by its last sale, the exit's or
another's), and when (a close applied late may be from before the graceful exit began);
``on_outcome`` is told each exit order's fill or refusal with the sale it settles and
the tokens the position's rule sales hold back after it;
``on_request`` each operator's request, with the sale it ordered or why none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import msgspec

from pumpflow.common.clock import Clock
from pumpflow.common.curve import MIGRATION_POOL, CurveState, state_from_frame
from pumpflow.common.events import (
    Event,
    ExitOrder,
    LifecycleState,
    OrderFilled,
    OrderRejected,
    OrderRequested,
    PositionClosed,
    PositionOpened,
    PositionUpdated,
    SaleRequested,
    TokenLifecycle,
    TokenMigrated,
    TokenTrade,
)
from pumpflow.common.exit.rules import (
    REQUESTED,
    ExitDecision,
    ExitEvaluator,
    ExitRules,
    RuleWatch,
)
from pumpflow.common.keyed import UNCHANGED, Effects, StaleState, Unchanged
from pumpflow.common.pool import is_pool, pool_moved_by_fill, pool_moved_by_trade
from pumpflow.common.priority import Priority

#: what the exit service consumes, all keyed by mint and none critical: each on its
#: token's partition lane, in the order published (``system.shutdown`` comes apart)
CONSUMES = (
    "position.opened",
    "position.updated",
    "position.closed",
    "token.trade",
    "token.migrated",
    "token.lifecycle",
    "order.requested",
    "order.filled",
    "order.rejected",
    "exit.sale_requested",
)
#: the types whose time is the tokens' market (the keyed consumer's ``market_types``):
#: the feed's; trading's events carry its clock, and its state changes and the shutdown
#: come on the critical lane, overtaking a backlog
MARKET_TYPES = ("token.trade", "token.migrated")

#: publishers of which only some keyed events are consumed: of the feed's per-mint seqs
#: exit takes the trades and the migration, not the creation (seq 1), so they skip by
#: design; a trade that never came is superseded by the next one's market anyway
PARTIAL_PUBLISHERS = ("feed",)

#: the exit service's keyless commands, on a consumer group of their own: the shutdown,
#: and trading's answer to it (what it had in flight and held when it halted entries)
CONTROL_CONSUMES = ("system.shutdown", "trading.barrier")

#: ids a mint remembers of each kind (its latest ended, closed and requested ones): a
#: mint sees a handful of entries, positions and operators' requests
_KEPT_IDS = 32
#: how often a held position's rules look again while a graceful exit halts them
_HALTED_CHECK_S = 5.0
#: lifecycle states that retire a token here once nothing of it is in play
RETIRING = ("inactive", "graduated")


def _only_requested(state: ExitState) -> bool:
    """Whether operators' requests are all ``state`` holds of its token (its market, if
    it trades, is held apart: :attr:`ExitProcessor._unheld`)."""
    return (
        state.position is None
        and state.lifecycle is None
        and state.v_sol is None
        and not state.migrated
        and not state.entries
        and not state.ended
        and not state.rule_orders
        and state.watch is None
    )


def rule_order_id(position_id: str, number: int) -> str:
    return f"{position_id}:rule:{number}"


def is_exit_order(order_id: str) -> bool:
    """An order of the exit service: a rule's sale or a graceful exit's tranche."""
    return ":rule:" in order_id or ":exit:" in order_id


class HeldState(msgspec.Struct, kw_only=True):
    """A position as its trading events tell it."""

    position_id: str
    opened_at: float
    tokens: float
    entry_price: float
    cost_sol: float = 0.0
    #: the exit orders whose fills ``tokens`` has counted: the consumer drops a copy of a
    #: fill by its seq, but one published before trading numbered its events has none,
    #: and a fill delivered again must not sell the position down twice
    sold: list[str] = []
    #: trading's seq of the latest of its events ``tokens`` counts (a position event or
    #: a sale's fill): one of an earlier seq, applied late (overtaken), is counted in it
    seq: int = 0


class PendingSale(msgspec.Struct, kw_only=True):
    """A rule's sale ordered and not settled yet."""

    rule: str
    token_amount: float
    reason: str
    decided_at: float
    mark_price: float | None = None


class ExitState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Everything the exit holds of one mint."""

    mint: str
    position: HeldState | None = None
    watch: RuleWatch | None = None
    #: the curve as the token's last curve frame reported it (not read once on its pool)
    v_sol: float | None = None
    v_tokens: float | None = None
    #: the price the rules mark the position at: the curve's spot, or the pool's
    mark_price: float | None = None
    migrated: bool = False
    #: the token's AMM pool as its trades there and the paper sales filled on it moved it
    #: from :data:`~pumpflow.common.curve.MIGRATION_POOL` (None before the first)
    pool_v_sol: float | None = None
    pool_v_tokens: float | None = None
    #: the orders filled on the pool that moved it here (the latest): a copy of a fill
    #: without a seq must not move it again
    pool_fills: list[str] = []
    lifecycle: LifecycleState | None = None
    activity_level: float = 0.0
    #: rule orders numbered so far (of this mint's positions)
    rule_orders: int = 0
    pending: dict[str, PendingSale] = {}
    #: trading's entry orders in flight: order id -> filled (its position not here yet)
    entries: dict[str, bool] = {}
    #: entry order ids refused or landed as positions, position ids closed (the latest)
    ended: list[str] = []
    #: position ids closed (the latest): an entry's id that ended may yet open one (a
    #: refused entry's late fill), a closed position's never again
    closed: list[str] = []
    #: ids of the operators' sale requests applied (the latest): a request carries no
    #: seq, so the consumer cannot tell its copy
    requests: list[str] = []

    @property
    def curve(self) -> CurveState | None:
        if self.v_sol is None or self.v_tokens is None or self.migrated:
            return None
        return CurveState(v_sol=self.v_sol, v_tokens=self.v_tokens)

    @property
    def pool(self) -> CurveState | None:
        if self.pool_v_sol is None or self.pool_v_tokens is None:
            return None
        return CurveState(v_sol=self.pool_v_sol, v_tokens=self.pool_v_tokens)

    @pool.setter
    def pool(self, pool: CurveState | None) -> None:
        self.pool_v_sol = pool.v_sol if pool is not None else None
        self.pool_v_tokens = pool.v_tokens if pool is not None else None

    @property
    def market(self) -> CurveState | None:
        """Where the token trades, as followed here: its curve, or once it migrated its
        pool (as the migration left it until something trades on it)."""
        if self.migrated:
            return self.pool or MIGRATION_POOL
        return self.curve

    @property
    def pending_tokens(self) -> float:
        return sum(p.token_amount for p in self.pending.values())


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldView:
    """A held position as the graceful exit reads it (:class:`~.planner.HeldPosition`)."""

    mint: str
    position_id: str
    opened_at: float
    tokens: float
    entry_price: float
    mark_price: float | None
    mark_state: CurveState | None
    #: held tokens a rule's sale under way is selling (not counted in ``tokens``)
    pending_tokens: float = 0.0
    #: ``mark_state`` counts the exit's own sales (a pool, moved by their fills)
    mark_follows_sales: bool = False


def held_view(state: ExitState) -> HeldView | None:
    """``state``'s position: ``tokens`` not already ordered sold by a rule, and
    ``pending_tokens`` that are (a refused sale gives them back)."""
    position = state.position
    if position is None or position.tokens <= 0:
        return None
    pending = min(state.pending_tokens, position.tokens)
    tokens = position.tokens - pending
    if tokens <= position.tokens * 1e-9:
        tokens = 0.0
    return HeldView(
        mint=state.mint,
        position_id=position.position_id,
        opened_at=position.opened_at,
        tokens=tokens,
        entry_price=position.entry_price,
        mark_price=state.mark_price,
        mark_state=state.market,
        pending_tokens=pending,
        mark_follows_sales=state.migrated,
    )


class _Market(NamedTuple):
    """The market of a token without a position, as its latest trade left it."""

    v_sol: float | None
    v_tokens: float | None
    pool: CurveState | None
    mark_price: float


def _overtaken(position: HeldState, seq: int | None) -> bool:
    """Whether trading's event of ``seq`` on ``position`` comes after a later one that
    counts it (the consumer applies an overtaken seq as it arrives)."""
    return seq is not None and seq < position.seq


def _remember(ids: list[str], item: str) -> None:
    """Keep ``item`` among the latest ``ids`` (the oldest go past :data:`_KEPT_IDS`)."""
    if item not in ids:
        ids.append(item)
        del ids[:-_KEPT_IDS]


#: (mint, the outcome, the rule's sale it settles, its time, the tokens the position's
#: rule sales still hold back after it: :attr:`HeldView.pending_tokens`)
OutcomeHook = Callable[[str, OrderFilled | OrderRejected, PendingSale | None, float, float], None]
#: (mint, its curve or pool, whether that counts the exit's own sales: its pool does)
MarketHook = Callable[[str, CurveState, bool], None]
LifecycleHook = Callable[[str, LifecycleState, float], None]
#: (mint, position id, the close's reason, the close's time)
ClosedHook = Callable[[str, str, str, float], None]
#: (mint, the request's event, the sale it ordered or None, why none)
RequestHook = Callable[[str, Event, ExitOrder | None, str], None]
#: (mint, the id of the position newly held on it)
HeldHook = Callable[[str, str], None]

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(ExitState).decode


class ExitProcessor:
    """The exit rules of one mint's position on the keyed consumer; see the module."""

    def __init__(
        self,
        rules: ExitRules | None = None,
        *,
        clock: Clock,
        slippage_pct: float = 10.0,
        on_outcome: OutcomeHook | None = None,
        on_market: MarketHook | None = None,
        on_lifecycle: LifecycleHook | None = None,
        on_closed: ClosedHook | None = None,
        on_request: RequestHook | None = None,
        on_held: HeldHook | None = None,
        retire_ttl_s: float = 6 * 3600.0,
    ):
        if retire_ttl_s <= 0:
            raise ValueError("retire_ttl_s must be positive")
        #: how long a retired token's record stays in the store
        self.retire_ttl_s = retire_ttl_s
        # no on_timed: the consumer runs the timers, asked through Effects
        self.evaluator = ExitEvaluator(rules, clock=clock)
        self.slippage_pct = slippage_pct
        self.on_outcome = on_outcome
        self.on_market = on_market
        self.on_lifecycle = on_lifecycle
        self.on_closed = on_closed
        self.on_request = on_request
        self.on_held = on_held
        #: a graceful exit is selling: the rules order nothing
        self.halted = False
        #: mint -> the market of a token without a position as its latest trade left it,
        #: taken into its state when one opens. Not stored, so every trade without a
        #: position stores nothing: after a restart or a partition move a position
        #: opened before its token's next trade starts from the opening event's mark and
        #: no curve (a graceful exit sells it in its final sweep unless a trade brings
        #: the curve first), and a graduate's pool from the migration's. Let go only as
        #: the key leaves memory
        self._unheld: dict[str, _Market] = {}
        #: mint -> the ids ended (:attr:`ExitState.ended`) of a token retired here and
        #: not stored yet: the service stores them before the retirement is written (the
        #: keyed consumer's ``before_write``) and takes them out of here
        self.retired_ended: dict[str, tuple[str, ...]] = {}

    def forget(self, mint: str) -> None:
        """``mint`` left memory here (retired, or its partition moved): what is held of
        it beside its state goes (the keyed consumer's ``on_forgotten``)."""
        self._unheld.pop(mint, None)

    # ---------------------------------------------------------------- KeyedProcessor

    def initial(self, key: str) -> ExitState:
        return ExitState(mint=key)

    def apply(self, state: ExitState, event: Event, effects: Effects) -> ExitState:
        data = event.data
        time = event.time
        if isinstance(data, PositionOpened | PositionUpdated):
            if self._closed_here(state, data.position_id):
                return UNCHANGED  # applied late (its seq came after the close's)
            self._held(state, data, time, event.seq)
            self._landed(state)
            decisions = self._rules(state, lambda ev: [])
        elif isinstance(data, PositionClosed):
            if state.position is not None and state.position.position_id == data.position_id:
                state.position = None
                state.watch = None
                state.pending = {}
                if self.on_closed is not None:
                    self.on_closed(state.mint, data.position_id, data.reason, time)
            _remember(state.ended, data.position_id)
            _remember(state.closed, data.position_id)
            self._landed(state)
            decisions = []
        elif isinstance(data, OrderRequested):
            # one applied late, after its outcome (its seq came after theirs), is over
            if (
                data.side == "buy"
                and not is_exit_order(data.order_id)
                and data.order_id not in state.ended
            ):
                state.entries.setdefault(data.order_id, False)
            decisions = []
        elif isinstance(data, TokenTrade):
            if state.position is None:
                unheld = self._unheld_trade(state, data)
                self._retire_if_done(state, effects)
                return unheld
            # a trade on its pool tells the migration its frame did not (lost, or late)
            revealed = is_pool(data.pool) and not state.migrated
            price = self._mark(state, data)

            def on_trade(ev: ExitEvaluator) -> list[ExitDecision]:
                # one pass: a second would take the migration's sale, not pending yet,
                # for tokens added to the position. The migration is decided at the
                # pool's spot the trade shows, not at the curve's last mark
                decisions = ev.on_migration(state.mint, time, mark_price=price) if revealed else []
                if price is not None:
                    decisions += ev.on_mark(state.mint, price, time)
                return decisions

            decisions = self._rules(state, on_trade)
        elif isinstance(data, TokenMigrated):
            self._migrated(state)
            decisions = self._rules(state, lambda ev: ev.on_migration(state.mint, time))
        elif isinstance(data, TokenLifecycle):
            state.lifecycle = data.state
            state.activity_level = data.activity_level
            if self.on_lifecycle is not None:
                self.on_lifecycle(state.mint, data.state, data.activity_level)
            decisions = self._rules(state, lambda ev: ev.on_lifecycle(state.mint, data.state, time))
        elif isinstance(data, OrderFilled | OrderRejected):
            if isinstance(data, OrderFilled):
                self._filled_on_pool(state, data)
            decisions = self._outcome(state, data, event.seq, time, effects.now)
        elif isinstance(data, SaleRequested):
            if event.id in state.requests:
                return UNCHANGED  # a copy: it ordered its sale once
            self._requested(state, event, data, effects)
            if _only_requested(state) and state.mint not in self._unheld:
                # a mistyped mint, a token long gone: no lifecycle would retire its key
                effects.retire(self.retire_ttl_s)
            decisions = []
        else:
            decisions = []
        self._order(state, decisions, effects)
        self._arm(state, effects)
        self._retire_if_done(state, effects)
        return state

    def fire(self, state: ExitState, effects: Effects) -> ExitState:
        now = effects.now
        self._order(state, self._rules(state, lambda ev: ev.check_time(state.mint, now)), effects)
        self._arm(state, effects)
        self._retire_if_done(state, effects)
        return state

    def _retire_if_done(self, state: ExitState, effects: Effects) -> None:
        """A retired token with nothing in play here leaves memory (see the module)."""
        if (
            state.lifecycle in RETIRING
            and state.position is None
            and not state.entries
            and not state.pending
            and not self.halted
        ):
            # its market goes once it leaves memory (forget): a retirement asked may not
            # stand (a later event of the same commit keeps the key), and a position
            # opened then takes that market
            if state.ended:
                self.retired_ended[state.mint] = tuple(state.ended)
            effects.retire(self.retire_ttl_s)

    def encode(self, state: ExitState) -> bytes:
        return _encode(state)

    def compact(self, state: ExitState, now: float) -> bytes | None:
        return None

    def decode(self, raw: bytes) -> ExitState:
        try:
            return _decode(raw)
        except msgspec.DecodeError as exc:
            raise StaleState(str(exc)) from exc

    # ---------------------------------------------------------------- events

    def _held(
        self,
        state: ExitState,
        data: PositionOpened | PositionUpdated,
        time: float,
        seq: int | None,
    ) -> None:
        position = state.position
        if position is None or position.position_id != data.position_id:
            market = self._unheld.pop(state.mint, None)
            if market is not None:
                state.v_sol, state.v_tokens = market.v_sol, market.v_tokens
                state.mark_price = market.mark_price
                if market.pool is not None:
                    state.pool = market.pool
            state.position = HeldState(
                position_id=data.position_id,
                opened_at=time,
                tokens=data.token_amount,
                entry_price=data.entry_price,
                cost_sol=data.cost_sol,
            )
            state.pending = {}
            if self.on_held is not None:
                self.on_held(state.mint, data.position_id)
        elif _overtaken(position, seq):
            return  # what it holds is past: a later fill or position event counted it
        else:
            position.tokens = data.token_amount
            position.entry_price = data.entry_price
            position.cost_sol = data.cost_sol
        if seq is not None:
            state.position.seq = max(state.position.seq, seq)
        if data.mark_price is not None and state.mark_price is None:
            state.mark_price = data.mark_price

    def _unheld_trade(self, state: ExitState, trade: TokenTrade) -> ExitState | Unchanged:
        """A trade of a token without a position changes its state only by a migration it
        reveals: its market is held here until a position opens (see :attr:`_unheld`)."""
        if is_pool(trade.pool) and not state.migrated:
            state.migrated = migrating = True
        else:
            migrating = False
        if state.migrated:
            held = self._unheld.get(state.mint)
            pool = pool_moved_by_trade(held.pool if held is not None else state.pool, trade)
            if pool is not None:
                self._unheld[state.mint] = _Market(state.v_sol, state.v_tokens, pool, pool.price)
            return state if migrating else UNCHANGED
        curve = state_from_frame(trade.vSolInBondingCurve, trade.vTokensInBondingCurve)
        self._unheld[state.mint] = _Market(curve.v_sol, curve.v_tokens, None, curve.price)
        if self.on_market is not None:
            self.on_market(state.mint, curve, False)
        return UNCHANGED

    def _migrated(self, state: ExitState) -> None:
        """The token left its curve: a graceful exit's plan prices it on its pool from
        now, as followed here (by every trade on it, the exit's own sales included)."""
        if state.migrated:
            return
        state.migrated = True
        if self.on_market is not None and state.position is not None:
            self.on_market(state.mint, state.market, True)

    def _mark(self, state: ExitState, trade: TokenTrade) -> float | None:
        """Follow the token's market; its spot price after the trade (None if the trade
        moves it not): the curve's as its frame reports it, once migrated the pool's."""
        if is_pool(trade.pool):
            self._migrated(state)
        if state.migrated:
            # the spot, not the trade's average price: a partial migration_fraction holds
            # on to the rest, and a buy's average lies below the price it leaves
            pool = pool_moved_by_trade(state.pool, trade)
            if pool is None:
                return None
            state.pool = pool
            state.mark_price = pool.price
            if self.on_market is not None:
                self.on_market(state.mint, pool, True)
            return pool.price
        curve = state_from_frame(trade.vSolInBondingCurve, trade.vTokensInBondingCurve)
        state.v_sol, state.v_tokens = curve.v_sol, curve.v_tokens
        state.mark_price = curve.price
        if self.on_market is not None:
            self.on_market(state.mint, curve, False)
        return curve.price

    def _filled_on_pool(self, state: ExitState, fill: OrderFilled) -> None:
        """Move the token's pool by an order of ours filled on it that its stream does not
        report (a paper fill), as trading's paper executor moves it: what is held is
        marked at the spot after the sale, which trading's next sale fills near."""
        if fill.order_id in state.pool_fills:
            return  # a copy the consumer did not drop (it came without a seq)
        market = self._unheld.get(state.mint) if state.position is None else None
        unheld = market is not None and market.pool is not None
        pool = pool_moved_by_fill(market.pool if unheld else state.pool, fill)
        if pool is None:
            return
        _remember(state.pool_fills, fill.order_id)
        if unheld:
            self._unheld[state.mint] = market._replace(pool=pool, mark_price=pool.price)
            return
        state.pool = pool
        if not state.migrated:
            return  # the market is its curve here until the migration is seen
        state.mark_price = pool.price
        if state.watch is not None:
            evaluator = self.evaluator
            evaluator.adopt(state.watch)
            try:
                evaluator.remark(state.mint, pool.price)
            finally:
                evaluator.forget(state.mint)
        if self.on_market is not None:
            self.on_market(state.mint, pool, True)

    def _outcome(
        self,
        state: ExitState,
        outcome: OrderFilled | OrderRejected,
        seq: int | None,
        time: float,
        now: float,
    ) -> list[ExitDecision]:
        """Take a sale's or an entry's outcome (``time``: trading's, ``now``: the time the
        rules judge at); the exits due as a refused sale gives its rule back."""
        if outcome.side == "buy" or not is_exit_order(outcome.order_id):
            self._entry_outcome(state, outcome)
            return []
        sale = state.pending.pop(outcome.order_id, None)
        position = state.position
        # what comes back to the rules: a refused sale's tokens, or what a fill fell
        # short of its order by (its slippage limit, liquidity, trading cutting it to what
        # is held); still held, not bought
        given_back = 0.0
        if isinstance(outcome, OrderFilled):
            if (
                position is not None
                and position.position_id == outcome.position_id
                and outcome.order_id not in position.sold
            ):
                if not _overtaken(position, seq):
                    # position.updated says the same soon; the plan must not wait for it
                    position.tokens = max(0.0, position.tokens - outcome.token_amount)
                    position.seq = max(position.seq, seq or 0)
                position.sold.append(outcome.order_id)
                if sale is not None:
                    given_back = sale.token_amount - outcome.token_amount
        elif sale is not None and position is not None:
            given_back = sale.token_amount
        decisions: list[ExitDecision] = []
        if sale is not None and position is not None and given_back > sale.token_amount * 1e-9:
            decision = ExitDecision(
                mint=state.mint,
                position_id=position.position_id,
                rule=sale.rule,
                fraction=0.0,
                token_amount=given_back,
                reason=sale.reason,
                # the wait after a refusal runs in the rules' time: trading's clock runs
                # ahead of a backlog of trades, a wait from it would hold them as long again
                time=min(time, now),
            )
            refused = isinstance(outcome, OrderRejected)
            # given back before the rules compare what they have left with what is held
            # (else taken for an entry added, the ladder resized); halted too, for after
            # a graceful exit
            self._give_back(state, decision, refused=refused)
            # the rules look again at once (a wait after refusals holds them): a rule of
            # price due would otherwise wait for the token's next trade, which after a
            # dump may be another seller's
            decisions = self._rules(state, lambda ev: ev.check_time(state.mint, decision.time))
        if self.on_outcome is not None:
            view = held_view(state)
            held_back = view.pending_tokens if view is not None else 0.0
            self.on_outcome(state.mint, outcome, sale, time, held_back)
        return decisions

    def _give_back(self, state: ExitState, decision: ExitDecision, *, refused: bool) -> None:
        """Give ``decision``'s tokens back to the rules of ``state``'s position."""
        watch = state.watch
        if watch is None or watch.position_id != decision.position_id:
            return
        evaluator = self.evaluator
        evaluator.adopt(watch)
        try:
            if refused:
                evaluator.rearm(decision)
            else:
                evaluator.fell_short(decision)
        finally:
            evaluator.forget(state.mint)

    def _requested(
        self, state: ExitState, event: Event, request: SaleRequested, effects: Effects
    ) -> None:
        """Order an operator's sale as a rule's, of what the rules have not ordered sold,
        unless no such position is held or a graceful exit sells it."""
        _remember(state.requests, event.id)
        position = state.position
        orders: list[ExitOrder] = []
        if position is None:
            why = "no position held"
        elif request.position_id is not None and request.position_id != position.position_id:
            why = f"the position held is {position.position_id}"
        elif self.halted:
            why = "a graceful exit is selling every position"
        else:
            reason = request.reason or REQUESTED
            time = event.time
            decisions = self._rules(
                state, lambda ev: ev.on_request(state.mint, request.fraction, reason, time)
            )
            orders = self._order(state, decisions, effects)
            why = "" if orders else "all of it is ordered sold already"
        if self.on_request is not None:
            self.on_request(state.mint, event, orders[0] if orders else None, why)

    @staticmethod
    def _closed_here(state: ExitState, position_id: str) -> bool:
        """Whether ``position_id`` is a position this mint held and closed."""
        position = state.position
        held = position is not None and position.position_id == position_id
        return not held and position_id in state.closed

    @staticmethod
    def _entry_outcome(state: ExitState, outcome: OrderFilled | OrderRejected) -> None:
        """An entry refused is gone; one filled waits for its position event, which trading
        publishes after the fill (until then the graceful exit has nothing to sell)."""
        if isinstance(outcome, OrderFilled) and outcome.token_amount > 0:
            if outcome.order_id in state.ended and state.position is None:
                # a copy or a late fill of an entry over: its position closed, or comes
                # (a refused entry's late fill) and is held as it comes
                return
            if outcome.side == "buy" or outcome.order_id in state.entries:
                state.entries[outcome.order_id] = True
            return
        state.entries.pop(outcome.order_id, None)
        _remember(state.ended, outcome.order_id)

    @staticmethod
    def _landed(state: ExitState) -> None:
        """The position events after an entry's fill: the entry is the position now."""
        for order_id, filled in list(state.entries.items()):
            if filled:
                del state.entries[order_id]
                _remember(state.ended, order_id)

    # ---------------------------------------------------------------- rules

    def _rules(
        self,
        state: ExitState,
        step: Callable[[ExitEvaluator], list[ExitDecision]],
        *,
        deciding: bool = True,
    ):
        """Run one step of the rules over ``state``'s position: while halted, only a step
        that decides nothing (``deciding`` False)."""
        position = state.position
        if position is None or (self.halted and deciding):
            return []
        evaluator = self.evaluator
        watch = state.watch
        view = HeldView(
            mint=state.mint,
            position_id=position.position_id,
            opened_at=position.opened_at,
            tokens=position.tokens,
            entry_price=position.entry_price,
            mark_price=state.mark_price,
            mark_state=None,
        )
        if watch is None or watch.position_id != position.position_id:
            evaluator.track(view, time=position.opened_at)
            state.watch = evaluator.watch(state.mint)
        else:
            evaluator.adopt(watch)
            # held beyond what the rules left and their sales under way sell (the sales
            # filled are no longer held, what they gave back is left): an entry added to
            # it (trading's add_to_positions), and the rules sell those too; held short of
            # it, sold by other means (a graceful exit's tranches, a hand sale), and the
            # rules sell no more than is held
            free = position.tokens - state.pending_tokens
            added = free - watch.left
            if added > watch.bought * 1e-9:
                evaluator.track(replace(view, tokens=watch.bought + added), time=position.opened_at)
            elif added < -watch.bought * 1e-9 and not state.pending:
                # with sales under way the shortfall may be a fill still to come
                evaluator.limit(state.mint, free)
        try:
            return step(evaluator)
        finally:
            evaluator.forget(state.mint)

    def _order(
        self, state: ExitState, decisions: list[ExitDecision], effects: Effects
    ) -> list[ExitOrder]:
        """Number, hold as pending and emit the sales ``decisions`` call for; their orders."""
        orders = []
        for decision in decisions:
            if decision.token_amount <= 0:
                continue
            state.rule_orders += 1
            order_id = rule_order_id(decision.position_id, state.rule_orders)
            state.pending[order_id] = PendingSale(
                rule=decision.rule,
                token_amount=decision.token_amount,
                reason=decision.reason,
                decided_at=decision.time,
                mark_price=decision.mark_price,
            )
            order = ExitOrder(
                order_id=order_id,
                mint=decision.mint,
                position_id=decision.position_id,
                token_amount=decision.token_amount,
                slippage_pct=self.slippage_pct,
                reason=decision.rule,
                priority=int(Priority.URGENT if decision.full else Priority.HIGH),
            )
            effects.emit(order, time=decision.time)
            orders.append(order)
        return orders

    def _arm(self, state: ExitState, effects: Effects) -> None:
        due = None
        if state.position is not None and self.halted:
            # the rules decide nothing while a graceful exit sells; a position it leaves
            # held is theirs again after it, though nothing of its token may come
            due = effects.now + _HALTED_CHECK_S
        elif state.watch is not None and state.position is not None:
            self.evaluator.adopt(state.watch)
            try:
                # seen at the time the rules judge at: a wait after refusals holds until
                # then, though the clock be past it
                due = self.evaluator.next_check_at(state.mint, effects.now)
            finally:
                self.evaluator.forget(state.mint)
        if due is None:
            effects.cancel_timer()
        else:
            effects.set_timer(due)
