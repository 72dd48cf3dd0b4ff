"""EventHistoryManager: bounded per-token buffers of recent events with a time index.

Each token keeps its events in arrival order with their event times alongside, so a
time range is two bisects. Buffers are bounded by count (oldest dropped first) and
pruned by age, so memory stays bounded however long the run.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any

from pumpflow.common.clock import Clock


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryConfig:
    #: events kept per token (oldest dropped beyond this)
    max_events_per_token: int = 2_000
    #: events older than this (event time) are dropped by prune_old_events
    max_age_s: float = 900.0
    #: tokens kept (the longest-silent token is dropped beyond this)
    max_tokens: int = 100_000

    def __post_init__(self) -> None:
        if self.max_events_per_token < 1 or self.max_tokens < 1 or self.max_age_s <= 0:
            raise ValueError("history bounds must be positive")


class _TokenBuffer:
    __slots__ = ("events", "start", "times")

    def __init__(self) -> None:
        self.times: list[float] = []
        self.events: list[Any] = []
        # Index of the oldest live entry; the dead prefix is cut off in bulk.
        self.start = 0

    def __len__(self) -> int:
        return len(self.times) - self.start

    def drop_until(self, index: int) -> int:
        dropped = index - self.start
        if dropped <= 0:
            return 0
        self.start = index
        if self.start > 64 and self.start * 2 > len(self.times):
            del self.times[: self.start], self.events[: self.start]
            self.start = 0
        return dropped


class EventHistoryManager:
    """Recent events per token, queryable by time range."""

    def __init__(self, config: HistoryConfig | None = None, *, clock: Clock | None = None):
        self.config = config or HistoryConfig()
        self._clock = clock
        # Insertion order doubles as recency order (re-inserted on every event).
        self._tokens: dict[str, _TokenBuffer] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def add_event(self, mint: str, event: Any, time: float | None = None) -> int:
        """Append an event (its ``time`` attribute unless ``time`` is given); return how
        many of the mint's oldest the count bound dropped for it."""
        when = float(event.time if time is None else time)
        buf = self._tokens.pop(mint, None)
        if buf is None:
            buf = _TokenBuffer()
            if len(self._tokens) >= self.config.max_tokens:
                del self._tokens[next(iter(self._tokens))]
        self._tokens[mint] = buf
        times = buf.times
        if len(times) > buf.start and when < times[-1]:
            # Keep the index sorted: arrival stamps can step back by a hair.
            when = times[-1]
        times.append(when)
        buf.events.append(event)
        excess = len(buf) - self.config.max_events_per_token
        if excess > 0:
            return buf.drop_until(buf.start + excess)
        return 0

    def get_events(
        self, mint: str, start: float | None = None, end: float | None = None
    ) -> list[Any]:
        """Events of ``mint`` with ``start <= time <= end`` (open ends when None), oldest first."""
        buf = self._tokens.get(mint)
        if buf is None:
            return []
        lo = buf.start if start is None else bisect_left(buf.times, start, buf.start)
        hi = len(buf.times) if end is None else bisect_right(buf.times, end, buf.start)
        return buf.events[lo:hi]

    def get_latest_events(self, mint: str, count: int) -> list[Any]:
        """The last ``count`` events of ``mint``, oldest first."""
        buf = self._tokens.get(mint)
        if buf is None or count <= 0:
            return []
        return buf.events[max(buf.start, len(buf.events) - count) :]

    def event_count(self, mint: str) -> int:
        buf = self._tokens.get(mint)
        return 0 if buf is None else len(buf)

    def prune_old_events(self, now: float | None = None, max_age_s: float | None = None) -> int:
        """Drop events older than ``max_age_s`` before ``now``; drop empty tokens.

        ``now`` defaults to the clock's time. Returns the number of events dropped.
        """
        if now is None:
            if self._clock is None:
                raise ValueError("prune_old_events needs now= or a clock")
            now = self._clock.now()
        cutoff = now - (self.config.max_age_s if max_age_s is None else max_age_s)
        dropped = 0
        empty = []
        for mint, buf in self._tokens.items():
            if len(buf) and buf.times[buf.start] < cutoff:
                dropped += buf.drop_until(bisect_left(buf.times, cutoff, buf.start))
                if not len(buf):
                    empty.append(mint)
        for mint in empty:
            del self._tokens[mint]
        return dropped

    def clear_token_history(self, mint: str) -> None:
        self._tokens.pop(mint, None)

    def mints(self) -> list[str]:
        return list(self._tokens)
