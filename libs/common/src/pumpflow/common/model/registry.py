"""Models on disk: ``<name>.onnx`` beside its card ``<name>.card.json``.

A registry is a folder of them, one subfolder per model id, one pair per version:
``<root>/<model_id>/<version>.onnx``. Files are written to a temporary name and renamed,
the model before its card, so a reader never finds a card without its model.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pumpflow.common.model.card import (
    CardError,
    ModelCard,
    check_card,
    decode_card,
    encode_card,
)

MODEL_SUFFIX = ".onnx"
CARD_SUFFIX = ".card.json"


def card_path(model_path: str | Path) -> Path:
    path = Path(model_path)
    return path.with_name(path.name.removesuffix(MODEL_SUFFIX) + CARD_SUFFIX)


def _write_atomic(path: Path, data: bytes) -> None:
    # a name of its own: two processes (two containers' pid 1) may write the same file
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def write_model(model_path: str | Path, model: bytes, card: ModelCard) -> Path:
    """Store a model and its card (checked against the model) at ``model_path``."""
    check_card(card, model)
    path = Path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, model)
    _write_atomic(card_path(path), encode_card(card))
    return path


def read_model(model_path: str | Path) -> tuple[bytes, ModelCard]:
    """A model's bytes and its card; CardError if the card is missing or not the model's."""
    path = Path(model_path)
    model = path.read_bytes()
    try:
        raw = card_path(path).read_bytes()
    except FileNotFoundError:
        raise CardError(f"{path} has no card ({card_path(path).name} beside it)") from None
    return model, check_card(decode_card(raw), model)


def read_card(model_path: str | Path) -> ModelCard:
    return decode_card(card_path(model_path).read_bytes())


class ModelRegistry:
    """A folder of models with their cards."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, model_id: str, version: str) -> Path:
        return self.root / model_id / f"{version}{MODEL_SUFFIX}"

    def register(self, model: bytes, card: ModelCard) -> Path:
        return write_model(self.path(card.model_id, card.version), model, card)

    def remove(self, model_id: str, version: str) -> bool:
        """Delete a stored version, its card first (a reader never finds a card without
        its model); whether its model was there."""
        path = self.path(model_id, version)
        card_path(path).unlink(missing_ok=True)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def cards(self, model_id: str | None = None) -> list[ModelCard]:
        """Every stored card (of ``model_id``), oldest first."""
        pattern = f"{model_id}/*{CARD_SUFFIX}" if model_id else f"*/*{CARD_SUFFIX}"
        cards = [decode_card(p.read_bytes()) for p in self.root.glob(pattern)]
        return sorted(cards, key=lambda c: (c.created_at, c.model_id, c.version))

    def latest(self, model_id: str) -> Path:
        cards = self.cards(model_id)
        if not cards:
            raise FileNotFoundError(f"no model {model_id!r} in {self.root}")
        return self.path(model_id, cards[-1].version)
