"""Models: cards, labels, metrics, models on disk and the ModelManager that serves them.

See :mod:`pumpflow.common.model.manager` for the API and
:mod:`pumpflow.common.model.card` for what a card holds.

The names below are imported from their modules on first use: most of those modules
need numpy, which what reads only the model's settings (every ``pumpflow`` command,
through the model service's settings) must not pay for.
"""

from __future__ import annotations

import importlib
from typing import Any

#: each name this package gives, by the module that defines it
_EXPORTS = {
    "card": (
        "CardError",
        "FeatureReference",
        "HeldOut",
        "LabelDefinition",
        "ModelCard",
        "Preprocessing",
        "TrainingWindow",
        "decode_card",
        "encode_card",
        "prepare_inputs",
        "reference_distribution",
    ),
    "drift": ("DriftMonitor", "DriftReport", "DriftThresholds", "FeatureDrift"),
    "manager": (
        "FeatureSetMismatch",
        "ModelError",
        "ModelExpired",
        "ModelManager",
        "ModelPerformance",
        "NonFiniteScore",
        "Prediction",
        "RefitRefused",
        "UnknownModel",
    ),
    "performance": (
        "LabelTracker",
        "LiveFigures",
        "ResolvedLabel",
        "RollingPerformance",
        "breakeven_threshold",
    ),
    "registry": ("ModelRegistry", "read_model", "write_model"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
