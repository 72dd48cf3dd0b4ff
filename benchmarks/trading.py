"""Trading in the embedded run: decisions per second, and the strategy's PnL on unseen seeds.

Each seed's market (``--minutes`` of it) goes through the whole embedded system as
``pumpflow backtest`` runs it (:func:`pumpflow.cli.backtest.run_backtest`, one piece
of code for both): frames handed to the feed's per-frame path (what its socket
reader calls), then features, activity, model, trading (paper) and exit, one process,
the queued in-memory bus and the in-process store (as ``benchmarks/pipeline.py`` does
for the first three). The clock is a ReplayClock at each frame's market time; every
market second the bus is drained, then the clock fires the due timers (trading's due
fills and breakers, the exit rules' timers, activity's quiet timers) and the bus is
drained again: every event is handled before the clock passes the next market second,
so no service lags the clock by more than that and every decision sees the market as
it would live.
It runs as fast as it computes.

Speed: predictions trading decided on (``model.prediction`` it consumed) and orders it
sent (``order.requested``, entries and the exit service's sales), per CPU second of
the process and per wall second, from the first frame to the drain.

PnL, after every fee (the curve's 1.25% and the trade API's 1%): trading's book at
the end of the stream, realised PnL plus the open positions marked at what selling
them whole would bring (:func:`~pumpflow.common.trading.exit_value`). Entries come
from the shipped default model; exits from the exit service's default rules. Seeds
6-10 by default: the default model was trained on seeds 1-3 and validated on 4-5
(its card). Two settings of trading: the service's defaults (entry score 0.6, no
token whose creator sold), and ``pumpflow run``'s (score 0.5, creator sales allowed).

Beside it, two references on the same markets:

- naive: buy every new token at its creation with the same size (the strategy's mean
  entry over all seeds, or ``--size``), sell all 60 s after the buy; the orders go
  through trading's own :class:`~pumpflow.common.trading.PaperBroker` (latency, curve
  fee, impact, slippage limit, API fee) fed with the same token events; no capital
  limit;
- nothing: 0.

Run: .venv/bin/python benchmarks/trading.py [--seeds 6-10] [--minutes 30]
     [--settings default run] [--size SOL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from collections import Counter
from dataclasses import dataclass

from pumpflow.cli.backtest import RUN_CONFIG, SIM_START, Report, run_backtest, simulated_frames
from pumpflow.cli.train import parse_seeds
from pumpflow.common.events import OrderFilled, OrderRequested, TokenCreated
from pumpflow.common.trading import PaperBroker, PaperExecution, exit_value
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig
from pumpflow.trading.service import TradingService

START = SIM_START
#: trading's settings per strategy: the service's defaults, and ``pumpflow run``'s
SETTINGS = {"default": {}, "run": RUN_CONFIG}
NAIVE_HOLD_S = 60.0


async def run_strategy(seed: int, minutes: float, trading_settings: dict) -> Report:
    """One seed through the embedded system (``pumpflow backtest``'s run); its report."""
    frames = simulated_frames(seed, minutes, start=START)
    return await run_backtest(frames, trading_settings, name=f"seed {seed}")


@dataclass
class Naive:
    buys: int = 0
    rejected: int = 0
    bought_sol: float = 0.0
    sold_sol: float = 0.0
    marked_sol: float = 0.0
    fees_sol: float = 0.0
    held_at_end: int = 0

    @property
    def pnl(self) -> float:
        return self.sold_sol + self.marked_sol - self.bought_sol


def run_naive(seed: int, minutes: float, size_sol: float, execution: PaperExecution) -> Naive:
    """Buy every token at its creation with ``size_sol``, sell 60 s after the buy, on paper."""
    broker = PaperBroker(execution=execution)
    result = Naive()
    held: dict[str, float] = {}
    sales: list[tuple[float, str]] = []  # (when, mint), in time order

    def book(outcomes) -> None:
        for outcome in outcomes:
            fill = outcome.result
            if not isinstance(fill, OrderFilled):
                result.rejected += fill.side == "buy"
                continue
            result.fees_sol += fill.fee_sol
            if fill.side == "buy":
                result.bought_sol += fill.sol_amount
                held[fill.mint] = fill.token_amount
            else:
                result.sold_sol += fill.sol_amount
                held.pop(fill.mint, None)

    def sell_due(now: float) -> None:
        while sales and sales[0][0] <= now:
            when, mint = sales.pop(0)
            book(broker.due(when))  # a buy due by then has filled
            tokens = held.get(mint)
            if tokens:
                order = OrderRequested(
                    order_id=f"sell:{mint}", mint=mint, side="sell", token_amount=tokens,
                    slippage_pct=100.0,  # a time exit sells whatever the price
                )  # fmt: skip
                book([o for o in [broker.submit(order, time=when)] if o is not None])

    end = START
    for event in market_events(Market(MarketConfig(seed=seed)), minutes * 60, start_epoch=START):
        end = event.time
        sell_due(event.time)
        book(broker.observe(event.data, time=event.time))
        if isinstance(event.data, TokenCreated):
            result.buys += 1
            order = OrderRequested(
                order_id=f"buy:{event.data.mint}", mint=event.data.mint, side="buy",
                sol_amount=size_sol, slippage_pct=execution.slippage_pct,
            )  # fmt: skip
            outcome = broker.submit(order, time=event.time)
            if outcome is not None:
                book([outcome])
            sales.append((event.time + NAIVE_HOLD_S, event.data.mint))
    book(broker.due(end))
    for mint, tokens in held.items():
        market = broker.market(mint)
        if market is not None and market.state is not None:
            result.marked_sol += exit_value(
                market.state, tokens, execution=execution, venue=market.venue
            )
            result.held_at_end += 1
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="6-10", help="simulator seeds: 6-10 or 6,8,9")
    parser.add_argument("--minutes", type=float, default=30.0, help="market minutes per seed")
    parser.add_argument(
        "--settings", nargs="+", choices=sorted(SETTINGS), default=["default", "run"]
    )
    parser.add_argument("--size", type=float, help="naive baseline's SOL per buy")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    execution = TradingService.settings_class.load(service="trading").execution()
    print(f"== trading in the embedded run: seeds {seeds}, {args.minutes:g} market minutes "
          f"each; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    all_buys: list[float] = []
    for name in args.settings:
        runs = [asyncio.run(run_strategy(s, args.minutes, SETTINGS[name])) for s in seeds]
        print(f"\n-- strategy, trading settings '{name}' {SETTINGS[name] or '(defaults)'}")
        print("| seed | frames | predictions | buy orders (filled/rejected) | sell orders "
              "(filled/rejected) | SOL bought | realised | open, marked | PnL (SOL) | "
              "decisions/CPU s | decisions/s | orders/CPU s |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for seed, r in zip(seeds, runs, strict=True):
            o = r.orders
            print(f"| {seed} | {r.frames:,} | {r.predictions:,} | {o['requested', 'buy']} "
                  f"({o['filled', 'buy']}/{o['rejected', 'buy']}) | {o['requested', 'sell']} "
                  f"({o['filled', 'sell']}/{o['rejected', 'sell']}) | {r.bought_sol:.3f} | "
                  f"{r.realized_sol:+.4f} | {r.unrealized_sol:+.4f} ({r.open_positions}) | "
                  f"{r.pnl:+.4f} | {r.predictions / r.cpu_s:,.0f} | "
                  f"{r.predictions / r.seconds:,.0f} | {r.requested / r.cpu_s:,.1f} |")  # fmt: skip
        pnl = sum(r.pnl for r in runs)
        bought = sum(r.bought_sol for r in runs)
        predictions = sum(r.predictions for r in runs)
        cpu, wall = sum(r.cpu_s for r in runs), sum(r.seconds for r in runs)
        realized = sum(r.realized_sol for r in runs)
        print(f"pooled: PnL {pnl:+.4f} SOL (realised {realized:+.4f}) on {bought:.3f} SOL "
              f"bought ({pnl / bought:+.1%} of it)" if bought else "pooled: no entry")  # fmt: skip
        print(f"pooled: {predictions:,} predictions decided, "
              f"{sum(r.requested for r in runs)} orders; {predictions / cpu:,.0f} decisions per "
              f"CPU second, {predictions / wall:,.0f}/s wall; "
              f"frames {sum(r.frames for r in runs) / wall:,.0f}/s wall")  # fmt: skip
        skipped = sum((r.skipped for r in runs), Counter())
        print(f"why predictions ordered nothing (top 5): {skipped.most_common(5)}")
        breakers = sum((r.breakers for r in runs), Counter())
        print(f"breakers that saw a fault (runs): {dict(breakers) or 'none'}")
        all_buys += [r.bought_sol / r.entries for r in runs if r.entries]
    size = args.size or (statistics.mean(all_buys) if all_buys else 0.2)
    print(f"\n-- naive: every new token bought with {size:.3f} SOL, sold {NAIVE_HOLD_S:g} s later")
    print("| seed | buys | rejected | SOL bought | SOL from sales | held, marked | fees | "
          "PnL (SOL) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    naive = [run_naive(s, args.minutes, size, execution) for s in seeds]
    for seed, n in zip(seeds, naive, strict=True):
        print(f"| {seed} | {n.buys} | {n.rejected} | {n.bought_sol:.2f} | {n.sold_sol:.2f} | "
              f"{n.marked_sol:.2f} ({n.held_at_end}) | {n.fees_sol:.2f} | "
              f"{n.pnl:+.3f} |")  # fmt: skip
    pnl, bought = sum(n.pnl for n in naive), sum(n.bought_sol for n in naive)
    print(f"pooled: PnL {pnl:+.3f} SOL on {bought:.2f} SOL bought ({pnl / bought:+.1%} of it)")
    print("-- nothing: PnL 0")


if __name__ == "__main__":
    main()
