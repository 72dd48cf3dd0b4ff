"""The requirements' TradeExecutor and PositionManager, called as the requirements list them,
on the in-memory bus and the Postgres ledger."""

from __future__ import annotations

import asyncio

import pytest

from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.curve import at_price
from pumpflow.common.events import Event, OrderFilled, OrderRejected, TokenLifecycle, make_event
from pumpflow.common.testing import START, EventCollector, TokenEvents
from pumpflow.common.trading import (
    FillRejection,
    PaperExecution,
    exit_value,
    fill_buy,
    fill_sell,
)
from pumpflow.trading.interfaces import (
    QUIET_S,
    OrderRefused,
    PositionManager,
    TradeExecutor,
)
from pumpflow.trading.ledger import FillRecord, PostgresLedger

PAPER = PaperExecution()


@pytest.fixture
async def bus():
    bus = InMemoryBus(partitions=4)
    await bus.start()
    yield bus
    await bus.close()


@pytest.fixture
def ledger(pg_pool) -> PostgresLedger:
    return PostgresLedger(pg_pool)


@pytest.fixture
async def seen(bus) -> EventCollector:
    return await EventCollector("seen").attach(bus, "order.*", "position.*")


@pytest.fixture
def tokens(clock) -> TokenEvents:
    return TokenEvents(clock=clock)


async def publish(bus: InMemoryBus, *events: Event) -> None:
    """Publish as the feed does, and wait until every consumer has handled them."""
    for event in events:
        await bus.publish(event)
    assert await bus.drain(10.0)


async def listed(bus: InMemoryBus, tokens: TokenEvents) -> str:
    """A token created and bought into, followed by the executor; its mint."""
    mint = tokens.mint()
    await publish(bus, tokens.created(mint), tokens.buy(mint, "alice", sol=3.0))
    return mint


async def test_an_entry_fills_on_the_curve_after_the_latency_stored_and_told(
    clock, bus, ledger, seen, tokens
):
    async with TradeExecutor(bus, ledger, clock=clock) as executor:
        mint = await listed(bus, tokens)
        decided = tokens.curves[mint]
        assert executor.market(mint) == ("pump", decided)
        entry = asyncio.create_task(
            executor.execute_entry(mint, 0.5, decided.price, cause_id="prediction-1")
        )
        [requested] = await seen.wait_for(1, "order.requested")
        # stamped within the latency: the order fills on the state it leaves
        await bus.publish(tokens.buy(mint, "bob", sol=0.3, time=START + 0.2))
        moved = tokens.curves[mint]
        await bus.publish(tokens.buy(mint, "carol", sol=2.0, time=START + 0.6))
        fill = await entry

    paper = fill_buy(moved, 0.5, expected=decided, execution=PAPER)
    assert fill == paper.order_filled(requested.data.order_id, mint)
    assert requested.data.sol_amount == 0.5 and requested.data.slippage_pct == PAPER.slippage_pct

    record, stored = await ledger.order(fill.order_id)
    assert (record.state, record.side, record.sol_amount, record.cause_id) == (
        "filled", "buy", 0.5, "prediction-1",
    )  # fmt: skip
    assert (record.expected_v_sol, record.expected_v_tokens) == (decided.v_sol, decided.v_tokens)
    assert stored == FillRecord.of(fill, time=START)
    [row] = await ledger.positions(open_only=True, limit=10)
    assert (row["mint"], row["token_amount"], row["cost_sol"]) == (mint, paper.tokens, paper.sol)

    told = await seen.wait_for(3, key=mint)
    assert [(e.type, e.seq) for e in told] == [
        ("order.requested", 1), ("order.filled", 2), ("position.opened", 3),
    ]  # fmt: skip
    assert told[1].data == fill
    assert told[2].data.cost_sol == paper.sol and told[2].data.position_id == fill.order_id


