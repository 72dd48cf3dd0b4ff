"""pump.fun bonding-curve maths: constants, quotes with fees and price impact.

Constant product on virtual reserves (k = vSol x vTok); fees are taken on the SOL leg
outside the curve. Amounts are in SOL and whole tokens (floats); the on-chain
program works in lamports and 6-decimal base units, which only matters at the last
digit.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from pumpflow.common.events import Side

INITIAL_VIRTUAL_TOKEN_RESERVES = 1_073_000_000.0
INITIAL_VIRTUAL_SOL_RESERVES = 30.0
INITIAL_REAL_TOKEN_RESERVES = 793_100_000.0
TOTAL_SUPPLY = 1_000_000_000.0
TOKEN_DECIMALS = 6
LAMPORTS_PER_SOL = 1_000_000_000
#: 0.95% protocol + 0.30% creator, on the SOL leg (May 2026)
FEE_RATE = 0.0125
#: tokens that stay in the curve's virtual reserves when the real reserves run out
COMPLETE_VIRTUAL_TOKEN_RESERVES = INITIAL_VIRTUAL_TOKEN_RESERVES - INITIAL_REAL_TOKEN_RESERVES
K = INITIAL_VIRTUAL_SOL_RESERVES * INITIAL_VIRTUAL_TOKEN_RESERVES
COMPLETE_VIRTUAL_SOL_RESERVES = K / COMPLETE_VIRTUAL_TOKEN_RESERVES
#: a mayhem-mode coin mints a second billion tokens to an agent that trades them on the
#: same curve for a day (pump.fun, Nov 2025): its reserves can take that billion too
MAYHEM_EXTRA_SUPPLY = TOTAL_SUPPLY
MAX_TOKEN_SUPPLY = TOTAL_SUPPLY + MAYHEM_EXTRA_SUPPLY
MAX_VIRTUAL_TOKEN_RESERVES = INITIAL_VIRTUAL_TOKEN_RESERVES + MAYHEM_EXTRA_SUPPLY
MIN_VIRTUAL_SOL_RESERVES = K / MAX_VIRTUAL_TOKEN_RESERVES

_MAX_FLOAT = sys.float_info.max


def curve_progress(v_tokens):
    """Fraction of the sellable tokens sold (0 to 1) from virtual token reserves.

    Takes a float or a numpy array (the features' batch path), with the same arithmetic
    (a float skips numpy: the features read it once per trade).
    """
    if type(v_tokens) is float:
        real = v_tokens - COMPLETE_VIRTUAL_TOKEN_RESERVES
        if real < 0.0:  # NaN stays NaN, as with np.maximum
            real = 0.0
        share = (INITIAL_REAL_TOKEN_RESERVES - real) / INITIAL_REAL_TOKEN_RESERVES
        return 0.0 if share < 0.0 else 1.0 if share > 1.0 else share
    # here, not atop the module: the curve's constants and quotes are read by every
    # command (settings' defaults), which need no numpy; the batch path has it loaded
    import numpy as np

    real = np.maximum(0.0, np.subtract(v_tokens, COMPLETE_VIRTUAL_TOKEN_RESERVES))
    sold = INITIAL_REAL_TOKEN_RESERVES - real
    return np.clip(sold / INITIAL_REAL_TOKEN_RESERVES, 0.0, 1.0)


class CurveError(ValueError):
    """An impossible curve operation (negative amount, empty curve)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CurveState:
    """Virtual reserves of one token's curve; immutable, operations return new states."""

    v_sol: float = INITIAL_VIRTUAL_SOL_RESERVES
    v_tokens: float = INITIAL_VIRTUAL_TOKEN_RESERVES

    @property
    def real_token_reserves(self) -> float:
        return max(0.0, self.v_tokens - COMPLETE_VIRTUAL_TOKEN_RESERVES)

    @property
    def price(self) -> float:
        """Price in SOL per token."""
        return self.v_sol / self.v_tokens

    @property
    def market_cap_sol(self) -> float:
        """Market cap as PumpPortal reports it (assumes a 1B supply)."""
        return self.price * TOTAL_SUPPLY

    @property
    def sol_raised(self) -> float:
        return self.v_sol - INITIAL_VIRTUAL_SOL_RESERVES

    @property
    def progress(self) -> float:
        """Fraction of the sellable tokens sold, 0 to 1."""
        return float(curve_progress(self.v_tokens))

    @property
    def complete(self) -> bool:
        return self.real_token_reserves <= 1e-6


#: reserves of a token's PumpSwap pool right after migration, as paper trading and the
#: graceful exit's plan approximate it (argued in :mod:`pumpflow.common.trading.fills`):
#: a constant product seeded with what the curve held when it completed
MIGRATION_POOL = CurveState(
    v_sol=COMPLETE_VIRTUAL_SOL_RESERVES - INITIAL_VIRTUAL_SOL_RESERVES,
    v_tokens=TOTAL_SUPPLY - INITIAL_REAL_TOKEN_RESERVES,
)


def pool_after_trade(pool: CurveState, side: Side, sol: float, tokens: float) -> CurveState:
    """The pool moved by a trade on it of ``tokens`` for ``sol`` (net of the pool's fee).

    A pool trade's frame reports its amounts, not the pool's reserves, so the pool is
    followed from :data:`MIGRATION_POOL` trade by trade (the approximation argued in
    :mod:`pumpflow.common.trading.fills`); its spot price is the pool's ``price``.
    """
    if side == "buy":
        return CurveState(v_sol=pool.v_sol + sol, v_tokens=max(pool.v_tokens - tokens, 1.0))
    return CurveState(v_sol=max(pool.v_sol - sol, 1e-9), v_tokens=pool.v_tokens + tokens)


@dataclass(frozen=True, slots=True, kw_only=True)
class Quote:
    """Outcome of a trade against the curve."""

    tokens: float
    sol: float  # SOL paid (buy, gross with fee) or received (sell, net of fee)
    fee: float
    price_before: float
    price_after: float
    average_price: float
    after: CurveState

    @property
    def price_impact(self) -> float:
        """Relative move of the average price from the pre-trade price."""
        return abs(self.average_price / self.price_before - 1.0) if self.price_before else 0.0


def tokens_for_net_sol(state: CurveState, net_sol: float) -> float:
    """Tokens a buy of ``net_sol`` (after fees) takes from the curve, uncapped."""
    return net_sol * state.v_tokens / (state.v_sol + net_sol)


def quote_buy(state: CurveState, sol_amount: float, *, fee_rate: float = FEE_RATE) -> Quote:
    """Quote a buy of ``sol_amount`` SOL (gross, fee included); capped at the real reserves."""
    if sol_amount < 0:
        raise CurveError(f"buy amount must be >= 0, got {sol_amount}")
    if state.complete:
        raise CurveError("curve is complete")
    net = sol_amount / (1.0 + fee_rate)
    tokens = tokens_for_net_sol(state, net)
    real = state.real_token_reserves
    if tokens > real:
        tokens = real
        net = tokens * state.v_sol / (state.v_tokens - tokens)
    fee = net * fee_rate
    after = CurveState(v_sol=state.v_sol + net, v_tokens=state.v_tokens - tokens)
    return Quote(
        tokens=tokens,
        sol=net + fee,
        fee=fee,
        price_before=state.price,
        price_after=after.price,
        average_price=(net / tokens) if tokens else state.price,
        after=after,
    )


def buy_for_impact(state: CurveState, max_impact: float, *, fee_rate: float = FEE_RATE) -> float:
    """Largest buy (SOL, fee included) whose :attr:`Quote.price_impact` is at most ``max_impact``.

    A net buy ``n`` pays an average ``(vSol + n) / vTok``, ``n / vSol`` above the price
    before it, so ``n = max_impact x vSol``; capped at what the real reserves sell.
    """
    if max_impact < 0:
        raise CurveError(f"price impact must be >= 0, got {max_impact}")
    if state.complete:
        return 0.0
    net = max_impact * state.v_sol
    real = state.real_token_reserves
    if tokens_for_net_sol(state, net) > real:
        net = real * state.v_sol / (state.v_tokens - real)
    return net * (1.0 + fee_rate)


def quote_buy_tokens(state: CurveState, tokens: float, *, fee_rate: float = FEE_RATE) -> Quote:
    """Quote a buy of exactly ``tokens`` tokens."""
    if tokens < 0:
        raise CurveError(f"token amount must be >= 0, got {tokens}")
    if tokens > state.real_token_reserves:
        raise CurveError(f"only {state.real_token_reserves} tokens left on the curve")
    net = tokens * state.v_sol / (state.v_tokens - tokens)
    return quote_buy(state, net * (1.0 + fee_rate), fee_rate=fee_rate)


def quote_sell(state: CurveState, tokens: float, *, fee_rate: float = FEE_RATE) -> Quote:
    """Quote a sale of ``tokens`` tokens; ``sol`` is net of the fee."""
    if tokens < 0:
        raise CurveError(f"token amount must be >= 0, got {tokens}")
    gross = tokens * state.v_sol / (state.v_tokens + tokens)
    fee = gross * fee_rate
    after = CurveState(v_sol=state.v_sol - gross, v_tokens=state.v_tokens + tokens)
    return Quote(
        tokens=tokens,
        sol=gross - fee,
        fee=fee,
        price_before=state.price,
        price_after=after.price,
        average_price=(gross / tokens) if tokens else state.price,
        after=after,
    )


def sell_for_impact(state: CurveState, max_impact: float) -> float:
    """Most tokens a sale may sell with its :attr:`Quote.price_impact` at most ``max_impact``.

    Selling ``n`` tokens pays an average ``vSol / (vTok + n)``, ``n / (vTok + n)`` below
    the price before it (the fee is outside the curve), so ``n = i x vTok / (1 - i)``.
    """
    if not 0 <= max_impact < 1:
        raise CurveError(f"price impact must be in [0, 1), got {max_impact}")
    return max_impact * state.v_tokens / (1.0 - max_impact)


def at_price(state: CurveState, price: float) -> CurveState:
    """The state on ``state``'s own constant product whose spot price is ``price``.

    Where the market stood when it was at ``price``: the reference of an order decided at
    that price (a buy there, or a sale, quoted on it). ``state`` itself at its own price.
    """
    if not price > 0:
        raise CurveError(f"price must be > 0, got {price}")
    if price == state.price:
        return state
    k = state.v_sol * state.v_tokens
    return CurveState(v_sol=math.sqrt(k * price), v_tokens=math.sqrt(k / price))


def state_from_frame(v_sol: float, v_tokens: float) -> CurveState:
    """Curve state from a frame's ``vSolInBondingCurve`` and ``vTokensInBondingCurve``."""
    return CurveState(v_sol=float(v_sol), v_tokens=float(v_tokens))


def reserves_error(v_sol: float, v_tokens: float) -> float:
    """Relative mismatch of virtual reserves against the constant product K.

    Inf if either is not a positive finite number (an int too large for a float
    included, before any arithmetic could overflow); never raises, never NaN.
    """
    if 0 < v_sol <= _MAX_FLOAT and 0 < v_tokens <= _MAX_FLOAT:
        # a product overflows to inf or underflows to 0, never to NaN
        return abs(float(v_sol) * float(v_tokens) / K - 1.0)
    return math.inf


def market_cap_error(v_sol: float, v_tokens: float, market_cap_sol: float) -> float:
    """Relative mismatch of a market cap against the reserves' price times a 1B supply.

    PumpPortal reports the cap on a 1B supply even for a mayhem-mode coin, whose real
    supply is larger. Inf if any value is not a positive finite number.
    """
    if 0 < v_sol <= _MAX_FLOAT and 0 < v_tokens <= _MAX_FLOAT and 0 < market_cap_sol <= _MAX_FLOAT:
        v_sol = float(v_sol)
        # |cap - expected| / expected, rearranged so nothing divides by an underflowed price
        return abs(float(market_cap_sol) * float(v_tokens) / TOTAL_SUPPLY - v_sol) / v_sol
    return math.inf


def frame_consistency_error(v_sol: float, v_tokens: float, market_cap_sol: float) -> float:
    """Relative mismatch of a frame's curve fields: 0 when consistent, inf when impossible.

    Two invariants hold for every frame of a bonding curve: the virtual reserves keep
    the constant product K, and the market cap is their price times a 1B supply. The
    larger mismatch is returned; no input raises or gives NaN.
    """
    reserves = reserves_error(v_sol, v_tokens)
    market_cap = market_cap_error(v_sol, v_tokens, market_cap_sol)
    return reserves if reserves > market_cap else market_cap
