"""onnxruntime sessions for models with cards.

A classifier's session reads the last column (the positive class) of the card's output
(the probabilities); a regressor's, its single column. One intra-op thread per session:
scoring runs micro-batches on the caller's thread, and the service decides how many
run at once.
"""

from __future__ import annotations

import numpy as np
import onnxruntime

from pumpflow.common.model.card import CardError, ModelCard


class OnnxSession:
    def __init__(self, model: bytes, card: ModelCard, *, threads: int = 1):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # errors only: a converted classifier's unused label output warns on every batch
        options.log_severity_level = 3
        try:
            self._session = onnxruntime.InferenceSession(
                model, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise CardError(f"onnxruntime cannot load the model: {exc}") from None
        inputs = self._session.get_inputs()
        name = card.preprocessing.input_name
        if len(inputs) != 1 or inputs[0].name != name:
            found = [i.name for i in inputs]
            raise CardError(
                f"the model's inputs are {found}, not [{name!r}]", field="preprocessing.input_name"
            )
        width = inputs[0].shape[-1]
        if isinstance(width, int) and width != len(card.feature_names):
            raise CardError(
                f"the model takes {width} features, the card names {len(card.feature_names)}",
                field="feature_names",
            )
        outputs = [o.name for o in self._session.get_outputs()]
        if card.output_name not in outputs:
            raise CardError(f"the model's outputs are {outputs}", field="output_name")
        self._input = name
        self._outputs = [card.output_name]
        # onnxruntime makes default options on every call given none: a sixth of a
        # single row's run
        self._options = onnxruntime.RunOptions()
        # a classifier's positive class is its output's last column: the second of a
        # converter's two, or the one of a margin through a Sigmoid
        self._column = -1 if card.task == "classification" else 0

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        out = self._session.run(self._outputs, {self._input: inputs}, self._options)[0]
        return np.asarray(out, dtype=np.float64).reshape(len(inputs), -1)[:, self._column]


class OnnxRuntime:
    def __init__(self, *, threads: int = 1):
        self.threads = threads

    def open(self, model: bytes, card: ModelCard) -> OnnxSession:
        return OnnxSession(model, card, threads=self.threads)
