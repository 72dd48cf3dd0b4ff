"""Vectorised primitives over a token's whole history (training, fast backtests).

Mirrors :mod:`pumpflow.common.features.state` array-wise: row ``i`` holds what the
incremental state holds right after trade ``i``. Integer lamport prefix sums make
window sums exact; recurrences (EWMA, Wilder averages) run blockwise in closed form.

Speed: every primitive is computed on first use and kept, so a feature set pays only
for what it reads; prefix sums and window edges are shared by every feature over the
same window; features write straight into their row of the output (``out=``), so the
only full-size temporaries are the primitives themselves. Window edges come from a
bucket index (one row per bucket on average) instead of a binary search per row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

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


# --------------------------------------------------------------------------------------
# Building blocks.

#: scale factors inside a recurrence block stay below 10**this (x * b**-i must not overflow)
_BLOCK_DECADES = 100.0
_MAX_BLOCK = 65_536


def linear_recurrence(x: np.ndarray, b: float, out: np.ndarray | None = None) -> np.ndarray:
    """y[i] = b * y[i-1] + x[i] with y[-1] = 0, in closed form per block of rows.

    Within a block ``y[i] = b**i * (b * carry + cumsum(x * b**-j)[i])``, where carry is
    the previous block's last y; blocks are short enough that ``b**-j`` stays below
    1e100. The carries come first, from each block's sum (``b**size`` is below 1e-100
    unless the block is capped, so one carry step is exact far below float precision;
    capped blocks are few and carried one by one). ``x`` must be >= 0 (no cancellation);
    ``out`` may be ``x`` itself.
    """
    n = len(x)
    if out is None:
        out = np.empty(n)
    if n == 0:
        return out
    if b == 0.0:
        np.copyto(out, x)
        return out
    size = int(min(_MAX_BLOCK, max(1.0, _BLOCK_DECADES / -math.log10(b))))
    size = min(size, n)
    steps = np.arange(size, dtype=np.float64)
    pw = b**steps
    inv = b**-steps
    full = n - n % size
    tail = n - full
    blocks = out[:full].reshape(-1, size)
    rest = out[full:]
    np.multiply(x[:full].reshape(-1, size), inv, out=blocks)
    np.multiply(x[full:], inv[:tail], out=rest)
    count = len(blocks)
    if count > 1 or (count and tail):
        # ends[k]: block k's own last y (without carry); carry[k]: y before block k
        ends = blocks.sum(axis=1)
        ends *= b ** (size - 1)
        decay = b**size
        carry = np.empty(count + 1)
        carry[0] = 0.0
        if decay < 1e-30:
            # carry[k+1] = ends[k] + decay * carry[k]; decay**2 is far below precision
            carry[1:] = ends
            carry[2:] += decay * ends[:-1]
        else:
            c = 0.0
            for k, end in enumerate(ends.tolist()):
                c = decay * c + end
                carry[k + 1] = c
        blocks[1:, 0] += b * carry[1:count]
        if tail:
            rest[0] += b * carry[count]
    np.cumsum(blocks, axis=1, out=blocks)
    blocks *= pw
    np.cumsum(rest, out=rest)
    rest *= pw[:tail]
    return out


#: steps over a bucket's rows taken by every row, then by the rows still inside
_FULL_STEPS = 2
_BUCKET_STEPS = 8


def window_lefts(time: np.ndarray, windows: Sequence[float]) -> list[np.ndarray]:
    """For each window ``w``: ``searchsorted(time, time - w, side="right")`` (time sorted).

    Rows go into ``2n`` equal time buckets; ``bucket(x)`` is monotone in ``x``, so the
    rows of buckets below ``bucket(t - w)`` are all inside the count and those above
    all outside: a lookup in the bucket counts plus a few steps over the rows of one
    bucket give the exact edge (a binary search finishes rows in crowded buckets).
    About 3x faster than a binary search per row.
    """
    n = len(time)
    t0 = float(time[0]) if n else 0.0
    span = float(time[-1]) - t0 if n else 0.0
    buckets = 2 * n
    if n < 512 or not (math.isfinite(span) and span > 0.0 and math.isfinite(buckets / span)):
        return [np.searchsorted(time, time - w, side="right") for w in windows]
    scale = buckets / span
    work = np.empty(n)

    def bucket(x: np.ndarray) -> np.ndarray:
        np.subtract(x, t0, out=work)
        np.multiply(work, scale, out=work)
        np.clip(work, 0.0, float(buckets), out=work)
        return work.astype(np.int64)

    below = np.zeros(buckets + 2, np.int64)
    np.cumsum(np.bincount(bucket(time), minlength=buckets + 1), out=below[1:])
    edge = np.empty(n)
    inside = np.empty(n, np.bool_)
    lefts = []
    for w in windows:
        np.subtract(time, w, out=edge)
        left = below.take(bucket(edge))
        for _ in range(_FULL_STEPS):
            np.less_equal(time.take(left, mode="clip"), edge, out=inside)
            left += inside
        pending = np.flatnonzero(time.take(left, mode="clip") <= edge)
        for _ in range(_BUCKET_STEPS):
            if not len(pending):
                break
            left[pending] += 1
            pending = pending[time.take(left[pending], mode="clip") <= edge[pending]]
        else:
            # Crowded buckets, and edges at or past the last row (clipped reads there
            # keep counting): these rows never settle, so search them.
            if len(pending):
                left[pending] = np.searchsorted(time, edge[pending], side="right")
        lefts.append(left)
    return lefts


def range_max(values: np.ndarray, left: np.ndarray) -> np.ndarray:
    """max(values[left[i]:i+1]) for each i (``left`` non-decreasing, ``left[i] <= i``).

    A sparse table: level ``j`` holds the max of the ``2**j`` rows ending at each row;
    a row of width ``w`` reads level ``floor(log2(w))`` twice. Rows are grouped by
    level once, so each level touches only its own rows.
    """
    n = len(values)
    out = values.copy()
    if n == 0:
        return out
    width = np.arange(1, n + 1, dtype=np.int64)
    width -= left
    top = int(width.max())
    if top <= 1:
        return out
    # floor(log2(width)) from the float exponent (exact for widths below 2**53)
    level = np.frexp(width.astype(np.float64))[1].astype(np.int8)
    level -= 1
    order = np.argsort(level, kind="stable")
    bounds = np.searchsorted(level[order], np.arange(1, top.bit_length() + 1))
    table, spare = values.copy(), np.empty_like(values)
    span = 1
    for j in range(1, top.bit_length()):
        # table: max of the 2**j rows ending at each row (clipped at row 0)
        np.maximum(table[span:], table[:-span], out=spare[span:])
        spare[:span] = table[:span]
        table, spare = spare, table
        span *= 2
        rows = order[bounds[j - 1] : bounds[j]]
        if len(rows):
            out[rows] = np.maximum(table[rows], table[left[rows] + (span - 1)])
    return out


# --------------------------------------------------------------------------------------
# The primitives.


class BatchState:
    """Primitives per row, as :class:`TokenState` holds them after each trade.

    Every attribute is computed on first use and kept; features write into their
    ``out`` row with the helpers (``window_sum``, ``window_trades``,
    ``window_ref_price``, ...), so nothing is computed twice.
    """

    def __init__(self, layout: Layout, history: TradeHistory):
        self.layout = layout
        self.history = history
        self.n = n = len(history)
        raw = np.asarray(history.time, np.float64)
        # Arrival stamps can step back by a hair; the incremental path clamps them.
        self.time = np.maximum.accumulate(raw) if n else raw
        self.first_time = float(self.time[0]) if n else 0.0
        self.v_sol = np.asarray(history.v_sol, np.float64)
        self.v_tokens = np.asarray(history.v_tokens, np.float64)
        self.is_buy = np.asarray(history.is_buy, np.bool_)
        self.scratch = np.empty(n, np.int64)

    # ------------------------------------------------------------------ per trade

    @cached_property
    def price(self) -> np.ndarray:
        return np.divide(self.v_sol, self.v_tokens)

    @cached_property
    def returns(self) -> np.ndarray:
        """price / previous price - 1 (0 for the first trade)."""
        price = self.price
        r = np.zeros(self.n)
        if self.n > 1:
            np.divide(price[1:], price[:-1], out=r[1:])
            r[1:] -= 1.0
        return r

    @cached_property
    def buy(self) -> np.ndarray:
        """Lamports bought per row (0 for sells)."""
        return np.multiply(np.asarray(self.history.lamports, np.int64), self.is_buy)

    @cached_property
    def buy_cum(self) -> np.ndarray:
        """Prefix sums of buys: ``buy_cum[i]`` = lamports bought in rows < i."""
        cum = np.zeros(self.n + 1, np.int64)
        np.cumsum(self.buy, out=cum[1:])
        return cum

    @cached_property
    def sell_cum(self) -> np.ndarray:
        cum = np.zeros(self.n + 1, np.int64)
        sell = np.subtract(np.asarray(self.history.lamports, np.int64), self.buy)
        np.cumsum(sell, out=cum[1:])
        return cum

    @cached_property
    def peak_price(self) -> np.ndarray:
        return np.maximum.accumulate(self.price) if self.n else self.price

    @cached_property
    def largest_buy(self) -> np.ndarray:
        return np.maximum.accumulate(self.buy) if self.n else self.buy

    # ------------------------------------------------------------------ per trader

    @cached_property
    def _trader_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows sorted by trader, in time order within a trader; group start offsets)."""
        trader = np.asarray(self.history.trader)
        if not self.n:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        low, high = int(trader.min()), int(trader.max())
        # A stable sort of 16-bit keys is a radix sort: linear, not n log n.
        keys = (trader - low).astype(np.uint16) if high - low < 65_536 else trader
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys.take(order)
        starts = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1])
        starts += 1
        return order, np.concatenate([np.zeros(1, np.int64), starts])

    @cached_property
    def new_cum(self) -> np.ndarray:
        """Prefix counts of first-time traders: ``new_cum[i+1]`` = unique traders after row i."""
        order, starts = self._trader_groups
        is_new = np.zeros(self.n, np.int64)
        is_new[order.take(starts)] = 1
        cum = np.zeros(self.n + 1, np.int64)
        np.cumsum(is_new, out=cum[1:])
        return cum

    @cached_property
    def max_trader_buy(self) -> np.ndarray:
        """Largest cumulative amount one trader has bought, after each row."""
        order, starts = self._trader_groups
        n = self.n
        if not n:
            return np.zeros(0, np.int64)
        sorted_buy = self.buy.take(order)
        cum = np.cumsum(sorted_buy)
        before = cum.take(starts) - sorted_buy.take(starts)
        cum -= np.repeat(before, np.diff(np.append(starts, n)))
        per_trader = np.empty(n, np.int64)
        per_trader[order] = cum
        # A sell leaves its trader's total where it was, so a running max over all
        # rows equals the incremental path's max over buys.
        return np.maximum.accumulate(per_trader, out=per_trader)

    @cached_property
    def _creator_rows(self) -> np.ndarray:
        history = self.history
        if not self.n:
            return np.zeros(0, np.int64)
        creator = history.creator if history.creator is not None else int(history.trader[0])
        return np.flatnonzero(np.asarray(history.trader) == creator)

    def creator_balance(self, out: np.ndarray) -> None:
        """Creator's token balance after each row (0 before its first trade)."""
        rows = self._creator_rows
        if not len(rows):
            out.fill(0.0)
            return
        last = np.zeros(self.n, np.int64)
        last[rows] = rows
        np.maximum.accumulate(last, out=last)
        np.take(np.asarray(self.history.new_balance, np.float64), last, out=out)
        out[: rows[0]] = 0.0

    def creator_sold(self, out: np.ndarray) -> None:
        """1.0 from the creator's first sell on, else 0.0."""
        rows = self._creator_rows
        sells = rows[~self.is_buy.take(rows)]
        first = int(sells[0]) if len(sells) else self.n
        out[:first] = 0.0
        out[first:] = 1.0

    # ------------------------------------------------------------------ windows

    @cached_property
    def _lefts(self) -> list[np.ndarray]:
        """Per window: the first row inside it (all windows in one pass over the buckets)."""
        return window_lefts(self.time, self.layout.windows)

    def left(self, k: int) -> np.ndarray:
        return self._lefts[k]

    @cached_property
    def _rows_after(self) -> np.ndarray:
        return np.arange(1, self.n + 1, dtype=np.int64)

    def window_sum(self, cum: np.ndarray, k: int, out: np.ndarray) -> np.ndarray:
        """``cum[i+1] - cum[left]`` of window ``k`` into ``out`` (exact in int64 first)."""
        np.take(cum, self.left(k), out=self.scratch)
        np.subtract(cum[1:], self.scratch, out=out)
        return out

    def window_trades(self, k: int, out: np.ndarray) -> np.ndarray:
        np.subtract(self._rows_after, self.left(k), out=out)
        return out

    @cached_property
    def _price_before(self) -> np.ndarray:
        """price[j - 1] at index j (price[0] at index 0): a window's reference price."""
        before = np.empty(self.n + 1)
        before[1:] = self.price
        before[0] = self.price[0] if self.n else 0.0
        return before

    def window_ref_price(self, k: int, out: np.ndarray) -> np.ndarray:
        """Price of the last trade before window ``k`` (the first price while younger)."""
        np.take(self._price_before, self.left(k), out=out)
        return out

    def window_max_buy(self, k: int) -> np.ndarray:
        """Largest single buy inside window ``k`` (int64 lamports)."""
        cache = self.__dict__.setdefault("_max_buys", {})
        if k not in cache:
            cache[k] = range_max(self.buy, self.left(k))
        return cache[k]

    # ------------------------------------------------------------------ recurrences

    def ewma_variance(self, k: int, out: np.ndarray) -> np.ndarray:
        """EWMA of squared returns with weight ``layout.ewma_alphas[k]``, into ``out``."""
        alpha = self.layout.ewma_alphas[k]
        np.multiply(self.returns, self.returns, out=out)
        out *= alpha
        return linear_recurrence(out, 1.0 - alpha, out=out)

    def rsi_averages(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Wilder averages of gains and losses for ``layout.rsi_periods[k]``."""
        cache = self.__dict__.setdefault("_rsi", {})
        if k not in cache:
            a = 1.0 / self.layout.rsi_periods[k]
            gain = np.maximum(self.returns, 0.0)
            gain *= a
            loss = np.negative(self.returns)
            np.maximum(loss, 0.0, out=loss)
            loss *= a
            cache[k] = (
                linear_recurrence(gain, 1.0 - a, out=gain),
                linear_recurrence(loss, 1.0 - a, out=loss),
            )
        return cache[k]
