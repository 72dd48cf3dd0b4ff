"""The incremental and the batch path give the same features (to 1e-9) on real-shaped histories."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pumpflow.common.curve import CurveState, quote_buy, quote_sell
from pumpflow.common.events import TokenCreated, TokenTrade, make_event
from pumpflow.common.features import FeatureManager, TradeHistory, sol_amount_of

TOLERANCE = 1e-9


def assert_paths_equal(manager: FeatureManager, events: list) -> np.ndarray:
    """Feed events one by one; compare every intermediate vector with the batch rows."""
    mint = events[0].data.mint
    rows = []
    for event in events:
        manager.update_feature_history(event)
        rows.append(manager.values(manager.token(mint)))
    incremental = np.array(rows)
    batch = manager.compute_batch(
        TradeHistory.from_events(events, creator=events[0].data.traderPublicKey)
    )
    assert batch.shape == incremental.shape
    error = np.abs(incremental - batch) / np.maximum(1.0, np.abs(incremental))
    worst = error.max(axis=0)
    bad = {n: float(e) for n, e in zip(manager.names, worst, strict=True) if not e <= TOLERANCE}
    assert not bad, f"paths differ: {bad}"
    return incremental


def curve_history(seed: int, *, trades: int, old_frames: bool) -> list:
    """A token's events generated on the real curve; old frames carry no solAmount."""
    rng = random.Random(seed)
    mint = f"Mint{seed}pump"
    state = CurveState()
    creator = "creator"
    first = quote_buy(state, 0.5)
    state = first.after
    created = TokenCreated(
        signature="c",
        mint=mint,
        traderPublicKey=creator,
        txType="create",
        initialBuy=first.tokens,
        bondingCurveKey="bc",
        vTokensInBondingCurve=state.v_tokens,
        vSolInBondingCurve=state.v_sol,
        marketCapSol=state.market_cap_sol,
        name="n",
        symbol="s",
        uri="u",
        solAmount=None if old_frames else first.sol - first.fee,
    )
    t = 1_700_000_000.0
    events = [make_event(created, source="feed/t", time=t, seq=1)]
    balances = {creator: first.tokens}
    wallets = [creator] + [f"w{i}" for i in range(25)]
    for seq in range(2, trades + 2):
        # Half-second steps put events exactly on window edges; bursts of same-time
        # trades and long pauses (longer than every window) exercise eviction.
        pause = 200 if rng.random() < 0.02 else 1
        t += 0.0 if rng.random() < 0.1 else round(rng.expovariate(1 / 3.0) * pause * 2) / 2
        trader = rng.choice(wallets)
        held = balances.get(trader, 0.0)
        if held <= 1.0 or rng.random() < 0.55:
            quote = quote_buy(state, rng.lognormvariate(-3, 1.5))
            side, balances[trader] = "buy", held + quote.tokens
            sol = quote.sol - quote.fee
        else:
            quote = quote_sell(state, held * rng.uniform(0.2, 1.0))
            side, balances[trader] = "sell", held - quote.tokens
            sol = quote.sol + quote.fee
        state = quote.after
        trade = TokenTrade(
            signature=f"s{seq}",
            mint=mint,
            traderPublicKey=trader,
            txType=side,
            tokenAmount=quote.tokens,
            newTokenBalance=balances[trader],
            bondingCurveKey="bc",
            vTokensInBondingCurve=state.v_tokens,
            vSolInBondingCurve=state.v_sol,
            marketCapSol=state.market_cap_sol,
            solAmount=None if old_frames else sol,
        )
        events.append(make_event(trade, source="feed/t", time=t, seq=seq))
        if state.complete:
            break
    return events


@pytest.mark.parametrize("old_frames", [False, True])
def test_paths_equal_on_curve_histories(old_frames):
    for seed in range(4):
        values = assert_paths_equal(
            FeatureManager(), curve_history(seed, trades=600, old_frames=old_frames)
        )
        assert np.isfinite(values).all()


def test_old_frames_derive_the_same_sol_as_new_frames():
    new = curve_history(3, trades=50, old_frames=False)
    old = curve_history(3, trades=50, old_frames=True)
    for a, b in zip(new, old, strict=True):
        assert sol_amount_of(b.data) == pytest.approx(sol_amount_of(a.data), rel=1e-9)


def test_paths_equal_on_simulated_market():
    from pumpflow.simulator.dataset import market_events
    from pumpflow.simulator.market import Market, MarketConfig

    by_mint: dict[str, list] = {}
    for event in market_events(Market(MarketConfig(seed=11)), 400.0, start_epoch=0.0):
        if event.type != "token.migrated":
            by_mint.setdefault(event.key, []).append(event)
    histories = [e for e in by_mint.values() if e[0].type == "token.created" and len(e) > 1]
    assert sum(len(e) for e in histories) > 1000
    manager = FeatureManager()
    for events in histories:
        assert_paths_equal(manager, events)
