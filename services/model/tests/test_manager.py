"""ModelManager over onnxruntime: cards checked on load, expiry, both tasks, one scoring path."""

from __future__ import annotations

import math
import re
import shutil

import msgspec
import numpy as np
import pytest

from pumpflow.common.clock import ReplayClock
from pumpflow.common.features import FeatureManager, default_feature_set
from pumpflow.common.model import (
    CardError,
    FeatureSetMismatch,
    ModelExpired,
    ModelManager,
    UnknownModel,
    prepare_inputs,
    read_model,
)
from pumpflow.common.model.card import encode_card
from pumpflow.common.model.labels import DEFAULT_REGRESSION
from pumpflow.common.testing.factories import TokenEvents
from pumpflow.model import DEFAULT_MODEL_PATH
from pumpflow.model.training import Dataset, TrainConfig, train

_, DEFAULT_CARD = read_model(DEFAULT_MODEL_PATH)


def manager_at(now: float, features: FeatureManager | None = None) -> ModelManager:
    return ModelManager(None, features or FeatureManager(), clock=ReplayClock(now))


def traded_features() -> FeatureManager:
    """A live FeatureManager that has folded a few tokens' trades."""
    features = FeatureManager()
    events = TokenEvents(start=DEFAULT_CARD.created_at, step=2.0)
    for _ in range(3):
        mint = events.mint()
        features.update_feature_history(events.created(mint))
        for i in range(40):
            trader = f"trader{i % 7}"
            if i % 3 == 2 and events.balance(mint, trader) > 0:
                event = events.sell(mint, trader, events.balance(mint, trader) / 2)
            else:
                event = events.buy(mint, trader, sol=0.1 + 0.05 * (i % 5))
            features.update_feature_history(event)
    return features


def test_the_default_model_is_served_with_its_card():
    card = manager_at(DEFAULT_CARD.created_at).load_model(
        "entry", DEFAULT_MODEL_PATH, "classification"
    )
    assert card.feature_set_version == FeatureManager().version
    assert card.held_out.model["auc"] > card.held_out.baseline["auc"] > 0.5
    # held out on simulator seeds it was not trained on
    seeds = [
        re.match(r"simulator seeds ([\d,]+), ", c.source) for c in (card.training, card.held_out)
    ]
    trained_on, held_out = (set(m.group(1).split(",")) for m in seeds)
    assert held_out == {"4", "5"} and not trained_on & held_out
    for seed in ("simulator seed 4", "simulator seed 5"):
        figures = card.held_out.by_part[seed]
        assert figures["auc"] > figures["baseline_auc"]


def test_a_model_of_another_feature_set_version_is_refused_naming_both():
    other = FeatureManager(default_feature_set(windows=(10.0, 60.0)))
    manager = manager_at(DEFAULT_CARD.created_at, other)
    with pytest.raises(FeatureSetMismatch) as err:
        manager.load_model("entry", DEFAULT_MODEL_PATH, "classification")
    message = str(err.value)
    assert DEFAULT_CARD.feature_set_version in message and other.version in message
    with pytest.raises(UnknownModel):
        manager.get_prediction("entry", {})


def test_a_card_naming_features_the_live_feature_set_lacks_is_refused_naming_them(tmp_path):
    # the same feature-set version, but inputs the features never compute: served, the
    # model would score every token with those inputs missing
    path = tmp_path / "renamed.onnx"
    shutil.copy(DEFAULT_MODEL_PATH, path)
    names = ("no_such_feature", *DEFAULT_CARD.feature_names[1:])
    reference = (
        msgspec.structs.replace(DEFAULT_CARD.reference[0], name="no_such_feature"),
        *DEFAULT_CARD.reference[1:],
    )
    card = msgspec.structs.replace(DEFAULT_CARD, feature_names=names, reference=reference)
    (tmp_path / "renamed.card.json").write_bytes(encode_card(card))
    manager = manager_at(DEFAULT_CARD.created_at)
    with pytest.raises(FeatureSetMismatch, match="no_such_feature") as err:
        manager.load_model("renamed", path, "classification")
    assert DEFAULT_CARD.feature_set_version in str(err.value)
    assert "renamed" not in manager.models()