async def test_a_quiet_tokens_order_fills_on_its_last_state(clock, bus, ledger, seen, tokens):
    async with TradeExecutor(bus, ledger, clock=clock) as executor:
        mint = await listed(bus, tokens)
        decided = tokens.curves[mint]
        entry = asyncio.create_task(executor.execute_entry(mint, 0.25, decided.price))
        await seen.wait_for(1, "order.requested")
        await clock.advance_to(START + PAPER.latency_s + QUIET_S)
        fill = await entry
    paper = fill_buy(decided, 0.25, expected=decided, execution=PAPER)
    assert fill == paper.order_filled(fill.order_id, mint)


async def test_the_same_cause_is_one_order_sent_once_across_calls_and_restarts(
    clock, bus, ledger, seen, tokens
):
    async with TradeExecutor(bus, ledger, clock=clock) as executor:
        mint = await listed(bus, tokens)
        price = tokens.curves[mint].price
        calls = [
            asyncio.create_task(executor.execute_entry(mint, 0.5, price, cause_id="p-1"))
            for _ in range(2)
        ]
        await seen.wait_for(1, "order.requested")
        await bus.publish(tokens.buy(mint, "bob", sol=0.1, time=START + 1.0))
        first, second = await asyncio.gather(*calls)
        assert isinstance(first, OrderFilled) and second == first
        assert await executor.execute_entry(mint, 0.5, price, cause_id="p-1") == first

    # another executor on the ledger (a restart): the book as stored, the stored fill
    async with TradeExecutor(bus, ledger, clock=clock, group="restarted") as again:
        assert again.book.position(mint).tokens == first.token_amount
        again_fill = await again.execute_entry(mint, 0.5, price, cause_id="p-1")
        assert again_fill == first
        await seen.barrier(bus, keys=[mint])

    assert [e.type for e in seen.of(key=mint)] == [
        "order.requested", "order.filled", "position.opened",
    ]  # fmt: skip
    assert [o["order_id"] for o in await ledger.orders(limit=10, mint=mint)] == [first.order_id]


async def test_a_tokens_events_of_two_publishers_with_one_seq_count_and_a_redelivery_not(
    clock, bus, ledger, tokens
):
    """Each publisher numbers its own events (the service's engine drops a redelivery by
    its publisher and seq): an event of another publisher with a seq the feed took
    already moves the token's market, and a redelivery of either, its state gone since,
    leaves the market where it is."""
    async with TradeExecutor(bus, ledger, clock=clock) as executor:
        mint = await listed(bus, tokens)
        fed = tokens.buy(mint, "bob", sol=1.0)
        await publish(bus, fed)
        theirs = tokens.buy(mint, "carol", sol=1.0)
        replayed = make_event(theirs.data, source="replay/test", time=theirs.time, seq=fed.seq)
        await publish(bus, replayed)
        assert executor.market(mint) == ("pump", tokens.curves[mint])
        await publish(bus, fed)  # its curve is gone: taken again, the market would go back
        assert executor.market(mint) == ("pump", tokens.curves[mint])
        await publish(bus, tokens.buy(mint, "dave", sol=0.5, seq=fed.seq + 1))
        await publish(bus, replayed)
        assert executor.market(mint) == ("pump", tokens.curves[mint])


async def test_a_lifecycle_state_delivered_again_does_not_retire_a_token_that_came_back(
    clock, bus, ledger, tokens
):
    """Activity retires a token, the token trades again and activity says so: the
    retirement delivered again must not forget the market the token's trades rebuilt."""

    def lifecycle(mint: str, state: str, seq: int) -> Event:
        return make_event(
            TokenLifecycle(mint=mint, state=state),
            source="activity/test",
            time=clock.now(),
            seq=seq,
        )

    async with TradeExecutor(bus, ledger, clock=clock) as executor:
        mint = await listed(bus, tokens)
        retired = lifecycle(mint, "inactive", 1)
        await publish(bus, retired)
        assert executor.market(mint) == ("pump", None)
        await publish(bus, tokens.buy(mint, "bob", sol=1.0), lifecycle(mint, "active", 2))
        assert executor.market(mint) == ("pump", tokens.curves[mint])
        await publish(bus, retired)
        assert executor.market(mint) == ("pump", tokens.curves[mint])


