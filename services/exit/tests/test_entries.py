"""Trading's entries in flight, per mint, as the exit processor follows them: from the
buy's ``order.requested`` to its refusal, or to its fill and the position event after."""

from __future__ import annotations

import pytest

from pumpflow.common.clock import ReplayClock
from pumpflow.common.curve import state_from_frame
from pumpflow.common.events import (
    OrderFilled,
    OrderRejected,
    OrderRequested,
    PositionClosed,
    PositionOpened,
    PositionUpdated,
    TokenLifecycle,
    TokenTrade,
    make_event,
)
from pumpflow.common.exit import ExitProcessor, held_view
from pumpflow.common.keyed import UNCHANGED

from .helpers import START

MINT = "MintA"


class _Effects:
    key, now, more = MINT, START, False

    def emit(self, payload, *, time):
        raise AssertionError(f"nothing is ordered here: {payload}")

    def set_timer(self, at):
        pass

    def cancel_timer(self):
        pass

    def retire(self, ttl_s):
        pass


def _apply(processor, state, payload):
    event = make_event(payload, source="trading/test", time=START)
    return processor.apply(state, event, _Effects())


def test_an_entry_is_in_flight_until_refused_or_until_its_position_is_here():
    processor = ExitProcessor(clock=ReplayClock(START))
    state = processor.initial(MINT)
    for order_id in ("o1", "o2"):
        buy = OrderRequested(order_id=order_id, mint=MINT, side="buy", sol_amount=0.1)
        state = _apply(processor, state, buy)
    sell = OrderRequested(order_id="p:exit:1", mint=MINT, side="sell", token_amount=5.0)
    state = _apply(processor, state, sell)
    assert state.entries == {"o1": False, "o2": False}

    state = _apply(processor, state, OrderRejected(order_id="o2", mint=MINT, reason="limits"))
    filled = OrderFilled(
        order_id="o1", mint=MINT, side="buy", token_amount=1e6, sol_amount=0.1, price=1e-7,
        position_id="p",
    )  # fmt: skip
    state = _apply(processor, state, filled)
    # filled, the position is not here yet: still in flight for the graceful exit
    assert state.entries == {"o1": True}
    opened = PositionOpened(
        position_id="p", mint=MINT, token_amount=1e6, cost_sol=0.1, entry_price=1e-7
    )
    state = _apply(processor, state, opened)
    assert state.entries == {} and state.position.position_id == "p"
    # what it stores decodes back the same
    assert processor.decode(processor.encode(state)) == state


def test_a_trade_without_a_position_changes_nothing_and_the_position_takes_its_market():
    processor = ExitProcessor(clock=ReplayClock(START))
    state = processor.initial(MINT)
    stored = processor.encode(state)
    for sol in (30.0, 31.0):
        trade = TokenTrade(
            signature=f"s{sol}", mint=MINT, traderPublicKey="w", txType="buy",
            tokenAmount=1000.0, newTokenBalance=1000.0, bondingCurveKey="c",
            vTokensInBondingCurve=1e9, vSolInBondingCurve=sol,
            marketCapSol=sol,
        )  # fmt: skip
        assert _apply(processor, state, trade) is UNCHANGED
    assert processor.encode(state) == stored
    opened = PositionOpened(
        position_id="p", mint=MINT, token_amount=1e6, cost_sol=0.1, entry_price=1e-7,
        mark_price=5e-8,
    )  # fmt: skip
    state = _apply(processor, state, opened)
    # the latest trade's curve and mark, as if the state had followed them
    assert (state.v_sol, state.v_tokens) == (31.0, 1e9)
    assert state.mark_price == state_from_frame(31.0, 1e9).price


def _trade(sol: float) -> TokenTrade:
    return TokenTrade(
        signature=f"s{sol}", mint=MINT, traderPublicKey="w", txType="buy",
        tokenAmount=1000.0, newTokenBalance=1000.0, bondingCurveKey="c",
        vTokensInBondingCurve=1e9, vSolInBondingCurve=sol, marketCapSol=sol,
    )  # fmt: skip


