"""Training: token histories -> features and labels -> a gradient-boosted model -> ONNX + card.

Needs the service's ``train`` extra (LightGBM, onnxmltools, tqdm)::

    dataset = build_dataset(histories, FeatureManager(), DEFAULT_CLASSIFICATION,
                            data_end=end, source="postgres pumpflow")
    trained = train(dataset, TrainConfig(model_id="entry"), created_at=now)
    ModelRegistry("models").register(trained.model, trained.card)

Features come from the FeatureManager's batch path (``compute_batch``), the one a test
holds equal to the live, incremental path; labels from
:func:`pumpflow.common.model.labels.label_history`; inputs from the card's
preprocessing (:func:`pumpflow.common.model.card.prepare_inputs`), in training as in
serving.

Splits never shuffle across time: without a separate held-out set, the tokens launched
in the last ``held_out_share`` of the window are held out, and the others are trained
on only with rows whose horizon ended before the first held-out launch, so no label of
the training rows looks into the held-out period, and no token is on both sides.

Fitting is deterministic (one thread, fixed seed, LightGBM's deterministic mode), and
the ONNX file carries nothing random, so the same data and config give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version as package_version

import msgspec
import numpy as np

from pumpflow.common.events import Event
from pumpflow.common.features import FeatureManager, TradeHistory
from pumpflow.common.model.card import (
    PREPROCESSING,
    HeldOut,
    LabelDefinition,
    ModelCard,
    Task,
    TrainingWindow,
    check_card,
    model_digest,
    prepare_inputs,
    reference_distribution,
)
from pumpflow.common.model.labels import DEFAULT_CLASSIFICATION, DEFAULT_REGRESSION
from pumpflow.common.model.labels import label_history as _label_history
from pumpflow.common.model.manager import LabelledRows, RefitRefused
from pumpflow.common.model.metrics import classification_metrics, regression_metrics

#: the rule-based baseline beside which every classifier's held-out AUC is reported
#: (a crowd arriving: the one feature that ranks best alone on simulated markets)
BASELINE_RULE = "new wallets in the last minute: new_traders_60s"
REGRESSION_BASELINE_RULE = "the mean of the training labels"


class TrainingError(RuntimeError):
    """Training that cannot go on: no data, one class only, ONNX disagreeing with native."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Dataset:
    """Rows of features (one per trade) with labels, event times and tokens."""

    names: tuple[str, ...]
    feature_set_version: str
    label: LabelDefinition
    source: str
    #: raw feature values, n x features (float64)
    features: np.ndarray
    labels: np.ndarray
    time: np.ndarray
    #: index into ``mints`` per row
    token: np.ndarray
    mints: tuple[str, ...]
    #: launch (first event) time per token
    launch: np.ndarray
    #: the sources a concatenated dataset was made of, and the index into them per row
    parts: tuple[str, ...] = ()
    part: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: np.ndarray) -> Dataset:
        """The rows selected by a boolean mask (the tokens table is kept whole)."""
        return Dataset(
            names=self.names,
            feature_set_version=self.feature_set_version,
            label=self.label,
            source=self.source,
            features=self.features[rows],
            labels=self.labels[rows],
            time=self.time[rows],
            token=self.token[rows],
            mints=self.mints,
            launch=self.launch,
            parts=self.parts,
            part=None if self.part is None else self.part[rows],
        )

    @property
    def token_count(self) -> int:
        return len(np.unique(self.token))


def _progress(iterable, *, total=None, desc: str, progress: bool):
    if not progress:
        return iterable
    from tqdm import tqdm

    # disable=None: bars on a terminal only
    return tqdm(iterable, total=total, desc=desc, unit="token", disable=None, leave=False)


def group_by_mint(events: Iterable[Event]) -> dict[str, list[Event]]:
    """Token events per mint, in the order given (time order for a replay)."""
    histories: dict[str, list[Event]] = {}
    for event in events:
        if event.type in ("token.created", "token.trade"):
            histories.setdefault(event.data.mint, []).append(event)
    return histories


