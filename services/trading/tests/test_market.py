"""Where a token trades in trading: on its curve until it migrates, then on its pool."""

from __future__ import annotations

from pumpflow.common.pool import is_pool
from pumpflow.common.trading import VENUE_POOL
from pumpflow.trading.ledger import MemoryLedger

from .test_service import publish, ready, running, trading


async def test_a_trade_on_any_pool_but_the_curve_is_a_migration_as_the_exit_service_says(
    clock, market
):
    """A pool other than PumpSwap's is a migration too (``pumpflow.common.pool.is_pool``,
    the exit service's test): the token trades on its pool, no longer on its curve."""
    service = trading(MemoryLedger())
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        assert not is_pool("pump") and is_pool("raydium")
        await publish(bus, market.tokens.buy(mint, "amm", sol=1.0, pool="raydium"))
        view = service.engine.views[mint]
        assert view.migrated and view.curve is None
        assert service.executor.expected(mint)[0] == VENUE_POOL
        await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 0
