"""Replay of recorded token events from Postgres, in time order.

As fast as possible, or paced at ``speed`` times real time. With a ReplayClock the
clock is moved to each event's time before the event is delivered, so timers of
the consumers fire exactly where they fired live.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import Event
from pumpflow.common.storage import REPLAY_FETCH_TIMEOUT_S, TokenEventStore
from pumpflow.feed.interface import DataFeedInterface, FeedRecord, as_mints


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayConfig:
    """Which recorded events to replay, and how fast."""

    #: event time range, ``start <= time < end`` (None: open)
    start: float | None = None
    end: float | None = None
    #: only these mints (None: all)
    mints: tuple[str, ...] | None = None
    #: times real time (None: as fast as possible)
    speed: float | None = None
    batch_size: int = 2_000

    def __post_init__(self) -> None:
        if self.speed is not None and self.speed <= 0:
            raise ValueError("speed must be positive (None: as fast as possible)")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


class DatabaseDataFeed(DataFeedInterface):
    """Replays a time range (and a set of mints) of recorded events."""

    name = "database"

    def __init__(
        self,
        store: TokenEventStore,
        config: ReplayConfig | None = None,
        *,
        clock: ReplayClock | None = None,
    ):
        super().__init__()
        config = config or ReplayConfig()
        self.config = config
        self._store = store
        self._mints: set[str] | None = None if config.mints is None else set(config.mints)
        self._excluded: set[str] = set()
        self._clock = clock
        self._task: asyncio.Task | None = None

    @property
    def active_mints(self) -> frozenset[str]:
        return frozenset(self._mints or ())

    @property
    def is_connected(self) -> bool:
        return self._task is not None and not self._task.done()

    async def connect(self) -> None:
        """Start replaying in the background; ``wait_done`` waits for the end."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="database-feed")

    async def wait_done(self) -> int:
        if self._task is None:
            raise RuntimeError("replay not started")
        return await self._task

    async def disconnect(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def subscribe(self, token_id: str | Iterable[str]) -> None:
        """Include mints again after an unsubscribe; with a mint filter, add them to it.

        Mints added after the replay has started are not in its query: only mints of
        the filter (or all, without one) are replayed.
        """
        mints = set(as_mints(token_id))
        self._excluded -= mints
        if self._mints is not None:
            self._mints |= mints

    async def unsubscribe(self, token_id: str | Iterable[str]) -> None:
        """Skip the remaining events of one mint, or of several."""
        self._excluded |= set(as_mints(token_id))

    async def get_historical_data(
        self, token_id: str, start_time: float | None, end_time: float | None
    ) -> list[Event]:
        return [
            event
            async for event in self._store.stream(
                start=start_time,
                end=end_time,
                mints=[token_id],
                batch_size=self.config.batch_size,
            )
            if event.seq is not None  # stored but never published: not part of the stream
        ]

    async def run(self) -> int:
        """Replay now; return the number of events delivered."""
        loop = asyncio.get_running_loop()
        clock, speed = self._clock, self.config.speed
        first_time: float | None = None
        started = loop.time()
        count = 0
        async for stored in self._store.stream_stored(
            start=self.config.start, end=self.config.end, mints=self._mints,
            batch_size=self.config.batch_size, fetch_timeout=REPLAY_FETCH_TIMEOUT_S,
        ):  # fmt: skip
            event = stored.event
            # stored without a seq: never published live, so not replayed either
            if event.seq is None or event.key in self._excluded:
                continue
            if speed is not None:
                if first_time is None:
                    first_time = event.time
                due = started + (event.time - first_time) / speed
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            if clock is not None:
                await clock.advance_to(event.time)
            await self._emit(FeedRecord(event.data, stored.frame, event.time, event))
            count += 1
        return count
