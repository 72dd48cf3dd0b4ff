"""The graceful exit's plan: which position to sell next, how much, and by when.

Every open position goes into a priority queue. Its score (0 to 1, higher sells first)
weighs four things, each 0 to 1:

- **lifecycle** (weight 0.35): a token's buyers are what a sale sells into. An
  inactive token (nothing traded for 3 minutes) or a declining one (at most 2 trades
  a minute) has few left, and fewer each minute, so it goes first; an active one
  (at least 6 trades a minute) absorbs tranches; a graduated token's pool keeps the
  ~85 SOL the curve raised, so it can wait.
- **profit** (weight 0.2): a gain can go in one dump (the lifecycle calls a 50% fall
  from the peak a dump); a position already down 50% has little left to lose. From
  0 at a gain of -50% to 1 at +100%.
- **depth** (weight 0.25): the price impact of selling the whole holding at once,
  against four tranches' worth of the limit: a position that needs many tranches
  starts early to fit them before the deadline.
- **age** (weight 0.2): of the time stop's 600 s; tokens die within minutes, so the
  older a position's token, the nearer its end.

Ties go to the position opened first.

A tranche's price impact stays under ``max_tranche_impact``: what is left is split
into as few equal parts as keep each under it
(:func:`pumpflow.common.curve.sell_for_impact`), so no crumb is left for a last
order. The plan's view of a curve moves by its own sales
(:func:`pumpflow.common.curve.quote_sell`) until the market reports the curve again;
a migrated token's pool is reported as the exit follows it, by every trade on it and
by the exit's own sales' fills (:mod:`pumpflow.common.pool`), so the plan does not
move it by them a second time. Every report re-scores the queue. A token waits
``min_tranche_interval_s`` between its tranches, so the market's buyers come in
between them, and other tokens sell meanwhile. A tranche whose outcome never came may
have sold: its tokens are *unconfirmed*, never offered again (a new order for them
could sell them twice), and the position is not sold out until that outcome comes (a
fill sells them, a refusal gives them back to sell) or the deadline ends the exit with
them unconfirmed. From
``deadline - final_sweep_s`` on, each position left is sold whole (rule ``deadline``),
so the last orders land before the deadline.

Defaults:

- ``max_tranche_impact = 0.02``: the impact trading allows an entry
  (``RiskLimits.max_entry_price_impact``); a round trip's fees are ~4.5%, so a
  tranche's impact stays under half of them, and well inside an exit order's 10%
  slippage limit after the 0.5 s paper latency.
- ``deadline_s = 60``: at PumpPortal's 25 HTTP requests a second, 60 s carries 1,500
  orders, far more than the tranches of a full book; short against the minutes in which
  tokens die (an active token with no trade for 60 s is already declining).
- ``final_sweep_s = 5``: ten times the paper latency of an order.
- ``min_tranche_interval_s = 1``: at a graduate's pace (~104 trades a minute,
  ~1.7 a second) a second lets the market trade between two tranches of a hot token.
- ``max_orders_in_flight = 10``: tranches of different tokens go out together; ten
  orders each 0.5 s (the paper latency) is 20 a second, under PumpPortal's 25 HTTP
  requests a second.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pumpflow.common.curve import CurveState, quote_sell, sell_for_impact
from pumpflow.common.events import ExitOrder, LifecycleState
from pumpflow.common.exit.rules import ExitPosition
from pumpflow.common.priority import Priority

GRACEFUL = "graceful"
DEADLINE = "deadline"
#: the close of a position held with no token to sell (and none a rule's sale holds):
#: its exit is over as it is queued
NOTHING_TO_SELL = "nothing to sell"


class HeldPosition(ExitPosition, Protocol):
    """What the plan reads of a position (trading's ``Position`` has these): what the
    rules read, and its mark."""

    @property
    def mark_price(self) -> float | None: ...

    @property
    def mark_state(self) -> CurveState | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class GracefulExitConfig:
    """Parameters of a graceful exit; defaults argued in the module docstring."""

    max_tranche_impact: float = 0.02
    deadline_s: float = 60.0
    final_sweep_s: float = 5.0
    min_tranche_interval_s: float = 1.0
    max_orders_in_flight: int = 10
    #: slippage limit of a tranche's order, and of the deadline's sweep
    slippage_pct: float = 10.0
    sweep_slippage_pct: float = 50.0
    weight_lifecycle: float = 0.35
    weight_profit: float = 0.2
    weight_depth: float = 0.25
    weight_age: float = 0.2
    #: urgency of each lifecycle state (None: not known)
    lifecycle_urgency: tuple[tuple[str | None, float], ...] = (
        ("inactive", 1.0),
        ("declining", 0.8),
        (None, 0.5),
        ("new", 0.5),
        ("active", 0.3),
        ("graduated", 0.2),
    )
    #: gains scored 0 and 1 by the profit term
    profit_floor: float = -0.5
    profit_ceiling: float = 1.0
    #: tranches' worth of impact that scores 1 on depth
    depth_tranches: float = 4.0
    #: age that scores 1 (the time stop)
    age_horizon_s: float = 600.0

    def __post_init__(self) -> None:
        if not 0 < self.max_tranche_impact < 1:
            raise ValueError("max_tranche_impact must be in (0, 1)")
        if not 0 <= self.final_sweep_s < self.deadline_s:
            raise ValueError("need 0 <= final_sweep_s < deadline_s")
        if self.max_orders_in_flight < 1:
            raise ValueError("max_orders_in_flight must be at least 1")
        if self.min_tranche_interval_s < 0:
            raise ValueError("min_tranche_interval_s must be >= 0")

    def urgency(self, state: str | None) -> float:
        return dict(self.lifecycle_urgency).get(state, 0.5)

    def slippage_of(self, rule: str) -> float:
        """The slippage limit of a tranche of ``rule`` (the deadline's sweep, or not)."""
        return self.sweep_slippage_pct if rule == DEADLINE else self.slippage_pct


@dataclass(frozen=True, slots=True, kw_only=True)
class Score:
    """A position's place in the queue, with its parts."""

    total: float
    lifecycle: float
    profit: float
    depth: float
    age: float


@dataclass(slots=True, kw_only=True)
class QueuedExit:
    """One position in the graceful exit."""

    mint: str
    position_id: str
    entry_price: float
    opened_at: float
    arrival: int
    tokens_at_start: float
    tokens_left: float
    #: the price when the exit began (the mark slippage is measured against)
    mark_price: float | None
    #: the plan's view of the token's market
    state: CurveState | None
    #: the market's reports of ``state`` count this exit's own sales (a pool, followed
    #: through their fills): the plan does not move it by them itself
    follows_sales: bool = False
    lifecycle: LifecycleState | None = None
    activity_level: float = 0.0
    tranches_sent: int = 0
    tranches_filled: int = 0
    in_flight: bool = False
    #: spacing of its tranches (the final sweep does not wait for it)
    ready_at: float = 0.0
    #: after a refused tranche, when to try again (the sweep waits for it too)
    retry_at: float = 0.0
    #: tokens a rule's sale ordered before the exit began is still selling: not the
    #: exit's to sell, yet the position is not flat until that sale settles
    reserved: float = 0.0
    #: tokens of tranches whose outcome never came (they may have sold): not offered
    #: again, and the position is not flat until those outcomes come
    unconfirmed: float = 0.0
    #: how many such tranches
    tranches_lost: int = 0
    #: trading closed the position (the close's reason): nothing is left to sell, the
    #: tranche in flight's outcome still counts
    closed: str | None = None
    score: Score | None = None

    @property
    def done(self) -> bool:
        if self.closed is not None:
            return not self.in_flight
        return self.tokens_left <= 0.0 and self.reserved <= 0.0

    @property
    def free(self) -> float:
        """Tokens the exit may still offer: held, and in no tranche awaiting an outcome."""
        if self.closed is not None:
            return 0.0
        free = self.tokens_left - self.unconfirmed
        return free if free > self.tokens_at_start * 1e-9 else 0.0

    @property
    def sellable(self) -> bool:
        return self.free > 0.0

    @property
    def price(self) -> float | None:
        return self.state.price if self.state is not None else self.mark_price


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedTranche:
    """One sale of a graceful exit."""

    mint: str
    position_id: str
    #: deterministic, so an order repeated after a restart is the same order
    order_id: str
    number: int
    token_amount: float
    rule: str
    #: the curve's price before the tranche and the average the quote expects
    price_before: float | None
    expected_price: float | None
    expected_sol: float | None
    price_impact: float | None
    score: float
    deadline: float
    slippage_pct: float

    def order(self) -> ExitOrder:
        return ExitOrder(
            order_id=self.order_id,
            mint=self.mint,
            position_id=self.position_id,
            token_amount=self.token_amount,
            slippage_pct=self.slippage_pct,
            reason=self.rule,
            priority=int(Priority.URGENT if self.rule == DEADLINE else Priority.HIGH),
            deadline=self.deadline,
        )


def tranche_order_id(position_id: str, number: int) -> str:
    return f"{position_id}:exit:{number}"


@dataclass(slots=True)
class ExitPlanner:
    """The queue and tranches of one graceful exit; no I/O, time passed in."""

    config: GracefulExitConfig = field(default_factory=GracefulExitConfig)
    started_at: float | None = None
    deadline: float | None = None
    exits: dict[str, QueuedExit] = field(default_factory=dict)
    #: (-score, arrival, mint): the priority queue, rebuilt when scores change
    queue: list[tuple[float, int, str]] = field(default_factory=list)
    _arrivals: itertools.count = field(default_factory=itertools.count)
    _dirty: bool = True

    # ---------------------------------------------------------------- setup

    def begin(self, time: float, *, deadline: float | None = None) -> None:
        """Start the exit at ``time``; it ends by ``deadline`` (default ``deadline_s`` on)."""
        if self.started_at is None:
            self.started_at = time
            self.deadline = deadline if deadline is not None else time + self.config.deadline_s

    def add(
        self,
        position: HeldPosition,
        *,
        state: CurveState | None = None,
        follows_sales: bool = False,
        lifecycle: LifecycleState | None = None,
        activity_level: float = 0.0,
    ) -> QueuedExit | None:
        """Queue ``position`` (once; a repeat is ignored) on its market ``state`` (which
        counts the exit's own sales if ``follows_sales``), else on its ``mark_state``
        (which counts them if its ``mark_follows_sales`` says so).

        Its ``pending_tokens``, if it has them, are a rule's sale under way: reserved
        until that sale settles (:meth:`settle_reserved`). A later position on a
        mint whose exit is over takes that exit's place; the mint's exit still going
        keeps it. One with nothing to sell is queued closed (:data:`NOTHING_TO_SELL`):
        its exit is over, yet it is the exit's (left out, it would be taken up again on
        every look at what is held).
        """
        reserved = getattr(position, "pending_tokens", 0.0)
        queued = self.exits.get(position.mint)
        later = queued is not None and queued.position_id != position.position_id and queued.done
        if queued is not None and not later:
            return queued
        empty = position.tokens <= 0 and reserved <= 0
        if state is None:
            state = position.mark_state
            follows_sales = getattr(position, "mark_follows_sales", False)
        mark = state.price if state is not None else position.mark_price
        queued = QueuedExit(
            mint=position.mint,
            position_id=position.position_id,
            entry_price=position.entry_price,
            opened_at=position.opened_at,
            arrival=next(self._arrivals),
            tokens_at_start=max(position.tokens, 0.0),
            tokens_left=max(position.tokens, 0.0),
            mark_price=mark,
            state=state,
            follows_sales=follows_sales,
            lifecycle=lifecycle,
            activity_level=activity_level,
            reserved=reserved,
            closed=NOTHING_TO_SELL if empty else None,
        )
        self.exits[position.mint] = queued
        self._dirty = True
        return queued

    # ---------------------------------------------------------------- market

    def update_market(self, mint: str, state: CurveState, *, follows_sales: bool = False) -> None:
        """The token's curve (or pool) as the market last reported it (counting this
        exit's own sales, if ``follows_sales``)."""
        queued = self.exits.get(mint)
        if queued is not None and not queued.done:
            if queued.mark_price is None:
                queued.mark_price = state.price
            queued.state = state
            queued.follows_sales = follows_sales
            self._dirty = True

    def update_lifecycle(
        self, mint: str, state: LifecycleState, activity_level: float | None = None
    ) -> None:
        queued = self.exits.get(mint)
        if queued is not None and not queued.done:
            queued.lifecycle = state
            if activity_level is not None:
                queued.activity_level = activity_level
            self._dirty = True

    # ---------------------------------------------------------------- priority

    def score(self, queued: QueuedExit, time: float) -> Score:
        c = self.config
        lifecycle = c.urgency(queued.lifecycle)
        price = queued.price
        if price is not None and queued.entry_price > 0:
            gain = price / queued.entry_price - 1.0
            profit = _unit((gain - c.profit_floor) / (c.profit_ceiling - c.profit_floor))
        else:
            profit = 0.5
        if queued.state is not None and queued.tokens_left > 0:
            impact = quote_sell(queued.state, queued.tokens_left).price_impact
            depth = _unit(impact / (c.depth_tranches * c.max_tranche_impact))
        else:
            depth = 0.5
        age = _unit((time - queued.opened_at) / c.age_horizon_s)
        total = (
            c.weight_lifecycle * lifecycle
            + c.weight_profit * profit
            + c.weight_depth * depth
            + c.weight_age * age
        )
        return Score(total=total, lifecycle=lifecycle, profit=profit, depth=depth, age=age)

    def prioritize(self, time: float) -> list[QueuedExit]:
        """Score every position left and rebuild the queue; the positions, first first."""
        self.queue = []
        for queued in self.exits.values():
            if queued.done:
                continue
            queued.score = self.score(queued, time)
            self.queue.append((-queued.score.total, queued.arrival, queued.mint))
        heapq.heapify(self.queue)
        self._dirty = False
        return [self.exits[m] for _, _, m in sorted(self.queue)]

    # ---------------------------------------------------------------- tranches

    def in_final_sweep(self, time: float) -> bool:
        return self.deadline is not None and time >= self.deadline - self.config.final_sweep_s

    def next_tranche(self, time: float) -> PlannedTranche | None:
        """The next sale due at ``time``, or None if no position is ready."""
        if self.started_at is None:
            raise RuntimeError("the graceful exit has not begun")
        if self._dirty:
            self.prioritize(time)
        sweep = self.in_final_sweep(time)
        skipped = []
        chosen = None
        while self.queue:
            entry = heapq.heappop(self.queue)
            queued = self.exits[entry[2]]
            if queued.done:
                continue
            skipped.append(entry)
            if not queued.sellable or queued.in_flight or (queued.state is None and not sweep):
                continue
            if queued.retry_at > time or (not sweep and queued.ready_at > time):
                continue
            chosen = queued
            break
        for entry in skipped:
            heapq.heappush(self.queue, entry)
        if chosen is None:
            return None
        return self._tranche(chosen, sweep)

    def next_ready_at(self) -> float | None:
        """When a position not in flight may sell next (the sweep's start at the latest)."""
        sweep_at = None
        if self.deadline is not None:
            sweep_at = self.deadline - self.config.final_sweep_s
        times = []
        for q in self.exits.values():
            if not q.sellable or q.in_flight:
                continue
            if sweep_at is not None:
                times.append(max(sweep_at, q.retry_at))
            if q.state is not None:
                times.append(max(q.ready_at, q.retry_at))
        return min(times) if times else None

    def tranche_size(self, queued: QueuedExit) -> float:
        """Tokens of the next tranche: what is left in equal parts under the impact limit."""
        free = queued.free
        if queued.state is None:
            return free
        cap = sell_for_impact(queued.state, self.config.max_tranche_impact)
        if free <= cap:
            return free
        # equal parts rather than full tranches and a crumb: no dust order at the end
        return free / math.ceil(free / cap)

    def _tranche(self, queued: QueuedExit, sweep: bool) -> PlannedTranche:
        c = self.config
        tokens = queued.free if sweep else self.tranche_size(queued)
        quote = quote_sell(queued.state, tokens) if queued.state is not None else None
        queued.tranches_sent += 1
        queued.in_flight = True
        return PlannedTranche(
            mint=queued.mint,
            position_id=queued.position_id,
            order_id=tranche_order_id(queued.position_id, queued.tranches_sent),
            number=queued.tranches_sent,
            token_amount=tokens,
            rule=DEADLINE if sweep else GRACEFUL,
            price_before=quote.price_before if quote else queued.price,
            expected_price=quote.average_price if quote else None,
            expected_sol=quote.sol if quote else None,
            price_impact=quote.price_impact if quote else None,
            score=queued.score.total if queued.score else 0.0,
            deadline=self.deadline if self.deadline is not None else 0.0,
            slippage_pct=c.slippage_of(DEADLINE if sweep else GRACEFUL),
        )

    def record_fill(self, tranche: PlannedTranche, tokens_sold: float, time: float) -> QueuedExit:
        """A tranche filled ``tokens_sold``; the plan's curve moves by that sale."""
        queued = self.exits[tranche.mint]
        queued.in_flight = False
        self._sold(queued, tokens_sold)
        queued.ready_at = time + self.config.min_tranche_interval_s
        return queued

    def record_lost(self, tranche: PlannedTranche, time: float) -> QueuedExit:
        """No outcome of a tranche came: its tokens are unconfirmed (never offered again)
        until it comes; the position's other tokens go on selling."""
        queued = self.exits[tranche.mint]
        queued.in_flight = False
        queued.unconfirmed += min(tranche.token_amount, queued.free)
        queued.tranches_lost += 1
        queued.ready_at = time + self.config.min_tranche_interval_s
        self._dirty = True
        return queued

    def record_late_outcome(
        self, mint: str, asked: float, tokens_sold: float | None
    ) -> QueuedExit | None:
        """The outcome of a tranche of ``asked`` tokens given up for lost came: filled
        (``tokens_sold``), they are no longer held; refused (None), they may be offered
        again."""
        queued = self.exits.get(mint)
        if queued is None:
            return None
        queued.unconfirmed = max(0.0, queued.unconfirmed - asked)
        queued.tranches_lost = max(0, queued.tranches_lost - 1)
        if tokens_sold is not None and not queued.done:
            self._sold(queued, tokens_sold)
        self._dirty = True
        return queued

    def hold_unconfirmed(self, mint: str, tokens: float, tranches: int) -> None:
        """``mint``'s exit has ``tranches`` of ``tokens`` sent before and still without an
        outcome (a resumed exit's): not offered again."""
        queued = self.exits.get(mint)
        if queued is not None and tranches > queued.tranches_lost:
            queued.unconfirmed = min(tokens, queued.tokens_left)
            queued.tranches_lost = tranches
            self._dirty = True

    def _sold(self, queued: QueuedExit, tokens_sold: float) -> None:
        queued.tranches_filled += 1
        sold = min(tokens_sold, queued.tokens_left)
        queued.tokens_left -= sold
        if queued.tokens_left <= queued.tokens_at_start * 1e-9:
            queued.tokens_left = 0.0
        if queued.state is not None and sold > 0 and not queued.follows_sales:
            queued.state = quote_sell(queued.state, sold).after
        self._dirty = True

    def record_rejection(self, tranche: PlannedTranche, time: float) -> QueuedExit:
        """A tranche was refused (slippage, say): the position waits and tries again,
        at the deadline at the latest (a sweep refused just before it gets one more go).
        Refused past the deadline, it is not tried again: the try would go out whenever
        another sale's answer came, and could wait a whole order timeout more."""
        queued = self.exits[tranche.mint]
        queued.in_flight = False
        retry = time + self.config.min_tranche_interval_s
        if self.deadline is not None and time < self.deadline:
            retry = min(retry, self.deadline)
        queued.ready_at = queued.retry_at = retry
        if self.deadline is not None and time >= self.deadline:
            queued.retry_at = math.inf
        self._dirty = True
        return queued

    def drop(self, mint: str) -> QueuedExit | None:
        """Take ``mint``'s position out of the plan (another replica sells it now)."""
        queued = self.exits.pop(mint, None)
        if queued is not None:
            self.queue = [entry for entry in self.queue if entry[2] != mint]
            heapq.heapify(self.queue)
        return queued

    def close(self, mint: str, reason: str) -> QueuedExit | None:
        """Trading closed ``mint``'s position (``reason``): nothing is left to offer or to
        wait for but the tranche in flight."""
        queued = self.exits.get(mint)
        if queued is not None and queued.closed is None:
            queued.closed = reason
            self._dirty = True
        return queued

    def settle_reserved(self, mint: str, tokens: float, *, sold: float, held_back: float) -> float:
        """A rule's sale of ``tokens`` reserved from ``mint``'s exit settled, selling
        ``sold`` (none if refused), and the position's rule sales hold back ``held_back``
        after it: the tokens sold are gone, and the exit sells those it did not sell,
        never more than it reserved nor what the others under way still hold back
        (trading cuts overlapping sales to what is held, so a sale cut short leaves its
        tokens to the one it overlapped); how many it took."""
        queued = self.exits.get(mint)
        if queued is None:
            return 0.0
        reserved = queued.reserved
        taken = min(tokens - sold, reserved - sold - held_back, reserved)
        taken = max(taken, 0.0)
        queued.reserved = max(reserved - sold - taken, 0.0)
        if queued.reserved <= reserved * 1e-9:
            queued.reserved = 0.0
        queued.tokens_left += taken
        queued.tokens_at_start += taken
        self._dirty = True
        return taken

    # ---------------------------------------------------------------- progress

    @property
    def done(self) -> bool:
        return all(q.done for q in self.exits.values())

    @property
    def awaiting_outcomes(self) -> bool:
        """Whether a rule's sale, or a tranche given up for lost, still holds tokens
        whose outcome may end an exit or give them back to sell."""
        return any(
            q.closed is None and (q.reserved > 0 or q.unconfirmed > 0) for q in self.exits.values()
        )

    def expected_exit_price(self, mint: str) -> float | None:
        """Average price (before fees) the next tranche of ``mint`` would get now.

        The best price the plan takes while its impact stays under the limit; an order
        accepts down to it less its slippage limit. (Without other trades in between,
        the tranches of a whole holding average what selling it at once would: on a
        constant-product curve the sales' path does not matter. Tranches gain from the
        buyers who come between them.)
        """
        queued = self.exits.get(mint)
        if queued is None or queued.state is None or not queued.sellable:
            return None
        return quote_sell(queued.state, self.tranche_size(queued)).average_price

    def queued(self) -> Mapping[str, QueuedExit]:
        return self.exits


def _unit(value: float) -> float:
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value
