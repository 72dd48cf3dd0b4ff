"""Paper fills equal the curve maths exactly: fee, own impact, latency, slippage, API fee."""

from __future__ import annotations

import pytest

from pumpflow.common.curve import CurveState, quote_buy, quote_sell
from pumpflow.common.events import ExitOrder, OrderFilled, OrderRejected, OrderRequested
from pumpflow.common.testing import TokenEvents
from pumpflow.common.trading import (
    MIGRATION_POOL,
    VENUE_CURVE,
    VENUE_POOL,
    FillRejection,
    PaperBroker,
    PaperExecution,
    PaperFill,
    exit_value,
    fill_buy,
    fill_sell,
)

LAUNCH = CurveState()


def test_a_buy_fills_as_the_reference_formula_says():
    # 1.01 SOL in all: 1% to the trade API leaves 1 SOL for the curve, which takes 1.25%
    fill = fill_buy(LAUNCH, 1.01, expected=LAUNCH, execution=PaperExecution())
    assert isinstance(fill, PaperFill)
    net = 1.0 / 1.0125
    tokens = net * 1_073_000_000.0 / (30.0 + net)
    assert fill.tokens == pytest.approx(tokens, rel=1e-12)
    assert fill.venue_fee == pytest.approx(net * 0.0125, rel=1e-12)
    assert fill.api_fee == pytest.approx(0.01, rel=1e-12)
    assert fill.sol == pytest.approx(1.01, rel=1e-12)
    # the order's own impact: its average price is net / vSol above the price before
    assert fill.price / LAUNCH.price - 1.0 == pytest.approx(net / 30.0, rel=1e-9)
    # and it is the common curve maths, number for number
    quote = quote_buy(LAUNCH, 1.01 / 1.01)
    assert (fill.tokens, fill.venue_fee, fill.price, fill.after) == (
        quote.tokens, quote.fee, quote.average_price, quote.after,
    )  # fmt: skip


def test_a_sale_fills_as_the_reference_formula_says():
    state = quote_buy(LAUNCH, 10.0).after
    fill = fill_sell(state, 50_000_000.0, expected=state, execution=PaperExecution())
    assert isinstance(fill, PaperFill)
    gross = 50_000_000.0 * state.v_sol / (state.v_tokens + 50_000_000.0)
    assert fill.venue_fee == pytest.approx(gross * 0.0125, rel=1e-12)
    assert fill.api_fee == pytest.approx(gross * 0.9875 * 0.01, rel=1e-12)
    assert fill.sol == pytest.approx(gross * 0.9875 * 0.99, rel=1e-12)
    quote = quote_sell(state, 50_000_000.0)
    assert fill.sol == quote.sol - quote.sol * 0.01
    assert fill.after == quote.after
    assert exit_value(state, 50_000_000.0, execution=PaperExecution()) == fill.sol


def test_slippage_over_the_limit_is_rejected_and_within_it_fills():
    moved = quote_buy(LAUNCH, 2.0).after  # others bought 2 SOL before the order landed
    wanted = quote_buy(LAUNCH, 0.5 / 1.01).average_price
    got = quote_buy(moved, 0.5 / 1.01).average_price
    slippage = got / wanted - 1.0
    assert 0.1 < slippage < 0.2
    rejected = fill_buy(moved, 0.5, expected=LAUNCH, execution=PaperExecution())
    assert isinstance(rejected, FillRejection)
    assert rejected.slippage == pytest.approx(slippage)
    assert "slippage" in rejected.reason and rejected.cause == "slippage"
    loose = fill_buy(moved, 0.5, expected=LAUNCH, execution=PaperExecution(slippage_pct=20.0))
    assert isinstance(loose, PaperFill) and loose.slippage == pytest.approx(slippage)
    # a sale into a dump is rejected the same way
    dumped = quote_sell(moved, 40_000_000.0).after
    sale = fill_sell(dumped, 1_000_000.0, expected=moved, execution=PaperExecution())
    assert isinstance(sale, FillRejection) and sale.cause == "slippage"


def order(mint: str, order_id: str = "o1", **fields) -> OrderRequested:
    fields.setdefault("side", "buy")
    if fields["side"] == "buy":
        fields.setdefault("sol_amount", 1.01)
    return OrderRequested(order_id=order_id, mint=mint, **fields)


def test_the_fill_uses_the_curve_after_the_latency_from_the_token_s_own_trades():
    tokens = TokenEvents(start=100.0, step=0.0)
    broker = PaperBroker(PaperExecution(latency_s=0.5, slippage_pct=50.0))
    mint = tokens.mint()
    other = tokens.mint()
    broker.observe(tokens.created(mint, time=99.0).data, time=99.0)
    broker.observe(tokens.created(other, time=99.0).data, time=99.0)
    decided_on = tokens.curves[mint]
    assert broker.submit(order(mint, slippage_pct=50.0), time=100.0) is None
    # a trade inside the latency moves the curve the order fills on
    assert broker.observe(tokens.buy(mint, "a", sol=1.0).data, time=100.2) == []
    inside = tokens.curves[mint]
    # another token's trades say nothing about this one's curve
    assert broker.observe(tokens.buy(other, "b", sol=9.0).data, time=100.6) == []
    # a trade after the latency shows it has passed: the fill sees the curve before it
    outcomes = broker.observe(tokens.buy(mint, "c", sol=2.0).data, time=100.7)
    assert len(outcomes) == 1
    fill = outcomes[0].fill
    assert fill == fill_buy(
        inside, 1.01, expected=decided_on, execution=broker.execution, slippage_pct=50.0
    )
    result = outcomes[0].result
    assert isinstance(result, OrderFilled)
    assert (result.token_amount, result.sol_amount, result.fee_sol) == (
        fill.tokens, fill.sol, fill.venue_fee + fill.api_fee,
    )  # fmt: skip


