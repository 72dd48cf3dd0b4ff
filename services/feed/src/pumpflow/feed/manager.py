"""DataFeedManager: frames from the feeds become v1 events on the bus.

Each validated token event is deduplicated by (txType, signature) before it is
numbered (a trade that arrives twice, on its token's stream and on its wallet's, takes
one seq and is published once), wrapped with
``make_event`` (source, arrival time, per-mint seq from a Sequencer) and handed to
the Recorder (store, then publish) or, without one, published at once. A trade of a
mint the feed did not subscribe to is stored without a seq and never published.
Each event also goes to its feed's LookBack (the recent history in memory), if any.

Numbering is bounded in memory: a mint quiet for ``seq_restore_window_s`` leaves the
Sequencer, and one that comes back goes on above every seq ever given (the
Sequencer's floor), never reusing one; a creation starts its mint at 1.

``start`` continues where the last publisher stopped (seq restored from the store for
the mints of the window, the floor from the highest seq stored, unconfirmed stored
events published again) and connects the feeds; given a ``writer`` (the feed's lease
holder), it first takes the store's writes over as that writer, so the events a
predecessor numbered and stores after it are refused their seqs (``recorder.py``);
``disconnect``
stops the feeds only; ``stop`` disconnects them and flushes the recorder.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pumpflow.common.bus.abc import EventPublisher
from pumpflow.common.bus.idempotency import Sequencer
from pumpflow.common.clock import Clock
from pumpflow.common.events import Event, TokenCreated, TokenTrade, make_event, source_service
from pumpflow.common.storage import TokenEventStore, Writer
from pumpflow.common.text import due_to_say
from pumpflow.feed.interface import ALL_EVENTS, DataFeedInterface, FeedRecord, as_mints
from pumpflow.feed.lookback import LookBack
from pumpflow.feed.metrics import FeedMetrics
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


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedManagerConfig:
    """How the manager names, deduplicates and numbers what it publishes."""

    #: the ``source`` of every event it wraps (service/replica)
    source: str = "feed"
    #: recent signatures remembered to drop duplicate frames
    dedup_capacity: int = 200_000
    #: a mint quiet this long leaves the Sequencer, and a start restores the seq of the
    #: mints active this recently; 30 minutes is twice the 15 in which about 95% of
    #: tokens go quiet (docs/market.md). None: every mint, kept for ever
    seq_restore_window_s: float | None = 1800.0

    def __post_init__(self) -> None:
        if self.dedup_capacity < 1:
            raise ValueError("dedup_capacity must be at least 1")
        if self.seq_restore_window_s is not None and self.seq_restore_window_s <= 0:
            raise ValueError("seq_restore_window_s must be > 0 (None: all)")


class DataFeedManager:
    """Owns the feeds; turns their records into published events."""

    def __init__(
        self,
        event_bus: EventPublisher | None,
        *,
        config: FeedManagerConfig | None = None,
        recorder: Recorder | None = None,
        clock: Clock | None = None,
        metrics: FeedMetrics | None = None,
        numbering: Callable[[], bool] | None = None,
        writer: str | None = None,
    ):
        """``numbering``: whether a frame may be numbered and published now (the replica
        holds the feed's lease by its own clock); None: always. ``writer``: who stores
        the numbered events, unique to the process (the lease holder); None: writes are
        not fenced (a recorder no other replica takes over from)."""
        self.config = config or FeedManagerConfig()
        self._numbering = numbering
        self._writer = writer
        self.source = self.config.source
        self._publisher = event_bus
        self.recorder = recorder
        self._clock = clock
        self.sequencer = Sequencer()
        self.signatures = RecentSignatures(self.config.dedup_capacity)
        self.metrics = metrics or FeedMetrics(None)
        self.feeds: list[DataFeedInterface] = []
        self.duplicates = 0
        #: frames taken while ``numbering`` said no
        self.unled = 0
        self.events = 0
        self.unsubscribed_trades = 0
        #: stored events published again by ``start`` (those the last run left)
        self.republished = 0

    def add_data_feed(self, feed: DataFeedInterface) -> None:
        self.feeds.append(feed)
        lookback = feed.lookback
        if lookback is None:
            feed.register_callback(ALL_EVENTS, self.on_record)
        else:
            # the manager adds what it publishes: no wrapping coroutine per frame
            feed.register_callback(ALL_EVENTS, functools.partial(self.on_record, lookback=lookback))

    async def subscribe_to_token(self, token_id: str | Iterable[str]) -> None:
        """Stream the trades of one mint, or of several, from every feed."""
        mints = as_mints(token_id)
        for feed in self.feeds:
            await feed.subscribe(mints)

    async def unsubscribe_from_token(self, token_id: str | Iterable[str]) -> None:
        """Stop the trades of one mint, or of several, on every feed."""
        mints = as_mints(token_id)
        for feed in self.feeds:
            await feed.unsubscribe(mints)

    async def subscribe_to_accounts(self, wallets: str | Iterable[str]) -> None:
        """Stream every trade of one wallet, or of several, from every feed."""
        wallets = as_mints(wallets)
        for feed in self.feeds:
            await feed.subscribe_accounts(wallets)

    async def unsubscribe_from_accounts(self, wallets: str | Iterable[str]) -> None:
        """Stop the trades of one wallet, or of several, on every feed."""
        wallets = as_mints(wallets)
        for feed in self.feeds:
            await feed.unsubscribe_accounts(wallets)

    async def start(self) -> None:
        """Continue where the last publisher stopped, then connect every feed."""
        recorder = self.recorder
        if recorder is not None:
            # ours still pending (from before a lost lease) first: the restore sees them
            if recorder.running:
                await recorder.flush()
            if isinstance(recorder.sink, TokenEventStore):
                window = self.config.seq_restore_window_s
                store = recorder.sink
                if self._writer is not None:
                    # before reading where each mint stands: what a predecessor numbered
                    # and stores after this is refused its seqs, which this one gives on
                    publisher = source_service(self.source)
                    await recorder.take_writes(Writer(publisher, self._writer))
                # the mints of the window go on where they were; any other starts above
                self.sequencer.raise_floor(await store.max_seq())
                if self._clock is not None:
                    # without a clock no mint's age is known: the floor alone stands
                    now = self._clock.now()
                    since = None if window is None else now - window
                    if since is not None:
                        # a mint held since this replica last led may have been numbered
                        # further by the one that led meanwhile, out of the window now:
                        # it goes on above the floor, not from where this one left it
                        self.sequencer.retire_idle(since)
                    self.sequencer.restore(await store.last_seq_by_mint(since=since), at=now)
                # what it stores from here on goes in later rows (the service keeps the
                # row with the mints, for a successor: service.py)
                recorder.last_row = await store.last_row()
            self.republished += await recorder.recover()
            await recorder.start()
        for feed in self.feeds:
            await feed.connect()

    async def disconnect(self) -> None:
        """Disconnect every feed; the recorder goes on storing what it holds."""
        for feed in self.feeds:
            await feed.disconnect()

    async def stop(self, flush_s: float | None = None) -> int:
        """Disconnect the feeds, then store and publish what is pending (within ``flush_s``).

        Return the events that could not be stored (the recorder logs them).
        """
        await self.disconnect()
        if self.recorder is not None:
            return await self.recorder.close(flush_s)
        return 0

    async def on_record(
        self, record: FeedRecord, *, lookback: LookBack | None = None
    ) -> Event | None:
        """Publish one record as an event (held in ``lookback`` too, if given); None if it
        was a duplicate or not published."""
        payload = record.payload
        if record.event is None and self._numbering is not None and not self._numbering():
            # past the lease's deadline (a stalled process): another replica may hold the
            # feed and number this mint by now; a seq given here could be one of its
            self._unled(record)
            return None
        if self.signatures.seen(payload.txType, payload.signature):
            self.duplicates += 1
            self.metrics.duplicates.inc()
            return None
        if not record.subscribed and type(payload) is TokenTrade:
            await self._store_unsubscribed(record)
            return None
        event = record.event
        if event is None:
            sequencer = self.sequencer
            seq, renumbered = sequencer.number(
                payload.mint, at=record.time, first=type(payload) is TokenCreated
            )
            window = self.config.seq_restore_window_s
            if window is not None:
                sequencer.retire_idle(record.time - window)
            # a frame carries no time: its arrival is the event's time and its receipt
            event = make_event(
                payload,
                source=self.source,
                time=record.time,
                seq=seq,
                received_at=record.time,
                renumbered=renumbered,
            )
        self.events += 1
        if self.recorder is not None:
            await self.recorder.add(event, record.frame)
        elif self._publisher is not None:
            await self._publisher.publish(event)
            self.metrics.published.inc()
        if lookback is not None:
            lookback.add(event)
        return event

    def _unled(self, record: FeedRecord) -> None:
        self.unled += 1
        self.metrics.unled_frames.inc()
        if due_to_say(self.unled - 1, self.unled):
            log.warning(
                "feed: a frame taken past the lease's deadline is dropped, neither numbered "
                "nor published (another replica may hold the feed): %s of %s (%d so far)",
                record.payload.txType, record.payload.mint, self.unled,
            )  # fmt: skip

    async def _store_unsubscribed(self, record: FeedRecord) -> None:
        """Keep the raw frame, without a seq: consumers never see a gap or the trade."""
        self.unsubscribed_trades += 1
        self.metrics.unsubscribed_trades.inc()
        if due_to_say(self.unsubscribed_trades - 1, self.unsubscribed_trades):
            log.warning(
                "trade of %s, a mint the feed is not subscribed to (never was, or left it "
                "longer ago than the unsubscribe grace): stored, not published (%d so far)",
                record.payload.mint, self.unsubscribed_trades,
            )  # fmt: skip
        if self.recorder is not None:
            event = make_event(record.payload, source=self.source, time=record.time)
            await self.recorder.add(event, record.frame, publish=False)
