"""The model service's scoring path: predictions per second and the latency of one.

What the keyed consumer runs per delivery, without the bus and the store: the
processor's ``prepare`` of a batch (the vectors the policy scores, one onnxruntime
call per model, the shipped default model), then ``apply`` of each event (the
policy, the arm, the ``model.prediction`` payload handed to the effects, and, as the
service does, each vector's price observed and each prediction followed to its label
in the token's state, released there once due, with the effects' clock at the
event's time; ``--no-labels`` leaves that out), then ``settle`` of the batch (what its
events did not take is dropped). The vectors are a simulated market's
``features.updated``; each batch holds ``--batch`` tokens' vectors, as a delivery of
that many tokens does. One process, one thread, onnxruntime with one intra-op thread.
A second figure adds what the consumer's commit does per delivery: each token's state
encoded once (the labels waiting in it included).

The target (150,000 predictions/s) is set beside a yardstick measured where it was set:
raw onnxruntime runs a 200-tree LightGBM model batched by 64 at about 208,000 rows/s.
The yardstick model is built here (LightGBM's default 31 leaves, 29 features,
synthetic rows, fixed seed) and run in turns with the path, pass for pass, so both see
the same machine at the same moment: the path's rate over the yardstick's is steady
where either rate alone swings with the load, and the target is a ratio of 0.721.

With ``--decoded`` each batch is decoded from its bytes before it is scored, as a
replica over RabbitMQ gets its deliveries (the decoding is the bus's and not counted):
the vectors' own objects then, each just made, where the default hands the same
objects round, as the in-memory bus of an embedded run does.

Run: .venv/bin/python benchmarks/model_service.py [--quick] [--batch 256] [--profile]
     [--no-labels | --least] [--decoded]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import msgspec
import numpy as np

from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import ModelPrediction, Payload
from pumpflow.common.features import FeatureManager
from pumpflow.common.model import ModelManager, read_model
from pumpflow.common.model.arms import Arm, ArmTable
from pumpflow.common.model.performance import LabelTracker
from pumpflow.common.model.processor import ModelProcessor, ScoringPolicy
from pumpflow.common.testing import FeatureUpdates
from pumpflow.model import DEFAULT_MODEL_PATH

START = 1_700_000_000.0
#: the yardstick's rows per second where the target was set, and the target
YARDSTICK_ROWS_PER_S = 208_000.0
TARGET_PER_S = 150_000.0


class Effects:
    """The effects a keyed consumer hands the processor, keeping only what is emitted."""

    __slots__ = ("emitted", "key", "more", "now")

    def __init__(self) -> None:
        self.key = ""
        self.now = START
        self.more = False
        self.emitted = 0

    def emit(self, payload: Payload, *, time: float) -> None:
        self.emitted += 1

    def set_timer(self, at: float) -> None:
        pass

    def cancel_timer(self) -> None:
        pass

    def set_priority(self, priority: int) -> None:  # pragma: no cover
        pass

    def retire(self, ttl_s: float) -> None:
        pass


def market_vectors(seconds: float) -> list:
    from pumpflow.simulator.dataset import market_events
    from pumpflow.simulator.market import Market, MarketConfig

    events = market_events(
        Market(MarketConfig(seed=3)), seconds, start_epoch=START, source="feed/sim"
    )
    return FeatureUpdates().of(events)


def yardstick() -> tuple:
    """The target's yardstick: a 200-tree LightGBM classifier (31 leaves) on 29 features
    as onnxruntime runs it (one thread), and batches of 64 rows to score."""
    import lightgbm
    import onnxruntime
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(20_000, 29)).astype(np.float32)
    labels = (rows[:, 0] + rows[:, 1] * rows[:, 2] + rng.normal(size=len(rows)) > 0).astype(int)
    model = lightgbm.LGBMClassifier(
        n_estimators=200, n_jobs=1, deterministic=True, force_row_wise=True, verbose=-1
    ).fit(rows, labels)
    graph = convert_lightgbm(
        model, initial_types=[("input", FloatTensorType([None, 29]))], zipmap=False
    )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(
        graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session, [rows[i : i + 64] for i in range(0, 64 * 50, 64)]


def batches_of(vectors: list, size: int) -> list[list]:
    """Deliveries of ``size`` tokens' vectors each: the market's vectors in order, each
    given to one of ``size`` tokens in turn (a delivery of that many busy tokens)."""
    mints = [f"bench-mint-{i:04d}" for i in range(size)]
    usable = len(vectors) // size * size
    return [
        [msgspec.structs.replace(v, key=mints[j]) for j, v in enumerate(vectors[i : i + size])]
        for i in range(0, usable, size)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--no-labels", action="store_true", help="without following predictions to their labels"
    )
    parser.add_argument(
        "--decoded",
        action="store_true",
        help="each batch decoded from its bytes before it is scored, as a replica "
        "over RabbitMQ gets it (the decoding not counted)",
    )
    parser.add_argument(
        "--least",
        action="store_true",
        help="apply cut to the least a prediction needs (no labels): its "
        "prepared score taken, its payload made and emitted, the "
        "state's two fields set; what a path that handled a "
        "delivery's predictions together could come down to",
    )
    args = parser.parse_args()
    seconds = 1.5 if args.quick else 5.0
    _, card = read_model(DEFAULT_MODEL_PATH)
    manager = ModelManager(None, FeatureManager(), clock=ReplayClock(START))
    manager.load_model("entry", DEFAULT_MODEL_PATH, "classification")
    arm = Arm(name="control", model_id="entry")
    arms = ArmTable([arm])
    # every vector scored: the policy's interval would only thin the work measured
    labels = None if args.no_labels or args.least else LabelTracker(clock=ReplayClock(START))
    processor = ModelProcessor(
        manager,
        arms,
        policy=ScoringPolicy(min_interval_s=0.0),
        labels=labels,
    )
    vectors = market_vectors(600.0)
    batches = batches_of(vectors, args.batch)
    print(
        f"{len(vectors):,} vectors of a simulated market; {len(batches)} batches of "
        f"{args.batch} tokens; model {card.model_id} {card.version}"
    )
    effects = Effects()
    states = {}
    initial = processor.initial
    apply = processor.apply
    if args.least:
        prepared = processor._prepared

        def apply(state, event, effects):
            """The least of ``processor.apply`` for a prepared vector of the one arm."""
            card, score, seconds = prepared.pop(event.id)[2]
            data = event.data
            effects.emit(
                ModelPrediction(
                    mint=effects.key,
                    model_id=arm.model_id,
                    arm=arm.name,
                    feature_set_version=data.feature_set_version,
                    score=score,
                    horizon_s=card.label.horizon_s,
                    label=card.label.kind,
                    model_version=card.version,
                    shadow=arm.shadow,
                    latency_s=seconds,
                    source_seq=data.source_seq,
                ),
                time=event.time,
            )
            state.last_scored = event.time
            state.scored += 1
            return state

    encode = processor.encode
    settle = processor.settle

    def run_batch(batch, *, commit: bool = False) -> None:
        processor.prepare(batch, states.get)
        for event in batch:
            effects.key = event.key
            effects.now = event.time
            state = states.get(event.key)
            if state is None:
                state = states[event.key] = initial(event.key)
            apply(state, event, effects)
        settle(batch)  # as the consumer does once the batch's work is over
        if labels is not None:
            labels.resolve_due(batch[-1].time)  # what the service's monitor takes each second
        if commit:
            for event in batch:
                encode(states[event.key])

    if args.decoded:
        from pumpflow.common.events import decode_event, encode_event

        encoded = [[encode_event(event) for event in batch] for batch in batches]

        def delivered():
            for raw in encoded:
                yield [decode_event(event) for event in raw]
    else:

        def delivered():
            return iter(batches)

    clock = time.process_time

    def scoring_pass(*, commit: bool = False) -> float:
        """CPU seconds of a pass over every batch (decoding them not counted)."""
        spent = 0.0
        for batch in delivered():
            began = clock()
            run_batch(batch, commit=commit)
            spent += clock() - began
        states.clear()
        return spent

    per_pass = len(batches) * args.batch
    passes: list[float] = []

    def rate(*, commit: bool = False) -> float:
        passes.clear()
        while sum(passes) < seconds:
            passes.append(scoring_pass(commit=commit))
        return per_pass * len(passes) / sum(passes)

    run_batch(batches[0])
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        rate()
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(14)
    per_s = rate()
    print(
        f"batched by {args.batch} tokens: {per_s:,.0f} predictions per CPU second "
        f"through prepare + apply (processor and one onnxruntime call per batch)"
    )
    # the least disturbed pass: on a shared machine the mean moves with the others' load
    print(f"  best pass over every batch: {per_pass / min(passes):,.0f} per CPU second")
    print(
        f"  with each token's state encoded once a batch: {rate(commit=True):,.0f} "
        f"predictions per CPU second"
    )

    # the share of it that is the model call itself
    matrices = [np.array([e.data.values for e in b]) for b in batches]
    done, started = 0, time.process_time()
    while (elapsed := time.process_time() - started) < seconds:
        for rows in matrices:
            manager.predict_batch("entry", rows)
            done += len(rows)
    print(
        f"  of which the model: {done / elapsed:,.0f} rows per CPU second "
        "through ModelManager.predict_batch alone"
    )

    # the path and the yardstick in turns, a pass of each: the ratio is the machine's
    session, yard_rows = yardstick()
    ratios = []
    for _ in range(3 if args.quick else 8):
        path = per_pass / scoring_pass()
        done, began = 0, time.process_time()
        while done < per_pass:
            for rows in yard_rows:
                session.run(["probabilities"], {"input": rows})
                done += len(rows)
        ratios.append(path / (done / (time.process_time() - began)))
    ratio = statistics.median(ratios)
    print(
        f"  against the yardstick (raw onnxruntime, a 200-tree LightGBM batched by 64, in "
        f"turns): {ratio:.3f} of its rate ({min(ratios):.3f}-{max(ratios):.3f}); where it "
        f"does {YARDSTICK_ROWS_PER_S:,.0f} rows/s, {ratio * YARDSTICK_ROWS_PER_S:,.0f} "
        f"predictions/s (target {TARGET_PER_S:,.0f}: "
        f"{TARGET_PER_S / YARDSTICK_ROWS_PER_S:.3f})"
    )

    # one prediction: a vector delivered alone, from its delivery to its payload emitted
    latencies = []
    singles = vectors[: 2000 if args.quick else 10000]
    if args.decoded:
        singles = [decode_event(encode_event(event)) for event in singles]
    for event in singles:
        states.clear()
        started = time.perf_counter()
        run_batch([event])
        latencies.append(time.perf_counter() - started)
    p50, p99, worst = np.percentile(latencies, [50, 99, 100]) * 1e6
    print(
        f"one prediction (a delivery of one vector): p50 {p50:.0f} us, p99 {p99:.0f} us, "
        f"max {worst:.0f} us over {len(latencies):,}"
    )


if __name__ == "__main__":
    main()
