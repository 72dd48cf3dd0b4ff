"""LiveBook: the wallet's trades matched to the live orders waiting for them."""

from __future__ import annotations

import pytest

from pumpflow.common.events import Event
from pumpflow.common.testing.factories import TokenEvents
from pumpflow.common.trading.live import EarlyTrade, LiveBook, LiveOrder, live_entry_spend
from pumpflow.common.trading.settings import LiveExecution

WALLET = "OurWallet111"


def test_orders_due_together_where_one_resolving_settles_the_other_are_each_ended_once():
    """Two sales of a token overdue at one tick: the first, awaiting its answer, ends and
    gives the trade held for it to the second (no answer came): that one is filled, not
    given up too."""
    tokens = TokenEvents(start=0.0)
    mint = tokens.mint()
    tokens.created(mint)
    tokens.buy(mint, WALLET, sol=1.0)
    held = tokens.balance(mint, WALLET)
    book = LiveBook(LiveExecution(wallet=WALLET, confirm_s=10.0))
    for order_id, deadline in (("a", 10.0), ("b", 10.5)):
        book.add(
            LiveOrder(
                order_id=order_id,
                mint=mint,
                side="sell",
                deadline=deadline,
                sent_at=0.0,
                amount=held,
                awaiting=True,
            )
        )
    book.unanswered("b")
    sale = tokens.sell(mint, WALLET)
    assert book.observe(sale.data, time=sale.time) == [] and sale.data.signature in book.unclaimed

    rejected = book.due(11.0)

    assert [r.order_id for r in rejected] == ["a"]
    [filled] = book.settled()
    assert filled.fill.order_id == "b" and filled.fill.signature == sale.data.signature
    assert not book.pending and not book.unclaimed


def test_an_answer_timeout_not_below_the_confirmation_wait_is_refused():
    """An answer coming after its order was given up would name a signature nothing is
    kept for: the wallet's trade would go unbooked."""
    with pytest.raises(ValueError, match="answer_timeout_s must be below confirm_s"):
        LiveExecution(wallet=WALLET, answer_timeout_s=90.0, confirm_s=90.0)
    assert LiveExecution(wallet=WALLET, answer_timeout_s=5.0, confirm_s=90.0).confirm_s == 90.0


def taken_over(
    mint: str, side: str, amount: float, *, sent_at: float, slippage_pct: float = 5.0
) -> LiveBook:
    """A book holding one order of ``mint`` whose answer never came, as a take-over
    hands it back (no signature, nothing awaited)."""
    book = LiveBook(LiveExecution(wallet=WALLET, confirm_s=90.0))
    order = LiveOrder(
        order_id="o",
        mint=mint,
        side=side,
        deadline=sent_at + 90.0,
        sent_at=sent_at,
        amount=amount,
        slippage_pct=slippage_pct,
    )
    book.add(order)
    return book


def fills(book: LiveBook, trade: Event) -> list[str]:
    """The orders ``trade`` fills, by id."""
    return [c.fill.order_id for c in book.observe(trade.data, time=trade.time)]


def test_an_unanswered_buy_is_filled_by_a_wallet_trade_of_its_size_only():
    """A buy of 0.5 SOL whose answer never came: the wallet's hand buys of 0.05 and
    2 SOL on the token are not it; a buy costing the order's SOL (its fees within) is."""
    tokens = TokenEvents(start=100.0)
    mint = tokens.mint()
    tokens.created(mint)
    book = taken_over(mint, "buy", 0.5, sent_at=100.0)
    assert fills(book, tokens.buy(mint, WALLET, sol=0.05)) == []
    assert fills(book, tokens.buy(mint, WALLET, sol=2.0)) == []
    assert fills(book, tokens.sell(mint, WALLET)) == []  # the other side
    assert "o" in book.pending
    ours = tokens.buy(mint, WALLET, sol=0.5 / 1.01)  # the API's 1% out of the order's SOL
    assert fills(book, ours) == ["o"]
    assert not book.pending


@pytest.mark.parametrize(
    ("paid", "ours"),
    [
        (1.0, True),  # both fees out of the order's SOL
        (1.0125 * 1.01, True),  # the curve's 1.25% and the API's 1% on top of it
        (1.0125 * 1.01 * 1.005, True),  # and the price up by the whole slippage
        (1.0125 * 1.01 * 1.006, False),  # more than the fees and the slippage allow
        (1 / 1.005, True),  # the price down by the whole slippage
        (1 / 1.006, False),
    ],
)
def test_an_unanswered_buy_is_filled_by_a_trade_costing_its_sol_with_the_fees_on_top(paid, ours):
    """A buy of 0.5 SOL at 0.5% slippage whose answer never came: the wallet's trade
    costing the SOL with the venue's and the API's fees on top is its own, within the
    slippage either way and no further."""
    tokens = TokenEvents(start=100.0)
    mint = tokens.mint()
    tokens.created(mint)
    book = taken_over(mint, "buy", 0.5, sent_at=100.0, slippage_pct=0.5)
    # the trade's SOL with the curve's fee, the API's 1% on top of it
    trade = tokens.buy(mint, WALLET, sol=0.5 * paid / 1.01)
    assert fills(book, trade) == (["o"] if ours else [])


