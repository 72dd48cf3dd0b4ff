"""LookBack: recent events of the subscribed mints in memory, and how far back they go.

An EventHistoryManager holds the events, bounded by count per mint and by age (pruned
on the clock, in event time). The look-back knows from when on it holds *every* event
of a mint, so a query is answered from memory only when memory covers its window,
and from Postgres (the full raw history, ``token_events``) otherwise:

- memory covers a mint only while this feed holds the connection (a standby, or a
  replica that took over, has not seen what the other stored), from when the mint was
  subscribed and the connection was taken, whichever is later;
- events dropped by the count bound or by age move the start of the coverage past them;
- an unsubscribed mint is forgotten.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pumpflow.common.clock import Clock, TimerHandle
from pumpflow.common.events import Event
from pumpflow.common.features.history import EventHistoryManager, HistoryConfig


class LookBack:
    """Recent events of tracked mints, with the time from which each is complete."""

    def __init__(self, config: HistoryConfig, *, clock: Clock, prune_every_s: float):
        if prune_every_s <= 0:
            raise ValueError("prune_every_s must be > 0")
        self.config = config
        self.history = EventHistoryManager(config, clock=clock)
        self._clock = clock
        self._prune_every_s = prune_every_s
        #: tracked mints -> time from which every event of the mint is held
        self._since: dict[str, float] = {}
        #: when the connection was taken; None while not holding it
        self._active_since: float | None = None
        #: events before this were dropped by age
        self._pruned_before = -math.inf
        #: tracked mints that reached the count bound: their oldest events were dropped
        self._truncated: set[str] = set()
        self._timer: TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._since)

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Prune on the clock from now on."""
        if self._timer is None:
            self._timer = self._clock.call_later(self._prune_every_s, self._prune_tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.deactivate()

    def _prune_tick(self) -> None:
        self._timer = None
        self.prune()
        self.start()

    def activate(self, now: float) -> None:
        """The connection is ours from ``now``: memory covers what arrives from then on."""
        if self._active_since is None:
            self._active_since = now

    def deactivate(self) -> None:
        """The connection is not ours: forget the events, answer nothing from memory."""
        self._active_since = None
        self.history = EventHistoryManager(self.config, clock=self._clock)
        self._truncated.clear()

    # -------------------------------------------------------------- writes

    def track(self, mints: Iterable[str], since: float) -> None:
        """Hold the events of ``mints`` from ``since`` on (already tracked ones keep theirs)."""
        limit = self.config.max_tokens
        for mint in mints:
            # beyond the limit a mint is not held: its queries go to Postgres
            if mint not in self._since and len(self._since) < limit:
                self._since[mint] = since

    def untrack(self, mints: Iterable[str]) -> None:
        for mint in mints:
            if self._since.pop(mint, None) is not None:
                self.history.clear_token_history(mint)
                self._truncated.discard(mint)

    def add(self, event: Event) -> None:
        """Hold ``event`` if its mint is tracked and the connection is ours."""
        mint = event.key
        if self._active_since is None or mint not in self._since:
            return
        if self.history.add_event(mint, event):
            self._truncated.add(mint)  # the oldest went; reads work out where coverage starts

    def prune(self) -> int:
        """Drop events older than the age bound (event time); return how many."""
        now = self._clock.now()
        self._pruned_before = now - self.config.max_age_s
        return self.history.prune_old_events(now)

    # -------------------------------------------------------------- reads

    def holds(self, mint: str) -> bool:
        """True when memory answers for ``mint`` at all."""
        return self._active_since is not None and mint in self._since

    def covered_from(self, mint: str) -> float | None:
        """Time from which memory holds every event of ``mint`` (None: it does not answer)."""
        if not self.holds(mint):
            return None
        since = max(self._since[mint], self._active_since, self._pruned_before)
        if mint in self._truncated:
            held = self.history.get_events(mint)
            if held:
                # what was dropped is no later than the oldest held, which may share its time
                since = max(since, math.nextafter(held[0].time, math.inf))
        return since

    def covers(self, mint: str, start_time: float | None) -> bool:
        """True when memory holds every event of ``mint`` at or after ``start_time``."""
        since = self.covered_from(mint)
        return since is not None and start_time is not None and start_time >= since

    def events(
        self,
        mint: str,
        start_time: float | None = None,
        end_time: float | None = None,
        *,
        limit: int | None = None,
        types: Iterable[str] | None = None,
    ) -> list[Event]:
        """Held events of ``mint`` with ``start_time <= time < end_time``; the last ``limit``."""
        if not self.holds(mint):
            return []
        events = self.history.get_events(mint, start_time, end_time)
        if end_time is not None and events and events[-1].time >= end_time:
            events = [e for e in events if e.time < end_time]
        if types is not None:
            wanted = frozenset(types)
            events = [e for e in events if e.type in wanted]
        if limit is not None:
            events = events[-limit:] if limit > 0 else []
        return events