def build_dataset(
    histories: dict[str, Sequence[Event]],
    feature_manager: FeatureManager,
    label: LabelDefinition,
    *,
    data_end: float,
    source: str,
    rows_from: float | None = None,
    progress: bool = False,
) -> Dataset:
    """Features after every trade of every token, with its label; unresolved rows dropped.

    ``rows_from``: rows of trades before it are dropped too (a token with none left is
    not in the dataset), after every feature and label was computed on the whole history,
    so what is kept is what it would be without the drop.
    """
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    mints: list[str] = []
    launch: list[float] = []
    for mint, events in _progress(
        histories.items(), total=len(histories), desc="features", progress=progress
    ):
        creator = None
        first = events[0].data if events else None
        if first is not None and first.TYPE == "token.created":
            creator = first.traderPublicKey
        history = TradeHistory.from_events(events, creator=creator)
        if len(history) == 0:
            continue
        features = feature_manager.compute_batch(history)
        price = history.v_sol / history.v_tokens
        labels = _label_history(history.time, price, label, data_end=data_end)
        resolved = ~np.isnan(labels)
        if rows_from is not None:
            resolved &= history.time >= rows_from
        if resolved.any():
            parts.append((features[resolved], labels[resolved], history.time[resolved]))
            mints.append(mint)
            launch.append(float(history.time[0]))
    if not parts:
        raise TrainingError(f"no labelled rows in {source}")
    return Dataset(
        names=feature_manager.names,
        feature_set_version=feature_manager.version,
        label=label,
        source=source,
        features=np.concatenate([p[0] for p in parts]),
        labels=np.concatenate([p[1] for p in parts]),
        time=np.concatenate([p[2] for p in parts]),
        token=np.concatenate([np.full(len(p[1]), i, np.int64) for i, p in enumerate(parts)]),
        mints=tuple(mints),
        launch=np.asarray(launch),
    )


def concatenate(datasets: Sequence[Dataset], *, source: str) -> Dataset:
    """One dataset of several with the same features and label (tokens renumbered)."""
    first = datasets[0]
    for d in datasets[1:]:
        if (d.names, d.feature_set_version, d.label) != (
            first.names,
            first.feature_set_version,
            first.label,
        ):
            raise TrainingError("datasets of different features or labels")
    offsets = np.cumsum([0, *(len(d.mints) for d in datasets[:-1])])
    if any(d.parts for d in datasets):
        raise TrainingError("concatenate datasets of one source each")
    return Dataset(
        names=first.names,
        feature_set_version=first.feature_set_version,
        label=first.label,
        source=source,
        features=np.concatenate([d.features for d in datasets]),
        labels=np.concatenate([d.labels for d in datasets]),
        time=np.concatenate([d.time for d in datasets]),
        token=np.concatenate([d.token + o for d, o in zip(datasets, offsets, strict=True)]),
        mints=tuple(m for d in datasets for m in d.mints),
        launch=np.concatenate([d.launch for d in datasets]),
        parts=tuple(d.source for d in datasets),
        part=np.concatenate([np.full(len(d), i, np.int64) for i, d in enumerate(datasets)]),
    )


def split_by_time(dataset: Dataset, held_out_share: float) -> tuple[Dataset, Dataset]:
    """(train, held out): tokens launched in the window's last share are held out; the
    others keep only rows whose label horizon ended before the first held-out launch."""
    if not 0.0 < held_out_share < 1.0:
        raise ValueError("held_out_share must be between 0 and 1")
    launched = np.sort(dataset.launch)
    cut = float(launched[min(len(launched) - 1, int(len(launched) * (1.0 - held_out_share)))])
    held_out_tokens = dataset.launch >= cut
    held_out_rows = held_out_tokens[dataset.token]
    train_rows = ~held_out_rows & (dataset.time + dataset.label.horizon_s <= cut)
    return dataset.subset(train_rows), dataset.subset(held_out_rows)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """What to fit and how; the defaults fit a small model in seconds."""

    model_id: str = "entry"
    task: Task = "classification"
    seed: int = 1
    n_estimators: int = 120
    num_leaves: int = 15
    learning_rate: float = 0.05
    min_child_samples: int = 100
    #: used when no separate held-out dataset is given
    held_out_share: float = 0.3
    valid_days: float = 30.0
    #: largest |ONNX - native| accepted on the held-out rows
    tolerance: float = 1e-5
    progress: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def default_label(self) -> LabelDefinition:
        return DEFAULT_CLASSIFICATION if self.task == "classification" else DEFAULT_REGRESSION


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainedModel:
    model: bytes
    card: ModelCard
    #: the fitted LightGBM estimator
    native: object
    #: largest |ONNX - native| over the held-out rows
    max_difference: float


