"""pumpflow model service: ONNX models with their cards, training (``pumpflow train``).

The shipped default model (``default/entry.onnx`` and its card) is rebuilt byte for
byte by ``pumpflow train --default``.
"""

from pathlib import Path

#: the default model, trained on simulated markets; its card beside it
DEFAULT_MODEL_PATH = Path(__file__).parent / "default" / "entry.onnx"
