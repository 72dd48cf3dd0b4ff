"""FeatureManager: definitions, ordering, versioning and the incremental path."""

from __future__ import annotations

import numpy as np
import pytest

from pumpflow.common.events import TokenCreated, TokenTrade, make_event
from pumpflow.common.features import (
    FeatureDefinitionError,
    FeatureManager,
    default_feature_set,
    feature,
    feature_set_version,
)

MINT = "Mint1111111111111111111111111111111111pump"


def created(time: float, *, trader: str = "creator", sol: float = 1.0) -> object:
    payload = TokenCreated(
        signature="s0",
        mint=MINT,
        traderPublicKey=trader,
        txType="create",
        initialBuy=34_612_903.0,
        bondingCurveKey="bc",
        vTokensInBondingCurve=1_038_387_097.0,
        vSolInBondingCurve=31.0,
        marketCapSol=29.85,
        name="T",
        symbol="T",
        uri="u",
        solAmount=sol,
    )
    return make_event(payload, source="feed/test", time=time, seq=1)


def trade(time: float, seq: int, *, side: str, sol: float, trader: str, v_sol: float) -> object:
    v_tokens = 30.0 * 1_073_000_000.0 / v_sol
    payload = TokenTrade(
        signature=f"s{seq}",
        mint=MINT,
        traderPublicKey=trader,
        txType=side,
        tokenAmount=1000.0,
        newTokenBalance=500.0,
        bondingCurveKey="bc",
        vTokensInBondingCurve=v_tokens,
        vSolInBondingCurve=v_sol,
        marketCapSol=v_sol / v_tokens * 1e9,
        solAmount=sol,
    )
    return make_event(payload, source="feed/test", time=time, seq=seq)


def test_windowed_features_follow_event_time():
    manager = FeatureManager()
    manager.update_feature_history(created(100.0))
    manager.update_feature_history(trade(105.0, 2, side="buy", sol=2.0, trader="a", v_sol=33.0))
    manager.update_feature_history(trade(150.0, 3, side="sell", sol=0.5, trader="b", v_sol=32.5))
    f = manager.generate_features(MINT).as_dict()
    # 10 s window at t=150 holds only the sell; 60 s holds all three.
    assert f["buy_volume_sol_10s"] == 0.0
    assert f["sell_volume_sol_10s"] == 0.5
    assert f["buy_volume_sol_60s"] == 3.0
    assert f["trades_per_minute"] == 3.0
    assert f["unique_traders"] == 3.0
    assert f["time_since_launch"] == 50.0
    assert f["time_since_last_trade"] == 45.0
    assert f["creator_sold"] == 0.0
    price_now = 32.5 / (30.0 * 1_073_000_000.0 / 32.5)
    price_before = 33.0 / (30.0 * 1_073_000_000.0 / 33.0)
    assert f["return_10s"] == pytest.approx(price_now / price_before - 1.0)
    assert manager.generate_features(MINT).seq == 3


def test_unknown_dependency_and_cycle_are_clear_errors():
    with pytest.raises(FeatureDefinitionError, match="unknown 'nope'"):
        FeatureManager([feature("d", "drawdown_from_peak", "nope")])
    with pytest.raises(FeatureDefinitionError, match="cycle: a -> b -> a"):
        FeatureManager(
            [
                feature("a", "drawdown_from_peak", "b"),
                feature("b", "drawdown_from_peak", "a"),
            ]
        )
    with pytest.raises(FeatureDefinitionError, match="unknown kind"):
        FeatureManager([feature("x", "astrology")])


def test_dependencies_are_ordered_before_dependents():
    defs = [feature("dd", "drawdown_from_peak", "p"), feature("p", "price")]
    manager = FeatureManager(defs)
    assert manager.names == ("p", "dd")


def test_version_is_stable_and_tracks_parameters():
    base = default_feature_set()
    assert feature_set_version(base) == feature_set_version(tuple(reversed(base)))
    assert feature_set_version(base) == FeatureManager().version
    changed = default_feature_set(windows=(10.0, 30.0, 60.0, 600.0))
    assert feature_set_version(changed) != feature_set_version(base)


def test_callable_and_expression_readers_mix_in_one_generated_reader():
    from pumpflow.common.features.definitions import KINDS, FeatureKind, register_kind

    if "test_half" not in KINDS:
        register_kind(
            FeatureKind(
                name="test_half",
                dependency_count=1,
                bind=lambda p, layout: (
                    lambda s, d: d[0] / 2.0,
                    lambda b, d, out: np.divide(d[0], 2.0, out=out),
                ),
            )
        )
        register_kind(
            FeatureKind(
                name="test_bad_dependency",
                bind=lambda p, layout: ("$1 + s.price", lambda b, d, out: None),
            )
        )
    manager = FeatureManager(
        [
            feature("p", "price"),
            feature("half", "test_half", "p"),
            feature("dd", "drawdown_from_peak", "half"),
        ]
    )
    assert "f1(s, (v0, ))" in manager.reader_source
    manager.update_feature_history(created(100.0))
    manager.update_feature_history(trade(101.0, 2, side="buy", sol=2.0, trader="a", v_sol=33.0))
    price, half, dd = manager.generate_features(MINT).values
    assert half == price / 2.0
    assert dd == 1.0 - half / manager.token(MINT).peak_price
    with pytest.raises(FeatureDefinitionError, match=r"reads no dependency \$1"):
        FeatureManager([feature("x", "test_bad_dependency")])