def test_features_of_another_version_are_not_scored():
    manager = manager_at(DEFAULT_CARD.created_at)
    manager.load_model("entry", DEFAULT_MODEL_PATH, "classification")
    features = traded_features()
    vector = features.generate_features(features.mints()[0])
    stale = type(vector)(
        **{
            **{f: getattr(vector, f) for f in vector.__struct_fields__},
            "version": "0123456789abcdef",
        }
    )
    with pytest.raises(FeatureSetMismatch, match="0123456789abcdef"):
        manager.get_prediction("entry", stale)
    assert 0.0 <= manager.get_prediction("entry", vector).score <= 1.0


def test_an_expired_model_is_not_served():
    clock = ReplayClock(DEFAULT_CARD.expires_at - 1.0)
    manager = ModelManager(None, FeatureManager(), clock=clock)
    manager.load_model("entry", DEFAULT_MODEL_PATH, "classification")
    row = np.zeros((1, len(DEFAULT_CARD.feature_names)))
    assert manager.predict_batch("entry", row).shape == (1,)
    clock._now = DEFAULT_CARD.expires_at  # time moves on past the expiry
    with pytest.raises(ModelExpired, match="not served"):
        manager.predict_batch("entry", row)
    with pytest.raises(ModelExpired):
        manager.get_prediction("entry", {})
    with pytest.raises(ModelExpired):
        manager_at(DEFAULT_CARD.expires_at).load_model(
            "entry", DEFAULT_MODEL_PATH, "classification"
        )


def test_a_card_beside_another_model_or_of_another_type_is_refused(tmp_path):
    path = tmp_path / "entry.onnx"
    shutil.copy(DEFAULT_MODEL_PATH, path)
    manager = manager_at(DEFAULT_CARD.created_at)
    with pytest.raises(CardError, match="no card"):
        manager.load_model("entry", path, "classification")
    (tmp_path / "entry.card.json").write_bytes(encode_card(DEFAULT_CARD))
    with pytest.raises(Exception, match="is a classification model, not regression"):
        manager.load_model("entry", path, "regression")
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(CardError, match="not the one this card describes"):
        manager.load_model("entry", path, "classification")


def test_a_prediction_is_the_batch_path_on_the_live_vector_and_missing_is_nan():
    features = traded_features()
    manager = manager_at(DEFAULT_CARD.created_at, features)
    manager.load_model("entry", DEFAULT_MODEL_PATH, "classification")
    vectors = [features.generate_features(m) for m in features.mints()]
    batch = manager.predict_batch("entry", np.array([v.values for v in vectors]))
    for vector, score in zip(vectors, batch, strict=True):
        prediction = manager.get_prediction("entry", vector)
        assert prediction.score == score
        assert prediction.version == DEFAULT_CARD.version
    # a feature the vector lacks, NaN and infinity are all "missing", as in training
    values = dict(zip(vectors[0].names, vectors[0].values, strict=True))
    lacking = {k: v for k, v in values.items() if k != "return_30s"}
    nan = {**values, "return_30s": math.nan}
    inf = {**values, "return_30s": math.inf}
    scores = {manager.get_prediction("entry", v).score for v in (lacking, nan, inf)}
    assert len(scores) == 1
    performance = manager.get_model_performance("entry")
    assert performance.served.rows == len(vectors) * 2 + 3
    assert performance.held_out == DEFAULT_CARD.held_out


