"""Simulator generation speed: frames/s of Market.frames and of JSONL dataset writing.

Run: .venv/bin/python benchmarks/simulator_generate.py [--minutes 60] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from pumpflow.simulator.dataset import write_dataset
from pumpflow.simulator.market import Market, MarketConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=60.0, help="simulated minutes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    market = Market(MarketConfig(seed=args.seed))
    span = args.minutes * 60.0

    best = 0.0
    count = 0
    for _ in range(args.repeat):
        began = time.perf_counter()
        count = sum(1 for _ in market.frames(span))
        best = max(best, count / (time.perf_counter() - began))
    print(
        f"Market.frames: {count} frames ({args.minutes:g} simulated minutes), "
        f"best of {args.repeat}: {best:,.0f} frames/s "
        f"({best / (count / span):,.0f}x real time)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.jsonl")
        best_ds = 0.0
        for _ in range(args.repeat):
            began = time.perf_counter()
            written = write_dataset(market, path, duration_s=span, start_epoch=1.76e9)
            best_ds = max(best_ds, written / (time.perf_counter() - began))
        size = os.path.getsize(path)
    print(
        f"write_dataset (JSONL): best of {args.repeat}: {best_ds:,.0f} frames/s, "
        f"{size / written:.0f} bytes/frame"
    )


if __name__ == "__main__":
    main()
