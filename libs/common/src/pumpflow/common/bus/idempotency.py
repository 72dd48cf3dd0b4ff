"""Per-key sequence numbers, assigned by the key's single publisher.

Consumers check them against the seq they stored with their state
(``pumpflow.common.consumer``); the bus itself does not.
"""

from __future__ import annotations

from collections.abc import Mapping


class Sequencer:
    """Assigns consecutive seq numbers per key, starting at 1.

    Restore it from stored positions (``restore``) after a restart so numbering goes
    on instead of starting over, which consumers would take for duplicates.
    """

    __slots__ = ("_last",)

    def __init__(self, last: Mapping[str, int] | None = None):
        self._last: dict[str, int] = dict(last or {})

    def next(self, key: str) -> int:
        seq = self._last.get(key, 0) + 1
        self._last[key] = seq
        return seq

    def last(self, key: str) -> int:
        return self._last.get(key, 0)

    def restore(self, positions: Mapping[str, int]) -> None:
        for key, seq in positions.items():
            if seq > self._last.get(key, 0):
                self._last[key] = seq

    def forget(self, key: str) -> None:
        self._last.pop(key, None)

    def snapshot(self) -> dict[str, int]:
        return dict(self._last)
