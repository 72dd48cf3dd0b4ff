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
busy one writes up to ``batch_size`` per transaction. The outbox position is marked
after each publication beside the next batch's write, not before it: a mark is only
where a restart begins republishing, so a late or lost one republishes a few events
(consumers drop them by seq) and holding the next batch for it would add a round trip
to every event's receipt latency. ``max_delay`` adds a wait to
fill a batch (flush on size or age). When ``max_pending`` events wait, ``add`` waits
too, which slows the socket reader instead of dropping what it read; the server may
drop the connection meanwhile, so the wait is logged and counted
(``pumpflow_feed_record_reader_wait_seconds_total``), never silent.

Two kinds of failure, told apart by the sink (``rejects``):

- The store is unwell (connection lost, server restarting): the write is retried
  with backoff for as long as it takes; nothing is dropped or dead-lettered.
- The store refuses rows of the batch (a value it cannot hold or index): the batch
  is split in halves, each written on its own, until the rows at fault are alone.
  Each is dead-lettered as the frame it came in with the store's reason and the
  event's identity (id, mint, seq, time: ``pumpflow.feed.redrive``), and its seq is
  kept in the store (``record_refusal``: a restarted feed numbers the mint above it,
  so the redriven event never shares its seq with a later one); the rest is
  stored and published in order, and the stream goes on. Consumers see a gap at the
  refused seq until a redrive, once the cause is fixed, stores the event with its
  identity and publishes it (late, applied once).

``problem`` names what makes the recorder unfit to be called ready: a backlog near
the point where the reader blocks, or an oldest waiting event older than a bound. A
store slower than the market makes the backlog grow, and the oldest entry of a FIFO
ages as it grows, so the age bound catches a growing backlog as well as a stuck one.
``close`` flushes within a bound and says how many events it could not store.

An event added with ``publish=False`` (a trade the feed did not subscribe to) is
stored and never published, now or by ``recover``: it carries no seq.