@pytest.mark.parametrize("entry", ["in flight", "ordered after"])
def test_a_token_gone_inactive_keeps_its_market_for_the_position_its_entry_opens(entry: str):
    """The token goes inactive with an entry in flight (it stays: the entry keeps it), or
    before the entry is ordered (its retirement, asked, does not stand: the entry comes
    before it is written): the position opened holds the market of the token's latest
    trade, its curve too (without one a graceful exit sells it only in its final sweep)."""
    processor = ExitProcessor(clock=ReplayClock(START))
    state = processor.initial(MINT)
    assert _apply(processor, state, _trade(31.0)) is UNCHANGED
    buy = OrderRequested(order_id="o1", mint=MINT, side="buy", sol_amount=0.1)
    inactive = TokenLifecycle(mint=MINT, state="inactive", previous_state="active")
    for payload in [buy, inactive] if entry == "in flight" else [inactive, buy]:
        state = _apply(processor, state, payload)
    filled = OrderFilled(
        order_id="o1", mint=MINT, side="buy", token_amount=1e6, sol_amount=0.1, price=1e-7,
        position_id="p",
    )  # fmt: skip
    state = _apply(processor, state, filled)
    opened = PositionOpened(
        position_id="p", mint=MINT, token_amount=1e6, cost_sol=0.1, entry_price=1e-7,
        mark_price=5e-8,
    )  # fmt: skip
    state = _apply(processor, state, opened)
    assert (state.v_sol, state.v_tokens) == (31.0, 1e9)
    assert state.curve is not None
    assert state.mark_price == state_from_frame(31.0, 1e9).price


def test_a_sale_filled_and_delivered_again_counts_once_after_a_take_over():
    """Trading's events carry no seq: a fill delivered again to the next owner of its
    partition, after the position update that already counts it, leaves the tokens held
    as trading says (counted twice, the graceful exit sold too little and ended the run
    with tokens held)."""
    processor = ExitProcessor(clock=ReplayClock(START))
    state = processor.initial(MINT)
    opened = PositionOpened(
        position_id="p", mint=MINT, token_amount=1e6, cost_sol=0.1, entry_price=1e-7
    )
    state = _apply(processor, state, opened)
    sold = OrderFilled(
        order_id="p:exit:1", mint=MINT, side="sell", token_amount=2e5, sol_amount=0.02,
        price=1e-7, position_id="p",
    )  # fmt: skip
    state = _apply(processor, state, sold)
    assert state.position.tokens == 8e5
    updated = PositionUpdated(
        position_id="p", mint=MINT, token_amount=8e5, cost_sol=0.08, entry_price=1e-7
    )
    state = _apply(processor, state, updated)
    # the next owner restores what was stored, then gets both events again
    taken_over = ExitProcessor(clock=ReplayClock(START))
    state = taken_over.decode(processor.encode(state))
    state = _apply(taken_over, state, sold)
    assert state.position.tokens == 8e5
    state = _apply(taken_over, state, updated)
    assert state.position.tokens == 8e5


@pytest.mark.parametrize("late", ["opened", "updated"])
def test_a_position_event_applied_late_after_its_close_holds_nothing(late: str):
    """The keyed consumer applies an event whose seq was skipped when it comes (trading
    published it again, say): a position's event applied after its close is of a
    position trading no longer holds, so none is held here (held, the rules and the
    graceful exit would order sales trading refuses, the exit waiting out its deadline)."""
    processor = ExitProcessor(clock=ReplayClock(START))
    state = processor.initial(MINT)
    fields = dict(position_id="p", mint=MINT, token_amount=1e6, cost_sol=0.1, entry_price=1e-7)
    state = _apply(processor, state, PositionOpened(**fields))
    updated = PositionUpdated(**{**fields, "token_amount": 8e5})
    state = _apply(processor, state, updated)
    closed = PositionClosed(**{**fields, "token_amount": 0.0}, reason="sold")
    state = _apply(processor, state, closed)
    delivered = PositionOpened(**fields) if late == "opened" else updated
    assert _apply(processor, state, delivered) is UNCHANGED
    assert state.position is None
    assert held_view(state) is None


@pytest.mark.parametrize("outcome", ["refused", "landed"])
def test_an_entry_ordered_late_after_its_outcome_is_not_in_flight(outcome: str):
    """A buy's ``order.requested`` applied after its refusal, or after its fill and the
    position it opened (its seq skipped, then delivered): the entry is over, not in flight
    for good (its token would never retire)."""
    processor = ExitProcessor(clock=ReplayClock(START))
    state = processor.initial(MINT)
    if outcome == "refused":
        state = _apply(processor, state, OrderRejected(order_id="o1", mint=MINT, reason="limits"))
    else:
        filled = OrderFilled(
            order_id="o1", mint=MINT, side="buy", token_amount=1e6, sol_amount=0.1,
            price=1e-7, position_id="p",
        )  # fmt: skip
        state = _apply(processor, state, filled)
        opened = PositionOpened(
            position_id="p", mint=MINT, token_amount=1e6, cost_sol=0.1, entry_price=1e-7
        )
        state = _apply(processor, state, opened)
    buy = OrderRequested(order_id="o1", mint=MINT, side="buy", sol_amount=0.1)
    state = _apply(processor, state, buy)
    assert state.entries == {}


