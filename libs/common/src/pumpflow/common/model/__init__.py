"""Models: cards, labels, metrics, models on disk and the ModelManager that serves them.

See :mod:`pumpflow.common.model.manager` for the API and
:mod:`pumpflow.common.model.card` for what a card holds.
"""

from pumpflow.common.model.card import (
    CardError,
    FeatureReference,
    HeldOut,
    LabelDefinition,
    ModelCard,
    Preprocessing,
    TrainingWindow,
    decode_card,
    encode_card,
    prepare_inputs,
    reference_distribution,
)
from pumpflow.common.model.drift import DriftMonitor, DriftReport, DriftThresholds, FeatureDrift
from pumpflow.common.model.manager import (
    FeatureSetMismatch,
    ModelError,
    ModelExpired,
    ModelManager,
    ModelPerformance,
    NonFiniteScore,
    Prediction,
    RefitRefused,
    UnknownModel,
)
from pumpflow.common.model.performance import (
    LabelTracker,
    LiveFigures,
    ResolvedLabel,
    RollingPerformance,
    breakeven_threshold,
)
from pumpflow.common.model.registry import ModelRegistry, read_model, write_model

__all__ = [
    "CardError",
    "DriftMonitor",
    "DriftReport",
    "DriftThresholds",
    "FeatureDrift",
    "FeatureReference",
    "FeatureSetMismatch",
    "HeldOut",
    "LabelDefinition",
    "LabelTracker",
    "LiveFigures",
    "ModelCard",
    "ModelError",
    "ModelExpired",
    "ModelManager",
    "ModelPerformance",
    "ModelRegistry",
    "NonFiniteScore",
    "Prediction",
    "Preprocessing",
    "RefitRefused",
    "ResolvedLabel",
    "RollingPerformance",
    "TrainingWindow",
    "UnknownModel",
    "breakeven_threshold",
    "decode_card",
    "encode_card",
    "prepare_inputs",
    "read_model",
    "reference_distribution",
    "write_model",
]
