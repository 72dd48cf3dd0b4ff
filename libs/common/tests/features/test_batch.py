"""The batch path's building blocks against plain definitions, and long histories."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pumpflow.common.curve import CurveState, quote_buy, quote_sell
from pumpflow.common.features import FeatureManager, TradeHistory, TradeInput
from pumpflow.common.features.batch import linear_recurrence, range_max, window_lefts
from pumpflow.common.features.inputs import to_lamports


def bursty_times(seed: int, n: int, *, start: float) -> np.ndarray:
    """Sorted times with bursts of equal stamps, long pauses and one huge crowd."""
    rng = np.random.default_rng(seed)
    steps = rng.exponential(0.5, n)
    steps[rng.random(n) < 0.2] = 0.0  # same-time trades
    steps[rng.random(n) < 0.01] *= 2_000.0  # pauses longer than every window
    steps[n // 3 : n // 3 + 400] = 0.0  # 400 trades in one bucket
    return start + np.cumsum(steps)


@pytest.mark.parametrize("start", [0.0, -50.0, 1_700_000_000.0])
def test_window_lefts_equal_a_binary_search(start):
    windows = (0.5, 10.0, 60.0, 300.0, 1e6)
    for seed in range(3):
        time = bursty_times(seed, 5_000, start=start)
        got = window_lefts(time, windows)
        for w, left in zip(windows, got, strict=True):
            want = np.searchsorted(time, time - w, side="right")
            assert np.array_equal(left, want), (seed, w)


def test_window_lefts_of_degenerate_times():
    same = np.full(2_000, 5.0)
    assert np.array_equal(window_lefts(same, (1.0,))[0], np.zeros(2_000))
    # So far from zero that t - 1 == t: every edge sits on its own row, the last on n.
    far = 1e17 + 16.0 * np.arange(1_000)
    assert np.array_equal(window_lefts(far, (1.0,))[0], np.arange(1, 1_001))
    two = np.repeat([1.0, 2.0], 1_000)
    assert np.array_equal(
        window_lefts(two, (0.5,))[0], np.searchsorted(two, two - 0.5, side="right")
    )


def test_range_max_equals_the_definition():
    rng = np.random.default_rng(1)
    time = bursty_times(4, 3_000, start=0.0)
    values = rng.integers(0, 10**9, len(time))
    values[rng.random(len(time)) < 0.5] = 0
    for w in (1.0, 60.0, 1e5):
        left = np.searchsorted(time, time - w, side="right")
        want = np.array([values[lo : i + 1].max() for i, lo in enumerate(left)])
        assert np.array_equal(range_max(values, left), want), w


@pytest.mark.parametrize("b", [0.0, 1e-12, 0.5, 0.9, 13 / 14, 0.999, 0.99999])
def test_linear_recurrence_equals_the_loop(b):
    rng = np.random.default_rng(2)
    x = rng.exponential(1e-4, 20_011) * (rng.random(20_011) < 0.7)
    want = np.empty_like(x)
    y = 0.0
    for i, v in enumerate(x.tolist()):
        y = b * y + v
        want[i] = y
    got = linear_recurrence(x, b)
    assert np.allclose(got, want, rtol=1e-11, atol=1e-300)
    inplace = x.copy()
    assert linear_recurrence(inplace, b, out=inplace) is inplace
    assert np.array_equal(inplace, got)


def long_history(seed: int, n: int) -> list[TradeInput]:
    """Trades on the real curve: bursts, pauses, stamps stepping back, many traders."""
    rng = random.Random(seed)
    state = CurveState()
    balances: dict[str, float] = {}
    wallets = [f"w{i}" for i in range(300)]
    t = 1_700_000_000.0
    out = []
    for _ in range(n):
        r = rng.random()
        t += 0.0 if r < 0.1 else -0.001 if r < 0.12 else rng.expovariate(1.0)
        if rng.random() < 0.005:
            t += 400.0
        trader = rng.choice(wallets)
        held = balances.get(trader, 0.0)
        if held <= 1.0 or (rng.random() < 0.55 and state.progress < 0.9):
            q = quote_buy(state, rng.lognormvariate(-3, 1.5))
            buy, balances[trader], sol = True, held + q.tokens, q.sol - q.fee
        else:
            q = quote_sell(state, held * rng.uniform(0.2, 1.0))
            buy, balances[trader], sol = False, held - q.tokens, q.sol + q.fee
        state = q.after
        out.append(
            TradeInput(
                t,
                buy,
                to_lamports(sol),
                q.tokens,
                trader,
                balances[trader],
                state.v_sol,
                state.v_tokens,
            )
        )
    return out


def test_paths_equal_on_a_long_history():
    """Long enough for several recurrence blocks and the bucketed window edges."""
    trades = long_history(7, 12_000)
    manager = FeatureManager()
    rows = [manager.values(manager.apply("m", trade)) for trade in trades]
    incremental = np.array(rows)
    batch = manager.compute_batch(TradeHistory.from_inputs(trades))
    error = np.abs(incremental - batch) / np.maximum(1.0, np.abs(incremental))
    worst = dict(zip(manager.names, error.max(axis=0).tolist(), strict=True))
    assert all(e <= 1e-9 for e in worst.values()), worst


@pytest.mark.parametrize("n", [0, 1, 2, 7])
def test_paths_equal_on_the_shortest_histories(n):
    trades = long_history(3, n)
    manager = FeatureManager()
    batch = manager.compute_batch(TradeHistory.from_inputs(trades))
    assert batch.shape == (n, len(manager.names))
    for i, trade in enumerate(trades):
        row = manager.values(manager.apply("m", trade))
        assert np.allclose(batch[i], row, rtol=1e-12, atol=0), i