@pytest.mark.parametrize("entry", ["opening", "adding"])
def test_an_entrys_fill_delivered_after_its_position_closed_is_not_in_flight(entry: str):
    """A buy's fill delivered again (a copy without a seq) or late, after the position it
    opened or added to closed: the entry is over, not in flight for good (the token would
    never retire, and a graceful exit would wait for it to its deadline)."""
    processor = ExitProcessor(clock=ReplayClock(START))
    state = processor.initial(MINT)
    order_id = "p" if entry == "opening" else "o2"
    filled = OrderFilled(
        order_id=order_id, mint=MINT, side="buy", token_amount=1e6, sol_amount=0.1,
        price=1e-7, position_id="p",
    )  # fmt: skip
    fields = dict(position_id="p", mint=MINT, token_amount=1e6, cost_sol=0.1, entry_price=1e-7)
    if entry == "adding":
        state = _apply(processor, state, PositionOpened(**fields))
    state = _apply(processor, state, filled)
    state = _apply(processor, state, PositionUpdated(**fields))
    assert state.entries == {}
    state = _apply(processor, state, PositionClosed(**{**fields, "token_amount": 0.0}))
    state = _apply(processor, state, filled)
    assert state.entries == {} and state.position is None


def test_a_position_a_refused_entry_opened_late_is_held():
    """Live, an entry given up unconfirmed may still land: trading books its trade as the
    order's late fill, and the position it opens bears the refused order's id. It is a
    position like any other here (its id ended as an entry's, never closed)."""
    processor = ExitProcessor(clock=ReplayClock(START))
    state = processor.initial(MINT)
    refused = OrderRejected(order_id="e", mint=MINT, side="buy", reason="unconfirmed")
    state = _apply(processor, state, refused)
    late = OrderFilled(
        order_id="e", mint=MINT, side="buy", token_amount=1e6, sol_amount=0.1,
        price=1e-7, position_id="e",
    )  # fmt: skip
    state = _apply(processor, state, late)
    opened = PositionOpened(
        position_id="e", mint=MINT, token_amount=1e6, cost_sol=0.1, entry_price=1e-7
    )
    state = _apply(processor, state, opened)
    assert state.position is not None and state.position.position_id == "e"
    assert held_view(state) is not None and state.entries == {}


class _Ordering(_Effects):
    def __init__(self):
        self.orders = []

    def emit(self, payload, *, time):
        self.orders.append(payload)


def test_a_rule_sale_refused_during_a_graceful_exit_is_the_rules_again_after_it():
    """A take-profit step's sale is refused while a graceful exit halts the rules: its
    tokens are the rules' again (not counted an entry added once the exit is over, which
    would size the ladder's steps on more than was bought), and the step fires again."""
    processor = ExitProcessor(clock=ReplayClock(START))
    state = processor.initial(MINT)
    entry = state_from_frame(30.0, 1e9).price
    opened = PositionOpened(
        position_id="p", mint=MINT, token_amount=1e6, cost_sol=0.1, entry_price=entry
    )
    state = _apply(processor, state, opened)
    effects = _Ordering()
    processor.apply(state, make_event(_trade(48.0), source="feed/t", time=START), effects)
    [step] = effects.orders
    assert step.token_amount == pytest.approx(2.5e5)
    processor.halted = True
    refusal = OrderRejected(
        order_id=step.order_id, mint=MINT, side="sell", reason="slippage", position_id="p"
    )
    state = _apply(processor, state, refusal)
    processor.halted = False
    effects = _Ordering()
    processor.apply(state, make_event(_trade(48.5), source="feed/t", time=START + 1), effects)
    [again] = effects.orders
    assert again.token_amount == pytest.approx(2.5e5)
    assert state.watch.bought == pytest.approx(1e6) and state.watch.left == pytest.approx(7.5e5)
