"""Drift alerts a model's card raises on a simulated market: model.drift transitions.

Each seed's market (``--minutes`` of it) goes through the whole embedded system as
``pumpflow backtest`` runs it (:func:`pumpflow.cli.backtest.run_backtest`), serving the
models given (``--model NAME=PATH``, repeatable; default the shipped one as ``entry``)
side by side. The model service feeds every model's drift monitor every
``features.updated``, as in a deployment, and publishes a ``model.drift`` event per
feature crossing into drift or out of it; the monitor judges nothing before its warm-up
(20 market minutes, :class:`~pumpflow.common.model.drift.DriftThresholds`), so every
transition counted here is one a user of ``pumpflow run`` or of the simulator stack
would be alerted to (alert ModelDrift). The simulator's market does not change its
regime: a card whose reference is the market's steady state should raise few.

Per seed and model: transitions (to drifting, recovered), the features ever flagged
and when first (market minutes since the start), and those drifting at the end;
``--transitions`` lists each.

Run: .venv/bin/python benchmarks/drift_replay.py [--seeds 7,8] [--minutes 50]
     [--model new=services/model/src/pumpflow/model/default/entry.onnx
      --model old=/tmp/old/entry.onnx] [--transitions]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from pumpflow.cli.backtest import SIM_START, run_backtest, simulated_frames
from pumpflow.cli.train import parse_seeds
from pumpflow.model import DEFAULT_MODEL_PATH


@dataclass
class Transition:
    minute: float
    model_id: str
    feature: str
    state: str
    psi: float
    drifting: int


@dataclass
class Replay:
    seed: int
    minutes: float
    cpu_s: float
    transitions: list[Transition] = field(default_factory=list)


async def replay(seed: int, minutes: float, models: dict[str, str]) -> Replay:
    """One seed through the embedded system serving ``models``; its drift transitions."""
    frames = simulated_frames(seed, minutes, start=SIM_START)
    start = frames[0][0] if frames else SIM_START
    found: list[Transition] = []

    async def observe(event) -> None:
        if event.type == "model.drift":
            d = event.data
            found.append(
                Transition(
                    minute=(event.time - start) / 60.0,
                    model_id=d.model_id,
                    feature=d.feature,
                    state=d.state,
                    psi=d.psi,
                    drifting=d.drifting,
                )
            )

    cpu = time.process_time()
    await run_backtest(frames, {"model_models": models}, name=f"seed {seed}", observe=observe)
    return Replay(seed, minutes, time.process_time() - cpu, found)


def summary(result: Replay, model_id: str) -> str:
    mine = [t for t in result.transitions if t.model_id == model_id]
    states = Counter(t.state for t in mine)
    first: dict[str, float] = {}
    drifting: set[str] = set()
    for t in mine:
        if t.state == "drifting":
            first.setdefault(t.feature, t.minute)
            drifting.add(t.feature)
        else:
            drifting.discard(t.feature)
    flagged = ", ".join(f"{f} ({m:.0f})" for f, m in sorted(first.items(), key=lambda x: x[1]))
    return (
        f"seed {result.seed} {model_id}: {len(mine)} transitions "
        f"({states['drifting']} drifting, {states['recovered']} recovered); "
        f"{len(first)} features flagged: {flagged or 'none'}; "
        f"drifting at minute {result.minutes:g}: {', '.join(sorted(drifting)) or 'none'}"
    )


def parse_model(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH")
    return name, path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=parse_seeds, default=(7, 8), help="market seeds (7,8)")
    parser.add_argument("--minutes", type=float, default=50.0, help="market minutes per seed (50)")
    parser.add_argument(
        "--model", type=parse_model, action="append", default=[], metavar="NAME=PATH",
        help="a model to serve (repeatable; default: the shipped one as entry)",
    )  # fmt: skip
    parser.add_argument("--transitions", action="store_true", help="list every transition")
    args = parser.parse_args(argv)
    models = dict(args.model) or {"entry": str(DEFAULT_MODEL_PATH)}
    totals: Counter = Counter()
    for seed in args.seeds:
        result = asyncio.run(replay(seed, args.minutes, models))
        print(f"seed {seed}: {args.minutes:g} market minutes in {result.cpu_s:.0f} CPU s")
        if args.transitions:
            for t in result.transitions:
                print(
                    f"  {t.minute:5.1f} min {t.model_id}: {t.feature} {t.state} "
                    f"(PSI {t.psi:.3f}, {t.drifting} drifting)"
                )
        for model_id in models:
            print("  " + summary(result, model_id))
            totals[model_id] += sum(t.model_id == model_id for t in result.transitions)
        sys.stdout.flush()
    seeds = ",".join(map(str, args.seeds))
    for model_id in models:
        print(f"{model_id}: {totals[model_id]} transitions over seeds {seeds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