def test_a_regression_model_is_served(tmp_path):
    features = FeatureManager()
    rng = np.random.default_rng(2)
    n = 3_000
    values = rng.normal(size=(n, len(features.names)))
    values[rng.random(values.shape) < 0.05] = np.nan
    target = np.nan_to_num(values[:, 3]) * 0.1 + rng.normal(0.0, 0.01, n)
    time = np.arange(n, dtype=float)
    dataset = Dataset(
        names=features.names,
        feature_set_version=features.version,
        label=DEFAULT_REGRESSION,
        source="synthetic",
        features=values,
        labels=target,
        time=time,
        token=np.arange(n) // 10,
        mints=tuple(f"m{i}" for i in range(n // 10)),
        launch=time[::10],
    )
    trained = train(
        dataset, TrainConfig(model_id="ret", task="regression", n_estimators=30), created_at=0.0
    )
    from pumpflow.common.model import write_model

    path = write_model(tmp_path / "ret.onnx", trained.model, trained.card)
    manager = manager_at(10.0, features)
    manager.load_model("ret", path, "regression")
    scores = manager.predict_batch("ret", values[:500])
    np.testing.assert_allclose(
        scores, trained.native.predict(prepare_inputs(values[:500])), atol=1e-5
    )
    assert trained.card.held_out.model["rmse"] < trained.card.held_out.baseline["rmse"]


def test_a_classifier_is_exported_as_its_margin_through_a_sigmoid_and_old_graphs_still_serve(
    tmp_path,
):
    """The exported graph has no classifier node (its label and second column cost
    onnxruntime time, unread); a converter's two-column classifier, as models of
    earlier releases are, scores the same positive class."""
    import onnx
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    from pumpflow.common.model import write_model
    from pumpflow.common.model.card import model_digest

    features = FeatureManager()
    rng = np.random.default_rng(3)
    n = 3_000
    values = rng.normal(size=(n, len(features.names)))
    values[rng.random(values.shape) < 0.05] = np.nan
    labels = (np.nan_to_num(values[:, 3]) + rng.normal(0.0, 0.5, n) > 0).astype(float)
    time = np.arange(n, dtype=float)
    dataset = Dataset(
        names=features.names, feature_set_version=features.version,
        label=DEFAULT_CARD.label, source="synthetic", features=values, labels=labels,
        time=time, token=np.arange(n) // 10, mints=tuple(f"m{i}" for i in range(n // 10)),
        launch=time[::10],
    )  # fmt: skip
    trained = train(dataset, TrainConfig(model_id="cls", n_estimators=30), created_at=0.0)
    graph = onnx.load_from_string(trained.model)
    assert [node.op_type for node in graph.graph.node] == ["TreeEnsembleRegressor", "Sigmoid"]
    shipped = onnx.load(str(DEFAULT_MODEL_PATH))
    assert "TreeEnsembleClassifier" not in {node.op_type for node in shipped.graph.node}

    converted = convert_lightgbm(
        trained.native, initial_types=[("features", FloatTensorType([None, len(features.names)]))],
        zipmap=False, target_opset=15,
    ).SerializeToString()  # fmt: skip
    digest = model_digest(converted)
    old_card = msgspec.structs.replace(trained.card, version=digest[:16], model_sha256=digest)
    manager = manager_at(10.0, features)
    manager.load_model(
        "new", write_model(tmp_path / "new.onnx", trained.model, trained.card), "classification"
    )
    manager.load_model(
        "old", write_model(tmp_path / "old.onnx", converted, old_card), "classification"
    )
    rows = values[:500]
    native = trained.native.predict_proba(prepare_inputs(rows))[:, 1]
    np.testing.assert_allclose(manager.predict_batch("new", rows), native, atol=1e-6)
    np.testing.assert_allclose(manager.predict_batch("old", rows), native, atol=1e-6)


def test_update_model_refits_in_the_background_and_swaps_only_if_better(tmp_path):
    from pumpflow.common.model import ModelRegistry
    from pumpflow.common.model.manager import LabelledRows
    from pumpflow.model.training import LightGBMRefitter

    registry = ModelRegistry(tmp_path)
    manager = ModelManager(
        None,
        FeatureManager(),
        clock=ReplayClock(DEFAULT_CARD.created_at),
        refitter=LightGBMRefitter(config=TrainConfig(n_estimators=30)),
        registry=registry,
    )
    manager.load_model("entry", DEFAULT_MODEL_PATH, "classification")
    rng = np.random.default_rng(8)
    n = 4_000
    rows = rng.normal(size=(n, len(DEFAULT_CARD.feature_names)))
    time = DEFAULT_CARD.created_at + np.arange(n, dtype=float) * 0.5
    token = np.arange(n) // 40

    # labels the serving model ranks perfectly: a refit cannot do strictly better
    own = manager.predict_batch("entry", rows)
    kept = manager.update_model(
        "entry",
        LabelledRows(rows=rows, labels=(own > np.median(own)) * 1.0, time=time, token=token),
    ).result(timeout=300)
    assert not kept.swapped and kept.serving_score == 1.0
    assert manager.card("entry").version == DEFAULT_CARD.version

    # labels the serving model knows nothing of: the refit learns them and is swapped in
    rsi = DEFAULT_CARD.feature_names.index("rsi_14")
    labels = (rows[:, rsi] > 0.0) * 1.0
    swapped = manager.update_model(
        "entry", LabelledRows(rows=rows, labels=labels, time=time, token=token)
    ).result(timeout=300)
    assert swapped.swapped and swapped.candidate_score > swapped.serving_score
    card = manager.card("entry")
    assert card.version == swapped.candidate_version != DEFAULT_CARD.version
    assert (
        manager.get_prediction("entry", dict(zip(card.feature_names, rows[0], strict=True))).version
        == card.version
    )
    assert [c.version for c in registry.cards("entry")] == [card.version]
    assert manager.updates["entry"] == [kept, swapped]
    # the refit never saw the held-out slice: it was fitted on rows labelled before it
    assert card.training.end + card.label.horizon_s <= time[int(n * 0.7)]


def test_a_refit_keeps_the_drift_reference_of_the_model_it_refits():
    """A refit is fitted on labelled vectors, about one a token every 10 s, while drift is
    watched on every vector: a reference of its own rows reads as drift at once (the
    time since the last trade, volumes and price shifted by the sampling alone)."""
    from pumpflow.common.model.manager import LabelledRows
    from pumpflow.model.training import LightGBMRefitter

    rng = np.random.default_rng(3)
    n = 2_000
    rows = rng.normal(size=(n, len(DEFAULT_CARD.feature_names)))
    labels = (rows[:, 0] > 0.0) * 1.0
    time = DEFAULT_CARD.created_at + np.arange(n, dtype=float)
    token = np.arange(n) // 40
    half = n // 2

    def part(rows_of: slice) -> LabelledRows:
        return LabelledRows(
            rows=rows[rows_of], labels=labels[rows_of], time=time[rows_of], token=token[rows_of]
        )

    refitter = LightGBMRefitter(config=TrainConfig(n_estimators=30))
    _, card = refitter.refit(DEFAULT_CARD, part(slice(half)), part(slice(half, n)), now=time[-1])
    assert card.version != DEFAULT_CARD.version
    assert card.reference == DEFAULT_CARD.reference


def test_a_refit_no_better_than_the_margin_is_not_swapped_in(tmp_path):
    from pumpflow.common.model.manager import LabelledRows
    from pumpflow.model.training import LightGBMRefitter

    class FittedOnce:
        """The same candidate every time: each manager compares one model."""

        def __init__(self):
            self.fitted = None
            self.refitter = LightGBMRefitter(config=TrainConfig(n_estimators=30))

        def refit(self, card, fit_on, held_out, *, now):
            if self.fitted is None:
                self.fitted = self.refitter.refit(card, fit_on, held_out, now=now)
            return self.fitted

    refitter = FittedOnce()

    def update(min_gain: float):
        manager = ModelManager(
            None, FeatureManager(), clock=ReplayClock(DEFAULT_CARD.created_at), refitter=refitter
        )
        manager.load_model("entry", DEFAULT_MODEL_PATH, "classification")
        return manager, manager.update_model("entry", data, min_gain=min_gain).result(300)

    rng = np.random.default_rng(8)
    n = 4_000
    rows = rng.normal(size=(n, len(DEFAULT_CARD.feature_names)))
    own = ModelManager(None, FeatureManager(), clock=ReplayClock(DEFAULT_CARD.created_at))
    own.load_model("entry", DEFAULT_MODEL_PATH, "classification")
    scores = own.predict_batch("entry", rows)
    # the serving model's own ranking, a share of the labels given by another feature:
    # a refit of 30 trees does a little better on the held-out slice (some 0.03 AUC;
    # with less of the other feature it may learn the serving model's ranking worse
    # than it gains)
    rsi = rows[:, DEFAULT_CARD.feature_names.index("rsi_14")]
    labels = np.where(rng.random(n) < 0.4, rsi > 0.0, scores > np.median(scores)) * 1.0
    data = LabelledRows(
        rows=rows,
        labels=labels,
        time=DEFAULT_CARD.created_at + np.arange(n, dtype=float) * 0.5,
        token=np.arange(n) // 40,
    )
    _, strict = update(0.0)
    gain = strict.candidate_score - strict.serving_score
    assert strict.swapped and 0.0 < gain < 0.05
    # better by no more than the margin: kept
    manager, kept = update(gain)
    assert not kept.swapped and manager.card("entry").version == DEFAULT_CARD.version
    assert (kept.serving_score, kept.candidate_score) == (
        strict.serving_score,
        strict.candidate_score,
    )
    manager, swapped = update(gain * 0.99)
    assert swapped.swapped and manager.card("entry").version == strict.candidate_version
    with pytest.raises(ValueError):
        update(-0.01)


def test_a_refit_that_scores_the_held_out_rows_nan_is_refused_not_swapped_in(tmp_path):
    """A candidate scoring NaN is ranked by the rows' order alone: by AUC it can look
    better than the serving model, and must not replace it."""
    from model_helpers import linear_model

    from pumpflow.common.model import NonFiniteScore
    from pumpflow.common.model.manager import LabelledRows

    class Linear:
        """A candidate that scores a missing input NaN (a non-tree model)."""

        def refit(self, card, fit_on, held_out, *, now):
            return read_model(linear_model(tmp_path))

    manager = ModelManager(
        None, FeatureManager(), clock=ReplayClock(DEFAULT_CARD.created_at), refitter=Linear()
    )
    manager.load_model("entry", DEFAULT_MODEL_PATH, "classification")
    n = 4_000
    rows = np.random.default_rng(8).normal(size=(n, len(DEFAULT_CARD.feature_names)))
    rows[:, 0] = np.nan  # missing on every row: the trees route it, the candidate cannot
    time = DEFAULT_CARD.created_at + np.arange(n, dtype=float) * 0.5
    # the newest rows positive: NaN scores in time order would rank them perfectly (a
    # few positives among the rows fitted on: a refit of one class is refused before)
    labels = (np.arange(n) >= int(n * 0.85)) * 1.0
    labels[: n // 2 : 10] = 1.0
    update = manager.update_model("entry", LabelledRows(rows=rows, labels=labels, time=time))
    with pytest.raises(NonFiniteScore, match="refit candidate of model 'entry' scored 1200 of"):
        update.result(timeout=60)
    assert manager.card("entry").version == DEFAULT_CARD.version


def _alternating_but_lately(n: int) -> np.ndarray:
    labels = (np.arange(n) % 2) * 1.0
    labels[int(n * 0.6) :] = 0.0  # the newest 30% held out: one class
    return labels


@pytest.mark.parametrize(
    ("n", "labels_of", "reason"),
    [
        (4_000, np.zeros, "one_class"),
        (4_000, _alternating_but_lately, "held_out_one_class"),
        # 50 s of rows: none labelled (120 s) before the held-out slice began
        (100, lambda n: (np.arange(n) % 2) * 1.0, "too_few_rows"),
        (1, np.ones, "too_few_rows"),
    ],
)
def test_a_refit_with_nothing_to_compare_is_refused_with_its_reason(n, labels_of, reason):
    from pumpflow.common.model import RefitRefused
    from pumpflow.common.model.manager import LabelledRows

    class NeverAsked:
        def refit(self, card, fit_on, held_out, *, now):
            raise AssertionError("fitted on rows that can make no candidate to compare")

    manager = ModelManager(
        None, FeatureManager(), clock=ReplayClock(DEFAULT_CARD.created_at), refitter=NeverAsked()
    )
    manager.load_model("entry", DEFAULT_MODEL_PATH, "classification")
    rows = np.random.default_rng(8).normal(size=(n, len(DEFAULT_CARD.feature_names)))
    time = DEFAULT_CARD.created_at + np.arange(n, dtype=float) * 0.5
    update = manager.update_model(
        "entry", LabelledRows(rows=rows, labels=labels_of(n), time=time, token=np.arange(n) // 40)
    )
    with pytest.raises(RefitRefused) as refused:
        update.result(timeout=60)
    assert refused.value.reason == reason
    assert manager.updates == {} and manager.card("entry").version == DEFAULT_CARD.version


def test_what_training_cannot_fit_is_the_refits_refusal():
    from pumpflow.common.model import RefitRefused
    from pumpflow.common.model.manager import LabelledRows
    from pumpflow.model.training import LightGBMRefitter

    n = 400
    rows = np.random.default_rng(8).normal(size=(n, len(DEFAULT_CARD.feature_names)))
    data = LabelledRows(
        rows=rows,
        labels=(np.arange(n) % 2) * 1.0,
        time=DEFAULT_CARD.created_at + np.arange(n, dtype=float),
    )
    # a classifier's card with a regression's label: training refuses it
    card = msgspec.structs.replace(DEFAULT_CARD, label=DEFAULT_REGRESSION)
    refitter = LightGBMRefitter(config=TrainConfig(n_estimators=5))
    with pytest.raises(RefitRefused, match="take_profit_first") as refused:
        refitter.refit(card, data, data, now=DEFAULT_CARD.created_at + n)
    assert refused.value.reason == "training_refused"


def test_a_refit_is_fitted_on_no_token_of_the_held_out_slice():
    from pumpflow.common.model.manager import LabelledRows

    class Recording:
        """Keeps what it is given to fit on and to hold out, fits nothing."""

        def refit(self, card, fit_on, held_out, *, now):
            self.given = (fit_on, held_out)
            raise RuntimeError("not fitted")

    refitter = Recording()
    manager = ModelManager(
        None, FeatureManager(), clock=ReplayClock(DEFAULT_CARD.created_at), refitter=refitter
    )
    manager.load_model("entry", DEFAULT_MODEL_PATH, "classification")
    n = 4_000
    rows = np.random.default_rng(8).normal(size=(n, len(DEFAULT_CARD.feature_names)))
    # a token's rows every 0.5 s for 200 s: longer than the label's horizon, so the one
    # traded across the held-out slice's start has rows labelled before it
    time = DEFAULT_CARD.created_at + np.arange(n, dtype=float) * 0.5
    token = (np.arange(n) + 300) // 400
    with pytest.raises(RuntimeError):
        manager.update_model(
            "entry", LabelledRows(rows=rows, labels=np.arange(n) % 2, time=time, token=token)
        ).result(timeout=60)
    fit_on, held_out = refitter.given
    assert len(fit_on.rows) and len(held_out.rows) == int(n * 0.3)
    # as training splits: no token on both sides
    assert not set(fit_on.token.tolist()) & set(held_out.token.tolist())
    assert fit_on.time.max() + DEFAULT_CARD.label.horizon_s <= held_out.time.min()


def test_a_refit_under_way_does_not_hold_the_process_at_its_exit():
    import subprocess
    import sys

    # a process that stops (SIGTERM, the service drained and stored) while a refit runs
    script = """
import threading
import numpy as np
from pumpflow.common.clock import ReplayClock
from pumpflow.common.features import FeatureManager
from pumpflow.common.model import ModelManager, read_model
from pumpflow.common.model.manager import LabelledRows
from pumpflow.model import DEFAULT_MODEL_PATH

class Endless:
    def refit(self, card, fit_on, held_out, *, now):
        started.set()
        threading.Event().wait()

started = threading.Event()
_, card = read_model(DEFAULT_MODEL_PATH)
manager = ModelManager(None, FeatureManager(), clock=ReplayClock(card.created_at),
                       refitter=Endless())
manager.load_model("entry", DEFAULT_MODEL_PATH, "classification")
n = 100
rows = np.zeros((n, len(card.feature_names)))
time = card.created_at + np.arange(n) * 10.0
manager.update_model("entry", LabelledRows(rows=rows, labels=np.arange(n) % 2, time=time))
started.wait()
print("refitting", flush=True)
"""
    # its exit would wait for the refit's end, which never comes
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"refitting\n"
