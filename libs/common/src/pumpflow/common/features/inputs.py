"""Turn token events into the numbers features are computed from (one place for both paths).

A trade reaches the features as :class:`TradeInput`: event time, side, SOL amount (in
lamports, an integer, so sums over windows are exact in both the incremental and the
batch path), token amount, trader, the trader's balance after the trade and the
curve's virtual reserves after it. A token's creation counts as the creator's first
buy (``initialBuy`` tokens).
"""

from __future__ import annotations

from typing import NamedTuple

from pumpflow.common.curve import (
    LAMPORTS_PER_SOL,
    CurveError,
    CurveState,
    quote_buy_tokens,
    quote_sell,
)
from pumpflow.common.events import Event, Payload, TokenCreated, TokenTrade


class TradeInput(NamedTuple):
    """One trade (or creation) as the features see it."""

    time: float
    is_buy: bool
    lamports: int
    tokens: float
    trader: str
    new_balance: float
    v_sol: float
    v_tokens: float


def derive_sol_amount(*, is_buy: bool, tokens: float, v_sol: float, v_tokens: float) -> float:
    """SOL that moved through the curve (net of fees) for a trade, from the reserves after it.

    Old trade frames carry no ``solAmount``. Undoing the trade on the post-trade curve
    gives it: a buy of ``tokens`` is undone by selling them back, a sell by buying them
    back, both without fees (PumpPortal's ``solAmount`` is the reserve change).
    """
    if tokens <= 0 or v_sol <= 0 or v_tokens <= 0:
        return 0.0
    after = CurveState(v_sol=float(v_sol), v_tokens=float(v_tokens))
    try:
        if is_buy:
            return quote_sell(after, float(tokens), fee_rate=0.0).sol
        return quote_buy_tokens(after, float(tokens), fee_rate=0.0).sol
    except CurveError:
        # A sell bigger than what the curve could hand back: the frame is inconsistent.
        return 0.0


def sol_amount_of(payload: TokenTrade | TokenCreated) -> float:
    """The trade's SOL amount: ``solAmount`` when present, else derived from the curve."""
    if payload.solAmount is not None:
        return float(payload.solAmount)
    if isinstance(payload, TokenCreated):
        return derive_sol_amount(
            is_buy=True,
            tokens=float(payload.initialBuy),
            v_sol=payload.vSolInBondingCurve,
            v_tokens=payload.vTokensInBondingCurve,
        )
    return derive_sol_amount(
        is_buy=payload.txType == "buy",
        tokens=float(payload.tokenAmount),
        v_sol=payload.vSolInBondingCurve,
        v_tokens=payload.vTokensInBondingCurve,
    )


def to_lamports(sol: float) -> int:
    """SOL to whole lamports (round half to even, as ``numpy.rint`` does)."""
    return round(sol * LAMPORTS_PER_SOL)


#: builds a TradeInput from a tuple of its fields: a named tuple's own constructor
#: takes its arguments through a Python function, four times as long, once per trade
_new_input = tuple.__new__


def trade_input(payload: Payload, time: float) -> TradeInput | None:
    """The :class:`TradeInput` of a token.created or token.trade payload; None for others."""
    if isinstance(payload, TokenTrade):
        return _new_input(TradeInput, (
            float(time),
            payload.txType == "buy",
            to_lamports(sol_amount_of(payload)),
            float(payload.tokenAmount),
            payload.traderPublicKey,
            float(payload.newTokenBalance),
            float(payload.vSolInBondingCurve),
            float(payload.vTokensInBondingCurve),
        ))  # fmt: skip
    if isinstance(payload, TokenCreated):
        return _new_input(TradeInput, (
            float(time),
            True,
            to_lamports(sol_amount_of(payload)),
            float(payload.initialBuy),
            payload.traderPublicKey,
            float(payload.initialBuy),
            float(payload.vSolInBondingCurve),
            float(payload.vTokensInBondingCurve),
        ))  # fmt: skip
    return None


def event_input(event: Event) -> TradeInput | None:
    """The :class:`TradeInput` of a token event, stamped with the event's time."""
    return trade_input(event.data, event.time)
