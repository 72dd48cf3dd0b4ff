"""Paper execution's core: orders wait out a latency, then fill on the token's own stream.

An order submitted at ``t`` fills against the token's market as it stood at
``t + latency_s``: the state after the last trade the token's stream stamped at or
before then. It fills when a later trade shows that time has passed (the fill sees
the state just before that trade), or when :meth:`PaperBroker.due` is called at or
after it (the service runs that from a timer, for a token that went quiet).

The broker knows the tokens from their token events (:meth:`PaperBroker.observe`),
has no clock and does no I/O; the paper TradeExecutor of the service feeds it and
publishes what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pumpflow.common.curve import MIGRATION_POOL, CurveState, state_from_frame
from pumpflow.common.events import (
    ExitOrder,
    OrderFilled,
    OrderRejected,
    OrderRequested,
    RejectionCause,
    Side,
    TokenCreated,
    TokenMigrated,
    TokenTrade,
)
from pumpflow.common.pool import is_pool, pool_moved_by_fill, pool_moved_by_trade
from pumpflow.common.trading.fills import (
    VENUE_CURVE,
    VENUE_POOL,
    FillRejection,
    PaperFill,
    fill_buy,
    fill_sell,
)
from pumpflow.common.trading.orders import rejected
from pumpflow.common.trading.settings import PaperExecution

#: isinstance with a union made once, not at every event
_FRAMES = TokenTrade | TokenCreated
_TOKEN_EVENTS = TokenTrade | TokenCreated | TokenMigrated


@dataclass(slots=True)
class Market:
    """Where one token trades now, and its state there, from its own token events and
    trading's paper fills on the pool (:meth:`follow_fill`).

    The paper executor fills on it and the engine's token view marks positions on it
    (and is stored for the next replica to rebuild the executor's from): no frame ever
    reports a pool's reserves, so both follow the same events and fills here to hold
    one pool.
    """

    venue: str = VENUE_CURVE
    state: CurveState | None = None

    def apply(self, payload: object) -> None:
        """Follow a token event: a curve frame, the migration, or a trade on the pool."""
        if isinstance(payload, TokenMigrated):
            self._to_pool()
            return
        if not isinstance(payload, _FRAMES):
            return
        if is_pool(self.venue) or is_pool(payload.pool):
            if payload.pool == VENUE_CURVE:
                return  # a curve trade stamped before the migration, arriving after it
            self._to_pool()
            if isinstance(payload, TokenTrade) and self.state is not None:
                moved = pool_moved_by_trade(self.state, payload)
                if moved is not None:
                    self.state = moved
            return
        self.state = state_from_frame(payload.vSolInBondingCurve, payload.vTokensInBondingCurve)

    def follow_fill(self, fill: OrderFilled) -> bool:
        """Follow an order of ours filled on the pool that the token's stream does not
        report (a paper fill), moving the pool by its amounts; whether it moved.

        A live fill names its trade's signature, which the stream reports and which moves
        the pool as any trade does. A curve fill moves nothing here: every curve frame
        reports the curve's reserves, so the next one resets whatever a paper fill moved
        (the chain never saw it); followed here, it would make the market a decision
        reads depend on whether the fill or the next decision came first. The paper
        executor follows its own curve fills until that frame (:class:`PaperBroker`).
        """
        if self.state is None or not is_pool(self.venue):
            return False
        moved = pool_moved_by_fill(self.state, fill)
        if moved is None:
            return False
        self.state = moved
        return True

    def _to_pool(self) -> None:
        if self.venue != VENUE_POOL:
            self.venue = VENUE_POOL
            self.state = MIGRATION_POOL


@dataclass(frozen=True, slots=True, kw_only=True)
class PaperOrder:
    """An order waiting for its latency to pass."""

    order_id: str
    mint: str
    side: Side
    submitted_at: float
    due_at: float
    #: SOL to spend (buy) or tokens to sell
    amount: float
    slippage_pct: float
    #: the market the decision saw, what the order expects to fill near
    expected: CurveState
    venue: str
    position_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PaperOutcome:
    """What became of a paper order: the payload to publish and, if filled, the fill."""

    order: PaperOrder
    result: OrderFilled | OrderRejected
    fill: PaperFill | None = None


def fill_on_market(
    market: Market,
    side: Side,
    amount: float,
    *,
    expected: CurveState,
    venue: str,
    slippage_pct: float,
    execution: PaperExecution,
) -> PaperFill | FillRejection:
    """Fill an order decided on ``expected`` (at ``venue``) on ``market`` as it stands.

    ``market`` is left as it was: the caller applies a fill's ``after``.
    """
    assert market.state is not None
    if side == "buy":
        if market.venue != VENUE_CURVE:
            return FillRejection(reason="the token left its bonding curve before the fill")
        return fill_buy(
            market.state,
            amount,
            expected=expected,
            execution=execution,
            slippage_pct=slippage_pct,
        )
    # an order decided on the curve and filling on the pool expects the pool's price
    return fill_sell(
        market.state,
        amount,
        expected=expected if venue == market.venue else market.state,
        execution=execution,
        venue=market.venue,
        slippage_pct=slippage_pct,
    )


def sell_order(order: ExitOrder) -> OrderRequested:
    """The sale an exit order asks for, as the executors take orders."""
    return OrderRequested(
        order_id=order.order_id,
        mint=order.mint,
        side="sell",
        token_amount=order.token_amount,
        slippage_pct=order.slippage_pct,
        reason=order.reason,
        position_id=order.position_id,
    )


@dataclass(slots=True)
class PaperBroker:
    """Fills paper orders after ``execution.latency_s`` on each token's own trade stream."""

    execution: PaperExecution = field(default_factory=PaperExecution)
    markets: dict[str, Market] = field(default_factory=dict)
    pending: dict[str, list[PaperOrder]] = field(default_factory=dict)

    def market(self, mint: str) -> Market | None:
        return self.markets.get(mint)

    def submit(
        self,
        order: OrderRequested | ExitOrder,
        *,
        time: float,
        expected: CurveState | None = None,
    ) -> PaperOutcome | None:
        """Queue ``order`` (decided at ``time``); a rejection at once if it cannot fill.

        ``expected`` is the market its decision saw, what its slippage limit is measured
        from (default: the token's market now). An exit service's :class:`ExitOrder` is
        a sale like any other.
        """
        if isinstance(order, ExitOrder):
            order = sell_order(order)
        market = self.markets.get(order.mint)
        amount = order.sol_amount if order.side == "buy" else order.token_amount
        if market is None or market.state is None:
            return self._reject_new(order, time, "no market data for the token")
        if amount is None or amount <= 0:
            return self._reject_new(order, time, f"no amount to {order.side}")
        if order.side == "buy" and market.venue != VENUE_CURVE:
            return self._reject_new(order, time, "the token has left its bonding curve")
        paper = PaperOrder(
            order_id=order.order_id,
            mint=order.mint,
            side=order.side,
            submitted_at=time,
            due_at=time + self.execution.latency_s,
            amount=float(amount),
            slippage_pct=order.slippage_pct,
            expected=market.state if expected is None else expected,
            venue=market.venue,
            position_id=order.position_id,
        )
        self.pending.setdefault(order.mint, []).append(paper)
        return None

    def observe(self, payload: object, *, time: float) -> list[PaperOutcome]:
        """Take a token event stamped ``time``; return the orders it shows are due, filled."""
        if not isinstance(payload, _TOKEN_EVENTS):
            return []
        outcomes = self._fill_due(payload.mint, before=time)
        self.markets.setdefault(payload.mint, Market()).apply(payload)
        return outcomes

    def resume(self, order: PaperOrder) -> None:
        """Queue ``order`` again as it was submitted (a restart lost the queue).

        A token not seen since starts from the market the order expected.
        """
        if order.mint not in self.markets:
            self.markets[order.mint] = Market(venue=order.venue, state=order.expected)
        pending = self.pending.setdefault(order.mint, [])
        if all(o.order_id != order.order_id for o in pending):
            pending.append(order)

    def due(self, now: float) -> list[PaperOutcome]:
        """Fill every order whose latency has passed by ``now`` on its token's last state."""
        outcomes: list[PaperOutcome] = []
        for mint in list(self.pending):
            outcomes += self._fill_due(mint, before=now, inclusive=True)
        return outcomes

    def next_due(self) -> float | None:
        """When the earliest pending order falls due, for the service's timer."""
        times = [o.due_at for orders in self.pending.values() for o in orders]
        return min(times) if times else None

    def forget(self, mint: str) -> None:
        """Drop a token's market once nothing is pending or held there."""
        if not self.pending.get(mint):
            self.markets.pop(mint, None)
            self.pending.pop(mint, None)

    # ---------------------------------------------------------------- internals

    def _fill_due(self, mint: str, *, before: float, inclusive: bool = False) -> list[PaperOutcome]:
        orders = self.pending.get(mint)
        if not orders:
            return []
        due = [o for o in orders if o.due_at < before or (inclusive and o.due_at <= before)]
        if not due:
            return []
        self.pending[mint] = [o for o in orders if o not in due]
        if not self.pending[mint]:
            del self.pending[mint]
        market = self.markets[mint]
        outcomes = []
        for order in sorted(due, key=lambda o: o.due_at):
            outcomes.append(self._fill(order, market))
        return outcomes

    def _fill(self, order: PaperOrder, market: Market) -> PaperOutcome:
        assert market.state is not None
        fill = fill_on_market(
            market,
            order.side,
            order.amount,
            expected=order.expected,
            venue=order.venue,
            slippage_pct=order.slippage_pct,
            execution=self.execution,
        )
        if isinstance(fill, FillRejection):
            return self._reject(order, fill.reason, fill.cause)
        result = fill.order_filled(order.order_id, order.mint, position_id=order.position_id)
        # the order moves the market: later orders of the token see the state it left; a
        # pool moves by what the fill says, as the engine's view and the exit service
        # follow it, and the curve until its next frame reports its reserves
        if not market.follow_fill(result):
            market.state = fill.after
        return PaperOutcome(order=order, result=result, fill=fill)

    def _reject(
        self, order: PaperOrder, reason: str, cause: RejectionCause | None = None
    ) -> PaperOutcome:
        return PaperOutcome(order=order, result=rejected(order, reason, cause=cause))

    def _reject_new(self, order: OrderRequested, time: float, reason: str) -> PaperOutcome:
        amount = (order.sol_amount if order.side == "buy" else order.token_amount) or 0.0
        paper = PaperOrder(
            order_id=order.order_id,
            mint=order.mint,
            side=order.side,
            submitted_at=time,
            due_at=time,
            amount=float(amount),
            slippage_pct=order.slippage_pct,
            expected=CurveState(),
            venue=VENUE_CURVE,
            position_id=order.position_id,
        )
        return self._reject(paper, reason)
