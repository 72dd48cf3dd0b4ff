"""Sales of one position that overlap (a rule's sale and a graceful exit's tranche, a
tranche retried), on Postgres: together they never sell more than is held, and a
restart counts the sale it takes over in flight."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.events import Event, ExitOrder, PositionOpened, make_event
from pumpflow.trading.ledger import LedgerChange, MemoryLedger, OrderRecord, PostgresLedger

from .test_service import publish, ready, running, trading

#: long enough for every sale of a test to be in flight together
LATENCY_S = 30.0


def sale(opened: PositionOpened, n: int, tokens: float, clock) -> Event:
    order = ExitOrder(
        order_id=f"{opened.position_id}:exit:{n}",
        mint=opened.mint,
        position_id=opened.position_id,
        token_amount=tokens,
    )
    return make_event(order, source="exit/t", time=clock.now())


async def test_overlapping_sales_never_sell_more_than_is_held(clock, market, pg_pool):
    ledger = PostgresLedger(pg_pool)
    registry = CollectorRegistry()
    service = trading(ledger, registry=registry, trading_paper_latency_s=LATENCY_S)

    def sample(name: str) -> float | None:
        return registry.get_sample_value(name)

    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        await clock.advance(LATENCY_S + 1.0)
        [opened] = watch.payloads("position.opened")
        held = opened.token_amount
        assert sample("pumpflow_trading_sales_refused_total") == 0

        # both in flight, asking for 1.4 times the holding
        await publish(bus, sale(opened, 1, held * 0.7, clock), sale(opened, 2, held * 0.7, clock))
        sells = [r for r in watch.payloads("order.requested") if r.side == "sell"]
        assert [r.token_amount for r in sells] == pytest.approx([held * 0.7, held * 0.3])
        # all of it asked for: refused, never sent
        sweep = sale(opened, 3, held, clock)
        await publish(bus, sweep)
        [refused] = watch.payloads("order.rejected")
        assert refused.order_id == sweep.data.order_id
        assert "nothing to sell" in refused.reason and "sales in flight" in refused.reason
        assert sample("pumpflow_trading_sales_refused_total") == 1
        await clock.advance(service.settings.trading_tick_s)
        assert sample("pumpflow_trading_sales_in_flight") == 2

        await clock.advance(LATENCY_S + 1.0)
        sold = [f.token_amount for f in watch.payloads("order.filled") if f.side == "sell"]
        assert len(sold) == 2 and sum(sold) == pytest.approx(held, rel=1e-9)
        assert sum(sold) <= held * (1 + 1e-12)
        [closed] = watch.payloads("position.closed")
        assert closed.position_id == opened.position_id
        assert sample("pumpflow_trading_sales_in_flight") == 0
        states = {o["order_id"]: o["state"] for o in await ledger.orders(limit=10, mint=mint)}
        assert states == {
            opened.position_id: "filled",
            f"{opened.position_id}:exit:1": "filled",
            f"{opened.position_id}:exit:2": "filled",
            f"{opened.position_id}:exit:3": "rejected",
        }


async def test_a_sale_after_a_restart_leaves_what_the_sale_in_flight_asks_for(
    clock, market, pg_pool
):
    ledger = PostgresLedger(pg_pool)
    first = trading(ledger, trading_paper_latency_s=LATENCY_S)
    async with running(clock, first) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        await clock.advance(LATENCY_S + 1.0)
        [opened] = watch.payloads("position.opened")
        held = opened.token_amount
        flying = sale(opened, 1, held * 0.6, clock)
        await publish(bus, flying)
        sells = [r.order_id for r in watch.payloads("order.requested") if r.side == "sell"]
        assert sells == [flying.data.order_id]

    second = trading(ledger, trading_paper_latency_s=LATENCY_S)
    async with running(clock, second) as (bus, watch):
        assert second.reconciled == {flying.data.order_id: "resubmitted"}
        await publish(bus, sale(opened, 2, held, clock))
        [request] = watch.payloads("order.requested")
        assert request.token_amount == pytest.approx(held * 0.4, rel=1e-9)

        await clock.advance(LATENCY_S + 1.0)
        fills = watch.payloads("order.filled")
        assert sorted(f.order_id for f in fills) == [flying.data.order_id, request.order_id]
        assert sum(f.token_amount for f in fills) == pytest.approx(held, rel=1e-9)
        [closed] = watch.payloads("position.closed")
        assert closed.position_id == opened.position_id


async def test_a_sale_of_a_closed_position_never_sells_the_next_one_of_its_token(
    clock, market, pg_pool
):
    """A position closes and the token is entered again; a sale the exit service ordered
    for the closed position comes late (its lane behind): it is refused, and the new
    position keeps every token, rather than being sold by an order no exit decided for it."""
    ledger = PostgresLedger(pg_pool)
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        await clock.advance(1.0)
        [first] = watch.payloads("position.opened")
        await publish(bus, sale(first, 1, first.token_amount, clock))
        await clock.advance(1.0)
        [closed] = watch.payloads("position.closed")
        assert closed.position_id == first.position_id

        await publish(bus, market.prediction(mint))
        await clock.advance(1.0)
        [_, second] = watch.payloads("position.opened")
        assert second.position_id != first.position_id

        late = sale(first, 2, first.token_amount, clock)
        await publish(bus, late)
        [refused] = watch.payloads("order.rejected")
        assert refused.order_id == late.data.order_id
        assert first.position_id in refused.reason and "nothing to sell" in refused.reason
        await clock.advance(1.0)
        assert [f.order_id for f in watch.payloads("order.filled") if f.side == "sell"] == [
            f"{first.position_id}:exit:1"
        ]
        held = service.book.position(mint)
        assert held.position_id == second.position_id
        assert held.tokens == second.token_amount


async def test_a_take_over_refuses_a_sale_in_flight_for_a_position_closed_since(clock, market):
    """The ledger holds a sale in flight for a position that closed since, its token
    entered again (a close and a re-entry within the paper latency, the holder gone
    before the sale's outcome was stored): the next holder refuses it on reconciliation,
    rather than selling the new position with it."""
    ledger = MemoryLedger()
    first = trading(ledger)
    async with running(clock, first) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        await clock.advance(1.0)
        [closing] = watch.payloads("position.opened")
        await publish(bus, sale(closing, 1, closing.token_amount, clock))
        await clock.advance(1.0)
        await publish(bus, market.prediction(mint))
        await clock.advance(1.0)
        [_, opened] = watch.payloads("position.opened")
        view = first.engine.views[mint].curve
    flying = sale(closing, 2, closing.token_amount, clock).data
    await ledger.commit(
        LedgerChange(
            orders=[
                OrderRecord(
                    order_id=flying.order_id,
                    mint=mint,
                    side="sell",
                    sol_amount=None,
                    token_amount=flying.token_amount,
                    slippage_pct=flying.slippage_pct,
                    reason="",
                    position_id=closing.position_id,
                    cause_id=None,
                    executor="paper",
                    state="sent",
                    requested_at=clock.now(),
                    venue="pump",
                    expected_v_sol=view.v_sol,
                    expected_v_tokens=view.v_tokens,
                )
            ]
        )
    )

    second = trading(ledger)
    async with running(clock, second) as (bus, watch):
        assert second.reconciled == {flying.order_id: "rejected"}
        [refused] = await ledger.orders(limit=1, state="rejected")
        assert refused["order_id"] == flying.order_id
        outcome = refused["outcome"]
        assert closing.position_id in outcome and opened.position_id in outcome
        await publish(bus, market.tokens.buy(mint, "bob", sol=0.2))
        await clock.advance(1.0)
        assert watch.count("order.filled") == 0
        held = second.book.position(mint)
        assert held.position_id == opened.position_id
        assert held.tokens == opened.token_amount and not second.book.sales