def _estimator(config: TrainConfig):
    import lightgbm

    params = dict(
        n_estimators=config.n_estimators,
        num_leaves=config.num_leaves,
        learning_rate=config.learning_rate,
        min_child_samples=config.min_child_samples,
        random_state=config.seed,
        deterministic=True,
        force_row_wise=True,
        n_jobs=1,
        verbose=-1,
    )
    if config.task == "classification":
        return lightgbm.LGBMClassifier(**params)
    return lightgbm.LGBMRegressor(**params)


def _native_scores(native, inputs: np.ndarray, task: Task) -> np.ndarray:
    if task == "classification":
        return native.predict_proba(inputs)[:, 1]
    return native.predict(inputs)


def fit(config: TrainConfig, inputs: np.ndarray, labels: np.ndarray):
    """A fitted LightGBM estimator on prepared inputs (boosting rounds shown as a bar)."""
    if config.task == "classification" and len(np.unique(labels)) < 2:
        raise TrainingError("the training labels hold one class only")
    estimator = _estimator(config)
    callbacks = []
    bar = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=config.n_estimators, desc="boosting", unit="tree", disable=None, leave=False
        )
        callbacks.append(lambda env: bar.update(1))
    try:
        estimator.fit(inputs, labels, callbacks=callbacks)
    finally:
        if bar is not None:
            bar.close()
    return estimator


def export_onnx(native, config: TrainConfig, width: int) -> tuple[bytes, str]:
    """The estimator as ONNX bytes (input ``features``, float32 n x width) and the output
    the score is read from."""
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    onnx_model = convert_lightgbm(
        native,
        name=config.model_id,
        initial_types=[(PREPROCESSING.input_name, FloatTensorType([None, width]))],
        zipmap=False,
        target_opset=15,
    )
    # the converter names the graph with a random uuid: the same model, the same bytes
    onnx_model.graph.name = config.model_id
    _sort_opset_imports(onnx_model)
    _float32_thresholds(onnx_model, native)
    if config.task == "classification":
        onnx_model = _margin_through_sigmoid(onnx_model)
    outputs = [o.name for o in onnx_model.graph.output]
    output = "probabilities" if config.task == "classification" else outputs[0]
    if output not in outputs:
        raise TrainingError(f"the converted model's outputs are {outputs}")
    return onnx_model.SerializeToString(), output


_NODE_FIELDS = (
    "treeids",
    "nodeids",
    "modes",
    "featureids",
    "values",
    "truenodeids",
    "falsenodeids",
)


