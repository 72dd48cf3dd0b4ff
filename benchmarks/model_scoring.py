"""Model scoring benchmarks: batched predictions per second through ModelManager, and the
latency of one prediction, with the shipped default model (120 trees, 15 leaves); raw
onnxruntime on the same batches beside them.

Run: .venv/bin/python benchmarks/model_scoring.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pumpflow.common.clock import ReplayClock
from pumpflow.common.features import FeatureManager
from pumpflow.common.model import ModelManager, prepare_inputs, read_model
from pumpflow.common.model.onnx import OnnxSession
from pumpflow.model import DEFAULT_MODEL_PATH


def rows_like_training(card, n: int, seed: int = 1) -> np.ndarray:
    """Rows drawn from the card's reference bins (edges), a few values missing."""
    rng = np.random.default_rng(seed)
    rows = np.empty((n, len(card.feature_names)))
    for j, ref in enumerate(card.reference):
        edges = np.asarray(ref.edges) if ref.edges else np.zeros(1)
        rows[:, j] = rng.choice(edges, n) * rng.uniform(0.9, 1.1, n)
    rows[rng.random(rows.shape) < 0.01] = np.nan
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 5.0
    model, card = read_model(DEFAULT_MODEL_PATH)
    manager = ModelManager(None, FeatureManager(), clock=ReplayClock(card.created_at))
    manager.load_model("entry", DEFAULT_MODEL_PATH, "classification")
    batches = [rows_like_training(card, args.batch, seed=s) for s in range(64)]

    def rate(score) -> float:
        done = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            for rows in batches:
                score(rows)
            done += len(batches) * args.batch
        return done / elapsed

    through_manager = rate(lambda rows: manager.predict_batch("entry", rows))
    session = OnnxSession(model, card)
    prepared = [prepare_inputs(rows) for rows in batches]
    it = iter(range(1 << 62))
    raw = rate(lambda rows: session.predict(prepared[next(it) % len(prepared)]))
    print(
        f"batched by {args.batch}: {through_manager:,.0f} predictions/s through "
        f"ModelManager.predict_batch, {raw:,.0f}/s raw onnxruntime (one thread)"
    )

    names = card.feature_names
    vectors = [dict(zip(names, row, strict=True)) for row in batches[0]]
    latencies = []
    for _ in range(20 if args.quick else 100):
        for vector in vectors:
            started = time.perf_counter()
            manager.get_prediction("entry", vector)
            latencies.append(time.perf_counter() - started)
    p50, p99 = np.percentile(latencies, [50, 99]) * 1e6
    print(
        f"one prediction (get_prediction): p50 {p50:.0f} us, p99 {p99:.0f} us over {len(latencies)}"
    )


if __name__ == "__main__":
    main()