A recorder that took its publisher's writes over (``take_writes``: the feed's lease
holder, as it takes over) names itself in every write of numbered events. Once another
took them over, the store refuses such a write (``Superseded``): the events were
numbered while this replica held the lease and not stored when the other read the seqs
to go on from (a process frozen past its lease, a store slower than the take-over), so
the other gives the same seqs to its own. They are stored without their seqs, as
``publish=False`` events (the raw history keeps them), and never published: consumers
would drop one of two events of a seq, and the one published first may be either. Nor
do their rows move the outbox position: they lie among the successor's rows, which it
may not have published yet. Counted (``pumpflow_feed_superseded_events_total``) and
logged; downstream misses them, as it misses what a holder that dies had not stored
(the successor streams what comes after on its own connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import msgspec

from pumpflow.common.bus.abc import EventPublisher
from pumpflow.common.dependencies import WAITS, transient_dependency
from pumpflow.common.events import Event, encode_event, encode_payload
from pumpflow.common.storage import Superseded, TokenEventStore, Writer, WriteResult
from pumpflow.common.text import due_to_say
from pumpflow.feed.dead_letters import DeadLetterQueue, LogBudget
from pumpflow.feed.metrics import FeedMetrics
from pumpflow.feed.redrive import refusal_reason, refused_headers

log = logging.getLogger(__name__)

#: longest wait for a cancelled write or mark to end on a stop: a store that holds its
#: connection and stopped answering (a frozen host, a lost network) never acknowledges
#: the driver's cancel, so the stop would wait for it for ever
CANCEL_WAIT_S = 1.0


class EventSink(Protocol):
    async def write_batch(
        self, events: Sequence[Event], frames: Sequence[bytes | str | None] | None = None
    ) -> WriteResult: ...

    def rejects(self, exc: BaseException) -> bool:
        """True if ``exc`` refused the rows written (retrying them fails again)."""
        ...


class StoreRejected(Exception):
    """The sink refused rows of a batch; the batch is split to find them."""


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

    def rejects(self, exc: BaseException) -> bool:
        return False  # a line of a file is never refused; a failing disk is waited out

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
    #: not ready once this many events wait: half the buffer leaves a burst's margin
    #: before ``add`` makes the socket reader wait (and the market goes unread)
    ready_max_pending: int = 50_000
    #: not ready once the oldest waiting event has waited this long: longer than a
    #: Postgres restart plus the retry backoff (no flapping on a routine restart),
    #: short enough that a wedged writer shows within a scrape or two
    ready_max_age_s: float = 30.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_pending < 1:
            raise ValueError("batch_size and max_pending must be at least 1")
        if self.max_delay_s < 0 or self.retry_initial_s <= 0 or self.retry_max_s <= 0:
            raise ValueError("recorder delays must be positive")
        if not 1 <= self.ready_max_pending or self.ready_max_age_s <= 0:
            raise ValueError("ready_max_pending must be >= 1 and ready_max_age_s > 0")


class Recorder:
    """Batches events into a sink, then publishes them (see the module docstring)."""

    def __init__(
        self,
        sink: EventSink,
        *,
        publisher: EventPublisher | None = None,
        config: RecorderConfig | None = None,
        metrics: FeedMetrics | None = None,
        dead_letters: DeadLetterQueue | None = None,
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
        self.dead_letters = dead_letters
        #: (event, frame, publish, time.monotonic() when added)
        self._pending: deque[tuple[Event, bytes | None, bool, float]] = deque()
        self._inflight = 0
        #: when the oldest event of the batch being written was added
        self._inflight_since = 0.0
        #: of the batch being written, events stored and not yet published
        self._unpublished = 0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        #: the outbox position published and not marked yet, and the task marking it
        self._mark_wanted: int | None = None
        self._marking: asyncio.Task | None = None
        self.stored = 0
        self.published = 0
        #: a row of the store at or after every row this recorder's events are in, as told
        #: when it took over (``TokenEventStore.last_row``) and raised by each write: an
        #: event stored later is in a later row. None: not told
        self.last_row: int | None = None
        #: events the store refused (dead-lettered)
        self.rejected = 0
        #: events whose frames the store held already as other events: not published
        self.stored_already = 0
        #: who stores the numbered events (``take_writes``); None: writes are not fenced
        self._writes_as: Writer | None = None
        #: the refusal of its writes since another took them over (events go seqless)
        self._superseded: Superseded | None = None
        #: events stored without their seqs, never published: numbered while this replica
        #: held the lease, stored once another had taken the writes over
        self.superseded = 0
        #: events a stop could not store (lost) and stored events it could not publish
        self.unstored = 0
        self.unpublished = 0
        #: seconds ``add`` made the socket reader wait for room
        self.reader_waited_s = 0.0
        self._wait_log = LogBudget()
        self.last_error: str | None = None
        # read when scraped: the writer may wait for the store for long, holding a batch,
        # while the reader adds behind it (weak: the registry outlives a recorder in tests)
        self.metrics.record_pending.set_function(_pending_of(weakref.ref(self)))

    @property
    def pending(self) -> int:
        return len(self._pending) + self._inflight

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def oldest_age(self) -> float:
        """Seconds the oldest event not yet stored and published has waited (0: none)."""
        if self._inflight:
            since = self._inflight_since
        elif self._pending:
            since = self._pending[0][3]
        else:
            return 0.0
        return time.monotonic() - since

    def problem(self) -> str | None:
        """Why the recorder is not fit to be called ready, or None."""
        config = self.config
        pending = self.pending
        cause = f" (last failure: {self.last_error})" if self.last_error else ""
        limit = min(config.ready_max_pending, self._max_pending)
        if pending >= limit:
            return (f"{pending} events wait to be stored (ready below {limit}; the reader "
                    f"waits at {self._max_pending}){cause}")  # fmt: skip
        age = self.oldest_age()
        if age > config.ready_max_age_s:
            return (f"the oldest of {pending} events waiting to be stored has waited "
                    f"{age:.0f} s (ready below {config.ready_max_age_s:g} s){cause}")  # fmt: skip
        return None

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._writer(), name="feed-recorder")

    async def take_writes(self, writer: Writer) -> None:
        """Store the numbered events as ``writer`` from now on; those of any other writer
        are refused their seqs. Flush what an earlier writer numbered first."""
        store: TokenEventStore = self.sink  # type: ignore[assignment]
        await store.take_writes(writer)
        self._writes_as = writer
        self._superseded = None

    async def add(self, event: Event, frame: bytes | None = None, *, publish: bool = True) -> None:
        """Queue an event for storing and publishing; waits while too many are pending."""
        if not self._space.is_set():
            await self._wait_for_space()
        self._pending.append((event, frame, publish, time.monotonic()))
        self._idle.clear()
        self._wake.set()
        size = len(self._pending)
        if size >= self._batch_size:
            self._full.set()
        if size >= self._max_pending:
            self._space.clear()

    async def _wait_for_space(self) -> None:
        """Wait for room, saying so: while the reader waits here, the market goes unread."""
        logged = self._wait_log.allow()
        if logged:
            cause = f"; last failure: {self.last_error}" if self.last_error else ""
            log.warning("%d events wait to be stored: the socket reader waits for the store "
                        "(frames the server sends meanwhile may be lost)%s", self.pending,
                        cause)  # fmt: skip
        began = time.monotonic()
        while not self._space.is_set():
            await self._space.wait()
        waited = time.monotonic() - began
        self.reader_waited_s += waited
        self.metrics.record_reader_wait.inc(waited)
        if logged:
            log.warning("the socket reader goes on after waiting %.1f s for the store (%.1f s "
                        "in all)", waited, self.reader_waited_s)  # fmt: skip

    async def flush(self) -> None:
        """Wait until every queued event is stored and published."""
        if self._task is None and self._pending:
            raise RuntimeError("recorder not started")
        await self._idle.wait()
        await self._marked()

    async def close(self, timeout_s: float | None = None) -> int:
        """Flush (within ``timeout_s``), then stop the writer; return the events not stored.

        Events still waiting when the bound ends are lost (PumpPortal keeps no history):
        the log names how many. Stored events not yet published are published by the
        next ``recover``.
        """
        if self._task is None:
            return 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.flush()
        unpublished = self._unpublished
        unstored = self.pending - unpublished
        await _cancel(self._task)
        self._task = None
        marking, self._marking = self._marking, None
        if marking is not None:
            # unmarked: the next start republishes from the last mark, consumers drop copies
            await _cancel(marking)
        if unstored or unpublished:
            self.unstored += unstored
            self.unpublished += unpublished
            self._pending.clear()
            self._inflight = self._unpublished = 0
            self._idle.set()
            self._space.set()
            log.error(
                "stop: %d events not stored within %.1f s: lost (PumpPortal keeps no history); "
                "%d stored events not published: %s%s", unstored, timeout_s, unpublished,
                "the next start publishes them" if self._outbox else "not published",
                f" (last failure: {self.last_error})" if self.last_error else "",
            )  # fmt: skip
        return unstored

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
            after_id=position, source_service=self._outbox, order="id", redriven=False
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
        await self._marked()
        if count:
            log.warning("republished %d stored events the last run had not confirmed", count)
        return count

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._max_delay > 0 and len(self._pending) < self._batch_size:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._max_delay):
                        await self._full.wait()
            while self._pending:
                count = min(len(self._pending), self._batch_size)
                batch = [self._pending.popleft() for _ in range(count)]
                self._inflight = count
                self._inflight_since = batch[0][3]
                self.metrics.record_wait.observe(time.monotonic() - batch[0][3])
                self._full.clear()
                if len(self._pending) < self._max_pending:
                    self._space.set()
                await self._record(batch)
                self._inflight = 0
            if not self._pending:
                self._idle.set()

    async def _record(self, batch: list[tuple[Event, bytes | None, bool, float]]) -> None:
        """Store, then publish; split a refused batch until the rows at fault are alone."""
        parts = deque([batch])
        while parts:
            part = parts.popleft()
            write = self.sink.write_batch
            superseded = self._superseded is not None
            if superseded:
                part = self._unnumbered(part)
            elif self._writes_as is not None:
                write = functools.partial(write, writer=self._writes_as)
            events = [e for e, _, _, _ in part]
            started = time.perf_counter()
            try:
                result = await self._retry("store", write, events, [f for _, f, _, _ in part])
            except Superseded as refusal:
                self._superseded = refusal
                log.error("%s: the %d events numbered here while this replica held the lease "
                          "and not stored yet are stored without their seqs (the successor "
                          "gives those to its own) and not published", refusal,
                          self.pending)  # fmt: skip
                parts.appendleft(part)
                continue
            except StoreRejected as refused:
                if len(part) > 1:
                    middle = len(part) // 2
                    parts.extendleft((part[middle:], part[:middle]))
                    continue
                await self._reject(part[0][0], part[0][1], refused.__cause__)
            else:
                self.metrics.record_store.observe(time.perf_counter() - started)
                self.stored += result.inserted
                last_id = result.last_id
                if self.last_row is not None and last_id is not None and last_id > self.last_row:
                    self.last_row = last_id
                self.metrics.recorded.inc(result.inserted)
                to_publish = result.to_publish(events)
                if len(to_publish) < len(events):
                    self._stored_already(events, to_publish)
                stored_only = {e.id for e, _, publish, _ in part if not publish}
                if stored_only:
                    to_publish = [e for e in to_publish if e.id not in stored_only]
                self._unpublished = len(to_publish)
                # a superseded writer's rows lie among its successor's: marked, they would
                # move the outbox past rows the successor has not published yet
                await self._publish(to_publish, None if superseded else last_id)
                self._unpublished = 0
            self._inflight -= len(part)
            if parts:
                self._inflight_since = parts[0][0][3]

    def _stored_already(self, events: list[Event], stored: list[Event]) -> None:
        """Count and say the events whose frames the store held already as other events
        (written by another writer of the schema): they are not published again."""
        own = {e.id for e in stored}
        found = [e for e in events if e.id not in own]
        before = self.stored_already
        self.stored_already += len(found)
        self.metrics.duplicates.inc(len(found))
        if due_to_say(before, self.stored_already):
            log.warning(
                "feed: %s of %s is stored already as another event (another writer of this "
                "schema: a feed replica before a take-over, or pumpflow record or sim load "
                "into it): not published (%d so far)",
                found[0].type, getattr(found[0].data, "mint", "?"), self.stored_already,
            )  # fmt: skip

    def _unnumbered(
        self, part: list[tuple[Event, bytes | None, bool, float]]
    ) -> list[tuple[Event, bytes | None, bool, float]]:
        """The part's events without their seqs, to store and never publish."""
        unnumbered = []
        for event, frame, _publish, added in part:
            if event.seq is not None:
                event = msgspec.structs.replace(event, seq=None, renumbered=False)
                self.superseded += 1
                self.metrics.superseded_events.inc()
            unnumbered.append((event, frame, False, added))
        return unnumbered

    async def _reject(self, event: Event, frame: bytes | None, exc: BaseException | None) -> None:
        """Dead-letter an event the store refused, with the store's reason."""
        reason = refusal_reason(event, exc)
        self.rejected += 1
        self.metrics.record_rejected.inc()
        if isinstance(self.sink, TokenEventStore):
            try:
                await self._retry("refusal record", self.sink.record_refusal, event)
            except StoreRejected as refused:
                log.error("the refused seq %s of %s is not kept (%r): a restarted feed may "
                          "give it again", event.seq, event.key, refused.__cause__)  # fmt: skip
        log.error("%.400s; dead-lettered (%d so far); the stream goes on", reason,
                  self.rejected)  # fmt: skip
        body = frame if frame is not None else encode_payload(event.data)
        if self.dead_letters is None:
            log.error("no dead-letter queue: the refused frame is only in this log: %.2000r", body)
            return
        await self.dead_letters.send(
            body, reason, event.type, key=event.key, headers=refused_headers(event)
        )

    async def _publish(self, events: list[Event], last_id: int | None) -> None:
        if self._publisher is not None and events:
            started = time.perf_counter()
            await self._retry("publish", self._publisher.publish_many, events)
            self.metrics.record_publish.observe(time.perf_counter() - started)
            self.published += len(events)
            self.metrics.published.inc(len(events))
        if self._outbox is not None and last_id is not None:
            if self._mark_wanted is None or last_id > self._mark_wanted:
                self._mark_wanted = last_id
            if self._marking is None:
                self._marking = asyncio.create_task(self._mark())

    async def _marked(self) -> None:
        """Wait until every published position is marked."""
        while self._marking is not None:
            await asyncio.shield(self._marking)

    async def _mark(self) -> None:
        """Mark the newest published position until none is left (one write at a time)."""
        store: TokenEventStore = self.sink  # type: ignore[assignment]
        try:
            while self._mark_wanted is not None:
                last_id, self._mark_wanted = self._mark_wanted, None
                started = time.perf_counter()
                await self._retry("outbox mark", store.mark_published, self._outbox, last_id)
                self.metrics.record_mark.observe(time.perf_counter() - started)
        finally:
            # a mark a stop gave up on may end after the next one began
            if self._marking is asyncio.current_task():
                self._marking = None

    async def _retry(self, what: str, func, *args):
        """Call until it succeeds; a store's refusal of the rows raises StoreRejected.

        A wait for a dependency's transient failure (Postgres away, or not answering
        within the pool's bound) is recorded as one (``WAITS``): /readyz and the
        metrics name what the recorder waits on.
        """
        delay = self.config.retry_initial_s
        with contextlib.ExitStack() as waiting:
            waited = False
            while True:
                try:
                    result = await func(*args)
                except (asyncio.CancelledError, Superseded):
                    raise
                except Exception as exc:
                    self.metrics.record_errors.inc()
                    if what in ("store", "refusal record") and self.sink.rejects(exc):
                        raise StoreRejected(str(exc)) from exc
                    dependency = transient_dependency(exc)
                    if dependency is not None:
                        if not waited:
                            waited = True
                            waiting.enter_context(WAITS.waiting(dependency))
                        WAITS.waited(dependency, "feed", exc)
                    self.last_error = f"{what}: {type(exc).__name__}: {str(exc)[:300]}"
                    log.warning("%s failed (%s: %.300s); retrying in %.1f s", what,
                                type(exc).__name__, exc, delay)  # fmt: skip
                    await asyncio.sleep(delay)
                    delay = min(self.config.retry_max_s, delay * 2)
                else:
                    self.last_error = None
                    return result


def _pending_of(recorder: weakref.ref[Recorder]):
    """The recorder's events waiting to be stored, 0 once it is gone."""

    def pending() -> int:
        found = recorder()
        return 0 if found is None else found.pending

    return pending


async def _cancel(task: asyncio.Task) -> None:
    """Cancel ``task`` and wait for its end up to CANCEL_WAIT_S; raise what it raised."""
    task.cancel()
    await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
    if task.done() and not task.cancelled():
        task.result()