def test_a_quiet_token_s_order_fills_when_due_on_its_last_curve():
    tokens = TokenEvents(start=100.0, step=0.0)
    broker = PaperBroker(PaperExecution(latency_s=0.5))
    mint = tokens.mint()
    broker.observe(tokens.created(mint).data, time=100.0)
    state = tokens.curves[mint]
    broker.submit(order(mint), time=100.0)
    assert broker.next_due() == 100.5
    assert broker.due(100.4) == []
    [outcome] = broker.due(100.5)
    assert outcome.fill == fill_buy(state, 1.01, expected=state, execution=broker.execution)
    assert broker.pending == {}


def test_a_rejection_is_published_as_order_rejected():
    tokens = TokenEvents(start=100.0, step=0.0)
    broker = PaperBroker(PaperExecution(latency_s=0.5))
    mint = tokens.mint()
    broker.observe(tokens.created(mint).data, time=100.0)
    broker.submit(order(mint, slippage_pct=1.0), time=100.0)
    broker.observe(tokens.buy(mint, "whale", sol=5.0).data, time=100.1)
    [outcome] = broker.due(101.0)
    assert isinstance(outcome.result, OrderRejected)
    assert "slippage" in outcome.result.reason and outcome.fill is None
    assert outcome.result.cause == "slippage"
    unknown = broker.submit(order("never-seen"), time=100.0)
    assert isinstance(unknown.result, OrderRejected) and unknown.result.cause is None


def test_after_migration_a_sale_fills_on_the_pool_approximation():
    tokens = TokenEvents(start=100.0, step=0.0)
    execution = PaperExecution(latency_s=0.0)
    broker = PaperBroker(execution)
    mint = tokens.mint()
    broker.observe(tokens.created(mint).data, time=100.0)
    broker.observe(tokens.migrated(mint).data, time=101.0)
    # the pool starts where the curve ended: price continuous within 0.01%
    assert MIGRATION_POOL.price == pytest.approx(115.005359056806 / 279_900_000.0, rel=1e-4)
    assert broker.submit(order(mint, "b1"), time=102.0).result.reason.startswith("the token")
    broker.submit(order(mint, "s1", side="sell", token_amount=1e7), time=102.0)
    [outcome] = broker.due(102.0)
    expected = quote_sell(MIGRATION_POOL, 1e7, fee_rate=execution.pool_fee_rate)
    assert outcome.fill.venue == VENUE_POOL
    assert outcome.fill.sol == expected.sol - expected.sol * execution.api_fee_rate
    # a pump-amm trade in the token's stream moves the pool
    trade = tokens.buy(mint, "amm", sol=1.0, pool="pump-amm")
    before = broker.market(mint).state
    broker.observe(trade.data, time=103.0)
    after = broker.market(mint).state
    assert after.v_sol == pytest.approx(before.v_sol + trade.data.solAmount)
    assert after.v_tokens == pytest.approx(before.v_tokens - trade.data.tokenAmount)


def test_an_exit_order_decided_on_the_curve_fills_on_the_pool_after_migration():
    tokens = TokenEvents(start=100.0, step=0.0)
    execution = PaperExecution(latency_s=0.5)
    broker = PaperBroker(execution)
    mint = tokens.mint()
    broker.observe(tokens.created(mint).data, time=100.0)
    exit_order = ExitOrder(
        order_id="x1", mint=mint, position_id="p1", token_amount=5e6, reason="graduated"
    )
    assert broker.submit(exit_order, time=100.0) is None
    broker.observe(tokens.migrated(mint).data, time=100.2)
    [outcome] = broker.due(100.5)
    assert isinstance(outcome.result, OrderFilled)
    assert (outcome.result.side, outcome.result.position_id) == ("sell", "p1")
    # the pool's price is the one expected: the order cannot slip against the curve it left
    expected = quote_sell(MIGRATION_POOL, 5e6, fee_rate=execution.pool_fee_rate)
    assert outcome.fill.venue == VENUE_POOL and outcome.fill.slippage == 0.0
    assert outcome.fill.sol == expected.sol - expected.sol * execution.api_fee_rate


def test_a_paper_fill_says_where_it_filled_and_the_pool_moves_as_it_says():
    """A sale before the migration fills on the curve, one after on the pool, and each
    fill says where (the exit service follows the pool by the fills it is told of): the
    pool after the sale is the one the migration left, less the SOL the fill says the
    sale took out of it (its average price on the pool times its tokens), plus its
    tokens."""
    tokens = TokenEvents(start=100.0, step=0.0)
    broker = PaperBroker(PaperExecution(latency_s=0.0, slippage_pct=50.0))
    mint = tokens.mint()
    broker.observe(tokens.created(mint).data, time=100.0)
    broker.observe(tokens.buy(mint, "whale", sol=5.0).data, time=100.0)
    broker.submit(order(mint, "s1", side="sell", token_amount=1e6), time=101.0)
    [on_curve] = broker.due(101.0)
    assert on_curve.result.venue == VENUE_CURVE
    broker.observe(tokens.migrated(mint).data, time=102.0)
    broker.submit(order(mint, "s2", side="sell", token_amount=1e7), time=103.0)
    [on_pool] = broker.due(103.0)
    fill = on_pool.result
    assert fill.venue == VENUE_POOL and fill.signature is None
    after = broker.market(mint).state
    assert after.v_sol == pytest.approx(MIGRATION_POOL.v_sol - fill.price * 1e7, rel=1e-12)
    assert after.v_tokens == pytest.approx(MIGRATION_POOL.v_tokens + 1e7, rel=1e-12)