@pytest.mark.parametrize(("share", "ours"), [(1 - 1e-12, True), (1 + 1e-8, False)])
def test_no_trade_costing_more_than_a_live_buy_reserves_is_taken_for_its_fill(share, ours):
    """The most a live entry can spend (:func:`live_entry_spend`, what the risk manager
    reserves and checks against the limits) is the matcher's bound: a wallet trade of a
    buy whose answer never came costing that much is its fill, one costing more is not.
    So no fill the matcher books costs more than its order reserved."""
    tokens = TokenEvents(start=100.0)
    mint = tokens.mint()
    tokens.created(mint)
    book = taken_over(mint, "buy", 0.5, sent_at=100.0, slippage_pct=0.5)
    spend = live_entry_spend(book.execution, 0.5)
    most = spend.most(0.5)
    # the fill prices what the trade moved with the curve's fee, the API's 1% on both
    # and the priority fee: a buy of X SOL gross of the curve's fee costs X x 1.01 + it
    trade = tokens.buy(mint, WALLET, sol=(most * share - spend.fixed_sol) / 1.01)
    confirmed = book.observe(trade.data, time=trade.time)
    assert [c.fill.order_id for c in confirmed] == (["o"] if ours else [])
    assert all(c.fill.sol_amount <= most for c in confirmed)


def test_a_wallet_trade_stamped_before_the_order_was_sent_fills_it_not():
    tokens = TokenEvents(start=100.0)
    mint = tokens.mint()
    tokens.created(mint)
    earlier = tokens.buy(mint, WALLET, sol=0.5 / 1.01, time=90.0)
    book = taken_over(mint, "buy", 0.5, sent_at=100.0)
    assert fills(book, earlier) == []
    # the feed's clock a little behind trading's
    assert fills(book, tokens.buy(mint, WALLET, sol=0.5 / 1.01, time=99.5)) == ["o"]


def test_an_unanswered_sale_is_filled_by_a_wallet_sale_of_its_tokens_only():
    tokens = TokenEvents(start=100.0)
    mint = tokens.mint()
    tokens.created(mint)
    tokens.buy(mint, WALLET, sol=1.0)
    held = tokens.balance(mint, WALLET)
    book = taken_over(mint, "sell", held / 2, sent_at=100.0)
    assert fills(book, tokens.sell(mint, WALLET, tokens=held / 4)) == []
    assert fills(book, tokens.sell(mint, WALLET, tokens=held / 2)) == ["o"]


def test_a_trade_held_for_an_answer_fills_no_unanswered_order_of_another_size():
    """A sale of the wallet shows while one sale awaits its answer and another's never
    came; the answer names another signature: the held trade, of neither's size, is
    nobody's, and the unanswered sale still waits for its own."""
    tokens = TokenEvents(start=100.0)
    mint = tokens.mint()
    tokens.created(mint)
    tokens.buy(mint, WALLET, sol=1.0)
    held = tokens.balance(mint, WALLET)
    book = taken_over(mint, "sell", held / 2, sent_at=100.0)
    book.add(
        LiveOrder(
            order_id="p",
            mint=mint,
            side="sell",
            deadline=190.0,
            sent_at=100.0,
            amount=held / 4,
            awaiting=True,
        )
    )
    by_hand = tokens.sell(mint, WALLET, tokens=held / 8)
    assert fills(book, by_hand) == [] and by_hand.data.signature in book.unclaimed
    assert book.answered("p", "sig-of-p")
    assert book.settled() == [] and not book.unclaimed
    assert "o" in book.pending
    assert fills(book, tokens.sell(mint, WALLET, tokens=held / 2)) == ["o"]


def test_a_wallet_trade_matching_no_order_is_kept_unbooked_naming_the_orders_it_may_be():
    """A buy of 0.5 SOL at 5% slippage whose answer never came; the wallet's buy lands
    after the price fell by a fifth, costing less than the order allows: it fills
    nothing and is kept unbooked, naming the order, whose refusal names it in turn. A
    hand sale with no order of its side waiting is kept unbooked, naming none."""
    tokens = TokenEvents(start=100.0)
    mint = tokens.mint()
    tokens.created(mint)
    book = taken_over(mint, "buy", 0.5, sent_at=100.0)
    cheaper = tokens.buy(mint, WALLET, sol=0.5 / 1.01 / 1.25)
    assert fills(book, cheaper) == [] and "o" in book.pending
    [unbooked] = book.unbooked()
    assert unbooked.signature == cheaper.data.signature and unbooked.candidates == ("o",)
    assert unbooked.side == "buy" and unbooked.tokens == cheaper.data.tokenAmount
    assert book.unbooked() == []  # taken once

    [rejected] = book.due(190.0)
    assert rejected.order_id == "o" and cheaper.data.signature in rejected.reason

    by_hand = tokens.sell(mint, WALLET)
    assert fills(book, by_hand) == []
    [sold] = book.unbooked()
    assert sold.signature == by_hand.data.signature and sold.candidates == ()
    assert [u.signature for u in book.recent_unbooked] == [
        cheaper.data.signature,
        by_hand.data.signature,
    ]


