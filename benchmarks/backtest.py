"""Backtest speed on one core: the whole embedded pipeline, and the vectorised batch path.

Whole pipeline: ``pumpflow backtest``'s own run (:func:`pumpflow.cli.backtest.run_backtest`
with ``pumpflow run``'s trading settings): every frame through the feed's per-frame path
(decode, validation, dedup, per-mint seq), features, activity, model, trading on paper
and exit, on the queued in-memory bus and the replay clock.

Batch path, on the same frames: decode every frame (the feed's decoder), group the
token events per mint, compute every token's features at once
(:meth:`~pumpflow.common.features.FeatureManager.compute_batch`, the training path),
score every row with the shipped default model in one onnxruntime call, and count the
tokens with a row above the entry threshold (one entry per token, trading's default).
It has no lifecycle, no trading state, no fills and no exits: it is what the stream's
arithmetic costs without the per-event plumbing (bus, keyed consumer, one scoring call
per vector), so the gap between the two figures is what that plumbing costs.

Both figures are frames per CPU second of this process (``time.process_time``), so a
busy machine slows the wall figure, not the CPU figure, as much.

``--by-service`` runs the whole pipeline once more and splits its CPU by service: every
event-loop callback's CPU time goes to the service whose bus lane or keyed consumer the
callback's task runs (a lane's handler and the consumer's flushes and announcements),
the driver's own task (each frame through the feed's per-frame path, the replay clock's
timers, the drains) apart. It reads the in-memory bus's and the consumer's task
coroutines' locals, so it is a diagnostic of this code, not an interface.

Run: .venv/bin/python benchmarks/backtest.py [--seed 6] [--minutes 10] [--by-service]
     [--partitions N]
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.events
import gc
import time
from collections import Counter

import numpy as np

from pumpflow.cli.backtest import PARTITIONS, RUN_CONFIG, run_backtest, simulated_frames
from pumpflow.common.features import FeatureManager, TradeHistory, trade_input
from pumpflow.common.model.card import prepare_inputs
from pumpflow.common.model.onnx import OnnxRuntime
from pumpflow.common.model.registry import read_model
from pumpflow.common.pumpportal import decode_frame
from pumpflow.model import DEFAULT_MODEL_PATH


def whole_pipeline(frames, partitions: int = PARTITIONS) -> dict[str, float]:
    report = asyncio.run(run_backtest(frames, RUN_CONFIG, name="run", partitions=partitions))
    return {
        "cpu_s": report.cpu_s,
        "wall_s": report.seconds,
        "predictions": report.predictions,
        "entries": report.entries,
    }


def _owner(handle: asyncio.Handle) -> str:
    """The service a callback works for: its task's bus lane or keyed consumer."""
    task = getattr(handle._callback, "__self__", None)
    if not isinstance(task, asyncio.Task):
        return "other callbacks"
    coro = task.get_coro()
    frame = getattr(coro, "cr_frame", None)
    name = getattr(coro, "__qualname__", "")
    if frame is None:
        return "other callbacks"
    lane = frame.f_locals.get("lane")
    if lane is not None:
        return lane.group.service
    owner = frame.f_locals.get("self")
    processor = getattr(owner, "processor", None)
    if processor is not None:
        return type(processor).__name__.removesuffix("Processor").lower()
    if name.startswith("run_backtest"):
        return "driver: frames through the feed, clock, drains"
    if name.startswith("TokenContext"):
        return "trading"  # its token views' writes to the store
    if name.startswith("GroupCommit"):
        return "keyed consumers' commits (encoding, the store's write)"
    if name.startswith("TokenMonitorThreadPool"):
        return "keyed consumers' worker pool"
    return "other tasks"


def by_service(frames, partitions: int = PARTITIONS) -> tuple[Counter, float]:
    """The whole pipeline's CPU seconds by service, and the run's own CPU seconds."""
    spent: Counter = Counter()
    run = asyncio.events.Handle._run
    clock = time.process_time

    def timed(handle: asyncio.Handle) -> None:
        owner = _owner(handle)  # before: a finished coroutine has no frame left
        started = clock()
        run(handle)
        spent[owner] += clock() - started

    asyncio.events.Handle._run = timed
    try:
        report = asyncio.run(run_backtest(frames, RUN_CONFIG, name="run", partitions=partitions))
    finally:
        asyncio.events.Handle._run = run
    return spent, report.cpu_s


def batch_path(frames, min_score: float) -> dict[str, float]:
    model, card = read_model(DEFAULT_MODEL_PATH)
    session = OnnxRuntime().open(model, card)
    manager = FeatureManager()
    order = [manager.names.index(name) for name in card.feature_names]
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    by_mint: dict[str, list] = {}
    creators: dict[str, str] = {}
    for arrival, raw in frames:
        payload = decode_frame(raw)
        trade = trade_input(payload, arrival) if hasattr(payload, "mint") else None
        if trade is not None:
            by_mint.setdefault(payload.mint, []).append(trade)
            if payload.TYPE == "token.created":
                creators[payload.mint] = payload.traderPublicKey
    blocks = [
        manager.compute_batch(TradeHistory.from_inputs(trades, creator=creators.get(mint)))
        for mint, trades in by_mint.items()
    ]
    rows = np.concatenate(blocks)[:, order]
    scores = session.predict(prepare_inputs(rows))
    # one entry per token, as trading's default: the tokens with a row above the threshold
    starts = np.cumsum([0] + [len(b) for b in blocks[:-1]])
    entries = int(np.count_nonzero(np.maximum.reduceat(scores, starts) >= min_score))
    return {
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
        "predictions": len(scores),
        "entries": entries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument(
        "--by-service", action="store_true", help="also split the whole pipeline's CPU by service"
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=PARTITIONS,
        help=f"the whole pipeline's partitions (default {PARTITIONS}, the backtest's)",
    )
    args = parser.parse_args()
    frames = simulated_frames(args.seed, args.minutes)
    print(f"{len(frames):,} frames: {args.minutes:g} market minutes of seed {args.seed}")
    print(f"{'path':<16} {'frames/CPU s':>13} {'frames/wall s':>14} {'CPU s':>8} "
          f"{'scored':>8} {'entries':>8}")  # fmt: skip
    runs = (
        ("whole pipeline", whole_pipeline(frames, args.partitions)),
        ("batch path", batch_path(frames, RUN_CONFIG["trading_min_score"])),
    )
    for name, r in runs:
        print(
            f"{name:<16} {len(frames) / r['cpu_s']:>13,.0f} {len(frames) / r['wall_s']:>14,.0f} "
            f"{r['cpu_s']:>8.2f} {r['predictions']:>8,} {r['entries']:>8,}"
        )
    if args.by_service:
        spent, cpu_s = by_service(frames, args.partitions)
        total = sum(spent.values())
        print(f"\nwhole pipeline by service: {total:.2f} CPU s in event-loop callbacks "
              f"(the run: {cpu_s:.2f}, both timed by callback)")  # fmt: skip
        for owner, seconds in spent.most_common():
            if seconds >= 0.005 * total:
                print(f"  {owner:<48} {seconds:>7.2f} s {seconds / total:>6.1%}")


if __name__ == "__main__":
    main()
