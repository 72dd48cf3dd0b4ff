"""LiveBook: the wallet's trades matched to the live orders waiting for them."""

from __future__ import annotations

import pytest

from pumpflow.common.testing.factories import TokenEvents
from pumpflow.common.trading.live import LiveBook, LiveOrder
from pumpflow.common.trading.settings import LiveExecution

WALLET = "OurWallet111"


def test_orders_due_together_where_one_resolving_settles_the_other_are_each_ended_once():
    """Two sales of a token overdue at one tick: the first, awaiting its answer, ends and
    gives the trade held for it to the second (no answer came): that one is filled, not
    given up too."""
    tokens = TokenEvents()
    mint = tokens.mint()
    tokens.created(mint)
    tokens.buy(mint, WALLET, sol=1.0)
    book = LiveBook(LiveExecution(wallet=WALLET, confirm_s=10.0))
    book.add(LiveOrder(order_id="a", mint=mint, side="sell", deadline=10.0, awaiting=True))
    book.add(LiveOrder(order_id="b", mint=mint, side="sell", deadline=10.5, awaiting=True))
    book.unanswered("b")
    sale = tokens.sell(mint, WALLET).data
    assert book.observe(sale) == [] and sale.signature in book.unclaimed

    rejected = book.due(11.0)

    assert [r.order_id for r in rejected] == ["a"]
    [filled] = book.settled()
    assert filled.fill.order_id == "b" and filled.fill.signature == sale.signature
    assert not book.pending and not book.unclaimed


def test_an_answer_timeout_not_below_the_confirmation_wait_is_refused():
    """An answer coming after its order was given up would name a signature nothing is
    kept for: the wallet's trade would go unbooked."""
    with pytest.raises(ValueError, match="answer_timeout_s must be below confirm_s"):
        LiveExecution(wallet=WALLET, answer_timeout_s=90.0, confirm_s=90.0)
    assert LiveExecution(wallet=WALLET, answer_timeout_s=5.0, confirm_s=90.0).confirm_s == 90.0
