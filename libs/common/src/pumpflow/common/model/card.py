"""Model cards: what a model is, what it was trained on, how well it did, until when.

Every model is stored with its card (``<name>.onnx`` beside ``<name>.card.json``, see
:mod:`pumpflow.common.model.registry`). The card names the feature-set version and the
features in the model's input order, the preprocessing the inputs go through (the
same function in training and serving, :func:`prepare_inputs`), the training window
and data source, the label definition, held-out metrics beside a rule-based baseline,
the reference distribution of every feature (quantile bins, for drift), when it was
made and when it expires, and the SHA-256 of the model file it describes.

Cards are frozen keyword-only msgspec structs; :func:`decode_card` raises one
:class:`CardError` naming the field at fault.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import operator
import struct
import sys
from collections.abc import Sequence
from typing import Literal

import msgspec
import numpy as np

from pumpflow.common.events import FeaturesUpdated, validation_error

#: bump when the card's meaning changes incompatibly
CARD_FORMAT = 1

Task = Literal["classification", "regression"]
LabelKind = Literal["take_profit_first", "net_return"]


class CardError(ValueError):
    """A card that cannot be read or does not fit its model. Names the field."""

    def __init__(self, reason: str, *, field: str | None = None):
        self.reason = reason
        self.field = field
        super().__init__(f"model card: {reason}" + (f" at `{field}`" if field else ""))


class Preprocessing(msgspec.Struct, frozen=True, kw_only=True):
    """How a feature vector becomes the model's input, in training and in serving alike.

    ``missing``: a feature absent from the vector, NaN or infinite is NaN in the input,
    which the trees route down the branch training sent missing values to.
    """

    revision: int = 1
    input_name: str = "features"
    dtype: Literal["float32"] = "float32"
    missing: Literal["nan"] = "nan"


#: the one preprocessing revision this code implements
PREPROCESSING = Preprocessing()


class LabelDefinition(msgspec.Struct, frozen=True, kw_only=True):
    """What a model predicts about the trades after the one it scores.

    ``take_profit_first`` (classification): buying at the scored price and selling later,
    both with the curve fee, the net return reaches ``+take_profit`` before it falls to
    ``-stop_loss``, within ``horizon_s`` seconds. ``net_return`` (regression): the net
    return of selling at the last price within the horizon.
    """

    kind: LabelKind
    horizon_s: float
    take_profit: float = 0.0
    stop_loss: float = 0.0
    fee_rate: float = 0.0125


class TrainingWindow(msgspec.Struct, frozen=True, kw_only=True):
    """The data a model was fitted on."""

    source: str
    #: event-time range of the rows (epoch seconds)
    start: float
    end: float
    tokens: int
    rows: int


class HeldOut(msgspec.Struct, frozen=True, kw_only=True):
    """Metrics on data the model was not fitted on, beside a rule-based baseline's."""

    source: str
    tokens: int
    rows: int
    #: metric name -> value (classification: auc, brier, positive_rate; regression: rmse, mae)
    model: dict[str, float]
    baseline_rule: str
    baseline: dict[str, float]
    #: the same figures per source the held-out rows came from (several simulator seeds)
    by_part: dict[str, dict[str, float]] = {}


class FeatureReference(msgspec.Struct, frozen=True, kw_only=True):
    """One feature's training distribution: quantile bin edges and the share in each bin.

    Bins are ``(-inf, e0], (e0, e1], ..., (e_last, inf)``; ``missing_share`` is the share
    of rows where the feature was missing (NaN after preprocessing).
    """

    name: str
    edges: tuple[float, ...]
    shares: tuple[float, ...]
    missing_share: float


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    """A model's card. ``version`` is the first 16 hex digits of ``model_sha256``."""

    model_id: str
    version: str
    task: Task
    feature_set_version: str
    feature_names: tuple[str, ...]
    preprocessing: Preprocessing
    #: the ONNX output read as the score (classification: column 1, the positive class)
    output_name: str
    label: LabelDefinition
    training: TrainingWindow
    held_out: HeldOut
    reference: tuple[FeatureReference, ...]
    #: trainer and parameters, library versions
    trainer: dict[str, str]
    created_at: float
    expires_at: float
    model_sha256: str
    format: int = CARD_FORMAT

    def expired(self, now: float) -> bool:
        return now >= self.expires_at


def model_digest(model: bytes) -> str:
    return hashlib.sha256(model).hexdigest()


def check_card(card: ModelCard, model: bytes | None = None) -> ModelCard:
    """Raise :class:`CardError` for a card that is inconsistent (or not its model's)."""
    if card.format != CARD_FORMAT:
        raise CardError(f"card format {card.format}, this code reads {CARD_FORMAT}", field="format")
    if card.preprocessing != PREPROCESSING:
        raise CardError(
            f"preprocessing {card.preprocessing!r} is not the one implemented ({PREPROCESSING!r})",
            field="preprocessing",
        )
    if not card.feature_names or len(set(card.feature_names)) != len(card.feature_names):
        raise CardError("feature names must be non-empty and distinct", field="feature_names")
    if tuple(r.name for r in card.reference) != card.feature_names:
        raise CardError("one reference per feature, in input order", field="reference")
    if not card.expires_at > card.created_at:
        raise CardError("expires before it was created", field="expires_at")
    if (card.task == "classification") != (card.label.kind == "take_profit_first"):
        raise CardError(f"a {card.task} model with a {card.label.kind} label", field="label.kind")
    if card.version != card.model_sha256[:16]:
        raise CardError("version is not the model digest's first 16 digits", field="version")
    if model is not None and model_digest(model) != card.model_sha256:
        raise CardError("the model file is not the one this card describes", field="model_sha256")
    return card


