"""Graceful exit of 100 positions on simulated curves, beside two naive ways out.

Each position is a paper buy (trading's fill maths: curve fee, API fee) of 0.2-3 SOL
into its own curve, which others had bought 0-20 SOL into, opened 0-300 s before the
shutdown. Its token is active (45%), new (15%), declining (25%) or inactive (15%).
While the exit runs, the other traders move each curve every 0.1 s of simulated
time (a seeded model, stated so the figures can be judged):

- active: buyers come back after a sale, closing a fifth of the gap between the SOL
  in the curve and what it held when the exit began each second, with noise of
  0.05 SOL/s; new tokens half as fast;
- declining: holders sell 0.15% of the curve's tokens a second (about 0.05 SOL/s on a
  35 SOL curve), and no one buys the dips;
- inactive: holders sell 0.03% a second, no buyers.

Orders fill after trading's paper latency (0.5 s) against the curve as it is then.
The ways out:

- ``all at once``: every position sold whole at the same moment;
- ``arrival order``: each position sold whole, one after the other, oldest first;
- ``arrival, tranches``: the graceful exit's tranches and pacing, queued oldest first
  (every priority weight on age);
- ``graceful``: :class:`GracefulExitManager` with its default configuration.

Figures per way out, summed over the positions and averaged over seeds: time to flat
(simulated seconds), SOL recovered after every fee against the marks (the tokens at
the spot price when the exit began), VWAP slippage (before fees) against the marks,
the worst position's slippage, the largest order's price impact on the curve it was
sized on and on the curve it filled on (the market moved in between), and the wall
time.

Run: .venv/bin/python benchmarks/graceful_exit.py [--positions 100] [--seeds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field

from pumpflow.common.clock import ReplayClock
from pumpflow.common.curve import CurveState, quote_buy, quote_sell
from pumpflow.common.events import Event, ExitOrder, OrderFilled, OrderRejected
from pumpflow.common.exit import GracefulExitConfig, GracefulExitManager
from pumpflow.common.trading import PaperExecution, PaperFill, fill_buy, fill_sell

START = 1_700_000_000.0
STEP_S = 0.1
EXECUTION = PaperExecution()
STATES = (("active", 0.45), ("new", 0.15), ("declining", 0.25), ("inactive", 0.15))


@dataclass
class Position:
    mint: str
    position_id: str
    opened_at: float
    tokens: float
    entry_price: float
    mark_price: float
    mark_state: CurveState
    lifecycle: str


class Book:
    def __init__(self) -> None:
        self.open_positions: dict[str, Position] = {}


class NullBus:
    async def publish(self, event: Event) -> None:
        return None


@dataclass
class Market:
    """Curves moved by the other traders (the model in the module docstring)."""

    clock: ReplayClock
    rng: random.Random
    curves: dict[str, CurveState] = field(default_factory=dict)
    anchors: dict[str, float] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    #: told each curve after every step (the trades the exit service would see)
    watcher: GracefulExitManager | None = None

    def advance_to(self, when: float) -> None:
        while self.clock.now() + STEP_S <= when + 1e-9:
            for mint, curve in self.curves.items():
                self.curves[mint] = self._step(mint, curve)
            self.clock.set_sync(self.clock.now() + STEP_S)
            if self.watcher is not None:
                for mint, curve in self.curves.items():
                    self.watcher.on_market(mint, curve)
        self.clock.set_sync(when)

    def _step(self, mint: str, curve: CurveState) -> CurveState:
        state = self.states[mint]
        if state in ("active", "new"):
            pull = 0.2 if state == "active" else 0.1
            sol = (pull * (self.anchors[mint] - curve.v_sol) + self.rng.gauss(0.0, 0.05)) * STEP_S
            if sol > 0:
                return quote_buy(curve, sol, fee_rate=0.0).after
            tokens = -sol / curve.price  # a small sale, sized at the spot price
        else:
            # holders sell a share of the curve's tokens a second, no one buys
            tokens = (0.0015 if state == "declining" else 0.0003) * curve.v_tokens * STEP_S
        return quote_sell(curve, tokens, fee_rate=0.0).after


class SimExecutor:
    """Fills an order ``latency_s`` after it was sent, on the curve as it is then."""

    def __init__(self, market: Market, book: Book):
        self.market = market
        self.book = book
        #: impact of each order on the curve it was sent on, and on the one it filled on
        self.impacts: list[float] = []
        self.fill_impacts: list[float] = []
        self.fills: list[tuple[str, float, float, float]] = []  # mint, tokens, sol, price

    async def execute_exit(self, order: ExitOrder) -> OrderFilled | OrderRejected:
        sent = self.market.clock.now()
        expected = self.market.curves[order.mint]
        await asyncio.sleep(0)  # the round's other orders go out at the same moment
        if self.market.clock.now() < sent + EXECUTION.latency_s:
            self.market.advance_to(sent + EXECUTION.latency_s)
        state = self.market.curves[order.mint]
        fill = fill_sell(
            state, order.token_amount, expected=expected, execution=EXECUTION,
            slippage_pct=order.slippage_pct,
        )  # fmt: skip
        if not isinstance(fill, PaperFill):
            return OrderRejected(order_id=order.order_id, mint=order.mint, reason=fill.reason)
        self.market.curves[order.mint] = fill.after
        self.impacts.append(quote_sell(expected, fill.tokens).price_impact)
        self.fill_impacts.append(1.0 - fill.price / state.price)
        self.fills.append((order.mint, fill.tokens, fill.sol, fill.price))
        position = self.book.open_positions[order.mint]
        position.tokens -= fill.tokens
        if position.tokens <= 1e-6:
            del self.book.open_positions[order.mint]
        return OrderFilled(
            order_id=order.order_id, mint=order.mint, side="sell", token_amount=fill.tokens,
            sol_amount=fill.sol, price=fill.price, fee_sol=fill.fee_sol,
            position_id=order.position_id,
        )  # fmt: skip


def build(seed: int, positions: int) -> tuple[Market, Book, dict[str, Position]]:
    rng = random.Random(seed)
    clock = ReplayClock(START)
    market = Market(clock=clock, rng=random.Random(seed * 7919))
    book = Book()
    for i in range(positions):
        mint = f"mint{i:03d}"
        curve = CurveState()
        depth = rng.uniform(0.0, 20.0)
        if depth:
            curve = quote_buy(curve, depth).after
        size = min(3.0, max(0.2, rng.lognormvariate(-0.2, 0.7)))
        fill = fill_buy(curve, size, expected=curve, execution=EXECUTION)
        assert isinstance(fill, PaperFill)
        state = rng.choices([s for s, _ in STATES], weights=[w for _, w in STATES])[0]
        book.open_positions[mint] = Position(
            mint=mint, position_id=f"pos-{mint}", opened_at=START - rng.uniform(0, 300),
            tokens=fill.tokens, entry_price=fill.sol / fill.tokens, mark_price=fill.after.price,
            mark_state=fill.after, lifecycle=state,
        )  # fmt: skip
        market.curves[mint] = fill.after
        market.anchors[mint] = fill.after.v_sol
        market.states[mint] = state
    marks = {m: Position(**vars(p)) for m, p in book.open_positions.items()}
    return market, book, marks


async def sell_whole(market: Market, book: Book, order: list[str], *, together: bool) -> float:
    executor = SimExecutor(market, book)

    def exit_order(mint: str) -> ExitOrder:
        p = book.open_positions[mint]
        return ExitOrder(
            order_id=f"{p.position_id}:all", mint=mint, position_id=p.position_id,
            token_amount=p.tokens, slippage_pct=100.0,
        )  # fmt: skip

    if together:
        await asyncio.gather(*(executor.execute_exit(exit_order(m)) for m in order))
    else:
        for mint in order:
            await executor.execute_exit(exit_order(mint))
    return executor


async def graceful(market: Market, book: Book, config: GracefulExitConfig) -> SimExecutor:
    executor = SimExecutor(market, book)

    async def wait_until(when: float) -> None:
        market.advance_to(when)

    manager = GracefulExitManager(
        NullBus(), book, executor, clock=market.clock, config=config, wait_until=wait_until
    )
    market.watcher = manager
    for mint, curve in market.curves.items():
        manager.on_market(mint, curve)
        manager.on_lifecycle(mint, book.open_positions[mint].lifecycle)
    manager.begin_graceful_exit("benchmark")
    summary = await manager.run()
    assert summary.positions_left == 0, summary.text()
    return executor


def measure(name: str, seed: int, positions: int) -> dict[str, float]:
    market, book, marks = build(seed, positions)
    arrival = sorted(book.open_positions, key=lambda m: book.open_positions[m].opened_at)
    wall = time.perf_counter()
    if name == "all at once":
        executor = asyncio.run(sell_whole(market, book, arrival, together=True))
    elif name == "arrival order":
        executor = asyncio.run(sell_whole(market, book, arrival, together=False))
    elif name == "arrival, tranches":
        config = GracefulExitConfig(
            weight_lifecycle=0.0, weight_profit=0.0, weight_depth=0.0, weight_age=1.0,
            age_horizon_s=1e9,
        )  # fmt: skip
        executor = asyncio.run(graceful(market, book, config))
    else:
        executor = asyncio.run(graceful(market, book, GracefulExitConfig()))
    wall = time.perf_counter() - wall
    assert not book.open_positions
    mark_value = sum(marks[m].mark_price * tokens for m, tokens, _, _ in executor.fills)
    gross = sum(price * tokens for _, tokens, _, price in executor.fills)
    recovered = sum(sol for _, _, sol, _ in executor.fills)
    per_position: dict[str, list[float]] = {}
    for mint, tokens, _, price in executor.fills:
        acc = per_position.setdefault(mint, [0.0, 0.0])
        acc[0] += tokens
        acc[1] += price * tokens
    worst = max(1 - (v / t) / marks[m].mark_price for m, (t, v) in per_position.items())
    return {
        "time_to_flat_s": market.clock.now() - START,
        "orders": len(executor.fills),
        "mark_value": mark_value,
        "recovered": recovered,
        "shortfall": 1 - recovered / mark_value,
        "vwap_slippage": 1 - gross / mark_value,
        "worst_slippage": worst,
        "max_impact": max(executor.impacts),
        "max_fill_impact": max(executor.fill_impacts),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    ways = ("all at once", "arrival order", "arrival, tranches", "graceful")
    print(f"{args.positions} positions, seeds 1-{args.seeds}, means over seeds")
    header = (
        f"{'way out':<18} {'to flat s':>9} {'orders':>7} {'marks SOL':>10} "
        f"{'recovered':>10} {'shortfall':>9} {'VWAP slip':>9} {'worst':>7} "
        f"{'max impact':>10} {'at fill':>7} {'wall ms':>8}"
    )
    print(header)
    for way in ways:
        runs = [measure(way, seed, args.positions) for seed in range(1, args.seeds + 1)]

        def mean(key: str, runs=runs) -> float:
            return statistics.fmean(r[key] for r in runs)

        print(
            f"{way:<18} {mean('time_to_flat_s'):>9.1f} {mean('orders'):>7.0f} "
            f"{mean('mark_value'):>10.2f} {mean('recovered'):>10.2f} "
            f"{mean('shortfall'):>9.2%} {mean('vwap_slippage'):>9.2%} "
            f"{mean('worst_slippage'):>7.1%} {max(r['max_impact'] for r in runs):>10.2%} "
            f"{max(r['max_fill_impact'] for r in runs):>7.2%} "
            f"{mean('wall_s') * 1000:>8.1f}"
        )


if __name__ == "__main__":
    main()