def _float32_thresholds(onnx_model, native) -> None:
    """Each split's threshold as the largest float32 not above LightGBM's, in place.

    LightGBM compares an input with a double threshold; the ONNX tree ensemble (ai.onnx.ml
    opset 1, float attributes) compares a float32 input with a float32 threshold, and the
    converter casts LightGBM's to the nearest float32. Inputs are float32 in training and
    serving alike (the card's preprocessing), and LightGBM puts a threshold between two
    values it was fitted on, often neighbouring float32s, where the nearest float32 can
    be the upper value: an input equal to it goes left in ONNX and right in LightGBM (on
    60 simulated minutes a held-out ``buy_share_60s`` did, its score off by 0.0039). For a
    float32 x, ``x <= t`` holds exactly when x <= the largest float32 not above t, as no
    float32 lies between the two; a threshold the cast rounded down or kept is left as
    written, so such a model's bytes are the converter's.

    The converter writes LightGBM's numerical ``<=`` as BRANCH_LEQ (a BRANCH_LT would need
    the smallest float32 not below t instead). The ONNX trees are walked beside LightGBM's
    dump, every split matched by its feature, its mode and the converter's cast of its
    threshold; any other shape is refused rather than guessed at.
    """
    from onnx import helper

    trees = next((n for n in onnx_model.graph.node if n.op_type.startswith("TreeEnsemble")), None)
    if trees is None:
        raise TrainingError("the converted model has no tree ensemble")
    attributes = {a.name: a for a in trees.attribute}
    nodes = {
        name: list(helper.get_attribute_value(attributes[f"nodes_{name}"])) for name in _NODE_FIELDS
    }
    written = nodes["values"]
    at = {node: i for i, node in enumerate(zip(nodes["treeids"], nodes["nodeids"], strict=True))}
    values = np.asarray(written, np.float32)
    seen = 0
    for tree_id, tree in enumerate(native.booster_.dump_model()["tree_info"]):
        stack = [(tree["tree_structure"], 0)]
        while stack:
            split, node_id = stack.pop()
            i = at.get((tree_id, node_id))
            mode = None if i is None else nodes["modes"][i]
            seen += 1
            if "split_feature" not in split:
                if mode != b"LEAF":
                    raise _unmatched(tree_id, node_id)
                continue
            threshold = float(split["threshold"])
            # past float32's range the cast is +-inf; +inf rounded down is float32's
            # largest, which every finite float32 is at most, as it is at most t
            with np.errstate(over="ignore"):
                nearest = np.float32(threshold)
            if (
                split["decision_type"] != "<="
                or mode != b"BRANCH_LEQ"
                or nodes["featureids"][i] != split["split_feature"]
                or float(nearest) != written[i]
            ):
                raise _unmatched(tree_id, node_id)
            # float(): a NumPy float32 compared with a Python float is compared as float32
            if float(nearest) > threshold:
                values[i] = np.nextafter(nearest, np.float32(-np.inf))
            stack.append((split["left_child"], nodes["truenodeids"][i]))
            stack.append((split["right_child"], nodes["falsenodeids"][i]))
    if seen != len(written):
        raise TrainingError(f"the converted trees have {len(written)} nodes, LightGBM's {seen}")
    if values.tolist() != written:
        attributes["nodes_values"].CopyFrom(helper.make_attribute("nodes_values", values.tolist()))


def _unmatched(tree_id: int, node_id: int) -> TrainingError:
    return TrainingError(f"the converted tree {tree_id} differs from LightGBM's at node {node_id}")


def _sort_opset_imports(onnx_model) -> None:
    """Order the model's opset imports by domain (the default one first).

    The converter lists them as it iterates a set of (domain, version) pairs, whose
    order follows the process's string hashes (``PYTHONHASHSEED``) and the order the
    pairs were added: the same model, written by another process, came out with other
    bytes (the shipped model's rebuild failed now and then).
    """
    ordered = sorted((o.domain, o.version) for o in onnx_model.opset_import)
    del onnx_model.opset_import[:]
    for domain, version in ordered:
        onnx_model.opset_import.add(domain=domain, version=version)


