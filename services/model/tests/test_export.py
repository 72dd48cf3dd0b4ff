"""The exported ONNX trees split float32 inputs where LightGBM's double thresholds do."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest

from pumpflow.common.model.labels import DEFAULT_CLASSIFICATION
from pumpflow.model.training import Dataset, TrainConfig, export_onnx, fit, train

# two neighbouring float32 values, the upper one of even mantissa: LightGBM's threshold
# between them is a double that a cast to the nearest float32 rounds up onto ``HIGH``
HIGH = np.float32(0.75)
LOW = np.nextafter(HIGH, np.float32(0.0))


def neighbours(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 inputs of one feature, LOW labelled 0 and HIGH 1."""
    inputs = np.repeat(np.array([[LOW], [HIGH]], np.float32), rows, axis=0)
    return inputs, np.repeat([0.0, 1.0], rows)


def onnx_scores(model: bytes, output: str, inputs: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    out = session.run([output], {"features": inputs})[0]
    return np.asarray(out, np.float64).reshape(len(inputs), -1)[:, -1]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_an_input_between_a_threshold_and_its_nearest_float32_goes_where_lightgbm_sends_it(
    task,
):
    config = TrainConfig(task=task, n_estimators=1, min_child_samples=5)
    native = fit(config, *neighbours(50))
    split = native.booster_.dump_model()["tree_info"][0]["tree_structure"]
    threshold = split["threshold"]
    # the premise: HIGH lies above LightGBM's threshold, on its float32 cast
    assert float(LOW) < threshold < float(HIGH) and np.float32(threshold) == HIGH

    model, output = export_onnx(native, config, 1)
    inputs = np.array([[LOW], [HIGH]], np.float32)
    expected = (
        native.predict_proba(inputs)[:, 1] if task == "classification" else native.predict(inputs)
    )
    assert expected[1] - expected[0] > 0.01  # HIGH goes right in LightGBM
    np.testing.assert_allclose(onnx_scores(model, output, inputs), expected, rtol=0, atol=1e-6)


def test_training_accepts_trees_whose_thresholds_fall_between_float32_values():
    inputs, labels = neighbours(200)
    # the baseline rule's feature beside the one split on
    features = np.column_stack([inputs[:, 0], np.arange(len(labels)) % 7]).astype(np.float64)
    time = 1_767_225_600.0 + np.arange(len(labels), dtype=np.float64)
    token = np.arange(len(labels)) // 4
    dataset = Dataset(
        names=("buy_share_60s", "new_traders_60s"),
        feature_set_version="test",
        label=DEFAULT_CLASSIFICATION,
        source="neighbouring float32 values",
        features=features,
        labels=labels,
        time=time,
        token=token,
        mints=tuple(f"m{i}" for i in range(token[-1] + 1)),
        launch=time[::4],
    )
    trained = train(
        dataset,
        TrainConfig(n_estimators=5, min_child_samples=20),
        created_at=time[0],
        held_out=dataset,
    )
    assert trained.max_difference <= 1e-6
    # both sides of the split are held out and scored apart
    scores = onnx_scores(trained.model, trained.card.output_name, np.float32([[LOW, 0], [HIGH, 0]]))
    assert scores[1] - scores[0] > 0.1


#: exports of one model in processes of these string-hash seeds: the converter listed
#: its opsets in another order under the second (found by search)
HASH_SEEDS = ("0", "20")
EXPORT = """
import sys
import numpy as np
from pumpflow.model.training import TrainConfig, export_onnx, fit
rng = np.random.default_rng(3)
inputs = rng.normal(size=(400, 3)).astype(np.float32)
labels = (inputs[:, 0] > 0).astype(float)
config = TrainConfig(n_estimators=3, min_child_samples=5)
model, _ = export_onnx(fit(config, inputs, labels), config, 3)
sys.stdout.buffer.write(model)
"""


def test_one_model_is_exported_as_the_same_bytes_whatever_the_processs_string_hashes():
    """The converter lists the model's opsets as a set of pairs iterates, which follows
    the process's string hashes: written sorted, one model is one set of bytes (the
    shipped model is rebuilt byte for byte in any process)."""
    exported = [
        subprocess.run(
            [sys.executable, "-c", EXPORT],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            check=True,
            timeout=120,
        ).stdout
        for seed in HASH_SEEDS
    ]
    assert exported[0] and exported[0] == exported[1]
