"""Bonding-curve maths against the figures of docs/market.md, and its invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pumpflow.common import curve
from pumpflow.common.curve import CurveError, CurveState

START = CurveState()


@pytest.mark.parametrize(
    ("net_sol", "tokens"),
    [(0.059259258, 2_115_327.70), (2.0, 67_062_500.0), (0.247518046, 8_780_451.43)],
)
def test_creator_buys_from_the_initial_reserves(net_sol, tokens):
    assert curve.tokens_for_net_sol(START, net_sol) == pytest.approx(tokens, abs=0.01)


def test_the_live_creation_frame_matches_the_curve():
    # the frame: initialBuy 2115327.702796 for solAmount 0.059259258, reserves after
    after = CurveState(
        v_sol=START.v_sol + 0.059259258,
        v_tokens=START.v_tokens - curve.tokens_for_net_sol(START, 0.059259258),
    )
    assert after.v_tokens == pytest.approx(1070884672.297204, abs=1e-3)
    assert after.market_cap_sol == pytest.approx(28.069557848389476, rel=1e-9)
    assert curve.frame_consistency_error(30.059259257999976, 1070884672.297204, 28.0695578) < 1e-8


def test_completion_figures():
    assert curve.COMPLETE_VIRTUAL_TOKEN_RESERVES == 279_900_000.0
    done = CurveState(v_sol=curve.COMPLETE_VIRTUAL_SOL_RESERVES, v_tokens=279_900_000.0)
    assert done.sol_raised == pytest.approx(85.005, abs=0.001)
    assert done.market_cap_sol == pytest.approx(410.88, abs=0.01)
    assert done.price / START.price == pytest.approx(14.7, abs=0.05)
    assert done.complete and done.progress == 1.0
    assert START.progress == 0.0 and not START.complete


def test_a_buy_bigger_than_the_curve_is_capped_and_completes_it():
    quote = curve.quote_buy(START, 500.0)
    assert quote.tokens == pytest.approx(curve.INITIAL_REAL_TOKEN_RESERVES)
    assert quote.after.complete
    assert quote.after.sol_raised == pytest.approx(85.005, abs=0.001)
    assert quote.sol == pytest.approx(quote.after.sol_raised * (1 + curve.FEE_RATE))
    with pytest.raises(CurveError, match="complete"):
        curve.quote_buy(quote.after, 1.0)


def test_fees_are_on_the_sol_leg():
    buy = curve.quote_buy(START, 1.0125)
    assert buy.fee == pytest.approx(0.0125)
    assert buy.after.v_sol == pytest.approx(31.0)
    sell = curve.quote_sell(buy.after, buy.tokens)
    gross = buy.tokens * buy.after.v_sol / (buy.after.v_tokens + buy.tokens)
    assert sell.fee == pytest.approx(gross * curve.FEE_RATE)
    assert sell.sol == pytest.approx(gross - sell.fee)


def test_exact_token_buys_and_bad_amounts():
    quote = curve.quote_buy_tokens(START, 10_000_000.0)
    assert quote.tokens == pytest.approx(10_000_000.0)
    with pytest.raises(CurveError):
        curve.quote_buy(START, -1.0)
    with pytest.raises(CurveError):
        curve.quote_sell(START, -1.0)
    with pytest.raises(CurveError):
        curve.quote_buy_tokens(START, curve.INITIAL_REAL_TOKEN_RESERVES + 1)


# -- properties ---------------------------------------------------------------------------

sol_amounts = st.floats(min_value=1e-6, max_value=200.0, allow_nan=False)
fee_rates = st.sampled_from([0.0, 0.0125, 0.05])


@st.composite
def states(draw) -> CurveState:
    """Reachable curves: the start after some net buying."""
    bought = draw(st.floats(min_value=0.0, max_value=84.0, allow_nan=False))
    return curve.quote_buy(START, bought, fee_rate=0.0).after if bought else START


@settings(max_examples=300, deadline=None)
@given(state=states(), sol=sol_amounts, fee_rate=fee_rates)
def test_buying_then_selling_never_returns_more_than_was_paid(state, sol, fee_rate):
    buy = curve.quote_buy(state, sol, fee_rate=fee_rate)
    sell = curve.quote_sell(buy.after, buy.tokens, fee_rate=fee_rate)
    assert sell.sol <= buy.sol * (1 + 1e-12)
    # a round trip back to where it started restores the reserves
    assert sell.after.v_tokens == pytest.approx(state.v_tokens, rel=1e-9)


@settings(max_examples=300, deadline=None)
@given(state=states(), sol=sol_amounts, tokens=st.floats(min_value=0.0, max_value=1e9))
def test_reserves_stay_positive(state, sol, tokens):
    buy = curve.quote_buy(state, sol)
    assert buy.after.v_sol > 0 and buy.after.v_tokens > 0
    assert buy.tokens <= state.real_token_reserves * (1 + 1e-12)
    assert buy.after.v_tokens >= curve.COMPLETE_VIRTUAL_TOKEN_RESERVES * (1 - 1e-12)
    sell = curve.quote_sell(state, tokens)
    assert sell.after.v_sol > 0 and sell.after.v_tokens > 0
    assert 0 <= sell.sol < state.v_sol


@settings(max_examples=300, deadline=None)
@given(state=states(), a=sol_amounts, b=sol_amounts)
def test_quotes_are_monotonic_in_size(state, a, b):
    small, large = sorted((a, b))
    buy_small, buy_large = curve.quote_buy(state, small), curve.quote_buy(state, large)
    assert buy_small.tokens <= buy_large.tokens
    assert buy_small.average_price <= buy_large.average_price * (1 + 1e-12)
    assert buy_small.price_after <= buy_large.price_after
    tokens_small, tokens_large = small * 1e6, large * 1e6
    sell_small = curve.quote_sell(state, tokens_small)
    sell_large = curve.quote_sell(state, tokens_large)
    assert sell_small.sol <= sell_large.sol
    assert sell_small.price_after >= sell_large.price_after


@pytest.mark.parametrize(
    ("v_sol", "v_tokens", "market_cap"),
    [
        (30.03733572726111, 1071666285.328535, -5),
        (30.03733572726111, 1071666285.328535, 1e308),
        (1e308, 1e-300, 1e308 / 1e-300 * 1e9),  # the cap matches: the product does not
        (10**400, 1, 1),  # an int no float holds
        (float("nan"), 1.07e9, 28.0),
        (0, 1.07e9, 28.0),
        (5e-324, 1.8e308, 1e-300),
    ],
)
def test_an_inconsistent_or_impossible_frame_is_far_off_and_never_raises(
    v_sol, v_tokens, market_cap
):
    assert curve.frame_consistency_error(v_sol, v_tokens, market_cap) > 0.5


@given(
    v_sol=st.one_of(st.floats(), st.integers()),
    v_tokens=st.one_of(st.floats(), st.integers()),
    market_cap=st.one_of(st.floats(), st.integers()),
)
def test_the_consistency_error_is_a_number_for_any_input(v_sol, v_tokens, market_cap):
    error = curve.frame_consistency_error(v_sol, v_tokens, market_cap)
    assert error >= 0.0  # never NaN, never an exception


def test_every_reference_frame_is_consistent():
    frames = [
        (30.059259257999976, 1070884672.297204, 28.069557848389476),
        (30.03733572726111, 1071666285.328535, 28.028628070587033),
        (32.93049999996889, 977513247.598136, 33.68803449046135),
    ]
    for v_sol, v_tokens, market_cap in frames:
        assert curve.frame_consistency_error(v_sol, v_tokens, market_cap) < 1e-12


@pytest.mark.parametrize("buys", [0.0, 5.0, 40.0, 84.0])
def test_buy_for_impact_is_the_largest_buy_within_the_impact(buys):
    state = curve.quote_buy(START, buys).after if buys else START
    size = curve.buy_for_impact(state, 0.02)
    quote = curve.quote_buy(state, size)
    if curve.tokens_for_net_sol(state, 0.02 * state.v_sol) <= state.real_token_reserves:
        assert quote.price_impact == pytest.approx(0.02, rel=1e-9)
        assert curve.quote_buy(state, size * 1.001).price_impact > 0.02
    else:  # near the end the curve runs out first: the buy takes what is left
        assert quote.price_impact < 0.02
        assert quote.tokens == pytest.approx(state.real_token_reserves, rel=1e-9)


@settings(max_examples=300, deadline=None)
@given(state=states(), impact=st.floats(min_value=1e-6, max_value=0.9))
def test_a_sale_sized_for_an_impact_has_that_impact(state, impact):
    tokens = curve.sell_for_impact(state, impact)
    assert curve.quote_sell(state, tokens).price_impact == pytest.approx(impact, abs=1e-9)
    assert curve.quote_sell(state, tokens * 1.01).price_impact > impact
    with pytest.raises(CurveError):
        curve.sell_for_impact(state, 1.0)


def test_a_state_at_a_price_is_on_the_same_curve():
    state = curve.quote_buy(START, 3.0).after
    at = curve.at_price(state, state.price * 0.8)
    assert at.price == pytest.approx(state.price * 0.8, rel=1e-12)
    assert at.v_sol * at.v_tokens == pytest.approx(curve.K, rel=1e-12)
    assert curve.at_price(state, state.price) is state
    with pytest.raises(CurveError):
        curve.at_price(state, 0.0)
