"""The position book: PnL after every fee, exact on a worked example."""

from __future__ import annotations

import random

import pytest

from pumpflow.common.curve import CurveState, quote_buy
from pumpflow.common.events import OrderFilled, PositionClosed, PositionOpened, PositionUpdated
from pumpflow.common.trading import PaperExecution, PaperFill, PositionBook, fill_buy, fill_sell
from pumpflow.common.trading.positions import CLOSED_KEPT

LAUNCH = CurveState()
EXECUTION = PaperExecution()


def filled(order_id: str, fill: PaperFill, mint: str = "m") -> OrderFilled:
    return fill.order_filled(order_id, mint)


def test_pnl_after_every_fee_on_a_worked_example():
    """Buy 1.01 SOL at launch, another wallet buys 5 SOL, sell everything.

    By the reference's formulas: 1% of the 1.01 SOL goes to the trade API, the curve
    takes 1 SOL, 1.25% of its net as its fee; the sale's SOL loses 1.25% to the curve
    and then 1% to the API.
    """
    book = PositionBook(EXECUTION)
    net1 = 1.0 / 1.0125
    tokens = net1 * 1_073_000_000.0 / (30.0 + net1)
    v_sol, v_tok = 30.0 + net1, 1_073_000_000.0 - tokens
    net2 = 5.0 / 1.0125
    v_sol, v_tok = v_sol + net2, v_tok - net2 * v_tok / (v_sol + net2)
    gross = tokens * v_sol / (v_tok + tokens)
    proceeds = gross * (1 - 0.0125) * (1 - 0.01)
    pnl = proceeds - 1.01

    buy = fill_buy(LAUNCH, 1.01, expected=LAUNCH, execution=EXECUTION)
    opened = book.apply_fill(filled("entry-1", buy), time=10.0)
    assert isinstance(opened, PositionOpened)
    assert opened.position_id == "entry-1"
    assert opened.token_amount == pytest.approx(tokens, rel=1e-12)
    assert opened.cost_sol == pytest.approx(1.01, rel=1e-12)
    assert opened.entry_price == pytest.approx(1.01 / tokens, rel=1e-12)

    after_other = quote_buy(buy.after, 5.0).after
    assert (after_other.v_sol, after_other.v_tokens) == pytest.approx((v_sol, v_tok), rel=1e-12)
    position = book.mark("m", after_other, time=11.0)
    # the mark is what selling it all now would realise, after every fee
    assert position.unrealized_pnl_sol == pytest.approx(pnl, rel=1e-9)
    assert book.unrealized_pnl_sol == position.unrealized_pnl_sol

    sale = fill_sell(after_other, buy.tokens, expected=after_other, execution=EXECUTION)
    assert sale.sol == pytest.approx(proceeds, rel=1e-12)
    closed = book.apply_fill(filled("exit-1", sale), time=12.0, reason="take profit")
    assert isinstance(closed, PositionClosed) and closed.reason == "take profit"
    assert closed.realized_pnl_sol == pytest.approx(pnl, rel=1e-9)
    assert closed.unrealized_pnl_sol == 0.0
    assert book.realized_pnl_sol == closed.realized_pnl_sol
    assert book.open_count == 0 and book.total_exposure == 0.0
    assert pnl > 0  # 5 SOL bought after us outweigh the ~4.5% the round trip paid


def test_a_partial_sale_realises_its_share_of_the_cost_and_a_fill_counts_once():
    book = PositionBook(EXECUTION)
    buy = fill_buy(LAUNCH, 2.02, expected=LAUNCH, execution=EXECUTION)
    book.apply_fill(filled("e", buy), time=1.0)
    assert book.apply_fill(filled("e", buy), time=1.0) is None  # redelivered
    assert book.position("m").tokens == buy.tokens
    half = fill_sell(buy.after, buy.tokens / 2, expected=buy.after, execution=EXECUTION)
    updated = book.apply_fill(filled("x1", half), time=2.0)
    assert isinstance(updated, PositionUpdated)
    assert updated.realized_pnl_sol == pytest.approx(half.sol - buy.sol / 2, rel=1e-12)
    assert updated.cost_sol == pytest.approx(buy.sol / 2, rel=1e-12)
    assert book.realized_since(2.0) == updated.realized_pnl_sol
    assert book.realized_since(2.5) == 0.0
    # selling straight back loses the fees both ways and the impact
    assert updated.realized_pnl_sol < 0


def test_a_sale_of_more_than_is_held_is_booked_for_what_was_held():
    book = PositionBook(EXECUTION)
    buy = fill_buy(LAUNCH, 2.02, expected=LAUNCH, execution=EXECUTION)
    book.apply_fill(filled("e", buy), time=1.0)
    # twice the holding sold (a late fill beside its retry): half the SOL was never ours
    double = fill_sell(buy.after, buy.tokens * 2, expected=buy.after, execution=EXECUTION)
    closed = book.apply_fill(filled("x", double), time=2.0)
    assert isinstance(closed, PositionClosed)
    assert closed.realized_pnl_sol == pytest.approx(double.sol / 2 - buy.sol, rel=1e-12)


