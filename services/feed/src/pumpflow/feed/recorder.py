"""Recorder: store every token event in batches, then publish it.

Order: STORE, THEN PUBLISH (a transactional outbox). PumpPortal keeps no history, so
an event lost before it is stored is lost for good, while an event stored but not
yet published can be published again: on start the feed republishes every stored
event after its outbox position (``TokenEventStore.outbox_position``), and
consumers drop the ones they saw already by (publisher, mint, seq). The reverse
order would publish events the database may never get if the process died
between the two, and a replay would then differ from the live run.

Batches form by group commit: while one write is in flight the next batch fills,
so an idle feed writes each event at once (latency of one COPY transaction) and a
busy one writes up to ``batch_size`` per transaction. ``max_delay`` adds a wait to
fill a batch (flush on size or age). A failing write or publish is retried with
backoff; the batch is never dropped, and when ``max_pending`` events wait, ``add``
waits too, which slows the socket reader instead of losing frames.

An event added with ``publish=False`` (a trade the feed did not subscribe to) is
stored and never published, now or by ``recover``: it carries no seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from pumpflow.common.bus.abc import EventPublisher
from pumpflow.common.events import Event, encode_event
from pumpflow.common.storage import TokenEventStore, WriteResult
from pumpflow.feed.metrics import FeedMetrics

log = logging.getLogger(__name__)


class EventSink(Protocol):
    async def write_batch(
        self, events: Sequence[Event], frames: Sequence[bytes | str | None] | None = None
    ) -> WriteResult: ...


class JsonlSink:
    """One event envelope per line (``encode_event``), to a file or a binary stream."""

    def __init__(self, target: str | Path | IO[bytes]):
        if isinstance(target, str | Path):
            self._file: IO[bytes] = open(target, "ab")
            self._owned = True
        else:
            self._file = target
            self._owned = False

    async def write_batch(
        self, events: Sequence[Event], frames: Sequence[bytes | str | None] | None = None
    ) -> WriteResult:
        self._file.write(b"".join(encode_event(e) + b"\n" for e in events))
        self._file.flush()
        return WriteResult(inserted=len(events), last_id=None)

    def close(self) -> None:
        if self._owned:
            self._file.close()
        else:
            self._file.flush()


@dataclass(frozen=True, slots=True, kw_only=True)
class RecorderConfig:
    """Batching, back-pressure and retries of the recorder."""

    #: publisher name whose outbox position advances after each published batch
    #: (None: no outbox; only with a TokenEventStore sink and a publisher)
    outbox: str | None = None
    batch_size: int = 2_000
    #: extra wait to fill a batch (0: write when the last write ends)
    max_delay_s: float = 0.0
    #: events held before ``add`` waits for the sink
    max_pending: int = 100_000
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_pending < 1:
            raise ValueError("batch_size and max_pending must be at least 1")
        if self.max_delay_s < 0 or self.retry_initial_s <= 0 or self.retry_max_s <= 0:
            raise ValueError("recorder delays must be positive")


class Recorder:
    """Batches events into a sink, then publishes them (see the module docstring)."""

    def __init__(
        self,
        sink: EventSink,
        *,
        publisher: EventPublisher | None = None,
        config: RecorderConfig | None = None,
        metrics: FeedMetrics | None = None,
    ):
        config = config or RecorderConfig()
        self.config = config
        self.sink = sink
        self._publisher = publisher
        self._outbox = (
            config.outbox if isinstance(sink, TokenEventStore) and publisher is not None else None
        )
        self._batch_size = config.batch_size
        self._max_delay = config.max_delay_s
        self._max_pending = config.max_pending
        self.metrics = metrics or FeedMetrics(None)
        #: (event, frame, publish)
        self._pending: deque[tuple[Event, bytes | None, bool]] = deque()
        self._inflight = 0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self.stored = 0
        self.published = 0

    @property
    def pending(self) -> int:
        return len(self._pending) + self._inflight

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._writer(), name="feed-recorder")

    async def add(self, event: Event, frame: bytes | None = None, *, publish: bool = True) -> None:
        """Queue an event for storing and publishing; waits while too many are pending."""
        while not self._space.is_set():
            await self._space.wait()
        self._pending.append((event, frame, publish))
        self._idle.clear()
        self._wake.set()
        size = len(self._pending)
        if size >= self._batch_size:
            self._full.set()
        if size >= self._max_pending:
            self._space.clear()

    async def flush(self) -> None:
        """Wait until every queued event is stored and published."""
        if self._task is None and self._pending:
            raise RuntimeError("recorder not started")
        await self._idle.wait()

    async def close(self) -> None:
        """Flush, then stop the writer."""
        if self._task is not None:
            await self.flush()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def recover(self) -> int:
        """Publish stored events the last run did not confirm; return how many."""
        if self._outbox is None or self._publisher is None:
            return 0
        store: TokenEventStore = self.sink  # type: ignore[assignment]
        position = await store.outbox_position(self._outbox)
        count = 0
        batch: list[Event] = []
        last_id = position
        async for stored in store.stream_stored(
            after_id=position, source_service=self._outbox, order="id"
        ):
            last_id = stored.row_id
            if stored.event.seq is None:
                continue  # stored only (a trade the feed had not subscribed to)
            batch.append(stored.event)
            if len(batch) >= self._batch_size:
                await self._publish(batch, last_id)
                count += len(batch)
                batch = []
        if batch:
            await self._publish(batch, last_id)
            count += len(batch)
        if count:
            log.warning("republished %d stored events the last run had not confirmed", count)
        return count

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._max_delay > 0 and len(self._pending) < self._batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._max_delay)
            while self._pending:
                count = min(len(self._pending), self._batch_size)
                batch = [self._pending.popleft() for _ in range(count)]
                self._inflight = count
                self._full.clear()
                if len(self._pending) < self._max_pending:
                    self._space.set()
                self.metrics.record_pending.set(len(self._pending) + count)
                events = [e for e, _, _ in batch]
                result = await self._retry("store", self.sink.write_batch, events,
                                           [f for _, f, _ in batch])  # fmt: skip
                self.stored += result.inserted
                self.metrics.recorded.inc(result.inserted)
                to_publish = result.to_publish(events)
                stored_only = {e.id for e, _, publish in batch if not publish}
                if stored_only:
                    to_publish = [e for e in to_publish if e.id not in stored_only]
                await self._publish(to_publish, result.last_id)
                self._inflight = 0
            self.metrics.record_pending.set(0)
            if not self._pending:
                self._idle.set()

    async def _publish(self, events: list[Event], last_id: int | None) -> None:
        if self._publisher is not None and events:
            await self._retry("publish", self._publisher.publish_many, events)
            self.published += len(events)
            self.metrics.published.inc(len(events))
        if self._outbox is not None and last_id is not None:
            store: TokenEventStore = self.sink  # type: ignore[assignment]
            await self._retry("outbox mark", store.mark_published, self._outbox, last_id)

    async def _retry(self, what: str, func, *args):
        delay = self.config.retry_initial_s
        while True:
            try:
                return await func(*args)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.metrics.record_errors.inc()
                log.warning("%s failed (%s: %s); retrying in %.1f s", what,
                            type(exc).__name__, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(self.config.retry_max_s, delay * 2)
