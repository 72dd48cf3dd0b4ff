"""Cards round-trip byte for byte, name the field at fault, and carry the preprocessing."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest

from pumpflow.common.events import FeaturesUpdated
from pumpflow.common.model.card import (
    PREPROCESSING,
    CardError,
    HeldOut,
    LabelDefinition,
    ModelCard,
    TrainingWindow,
    check_card,
    decode_card,
    encode_card,
    model_digest,
    prepare_inputs,
    reference_distribution,
    vector_row,
    vector_rows,
)

MODEL = b"not really onnx"


def make_card(**changes) -> ModelCard:
    digest = model_digest(MODEL)
    inputs = prepare_inputs(np.arange(20.0).reshape(10, 2))
    fields = dict(
        model_id="m",
        version=digest[:16],
        task="classification",
        feature_set_version="abc",
        feature_names=("a", "b"),
        preprocessing=PREPROCESSING,
        output_name="probabilities",
        label=LabelDefinition(
            kind="take_profit_first", horizon_s=60.0, take_profit=0.2, stop_loss=0.1
        ),
        training=TrainingWindow(source="test", start=0.0, end=1.0, tokens=1, rows=10),
        held_out=HeldOut(
            source="test",
            tokens=1,
            rows=5,
            model={"auc": 0.7},
            baseline_rule="rule",
            baseline={"auc": 0.6},
        ),
        reference=reference_distribution(inputs, ("a", "b")),
        trainer={"library": "x"},
        created_at=100.0,
        expires_at=200.0,
        model_sha256=digest,
    )
    fields.update(changes)
    return ModelCard(**fields)


def test_a_card_round_trips_byte_for_byte():
    card = make_card()
    raw = encode_card(card)
    assert decode_card(raw) == card
    assert encode_card(decode_card(raw)) == raw


def test_a_bad_card_names_the_field():
    raw = msgspec.json.decode(encode_card(make_card()))
    raw["label"]["horizon_s"] = "soon"
    with pytest.raises(CardError) as err:
        decode_card(msgspec.json.encode(raw))
    assert err.value.field == "label.horizon_s"
    del raw["feature_set_version"]
    raw["label"]["horizon_s"] = 60.0
    with pytest.raises(CardError) as err:
        decode_card(msgspec.json.encode(raw))
    assert err.value.field == "feature_set_version"


def test_a_card_for_another_model_or_inconsistent_is_refused():
    with pytest.raises(CardError, match="not the one this card describes"):
        check_card(make_card(), b"another model")
    with pytest.raises(CardError) as err:
        check_card(make_card(expires_at=50.0))
    assert err.value.field == "expires_at"
    with pytest.raises(CardError) as err:
        check_card(make_card(task="regression"))
    assert err.value.field == "label.kind"
    with pytest.raises(CardError) as err:
        check_card(make_card(feature_names=("b", "a")))
    assert err.value.field == "reference"


def test_missing_and_infinite_values_are_nan_float32():
    out = prepare_inputs(np.array([[1.0, math.inf, -math.inf, math.nan]]))
    assert out.dtype == np.float32
    assert out[0, 0] == 1.0 and np.isnan(out[0, 1:]).all()
    row = vector_row(("b", "a"), (2.0, 1.0), ("a", "b", "c"))
    assert row[:2].tolist() == [1.0, 2.0] and math.isnan(row[2])


def vectors_of(*rows: tuple[tuple[str, ...], tuple[float, ...]]) -> list[FeaturesUpdated]:
    return [
        FeaturesUpdated(mint="m", feature_set_version="v", source_seq=1, names=names, values=values)
        for names, values in rows
    ]


def test_vector_rows_are_each_vectors_row_packed_when_every_vector_is_as_sent():
    order = ("a", "b", "c")
    names = ("a", "b", "c")
    for vectors in (
        # one names tuple shared, then equal tuples
        vectors_of((names, (1.0, math.nan, math.inf)), (names, (-2.5, 0.0, 1e300))),
        vectors_of((("a", "b", "c"), (1.0, 2.0, 3.0)), (("a", "b", "c"), (4.0, 5.0, 6.0))),
    ):
        rows, packed = vector_rows(vectors, order)
        expected = np.stack([vector_row(v.names, v.values, order) for v in vectors])
        assert rows.dtype == np.float64
        np.testing.assert_array_equal(rows, expected)
        assert packed == [np.asarray(v.values, "<f8").tobytes() for v in vectors]
    # another order, or a vector of another length: rows as vector_row makes them, no bytes
    other = vectors_of((("b", "a"), (2.0, 1.0)), (names, (1.0, 2.0, 3.0)))
    rows, packed = vector_rows(other, order)
    assert packed is None
    np.testing.assert_array_equal(rows, [[1.0, 2.0, math.nan], [1.0, 2.0, 3.0]])
    with pytest.raises(ValueError):
        vector_rows(vectors_of((names, (1.0, 2.0)), (names, (1.0, 2.0, 3.0))), order)


def test_reference_bins_hold_every_row():
    rng = np.random.default_rng(1)
    column = rng.normal(size=1000)
    column[:100] = np.nan
    (ref,) = reference_distribution(prepare_inputs(column[:, None]), ("x",))
    assert len(ref.shares) == len(ref.edges) + 1 == 10
    assert ref.missing_share == pytest.approx(0.1)
    assert sum(ref.shares) + ref.missing_share == pytest.approx(1.0)
    assert all(s == pytest.approx(0.09, abs=0.002) for s in ref.shares)
