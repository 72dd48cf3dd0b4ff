"""Keyed processors for tests of what a keyed consumer applied."""

from __future__ import annotations

import json

from pumpflow.common.events import Event


class AppliedSeqs:
    """Keeps the seqs a key applied, in the order applied (JSON, never compacted)."""

    def initial(self, key: str) -> list[int]:
        return []

    def apply(self, state: list[int], event: Event, effects) -> list[int]:
        return [*state, event.seq]

    def fire(self, state: list[int], effects) -> list[int]:
        return state

    def encode(self, state: list[int]) -> bytes:
        return json.dumps(state).encode()

    def compact(self, state: list[int], now: float) -> bytes | None:
        return None

    def decode(self, raw: bytes) -> list[int]:
        return json.loads(raw)
