"""Feature benchmarks: incremental and batch throughput, memory per tracked token.

Run: .venv/bin/python benchmarks/features.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import random
import time
import tracemalloc

import numpy as np

from pumpflow.common.curve import CurveState, quote_buy, quote_sell
from pumpflow.common.features import FeatureManager, TradeHistory, TradeInput
from pumpflow.common.features.inputs import to_lamports


def synthetic_trades(n: int, *, seed: int, wallets: int = 200, start: float = 0.0):
    """n trades of one token on the real curve (sells when the curve nears its end)."""
    rng = random.Random(seed)
    state = CurveState()
    balances: dict[str, float] = {}
    names = [f"wallet{i:04d}{'x' * 32}" for i in range(wallets)]
    t = start
    out = []
    for _ in range(n):
        t += rng.expovariate(2.0)
        trader = rng.choice(names)
        held = balances.get(trader, 0.0)
        buy = held <= 1.0 or (rng.random() < 0.55 and state.progress < 0.9)
        if buy:
            q = quote_buy(state, rng.lognormvariate(-3, 1.2))
            balances[trader] = held + q.tokens
            sol = q.sol - q.fee
        else:
            q = quote_sell(state, held * rng.uniform(0.2, 1.0))
            balances[trader] = held - q.tokens
            sol = q.sol + q.fee
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


def bench_incremental(tokens: int, per_token: int) -> tuple[float, float]:
    streams = [synthetic_trades(per_token, seed=s, wallets=40) for s in range(tokens)]
    # Interleave tokens as a live feed would.
    feed = [
        (f"mint{s}", tr)
        for i in range(per_token)
        for s, st in enumerate(streams)
        for tr in (st[i],)
    ]
    manager = FeatureManager()
    gc.collect()
    t0 = time.perf_counter()
    for mint, trade in feed:
        manager.apply(mint, trade)
    update_rate = len(feed) / (time.perf_counter() - t0)

    manager = FeatureManager()
    values = manager.values
    apply = manager.apply
    t0 = time.perf_counter()
    for mint, trade in feed:
        values(apply(mint, trade))
    full_rate = len(feed) / (time.perf_counter() - t0)
    return update_rate, full_rate


def bench_vector(reads: int) -> float:
    """Microseconds to read one token's full vector (values in names order)."""
    manager = FeatureManager()
    for trade in synthetic_trades(2_000, seed=3, wallets=40):
        state = manager.apply("mint", trade)
    values = manager.values
    t0 = time.perf_counter()
    for _ in range(reads):
        values(state)
    return (time.perf_counter() - t0) / reads * 1e6


def bench_batch(n: int) -> float:
    trades = synthetic_trades(min(n, 200_000), seed=99)
    history = TradeHistory.from_inputs(trades)
    if n > len(history):
        reps = -(-n // len(history))
        span = float(history.time[-1] - history.time[0]) + 1.0
        fields = {
            name: np.concatenate([getattr(history, name)] * reps)[:n]
            for name in (
                "is_buy",
                "lamports",
                "tokens",
                "trader",
                "new_balance",
                "v_sol",
                "v_tokens",
            )
        }
        time_col = np.concatenate([history.time + k * span for k in range(reps)])[:n]
        history = TradeHistory(time=time_col, creator=history.creator, **fields)
    manager = FeatureManager()
    manager.compute_batch(history)  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        manager.compute_batch(history)
        best = min(best, time.perf_counter() - t0)
    return len(history) / best


def bench_small_histories(histories: int, per_history: int) -> float:
    """Batch over many short histories (per-call overhead): trades/s."""
    base = TradeHistory.from_inputs(synthetic_trades(per_history, seed=7, wallets=60))
    manager = FeatureManager()
    manager.compute_batch(base)
    t0 = time.perf_counter()
    for _ in range(histories):
        manager.compute_batch(base)
    return histories * per_history / (time.perf_counter() - t0)


def bench_memory(tokens: int, trades_per_token: int, traders_per_token: int) -> float:
    rng = random.Random(5)
    gc.collect()
    tracemalloc.start()
    manager = FeatureManager()
    before = tracemalloc.get_traced_memory()[0]
    for s in range(tokens):
        mint = f"{s:040d}pump"
        state = CurveState()
        t = float(s)
        # Fresh strings per token, as decoded frames give them.
        wallets = [f"{rng.getrandbits(160):044x}"[:44] for _ in range(traders_per_token)]
        for i in range(trades_per_token):
            q = quote_buy(state, 0.05)
            state = q.after
            t += 1.0
            manager.apply(
                mint,
                TradeInput(
                    t,
                    True,
                    to_lamports(q.sol),
                    q.tokens,
                    wallets[i % traders_per_token],
                    q.tokens,
                    state.v_sol,
                    state.v_tokens,
                ),
            )
    manager.shed_idle(float(tokens) + 10_000.0)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    scale = 0.2 if args.quick else 1.0
    update, full = bench_incremental(int(200 * scale), 1_000)
    features = len(FeatureManager().names)
    print(f"incremental: {update:,.0f} trades/s per core (state update, {features} features)")
    print(f"incremental + vector per trade: {full:,.0f} trades/s per core")
    print(f"vector read: {bench_vector(int(100_000 * scale)):.2f} us")
    n = int(2_000_000 * scale)
    print(f"batch: {bench_batch(n):,.0f} trades/s ({n:,} trades, one token)")
    small = bench_small_histories(int(2_000 * scale), 300)
    print(f"batch, short histories: {small:,.0f} trades/s (300 trades each)")
    for trades, traders, count in ((10, 6, 20_000), (60, 30, 5_000), (450, 150, 1_000)):
        size = bench_memory(int(count * scale), trades, traders)
        print(f"memory per idle token ({trades} trades, {traders} traders): {size:,.0f} B")
        if trades == 10:
            tiny = size
    size = bench_memory(int(1_000 * scale), 450, 450)
    print(f"memory per idle token (450 trades, 450 traders: all distinct): {size:,.0f} B")
    print(f"100,000 idle tokens (10 trades each): {tiny * 100_000 / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
