"""A migrated token's AMM pool, as paper trading and the exit service follow it.

A trade on the pool reports its amounts, not the pool's reserves, so the pool is
followed from :data:`~pumpflow.common.curve.MIGRATION_POOL` (the approximation argued
in :mod:`pumpflow.common.trading.fills`) by the amounts of everything traded on it
(:func:`~pumpflow.common.curve.pool_after_trade`):

- each trade the token's stream reports after the migration (:func:`pool_moved_by_trade`);
- each order of ours filled on the pool that the stream does not report
  (:func:`pool_moved_by_fill`): a paper fill. A live fill names the signature of the
  wallet's trade, which the stream reports and which moves the pool as any trade does;
  taken from the fill as well, the sale would move the pool twice.

Paper trading fills its orders on the pool so followed, and the exit service marks its
positions and plans its graceful exit on it: with both following it here, the exit's
rules and plan see the pool trading's next sale fills on. Each move adds the amounts
to the reserves, so the order in which a fill and the stream's trades reach a service
does not change the pool it ends with.
"""

from __future__ import annotations

from pumpflow.common.curve import MIGRATION_POOL, CurveState, pool_after_trade
from pumpflow.common.events import OrderFilled, TokenTrade
from pumpflow.common.pumpportal import POOL_PUMP


def is_pool(venue: str | None) -> bool:
    """Whether ``venue`` (PumpPortal's ``pool``) is a pool a token migrated to: named,
    and not the bonding curve (``pump``). The one test of a migration by its venue, for
    trading and the exit service alike: PumpSwap's ``pump-amm`` and any other pool."""
    return venue is not None and venue != POOL_PUMP


def pool_moved_by_trade(pool: CurveState | None, trade: TokenTrade) -> CurveState | None:
    """``pool`` (the migration's, if None) moved by ``trade``, which the token's stream
    reports after its migration; None if it moves no pool: a curve trade stamped before
    the migration and come after it, or one that says no SOL or no tokens."""
    sol, tokens = trade.solAmount, float(trade.tokenAmount)
    if trade.pool == POOL_PUMP or sol is None or tokens <= 0:
        return None
    return pool_after_trade(pool or MIGRATION_POOL, trade.txType, float(sol), tokens)


def pool_moved_by_fill(pool: CurveState | None, fill: OrderFilled) -> CurveState | None:
    """``pool`` (the migration's, if None) moved by ``fill``, an order of ours filled on
    it that the token's stream does not report; None if it moves no pool: filled on the
    curve (or not said where), or reported by the stream (a live fill: its trade's
    signature).

    The SOL the order moved in the pool is its average price there (before fees) times
    its tokens.
    """
    tokens = fill.token_amount
    if fill.signature is not None or not is_pool(fill.venue) or tokens <= 0:
        return None
    return pool_after_trade(pool or MIGRATION_POOL, fill.side, fill.price * tokens, tokens)
