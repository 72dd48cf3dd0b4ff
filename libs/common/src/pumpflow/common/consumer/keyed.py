"""KeyedStatefulConsumer: per-key state, stored before anything it causes is published.

A service hands it a pure :class:`~pumpflow.common.keyed.KeyedProcessor`; the consumer
owns the rest:

- **Order.** Each event's work runs on the TokenMonitorThreadPool under its key, at
  the key's priority (set by the processor, or at once by ``priority_hint`` from an
  event such as a lifecycle change, re-ranking work already queued), so a key's
  events and timers apply in order while busy keys of other partitions wait behind
  more important ones. The subscription takes a window
  of deliveries per partition at once (``window``), so many keys' events are applied
  while one group commit is stored.
- **Tracking record.** Each key has one record in the store, ``<service>:key:<key>``:
  the encoded state, the last applied seq per publisher, the last seq it published,
  the outbox of events not known to be published, its timer and priority, and its
  partition's time it was written at. An event whose seq is not above its publisher's
  applied seq is a duplicate and is dropped.
- **Redrive and retries.** The seq of an event the key refused (dead-lettered as
  invalid) counts as applied, and one whose apply raised is passed over by the later
  events of its key (the window applies them meanwhile), so either one's seq ends at
  or below the applied one. The record keeps both kinds (``refused`` and ``failed``,
  up to :data:`UNAPPLIED_KEPT` per publisher each, the oldest forgotten first). A
  failed seq is applied by its next delivery (the bus's retry, or a redrive after the
  bus dead-lettered it). A refused seq is applied only by an event put back from the
  dead letters, which comes marked ``redriven``, so a plain redelivery of a refused
  event is still a duplicate. Either way the event applies out of its original order
  and its seq leaves the list, so another copy is a duplicate again: redriving twice,
  or to every consumer of a type, applies nothing twice.
- **Reordering.** An event whose seq skips ahead leaves the seqs between ``missing``
  (the newest :data:`UNAPPLIED_KEPT` per publisher); one of them arriving later is
  applied then, once, and counted as reordered, not dropped as a duplicate. The
  processor sees it as the key's next event: what adds up (counts, volumes, sums)
  comes out as in order, a window counts it at the time it arrives (event time never
  steps back), and what holds the latest value (price, curve reserves) holds the
  late event's until the key's next event. A publisher's first event on a key (its
  record holds nothing of that publisher: a new key, or one other publishers' events
  started) further into its seq than a reordering explains (past
  :data:`UNAPPLIED_KEPT`) is an unrecorded start: the publisher's events before it are
  not in the state (a store that lost the record, a consumer that joined mid-stream).
  It is counted and logged, and nothing before it is kept ``missing``.
- **Partial publishers.** A publisher numbers all its keyed events of a key in one
  seq; a consumer that takes only some of its types (``partial_publishers``: activity
  takes the feed's ``token.migrated``, not its creations and trades) sees that seq skip
  by design. Its seqs only drop duplicates: a skip is no gap (nothing between is
  missing, none is counted), and a key whose first event is one far into the stream is
  new here, not a key that lost its record (not counted as unrecorded, not rebuilt from
  history). An older seq of it arriving after a newer one is dropped as a duplicate.
- **Unchanged.** An event the processor applied as :data:`~pumpflow.common.keyed.UNCHANGED`
  (no state change, no effect) stores nothing when its seq is the next one of its
  publisher and the key has a live record (it is indexed): the seq is kept in memory
  (later copies are duplicates) and stored with the key's next change, or when the
  key is handed over (revoked or stopped). Anything else about such an event is
  stored as for a change: a gap, a late or retried seq (their lists change), a key
  without a live record (new, or loaded from its retired record, which would expire),
  a publisher's first event on the key (a restored record knows the publisher), a
  pending retirement it cancels, a priority hint. A crash therefore leaves a
  record's applied seq behind by at most unchanged events: those not acked are
  delivered again and change nothing again; those acked make the next event after
  the take-over count a gap over their seqs (kept in ``missing``, as if overtaken).
- **Group commit** (:class:`~pumpflow.common.state.commit.GroupCommit`). Changed keys
  are written together, one :class:`WriteBatch` per commit (the records, the service's
  views of them and new partition-index entries), each key encoded once however many
  events it applied meanwhile. Then the outboxes
  are published in per-key order, then the deliveries that caused them are acked
  (the bus acks when the handler returns). A crash in between publishes the stored
  outbox again; consumers drop the copies by seq. What a processor hands out of its
  keys' state to a store of the service's own (the model service's released labels)
  is stored by ``before_write``, awaited once the commit's keys are encoded and before
  they are written, and retried whatever the error as the write is: a crash leaves it
  in the state or in that store, never in neither (a crash after ``before_write``
  hands it out again from the state; that store keeps one).
- **Ownership.** ``on_assigned`` loads the live records of the partitions (listed in
  ``<service>:partition:<p>``), re-arms their timers and publishes what their outboxes
  still hold; ``on_revoked`` stops their timers, lets their queued work finish,
  stores them and forgets them, and the partition's time. So timers run only on the
  owner.
- **Retirement.** ``effects.retire(ttl)`` drops a key from memory once stored, takes
  it off its partition's index and gives its record (and views) that TTL; an event
  for it later loads it again (and indexes it again; a copy of one it applied changes
  nothing, and it leaves again). Work of the key under way then
  (an event waiting for its dead letter, say) keeps it in memory: that work
  applies to it, and the key leaves after it, unless it changed the key (the commit of
  that change decides again).
- **Seqs it publishes.** A key numbers its events 1, 2, ... from its record's start. A
  record that expired (a retired key gone quiet past its TTL) or was lost takes with it
  how far the key had got, while a consumer of its events may remember longer and
  would drop the seqs given again as duplicates. So each partition keeps a floor,
  ``<service>:seq-floor:<p>``, the highest seq a retired key of it published, raised in
  the same write that retires the key; a new record whose first event is not its
  publisher's seq 1, or is redriven (a key that may have been here before), numbers
  from above it. A key new to the stream starts at 1 whatever the floor. The first
  event of such a numbering (after a rebuild too) is marked ``renumbered``, and a
  consumer takes its jump for no gap and, holding nothing of the publisher, for no
  unrecorded start (the feed's stored events keep the mark, published again or
  replayed).
- **Renumbered.** An event marked ``renumbered`` (the feed's Sequencer marks a mint's
  return above its floor the same way) skips no seq of its publisher: nothing between
  is kept ``missing``, no gap or unrecorded start is counted. A key without a record is
  still rebuilt from history first: its events before belong to it all the same.
- **Beside the keys.** ``prepare`` is told each delivery before its keys' work is
  queued (work across keys at once: the model service's one model call for many
  tokens) and ``settle`` once that work is over, whatever came of it (applied, a
  duplicate, refused, raised), so what ``prepare`` kept for the delivery goes with it.
  ``on_forgotten`` is told each key that leaves memory (retired, revoked, dropped as
  unencodable), so what a service keeps per key beside its state goes with it.
- **Time.** What a processor is told is now (``Effects.now``, the time its timers fire
  at, the time a key is compacted at) is the consumer's time of the key's partition, the
  market's as far as that partition has applied it: the latest event time of the types
  that carry the market's (``market_types``) it applied, moved on by the clock from then
  while nothing newer comes, never past the clock, and never back: an event older than
  where the time got to (one delayed past a quiet spell the time moved on through with
  the clock) leaves it there, so nothing judged by it (timers, idleness, compaction) is
  judged again at an earlier time. Live, it is the clock's but for the delivery's delay;
  behind the market (a backlog after an outage, a restart, a burst) it is the time of
  the events it is applying, so a key whose next events are still queued is not judged
  idle or quiet meanwhile, however far ahead other partitions (their queues drained
  sooner) are. A partition that knows no time of its own yet (its first events carry
  none of the market's) is told the latest of the others', and no less from then: its
  own first events, behind it, do not take back what it was told. A timer comes due on
  the clock and fires once its partition's time reaches it too: until then it waits,
  looked at every :data:`WAIT_CHECK_S` of the clock. Each record keeps its partition's
  own time it was written at, never the others' it was told (none while it knows none):
  a replica that takes a partition over starts from the latest of its records, so its
  timers, long past on the clock after an outage, wait for the backlog of its own
  market. A partition revoked forgets its time, its own and the one it was told (and its
  waiting timers): assigned again, to this replica too, it starts from its records' as
  on a first assignment, not from the time it had moved on to with the clock meanwhile,
  past the market its other owner applied. Before any partition has a time (nothing of
  the market's types applied, nothing restored with one), a processor is told the time
  of the event it applies (never past the clock; the clock's for a timer), never a time
  before any: what it emits is stamped at a time the bus carries (JSON has no infinity,
  so every consumer would refuse an event stamped -inf, and one handed on in memory
  would put it into the times downstream). That time is told, not held: a type that does
  not carry the market's may be ahead of it (a command on the critical lane, a migration
  overtaking its token's vectors), so the partition's time stays unknown until the
  market's comes: its timers wait, a compaction finds nothing idle (a key is held
  encoded as it is) and its records keep no time.
- **Lag behind the market.** ``pumpflow_consumer_lag_seconds{service,partition}``,
  read when scraped (:meth:`lags`): per partition owned that knows a time, the clock
  minus the latest market event time it applied (or restored with its records; a
  partition assigned again shows none until they are restored). A
  quiet market moves the consumer's time on with the clock, and so does a consumer
  stalled or behind a backlog (its store out, the broker not delivering) for as long
  as it stalls: its time does not tell them apart, by design. An operator does: in
  both the lag grows with the clock, but in a quiet market the partition's queue
  (``<service>.p<NN>``, RabbitMQ's ``rabbitmq_queue_messages{queue}``) is empty, while
  a stalled or backlogged consumer's holds messages (the ``ConsumerBehindMarket``
  alert asks for both). After an outage a partition's lag starts at the outage's
  length (its records' time) and falls as its backlog is applied.
- **Memory.** A key idle for ``compact_after_s`` is held as its encoded bytes until
  its next event.
- **Rebuild.** With a ``history`` source (the feed's events stored in Postgres), a key
  whose first event from a publisher is past that publisher's seq 1 (a store that lost
  its records, an expired retired key trading again, a service deployed mid-stream, an
  event that overtook the ones before it) is first rebuilt from the publisher's stored
  events before that seq, applied in order
  with nothing announced (what they caused went out before), so its state is what an
  unbroken run would hold; the seqs it publishes go on from the last replayed seq.
  While the history is read (Postgres slow, locked or down: a dependency's failure is
  waited out, however long), that event and every later one of the key are *parked*:
  kept, in the order they came, with the key's record (each written once, as a field
  of ``<service>:parked:<key>``, the record naming the fields), and their deliveries
  are done once that is stored. So the key's wait holds no worker, no place in its
  partition's window and no unacked delivery (the broker acks a queue in delivery
  order and stops at its prefetch): the partition's other keys go on. Once read, on
  the key's turn, the history and then the parked events are applied, announced and
  stored as if they had come then; a parked event that waits for another publisher's
  history parks itself and the rest again. A pending retirement does not stand while
  events are parked, nor is a view written from a state without its history, and a
  timer that comes due meanwhile fires after them. A replica that takes the partition
  over restores the parked events with the record and reads the history again. A read
  that fails :data:`REBUILD_ATTEMPTS` times for another reason dead-letters the parked
  events with the error, as the bus would their deliveries (a redrive parks them again).

Transient failures of the store or the bus
(:func:`~pumpflow.common.dependencies.transient_dependency`) are waited out (the
deliveries wait, unacked; a key's task waiting so is not hung); an event the processor
refuses (:class:`InvalidInput`) is dead-lettered with its reason and the key's stream
goes on. Whatever an apply or a fire that raised asked of its effects is taken back:
the events it emitted are not published (a retry announces its event once, with the
next seq), and its timer, priority and retirement do not stand. A fire that raised is
logged and counted by the pool, its timer spent; time goes on. A key whose state (or
view) cannot be encoded fails the deliveries its commit waited for, and those of its
work under way then (waiting for a dead letter, say), and leaves memory:
its events come back and apply again to its stored record (the bus dead-letters one
that fails every time), and the commit's other keys are written by the next commit.
A commit the store refuses because a key of it holds the wrong kind
(:class:`~pumpflow.common.state.abc.WrongKind`: a value or a set where the commit
writes hash fields, written by something else) is retried until that key is removed,
every later commit waiting behind it; nothing is dead-lettered (the state would be
lost). Each refusal is counted (``pumpflow_consumer_stalled_commits_total`` by what the
key holds) and the first logged naming the key, then a line a minute.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from pumpflow.common.bus.abc import EventBus, Subscription
from pumpflow.common.bus.routing import partition_of
from pumpflow.common.clock import Clock, TimerHandle
from pumpflow.common.consumer.metrics import ConsumerMetrics
from pumpflow.common.dependencies import Backoff, wait_out
from pumpflow.common.events import (
    Event,
    Payload,
    decode_event,
    encode_event,
    make_event,
    source_service,
)
from pumpflow.common.keyed import UNCHANGED, InvalidInput, KeyedProcessor, StaleState
from pumpflow.common.priority import Priority
from pumpflow.common.state.abc import HashValue, StateStore, WriteBatch, WrongKind
from pumpflow.common.state.commit import GroupCommit, wake
from pumpflow.common.text import due_to_say
from pumpflow.common.workers import PoolClosed, TokenMonitorThreadPool, WorkerPoolConfig

log = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")

#: the service's read models of a key, stored with its record: (key, state, last seq the
#: key published, the events it emitted since its last commit) -> {store key: hash fields}
ViewsFunction = Callable[[str, Any, int, Sequence[Event]], Mapping[str, Mapping[str, HashValue]]]
#: a key's stored events from one publisher (a service name) before a seq, in seq
#: order: (key, publisher, before_seq) -> events
HistorySource = Callable[[str, str, int], Awaitable[Sequence[Event]]]

_RESTORE_CHUNK = 500
#: a stored TTL no key has: its views' expiries are written again
_LOST = -2.0
#: refused or failed seqs a key remembers per publisher (the oldest go first)
UNAPPLIED_KEPT = 64
#: reads of a key's history that fail (not a dependency's wait) before its parked
#: events are dead-lettered, as the bus does a delivery's (Subscription.max_attempts)
REBUILD_ATTEMPTS = 3
#: longest wait, in clock seconds, between looks at the timers due on the clock that
#: wait for the consumer's time: the rules timed are of tens of seconds (60 s of quiet,
#: a 120 s horizon), so a second late behind a backlog is nothing to them, and one look
#: a second for all waiting timers costs nothing
WAIT_CHECK_S = 1.0
#: shortest wait between those looks: time moves on by at least this much (a float
#: epoch time cannot tell apart much less than a microsecond)
_WAIT_MIN_S = 0.001


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyedConsumerConfig:
    """How a keyed stateful consumer subscribes, works and stores."""

    #: consumer group and store key prefix
    service: str
    #: event-type patterns consumed (keyed types)
    patterns: tuple[str, ...]
    workers: int = 8
    #: a key's task running longer is hung (the pool replaces its worker)
    task_deadline_s: float = 10.0
    #: deliveries of one partition applied while earlier ones are being stored
    window: int = 64
    #: TTL of a live key's record; None keeps it until the key retires
    live_ttl_s: float | None = None
    #: publishers (service names) of which only some keyed event types are consumed
    #: (see the module's partial publishers)
    partial_publishers: tuple[str, ...] = ()
    #: event types whose event time is the market's (see the module's time): those of
    #: the key's own market, not those that overtake it (a command on the critical
    #: lane, an event of a publisher a hop nearer the feed); None: every type consumed
    market_types: tuple[str, ...] | None = None
    #: a key untouched this long (wall seconds) is held encoded until its next event
    compact_after_s: float = 120.0
    compact_interval_s: float = 30.0
    #: first and longest pause between retries of a failed write or publish
    retry_initial_s: float = 0.05
    retry_max_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.patterns:
            raise ValueError("patterns must name at least one event type")
        if self.window < 1 or self.workers < 1:
            raise ValueError("window and workers must be at least 1")
        if self.compact_after_s <= 0 or self.compact_interval_s <= 0:
            raise ValueError("compact_after_s and compact_interval_s must be positive")
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            raise ValueError("need 0 < retry_initial_s <= retry_max_s")


class Record(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """What the store keeps per key: state, tracking and outbox, written together."""

    state: bytes
    #: publisher service -> last seq applied
    applied: dict[str, int]
    #: last seq given to an event this key published
    published: int = 0
    #: encoded events emitted but not known to be published
    outbox: list[bytes] = []
    timer: float | None = None
    priority: int = int(Priority.NORMAL)
    retired: bool = False
    #: publisher service -> seqs dead-lettered as invalid (a redrive applies them)
    refused: dict[str, list[int]] = {}
    #: publisher service -> seqs whose apply raised (their next delivery applies them)
    failed: dict[str, list[int]] = {}
    #: publisher service -> seqs a later seq skipped (applied when they arrive)
    missing: dict[str, list[int]] = {}
    #: its partition's own time when written (-inf: it knew none; see the module's time)
    time: float = -math.inf
    #: its events waiting for its rebuild are the fields [parked_from, parked_to) of
    #: ``<service>:parked:<key>``, in the order they came (see the module's rebuild)
    parked_from: int = 0
    parked_to: int = 0


_encode_record = msgspec.msgpack.Encoder().encode
_decode_record = msgspec.msgpack.Decoder(Record).decode


class _Key:
    """One key in memory: its state (or its bytes while compact) and tracking."""

    __slots__ = (
        "applied",
        "changed",
        "failed",
        "gone",
        "handed",
        "indexed",
        "key",
        "lagging",
        "missing",
        "outbox",
        "outbox_stored",
        "park_next",
        "parked",
        "parked_stored",
        "partition",
        "priority",
        "published",
        "raw",
        "rebuilding",
        "refused",
        "renumbered_from",
        "retire_ttl",
        "state",
        "stored_ttl",
        "timer",
        "timer_at",
        "touched",
    )

    def __init__(self, key: str, partition: int, state: Any, raw: bytes | None):
        self.key = key
        self.partition = partition
        self.state = state
        self.raw = raw
        self.applied: dict[str, int] = {}
        #: publisher -> seqs not applied, ascending (see Record)
        self.refused: dict[str, list[int]] = {}
        self.failed: dict[str, list[int]] = {}
        self.missing: dict[str, list[int]] = {}
        self.published = 0
        #: the key numbers afresh from the seq after this one (-1: it does not): the
        #: event given it says so
        self.renumbered_from = -1
        self.outbox: list[Event] = []
        #: events at the head of the outbox handed to a publication under way
        self.handed = 0
        #: the stored record still lists events published since
        self.outbox_stored = False
        self.timer_at: float | None = None
        self.timer: TimerHandle | None = None
        self.priority = int(Priority.NORMAL)
        self.retire_ttl: float | None = None
        #: TTL the record was last stored with (the views follow it)
        self.stored_ttl: float | None = None
        self.indexed = False
        #: seqs applied by events that changed nothing are not stored yet
        self.lagging = False
        #: generation of the key's last change
        self.changed = 0
        self.touched = 0.0
        #: dropped from memory (revoked or retired): late work must not revive it
        self.gone = False
        #: events waiting for the key's rebuild, with their field in the parked hash, in
        #: the order they came; the next field, and the fields [from, to) stored
        self.parked: list[tuple[int, Event]] = []
        self.park_next = 0
        self.parked_stored = (0, 0)
        #: reading the history the first parked event waits for
        self.rebuilding: asyncio.Future | None = None


class _Effects:
    """What one apply or fire asks for (see :class:`pumpflow.common.keyed.Effects`)."""

    __slots__ = ("_consumer", "_entry", "_silent", "cause", "more")

    def __init__(
        self,
        consumer: KeyedStatefulConsumer,
        entry: _Key,
        cause: Event | None,
        more: bool = False,
        *,
        silent: bool = False,
    ):
        self._consumer = consumer
        self._entry = entry
        self.cause = cause
        self.more = more
        #: replaying history: what it would announce went out when it first happened
        self._silent = silent

    @property
    def key(self) -> str:
        return self._entry.key

    @property
    def now(self) -> float:
        consumer = self._consumer
        now = consumer.now(self._entry.partition)
        return now if now != -math.inf else consumer._first_time(self.cause)

    def emit(self, payload: Payload, *, time: float) -> None:
        if self._silent:
            return
        entry = self._entry
        seq = entry.published = entry.published + 1
        entry.outbox.append(
            make_event(
                payload,
                source=self._consumer.source,
                time=time,
                seq=seq,
                cause=self.cause,
                renumbered=seq - 1 == entry.renumbered_from,
            )
        )

    def set_timer(self, at: float) -> None:
        self._consumer._arm(self._entry, float(at))

    def cancel_timer(self) -> None:
        self._consumer._disarm(self._entry)

    def set_priority(self, priority: int) -> None:
        entry = self._entry
        entry.priority = int(priority)
        self._consumer.pool.set_priority(entry.key, entry.priority)

    def retire(self, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("a retired key's TTL must be positive")
        self._entry.retire_ttl = float(ttl_s)


class KeyedStatefulConsumer(Generic[S]):
    """Runs a :class:`KeyedProcessor` over a service's keyed events; see the module."""

    def __init__(
        self,
        processor: KeyedProcessor[S],
        config: KeyedConsumerConfig,
        *,
        bus: EventBus,
        store: StateStore,
        clock: Clock,
        source: str,
        views: ViewsFunction | None = None,
        priority_hint: Callable[[Event], int | None] | None = None,
        on_published: Callable[[Sequence[Event]], None] | None = None,
        metrics: ConsumerMetrics | None = None,
        prepare: Callable[[Sequence[Event]], None] | None = None,
        settle: Callable[[Sequence[Event]], None] | None = None,
        history: HistorySource | None = None,
        before_write: Callable[[], Awaitable[Any]] | None = None,
        on_forgotten: Callable[[str], None] | None = None,
    ):
        self.processor = processor
        self.config = config
        self.bus = bus
        self.store = store
        self.clock = clock
        self.source = source
        self._views = views
        self._priority_hint = priority_hint
        #: told what went out, once confirmed (a service counts what it published)
        self._on_published = on_published
        #: told each delivery (a batch, or one event) before its keys' work is queued:
        #: work across keys is done there at once (one model call for many tokens); it
        #: reads state, never changes it
        self._prepare = prepare
        #: given each delivery ``prepare`` was, once its keys' work is over, whatever
        #: came of it (applied, a duplicate, refused, raised): what was prepared for it
        #: and not taken goes
        self._settle = settle
        #: told each key that leaves memory (retired, revoked, unencodable): what the
        #: service holds of it beside its state goes
        self._on_forgotten = on_forgotten
        #: where a key without a record is rebuilt from (see the module)
        self._history = history
        #: stores what the keys of a commit handed out of their state, before it writes
        #: them (see the module)
        self._before_write = before_write
        self._partial = frozenset(config.partial_publishers)
        self.metrics = metrics or ConsumerMetrics(config.service)
        self._backoff = Backoff(initial_s=config.retry_initial_s, max_s=config.retry_max_s)
        self.pool = TokenMonitorThreadPool(
            WorkerPoolConfig(
                name=config.service,
                workers=config.workers,
                task_deadline_s=config.task_deadline_s,
            )
        )
        self._key_prefix = f"{config.service}:key:"
        self._index_prefix = f"{config.service}:partition:"
        self._floor_prefix = f"{config.service}:seq-floor:"
        self._parked_prefix = f"{config.service}:parked:"
        #: partition -> the highest seq a retired key of it had published, as stored
        #: (known for the partitions of every key in memory; see :meth:`_load`)
        self._floors: dict[int, int] = {}
        #: the store lost the floors: the next commit writes those known here back
        self._floors_lost = False
        self._keys: dict[str, _Key] = {}
        #: partitions whose keys this replica holds (restored, timers armed)
        self.owned: set[int] = set()
        #: owned partitions whose stored keys are loaded (what they hold is in memory)
        self.restored: set[int] = set()
        self._publishers: dict[str, str] = {}
        self._dirty: dict[str, _Key] = {}
        #: generations of changes, written by group commits of the dirty keys
        self._commits = GroupCommit(self._write)
        #: generations written with their events published
        self._announced = 0
        #: written batches not published yet (entries, events, handed, generation), and
        #: the task publishing them in order
        self._unannounced: list[tuple[list[_Key], list[Event], list, int]] = []
        self._announcing: asyncio.Future | None = None
        #: (generation, future) of deliveries waiting for their publication
        self._announce_waiters: list[tuple[int, asyncio.Future]] = []
        self._subscription: Subscription | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._stopping = False
        self._abandoned = False
        self.flushes = 0
        #: events applied and not yet added to the ``applied`` counter (added once per
        #: delivery or batch handled, not per event: a counter's inc costs ~0.4 us)
        self._applied_uncounted = 0
        #: identity of the store's contents written to (StateStore.epoch); a new one
        #: means the store lost what it held
        self._epoch: bytes | None = None
        self._checking_epoch: asyncio.Future | None = None
        #: the store's connections opened when its epoch was last read
        self._connections = 0
        #: the commit that writes back what the store lost (ready once stored)
        self._rewriting: int | None = None
        #: per partition, the latest event time applied of the market's types (None:
        #: every type), -inf before any (see the module's time)
        partitions = bus.partitions
        self._event_times = [-math.inf] * partitions
        self._market = None if config.market_types is None else frozenset(config.market_types)
        #: per partition: the latest event time its time has taken in; its own time and
        #: the least it is told (the others' it was told while it knew none of its own),
        #: each held as its offset from the clock (at most 0, -inf: none), so it moves
        #: on with the clock; and the latest offset of the partitions' own times
        self._seen = [-math.inf] * partitions
        self._own = [-math.inf] * partitions
        self._told_floor = [-math.inf] * partitions
        self._latest_own = -math.inf
        #: per partition, timers due on the clock that wait for its time, (at, order,
        #: handle) in a heap, and the look at them next
        self._waiting: dict[int, list[tuple[float, int, TimerHandle]]] = {}
        self._waiting_order = itertools.count()
        self._waiting_check: TimerHandle | None = None
        self.metrics.read_lag(self.lags)
        self.metrics.read_rebuilding(self.rebuilding)

    # ---------------------------------------------------------------- lifecycle

    @property
    def subscription(self) -> Subscription | None:
        return self._subscription

    async def start(self) -> None:
        """Start the pool, then subscribe (the bus assigns partitions before delivering)."""
        self._stopping = False
        self._epoch, _ = await self._retry(self.store.epoch, "reading the store's epoch")
        self._connections = self.store.connections
        await self.pool.start()
        self._schedule_sweep()
        self._subscription = Subscription(
            service=self.config.service,
            patterns=self.config.patterns,
            handler=self.handle,
            batch_handler=self.handle_batch,
            window=self.config.window,
            on_assigned=self.assign,
            on_revoked=self.revoke,
        )
        await self.bus.subscribe(self._subscription)

    async def stop(self) -> None:
        """Stop timers and work; store every change (the bus stopped delivering)."""
        self._stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._stop_waiting()
        if self._subscription is not None:
            await self.bus.unsubscribe(self._subscription)
        for entry in self._keys.values():
            self._cancel_timer(entry)
            self._stop_rebuilding(entry)  # its parked events are stored with it
        await self.pool.stop(drain=True)
        await self._hand_over(list(self._keys.values()))

    async def abandon(self) -> None:
        """Stop the way a crash stops (for tests of crashes): nothing more is written or
        published, and the deliveries in flight are cancelled, never acked."""
        self._stopping = self._abandoned = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._stop_waiting()
        for entry in self._keys.values():
            self._cancel_timer(entry)
            self._stop_rebuilding(entry)
        self._commits.cancel()
        if self._announcing is not None:
            self._announcing.cancel()
        for _, done in self._announce_waiters:
            done.cancel()
        self._announce_waiters = []
        # queued work runs into the cancellation below, so every delivery ends unacked
        await self.pool.stop(drain=True)

    def _stop_waiting(self) -> None:
        if self._waiting_check is not None:
            self._waiting_check.cancel()
            self._waiting_check = None

    async def flush(self) -> None:
        """Store and publish every change made so far."""
        while True:
            try:
                await self._until_stored(self._commits.changed)
                return
            except Exception:
                # a commit failed on a key that cannot be stored (it fails that key's
                # deliveries, logged, and leaves memory): the next commit follows at
                # once with the other keys
                continue

    # ---------------------------------------------------------------- handling

    def handle(self, event: Event) -> asyncio.Future:
        """The bus handler: a future done once the event's effects are stored and published.

        The event is applied on the pool under its key's order; one future per event is
        all the waiting there is (no coroutine per delivery).
        """
        if self._stopping:
            return _not_taken()
        key = event.key
        if key is None:
            raise InvalidInput(f"{event.type} has no key")
        if self._prepare is not None:
            self._prepare((event,))
        entry = self._keys.get(key)
        priority = entry.priority if entry is not None else Priority.NORMAL
        if self._priority_hint is not None:
            hinted = self._priority_hint(event)
            if hinted is not None:
                # re-rank the key's queued work now, not once this event's turn comes
                priority = hinted
                if entry is not None:
                    self._reprioritise(entry, hinted)
                self.pool.set_priority(key, hinted)
        done = asyncio.get_running_loop().create_future()
        if self._settle is not None:
            # done once applied or failed: the event's work is over either way
            done.add_done_callback(lambda _: self._settle((event,)))
        try:
            self.pool.post(key, lambda: self._apply_then_wait(key, event, done), priority=priority)
        except BaseException:
            done.cancel()
            raise
        return done

    def handle_batch(self, events: Sequence[Event]) -> asyncio.Future:
        """The bus's batch handler: one future for a lane's ready deliveries.

        Each key's events of the batch are applied in order as one pool job (the
        processor is told when more of the key's events follow: ``Effects.more``), run
        at once when the pool has nothing queued; the future is done once every effect
        of them is stored and published.
        """
        if self._stopping:
            return _not_taken()
        by_key: dict[str, list[Event]] = {}
        for event in events:
            key = event.key
            if key is None:
                raise InvalidInput(f"{event.type} has no key")
            mine = by_key.get(key)
            if mine is None:
                by_key[key] = [event]
            else:
                mine.append(event)
        if self._prepare is not None:
            self._prepare(events)
        batch = _Batch(
            self,
            asyncio.get_running_loop().create_future(),
            len(by_key),
            events if self._settle is not None else None,
        )
        hint = self._priority_hint
        queued = 0
        try:
            for key, mine in by_key.items():
                entry = self._keys.get(key)
                priority = entry.priority if entry is not None else Priority.NORMAL
                if hint is not None:
                    for event in mine:
                        hinted = hint(event)
                        if hinted is not None:
                            priority = hinted
                            if entry is not None:
                                self._reprioritise(entry, hinted)
                            self.pool.set_priority(key, hinted)
                # at once when the pool has nothing waiting: no queue, worker and loop turn
                self.pool.run_now(
                    key, lambda k=key, m=mine: self._apply_batch(k, m, batch), priority=priority
                )
                queued += 1
        except BaseException as exc:
            # a closing pool takes no more: the keys not queued end the batch as failed
            for _ in range(len(by_key) - queued):
                batch.fail(exc)
            raise
        return batch.done

    def _reprioritise(self, entry: _Key, priority: int) -> None:
        if entry.priority != priority:
            entry.priority = priority
            self._mark(entry)  # the record keeps it: an unchanged event would not store it

    def _apply_batch(self, key: str, events: list[Event], batch: _Batch) -> Awaitable[None] | None:
        entry = self._keys.get(key)
        if entry is None:
            return self._load_and_apply_batch(key, events, batch)
        published = entry.published
        failures: list[Exception] = []
        applied = self._apply_all(entry, events, 0, entry.changed, failures)
        if isinstance(applied, int):
            _done_applying(batch, applied, failures, announced=entry.published != published)
            return None
        return self._await_batch(applied, batch, failures)

    async def _load_and_apply_batch(self, key: str, events: list[Event], batch: _Batch) -> None:
        failures: list[Exception] = []
        try:
            entry = await self._load(key, events[0])
            applied = self._apply_all(entry, events, 0, entry.changed, failures)
            generation = applied if isinstance(applied, int) else await applied
            self._unless_changed(entry)
        except BaseException as exc:
            batch.fail(exc)
            raise
        _done_applying(batch, generation, failures, announced=True)

    async def _await_batch(
        self, applied: Awaitable[int], batch: _Batch, failures: list[Exception]
    ) -> None:
        try:
            generation = await applied
        except BaseException as exc:
            batch.fail(exc)
            raise
        _done_applying(batch, generation, failures, announced=True)

    def _apply_all(
        self,
        entry: _Key,
        events: list[Event],
        start: int,
        generation: int,
        failures: list[Exception],
    ) -> int | Awaitable[int]:
        """Apply ``events[start:]`` to ``entry`` in order; return the last change's generation.

        An event the processor fails on is noted in ``failures`` and the key's later events
        go on, as when each is delivered alone: the batch then fails, and the bus hands
        every event of it to :meth:`handle` (the applied ones are duplicates by then).
        """
        followed = (
            _followed(events, lambda source: entry.applied.get(self._publisher(source), 0))
            if len(events) > 1
            else (False,)
        )
        # one Effects for the key's events, and their changes marked once, after the
        # last of them (nothing can commit between them: no await until then)
        effects = _Effects(self, entry, None)
        unmarked = False
        for i in range(start, len(events)):
            try:
                applied = self._apply_to(
                    entry, events[i], more=followed[i], effects=effects, mark=False
                )
            except Exception as exc:
                failures.append(exc)
                continue
            if applied is None:
                unmarked = True
                continue
            if not isinstance(applied, int):
                if unmarked:
                    generation = max(generation, self._mark(entry))
                return self._apply_rest(entry, events, i + 1, applied, failures)
            generation = max(generation, applied)
        if unmarked:
            # one mark for the changes of them all (a duplicate among them answered the
            # key's generation before it, which this one passes)
            generation = max(generation, self._mark(entry))
        self._time_applied(entry.partition)
        return generation

    async def _apply_rest(
        self,
        entry: _Key,
        events: list[Event],
        start: int,
        pending: Awaitable[int],
        failures: list[Exception],
    ) -> int:
        generation = await pending
        rest = self._apply_all(entry, events, start, generation, failures)
        return rest if isinstance(rest, int) else await rest

    def _apply_then_wait(
        self, key: str, event: Event, done: asyncio.Future
    ) -> Awaitable[None] | None:
        entry = self._keys.get(key)
        published = None if entry is None else entry.published
        try:
            applied = self._apply(key, event)
        except BaseException as exc:
            done.set_exception(exc)
            raise
        if isinstance(applied, int):
            self._time_applied(entry.partition)
            self._when_stored(applied, done, announced=entry.published != published)
            return None
        return self._await_then_wait(applied, done)

    async def _await_then_wait(self, applied: Awaitable[int], done: asyncio.Future) -> None:
        try:
            generation = await applied
        except BaseException as exc:
            if not done.done():
                done.set_exception(exc)
            raise
        self._when_stored(generation, done, announced=True)

    def _apply(self, key: str, event: Event) -> int | Awaitable[int]:
        """Apply ``event`` (plain when the key is in memory); return the change's generation."""
        entry = self._keys.get(key)
        if entry is None:
            return self._load_and_apply(key, event)
        return self._apply_to(entry, event)

    async def _load_and_apply(self, key: str, event: Event) -> int:
        entry = await self._load(key, event)
        applied = self._apply_to(entry, event)
        generation = applied if isinstance(applied, int) else await applied
        self._unless_changed(entry)
        return generation

    def _unless_changed(self, entry: _Key) -> None:
        """A key loaded from its retired record by events that changed nothing (copies of
        events it applied) leaves memory again, its record as it was."""
        if not entry.changed and not entry.indexed and self._keys.get(entry.key) is entry:
            self._forget(entry)

    def _apply_to(
        self,
        entry: _Key,
        event: Event,
        *,
        more: bool = False,
        rebuilt: bool = False,
        effects: _Effects | None = None,
        mark: bool = True,
    ) -> int | Awaitable[int] | None:
        """Apply ``event`` to ``entry``; return the generation of the change, or None when
        it applied with ``mark`` False (the caller marks the key once for several).

        ``effects``: the key's, reused for each of its events in turn (one per event
        otherwise).
        """
        entry.touched = time.monotonic()
        if entry.parked:
            # the key waits for its rebuild: its events wait behind the first, in order
            return self._park(entry, event, mark=mark)
        at = event.time
        times = self._event_times
        if at > times[entry.partition] and (self._market is None or event.type in self._market):
            times[entry.partition] = at
        seq = event.seq
        publisher = None
        late = False
        #: the seq only moves the applied one on by one: nothing else of the record changes
        in_step = True
        if seq is not None:
            # a dict look-up per event; the method on a source not seen yet
            publisher = self._publishers.get(event.source) or self._publisher(event.source)
            last = entry.applied.get(publisher, 0)
            if (
                not last
                and seq > 1
                and self._history is not None
                and not rebuilt
                and publisher not in self._partial
            ):
                return self._park(entry, event, mark=mark)
            if seq <= last:
                in_step = False
                late = _take_seq(entry.failed, publisher, seq) or (
                    event.redriven and _take_seq(entry.refused, publisher, seq)
                )
                if not late and entry.missing and _take_seq(entry.missing, publisher, seq):
                    late = True
                    self.metrics.reordered.inc()
                if not late:
                    self.metrics.duplicates.inc()
                    self.metrics.duplicate_events.inc()
                    return entry.changed
            elif entry.failed and _take_seq(entry.failed, publisher, seq):
                in_step = False  # a retry of the last one, nothing passed it over
            elif seq > last + 1 and (event.renumbered or publisher in self._partial):
                # its seqs start afresh, or skip the types not consumed here: nothing
                # between is missing and a first seq past 1 is no lost record (see the
                # module)
                in_step = False
            elif seq > last + 1:
                in_step = False
                # a key first seen a little past seq 1 may have had its first events
                # overtaken; one first seen further in joined its stream midway
                if last or seq <= UNAPPLIED_KEPT:
                    failed = entry.failed.get(publisher, ())  # kept there already
                    for skipped in range(max(last + 1, seq - UNAPPLIED_KEPT), seq):
                        if skipped not in failed:
                            _keep_seq(entry.missing, publisher, skipped)
                if not last and seq > UNAPPLIED_KEPT and publisher not in entry.failed:
                    # the record holds nothing of this publisher, whatever others it holds
                    self._unrecorded(entry, publisher, seq)
                if last:
                    self.metrics.gaps.inc()
                    log.warning(
                        "%s: seq gap for %s from %s: %d after %d",
                        self.config.service,
                        entry.key,
                        publisher,
                        seq,
                        last,
                    )
            elif not last:
                # a publisher's first position is stored, so a restored record knows it
                in_step = False
        state = self._state_of(entry)
        retire_ttl, entry.retire_ttl = entry.retire_ttl, None
        if effects is None:
            effects = _Effects(self, entry, event, more)
        else:
            effects.cause = event
            effects.more = more
        published, timer_at, priority = entry.published, entry.timer_at, entry.priority
        try:
            applied = self.processor.apply(state, event, effects)
        except InvalidInput as exc:
            self._take_back(entry, published, timer_at, priority, retire_ttl)
            return self._refuse(entry, event, publisher, f"invalid: {exc}", late=late)
        except Exception:
            self._take_back(entry, published, timer_at, priority, retire_ttl)
            if publisher is not None:
                # the bus tries it again, then dead-letters it; later events pass it over
                _keep_seq(entry.failed, publisher, seq)
                self._mark(entry)
            raise
        self._applied_uncounted += 1
        if applied is not UNCHANGED:
            entry.state = applied
        elif (
            in_step
            and retire_ttl is None
            and entry.indexed
            and entry.retire_ttl is None
            and entry.published == published
            and entry.timer_at == timer_at
            and entry.priority == priority
        ):
            # Nothing to store: the seq is stored with the key's next change (or when the
            # key is handed over). Only the seq's in-step move is left unstored, so a
            # crash leaves the record's applied seq behind by events that changed
            # nothing: their redeliveries apply them again, harmlessly, and the next
            # event counts a gap over the ones acked (see the module).
            if publisher is not None:
                entry.applied[publisher] = seq
                entry.lagging = True
            # like a duplicate: done once the key's changes before it are stored
            return entry.changed
        if event.redriven:
            self.metrics.redriven.inc()
        if publisher is not None and not late:
            entry.applied[publisher] = seq
        return self._mark(entry) if mark else None

    # ---------------------------------------------------------------- rebuilds

    def _park(self, entry: _Key, event: Event, *, mark: bool) -> int | None:
        """Keep ``event`` with the key's record until the key is rebuilt: its delivery is
        done once that is stored, so the key's wait holds nothing of its partition's
        window. The first event parked starts the key's rebuild."""
        first = not entry.parked
        entry.parked.append((entry.park_next, event))
        entry.park_next += 1
        # a key with events still to apply is not retiring: its record must stay
        entry.retire_ttl = None
        if first:
            log.warning(
                "%s: %s has no record of %s's events before seq %d: rebuilding it from "
                "them; its events wait with its record meanwhile",
                self.config.service, entry.key, source_service(event.source), event.seq,
            )  # fmt: skip
            self._start_rebuild(entry)
        return self._mark(entry) if mark else None

    def _start_rebuild(self, entry: _Key) -> None:
        if entry.rebuilding is None and not self._stopping:
            entry.rebuilding = asyncio.ensure_future(self._rebuild(entry))

    @staticmethod
    def _stop_rebuilding(entry: _Key) -> None:
        if entry.rebuilding is not None:
            entry.rebuilding.cancel()
            entry.rebuilding = None

    async def _rebuild(self, entry: _Key) -> None:
        """Read the history the key's first parked event waits for, outside the pool: a
        wait for Postgres holds no worker and is not hung however long it lasts, and a
        failure of the read itself is tried :data:`REBUILD_ATTEMPTS` times. Then the key's
        turn applies it and the parked events (:meth:`_rebuilt`)."""
        assert self._history is not None
        _, first = entry.parked[0]
        publisher = self._publisher(first.source)
        history: Sequence[Event] | None = None
        failure: Exception | None = None

        def waited() -> None:
            self.metrics.store_retries.inc()

        pauses = self._backoff.pauses()
        for attempt in range(1, REBUILD_ATTEMPTS + 1):
            try:
                history = await wait_out(
                    lambda: self._history(entry.key, publisher, first.seq),
                    waiter=self.config.service,
                    what=f"rebuilding {entry.key}",
                    backoff=self._backoff,
                    after_pause=waited,
                )
                break
            except Exception as exc:
                failure = exc
                log.warning("%s: reading the history of %s failed (attempt %d/%d): %r",
                            self.config.service, entry.key, attempt, REBUILD_ATTEMPTS,
                            exc)  # fmt: skip
                if attempt < REBUILD_ATTEMPTS:
                    await asyncio.sleep(next(pauses))
        if entry.gone:
            return
        with contextlib.suppress(PoolClosed):
            self.pool.post(
                entry.key,
                lambda: self._rebuilt(entry, first, history, failure),
                priority=entry.priority,
            )

    async def _rebuilt(
        self,
        entry: _Key,
        first: Event,
        history: Sequence[Event] | None,
        failure: Exception | None,
    ) -> None:
        """On the key's turn: apply its ``history`` before ``first`` (nothing announced:
        what it caused went out before), then its parked events in order, as an unbroken
        run would have; with no history (its read failed), dead-letter them instead."""
        entry.rebuilding = None
        if entry.gone or not entry.parked:
            return
        if entry.parked[0][1] is not first:
            self._start_rebuild(entry)
            return
        if history is None:
            await self._give_up(entry, failure)
            return
        publisher = self._publisher(first.source)
        replayed = 0
        for past in history:
            seq = past.seq
            if seq is None or seq >= first.seq or seq <= entry.applied.get(publisher, 0):
                continue
            state = self._state_of(entry)
            try:
                applied = self.processor.apply(
                    state, past, _Effects(self, entry, past, True, silent=True)
                )
                if applied is not UNCHANGED:
                    entry.state = applied
            except InvalidInput:
                _keep_seq(entry.refused, publisher, seq)  # dead-lettered when it came
            except Exception:
                log.exception("%s: rebuilding %s: seq %d of %s failed; passed over",
                              self.config.service, entry.key, seq, publisher)  # fmt: skip
            entry.applied[publisher] = seq
            replayed += 1
        if replayed:
            # what the key published before is unknown: beside the floor (a new record
            # starts above it), its seqs go on past what it may have used if it published
            # at most one event per input, which holds where the floor was lost too
            if entry.applied[publisher] > entry.published:
                entry.published = entry.renumbered_from = entry.applied[publisher]
            self.metrics.rebuilt.inc()
            log.warning(
                "%s: %s had no record; rebuilt from %d stored events of %s before seq %d",
                self.config.service, entry.key, replayed, publisher, first.seq,
            )  # fmt: skip
        parked, entry.parked = entry.parked, []
        for i, (field, event) in enumerate(parked):
            try:
                applied = self._apply_to(entry, event, rebuilt=i == 0)
                if applied is not None and not isinstance(applied, int):
                    await applied
            except Exception as exc:
                # its delivery was done when it was parked: the bus will not try it again
                await self._dead_letter(entry, event, f"failed once its key was rebuilt: {exc!r}")
            if entry.parked:
                # it waits for another publisher's history: it and the events after it
                # stay parked, in the fields they are stored in
                entry.park_next -= 1
                entry.parked = [(field, event), *parked[i + 1 :]]
                break
        self._time_applied(entry.partition)
        self._mark(entry)
        # no delivery waits for it: stored and announced by a commit of its own
        self._commits.kick()
        if entry.timer is None and entry.timer_at is not None and not entry.parked:
            self._arm(entry, entry.timer_at)  # it came due while the key waited

    async def _give_up(self, entry: _Key, failure: Exception | None) -> None:
        """Dead-letter the parked events of a key whose history cannot be read, as the
        bus would their deliveries had they failed: a redrive parks them again."""
        parked = list(entry.parked)
        for _, event in parked:
            await self._dead_letter(
                entry, event, f"its key's history could not be read: {failure!r}"
            )
        del entry.parked[: len(parked)]
        self._mark(entry)
        self._commits.kick()
        if entry.parked:
            self._start_rebuild(entry)

    async def _dead_letter(self, entry: _Key, event: Event, reason: str) -> None:
        log.error("%s: %s of %s dead-lettered: %s", self.config.service, event.type,
                  entry.key, reason)  # fmt: skip
        # its delivery is done already: nothing would try it again, so every failure waits
        await self._send_to_dead_letters(event, reason, key=None)

    async def _send_to_dead_letters(self, event: Event, reason: str, *, key: str | None) -> None:
        await self._retry(
            lambda: self.bus.dead_letter(
                encode_event(event),
                service=self.config.service,
                reason=reason,
                event_type=event.type,
            ),
            "dead-lettering",
            key=key,
        )

    async def _unpark(self, entry: _Key, record: Record, what: str) -> None:
        """Read back the parked events of a stored record."""
        if record.parked_to <= record.parked_from:
            return
        fields = await self._retry(
            lambda: self.store.hgetall(self._parked_prefix + entry.key), what, key=entry.key
        )
        entry.parked = sorted(
            (int(field), decode_event(raw))
            for field, raw in fields.items()
            if record.parked_from <= int(field) < record.parked_to
        )
        entry.park_next = record.parked_to
        entry.parked_stored = (record.parked_from, record.parked_to)

    async def _refuse(
        self, entry: _Key, event: Event, publisher: str | None, reason: str, *, late: bool
    ) -> int:
        """Dead-letter an event the processor refused; its seq counts as applied."""
        self.metrics.invalid.inc()
        log.warning("%s: %s %s for %s", self.config.service, reason, event.type, entry.key)
        await self._send_to_dead_letters(event, reason, key=entry.key)
        _still_held(entry)
        if publisher is not None:
            _keep_seq(entry.refused, publisher, event.seq)
            if not late:
                entry.applied[publisher] = event.seq
        return self._mark(entry)

    def _publisher(self, source: str) -> str:
        publisher = self._publishers.get(source)
        if publisher is None:
            publisher = self._publishers[source] = source_service(source)
        return publisher

    def _unrecorded(self, entry: _Key, publisher: str, seq: int) -> None:
        """The key's record holds nothing of ``publisher`` and its first event from it is
        seq ``seq``: the state lacks the publisher's events before it (a store that lost
        the record, or a consumer that joined mid-stream)."""
        self.metrics.unrecorded.inc()
        count = int(self.metrics.unrecorded._value.get())
        if due_to_say(count - 1, count):
            log.error(
                "%s: %s's record holds nothing of %s but its first event from it is seq %d: "
                "the state goes on without the events before it (%d unrecorded starts so far)",
                self.config.service, entry.key, publisher, seq, count,
            )  # fmt: skip

    def _fire(self, key: str) -> int:
        entry = self._keys.get(key)
        if entry is None or entry.gone or self._stopping:
            return self._commits.changed
        entry.timer = None
        if entry.parked:
            return self._commits.changed  # it fires after the events it waits behind
        entry.timer_at = None
        entry.touched = time.monotonic()
        state = self._state_of(entry)
        entry.retire_ttl = None
        published, priority = entry.published, entry.priority
        try:
            entry.state = self.processor.fire(state, _Effects(self, entry, None))
        except Exception:
            self._take_back(entry, published, None, priority, None)
            raise
        self.metrics.timers.inc()
        return self._mark(entry)

    def _take_back(
        self,
        entry: _Key,
        published: int,
        timer_at: float | None,
        priority: int,
        retire_ttl: float | None,
    ) -> None:
        """Undo what an apply or fire that raised asked for: the events it emitted are
        not published, its timer, priority and retirement do not stand."""
        emitted = entry.published - published
        if emitted:
            # nothing awaits inside a processor: its events are the outbox's last ones
            del entry.outbox[-emitted:]
            entry.published = published
        if entry.timer_at != timer_at:
            if timer_at is None:
                self._disarm(entry)
            else:
                self._arm(entry, timer_at)
        if entry.priority != priority:
            entry.priority = priority
            self.pool.set_priority(entry.key, priority)
        entry.retire_ttl = retire_ttl

    def _state_of(self, entry: _Key) -> Any:
        if entry.state is None:
            entry.state = self._decode(entry.key, entry.raw)
            entry.raw = None
        return entry.state

    def _decode(self, key: str, raw: bytes | None) -> Any:
        if raw is None:
            return self.processor.initial(key)
        try:
            return self.processor.decode(raw)
        except StaleState as exc:
            log.info("%s: stored state of %s not used: %s", self.config.service, key, exc)
            return self.processor.initial(key)

    def _mark(self, entry: _Key) -> int:
        # GroupCommit.change without the call: one per applied event
        commits = self._commits
        entry.changed = commits.changed = changed = commits.changed + 1
        self._dirty[entry.key] = entry
        return changed

    # ---------------------------------------------------------------- timers

    def _arm(self, entry: _Key, at: float) -> None:
        if entry.timer is not None:
            if entry.timer_at == at:
                return
            entry.timer.cancel()
            entry.timer = None
        entry.timer_at = at
        if entry.partition in self.owned and not self._stopping:
            entry.timer = self.clock.call_at(at, lambda key=entry.key: self._timer_due(key))

    def _disarm(self, entry: _Key) -> None:
        self._cancel_timer(entry)
        entry.timer_at = None

    @staticmethod
    def _cancel_timer(entry: _Key) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None

    def _timer_due(self, key: str) -> Awaitable[None] | None:
        if self._stopping:
            return None
        entry = self._keys.get(key)
        if entry is not None and entry.timer_at is not None:
            if self.now(entry.partition) < entry.timer_at:
                # due on the clock, not yet in the market's time: the key's events up to
                # it may still be queued
                entry.timer = self._wait(entry, entry.timer_at)
                return None
        priority = entry.priority if entry is not None else Priority.NORMAL
        done = asyncio.get_running_loop().create_future()

        def fire() -> None:
            try:
                generation = self._fire(key)
            except Exception:
                # the pool logs and counts it; the timer is spent and time goes on
                done.set_result(None)
                raise
            self._when_stored(generation, done, announced=True)

        self.pool.post(key, fire, priority=max(priority, Priority.HIGH))
        # a ReplayClock awaits it: the timer's effects are out when time moves on
        return done

    def _wait(self, entry: _Key, at: float) -> TimerHandle:
        """Hold the key's timer at ``at`` until its partition's time reaches it; the
        handle cancels it."""
        key = entry.key
        handle = TimerHandle(at, lambda: self._timer_due(key))
        waiting = self._waiting.setdefault(entry.partition, [])
        heapq.heappush(waiting, (at, next(self._waiting_order), handle))
        self._look_at_waiting()
        return handle

    def _look_at_waiting(self) -> None:
        """Look at the waiting timers again when the first may be due, within
        :data:`WAIT_CHECK_S` (the market's time may run faster than the clock)."""
        for partition, waiting in list(self._waiting.items()):
            while waiting and waiting[0][2].cancelled:
                heapq.heappop(waiting)
            if not waiting:
                del self._waiting[partition]
        if self._waiting_check is not None or self._stopping or not self._waiting:
            return
        wait = WAIT_CHECK_S
        for partition, waiting in self._waiting.items():
            wait = min(wait, max(waiting[0][0] - self.now(partition), _WAIT_MIN_S))
        self._waiting_check = self.clock.call_later(wait, self._waiting_due)

    def _waiting_due(self) -> Awaitable[Any] | None:
        """Fire the waiting timers their partitions' time has reached, in time order."""
        self._waiting_check = None
        if self._stopping:
            return None
        reached = []
        for partition, waiting in self._waiting.items():
            now = self.now(partition)
            while waiting and waiting[0][0] <= now:
                at, order, handle = heapq.heappop(waiting)
                if not handle.cancelled:
                    reached.append((at, order, handle))
        reached.sort()  # each order is its own: the handles are never compared
        self._look_at_waiting()
        fired = [done for _, _, handle in reached if (done := handle.callback()) is not None]
        # a ReplayClock awaits them: the timers' effects are out when time moves on
        return asyncio.gather(*fired, return_exceptions=True) if fired else None

    # ---------------------------------------------------------------- storing

    def _when_stored(self, generation: int, done: asyncio.Future, *, announced: bool) -> None:
        """Resolve ``done`` once the changes up to ``generation`` are stored, and if the
        change ``announced`` events, once they are published too.

        A change that announced nothing is done when written: a cycle of services on a
        synchronous bus (activity answers features inside its publication) then never
        waits for a publication that waits for it.
        """
        if self._applied_uncounted:
            self.metrics.applied.inc(self._applied_uncounted)
            self._applied_uncounted = 0
        if self._abandoned:
            done.cancel()
            return
        if announced:
            if self._announced >= generation:
                done.set_result(None)
                return
            self._announce_waiters.append((generation, done))
            self._commits.kick()
        else:
            self._commits.when_stored(generation, done)

    async def _until_stored(self, generation: int) -> None:
        done = asyncio.get_running_loop().create_future()
        self._when_stored(generation, done, announced=True)
        await done

    async def _write(self, generation: int) -> None:
        """Write the dirty keys (the changes up to ``generation``): the commit's write.
        Their publication follows, in the order of the writes."""
        dirty, self._dirty = self._dirty, {}
        entries = [e for e in dirty.values() if not e.gone]
        started = time.perf_counter()
        try:
            batch, events, published, stored = self._batch(entries)
        except _Unencodable as failure:
            # a key whose state or view cannot be encoded: the deliveries waiting for this
            # commit fail (the bus hands them back); the other keys are written by the
            # next one, and the key is dropped from memory, its events since its last
            # write applied again to its stored record when they come back (the bus
            # dead-letters one that fails every time)
            bad = failure.entry
            log.error("%s: %s cannot be stored, its changes since its last write dropped: %r",
                      self.config.service, bad.key, failure.error)  # fmt: skip
            for entry in entries:
                if entry is not bad:
                    self._dirty.setdefault(entry.key, entry)
            self._forget(bad)
            # the waiters of this commit's changes, not those of the commits written
            # before it, whose publication may be under way
            written = self._commits.stored
            earlier = [w for w in self._announce_waiters if w[0] <= written]
            taken = [w for w in self._announce_waiters if w[0] > written]
            self._announce_waiters = earlier + wake(taken, generation, failure.error)
            # this commit took every change made: one more, so the next commit follows at
            # once (the other keys) and a wait for all to be stored (a flush, a hand-over)
            # ends with it
            self._commits.change()
            raise failure.error from None
        if self._before_write is not None:
            # after the encoding: what the encoded states no longer hold is handed out by
            # now
            await self._retry(self._before_write, "storing what the keys handed out")
        await self._retry(lambda: self._store_commit(batch), "storing")
        # as written, not as now: a key retired or revived while the write was under way
        # is written again by the next commit, which must know this one; unless the store
        # lost its contents since this commit began (its keys are written back as new)
        if self._rewriting is None or generation >= self._rewriting:
            for entry, retired, ttl in stored:
                entry.indexed = not retired
                entry.stored_ttl = ttl
        for entry in entries:
            if entry.retire_ttl is not None and not entry.outbox_stored:
                self._retire(entry)  # stored with nothing left to publish
        self.flushes += 1
        self.metrics.commit_keys.observe(len(entries))
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self._unannounced.append((entries, events, published, generation))
        if self._announcing is None:
            self._announcing = asyncio.get_running_loop().create_task(self._announce())

    async def _store_commit(self, batch: WriteBatch) -> None:
        """Write a commit; one the store refuses for a key of the wrong kind is counted,
        and said in words an operator acts on (it is retried until the key goes)."""
        try:
            await self.store.write(batch)
        except WrongKind as exc:
            self.metrics.stalled_commit(exc.kind)
            raise WrongKind(
                f"{exc} (written by something else?); every commit of {self.config.service} "
                "here waits, retried, until that key is deleted or holds a hash; its "
                "events are not dead-lettered, as their state would be lost",
                key=exc.key,
                kind=exc.kind,
            ) from exc

    def _batch(
        self, entries: list[_Key]
    ) -> tuple[WriteBatch, list[Event], list[tuple[_Key, int]], list[tuple[_Key, bool, float]]]:
        """The write of ``entries``, the events it hands to publication (per key), and
        each key as written (retired or not, and the TTL of its record)."""
        batch = WriteBatch()
        index: dict[str, dict[str, HashValue]] = {}
        handed: list[tuple[_Key, int]] = []
        stored: list[tuple[_Key, bool, float]] = []
        events: list[Event] = []
        encode = self.processor.encode
        views = self._views
        live_ttl = self.config.live_ttl_s
        #: partition -> its time, read once per commit
        times: dict[int, float] = {}
        # every key encoded before any is marked written: one that cannot be leaves the
        # others as they were, for the next commit
        encoded = []
        for entry in entries:
            now = times.get(entry.partition)
            if now is None:
                now = times[entry.partition] = self._record_time(entry.partition)
            try:
                outbox = entry.outbox
                retired = entry.retire_ttl is not None
                record = Record(
                    state=encode(entry.state) if entry.state is not None else entry.raw,
                    applied=entry.applied,
                    published=entry.published,
                    outbox=[encode_event(e) for e in outbox],
                    timer=entry.timer_at,
                    priority=entry.priority,
                    retired=retired,
                    refused=entry.refused,
                    failed=entry.failed,
                    missing=entry.missing,
                    time=now,
                    parked_from=entry.parked[0][0] if entry.parked else 0,
                    parked_to=entry.park_next if entry.parked else 0,
                )
                raw_record = _encode_record(record)
                viewed = (
                    views(entry.key, entry.state, entry.published, outbox)
                    # nothing is shown of a key waiting for its history from a state
                    # without it
                    if views is not None and entry.state is not None and not entry.parked
                    else None
                )
            except Exception as exc:
                raise _Unencodable(entry, exc) from exc
            encoded.append((entry, raw_record, viewed))
        for entry, raw_record, viewed in encoded:
            outbox = entry.outbox
            retired = entry.retire_ttl is not None
            ttl = entry.retire_ttl if retired else live_ttl
            entry.lagging = False
            key = entry.key
            batch.values[self._key_prefix + key] = (raw_record, ttl)
            stored.append((entry, retired, ttl))
            if entry.parked or entry.parked_stored[1]:
                self._write_parked(batch, entry, ttl)
            if viewed is not None:
                for view_key, fields in viewed.items():
                    batch.hset(view_key, fields)
                    if ttl != entry.stored_ttl:
                        batch.expire(view_key, ttl)
            if retired:
                if entry.published > self._floors.get(entry.partition, 0):
                    # stored with the record it covers: a key that expires has raised it
                    self._floors[entry.partition] = entry.published
                    self._write_floor(batch, entry.partition)
                if entry.indexed:
                    # a retired key is loaded by its next event, never restored: its
                    # index entry would stay for ever, one per key the service saw
                    batch.hdel(f"{self._index_prefix}{entry.partition}", (key,))
            elif not entry.indexed:
                index.setdefault(f"{self._index_prefix}{entry.partition}", {})[key] = b"1"
            entry.outbox_stored = bool(outbox)
            # what an earlier batch handed over is published by that batch
            fresh = len(outbox) - entry.handed
            if fresh:
                events.extend(outbox[entry.handed :])
                entry.handed = len(outbox)
                handed.append((entry, fresh))
        if index:
            batch.hashes.update(index)
        if self._floors_lost:
            self._floors_lost = False
            for partition, floor in self._floors.items():
                if floor:
                    self._write_floor(batch, partition)
        return batch, events, handed, stored

    def _write_parked(self, batch: WriteBatch, entry: _Key, ttl: float | None) -> None:
        """Store the parked events not stored yet, remove those applied: each is written
        once, however long the key waits."""
        low, high = (entry.parked[0][0], entry.park_next) if entry.parked else (0, 0)
        stored_low, stored_high = entry.parked_stored
        if (low, high) == (stored_low, stored_high):
            return
        key = self._parked_prefix + entry.key
        applied = [str(f) for f in range(stored_low, stored_high) if not low <= f < high]
        if applied:
            batch.hdel(key, applied)
        fresh = {
            str(f): encode_event(event)
            for f, event in entry.parked
            if not stored_low <= f < stored_high
        }
        if fresh:
            batch.hset(key, fresh)
            batch.expire(key, ttl)
        entry.parked_stored = (low, high)

    def _write_floor(self, batch: WriteBatch, partition: int) -> None:
        batch.set(self._floor_key(partition), b"%d" % self._floors[partition])

    async def _announce(self) -> None:
        """Publish written batches in the order they were written, all that wait at once."""
        try:
            while self._unannounced:
                written, self._unannounced = self._unannounced, []
                events = [e for batch in written for e in batch[1]]
                if events:
                    started = time.perf_counter()
                    await self._retry(lambda e=events: self.bus.publish_many(e), "publishing")
                    self.metrics.publish_seconds.observe(time.perf_counter() - started)
                    if self._on_published is not None:
                        self._on_published(events)
                for entries, _, handed, generation in written:
                    for entry, count in handed:
                        del entry.outbox[:count]
                        entry.handed -= count
                    for entry in entries:
                        retiring = (
                            entry.retire_ttl is not None and entry.outbox_stored and not entry.gone
                        )
                        if retiring and self._dirty.get(entry.key) is not entry:
                            # it is stored once more without what was just published, so a
                            # key loaded again announces nothing twice; it leaves memory now,
                            # or once that write is stored if work of it is under way
                            self._mark(entry)
                            if not self.pool.has_work(entry.key):
                                self._cancel_timer(entry)
                                self._leave(entry)
                    self._announced = max(self._announced, generation)
                self._announce_waiters = wake(self._announce_waiters, self._announced)
                if not self._stopping:
                    self._commits.kick()
        finally:
            self._announcing = None

    def _retire(self, entry: _Key, *, after_work: bool = False) -> None:
        # changed again since this commit began: the next one decides
        if self._dirty.get(entry.key) is entry:
            return
        if after_work:
            if entry.gone or entry.retire_ttl is None or entry.outbox_stored:
                return  # revived, or retired by a later commit
        elif self.pool.has_work(entry.key):
            # work of the key under way holds the entry across its waits: the key leaves
            # after it, unless it changed the key (a later commit decides then)
            with contextlib.suppress(PoolClosed):
                self.pool.post(
                    entry.key,
                    lambda: self._retire(entry, after_work=True),
                    priority=entry.priority,
                )
            return
        self._leave(entry)
        self._forget(entry)

    def _leave(self, entry: _Key) -> None:
        """A retired key leaves memory (counted once, however many writes it still takes)."""
        if self._keys.get(entry.key) is entry:
            del self._keys[entry.key]
            self.metrics.retired.inc()
            if self._on_forgotten is not None:
                self._on_forgotten(entry.key)

    def _forget(self, entry: _Key, *, replaced: bool = False) -> None:
        """Drop ``entry`` from memory; ``replaced``: by a newer one of its key, which stays."""
        entry.gone = True
        self._cancel_timer(entry)
        self._stop_rebuilding(entry)
        if self._keys.get(entry.key) is entry:
            del self._keys[entry.key]
            if self._on_forgotten is not None and not replaced:
                self._on_forgotten(entry.key)

    async def _retry(
        self, action: Callable[[], Awaitable[T]], what: str, *, key: str | None = None
    ) -> T:
        """``action``'s result once it succeeds: a dependency that fails is waited out.

        With ``key`` the action is that key's, on behalf of one event: a failure that is
        not a dependency's is raised (the event's delivery fails). Without, it is work
        of many keys (a commit, a publication, a restore): it is retried too.
        """
        config = self.config
        waited = False

        def after_pause() -> None:
            nonlocal waited
            waited = True
            self.metrics.store_retries.inc()
            if key is not None:
                # a load waiting for the store holds its key's task: waiting, not hung
                self.pool.still_working(key)

        result = await wait_out(
            action,
            waiter=config.service,
            what=what,
            backoff=self._backoff,
            retry_failures=key is None,
            after_pause=after_pause,
        )
        connections = self.store.connections
        if (waited or connections != self._connections) and self.check_epoch() is not None:
            # a store that was away may come back empty (a restart without persistence),
            # whether the wait was ours or its client's, which reconnects by itself
            self._connections = connections
        return result

    def check_epoch(self) -> asyncio.Future | None:
        """Find out (in the background) whether the store lost its contents; None if it
        is being found out already. Done after every wait for a dependency, after the
        store's client connected again, on every sweep and when partitions are assigned."""
        if self._checking_epoch is not None or self._stopping or self._epoch is None:
            return None
        self._checking_epoch = asyncio.ensure_future(self._check_epoch())
        return self._checking_epoch

    async def _check_epoch(self) -> None:
        try:
            current, _ = await self.store.epoch()
        except Exception as exc:
            log.warning("%s: reading the store's epoch failed: %r", self.config.service, exc)
            return
        finally:
            self._checking_epoch = None
        if current != self._epoch:
            self._epoch = current
            self._store_lost()

    def _store_lost(self) -> None:
        """The store lost its contents: write every key held here again, with its views
        and its partition index entry, as if it were new to the store."""
        self.metrics.store_losses.inc()
        held = [entry for entry in self._keys.values() if not entry.gone]
        for entry in held:
            self._state_of(entry)  # its views are written from the state
            entry.indexed = False
            entry.parked_stored = (0, 0)
            entry.stored_ttl = _LOST
            self._mark(entry)
        self._rewriting = self._commits.changed
        self._floors_lost = True
        log.error(
            "%s: the store lost its contents; writing back the %d keys held here (keys not "
            "held here, retired keys' records and other replicas' partitions, are gone)",
            self.config.service, len(held),
        )  # fmt: skip
        self._commits.kick()

    # ---------------------------------------------------------------- loading

    def _partition(self, key: str) -> int:
        return partition_of(key, self.bus.partitions)

    def _entry_from(self, key: str, record: Record) -> _Key:
        entry = _Key(key, self._partition(key), None, record.state)
        entry.applied = dict(record.applied)
        entry.refused = {p: list(seqs) for p, seqs in record.refused.items()}
        entry.failed = {p: list(seqs) for p, seqs in record.failed.items()}
        entry.missing = {p: list(seqs) for p, seqs in record.missing.items()}
        entry.published = record.published
        entry.priority = record.priority
        entry.indexed = not record.retired
        entry.stored_ttl = None if not record.retired else -1.0
        entry.touched = time.monotonic()
        return entry

    def _decode_stored(self, key: str, raw: bytes) -> Record | None:
        try:
            return _decode_record(raw)
        except msgspec.DecodeError as exc:
            log.error("%s: unreadable record of %s dropped: %s", self.config.service, key, exc)
            return None

    async def _load(self, key: str, first: Event) -> _Key:
        """A key not in memory, whose next event is ``first``: its stored record (a
        retired key) or a new one.

        A new record whose first event is not its publisher's seq 1, or is put back from
        the dead letters, may be a key whose record expired or was lost: what it
        published then is unknown, and consumers that remember it would drop seqs given
        again as duplicates. Its seqs start above the partition's floor, the highest seq
        a retired key of it published, as the feed's Sequencer starts a key it no longer
        holds above its own.
        """
        partition = self._partition(key)
        floor = self._floors.get(partition)
        if floor is not None:
            stored = await self._get(key)
        else:
            stored, raw = await self._retry(
                lambda: self.store.get_many((self._key_prefix + key, self._floor_key(partition))),
                "loading",
                key=key,
            )
            floor = self._take_floor(partition, raw)
        record = None if stored is None else self._decode_stored(key, stored)
        if record is not None:
            entry = self._entry_from(key, record)
            await self._unpark(entry, record, "loading")
            self._adopt(entry, record)
        else:
            entry = _Key(key, partition, self.processor.initial(key), None)
            if (first.seq != 1 or first.redriven) and floor:
                entry.published = entry.renumbered_from = floor
        self._keys[key] = entry
        return entry

    async def _get(self, key: str) -> bytes | None:
        return await self._retry(lambda: self.store.get(self._key_prefix + key), "loading", key=key)

    async def _load_floors(self, partitions: Iterable[int]) -> None:
        """Read the seq floors of ``partitions`` (another owner may have raised them)."""
        partitions = tuple(partitions)
        keys = [self._floor_key(p) for p in partitions]
        floors = await self._retry(lambda: self.store.get_many(keys), "restoring")
        for partition, raw in zip(partitions, floors, strict=True):
            self._take_floor(partition, raw)

    def _floor_key(self, partition: int) -> str:
        return f"{self._floor_prefix}{partition}"

    def _take_floor(self, partition: int, raw: bytes | None) -> int:
        """Hold the stored floor of ``partition``; one raised here since (a key retired
        while the floor was read, not yet written) is the higher one."""
        floor = self._floors[partition] = max(
            self._floors.get(partition, 0), 0 if raw is None else int(raw)
        )
        return floor

    def _adopt(self, entry: _Key, record: Record) -> None:
        """Take over a stored record's timer and unconfirmed outbox."""
        if record.outbox:
            entry.outbox = [decode_event(raw) for raw in record.outbox]
            self._mark(entry)
        if record.timer is not None:
            self._arm(entry, record.timer)
        if entry.parked:
            self._start_rebuild(entry)  # the one its last owner began

    async def assign(self, partitions: tuple[int, ...]) -> None:
        """Load the live keys of ``partitions`` and arm their timers (ownership hook)."""
        if self._stopping:
            return
        self.owned.update(partitions)
        checking = self.check_epoch()
        if checking is not None:
            await checking
        restored = 0
        await self._load_floors(partitions)
        for partition in partitions:
            index_key = f"{self._index_prefix}{partition}"
            listed = [
                m.decode() if isinstance(m, bytes) else m
                for m in await self._retry(lambda k=index_key: self.store.hgetall(k), "restoring")
            ]
            present: list[str] = []
            for start in range(0, len(listed), _RESTORE_CHUNK):
                chunk = listed[start : start + _RESTORE_CHUNK]
                keys = [self._key_prefix + k for k in chunk]
                raws = await self._retry(lambda k=keys: self.store.get_many(k), "restoring")
                for key, raw in zip(chunk, raws, strict=True):
                    if raw is None:
                        continue  # expired
                    present.append(key)
                    record = self._decode_stored(key, raw)
                    if record is not None and record.time > self._event_times[partition]:
                        # as far as the partition's market had been applied: restored
                        # timers wait for the backlog behind it (see the module's time)
                        self._event_times[partition] = record.time
                    if record is None or record.retired:
                        continue  # loaded when an event comes for it
                    old = self._keys.get(key)
                    if old is not None:
                        # the store is newer than what memory held
                        self._forget(old, replaced=True)
                    entry = self._entry_from(key, record)
                    await self._unpark(entry, record, "restoring")
                    self._keys[key] = entry
                    self._adopt(entry, record)
                    restored += 1
            if len(present) < len(listed):
                # only the owner writes a partition's index: drop the expired entries, in
                # one write (the live ones stay listed whatever becomes of this replica)
                expired = WriteBatch()
                expired.hdel(index_key, set(listed).difference(present))
                await self._retry(lambda b=expired: self.store.write(b), "indexing")
            self._time_applied(partition)  # the time restored moves on from here
        self.restored.update(p for p in partitions if p in self.owned)
        self.metrics.restored.inc(restored)
        log.info(
            "%s: partitions %s assigned, %d keys restored",
            self.config.service,
            partitions,
            restored,
        )
        await self.flush()

    async def revoke(self, partitions: tuple[int, ...]) -> None:
        """Hand ``partitions`` over: stop their timers, finish their work, store, forget."""
        lost = set(partitions)
        self.owned.difference_update(lost)
        self.restored.difference_update(lost)
        mine = [e for e in self._keys.values() if e.partition in lost]
        for entry in mine:
            self._cancel_timer(entry)
        # a no-op behind each key's queued work: when it has run, that work is done
        behind = []
        with contextlib.suppress(PoolClosed):
            for entry in mine:
                if self.pool.pending(entry.key):
                    behind.append(self.pool.submit(entry.key, _nothing, priority=Priority.URGENT))
        await asyncio.gather(*behind, return_exceptions=True)
        await self._hand_over(mine)
        for entry in mine:
            self._forget(entry)
        for partition in lost:
            self._floors.pop(partition, None)  # the next owner raises it from now on
            # assigned here again, it starts as on a first assignment, from its records'
            # time: the one it had moved on with the clock meanwhile, past the market its
            # next owner applied, is not its time any more
            self._event_times[partition] = self._seen[partition] = -math.inf
            self._own[partition] = self._told_floor[partition] = -math.inf
            self._waiting.pop(partition, None)
        self._latest_own = max(self._own)
        log.info(
            "%s: partitions %s revoked, %d keys handed over",
            self.config.service,
            partitions,
            len(mine),
        )

    async def _hand_over(self, entries: list[_Key]) -> None:
        """Store ``entries`` as the next owner should find them: outboxes published."""
        await self.flush()
        for entry in entries:
            if (entry.outbox_stored or entry.lagging) and not entry.gone:
                self._mark(entry)
        await self.flush()

    # ---------------------------------------------------------------- memory

    def _schedule_sweep(self) -> None:
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self.config.compact_interval_s, self._sweep)

    def _sweep(self) -> None:
        self.compact()
        self.check_epoch()
        self._schedule_sweep()

    def compact(self, idle_s: float | None = None) -> int:
        """Hold keys idle longer than ``idle_s`` as their encoded bytes; return how many."""
        horizon = time.monotonic() - (self.config.compact_after_s if idle_s is None else idle_s)
        processor = self.processor
        # idle in the market's time, its partition's: a key whose next events are queued
        # is not idle
        times: dict[int, float] = {}
        compacted = 0
        live = 0
        for entry in self._keys.values():
            if entry.state is None:
                compacted += 1
                continue
            if (
                entry.touched <= horizon
                and entry.key not in self._dirty
                and not self.pool.pending(entry.key)
            ):
                now = times.get(entry.partition)
                if now is None:
                    now = times[entry.partition] = self.now(entry.partition)
                # no time known: nothing is idle in it, the key is held as it is
                raw = processor.compact(entry.state, now) if now != -math.inf else None
                entry.raw = raw if raw is not None else processor.encode(entry.state)
                entry.state = None
                compacted += 1
            else:
                live += 1
        self.metrics.live_keys.set(live)
        self.metrics.compact_keys.set(compacted)
        return compacted

    # ---------------------------------------------------------------- reads

    def now(self, partition: int | None = None) -> float:
        """The consumer's time (see the module), of ``partition`` or (None) the latest
        of the partitions' own: the latest event time applied of the market's types,
        moved on with the clock since it was applied while no newer event comes, never
        past the clock, never back. A partition that knows none of its own is told the
        latest of the others', and no less from then; -inf before any has a time (a
        processor is told its event's then: :meth:`_first_time`)."""
        if partition is None:
            return self.clock.now() + self._latest_own
        return self._told_time(partition, hold=True)

    def time_of(self, key: str) -> float:
        """The time ``key`` is judged at (a read for views): its partition's (see
        :meth:`now`), or the clock's before any time is known; reading it holds the
        partition to no time."""
        now = self._told_time(self._partition(key), hold=False)
        return now if now != -math.inf else self.clock.now()

    def _told_time(self, partition: int, *, hold: bool) -> float:
        """The partition's time at the clock: its own, or the others' it is told while
        it knows none (``hold``: it is told no less from then), whichever is later."""
        clock = self.clock.now()
        if self._event_times[partition] != self._seen[partition]:
            self._take_in(partition, clock)
        own = self._own[partition]
        told = self._told_floor[partition]
        if own == -math.inf and self._latest_own > told:
            told = self._latest_own
            if hold:
                # its own first events, behind it, do not take back what it was told
                self._told_floor[partition] = told
        return clock + (own if own > told else told)

    def _take_in(self, partition: int, clock: float) -> None:
        """The partition's own time takes in its latest event time applied, read at
        ``clock``: never past the clock, and never back (an event older than where the
        time got to, one delayed past a quiet spell it moved on through, leaves it)."""
        latest = self._event_times[partition]
        self._seen[partition] = latest
        offset = latest - clock
        if offset > 0.0:
            offset = 0.0
        if offset > self._own[partition]:
            self._own[partition] = offset
            if offset > self._latest_own:
                self._latest_own = offset

    def _record_time(self, partition: int) -> float:
        """The time a record of ``partition`` keeps: its own, -inf while it knows none;
        never the others' it was told (restored as its own, it would hold its market's
        time, behind theirs after an outage, back to theirs)."""
        clock = self.clock.now()
        if self._event_times[partition] != self._seen[partition]:
            self._take_in(partition, clock)
        return clock + self._own[partition]

    def _first_time(self, event: Event | None) -> float:
        """What a processor is told is now before any partition has a time: the time of
        the event it applies (the clock's for a timer, or an event of no time), never
        past the clock. Told, not held: a type that does not carry the market's time may
        be ahead of it (a command on the critical lane, a migration overtaking its
        vectors), so the partition's time, by which its timers and compaction are judged
        and which its records keep, waits for the market's."""
        clock = self.clock.now()
        at = clock if event is None else event.time
        return at if -math.inf < at < clock else clock

    def _time_applied(self, partition: int) -> None:
        """The partition's time moves on with the clock from the events just applied: from
        now, not from when it is first asked for, which may be long after."""
        if self._event_times[partition] != self._seen[partition]:
            self._take_in(partition, self.clock.now())

    def lags(self) -> list[tuple[int, float]]:
        """Per partition owned that knows a time, the seconds its latest market event time
        applied (or restored) is behind the clock: the lag behind the market."""
        if self._stopping:
            return []
        clock = self.clock.now()
        times = self._event_times
        return [
            (partition, clock - times[partition] if times[partition] < clock else 0.0)
            for partition in sorted(self.owned)
            if times[partition] != -math.inf
        ]

    def rebuilding(self) -> int:
        """Keys whose events wait, parked, for their history to be read."""
        return 0 if self._stopping else sum(1 for e in self._keys.values() if e.parked)

    def state(self, key: str) -> S | None:
        """The key's state held here (None when not owned or not in memory)."""
        entry = self._keys.get(key)
        return None if entry is None else self._state_of(entry)

    def keys(self) -> Iterable[str]:
        return self._keys.keys()

    def __len__(self) -> int:
        return len(self._keys)

    def describe(self) -> dict[str, Any]:
        health = self.pool.health()
        rewriting = self._rewriting is not None and self._commits.stored < self._rewriting
        if not rewriting:
            self._rewriting = None
        return {
            **({"ready": False, "reason": "writing back what the store lost"} if rewriting else {}),
            "keys": len(self._keys),
            "compact": sum(1 for e in self._keys.values() if e.state is None),
            "partitions": sorted(self.owned),
            "pending_changes": len(self._dirty),
            "rebuilding": self.rebuilding(),
            "flushes": self.flushes,
            **self.metrics.counts(),
            "pool": {
                "workers": health.workers,
                "alive": health.alive,
                "busy": health.busy,
                "queue_depth": health.queue_depth,
                "hung_tokens": list(health.hung_tokens),
                "restarts": health.restarts,
            },
        }


