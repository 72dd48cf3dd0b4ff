"""Per-key sequence numbers, assigned by the key's single publisher.

Consumers check them against the seq they stored with their state
(``pumpflow.common.consumer``); the bus itself does not.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping


class Sequencer:
    """Assigns consecutive seq numbers per key, holding only the keys seen lately.

    A key's seqs go up by one from event to event while the key is held. Keys quiet
    since before a time leave (:meth:`retire_idle`, or :meth:`forget` one key); the
    highest seq a key had when it left raises :attr:`floor`. A key not held starts
    from 1 when its event is its ``first`` ever (a token's creation), and otherwise
    from ``floor + 1``: above every seq any key ever had here, so above any seq of its
    own. No seq is ever given twice, however many keys came and went, with memory for
    the keys of the last while only. Such a key's first event says so (``renumbered``),
    so consumers take the jump for no gap.

    After a restart, :meth:`restore` the recent keys' positions and :meth:`raise_floor`
    to the highest seq ever stored, so numbering goes on instead of starting over,
    which consumers would take for duplicates.
    """

    __slots__ = ("_floor", "_last")

    def __init__(self, last: Mapping[str, int] | None = None, *, floor: int = 0):
        #: key -> [last seq, time of it], least recently numbered first
        self._last: OrderedDict[str, list] = OrderedDict()
        self._floor = floor
        if last:
            self.restore(last)

    @property
    def floor(self) -> int:
        """The highest seq of any key that left; a returning key starts above it."""
        return self._floor

    def next(self, key: str, *, at: float = 0.0, first: bool = False) -> int:
        """The key's next seq, numbered at time ``at`` (what :meth:`retire_idle` compares)."""
        return self.number(key, at=at, first=first)[0]

    def number(self, key: str, *, at: float = 0.0, first: bool = False) -> tuple[int, bool]:
        """The key's next seq, as :meth:`next`, and whether it starts the key's numbering
        afresh above the floor (what an event's ``renumbered`` says)."""
        entry = self._last.get(key)
        if entry is None:
            seq = 1 if first else self._floor + 1
            self._last[key] = [seq, at]
            return seq, seq > 1
        seq = entry[0] = entry[0] + 1
        entry[1] = at
        self._last.move_to_end(key)
        return seq, False

    def last(self, key: str) -> int:
        """The last seq given to a key held (0: none, or it left)."""
        entry = self._last.get(key)
        return 0 if entry is None else entry[0]

    def restore(self, positions: Mapping[str, int], *, at: float = 0.0) -> None:
        """Go on from stored positions (a key held already keeps the higher seq)."""
        for key, seq in positions.items():
            entry = self._last.get(key)
            if entry is None:
                self._last[key] = [seq, at]
            elif seq > entry[0]:
                entry[0] = seq

    def raise_floor(self, seq: int) -> None:
        """Make every key not held start above ``seq`` (the highest seq ever stored)."""
        if seq > self._floor:
            self._floor = seq

    def retire_idle(self, before: float) -> int:
        """Let go of keys last numbered before ``before``; return how many left."""
        last = self._last
        retired = 0
        while last:
            key, (seq, at) = next(iter(last.items()))
            if at >= before:
                break
            del last[key]
            if seq > self._floor:
                self._floor = seq
            retired += 1
        return retired

    def forget(self, key: str) -> None:
        entry = self._last.pop(key, None)
        if entry is not None and entry[0] > self._floor:
            self._floor = entry[0]

    def snapshot(self) -> dict[str, int]:
        return {key: entry[0] for key, entry in self._last.items()}

    def __len__(self) -> int:
        return len(self._last)