async def test_a_market_moving_past_the_slippage_limit_refuses_the_order(
    clock, bus, ledger, seen, tokens
):
    async with TradeExecutor(bus, ledger, clock=clock) as executor:
        mint = await listed(bus, tokens)
        decided = tokens.curves[mint]
        entry = asyncio.create_task(executor.execute_entry(mint, 0.5, decided.price))
        await seen.wait_for(1, "order.requested")
        await bus.publish(tokens.buy(mint, "whale", sol=5.0, time=START + 0.2))
        moved = tokens.curves[mint]
        await bus.publish(tokens.buy(mint, "bob", sol=0.1, time=START + 0.6))
        refusal = await entry

        # a price decided before the market moved is the reference, though it moves no more
        stale = decided.price
        late = asyncio.create_task(
            executor.execute_entry(mint, 0.5, stale, cause_id="late", slippage_pct=20.0)
        )
        await seen.wait_for(2, "order.requested")
        now = tokens.curves[mint]
        await clock.advance_to(START + PAPER.latency_s + QUIET_S)
        late_refusal = await late

        unknown = await executor.execute_entry("NeverSeenpump", 0.5, 1e-7)
        nothing = await executor.execute_exit(mint, None, "stop loss")
        with pytest.raises(OrderRefused, match="no position held") as refused:
            await PositionManager(bus, executor).close_position(
                mint, None, "stop loss", cause_id="operator"
            )
        await seen.barrier(bus, keys=[mint, "NeverSeenpump"])

    expected = fill_buy(moved, 0.5, expected=decided, execution=PAPER)
    assert isinstance(expected, FillRejection) and expected.cause == "slippage"
    assert refusal == OrderRejected(
        order_id=refusal.order_id, mint=mint, reason=expected.reason, side="buy", cause="slippage"
    )
    expected = fill_buy(now, 0.5, expected=at_price(now, stale), execution=PAPER, slippage_pct=20.0)
    assert isinstance(expected, FillRejection) and late_refusal.reason == expected.reason
    assert unknown.reason == "no market data for the token"
    assert nothing.reason == "nothing to sell: no position held" and nothing.side == "sell"

    outcomes = (refusal, late_refusal, unknown, nothing, refused.value.rejection)
    for outcome in outcomes:
        record, fill = await ledger.order(outcome.order_id)
        assert (record.state, record.outcome, fill) == ("rejected", outcome.reason, None)
    assert seen.of("position.*") == []
    assert [e.data for e in seen.of("order.rejected")] == list(outcomes)


async def test_a_position_opened_and_closed_realises_its_pnl_after_every_fee(
    clock, bus, ledger, seen, tokens
):
    async with TradeExecutor(bus, ledger, clock=clock) as executor:
        manager = PositionManager(bus, executor)
        mint = await listed(bus, tokens)
        decided = tokens.curves[mint]
        opening = asyncio.create_task(manager.open_position(mint, 0.5, decided.price))
        await seen.wait_for(1, "order.requested")
        await bus.publish(tokens.buy(mint, "bob", sol=4.0, time=START + 1.0))
        position = await opening
        buy = fill_buy(decided, 0.5, expected=decided, execution=PAPER)
        assert (position.tokens, position.cost_sol, position.fees_sol) == (
            buy.tokens, buy.sol, buy.fee_sol,
        )  # fmt: skip
        assert position.is_open and manager.get_position(mint) is position

        await clock.advance_to(START + 2.0)
        top = tokens.curves[mint]
        closing = asyncio.create_task(manager.close_position(mint, top.price, "take profit"))
        await seen.wait_for(2, "order.requested")
        await bus.publish(tokens.buy(mint, "carol", sol=0.1, time=START + 3.0))
        closed = await closing
        await seen.wait_for(1, "position.closed")

    sale = fill_sell(top, buy.tokens, expected=top, execution=PAPER)
    assert closed is position and not closed.is_open and closed.close_reason == "take profit"
    assert closed.realized_pnl_sol == sale.sol - buy.sol > 0
    assert closed.fees_sol == buy.fee_sol + sale.fee_sol
    assert manager.book.realized_pnl_sol == closed.realized_pnl_sol
    assert manager.get_position(mint) is None

    [sold] = seen.payloads("order.filled", key=mint)[1:]
    assert sold == sale.order_filled(sold.order_id, mint, position_id=position.position_id)
    [told] = seen.payloads("position.closed")
    assert (told.reason, told.realized_pnl_sol, told.token_amount) == (
        "take profit", closed.realized_pnl_sol, 0.0,
    )  # fmt: skip
    [row] = await ledger.positions(open_only=False, limit=10)
    assert row["closed_at"] == START + 2.0
    assert (row["close_reason"], row["realized_pnl_sol"], row["fees_sol"]) == (
        "take profit", closed.realized_pnl_sol, closed.fees_sol,
    )  # fmt: skip


