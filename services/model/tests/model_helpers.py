"""Models, vectors and effects shared by the model service's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import Event, FeaturesUpdated, Payload, make_event
from pumpflow.common.features import FeatureManager
from pumpflow.common.model import ModelManager, read_model, write_model
from pumpflow.common.model.performance import ResolvedLabel
from pumpflow.model import DEFAULT_MODEL_PATH

_, DEFAULT_CARD = read_model(DEFAULT_MODEL_PATH)
#: event time the tests run at: the default model serves then
START = DEFAULT_CARD.created_at + 86_400.0
#: the live feature set's names, the order labels store their vectors in
NAMES = FeatureManager().names


def manager(clock: ReplayClock | None = None, **models: Path) -> ModelManager:
    """A manager on the live feature set with the default model as ``entry`` (and ``models``)."""
    found = ModelManager(None, FeatureManager(), clock=clock or ReplayClock(START))
    found.load_model("entry", DEFAULT_MODEL_PATH, "classification")
    for model_id, path in models.items():
        found.load_model(model_id, path, "classification")
    return found


def other_model(
    folder: Path, *, seed: int = 3, model_id: str = "other", task: str = "classification"
) -> Path:
    """A small classifier (or regressor) on the live feature set, another version than
    the default's."""
    from pumpflow.common.model.labels import DEFAULT_CLASSIFICATION, DEFAULT_REGRESSION
    from pumpflow.model.training import Dataset, TrainConfig, train

    features = FeatureManager()
    rng = np.random.default_rng(seed)
    n = 2_000
    values = rng.normal(size=(n, len(features.names)))
    labels = (values[:, 3] + rng.normal(0.0, 0.5, n) > 0.0) * 1.0
    if task == "regression":
        labels = values[:, 3] * 0.1 + rng.normal(0.0, 0.01, n)
    time = DEFAULT_CARD.created_at + np.arange(n, dtype=float)
    dataset = Dataset(
        names=features.names,
        feature_set_version=features.version,
        label=DEFAULT_CLASSIFICATION if task == "classification" else DEFAULT_REGRESSION,
        source="synthetic",
        features=values,
        labels=labels,
        time=time,
        token=np.arange(n) // 10,
        mints=tuple(f"m{i}" for i in range(n // 10)),
        launch=time[::10],
    )
    trained = train(
        dataset,
        TrainConfig(model_id=model_id, task=task, n_estimators=20, seed=seed),
        created_at=DEFAULT_CARD.created_at,
    )
    return write_model(folder / f"{model_id}-{seed}.onnx", trained.model, trained.card)


def linear_model(folder: Path, *, model_id: str = "linear") -> Path:
    """A logistic model on the live feature set (the default card's features): unlike the
    trees, it scores a missing (NaN) input as NaN."""
    import msgspec
    from onnx import TensorProto, helper, numpy_helper

    from pumpflow.common.model.card import model_digest

    width = len(DEFAULT_CARD.feature_names)
    weights = numpy_helper.from_array(np.full((width, 1), 0.01, np.float32), "weights")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "weights"], ["margin"]),
            helper.make_node("Sigmoid", ["margin"], ["probability"]),
        ],
        model_id,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, width])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, [None, 1])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    raw = model.SerializeToString()
    digest = model_digest(raw)
    card = msgspec.structs.replace(
        DEFAULT_CARD,
        model_id=model_id,
        output_name="probability",
        model_sha256=digest,
        version=digest[:16],
    )
    return write_model(folder / f"{model_id}.onnx", raw, card)


def synthetic_labels(labels_of, *, n: int = 4_000, seed: int = 8) -> list[ResolvedLabel]:
    """Labels of ``n`` predictions of the default model before START, half a second
    apart, 40 per token; ``labels_of(rows)`` says each one's label."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, len(NAMES)))
    labels = labels_of(rows)
    time = START - n * 0.5 + np.arange(n) * 0.5
    return [
        ResolvedLabel(
            mint=f"token{i // 40}",
            model_id="entry",
            version=DEFAULT_CARD.version,
            arm="control",
            task="classification",
            score=0.5,
            time=float(time[i]),
            entry_price=1.0,
            label=float(labels[i]),
            definition=DEFAULT_CARD.label,
            resolved_at=float(time[i]) + 122.0,
            feature_names=NAMES,
            features=tuple(float(v) for v in rows[i]),
        )
        for i in range(n)
    ]


def vector_event(
    mint: str,
    time: float,
    *,
    seq: int = 1,
    values: tuple[float, ...] | None = None,
    version: str | None = None,
) -> Event:
    """A features.updated of ``mint`` on the live feature set (values drawn from ``seq``)."""
    features = FeatureManager()
    if values is None:
        rng = np.random.default_rng(seq)
        values = tuple(float(v) for v in rng.normal(size=len(features.names)))
    payload = FeaturesUpdated(
        mint=mint,
        feature_set_version=version or features.version,
        source_seq=seq,
        names=features.names,
        values=values,
    )
    return make_event(payload, source="features/test", time=time, seq=seq)


def lifecycle_event(mint: str, state: str, time: float, *, seq: int = 1) -> Event:
    from pumpflow.common.events import TokenLifecycle

    return make_event(
        TokenLifecycle(mint=mint, state=state), source="activity/test", time=time, seq=seq
    )


class FakeEffects:
    """Records what the processor asks for."""

    def __init__(self, key: str, now: float, *, more: bool = False):
        self.key = key
        self.now = now
        self.more = more
        self.emitted: list[tuple[Payload, float]] = []
        self.retired: float | None = None
        self.timer: float | None = None

    def emit(self, payload: Payload, *, time: float) -> None:
        self.emitted.append((payload, time))

    def set_timer(self, at: float) -> None:
        self.timer = at

    def cancel_timer(self) -> None:
        self.timer = None

    def set_priority(self, priority: int) -> None:
        pass

    def retire(self, ttl_s: float) -> None:
        self.retired = ttl_s
