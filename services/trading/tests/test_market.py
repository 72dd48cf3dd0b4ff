"""One market per token in paper mode: the engine's views follow trading's own paper
fills (which the token's stream never reports) as the paper executor does, so the
positions' marks and a take-over see the market the next paper order fills on."""

from __future__ import annotations

import pytest

from pumpflow.common.events import PositionOpened
from pumpflow.common.pool import is_pool
from pumpflow.common.state import MemoryStateStore
from pumpflow.common.trading import VENUE_POOL
from pumpflow.trading.ledger import MemoryLedger

from .test_sales import sale
from .test_service import publish, ready, running, trading


async def open_on_pool(bus, watch, market, clock) -> PositionOpened:
    """A position entered on the curve, its token migrated and traded on its pool since."""
    mint = await ready(bus, market)
    await publish(bus, market.prediction(mint))
    await clock.advance(1.0)
    [opened] = watch.payloads("position.opened")
    await publish(bus, market.tokens.migrated(mint))
    await publish(bus, market.tokens.buy(mint, "amm", sol=2.0, pool="pump-amm"))
    return opened


async def test_a_paper_sale_on_the_pool_moves_the_positions_mark(clock, market):
    service = trading(MemoryLedger())
    async with running(clock, service) as (bus, watch):
        opened = await open_on_pool(bus, watch, market, clock)
        mint = opened.mint
        before = service.book.open_positions[mint].mark_price
        await publish(bus, sale(opened, 1, opened.token_amount / 2, clock))
        await clock.advance(1.0)
        assert watch.count("order.filled") == 2
        venue, pool = service.executor.expected(mint)
        assert venue == VENUE_POOL
        position = service.book.open_positions[mint]
        assert position.mark_state == pool
        assert position.mark_price == pytest.approx(pool.price, rel=1e-12)
        assert position.mark_price < before
        assert service.engine.views[mint].market.state == pool


async def second_sale_price(clock, market, *, take_over: bool) -> float:
    """The price the second of two paper sales on the pool fills at, the replica trading
    going between them or not."""
    ledger, store = MemoryLedger(), MemoryStateStore(clock)
    first = trading(ledger, trading_keep_token_views=True)
    async with running(clock, first, store=store) as (bus, watch):
        opened = await open_on_pool(bus, watch, market, clock)
        await publish(bus, sale(opened, 1, opened.token_amount / 3, clock))
        await clock.advance(1.0)
        assert watch.count("order.filled") == 2
        if not take_over:
            await publish(bus, sale(opened, 2, opened.token_amount / 3, clock))
            await clock.advance(1.0)
            return watch.payloads("order.filled")[-1].price

    second = trading(ledger, trading_keep_token_views=True)
    async with running(clock, second, store=store) as (bus, watch):
        await publish(bus, sale(opened, 2, opened.token_amount / 3, clock))
        await clock.advance(1.0)
        [filled] = watch.payloads("order.filled")
        return filled.price


async def test_a_take_over_after_a_paper_fill_fills_the_next_order_where_one_replica_would(
    clock, market
):
    uninterrupted = await second_sale_price(clock, market, take_over=False)
    taken_over = await second_sale_price(clock, market, take_over=True)
    assert taken_over == pytest.approx(uninterrupted, rel=1e-12)


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