async def test_update_positions_marks_each_position_from_its_tokens_latest_trade(
    clock, bus, ledger, seen, tokens
):
    async with TradeExecutor(bus, ledger, clock=clock) as executor:
        manager = PositionManager(bus, executor)
        mint = await listed(bus, tokens)
        opening = asyncio.create_task(manager.open_position(mint, 0.5, tokens.curves[mint].price))
        await seen.wait_for(1, "order.requested")
        await bus.publish(tokens.buy(mint, "bob", sol=0.2, time=START + 1.0))
        position = await opening
        assert position.mark_price is None

        await publish(bus, tokens.sell(mint, "alice", time=START + 2.0))
        later = tokens.curves[mint]
        await clock.advance_to(START + 2.0)
        assert await manager.update_positions() == [position]
        value = exit_value(later, position.tokens, execution=PAPER)
        assert (position.mark_price, position.mark_value_sol, position.marked_at) == (
            later.price, value, START + 2.0,
        )  # fmt: skip
        assert position.unrealized_pnl_sol == value - position.cost_sol < 0

        # nothing traded since: nothing to tell
        assert await manager.update_positions() == [position]
        await seen.barrier(bus, keys=[mint])

    [told] = seen.payloads("position.updated")
    assert (told.mark_price, told.unrealized_pnl_sol) == (later.price, position.unrealized_pnl_sol)
    [row] = await ledger.positions(open_only=True, limit=10)
    assert row["mark_price"] == later.price


async def test_an_order_out_when_its_executor_stops_fills_after_a_restart(
    clock, bus, ledger, seen, tokens
):
    executor = TradeExecutor(bus, ledger, clock=clock)
    await executor.start()
    mint = await listed(bus, tokens)
    decided = tokens.curves[mint]
    entry = asyncio.create_task(executor.execute_entry(mint, 0.5, None, cause_id="p-9"))
    [requested] = await seen.wait_for(1, "order.requested")
    await executor.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        await entry
    assert (await ledger.order(requested.data.order_id))[0].state == "sent"

    async with TradeExecutor(bus, ledger, clock=clock) as again:
        # queued again as it was submitted: the token quiet since, on the state it expected
        await clock.advance_to(START + PAPER.latency_s + QUIET_S)
        fill = await again.execute_entry(mint, 0.5, None, cause_id="p-9")
        paper = fill_buy(decided, 0.5, expected=decided, execution=PAPER)
        assert fill == paper.order_filled(requested.data.order_id, mint)
        assert again.book.position(mint).tokens == paper.tokens
        await seen.wait_for(1, "position.opened")
    assert [(e.type, e.seq) for e in seen.of(key=mint)] == [
        ("order.requested", 1), ("order.filled", 2), ("position.opened", 3),
    ]  # fmt: skip