def test_a_wallet_trade_held_for_an_answer_naming_another_signature_is_kept_unbooked():
    tokens = TokenEvents(start=100.0)
    mint = tokens.mint()
    tokens.created(mint)
    book = LiveBook(LiveExecution(wallet=WALLET, confirm_s=90.0))
    book.add(
        LiveOrder(
            order_id="p", mint=mint, side="buy", deadline=190.0, sent_at=100.0, amount=0.5,
            slippage_pct=5.0, awaiting=True,
        )
    )  # fmt: skip
    by_hand = tokens.buy(mint, WALLET, sol=2.0)
    assert fills(book, by_hand) == [] and book.unbooked() == []  # held for the answer
    assert book.answered("p", "sig-of-p")
    [unbooked] = book.unbooked()
    assert unbooked.signature == by_hand.data.signature and unbooked.candidates == ()


def test_a_booked_trade_delivered_again_fills_nothing_else_and_is_not_unbooked():
    """The wallet's buy filled the order whose answer never came; delivered again (here,
    or to the replica taking over, told of the fill), it is that fill's: another order of
    its size waiting for its trade is not filled by it, and nothing is unbooked."""
    tokens = TokenEvents(start=100.0)
    mint = tokens.mint()
    tokens.created(mint)
    book = taken_over(mint, "buy", 0.5, sent_at=100.0)
    ours = tokens.buy(mint, WALLET, sol=0.5)
    assert fills(book, ours) == ["o"]
    book.add(
        LiveOrder(order_id="p", mint=mint, side="buy", deadline=190.0, sent_at=100.0, amount=0.5)
    )
    assert fills(book, ours) == [] and "p" in book.pending
    assert book.unbooked() == []

    next_holder = taken_over(mint, "buy", 0.5, sent_at=100.0)
    next_holder.booked(ours.data.signature)
    assert fills(next_holder, ours) == [] and "o" in next_holder.pending
    assert next_holder.unbooked() == []


def test_a_trade_held_for_an_answer_is_given_once_to_keep_and_judged_again_after_a_take_over():
    """The wallet's buy shows while its order awaits the answer: it is given once, to
    keep in the ledger. The replica goes before the answer: the next holder, handed the
    order back (no answer, nothing awaited) and the kept trade, fills the order with it,
    at the SOL the trade moved as first seen, and knows it delivered again. A kept trade
    of another size is no order's: unbooked, naming the order it may be."""
    tokens = TokenEvents(start=100.0)
    mint = tokens.mint()
    tokens.created(mint)
    book = LiveBook(LiveExecution(wallet=WALLET, confirm_s=90.0))
    book.add(
        LiveOrder(
            order_id="o", mint=mint, side="buy", deadline=190.0, sent_at=100.0, amount=0.5,
            slippage_pct=5.0, awaiting=True,
        )
    )  # fmt: skip
    ours = tokens.buy(mint, WALLET, sol=0.5 / 1.01)
    assert fills(book, ours) == []
    [early] = book.early()
    assert early.trade == ours.data and early.time == ours.time
    assert early.sol == ours.data.solAmount and book.early() == []

    next_holder = taken_over(mint, "buy", 0.5, sent_at=100.0)
    [confirmation] = next_holder.restore_early([early])
    assert confirmation.fill.order_id == "o" and confirmation.fill.signature == ours.data.signature
    assert not confirmation.late and not next_holder.pending
    assert fills(next_holder, ours) == [] and next_holder.unbooked() == []

    by_hand = tokens.buy(mint, WALLET, sol=2.0)
    another = taken_over(mint, "buy", 0.5, sent_at=100.0)
    kept = EarlyTrade(trade=by_hand.data, sol=by_hand.data.solAmount, time=by_hand.time)
    assert another.restore_early([kept]) == [] and "o" in another.pending
    [unbooked] = another.unbooked()
    assert unbooked.signature == by_hand.data.signature and unbooked.candidates == ("o",)


def test_a_kept_trade_fills_the_order_its_stored_answer_named_after_a_take_over():
    """The answer named the trade's signature and was stored, the fill not: the next
    holder fills that order with the kept trade by its signature, whatever its size."""
    tokens = TokenEvents(start=100.0)
    mint = tokens.mint()
    tokens.created(mint)
    ours = tokens.buy(mint, WALLET, sol=0.05)
    book = taken_over(mint, "buy", 0.5, sent_at=100.0)
    book.pending["o"].signature = ours.data.signature
    kept = EarlyTrade(trade=ours.data, sol=ours.data.solAmount, time=ours.time)
    [confirmation] = book.restore_early([kept])
    assert confirmation.fill.order_id == "o" and confirmation.fill.signature == ours.data.signature
    assert not book.pending and book.unbooked() == []