def _margin_through_sigmoid(onnx_model):
    """A converted binary classifier as its trees' margin through a Sigmoid, output
    ``probabilities`` (n x 1, the positive class).

    The classifier node also makes a label and the complementary column on every call,
    which nothing reads: the same trees as a regressor and a Sigmoid score the same
    probabilities (within float32 rounding) in about a tenth less of onnxruntime's time. A
    graph of any other shape is left as the converter made it; serving reads the last
    column of a classifier's output either way.
    """
    from onnx import TensorProto, helper

    graph = onnx_model.graph
    nodes = list(graph.node)
    trees = next((n for n in nodes if n.op_type == "TreeEnsembleClassifier"), None)
    if trees is None:
        return onnx_model
    attributes = {a.name: helper.get_attribute_value(a) for a in trees.attribute}
    if (
        attributes.get("post_transform") != b"LOGISTIC"
        or list(attributes.get("classlabels_int64s", ())) != [0, 1]
        or set(attributes.get("class_ids", ())) != {0}
        or "base_values" in attributes
    ):
        return onnx_model
    kept = {
        name: value for name, value in attributes.items()
        if name.startswith("nodes_") and name != "nodes_hitrates"
    }  # fmt: skip
    margin = helper.make_node(
        "TreeEnsembleRegressor", list(trees.input), ["margin"], name="trees",
        domain=trees.domain, n_targets=1, post_transform="NONE",
        target_treeids=attributes["class_treeids"], target_nodeids=attributes["class_nodeids"],
        target_ids=attributes["class_ids"], target_weights=attributes["class_weights"],
        **kept,
    )  # fmt: skip
    sigmoid = helper.make_node("Sigmoid", ["margin"], ["probabilities"], name="sigmoid")
    output = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 1])
    rewritten = helper.make_graph(
        [margin, sigmoid], graph.name, list(graph.input), [output], list(graph.initializer)
    )
    out = helper.make_model(rewritten, opset_imports=list(onnx_model.opset_import))
    for field_name in (
        "ir_version",
        "producer_name",
        "producer_version",
        "domain",
        "model_version",
        "doc_string",
    ):
        setattr(out, field_name, getattr(onnx_model, field_name))
    return out


def _baseline(dataset: Dataset, train_labels: np.ndarray, task: Task) -> tuple[str, np.ndarray]:
    if task == "regression":
        return REGRESSION_BASELINE_RULE, np.full(len(dataset), float(np.mean(train_labels)))
    index = {n: i for i, n in enumerate(dataset.names)}
    if "new_traders_60s" not in index:
        raise TrainingError("the baseline rule needs feature 'new_traders_60s'")
    return BASELINE_RULE, dataset.features[:, index["new_traders_60s"]]


