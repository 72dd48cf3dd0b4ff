"""State stores that misbehave as a test needs them to."""

from __future__ import annotations

from pumpflow.common.state import MemoryStateStore


class LosingStore(MemoryStateStore):
    """The in-process store, made to lose its contents (:meth:`lose`) as a Redis without
    persistence that restarts does: its epoch changes with them."""

    def lose(self) -> None:
        """Forget every key, its expiry and the store's epoch."""
        self._values.clear()
        self._expiry.clear()
        self._deadlines.clear()
        self._epochs.clear()