class _Unencodable(Exception):
    """A key of a commit whose record or views cannot be encoded."""

    def __init__(self, entry: _Key, error: Exception):
        super().__init__(entry.key, error)
        self.entry = entry
        self.error = error


class _Dropped(RuntimeError):
    """A key left memory while work of it waited (its state could not be stored)."""


def _still_held(entry: _Key) -> None:
    """Raise if ``entry`` left memory while work of it waited: what that work applies
    would not be stored, so its delivery fails, to apply again to the stored record."""
    if entry.gone:
        raise _Dropped(f"{entry.key} left memory while its work waited")


class _Batch:
    """One batch handler call: its future, done once every key's events are stored."""

    __slots__ = ("_consumer", "announced", "done", "events", "generation", "left")

    def __init__(
        self,
        consumer: KeyedStatefulConsumer,
        done: asyncio.Future,
        keys: int,
        events: Sequence[Event] | None,
    ):
        self._consumer = consumer
        self.done = done
        self.left = keys
        self.generation = 0
        self.announced = False
        #: the delivery's events, settled once every key's work is over (None: not told)
        self.events = events

    def applied(self, generation: int, *, announced: bool) -> None:
        """One key's events are applied; the last key hands the batch to the commit."""
        self.left -= 1
        if generation > self.generation:
            self.generation = generation
        self.announced = self.announced or announced
        if not self.left:
            if self.events is not None:
                self._consumer._settle(self.events)
            if not self.done.done():
                self._consumer._when_stored(self.generation, self.done, announced=self.announced)

    def fail(self, exc: BaseException) -> None:
        self.left -= 1
        if not self.left and self.events is not None:
            self._consumer._settle(self.events)
        if not self.done.done():
            self.done.set_exception(exc)