_encoder = msgspec.json.Encoder(order="deterministic")
_decoder = msgspec.json.Decoder(ModelCard)


def encode_card(card: ModelCard) -> bytes:
    """The card as JSON, byte for byte the same for the same card (indented, sorted keys)."""
    return msgspec.json.format(_encoder.encode(card), indent=2) + b"\n"


def decode_card(raw: bytes) -> ModelCard:
    try:
        card = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        error = validation_error(exc)
        raise CardError(error.reason, field=error.field) from None
    except msgspec.DecodeError as exc:
        raise CardError(f"not JSON: {exc}") from None
    return check_card(card)


# --------------------------------------------------------------------------------------
# Preprocessing and reference distributions, shared by training and serving.


def prepare_inputs(rows: np.ndarray) -> np.ndarray:
    """Rows of feature values (n x k, card order) as the model's input: float32, NaN missing.

    Infinite values become NaN (a feature that is undefined on a row, like a return
    over a zero price), so training and serving route them alike.
    """
    out = np.array(rows, dtype=np.float32, copy=True, ndmin=2)
    finite = np.isfinite(out)
    # a count of the finite values: a third to half the time of a reduction to one bool
    if np.count_nonzero(finite) != finite.size:
        out[~finite] = np.nan
    return out


def vector_row(names: Sequence[str], values: Sequence[float], order: Sequence[str]) -> np.ndarray:
    """One row in ``order`` from a vector's ``names`` and ``values``; absent names are NaN."""
    if tuple(names) == tuple(order):
        return np.asarray(values, dtype=np.float64)
    index = dict(zip(names, values, strict=True))
    return np.fromiter((index.get(n, math.nan) for n in order), np.float64, len(order))


def vector_rows(
    vectors: Sequence[FeaturesUpdated], order: tuple[str, ...]
) -> tuple[np.ndarray, list[bytes] | None]:
    """Rows in ``order`` of the vectors (as :func:`vector_row` makes each), and each row
    packed (little-endian float64) when each is its vector as sent (every vector's names
    ``order``; None otherwise)."""
    first = vectors[0].names
    # list.count compares by identity first: vectors of one features service share their
    # names' tuple
    if first == order and list(map(_names_of, vectors)).count(first) == len(vectors):
        # one pack a vector (struct's loop in C; np.array of the tuples costs twice
        # that, np.stack of vector_row's four times), whose bytes joined are the rows;
        # a vector of another length (or a value not a number) does not pack: as
        # vector_row makes it below
        try:
            packed = list(itertools.starmap(packer(len(order)).pack, map(_values_of, vectors)))
        except struct.error:
            pass
        else:
            return np.frombuffer(b"".join(packed), "<f8").reshape(-1, len(order)), packed
    return np.stack([vector_row(v.names, v.values, order) for v in vectors]), None


_names_of = operator.attrgetter("names")
_values_of = operator.attrgetter("values")
_PACKERS: dict[int, struct.Struct] = {}
#: native order where it is little-endian, whose packs copy each value where ``<`` (the
#: same bytes) converts it: a sixth less time a vector
_LITTLE_ENDIAN = "@" if sys.byteorder == "little" else "<"


def packer(size: int) -> struct.Struct:
    """The packer of ``size`` little-endian float64 (one per size, kept)."""
    found = _PACKERS.get(size)
    if found is None:
        found = _PACKERS[size] = struct.Struct(f"{_LITTLE_ENDIAN}{size}d")
    return found


def bin_index(edges: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The reference bin of each value of ``rows`` (n x k) under each column's ``edges``.

    ``edges`` is k x m, each row a feature's edges ascending, padded with +inf; a value's
    bin is the number of its feature's edges below it, so bins are ``(-inf, e0], (e0,
    e1], ..., (e_last, inf)``. NaN (missing) falls in bin 0: callers mask it.
    """
    return np.count_nonzero(edges[None, :, :] < rows[:, :, None], axis=2)


def reference_distribution(
    inputs: np.ndarray, names: Sequence[str], *, bins: int = 10
) -> tuple[FeatureReference, ...]:
    """Quantile bins of each column of prepared ``inputs`` and the share of rows in each."""
    references = []
    for j, name in enumerate(names):
        column = inputs[:, j].astype(np.float64)
        present = column[~np.isnan(column)]
        missing = 1.0 - len(present) / len(column) if len(column) else 0.0
        if len(present):
            quantiles = np.quantile(present, np.linspace(0.0, 1.0, bins + 1)[1:-1])
            edges = np.unique(quantiles)
            counts = np.bincount(
                bin_index(edges[None, :], present[:, None])[:, 0], minlength=len(edges) + 1
            )
            shares = counts / len(column)
        else:
            edges, shares = np.empty(0), np.zeros(1)
        references.append(
            FeatureReference(
                name=name,
                edges=tuple(float(e) for e in edges),
                shares=tuple(float(s) for s in shares),
                missing_share=float(missing),
            )
        )
    return tuple(references)
