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

Run: .venv/bin/python benchmarks/backtest.py [--seed 6] [--minutes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import numpy as np

from pumpflow.cli.backtest import RUN_CONFIG, run_backtest, simulated_frames
from pumpflow.common.features import FeatureManager, TradeHistory, trade_input
from pumpflow.common.model.card import prepare_inputs
from pumpflow.common.model.onnx import OnnxRuntime
from pumpflow.common.model.registry import read_model
from pumpflow.common.pumpportal import decode_frame
from pumpflow.model import DEFAULT_MODEL_PATH


def whole_pipeline(frames) -> dict[str, float]:
    report = asyncio.run(run_backtest(frames, RUN_CONFIG, name="run"))
    return {
        "cpu_s": report.cpu_s,
        "wall_s": report.seconds,
        "predictions": report.predictions,
        "entries": report.entries,
    }


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
    args = parser.parse_args()
    frames = simulated_frames(args.seed, args.minutes)
    print(f"{len(frames):,} frames: {args.minutes:g} market minutes of seed {args.seed}")
    print(f"{'path':<16} {'frames/CPU s':>13} {'frames/wall s':>14} {'CPU s':>8} "
          f"{'scored':>8} {'entries':>8}")  # fmt: skip
    runs = (
        ("whole pipeline", whole_pipeline(frames)),
        ("batch path", batch_path(frames, RUN_CONFIG["trading_min_score"])),
    )
    for name, r in runs:
        print(
            f"{name:<16} {len(frames) / r['cpu_s']:>13,.0f} {len(frames) / r['wall_s']:>14,.0f} "
            f"{r['cpu_s']:>8.2f} {r['predictions']:>8,} {r['entries']:>8,}"
        )


if __name__ == "__main__":
    main()
