"""Fill maths of paper orders: the bonding curve exactly, the AMM pool approximately.

A buy's ``sol_amount`` is the whole spend: the trade API's fee (``api_fee_rate`` of
the SOL the trade moves) comes out of it, the rest goes to the curve, which takes
its own fee on top of what enters the reserves (:func:`pumpflow.common.curve.quote_buy`).
A sale's SOL is what the curve pays after its fee, less the API's fee. Every number
comes from :mod:`pumpflow.common.curve`; nothing here re-derives the curve.

The slippage limit compares the fill's average price with the average price the
order expected (the same order quoted on the state its decision saw): a buy filling
more than ``slippage_pct`` above it, or a sale more than ``slippage_pct`` below it,
is rejected, as the program rejects a transaction past its ``max_sol_cost`` or
``min_sol_output``.

After a token migrates it trades on PumpSwap (pool ``pump-amm``). The reference gives
no pool maths, so a sale there is priced by a documented approximation: a constant
product pool seeded with what the curve held when it completed, ~85.005 SOL raised
against the 206.9M tokens never sold on the curve (its price, 4.1085e-7 SOL, is within
0.01% of the curve's last; :data:`~pumpflow.common.curve.MIGRATION_POOL`), moved by the
amounts of the ``pump-amm`` trades the token's stream reports and of the paper orders
filled on it (:mod:`pumpflow.common.pool`, as the exit service follows it), at
``pool_fee_rate``.
Constant product is the curve's maths with the pool's reserves in place of the virtual
ones, so :func:`quote_sell` prices it. A migration fee and liquidity others add or take
are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

from pumpflow.common.curve import (
    CurveError,
    CurveState,
    quote_buy,
    quote_sell,
)
from pumpflow.common.events import SLIPPAGE, OrderFilled, RejectionCause, Side
from pumpflow.common.pool import is_pool
from pumpflow.common.pumpportal import POOL_PUMP_AMM
from pumpflow.common.trading.settings import PaperExecution

#: the bonding curve, as PumpPortal's ``pool`` field names it
VENUE_CURVE = "pump"
VENUE_POOL = POOL_PUMP_AMM


#: relative tolerance of the slippage check, so a fill exactly at the limit passes
_SLIPPAGE_EPSILON = 1e-12


@dataclass(frozen=True, slots=True, kw_only=True)
class PaperFill:
    """One order filled on paper."""

    side: Side
    venue: str
    tokens: float
    #: a buy: SOL spent in all; a sale: SOL received after every fee
    sol: float
    venue_fee: float
    api_fee: float
    #: average price on the venue, before fees
    price: float
    #: average price the order expected, on the state its decision saw
    expected_price: float
    #: adverse relative move of ``price`` against ``expected_price`` (negative: better)
    slippage: float
    #: the venue's state after the fill
    after: CurveState

    @property
    def fee_sol(self) -> float:
        return self.venue_fee + self.api_fee

    def order_filled(
        self, order_id: str, mint: str, *, position_id: str | None = None
    ) -> OrderFilled:
        """The fill as the ``order.filled`` of order ``order_id`` of ``mint``."""
        return OrderFilled(
            order_id=order_id,
            mint=mint,
            side=self.side,
            token_amount=self.tokens,
            sol_amount=self.sol,
            price=self.price,
            fee_sol=self.fee_sol,
            position_id=position_id,
            venue=self.venue,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FillRejection:
    """An order paper execution refuses, with why."""

    reason: str
    slippage: float = 0.0
    #: ``slippage`` when the market moved past the order's limit
    cause: RejectionCause | None = None


def _over_limit(slippage: float, slippage_pct: float) -> bool:
    return slippage > slippage_pct / 100.0 + _SLIPPAGE_EPSILON


def _slippage_refusal(slippage: float, limit: float) -> FillRejection:
    return FillRejection(
        reason=f"slippage {slippage:.2%} over the {limit:g}% limit",
        slippage=slippage,
        cause=SLIPPAGE,
    )


def fill_buy(
    state: CurveState,
    sol_amount: float,
    *,
    expected: CurveState,
    execution: PaperExecution,
    slippage_pct: float | None = None,
) -> PaperFill | FillRejection:
    """Fill a buy spending ``sol_amount`` SOL in all against the curve ``state``."""
    limit = execution.slippage_pct if slippage_pct is None else slippage_pct
    if sol_amount <= 0:
        return FillRejection(reason=f"nothing to buy with {sol_amount} SOL")
    trade_sol = sol_amount / (1.0 + execution.api_fee_rate)
    try:
        quote = quote_buy(state, trade_sol, fee_rate=execution.curve_fee_rate)
        wanted = quote_buy(expected, trade_sol, fee_rate=execution.curve_fee_rate)
    except CurveError as exc:
        return FillRejection(reason=str(exc))
    if quote.tokens <= 0:
        return FillRejection(reason="the curve sells no tokens")
    slippage = quote.average_price / wanted.average_price - 1.0
    if _over_limit(slippage, limit):
        return _slippage_refusal(slippage, limit)
    api_fee = quote.sol * execution.api_fee_rate
    return PaperFill(
        side="buy",
        venue=VENUE_CURVE,
        tokens=quote.tokens,
        sol=quote.sol + api_fee,
        venue_fee=quote.fee,
        api_fee=api_fee,
        price=quote.average_price,
        expected_price=wanted.average_price,
        slippage=slippage,
        after=quote.after,
    )


def fill_sell(
    state: CurveState,
    tokens: float,
    *,
    expected: CurveState,
    execution: PaperExecution,
    venue: str = VENUE_CURVE,
    slippage_pct: float | None = None,
) -> PaperFill | FillRejection:
    """Fill a sale of ``tokens`` against the curve, or the pool when ``venue`` is the pool."""
    limit = execution.slippage_pct if slippage_pct is None else slippage_pct
    if tokens <= 0:
        return FillRejection(reason=f"nothing to sell: {tokens} tokens")
    fee_rate = venue_fee_rate(execution, venue)
    quote = quote_sell(state, tokens, fee_rate=fee_rate)
    wanted = quote_sell(expected, tokens, fee_rate=fee_rate)
    slippage = 1.0 - quote.average_price / wanted.average_price
    if _over_limit(slippage, limit):
        return _slippage_refusal(slippage, limit)
    api_fee = _api_fee(quote.sol, execution)
    return PaperFill(
        side="sell",
        venue=venue,
        tokens=tokens,
        sol=quote.sol - api_fee,
        venue_fee=quote.fee,
        api_fee=api_fee,
        price=quote.average_price,
        expected_price=wanted.average_price,
        slippage=slippage,
        after=quote.after,
    )


def exit_value(
    state: CurveState, tokens: float, *, execution: PaperExecution, venue: str = VENUE_CURVE
) -> float:
    """SOL that selling ``tokens`` now would bring after every fee (a position's mark)."""
    if tokens <= 0:
        return 0.0
    # a sale against the state itself never slips: fill_sell's proceeds from one quote
    # (this runs on every trade of a held token)
    sol = quote_sell(state, tokens, fee_rate=venue_fee_rate(execution, venue)).sol
    return sol - _api_fee(sol, execution)


def venue_fee_rate(execution: PaperExecution, venue: str | None) -> float:
    """The fee rate of ``venue``'s SOL leg: the pool's, else the curve's."""
    return execution.pool_fee_rate if is_pool(venue) else execution.curve_fee_rate


def _api_fee(sol: float, execution: PaperExecution) -> float:
    """The trade API's fee on a sale's proceeds."""
    return sol * execution.api_fee_rate
