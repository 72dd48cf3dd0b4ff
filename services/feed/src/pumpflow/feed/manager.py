"""DataFeedManager: frames from the feeds become v1 events on the bus.

Each validated token event is deduplicated by (txType, signature), wrapped with
``make_event`` (source, arrival time, per-mint seq from a Sequencer) and handed to
the Recorder (store, then publish) or, without one, published at once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable

from pumpflow.common.bus.abc import EventPublisher
from pumpflow.common.bus.idempotency import Sequencer
from pumpflow.common.events import Event, make_event
from pumpflow.feed.interface import DataFeedInterface, FeedRecord
from pumpflow.feed.metrics import FeedMetrics, default_metrics
from pumpflow.feed.recorder import Recorder

log = logging.getLogger(__name__)


class RecentSignatures:
    """The last ``capacity`` (txType, signature) pairs seen, as 64-bit hashes.

    Hashes instead of the strings keep about 100 bytes per entry; a false duplicate
    needs a 64-bit collision among ``capacity`` entries (odds below 1e-9).
    """

    __slots__ = ("_capacity", "_seen")

    def __init__(self, capacity: int = 200_000):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._seen: OrderedDict[int, None] = OrderedDict()

    def seen(self, tx_type: str, signature: str) -> bool:
        """True if already seen; otherwise remember it and return False."""
        key = hash((tx_type, signature))
        seen = self._seen
        if key in seen:
            seen.move_to_end(key)
            return True
        seen[key] = None
        if len(seen) > self._capacity:
            seen.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._seen)


class DataFeedManager:
    """Owns the feeds; turns their records into published events."""

    def __init__(
        self,
        *,
        source: str,
        publisher: EventPublisher | None = None,
        recorder: Recorder | None = None,
        sequencer: Sequencer | None = None,
        dedup_capacity: int = 200_000,
        metrics: FeedMetrics | None = None,
    ):
        self.source = source
        self._publisher = publisher
        self.recorder = recorder
        self.sequencer = sequencer or Sequencer()
        self.recent = RecentSignatures(dedup_capacity)
        self.metrics = metrics or default_metrics()
        self.feeds: list[DataFeedInterface] = []
        self.duplicates = 0
        self.events = 0

    def add_data_feed(self, feed: DataFeedInterface) -> None:
        self.feeds.append(feed)
        feed.register_callback(self.on_record)

    async def subscribe_to_token(self, mints: str | Iterable[str]) -> None:
        """Stream the trades of ``mints`` from every feed."""
        mints = (mints,) if isinstance(mints, str) else tuple(mints)
        for feed in self.feeds:
            await feed.subscribe(mints)

    async def unsubscribe_from_token(self, mints: str | Iterable[str]) -> None:
        """Stop the trades of ``mints`` on every feed."""
        mints = (mints,) if isinstance(mints, str) else tuple(mints)
        for feed in self.feeds:
            await feed.unsubscribe(mints)

    def active_mints(self) -> frozenset[str]:
        active: set[str] = set()
        for feed in self.feeds:
            active.update(feed.active_mints)
        return frozenset(active)

    async def start(self) -> None:
        if self.recorder is not None:
            await self.recorder.start()
        for feed in self.feeds:
            await feed.connect()

    async def stop(self) -> None:
        """Disconnect the feeds, then store and publish what is still pending."""
        for feed in self.feeds:
            await feed.disconnect()
        if self.recorder is not None:
            await self.recorder.close()

    async def on_record(self, record: FeedRecord) -> Event | None:
        """Publish one record as an event; None if it was a duplicate."""
        payload = record.payload
        if self.recent.seen(payload.txType, payload.signature):
            self.duplicates += 1
            self.metrics.duplicates.inc()
            return None
        event = record.event
        if event is None:
            event = make_event(
                payload,
                source=self.source,
                time=record.time,
                seq=self.sequencer.next(payload.mint),
            )
        self.events += 1
        if self.recorder is not None:
            await self.recorder.add(event, record.frame)
        elif self._publisher is not None:
            await self._publisher.publish(event)
            self.metrics.published.inc()
        return event