def _metrics(task: Task, labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    if task == "classification":
        return classification_metrics(labels, scores)
    return regression_metrics(labels, scores)


def train(
    dataset: Dataset,
    config: TrainConfig,
    *,
    created_at: float,
    held_out: Dataset | None = None,
) -> TrainedModel:
    """Fit, export, check ONNX against native on the held-out rows, and write the card."""
    from pumpflow.common.model.onnx import OnnxSession

    expected = "take_profit_first" if config.task == "classification" else "net_return"
    if dataset.label.kind != expected:
        raise TrainingError(f"a {config.task} model needs a {expected} label")
    why = ""
    if held_out is None:
        fitted_on, held_out = split_by_time(dataset, config.held_out_share)
        if len(fitted_on) == 0 and len(dataset):
            # a recording of a market served faster than real time spans a fraction of it
            why = (
                f" (the history spans {float(np.ptp(dataset.time)):.0f} s of event time, and "
                f"a training row's label ({dataset.label.horizon_s:g} s ahead) must end before "
                "the held-out tokens launch: a longer history, or a shorter horizon)"
            )
    else:
        fitted_on = dataset
    if len(fitted_on) == 0 or len(held_out) == 0:
        raise TrainingError(
            f"{len(fitted_on)} training rows and {len(held_out)} held-out rows: need both{why}"
        )
    train_inputs = prepare_inputs(fitted_on.features)
    held_inputs = prepare_inputs(held_out.features)
    native = fit(config, train_inputs, fitted_on.labels)
    model, output = export_onnx(native, config, len(dataset.names))
    native_scores = _native_scores(native, held_inputs, config.task)

    baseline_rule, baseline_scores = _baseline(held_out, fitted_on.labels, config.task)
    baseline = _metrics(config.task, held_out.labels, baseline_scores)
    if config.task == "classification":
        baseline = {"auc": baseline["auc"]}  # a rule's score is no probability
    by_part: dict[str, dict[str, float]] = {}
    if held_out.part is not None and len(held_out.parts) > 1:
        for i, name in enumerate(held_out.parts):
            rows = held_out.part == i
            if not rows.any():
                # a source whose tokens all launched before the held-out share: none to judge
                continue
            model_part = _metrics(config.task, held_out.labels[rows], native_scores[rows])
            baseline_part = _metrics(config.task, held_out.labels[rows], baseline_scores[rows])
            by_part[name] = {
                **{k: model_part[k] for k in baseline},
                **{f"baseline_{k}": baseline_part[k] for k in baseline},
            }
    digest = model_digest(model)
    card = ModelCard(
        model_id=config.model_id,
        version=digest[:16],
        task=config.task,
        feature_set_version=dataset.feature_set_version,
        feature_names=dataset.names,
        preprocessing=PREPROCESSING,
        output_name=output,
        label=dataset.label,
        training=TrainingWindow(
            source=fitted_on.source,
            start=float(fitted_on.time.min()),
            end=float(fitted_on.time.max()),
            tokens=fitted_on.token_count,
            rows=len(fitted_on),
        ),
        held_out=HeldOut(
            source=held_out.source,
            tokens=held_out.token_count,
            rows=len(held_out),
            model=_metrics(config.task, held_out.labels, native_scores),
            baseline_rule=baseline_rule,
            baseline=baseline,
            by_part=by_part,
        ),
        reference=reference_distribution(train_inputs, dataset.names),
        trainer={
            "library": f"lightgbm {package_version('lightgbm')}",
            "converter": f"onnxmltools {package_version('onnxmltools')}",
            "params": (
                f"n_estimators={config.n_estimators} num_leaves={config.num_leaves} "
                f"learning_rate={config.learning_rate} "
                f"min_child_samples={config.min_child_samples} seed={config.seed}"
            ),
            **config.extra,
        },
        created_at=created_at,
        expires_at=created_at + config.valid_days * 86_400.0,
        model_sha256=digest,
    )
    check_card(card, model)
    onnx_scores = OnnxSession(model, card).predict(held_inputs)
    difference = float(np.max(np.abs(onnx_scores - native_scores)))
    if not difference <= config.tolerance or math.isnan(difference):
        raise TrainingError(
            f"ONNX and native predictions differ by up to {difference:.3g} on the held-out "
            f"rows (tolerance {config.tolerance:g})"
        )
    return TrainedModel(model=model, card=card, native=native, max_difference=difference)


def labelled_dataset(card: ModelCard, data: LabelledRows) -> Dataset:
    """Rows in a model's input order as a dataset of that model's features and label."""
    token = data.token if data.token is not None else np.zeros(len(data.labels), np.int64)
    tokens = int(token.max()) + 1 if len(token) else 0
    launch = np.full(tokens, np.inf)
    np.minimum.at(launch, token, data.time)
    return Dataset(
        names=card.feature_names,
        feature_set_version=card.feature_set_version,
        label=card.label,
        source=data.source,
        features=np.asarray(data.rows, dtype=np.float64),
        labels=np.asarray(data.labels, dtype=np.float64),
        time=np.asarray(data.time, dtype=np.float64),
        token=token,
        mints=tuple(f"token {i}" for i in range(tokens)),
        launch=launch,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LightGBMRefitter:
    """Refits a model like a card's (task, features, label) for ``ModelManager.update_model``."""

    config: TrainConfig = field(default_factory=TrainConfig)

    def refit(
        self, card: ModelCard, fit_on: LabelledRows, held_out: LabelledRows, *, now: float
    ) -> tuple[bytes, ModelCard]:
        config = TrainConfig(
            **{
                **{f: getattr(self.config, f) for f in self.config.__dataclass_fields__},
                "model_id": card.model_id,
                "task": card.task,
                "progress": False,
            },
        )
        try:
            trained = train(
                labelled_dataset(card, fit_on),
                config,
                created_at=now,
                held_out=labelled_dataset(card, held_out),
            )
        except TrainingError as exc:
            # what the rows cannot make (ONNX disagreeing with native, a label or baseline
            # feature the card lacks) is the refit's refusal, told as such
            raise RefitRefused(str(exc), reason="training_refused") from exc
        # drift is watched on every vector, and the labelled ones it was fitted on are a
        # sample of about one a token every 10 s: their distribution would read as drift
        # at once (the time since the last trade, volumes, price); the model refitted was
        # fitted on every trade of its tokens, the population the monitor sees
        return trained.model, msgspec.structs.replace(trained.card, reference=card.reference)
