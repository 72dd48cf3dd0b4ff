"""What runs a model: a runtime opens a session from the model's bytes and its card.

The manager takes the runtime by injection; :class:`pumpflow.common.model.onnx.OnnxRuntime`
(onnxruntime, a dependency of the model service) is the one it uses by default.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from pumpflow.common.model.card import ModelCard


class ScoringSession(Protocol):
    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Scores (float64, one per row) of prepared inputs (float32, n x features)."""


class ModelRuntime(Protocol):
    def open(self, model: bytes, card: ModelCard) -> ScoringSession:
        """A session scoring with ``model``; raises CardError if the card does not fit it."""


def default_runtime() -> ModelRuntime:
    """The ONNX runtime (imported on first use: only the model service installs it)."""
    from pumpflow.common.model.onnx import OnnxRuntime

    return OnnxRuntime()
