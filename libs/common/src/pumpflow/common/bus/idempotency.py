"""Per-key sequence numbers: assigned by the key's single publisher, checked by consumers."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from enum import Enum

from pumpflow.common.events import Event, source_service

log = logging.getLogger(__name__)


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


class Verdict(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"
    GAP = "gap"


class SeqTracker:
    """Consumer side: last applied seq per (publisher service, key).

    ``check`` tells whether an event is new, a duplicate (drop it) or follows a gap
    (process it, but count it); ``commit`` records it once its effects are stored.
    Events without key or seq are always new.
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], int] = {}

    @staticmethod
    def _scope(event: Event) -> tuple[str, str]:
        return (source_service(event.source), event.key or "")

    def check(self, event: Event) -> Verdict:
        if event.seq is None or event.key is None:
            return Verdict.NEW
        return self.check_at(self._scope(event), event.seq)

    def commit(self, event: Event) -> None:
        if event.seq is None or event.key is None:
            return
        self.commit_at(self._scope(event), event.seq)

    def check_at(self, scope: tuple[str, str], seq: int) -> Verdict:
        """``check`` for a scope (publisher service, key) the caller already built."""
        last = self._last.get(scope)
        if last is None:
            return Verdict.NEW
        if seq <= last:
            return Verdict.DUPLICATE
        if seq > last + 1:
            return Verdict.GAP
        return Verdict.NEW

    def commit_at(self, scope: tuple[str, str], seq: int) -> None:
        if seq > self._last.get(scope, 0):
            self._last[scope] = seq

    def last(self, publisher: str, key: str) -> int | None:
        return self._last.get((publisher, key))

    def forget(self, key: str) -> None:
        for scope in [s for s in self._last if s[1] == key]:
            del self._last[scope]
