"""Simulator calibration over seeds: each seed's statistics and their pool.

Run: .venv/bin/python benchmarks/simulator_calibration.py [--seeds 101-114] [--minutes 60]
       [--pooled-only] [--set rate_appeal_exponent=0.5 ...]

The default seeds are used by no test, so they check that the calibration holds
beyond the seeds the tests pin. ``--set`` overrides a MarketConfig parameter (to
measure another calibration beside the shipped one). Exits non-zero when the pool is
out of tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from pumpflow.cli.train import parse_seeds
from pumpflow.simulator.calibration import SeedsCalibration, calibrate_seeds
from pumpflow.simulator.market import MarketConfig

SHORT_NAMES = {
    "graduation rate": "grad rate",
    "tokens quiet within 15 min of launch": "quiet 15m",
    "graduates: median trades": "med trades",
    "graduates: median minutes to graduate": "med min",
    "average trades/s": "avg tps",
    "peak trades/s (1 s window) / average": "peak/avg",
    "launches per minute": "launch/min",
}


def _setting(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if name not in {f.name for f in dataclasses.fields(MarketConfig)}:
        raise argparse.ArgumentTypeError(f"no MarketConfig parameter {name!r}")
    return name, float(value)


def _cell(value: float, unit: str, ok: bool) -> str:
    text = f"{value * 100:.2f}%" if unit == "%" else f"{value:.2f}"
    return text if ok else text + "*"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--seeds", type=parse_seeds, default=parse_seeds("101-114"), metavar="101-114"
    )
    parser.add_argument("--minutes", type=float, default=60.0, help="simulated minutes a seed")
    parser.add_argument("--rate", type=float, default=30.0, help="token launches per minute")
    parser.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a MarketConfig parameter",
    )
    parser.add_argument("--pooled-only", action="store_true", help="no per-seed table")
    args = parser.parse_args()
    config = MarketConfig(seed=0, launches_per_minute=args.rate, **dict(args.set))
    began = time.perf_counter()
    result = calibrate_seeds(config, args.seeds, minutes=args.minutes)
    took = time.perf_counter() - began
    if args.set:
        print("with " + ", ".join(f"{name}={value:g}" for name, value in args.set))

    names = [s.name for s in result.pooled.statistics]
    if not args.pooled_only:
        _per_seed_table(result, names)
    minutes = sorted(m for t in result.tallies for m in t.graduate_minutes)
    if minutes:
        q = statistics.quantiles(minutes, n=4)
        print(
            f"pooled graduates' minutes: quartiles {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}, "
            f"min {minutes[0]:.2f}, max {minutes[-1]:.2f}"
        )
    print(
        f"pooled over seeds {args.seeds[0]}-{args.seeds[-1]} ({len(args.seeds)} seeds, "
        f"{args.minutes:g} min each, {took:.1f} s):"
    )
    print(result.pooled.format())
    return 0 if result.pooled.ok else 1


def _per_seed_table(result: SeedsCalibration, names: list[str]) -> None:
    print(f"{'seed':>6} {'grads':>5} " + " ".join(f"{SHORT_NAMES[n]:>11}" for n in names))
    for seed, rep in zip(result.seeds, result.per_seed, strict=True):
        cells = " ".join(f"{_cell(s.value, s.unit, s.ok):>11}" for s in rep.statistics)
        print(f"{seed:>6} {rep.graduates:>5} {cells}")
    off = sum(
        not rep.by_name("graduates: median minutes to graduate").ok for rep in result.per_seed
    )
    fixed = sum(
        not 3.5 <= rep.by_name("graduates: median minutes to graduate").value <= 5.5
        for rep in result.per_seed
    )
    print(
        f"(* out of its run's tolerance; median minutes out on {off} of "
        f"{len(result.seeds)} seeds, out of a fixed 3.5-5.5 on {fixed})"
    )


if __name__ == "__main__":
    sys.exit(main())
