"""One market per token in paper mode: the engine's views follow trading's own paper
fills (which the token's stream never reports) as the paper executor does, so the
positions' marks and a take-over see the market the next paper order fills on."""

from __future__ import annotations

import pytest

from pumpflow.common.events import PositionOpened
from pumpflow.common.pool import is_pool
from pumpflow.common.state import MemoryStateStore
from pumpflow.common.trading import VENUE_POOL
from pumpflow.trading.context import VIEW_PREFIX
from pumpflow.trading.ledger import Ledger, MemoryLedger, PostgresLedger

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


async def second_sale_price(
    clock, market, *, take_over: bool, views_lost: bool = False, ledger: Ledger | None = None
) -> float:
    """The price the second of two paper sales on the pool fills at, the replica trading
    going between them or not; ``views_lost``: it died after storing the first sale's
    fill in the ledger, before the views it moved were stored."""
    ledger, store = ledger or MemoryLedger(), MemoryStateStore(clock)
    first = trading(ledger, trading_keep_token_views=True)
    async with running(clock, first, store=store) as (bus, watch):
        opened = await open_on_pool(bus, watch, market, clock)
        view_key = VIEW_PREFIX + opened.mint
        before_sale = await store.get(view_key)
        await publish(bus, sale(opened, 1, opened.token_amount / 3, clock))
        await clock.advance(1.0)
        assert watch.count("order.filled") == 2
        if views_lost:
            assert await store.get(view_key) != before_sale
            await store.set(view_key, before_sale)
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


async def test_a_paper_fill_on_the_pool_the_stored_views_lack_moves_the_next_replicas_pool(
    clock, market
):
    """The ledger is written before the views: a replica dying between the two leaves
    the fill stored and the pool it moved not; the next one moves it by the ledger's."""
    uninterrupted = await second_sale_price(clock, market, take_over=False)
    views_lost = await second_sale_price(clock, market, take_over=True, views_lost=True)
    assert views_lost == pytest.approx(uninterrupted, rel=1e-12)


async def test_the_ledger_in_postgres_keeps_where_each_fill_filled_for_the_next_replica(
    clock, market, pg_pool
):
    uninterrupted = await second_sale_price(clock, market, take_over=False)
    views_lost = await second_sale_price(
        clock, market, take_over=True, views_lost=True, ledger=PostgresLedger(pg_pool)
    )
    assert views_lost == pytest.approx(uninterrupted, rel=1e-12)


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