def _not_taken() -> asyncio.Future:
    """A delivery a stopping consumer does not take: cancelled, so the bus hands it back
    unacked for the next consumer (never failed, which would dead-letter it)."""
    done = asyncio.get_running_loop().create_future()
    done.cancel()
    return done


def _done_applying(
    batch: _Batch, generation: int, failures: list[Exception], *, announced: bool
) -> None:
    """One key's part of a batch is applied: count it, or fail the batch (and the job)."""
    if failures:
        batch.fail(failures[0])
        raise failures[0]
    batch.applied(generation, announced=announced)


def _followed(events: list[Event], applied: Callable[[str], int]) -> list[bool]:
    """Per event: a later one of the same type and publisher follows that is no duplicate,
    of the events before it or of what the key has applied (``applied`` of a source)."""
    first = events[0]
    kind = first.type
    source = first.source
    before = first.seq
    for event in itertools.islice(events, 1, None):
        seq = event.seq
        if seq is None or before is None or seq <= before:
            break
        if event.type != kind or event.source != source:
            break
        before = seq
    else:
        # the usual batch: one type from one publisher, numbered upwards: the last is
        # new unless the key has applied it already (a redelivery)
        followed = [before > applied(source)] * len(events)
        followed[-1] = False
        return followed
    followed = [False] * len(events)
    later: dict[tuple[str, str], int | None] = {}
    for i in range(len(events) - 1, -1, -1):
        event = events[i]
        ident = (event.type, event.source)
        if ident in later:
            seq = later[ident]
            followed[i] = (
                seq is None
                or event.seq is None
                or (seq > event.seq and seq > applied(event.source))
            )
            if seq is not None and event.seq is not None and event.seq > seq:
                later[ident] = event.seq
        else:
            later[ident] = event.seq
    return followed


async def _nothing() -> None:
    return None


def _keep_seq(seqs_of: dict[str, list[int]], publisher: str, seq: int) -> None:
    """Remember ``seq`` of ``publisher`` (ascending, the newest kept)."""
    seqs = seqs_of.setdefault(publisher, [])
    if seq in seqs:
        return
    bisect.insort(seqs, seq)
    if len(seqs) > UNAPPLIED_KEPT:
        del seqs[0]


def _take_seq(seqs_of: dict[str, list[int]], publisher: str, seq: int) -> bool:
    """Forget ``seq`` of ``publisher``; True if it was remembered."""
    seqs = seqs_of.get(publisher)
    if not seqs or seq not in seqs:
        return False
    seqs.remove(seq)
    if not seqs:
        del seqs_of[publisher]
    return True