def test_overlapping_sales_never_ask_together_for_more_than_is_held():
    """Each sale gets what is held less what the sales in flight ask for, until its
    outcome: a fill takes what it sold out of the holding, a refusal gives it back."""
    book = PositionBook(EXECUTION)
    buy = fill_buy(LAUNCH, 2.02, expected=LAUNCH, execution=EXECUTION)
    book.apply_fill(filled("e", buy), time=1.0)
    held = buy.tokens

    rule = book.reserve_sale("rule", "m", held * 0.7)
    assert rule and rule.tokens == held * 0.7
    tranche = book.reserve_sale("tranche", "m", held * 0.7)
    assert tranche.tokens == pytest.approx(held * 0.3, rel=1e-12)
    sweep = book.reserve_sale("sweep", "m", held)
    assert not sweep and sweep.tokens == 0.0
    assert "all asked for by sales in flight" in sweep.reason
    assert book.sellable("m") == 0.0 and "sweep" not in book.sales

    # the rule's sale fills: what it sold leaves the holding, its reservation with it
    sold = fill_sell(buy.after, rule.tokens, expected=buy.after, execution=EXECUTION)
    book.apply_fill(filled("rule", sold), time=2.0)
    assert book.position("m").tokens == pytest.approx(held * 0.3, rel=1e-9)
    assert book.sales.keys() == {"tranche"}
    assert not book.reserve_sale("sweep", "m", held)
    # the tranche is refused: its tokens may sell again
    book.release_sale("tranche")
    again = book.reserve_sale("sweep", "m", held)
    assert again.tokens == pytest.approx(held * 0.3, rel=1e-9)

    # a sale in flight before a restart reserves all it asks for, whatever is left
    restarted = PositionBook(EXECUTION)
    restarted.apply_fill(filled("e", buy), time=1.0)
    restarted.resume_sale("flying", "m", held * 0.6)
    assert restarted.reserve_sale("next", "m", held).tokens == pytest.approx(held * 0.4)
    assert not PositionBook(EXECUTION).reserve_sale("x", "m", 1.0)  # nothing held


def test_realised_pnl_since_a_start_is_the_sum_of_the_sales_since_across_a_new_start():
    """The running sums against the sums over every sale, the start moving a day on."""
    book = PositionBook(EXECUTION)
    rng = random.Random(7)
    day = 86_400.0 * 20_000
    sales: list[tuple[float, float]] = []
    time = day - 3_600.0
    for n in range(200):
        mint = f"m{n}"
        buy = fill_buy(LAUNCH, rng.uniform(0.1, 2.0), expected=LAUNCH, execution=EXECUTION)
        book.apply_fill(filled(f"b{n}", buy, mint), time=time)
        sale = fill_sell(
            buy.after, buy.tokens, expected=buy.after, execution=EXECUTION, slippage_pct=100.0
        )
        closed = book.apply_fill(filled(f"s{n}", sale, mint), time=time)
        sales.append((time, closed.realized_pnl_sol))
        start = (time // 86_400.0) * 86_400.0  # the current day's start (UTC)
        expected = sum(pnl for t, pnl in sales if t >= start)
        assert book.realized_since(start) == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert book.realized_pnl_sol == pytest.approx(sum(p for _, p in sales), rel=1e-9)
        time += rng.uniform(0.0, 1_200.0)
    assert any(t < day for t, _ in sales) and any(t >= day + 86_400.0 for t, _ in sales)


def test_a_long_run_of_closed_positions_keeps_the_latest_and_the_totals_of_all():
    """Weeks of positions closed leave in memory the latest ``CLOSED_KEPT`` with the
    order ids of their fills, and the open ones with theirs; the count, the fees and the
    realised PnL of every one stay, as numbers."""
    book = PositionBook(EXECUTION)
    rng = random.Random(11)
    closes = 30 * CLOSED_KEPT
    realized = fees = 0.0
    time = 0.0
    for n in range(closes):
        mint = f"m{n}"
        buy = fill_buy(LAUNCH, rng.uniform(0.1, 2.0), expected=LAUNCH, execution=EXECUTION)
        book.apply_fill(filled(f"b{n}", buy, mint), time=time)
        sale = fill_sell(buy.after, buy.tokens, expected=buy.after, execution=EXECUTION)
        closed = book.apply_fill(filled(f"s{n}", sale, mint), time=time + 60.0)
        realized += closed.realized_pnl_sol
        fees += buy.fee_sol + sale.fee_sol
        time += 600.0  # 144 positions a day, for 20 days
    buy = fill_buy(LAUNCH, 1.0, expected=LAUNCH, execution=EXECUTION)
    book.apply_fill(filled("held", buy, "h"), time=time)
    half = fill_sell(buy.after, buy.tokens / 2, expected=buy.after, execution=EXECUTION)
    realized += book.apply_fill(filled("half", half, "h"), time=time).realized_pnl_sol
    fees += buy.fee_sol + half.fee_sol

    latest = range(closes - CLOSED_KEPT, closes)
    assert [p.position_id for p in book.closed_positions] == [f"b{n}" for n in latest]
    assert book.applied_orders == {
        "held", "half", *(f"b{n}" for n in latest), *(f"s{n}" for n in latest)
    }  # fmt: skip
    assert book.open_count == 1 and len(book.sales) == 0
    # the daily loss limit's window, two days of sales
    assert len(book.realizations) <= 2 * 144 + 2
    assert book.closed_count == closes
    assert book.realized_pnl_sol == pytest.approx(realized, rel=1e-9)
    assert book.fees_sol == pytest.approx(fees, rel=1e-9)
    # a fill delivered again counts once, of the latest closed and of the one held
    last = closes - 1
    assert book.apply_fill(filled(f"b{last}", buy, f"m{last}"), time=time) is None
    assert book.apply_fill(filled("held", buy, "h"), time=time) is None
    assert book.open_positions.keys() == {"h"}
    assert book.position("h").tokens == pytest.approx(buy.tokens / 2)
