"""Vectorised primitives over a token's whole history (training, fast backtests).

Mirrors :mod:`pumpflow.common.features.state` array-wise: row ``i`` holds what the
incremental state holds right after trade ``i``. Integer lamport prefix sums make
window sums exact; recurrences (EWMA, Wilder averages) run blockwise in closed form.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pumpflow.common.features.inputs import TradeInput, event_input
from pumpflow.common.features.state import Layout


@dataclass(frozen=True, slots=True, kw_only=True)
class TradeHistory:
    """One token's trades as arrays, oldest first."""

    time: np.ndarray  # float64 event time
    is_buy: np.ndarray  # bool
    lamports: np.ndarray  # int64 SOL amount
    tokens: np.ndarray  # float64
    trader: np.ndarray  # int64 trader codes (equal code = same trader)
    new_balance: np.ndarray  # float64 trader balance after the trade
    v_sol: np.ndarray  # float64 virtual SOL reserves after the trade
    v_tokens: np.ndarray  # float64 virtual token reserves after the trade
    #: trader code of the creator (default: the first trade's trader)
    creator: int | None = None

    def __len__(self) -> int:
        return len(self.time)

    @classmethod
    def from_inputs(cls, trades: Sequence[TradeInput], *, creator: str | None = None):
        codes: dict[str, int] = {}
        trader = np.fromiter(
            (codes.setdefault(t.trader, len(codes)) for t in trades), np.int64, len(trades)
        )
        return cls(
            time=np.fromiter((t.time for t in trades), np.float64, len(trades)),
            is_buy=np.fromiter((t.is_buy for t in trades), np.bool_, len(trades)),
            lamports=np.fromiter((t.lamports for t in trades), np.int64, len(trades)),
            tokens=np.fromiter((t.tokens for t in trades), np.float64, len(trades)),
            trader=trader,
            new_balance=np.fromiter((t.new_balance for t in trades), np.float64, len(trades)),
            v_sol=np.fromiter((t.v_sol for t in trades), np.float64, len(trades)),
            v_tokens=np.fromiter((t.v_tokens for t in trades), np.float64, len(trades)),
            creator=None if creator is None else codes.get(creator, -1),
        )

    @classmethod
    def from_events(cls, events: Iterable, *, creator: str | None = None) -> TradeHistory:
        """From token.created / token.trade events of one mint (others are skipped)."""
        trades = [t for t in map(event_input, events) if t is not None]
        return cls.from_inputs(trades, creator=creator)


