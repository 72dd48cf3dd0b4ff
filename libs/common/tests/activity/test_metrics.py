"""ActivityMetrics read by name from the features service's vectors (default feature set)."""

from __future__ import annotations

import pytest

from pumpflow.common.activity import REQUIRED_FEATURES, ActivityMetricsReader, InvalidVector
from pumpflow.common.curve import CurveState, quote_buy, quote_sell
from pumpflow.common.events import Event, TokenCreated, TokenTrade, make_event
from pumpflow.common.features import FeatureManager, default_feature_set

T0 = 1_700_000_000.0


def history() -> tuple[list[Event], float]:
    """A create and 11 trades 5 s apart (6 buyers, a sell last); total SOL traded."""
    quote = quote_buy(CurveState(), 0.5)
    curve, sol = quote.after, 0.5
    created = TokenCreated(
        signature="c",
        mint="A",
        traderPublicKey="creator",
        txType="create",
        initialBuy=quote.tokens,
        solAmount=sol,
        bondingCurveKey="curve",
        vTokensInBondingCurve=curve.v_tokens,
        vSolInBondingCurve=curve.v_sol,
        marketCapSol=curve.market_cap_sol,
        name="T",
        symbol="T",
        uri="u",
    )
    events = [make_event(created, source="feed/test", time=T0, seq=1)]
    held: dict[str, float] = {}
    for i in range(11):
        trader, buy = (f"w{i % 6}", True) if i != 10 else ("w0", False)
        quote = quote_buy(curve, 0.2) if buy else quote_sell(curve, held[trader])
        held[trader] = held.get(trader, 0.0) + quote.tokens if buy else 0.0
        curve = quote.after
        sol += quote.sol
        trade = TokenTrade(
            signature=f"s{i}",
            mint="A",
            traderPublicKey=trader,
            txType="buy" if buy else "sell",
            tokenAmount=quote.tokens,
            newTokenBalance=held[trader],
            bondingCurveKey="curve",
            vTokensInBondingCurve=curve.v_tokens,
            vSolInBondingCurve=curve.v_sol,
            marketCapSol=curve.market_cap_sol,
            solAmount=quote.sol,
        )
        events.append(make_event(trade, source="feed/test", time=T0 + 5 * (i + 1), seq=i + 2))
    return events, sol


def test_metrics_follow_the_trades_through_the_default_feature_set():
    manager = FeatureManager(default_feature_set())
    events, sol = history()
    for event in events:
        manager.update_feature_history(event)
    values = manager.values(manager.token("A"))
    m = ActivityMetricsReader().read(manager.names, values, time=events[-1].time)
    # 12 events within the last 60 s (create at 0, trades at 5..55)
    assert m.trades_per_minute == pytest.approx(12.0)
    assert m.sol_volume_per_minute == pytest.approx(sol, rel=1e-6)
    assert m.unique_traders == 7  # creator + w0..w5
    assert m.new_traders == 7
    assert m.drawdown > 0 and m.price_return > 0  # the last trade was a sell
    assert 0 < m.curve_progress < 0.1
    assert m.time == T0 + 55 and m.seconds_since_last_trade == 0


def test_reader_finds_the_features_in_any_layout():
    reader = ActivityMetricsReader()
    names = ("price", *REQUIRED_FEATURES)
    values = (1e-8, 6.0, 0.25, 0.5, 4.0, 2.0, 0.1, -0.2, 0.3)
    m = reader.read(names, values, time=T0)
    again = reader.read(names[::-1], values[::-1], time=T0)
    assert m == again
    assert (m.trades_per_minute, m.sol_volume_per_minute, m.unique_traders) == (6.0, 0.75, 4)
    assert (m.new_traders, m.price_return, m.drawdown, m.curve_progress) == (2, 0.1, 0.0, 0.3)


def test_a_vector_without_the_needed_features_is_refused():
    with pytest.raises(InvalidVector, match="trades_per_minute"):
        ActivityMetricsReader().read(("price",), (1e-8,), time=T0)
    assert issubclass(InvalidVector, ValueError)


def test_every_needed_feature_is_in_the_default_feature_set():
    names = {d.name for d in default_feature_set()}
    assert set(REQUIRED_FEATURES) <= names