def linear_recurrence(x: np.ndarray, b: float) -> np.ndarray:
    """y[i] = b * y[i-1] + x[i] with y[-1] = 0, in closed form per block of rows.

    Within a block ``y = b**i * cumsum(x * b**-i)``; blocks are short enough that
    ``b**-i`` stays finite, and each block's start carries the previous block's end.
    """
    n = len(x)
    if n == 0:
        return np.zeros(0)
    if b == 0.0:
        return x.astype(np.float64, copy=True)
    size = int(min(256, max(1, 60.0 / -np.log10(b)))) if b < 1.0 else 256
    blocks = -(-n // size)
    padded = np.zeros(blocks * size)
    padded[:n] = x
    xs = padded.reshape(blocks, size)
    steps = np.arange(size, dtype=np.float64)
    pw = b**steps
    inner = pw * np.cumsum(xs * (b**-steps), axis=1)
    carry_in = np.empty(blocks)
    carry = 0.0
    decay_block = b**size
    last = inner[:, -1]
    for k in range(blocks):
        carry_in[k] = carry
        carry = decay_block * carry + last[k]
    out = inner + np.outer(carry_in, pw * b)
    return out.reshape(-1)[:n]


def _range_max(values: np.ndarray, left: np.ndarray) -> np.ndarray:
    """max(values[left[i]:i+1]) for each i (a sparse table over the widths needed)."""
    n = len(values)
    width = (np.arange(n) - left + 1) if n else np.zeros(0, np.int64)
    out = values.copy()
    if n == 0:
        return out
    levels = [values]
    span = 1
    while span * 2 <= width.max():
        prev = levels[-1]
        nxt = prev.copy()
        nxt[span:] = np.maximum(prev[span:], prev[:-span])
        levels.append(nxt)
        span *= 2
    # levels[j][i] = max(values[i - 2**j + 1 : i + 1]) (clipped at 0)
    level = np.zeros(n, np.int64)
    level[width > 1] = np.floor(np.log2(width[width > 1])).astype(np.int64)
    idx = np.arange(n)
    stacked = np.stack(levels)
    right_part = stacked[level, idx]
    left_end = left + (1 << level) - 1
    left_part = stacked[level, left_end]
    np.maximum(right_part, left_part, out=out)
    return out


@dataclass(slots=True)
class BatchWindow:
    buy: np.ndarray  # int64 lamports bought in the window
    sell: np.ndarray
    trades: np.ndarray  # int64
    new_traders: np.ndarray  # int64
    ref_price: np.ndarray  # float64
    max_buy: np.ndarray | None  # int64, when tracked


@dataclass(slots=True)
class BatchState:
    """Primitives per row, as :class:`TokenState` holds them after each trade."""

    n: int
    time: np.ndarray
    first_time: float
    prev_time: np.ndarray
    price: np.ndarray
    first_price: float
    peak_price: np.ndarray
    v_sol: np.ndarray
    v_tokens: np.ndarray
    unique_traders: np.ndarray
    total_buy: np.ndarray
    total_sell: np.ndarray
    max_trader_buy: np.ndarray
    largest_buy: np.ndarray
    creator_balance: np.ndarray
    creator_sold: np.ndarray
    windows: list[BatchWindow]
    ewma: list[np.ndarray]
    rsi: list[tuple[np.ndarray, np.ndarray]]


def compute_primitives(layout: Layout, history: TradeHistory) -> BatchState:
    """Every primitive of ``layout`` for every row of ``history``."""
    n = len(history)
    time = np.maximum.accumulate(history.time) if n else history.time.astype(np.float64)
    price = history.v_sol / history.v_tokens
    is_buy = history.is_buy
    lam = history.lamports.astype(np.int64)
    buy = np.where(is_buy, lam, 0)
    sell = np.where(is_buy, 0, lam)
    zero = np.zeros(1, np.int64)
    buy_cum = np.concatenate([zero, np.cumsum(buy)])
    sell_cum = np.concatenate([zero, np.cumsum(sell)])

    trader = history.trader
    # Rows grouped by trader (stable: each group in time order).
    order = np.argsort(trader, kind="stable")
    sorted_trader = trader[order]
    starts = np.ones(n, bool)
    if n:
        starts[1:] = sorted_trader[1:] != sorted_trader[:-1]
    is_new = np.zeros(n, np.int64)
    is_new[order[starts]] = 1
    new_cum = np.concatenate([zero, np.cumsum(is_new)])

    # Cumulative SOL bought per trader at each row; monotone per trader, so the
    # running max over rows is the largest single buyer so far.
    sorted_buy = buy[order]
    csum = np.cumsum(sorted_buy)
    group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0)) if n else starts
    before = np.where(group_start > 0, csum[group_start - 1], 0) if n else csum
    per_trader = np.empty(n, np.int64)
    per_trader[order] = csum - before
    max_trader_buy = np.maximum.accumulate(np.where(is_buy, per_trader, 0)) if n else per_trader

    creator = history.creator if history.creator is not None else (int(trader[0]) if n else -1)
    is_creator = trader == creator
    last_creator_row = np.maximum.accumulate(np.where(is_creator, np.arange(n), -1)) if n else lam
    creator_balance = np.where(
        last_creator_row >= 0, history.new_balance[np.maximum(last_creator_row, 0)], 0.0
    )
    creator_sold = (
        np.maximum.accumulate((is_creator & ~is_buy).astype(np.int64)) if n else lam
    ).astype(bool)

    returns = np.zeros(n)
    if n > 1:
        returns[1:] = price[1:] / price[:-1] - 1.0
    prev_time = np.empty(n)
    if n:
        prev_time[0] = time[0]
        prev_time[1:] = time[:-1]

    windows = []
    rows = np.arange(n)
    for window in layout.windows:
        left = np.searchsorted(time, time - window, side="right")
        ref = np.where(left > 0, price[np.maximum(left - 1, 0)], price[0] if n else 0.0)
        max_buy = _range_max(buy, left) if window in layout.max_windows else None
        windows.append(
            BatchWindow(
                buy=buy_cum[1:] - buy_cum[left],
                sell=sell_cum[1:] - sell_cum[left],
                trades=rows + 1 - left,
                new_traders=new_cum[1:] - new_cum[left],
                ref_price=ref,
                max_buy=max_buy,
            )
        )

    r2 = returns * returns
    ewma = [linear_recurrence(alpha * r2, 1.0 - alpha) for alpha in layout.ewma_alphas]
    gains = np.where(returns > 0.0, returns, 0.0)
    losses = np.where(returns < 0.0, -returns, 0.0)
    rsi = []
    for period in layout.rsi_periods:
        a = 1.0 / period
        rsi.append((linear_recurrence(a * gains, 1.0 - a), linear_recurrence(a * losses, 1.0 - a)))

    return BatchState(
        n=n,
        time=time,
        first_time=float(time[0]) if n else 0.0,
        prev_time=prev_time,
        price=price,
        first_price=float(price[0]) if n else 0.0,
        peak_price=np.maximum.accumulate(price) if n else price,
        v_sol=history.v_sol,
        v_tokens=history.v_tokens,
        unique_traders=new_cum[1:],
        total_buy=buy_cum[1:],
        total_sell=sell_cum[1:],
        max_trader_buy=max_trader_buy,
        largest_buy=np.maximum.accumulate(buy) if n else buy,
        creator_balance=creator_balance,
        creator_sold=creator_sold,
        windows=windows,
        ewma=ewma,
        rsi=rsi,
    )
