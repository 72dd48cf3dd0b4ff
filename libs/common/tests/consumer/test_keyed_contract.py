"""One contract for the keyed stateful consumer, on both pairs of transports.

memory: the in-memory bus and store, on a ReplayClock; rabbitmq: RabbitMQ and Redis.
The processor under test records every seq it applies, so "in order, once" is read
straight off the stored state.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

import msgspec
import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from pumpflow.common.bus.abc import EventBus, Subscription
from pumpflow.common.bus.redrive import LetterFilter, redrive, redrive_letters
from pumpflow.common.bus.routing import partition_of
from pumpflow.common.clock import ReplayClock, WallClock
from pumpflow.common.consumer import (
    ConsumerMetrics,
    KeyedConsumerConfig,
    KeyedStatefulConsumer,
    Record,
)
from pumpflow.common.consumer.keyed import UNAPPLIED_KEPT, WAIT_CHECK_S
from pumpflow.common.dependencies import WAITS
from pumpflow.common.events import (
    Event,
    FeaturesUpdated,
    TokenMigrated,
    TokenTrade,
    decode_event,
    encode_event,
    make_event,
)
from pumpflow.common.keyed import UNCHANGED, Effects, InvalidInput
from pumpflow.common.priority import Priority
from pumpflow.common.state.abc import WRONG_KINDS, StateStore
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.state.redis import RedisStateStore
from pumpflow.common.testing import BusHarness, EventCollector, LosingStore, eventually

PARTITIONS = 4
START = 1_700_000_000.0
TIMER_DELAY = 30.0
RETIRE_TTL = 0.3
#: a consumer's stop at teardown, before it is abandoned instead
STOP_WITHIN_S = 20.0


class Applied(msgspec.Struct):
    seqs: list[int] = []
    fired: int = 0


class RecordingProcessor:
    """Keeps the seqs applied; announces each; arms a timer; retires on migration."""

    def __init__(self, *, timers: bool = False):
        self.timers = timers
        self.encoded = 0
        self.fired_keys: list[str] = []

    def initial(self, key: str) -> Applied:
        return Applied()

    def apply(self, state: Applied, event: Event, effects: Effects) -> Applied:
        if event.type == "token.migrated":
            effects.retire(RETIRE_TTL)
            return state
        if event.data.tokenAmount < 0:
            raise InvalidInput("negative tokenAmount")
        state.seqs.append(event.seq)
        effects.emit(
            FeaturesUpdated(
                mint=effects.key,
                feature_set_version="test",
                source_seq=event.seq,
                names=("n",),
                values=(float(len(state.seqs)),),
            ),
            time=event.time,
        )
        if self.timers:
            effects.set_timer(event.time + TIMER_DELAY)
        return state

    def fire(self, state: Applied, effects: Effects) -> Applied:
        state.fired += 1
        self.fired_keys.append(effects.key)
        return state

    def encode(self, state: Applied) -> bytes:
        self.encoded += 1
        return msgspec.msgpack.encode(state)

    def compact(self, state: Applied, now: float) -> bytes | None:
        return None

    def decode(self, raw: bytes) -> Applied:
        return msgspec.msgpack.decode(raw, type=Applied)


def trade(
    mint: str,
    seq: int,
    *,
    amount: float = 1000.0,
    at: float | None = None,
    source: str = "feed/test",
) -> Event:
    payload = TokenTrade(
        signature=f"sig-{mint}-{seq}",
        mint=mint,
        traderPublicKey=f"wallet-{seq % 7}",
        txType="buy",
        tokenAmount=amount,
        newTokenBalance=amount,
        bondingCurveKey="curve",
        vTokensInBondingCurve=1_000_000_000.0,
        vSolInBondingCurve=30.0,
        marketCapSol=30.0,
        solAmount=0.01,
    )
    return make_event(payload, source=source, time=at or START + seq, seq=seq)


def migrated(mint: str, seq: int) -> Event:
    payload = TokenMigrated(signature=f"mig-{mint}", mint=mint, txType="migrate")
    return make_event(payload, source="feed/test", time=START + seq, seq=seq)


@dataclass
class Pair:
    """Buses and a store of one transport pair; makes consumers and tears down."""

    transport: str
    namespace: str
    amqp_url: str
    redis_url: str
    clock: ReplayClock = field(default_factory=lambda: ReplayClock(start=START))
    consumers: list[KeyedStatefulConsumer] = field(default_factory=list)
    _buses: BusHarness | None = None
    _store: StateStore | None = None

    @property
    def store(self) -> StateStore:
        if self._store is None:
            if self.transport == "memory":
                self._store = MemoryStateStore(self.clock)
            else:
                self._store = RedisStateStore(url=self.redis_url, namespace=self.namespace)
        return self._store

    async def bus(self) -> EventBus:
        """A started bus: the one shared bus in memory, a connection of its own on RabbitMQ."""
        if self._buses is None:
            self._buses = BusHarness(
                self.transport,
                namespace=self.namespace,
                amqp_url=self.amqp_url,
                partitions=PARTITIONS,
            )
        return await self._buses.bus()

    async def consumer(
        self,
        processor: RecordingProcessor,
        *,
        bus: EventBus | None = None,
        store: StateStore | None = None,
        partial_publishers: tuple[str, ...] = (),
        market_types: tuple[str, ...] | None = None,
        **options,
    ) -> KeyedStatefulConsumer:
        consumer = KeyedStatefulConsumer(
            processor,
            KeyedConsumerConfig(
                service="keyed",
                patterns=("token.trade", "token.migrated"),
                window=16,
                partial_publishers=partial_publishers,
                market_types=market_types,
            ),
            bus=bus or await self.bus(),
            store=store or self.store,
            clock=self.clock,
            source="keyed/test",
            **options,
        )
        await consumer.start()
        self.consumers.append(consumer)
        return consumer

    async def record(self, mint: str) -> Record | None:
        raw = await self.store.get(f"keyed:key:{mint}")
        return None if raw is None else msgspec.msgpack.decode(raw, type=Record)

    async def applied(self, mint: str) -> list[int]:
        record = await self.record(mint)
        return [] if record is None else msgspec.msgpack.decode(record.state, type=Applied).seqs

    async def teardown(self) -> None:
        for consumer in self.consumers:
            try:
                # a test that failed may leave its consumer waiting out a store it stopped
                await asyncio.wait_for(consumer.stop(), STOP_WITHIN_S)
            except TimeoutError:
                await consumer.abandon()
        if self._buses is not None:
            await self._buses.teardown()
        if self._store is not None and self.transport == "rabbitmq":
            await self._store.delete_many(await self._store.scan_keys(""))
            await self._store.close()


PAIRS = [
    pytest.param("memory", id="memory"),
    pytest.param("rabbitmq", id="rabbitmq+redis", marks=[pytest.mark.rabbitmq, pytest.mark.redis]),
]


@pytest.fixture(params=PAIRS)
async def pair(request, namespace, amqp_url, redis_url):
    harness = Pair(request.param, namespace, amqp_url, redis_url)
    try:
        yield harness
    finally:
        await harness.teardown()


async def watch(bus: EventBus) -> EventCollector:
    """Collects the consumer's features.updated."""
    return await EventCollector("watcher").attach(bus, "features.updated")


MINTS = [f"mint{i:02d}pump" for i in range(8)]


async def test_each_key_applies_its_events_in_order_once_and_announces_them_in_order(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    await pair.consumer(RecordingProcessor())
    per_mint = 25
    events = [trade(m, s) for s in range(1, per_mint + 1) for m in MINTS]
    await bus.publish_many(events)
    await announced.wait_until(lambda c: all(c.count(key=m) >= per_mint for m in MINTS))
    for mint in MINTS:
        assert await pair.applied(mint) == list(range(1, per_mint + 1))
        out = announced.of(key=mint)
        assert [e.seq for e in out] == list(range(1, per_mint + 1))
        assert [e.data.source_seq for e in out] == list(range(1, per_mint + 1))
        assert all(e.source == "keyed/test" for e in out)
    record = await pair.record(MINTS[0])
    assert record.published == per_mint and record.applied == {"feed": per_mint}


async def test_a_duplicate_is_applied_and_announced_once(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    consumer = await pair.consumer(RecordingProcessor())
    mint = MINTS[0]
    first = trade(mint, 1)
    await bus.publish_many([first, trade(mint, 2), first, trade(mint, 2), trade(mint, 3)])
    # a barrier: the next event is announced only after the duplicates were handled
    await bus.publish(trade(mint, 4))
    await announced.wait_for(1, key=mint, where=lambda e: e.data.source_seq == 4)
    assert [e.data.source_seq for e in announced.of(key=mint)] == [1, 2, 3, 4]
    assert await pair.applied(mint) == [1, 2, 3, 4]
    assert consumer.metrics.duplicates._value.get() >= 2


async def test_a_batch_that_ends_with_a_duplicate_stores_what_it_applied(pair):
    consumer = await pair.consumer(RecordingProcessor())
    mint = MINTS[1]
    first, second = trade(mint, 1), trade(mint, 2)
    # one key's events of one batch, the last a duplicate: the batch is done once the
    # ones before it are stored
    await consumer.handle_batch([first, second, trade(mint, 3), second])
    assert await pair.applied(mint) == [1, 2, 3]
    await consumer.handle_batch([trade(mint, 4), first])
    assert await pair.applied(mint) == [1, 2, 3, 4]


async def test_an_invalid_event_is_dead_lettered_and_the_key_goes_on(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    await pair.consumer(RecordingProcessor())
    mint = MINTS[1]
    await bus.publish_many([trade(mint, 1), trade(mint, 2, amount=-5.0), trade(mint, 3)])
    await announced.wait_for(2, key=mint)
    assert await pair.applied(mint) == [1, 3]
    letters = []

    async def dead_lettered() -> bool:
        letters.extend(await bus.dead_letters("keyed"))
        return bool(letters)

    await eventually(dead_lettered, 10, what="the dead letter")
    assert len(letters) == 1 and "negative tokenAmount" in letters[0].reason
    record = await pair.record(mint)
    assert record.applied == {"feed": 3}


async def test_a_new_replica_restores_drops_redeliveries_and_publishes_the_stored_outbox(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    first = await pair.consumer(RecordingProcessor())
    mint, other = MINTS[2], MINTS[3]
    await bus.publish_many([trade(mint, s) for s in range(1, 11)])
    await announced.wait_for(10, key=mint)
    await first.stop()
    pair.consumers.remove(first)
    # What a replica that crashed after storing, before publishing, leaves behind.
    unpublished = make_event(
        FeaturesUpdated(
            mint=other, feature_set_version="test", source_seq=1, names=("n",), values=(1.0,)
        ),
        source="keyed/test",
        time=START,
        seq=1,
    )
    record = Record(
        state=msgspec.msgpack.encode(Applied(seqs=[1])),
        applied={"feed": 1},
        published=1,
        outbox=[encode_event(unpublished)],
    )
    await pair.store.set(f"keyed:key:{other}", msgspec.msgpack.encode(record))
    partition = partition_of(other, PARTITIONS)
    await pair.store.hset_many({f"keyed:partition:{partition}": {other: b"1"}})

    second_bus = await pair.bus()
    await pair.consumer(RecordingProcessor(), bus=second_bus)
    await announced.wait_for(1, key=other)
    # redeliveries of applied events, then new ones
    await bus.publish_many([trade(mint, s) for s in range(6, 16)])
    await bus.publish(trade(other, 2))
    await announced.wait_for(15, key=mint)
    await announced.wait_for(2, key=other)
    assert await pair.applied(mint) == list(range(1, 16))
    assert [e.seq for e in announced.of(key=mint)] == list(range(1, 16))
    assert await pair.applied(other) == [1, 2]
    assert [e.seq for e in announced.of(key=other)] == [1, 2]
    # what is stored was published: at most the key's last event is listed still
    assert len((await pair.record(other)).outbox) <= 1


class _HeldStore:
    """The store with its next write held until :meth:`release` (a slow Redis round trip)."""

    def __init__(self, store: StateStore, *, hold: bool = True):
        self._store = store
        self.holding = asyncio.Event()
        self._released = asyncio.Event()
        self._hold = hold

    def hold_next(self) -> None:
        """Hold the next write (the first is held unless made with ``hold=False``)."""
        self._hold = True

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    async def write(self, batch) -> None:
        if self._hold:
            self._hold = False
            self.holding.set()
            await self._released.wait()
        await self._store.write(batch)

    def release(self) -> None:
        self._released.set()


async def test_a_key_retired_while_its_first_write_is_under_way_leaves_the_index(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    held = _HeldStore(pair.store)
    processor = _RetireWatchingProcessor()
    await pair.consumer(processor, store=held)
    mint = MINTS[5]
    await bus.publish(trade(mint, 1))
    await held.holding.wait()  # the key's first write (which indexes it) is under way
    await bus.publish_many([trade(mint, 2), migrated(mint, 3)])
    await asyncio.wait_for(processor.retiring.wait(), 30)
    held.release()
    await announced.wait_for(2, key=mint)
    await eventually(lambda: _retired(pair, mint), what="the key's record retired")
    index = f"keyed:partition:{partition_of(mint, PARTITIONS)}"
    assert mint not in await pair.store.hgetall(index)


class _RetireWatchingProcessor(RecordingProcessor):
    def __init__(self):
        super().__init__()
        self.retiring = asyncio.Event()

    def apply(self, state: Applied, event: Event, effects: Effects) -> Applied:
        state = super().apply(state, event, effects)
        if event.type == "token.migrated":
            self.retiring.set()
        return state


async def _retired(pair, mint: str) -> bool:
    record = await pair.record(mint)
    return record is not None and record.retired and record.applied == {"feed": 3}


async def test_a_timer_due_on_the_clock_behind_the_market_waits_for_the_markets_time(pair):
    """400 s of the clock behind the market, a key's timer (30 s after its event) is due
    on the clock at once: it fires once the events applied, of any key of its partition,
    bring the partition's time to it, and not before."""
    processor = RecordingProcessor(timers=True)
    consumer = await pair.consumer(processor)
    await pair.clock.advance_to(START + 400)
    waiting, other = MINTS[1], MINTS[2]
    await consumer.handle_batch([trade(waiting, 1, at=START + 1)])
    assert consumer.now() == START + 1
    await pair.clock.advance(5 * WAIT_CHECK_S)  # it moves on with the clock meanwhile
    assert consumer.now() == pytest.approx(START + 1 + 5 * WAIT_CHECK_S)
    assert processor.fired_keys == []
    await consumer.handle_batch([trade(other, 1, at=START + 40)])
    assert consumer.now() == START + 40
    await pair.clock.advance(WAIT_CHECK_S)
    assert processor.fired_keys == [waiting]
    assert (await pair.record(waiting)).timer is None


class NowRecordingProcessor(RecordingProcessor):
    """Keeps, per key, the time it was told is now at its last apply."""

    def __init__(self, **options):
        super().__init__(**options)
        self.told: dict[str, float] = {}

    def apply(self, state: Applied, event: Event, effects: Effects) -> Applied:
        self.told[effects.key] = effects.now
        return super().apply(state, event, effects)


def _in_partition(partition: int, count: int = 1) -> list[str]:
    """``count`` keys of ``partition``."""
    keys = (f"mint-{i}-pump" for i in range(10_000))
    return [k for k in keys if partition_of(k, PARTITIONS) == partition][:count]


async def test_a_partition_behind_the_others_is_judged_by_its_own_time(pair):
    """400 s of the clock behind the market, one partition's events are far behind
    another's: its key's timer (30 s after its event) waits for its own partition's
    events to reach it, not the other's, and its keys are told their partition's time."""
    processor = NowRecordingProcessor(timers=True)
    consumer = await pair.consumer(processor)
    await pair.clock.advance_to(START + 400)
    behind, behind_too = _in_partition(1, 2)
    (ahead,) = _in_partition(3)
    await consumer.handle_batch([trade(behind, 1, at=START + 1)])
    await consumer.handle_batch([trade(ahead, 1, at=START + 100)])
    assert processor.told[ahead] == START + 100
    await pair.clock.advance(WAIT_CHECK_S)
    assert processor.fired_keys == []  # the other partition's time is past its timer
    await consumer.handle_batch([trade(behind_too, 1, at=START + 35)])
    assert processor.told[behind_too] == START + 35
    await pair.clock.advance(WAIT_CHECK_S)
    assert processor.fired_keys == [behind]
    # its record keeps its partition's time, where a replica taking it over starts from
    assert (await pair.record(behind)).time == pytest.approx(START + 35 + WAIT_CHECK_S)


async def test_a_partition_that_knows_no_time_yet_is_told_the_consumers(pair):
    """Its first event carries no market time (a migration, where only trades do): its
    key is told the time of the partitions that know one, as before it had its own. It
    holds that time: its own first trade, behind it, does not take it back."""
    processor = NowRecordingProcessor()
    consumer = await pair.consumer(processor, market_types=("token.trade",))
    await pair.clock.advance_to(START + 400)
    (trading,) = _in_partition(1)
    migrating, behind = _in_partition(3, 2)
    await consumer.handle_batch([trade(trading, 1, at=START + 50)])
    await consumer.handle_batch([migrated(migrating, 1)])
    assert processor.told[migrating] == START + 50
    await consumer.handle_batch([trade(behind, 1, at=START + 20)])
    assert processor.told[behind] == START + 50


async def test_a_partition_told_the_others_time_keeps_its_own_in_its_records(pair):
    """A partition that knew no time of its own was told the others'; its own first
    trade, behind that, is told no less, but its records keep the trade's time, the
    partition's own, and a replica taking it over starts from there, not from the
    others' time it was told."""
    market = ("token.trade",)
    processor = NowRecordingProcessor()
    first = await pair.consumer(processor, market_types=market)
    await pair.clock.advance_to(START + 400)
    (trading,) = _in_partition(1)
    migrating, behind = _in_partition(3, 2)
    await first.handle_batch([trade(trading, 1, at=START + 50)])
    await first.handle_batch([migrated(migrating, 1)])
    await first.handle_batch([trade(behind, 1, at=START + 20)])
    assert processor.told[behind] == START + 50
    await first.flush()
    assert (await pair.record(behind)).time == START + 20
    await first.stop()
    pair.consumers.remove(first)
    second = await pair.consumer(RecordingProcessor(), bus=await pair.bus(), market_types=market)
    await eventually(lambda: 3 in second.restored, what="partition 3 restored")
    assert second.now(3) == START + 20


async def test_an_event_applied_before_any_time_is_known_is_told_its_own_time(pair):
    """No partition knows a time (nothing applied, nothing restored): the first event, a
    migration where only trades carry the market's time, is told its own time, 400 s
    behind the clock, never a time before any. It does not become its partition's time
    (a type that overtakes the market may be ahead of it): the partition still knows
    none, its record says so, and its first trade is told the market's."""
    processor = NowRecordingProcessor()
    consumer = await pair.consumer(processor, market_types=("token.trade",))
    await pair.clock.advance_to(START + 400)
    migrating, trading = _in_partition(3, 2)
    await consumer.handle_batch([migrated(migrating, 1)])
    assert processor.told[migrating] == START + 1
    assert consumer.now(3) == -math.inf
    assert (await pair.record(migrating)).time == -math.inf
    await consumer.handle_batch([trade(trading, 1, at=START + 0.5)])
    assert processor.told[trading] == START + 0.5


class CompactionRecordingProcessor(RecordingProcessor):
    """Keeps the times it is told to compact keys at."""

    def __init__(self):
        super().__init__()
        self.compacted_at: list[float] = []

    def compact(self, state: Applied, now: float) -> bytes | None:
        self.compacted_at.append(now)
        return None


async def test_a_key_idle_before_any_time_is_known_is_held_as_it_is_not_compacted(pair):
    """No time known (its trades carry none of the market's here): a compaction finds
    nothing idle in the market's time, and tells the processor no time; the key is held
    encoded as it is, and its next event applies to it."""
    processor = CompactionRecordingProcessor()
    consumer = await pair.consumer(processor, market_types=("token.migrated",))
    (mint,) = _in_partition(2)
    await consumer.handle_batch([trade(mint, 1)])
    assert consumer.compact(idle_s=0.0) == 1
    assert processor.compacted_at == []
    await consumer.handle_batch([trade(mint, 2)])
    assert await pair.applied(mint) == [1, 2]


async def test_a_late_event_after_a_quiet_spell_does_not_take_the_time_back(pair):
    """Live, a partition's time moves on with the clock through ten quiet seconds; an
    event of it delayed five seconds then comes: the time told stays where it had got,
    and moves on from there, so nothing judged by it (timers, idleness) goes back."""
    processor = NowRecordingProcessor()
    consumer = await pair.consumer(processor)
    first, late = _in_partition(1, 2)
    await consumer.handle_batch([trade(first, 1, at=START)])
    assert processor.told[first] == START
    await pair.clock.advance_to(START + 10)
    await consumer.handle_batch([trade(late, 1, at=START + 5)])
    assert processor.told[late] == START + 10
    assert consumer.now(1) == START + 10
    assert consumer.now() == START + 10
    await pair.clock.advance(3)
    assert consumer.now(1) == START + 13


async def test_a_partition_that_knew_no_time_is_restored_knowing_none(pair):
    """A key stored while its partition knew no time of its own (told the others') is
    restored by the next owner as knowing none: the partition's own market events, far
    behind the others' after an outage, set its time, not the others' time the record
    was told."""
    # here the migrations carry the market's time, and the trades none
    market = ("token.migrated",)
    first = await pair.consumer(RecordingProcessor(), market_types=market)
    await pair.clock.advance_to(START + 400)
    (ahead,) = _in_partition(3)
    quiet, behind = _in_partition(1, 2)
    await first.handle_batch([migrated(ahead, 390)])
    await first.handle_batch([trade(quiet, 1, at=START + 10)])
    await first.flush()
    assert (await pair.record(quiet)) is not None
    await first.stop()
    pair.consumers.remove(first)
    processor = NowRecordingProcessor()
    second = await pair.consumer(processor, bus=await pair.bus(), market_types=market)
    await eventually(lambda: 1 in second.restored, what="partition 1 restored")
    await second.handle_batch([migrated(behind, 100)])
    assert processor.told[behind] == START + 100


def lags(registry: CollectorRegistry) -> dict[str, float]:
    """The keyed consumer's lag behind the market by partition, as scraped."""
    return {
        sample.labels["partition"]: sample.value
        for family in registry.collect()
        if family.name == "pumpflow_consumer_lag_seconds"
        for sample in family.samples
        if sample.labels["service"] == "keyed"
    }


async def test_the_lag_behind_the_market_is_read_per_partition_when_scraped(pair):
    """The clock minus the latest market event time a partition applied, read when
    scraped: it grows while nothing newer comes (a quiet market, or a stall), falls as a
    backlog is applied, and is shown for the partitions owned that know a time. A replica
    taking a partition over after an outage starts from its records' time."""
    registry = CollectorRegistry()
    metrics = ConsumerMetrics("keyed", registry=registry)
    first = await pair.consumer(RecordingProcessor(), metrics=metrics)
    (mint,) = _in_partition(1)
    await eventually(lambda: 1 in first.owned, what="partition 1 assigned")
    await pair.clock.advance_to(START + 400)
    assert lags(registry) == {}  # no time known yet
    await first.handle_batch([trade(mint, 1, at=START + 1)])
    assert lags(registry) == {"01": 399.0}
    await pair.clock.advance(5)
    assert lags(registry) == {"01": 404.0}
    await first.handle_batch([trade(mint, 2, at=START + 395)])
    assert lags(registry) == {"01": 10.0}
    await first.stop()
    pair.consumers.remove(first)
    assert lags(registry) == {}  # a stopped consumer says nothing
    await pair.clock.advance(600)  # an outage
    second = await pair.consumer(RecordingProcessor(), bus=await pair.bus(), metrics=metrics)
    await eventually(lambda: 1 in second.restored, what="partition 1 restored")
    assert lags(registry) == {"01": 610.0}
    await second.revoke((1,))
    assert "01" not in lags(registry)


class _HeldRestore:
    """The store with the next listing of one partition's index, once :meth:`hold` is
    called, held until :meth:`release` (a slow restore)."""

    def __init__(self, store: StateStore, index: str):
        self._store = store
        self._index = index
        self._hold = False
        self.holding = asyncio.Event()
        self._released = asyncio.Event()

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def hold(self) -> None:
        self._hold = True

    async def hgetall(self, key: str):
        if self._hold and key == self._index:
            self._hold = False
            self.holding.set()
            await self._released.wait()
        return await self._store.hgetall(key)

    def release(self) -> None:
        self._released.set()


async def test_a_partition_assigned_again_starts_from_its_records_not_its_old_time(pair):
    """400 s of the clock behind the market, a partition is revoked, and assigned back to
    the same replica 100 s of the clock later: until its records are restored it knows
    no time (its lag is not shown), then it has their time, not the one it had moved on
    with the clock meanwhile, so its key's timer (30 s after its event) still waits for
    the backlog."""
    registry = CollectorRegistry()
    processor = RecordingProcessor(timers=True)
    held = _HeldRestore(pair.store, "keyed:partition:1")
    consumer = await pair.consumer(
        processor, store=held, metrics=ConsumerMetrics("keyed", registry=registry)
    )
    await eventually(lambda: 1 in consumer.restored, what="partition 1 restored")
    await pair.clock.advance_to(START + 400)
    (mint,) = _in_partition(1)
    await consumer.handle_batch([trade(mint, 1, at=START + 1)])
    await consumer.revoke((1,))
    await pair.clock.advance(100)
    held.hold()
    assigning = asyncio.ensure_future(consumer.assign((1,)))
    await held.holding.wait()
    assert "01" not in lags(registry)
    held.release()
    await assigning
    assert lags(registry)["01"] == 499.0
    assert consumer.now(1) == START + 1
    await pair.clock.advance(WAIT_CHECK_S)
    assert processor.fired_keys == []


async def test_a_partition_assigned_again_is_not_told_the_others_time_it_was_told(pair):
    """A partition that knew no time of its own was told the others' (50 s behind the
    clock), then its own trade, far behind that, came; revoked and assigned back, it is
    told its records' time, its own, not the others' it was told before."""
    processor = NowRecordingProcessor()
    consumer = await pair.consumer(processor, market_types=("token.trade",))
    await pair.clock.advance_to(START + 400)
    (ahead,) = _in_partition(3)
    migrating, behind = _in_partition(1, 2)
    await consumer.handle_batch([trade(ahead, 1, at=START + 350)])
    await consumer.handle_batch([migrated(migrating, 1)])
    await consumer.handle_batch([trade(behind, 1, at=START + 1)])
    assert processor.told[behind] == START + 350
    await consumer.revoke((1,))
    await consumer.assign((1,))
    assert consumer.now(1) == START + 1


async def test_timers_run_on_the_owner_only_and_move_with_the_partition(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    leaving, staying = RecordingProcessor(timers=True), RecordingProcessor(timers=True)
    forgotten: list[str] = []
    first = await pair.consumer(leaving, on_forgotten=forgotten.append)
    await bus.publish_many([trade(m, 1) for m in MINTS])
    await announced.wait_until(lambda c: all(c.count(key=m) >= 1 for m in MINTS))
    assert forgotten == []
    # the partitions move: the first replica's timers stop, the next one's are armed
    await first.revoke(tuple(range(PARTITIONS)))
    assert len(first) == 0
    assert sorted(forgotten) == sorted(MINTS)  # what the service holds of them goes too
    await pair.consumer(staying, bus=bus if pair.transport == "memory" else await pair.bus())
    await pair.clock.advance(TIMER_DELAY + 2)
    assert leaving.fired_keys == []
    assert sorted(staying.fired_keys) == sorted(MINTS)
    for mint in MINTS:
        record = await pair.record(mint)
        assert msgspec.msgpack.decode(record.state, type=Applied).fired == 1
        assert record.timer is None


async def test_a_retired_key_leaves_memory_and_its_record_expires(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    forgotten: list[str] = []
    consumer = await pair.consumer(RecordingProcessor(), on_forgotten=forgotten.append)
    mint = MINTS[4]
    await bus.publish_many([trade(mint, 1), trade(mint, 2), migrated(mint, 3)])
    await announced.wait_for(2, key=mint)
    await eventually(lambda: mint not in consumer.keys())
    assert forgotten == [mint]
    record = await pair.record(mint)
    assert record is not None and record.retired and record.applied == {"feed": 3}
    # off the partition's index too, or the index would list every key ever seen
    index = f"keyed:partition:{partition_of(mint, PARTITIONS)}"

    async def indexed() -> bool:
        return mint in await pair.store.hgetall(index)

    assert not await indexed()
    # a late event loads the retired key again and revives it
    await bus.publish(trade(mint, 4))
    await announced.wait_for(3, key=mint)
    assert await pair.applied(mint) == [1, 2, 4]
    assert not (await pair.record(mint)).retired
    await eventually(indexed, 10, what="the revived key indexed again")
    await bus.publish(migrated(mint, 5))
    await eventually(lambda: mint not in consumer.keys())
    assert forgotten == [mint, mint]
    assert not await indexed()
    if pair.transport == "memory":
        await pair.clock.advance(RETIRE_TTL + 0.01)

    async def expired() -> bool:
        return await pair.record(mint) is None

    await eventually(expired, 10, what="the retired record to expire")


def _same_partition(mint: str, count: int) -> list[str]:
    """``count`` other keys of ``mint``'s partition."""
    partition = partition_of(mint, PARTITIONS)
    others = (f"{mint}-{i}" for i in range(10_000))
    return [k for k in others if partition_of(k, PARTITIONS) == partition][:count]


async def test_a_key_back_after_its_record_expired_numbers_above_what_it_published(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    first = await pair.consumer(RecordingProcessor())
    mint = MINTS[5]
    fresh, midway, redriven = _same_partition(mint, 3)
    await bus.publish_many([trade(mint, 1), trade(mint, 2), trade(mint, 3), migrated(mint, 4)])
    await announced.wait_for(3, key=mint)
    await eventually(lambda: mint not in first.keys())
    if pair.transport == "memory":
        await pair.clock.advance(RETIRE_TTL + 0.01)

    async def expired() -> bool:
        return await pair.record(mint) is None

    await eventually(expired, 10, what="the retired record to expire")
    # another replica, holding nothing in memory, owns the partition now
    await first.stop()
    await pair.consumer(
        RecordingProcessor(), bus=bus if pair.transport == "memory" else await pair.bus()
    )
    # the feed's seqs go on; the key's own start over from a new record
    late_first = msgspec.structs.replace(trade(redriven, 1), redriven=True)
    await bus.publish_many([trade(mint, 5), trade(fresh, 1), trade(midway, 7), late_first])
    await announced.wait_for(4, key=mint)
    await announced.wait_until(lambda c: all(c.count(key=k) for k in (fresh, midway, redriven)))

    def seqs(key: str) -> list[tuple[int, bool]]:
        return [(e.seq, e.renumbered) for e in announced.events if e.key == key]

    # above the 3 it published before, which a consumer remembering it still holds,
    # saying its numbering starts afresh
    assert seqs(mint) == [(1, False), (2, False), (3, False), (4, True)]
    # a key new to the stream starts at 1; one first seen midway, or first given a
    # seq 1 put back from the dead letters (its key may have been here since), above
    # the floor
    assert seqs(fresh) == [(1, False)]
    assert seqs(midway) == [(4, True)]
    assert seqs(redriven) == [(4, True)]
    assert await pair.applied(mint) == [5]


async def test_a_renumbered_event_is_no_gap_and_no_unrecorded_start(pair):
    """A publisher that numbers a key afresh says so: the consumer holding the key's old
    numbering counts no gap, one holding nothing of it no unrecorded start."""
    consumer = await pair.consumer(RecordingProcessor())
    held, unheld = MINTS[6], MINTS[7]
    gaps, unrecorded = consumer.metrics.gaps._value.get(), consumer.metrics.unrecorded._value.get()

    def renumbered(mint: str, seq: int) -> Event:
        return msgspec.structs.replace(trade(mint, seq), renumbered=True)

    await consumer.handle_batch([trade(held, 1), trade(held, 2)])
    await consumer.handle_batch([renumbered(held, 300), renumbered(unheld, 300)])
    await consumer.handle_batch([trade(held, 301), trade(unheld, 301)])
    assert consumer.metrics.gaps._value.get() == gaps
    assert consumer.metrics.unrecorded._value.get() == unrecorded
    held_record, unheld_record = await pair.record(held), await pair.record(unheld)
    assert (held_record.applied, held_record.missing) == ({"feed": 301}, {})
    assert (unheld_record.applied, unheld_record.missing) == ({"feed": 301}, {})
    assert await pair.applied(held) == [1, 2, 300, 301]
    assert await pair.applied(unheld) == [300, 301]
    # unmarked, the same jump is a gap
    await consumer.handle_batch([trade(held, 600)])
    assert consumer.metrics.gaps._value.get() == gaps + 1


async def test_a_busy_key_is_encoded_once_per_commit_not_once_per_event(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    processor = RecordingProcessor()
    consumer = await pair.consumer(processor)
    mint = MINTS[5]
    events = 200
    await bus.publish_many([trade(mint, s) for s in range(1, events + 1)])
    await announced.wait_for(events, key=mint)
    assert await pair.applied(mint) == list(range(1, events + 1))
    # one encoding per commit that held the key, and many events share each commit
    # (the last commit may still be counting when its announcement arrives)
    assert processor.encoded <= consumer.flushes + 1 <= events / 4


async def test_an_announced_state_is_stored_before_its_announcement_arrives(pair):
    bus = await pair.bus()
    mint = MINTS[6]
    seen_stored: list[tuple[int, list[int]]] = []

    async def read_on_receipt(event: Event) -> None:
        seen_stored.append((event.data.source_seq, await pair.applied(mint)))

    await bus.subscribe(
        Subscription(service="reader", patterns=("features.updated",), handler=read_on_receipt)
    )
    await pair.consumer(RecordingProcessor())
    await bus.publish_many([trade(mint, s) for s in range(1, 31)])
    await eventually(lambda: len(seen_stored) == 30)
    for seq, stored in seen_stored:
        assert seq in stored, f"seq {seq} announced before it was stored"


class _StallingStore:
    """The store as a replica sees it until its process dies: writes stall after ``writes``."""

    def __init__(self, store: StateStore, writes: int):
        self._store = store
        self._writes_left = writes
        self.stalled = asyncio.Event()

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    async def write(self, batch) -> None:
        if self._writes_left <= 0:
            self.stalled.set()
            await asyncio.Event().wait()  # the process is about to die mid-write
        self._writes_left -= 1
        await self._store.write(batch)


async def test_a_replica_killed_mid_batch_loses_nothing_and_applies_nothing_twice(pair):
    announced = await watch(await pair.bus())
    bus = await pair.bus()  # on RabbitMQ, the dying replica's own connection
    stalling = _StallingStore(pair.store, writes=3)
    dying = KeyedStatefulConsumer(
        RecordingProcessor(),
        KeyedConsumerConfig(service="keyed", patterns=("token.trade", "token.migrated"), window=16),
        bus=bus,
        store=stalling,
        clock=pair.clock,
        source="keyed/test",
    )
    await dying.start()
    per_mint = 40
    await bus.publish_many([trade(m, s) for s in range(1, per_mint + 1) for m in MINTS])
    await stalling.stalled.wait()
    # the process dies mid-write: nothing of it is stored or acked from here on
    if pair.transport == "memory":
        await bus.abandon(dying.subscription)  # its unacked deliveries go back in order
        await dying.abandon()
    else:
        await dying.abandon()  # its handlers end unfinished: handed back, never acked
        await bus.close()
    taking_over = await pair.consumer(
        RecordingProcessor(), bus=bus if pair.transport == "memory" else await pair.bus()
    )
    await eventually(
        lambda: all(
            {e.data.source_seq for e in announced.of(key=m)} == set(range(1, per_mint + 1))
            for m in MINTS
        ),
        what="every event announced",
    )
    await taking_over.flush()
    for mint in MINTS:
        assert await pair.applied(mint) == list(range(1, per_mint + 1)), mint
        # announcements of the same event carry the same seq: downstream drops copies
        by_seq = {}
        for event in announced.of(key=mint):
            assert by_seq.setdefault(event.seq, event.data.source_seq) == event.data.source_seq


class _FlakyStore:
    """The store with its first ``failures`` writes refused (a Redis restart, say)."""

    def __init__(self, store: StateStore, failures: int):
        self._store = store
        self.failures = failures

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    async def write(self, batch) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("store unavailable")
        await self._store.write(batch)


async def test_a_store_that_fails_for_a_while_is_waited_out_not_dead_lettered(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    flaky = _FlakyStore(pair.store, failures=3)
    consumer = KeyedStatefulConsumer(
        RecordingProcessor(),
        KeyedConsumerConfig(
            service="keyed", patterns=("token.trade",), retry_initial_s=0.01, retry_max_s=0.02
        ),
        bus=bus,
        store=flaky,
        clock=pair.clock,
        source="keyed/test",
    )
    await consumer.start()
    pair.consumers.append(consumer)
    mint = MINTS[7]
    await bus.publish_many([trade(mint, s) for s in range(1, 11)])
    await announced.wait_for(10, key=mint)
    assert flaky.failures == 0
    assert await pair.applied(mint) == list(range(1, 11))
    assert consumer.metrics.store_retries._value.get() >= 3
    assert await bus.dead_letters("keyed") == []


def stalled_commits(kind: str) -> float:
    found = REGISTRY.get_sample_value(
        "pumpflow_consumer_stalled_commits_total", {"service": "keyed", "kind": kind}
    )
    return found or 0.0


async def test_a_commit_refused_for_a_key_of_the_wrong_kind_is_counted_logged_and_waits(
    pair, caplog
):
    """Something else wrote a plain value where the consumer keeps a hash (its partition
    index): the store refuses the commit whole, every time. It is retried, not
    dead-lettered (the state would be lost); each refusal counts by what the key holds,
    and the log names the key once, not once a retry. Once the key goes, it is stored."""
    bus = await pair.bus()
    announced = await watch(bus)
    mint = MINTS[6]
    index = f"keyed:partition:{partition_of(mint, PARTITIONS)}"
    await pair.store.set(index, b"not a hash")
    before = stalled_commits("value")
    consumer = KeyedStatefulConsumer(
        RecordingProcessor(),
        KeyedConsumerConfig(
            service="keyed", patterns=("token.trade",), retry_initial_s=0.01, retry_max_s=0.02
        ),
        bus=bus,
        store=pair.store,
        clock=pair.clock,
        source="keyed/test",
    )
    await consumer.start()
    pair.consumers.append(consumer)
    caplog.set_level(logging.WARNING, logger="pumpflow.common.dependencies")
    await bus.publish_many([trade(mint, s) for s in range(1, 6)])
    await eventually(lambda: stalled_commits("value") - before >= 20, what="refusals counted")
    assert await pair.applied(mint) == []
    assert announced.events == []
    named = [r for r in caplog.records if index in r.getMessage()]
    assert len(named) == 1, [r.getMessage() for r in named]
    said = named[0].getMessage()
    assert named[0].levelname == "ERROR"
    assert f"{index} holds a value, not a hash" in said
    assert "every commit of keyed here waits" in said and "not dead-lettered" in said

    await pair.store.delete_many([index])
    await announced.wait_for(5, key=mint)
    assert await pair.applied(mint) == [1, 2, 3, 4, 5]
    assert await pair.store.hgetall(index) == {mint: b"1"}
    assert await bus.dead_letters("keyed") == []
    assert any("went through after" in r.getMessage() for r in caplog.records)


def test_commits_refused_are_exported_from_zero_for_every_kind_a_key_may_hold():
    """The first refusal shows as an increase, and the dashboard has a zero before it."""
    registry = CollectorRegistry()
    ConsumerMetrics("zeroed", registry=registry)
    for kind in WRONG_KINDS:
        labels = {"service": "zeroed", "kind": kind}
        assert registry.get_sample_value("pumpflow_consumer_stalled_commits_total", labels) == 0


class HandingProcessor(RecordingProcessor):
    """Hands each seq applied out of the key (as the model service releases labels)."""

    def __init__(self):
        super().__init__()
        self.handed: list[int] = []

    def apply(self, state: Applied, event: Event, effects: Effects) -> Applied:
        applied = super().apply(state, event, effects)
        self.handed.append(event.seq)
        return applied


async def test_what_keys_hand_out_is_stored_before_them_and_a_refusal_holds_them(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    processor = HandingProcessor()
    kept: list[int] = []
    refusing = True
    calls = 0

    async def before_write() -> None:
        nonlocal calls
        calls += 1
        if refusing:
            raise ConnectionError("the service's own store is away")
        kept.extend(processor.handed)
        processor.handed.clear()

    consumer = KeyedStatefulConsumer(
        processor,
        KeyedConsumerConfig(
            service="keyed", patterns=("token.trade",), retry_initial_s=0.01, retry_max_s=0.02
        ),
        bus=bus,
        store=pair.store,
        clock=pair.clock,
        source="keyed/test",
        before_write=before_write,
    )
    await consumer.start()
    pair.consumers.append(consumer)
    mint = MINTS[6]
    await bus.publish_many([trade(mint, s) for s in range(1, 11)])
    await eventually(lambda: calls >= 3, what="before_write retried")
    # the keys wait for it: not written, nothing announced
    assert await pair.record(mint) is None
    assert announced.of("features.updated") == []
    refusing = False
    await announced.wait_for(10, key=mint)
    assert await pair.applied(mint) == list(range(1, 11))
    assert kept == list(range(1, 11))
    assert await bus.dead_letters("keyed") == []


class FixableProcessor(RecordingProcessor):
    """Refuses (or fails on) the events of seq ``seq`` until fixed."""

    def __init__(self, *, fail: bool = False, seq: int = 2):
        super().__init__()
        self.fail = fail
        self.seq = seq
        self.fixed = False

    def apply(self, state: Applied, event: Event, effects: Effects) -> Applied:
        if event.seq == self.seq and not self.fixed:
            if self.fail:
                raise ValueError(f"cannot take seq {self.seq} yet")
            raise InvalidInput(f"seq {self.seq} is not welcome yet")
        return super().apply(state, event, effects)


async def peek_dead_letters(bus: EventBus, count: int) -> list:
    letters = []

    async def arrived() -> bool:
        letters[:] = await bus.dead_letters("keyed", remove=False)
        return len(letters) >= count

    await eventually(arrived, 10, what=f"{count} dead letter(s)")
    return letters


@pytest.mark.parametrize("fail", [False, True], ids=["refused", "failed"])
async def test_a_dead_letter_redriven_after_its_fix_is_applied_once_by_its_service_alone(
    pair, fail
):
    bus = await pair.bus()
    announced = await watch(bus)
    others = await EventCollector("others").attach(bus, "token.trade")
    processor = FixableProcessor(fail=fail)
    consumer = await pair.consumer(processor)
    mint = MINTS[2]
    await bus.publish_many([trade(mint, 1), trade(mint, 2), trade(mint, 3)])
    await announced.wait_for(2, key=mint)
    [letter] = await peek_dead_letters(bus, 1)
    assert letter.event_type == "token.trade"
    assert await pair.applied(mint) == [1, 3]

    assert (await redrive(bus, "keyed", dry_run=True)).redriven == 1
    unmatched = await redrive(bus, "keyed", select=LetterFilter(event_type="token.migrated"))
    assert (unmatched.redriven, unmatched.passed_over) == (0, 1)
    assert len(await bus.dead_letters("keyed", remove=False)) == 1

    processor.fixed = True
    redriven_before = consumer.metrics.redriven._value.get()
    reason = "not welcome" if not fail else "handler failed"
    count = await redrive(
        bus, "keyed", select=LetterFilter(reason=reason, event_type="token.trade")
    )
    assert (count.matched, count.redriven) == (1, 1)
    await announced.wait_for(3, key=mint)
    assert await pair.applied(mint) == [1, 3, 2]
    assert await bus.dead_letters("keyed", remove=False) == []
    record = await pair.record(mint)
    assert record.applied == {"feed": 3} and record.refused == {}
    assert consumer.metrics.redriven._value.get() == redriven_before + 1

    # the same letter again (a saved copy): a duplicate now, applied nothing twice
    again = await redrive_letters(bus, "keyed", [letter])
    assert again.redriven == 1
    await bus.publish(trade(mint, 4))  # the barrier: handled after the copy
    await announced.wait_for(4, key=mint)
    await others.wait_for(1, key=mint, where=lambda e: e.seq == 4)
    assert await pair.applied(mint) == [1, 3, 2, 4]
    # redriven to the service that dead-lettered it, not to every consumer of the type
    assert [e.seq for e in others.of(key=mint)] == [1, 2, 3, 4]


async def test_events_overtaken_by_later_ones_are_applied_once_when_they_arrive(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    consumer = await pair.consumer(RecordingProcessor())
    mint, fresh, far = MINTS[3], MINTS[4], MINTS[5]
    reordered_before = consumer.metrics.reordered._value.get()
    # as a reconnection lets them arrive: later seqs first, then the ones they passed
    await bus.publish_many(
        [trade(mint, s) for s in (1, 2, 4, 3, 6, 5, 7, 3, 8)]
        + [trade(fresh, s) for s in (2, 1, 3)]
        + [trade(far, s) for s in (1, 2 + 3 * UNAPPLIED_KEPT, 5, 2 + 2 * UNAPPLIED_KEPT)]
    )
    await announced.wait_for(8, key=mint)
    await announced.wait_for(3, key=fresh)
    await announced.wait_for(3, key=far)
    assert await pair.applied(mint) == [1, 2, 4, 3, 6, 5, 7, 8]
    assert await pair.applied(fresh) == [2, 1, 3]
    # what a key waits for is bounded: a seq further back than that is a duplicate
    assert await pair.applied(far) == [1, 2 + 3 * UNAPPLIED_KEPT, 2 + 2 * UNAPPLIED_KEPT]
    assert consumer.metrics.reordered._value.get() == reordered_before + 4
    record = await pair.record(mint)
    assert record.applied == {"feed": 8} and record.missing == {}
    assert len((await pair.record(far)).missing["feed"]) == UNAPPLIED_KEPT - 1


@pytest.mark.slow
@pytest.mark.redis
async def test_a_broker_restart_mid_stream_keeps_each_keys_order_and_drops_nothing(
    own_rabbitmq, namespace, redis_url
):
    """RabbitMQ of the test's own restarts while events are published and applied."""
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    per_mint = 80
    events = [trade(m, s) for s in range(1, per_mint + 1) for m in MINTS]
    publisher = RabbitMQBus(
        url=own_rabbitmq.url, namespace=namespace, partitions=PARTITIONS, source="feed/test"
    )
    pair = Pair("rabbitmq", namespace, own_rabbitmq.url, redis_url)
    try:
        consumer = KeyedStatefulConsumer(
            RecordingProcessor(),
            KeyedConsumerConfig(
                service="keyed", patterns=("token.trade",), window=16, retry_max_s=0.5
            ),
            bus=await pair.bus(),
            store=pair.store,
            clock=WallClock(),
            source="keyed/test",
        )
        await consumer.start()
        pair.consumers.append(consumer)
        await publisher.start()
        before = consumer.metrics.applied._value.get()

        async def produce() -> None:
            # as the feed's recorder does: batches in order, a failed one sent again whole
            for start in range(0, len(events), 64):
                batch = events[start : start + 64]
                while True:
                    try:
                        await publisher.publish_many(batch)
                        break
                    except Exception:
                        await asyncio.sleep(0.1)

        def applied() -> float:
            return consumer.metrics.applied._value.get() - before

        producing = asyncio.create_task(produce())
        await eventually(lambda: applied() >= len(events) // 4, 60, what="a quarter applied")
        await asyncio.to_thread(own_rabbitmq.restart)
        await producing
        await eventually(
            lambda: applied() >= len(events),
            90,
            what="every event applied",
            details=lambda: f"{applied():.0f} of {len(events)} applied, {consumer.describe()}",
        )
        await consumer.flush()
        for mint in MINTS:
            assert await pair.applied(mint) == list(range(1, per_mint + 1)), mint
    finally:
        await publisher.close()
        await pair.teardown()


async def test_a_store_away_longer_than_the_task_deadline_is_waited_out_not_hung(pair, own_redis):
    """A key loading from a Redis that is away holds its task: waiting, not hung."""
    bus = await pair.bus()
    announced = await watch(bus)
    store = RedisStateStore(url=own_redis.url, namespace=pair.namespace)
    deadline = 0.3
    consumer = KeyedStatefulConsumer(
        RecordingProcessor(),
        KeyedConsumerConfig(
            service="keyed",
            patterns=("token.trade",),
            task_deadline_s=deadline,
            retry_initial_s=0.01,
            retry_max_s=0.05,
        ),
        bus=bus,
        store=store,
        clock=pair.clock,
        source="keyed/test",
    )
    await consumer.start()
    pair.consumers.append(consumer)
    known, new = MINTS[0], MINTS[1]
    await bus.publish_many([trade(known, s) for s in range(1, 6)])
    await announced.wait_for(5, key=known)

    await asyncio.to_thread(own_redis.stop)
    stopped = time.monotonic()
    # the new key has to be loaded; the known one applies and waits for its commit
    await bus.publish_many([trade(new, s) for s in range(1, 6)])
    await bus.publish_many([trade(known, s) for s in range(6, 11)])
    await eventually(
        lambda: time.monotonic() - stopped > 4 * deadline and "redis" in WAITS.describe(),
        what="the consumer waiting for Redis past the task deadline",
    )
    await asyncio.to_thread(own_redis.start)

    await announced.wait_for(10, key=known)
    await announced.wait_for(5, key=new)
    assert [e.data.source_seq for e in announced.of(key=known)] == list(range(1, 11))
    assert [e.data.source_seq for e in announced.of(key=new)] == list(range(1, 6))
    assert consumer.pool.health().restarts == 0
    assert await bus.dead_letters("keyed") == []
    await consumer.stop()
    pair.consumers.remove(consumer)
    await store.close()


async def test_what_a_redis_restart_emptied_is_written_back_and_restored_from(pair, own_redis):
    """A Redis without persistence comes back empty: the keys held in memory are
    written back (records, views, partition index, the seq floors of their partitions),
    so a replica restarted afterwards continues them instead of starting from zero."""
    bus = await pair.bus()
    announced = await watch(bus)
    store = RedisStateStore(url=own_redis.url, namespace=pair.namespace)
    config = KeyedConsumerConfig(
        service="keyed", patterns=("token.trade", "token.migrated"), window=16,
        compact_interval_s=0.05,
    )  # fmt: skip

    def consumer() -> KeyedStatefulConsumer:
        made = KeyedStatefulConsumer(
            RecordingProcessor(), config, bus=bus, store=store, clock=pair.clock,
            source="keyed/test",
        )  # fmt: skip
        pair.consumers.append(made)
        return made

    first = consumer()
    await first.start()
    unrecorded = first.metrics.unrecorded._value.get()
    mints = MINTS[:4]
    await bus.publish_many([trade(m, s) for s in range(1, 6) for m in mints])
    await announced.wait_until(lambda c: all(c.count(key=m) >= 5 for m in mints))
    retired = MINTS[4]
    floor = f"keyed:seq-floor:{partition_of(retired, PARTITIONS)}"
    await bus.publish_many([trade(retired, 1), trade(retired, 2), migrated(retired, 3)])

    async def floor_raised() -> bool:
        return await store.get(floor) == b"2"

    await eventually(floor_raised, 10, what="the retired key's seqs to raise the floor")

    losses = first.metrics.store_losses._value.get()
    await asyncio.to_thread(own_redis.restart)
    await eventually(lambda: first.metrics.store_losses._value.get() > losses, what="loss found")
    await eventually(lambda: "ready" not in first.describe(), what="written back")
    # read on connections of its own: one of the store's pool may still be the broken one
    # (the consumer's own reads wait that out)
    reader = RedisStateStore(url=own_redis.url, namespace=pair.namespace)
    for mint in mints:
        raw = await reader.get(f"keyed:key:{mint}")
        assert raw is not None
        assert msgspec.msgpack.decode(
            msgspec.msgpack.decode(raw, type=Record).state, type=Applied
        ).seqs == list(range(1, 6))
    # the retired key's record is gone with the store, how far it had numbered is not
    assert await reader.get(floor) == b"2"
    await reader.close()

    await first.stop()
    pair.consumers.remove(first)
    restored = first.metrics.restored._value.get()
    second = consumer()
    await second.start()
    await eventually(lambda: second.metrics.restored._value.get() - restored >= len(mints))
    await bus.publish_many([trade(m, s) for s in range(6, 8) for m in mints])
    await announced.wait_until(lambda c: all(c.count(key=m) >= 7 for m in mints))
    for mint in mints:
        assert second.state(mint).seqs == list(range(1, 8))
    assert second.metrics.unrecorded._value.get() == unrecorded
    await second.stop()
    pair.consumers.remove(second)
    await store.close()


async def test_a_redis_restart_its_client_hid_is_found_before_the_sweep(pair, own_redis):
    """A quick restart may reach the consumer as no failure at all: another user of the
    store's client (a lease, an HTTP view) met the broken connection, and the client
    opened a new one. The new connection, not the sweep, has the epoch read again, and
    what the store lost is written back at once."""
    bus = await pair.bus()
    announced = await watch(bus)
    store = RedisStateStore(url=own_redis.url, namespace=pair.namespace)
    config = KeyedConsumerConfig(
        service="keyed", patterns=("token.trade",), window=16, compact_interval_s=3600.0,
    )  # fmt: skip
    consumer = KeyedStatefulConsumer(
        RecordingProcessor(), config, bus=bus, store=store, clock=pair.clock,
        source="keyed/test",
    )  # fmt: skip
    pair.consumers.append(consumer)
    await consumer.start()
    mints = MINTS[:3]
    await bus.publish_many([trade(m, s) for s in range(1, 4) for m in mints])
    await announced.wait_until(lambda c: all(c.count(key=m) >= 3 for m in mints))
    losses = consumer.metrics.store_losses._value.get()
    retries = consumer.metrics.store_retries._value.get()

    await asyncio.to_thread(own_redis.restart)
    # the broken connection fails a ping and is dropped: the next one is new
    await eventually(store.ping, what="the store's client connected again")
    await bus.publish(trade(mints[0], 4))  # its commit goes through the new connection
    await announced.wait_until(lambda c: c.count(key=mints[0]) >= 4)
    await eventually(lambda: consumer.metrics.store_losses._value.get() > losses,
                     what="the loss found without the sweep")  # fmt: skip

    reader = RedisStateStore(url=own_redis.url, namespace=pair.namespace)

    async def written_back() -> bool:
        return all([await reader.get(f"keyed:key:{m}") is not None for m in mints])

    await eventually(written_back, 10, what="the keys the restart emptied written back")
    await reader.close()
    assert consumer.metrics.store_retries._value.get() == retries  # no failure was seen
    await consumer.stop()
    pair.consumers.remove(consumer)
    await store.close()


async def test_a_key_without_a_record_starting_mid_stream_is_counted(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    consumer = await pair.consumer(RecordingProcessor())
    before = consumer.metrics.unrecorded._value.get()
    await bus.publish(trade(MINTS[2], UNAPPLIED_KEPT + 1))  # past what a reordering explains
    await bus.publish(trade(MINTS[3], 1))
    await announced.wait_for(2)
    assert consumer.metrics.unrecorded._value.get() - before == 1


async def test_a_publishers_first_event_far_into_its_seq_counts_on_a_key_others_started(pair):
    """A key holding another publisher's input judges a publisher new to its record as a
    new key would: a first seq past what a reordering explains lost what came before it,
    a first seq a little past 1 may have been overtaken."""
    bus = await pair.bus()
    announced = await watch(bus)
    consumer = await pair.consumer(RecordingProcessor())
    before = consumer.metrics.unrecorded._value.get()
    far, near = MINTS[6], MINTS[7]
    await bus.publish_many(
        [trade(far, 1, source="scanner/test"), trade(near, 1, source="scanner/test")]
    )
    await announced.wait_for(2)
    await bus.publish_many(
        [trade(far, UNAPPLIED_KEPT + 1), trade(far, UNAPPLIED_KEPT + 2), trade(near, 3)]
    )
    await announced.wait_for(3, key=far)
    await announced.wait_for(2, key=near)
    assert consumer.metrics.unrecorded._value.get() - before == 1
    far_record, near_record = await pair.record(far), await pair.record(near)
    assert far_record.applied == {"scanner": 1, "feed": UNAPPLIED_KEPT + 2}
    assert far_record.missing == {}
    assert near_record.applied == {"scanner": 1, "feed": 3}
    assert near_record.missing == {"feed": [1, 2]}
    assert await pair.applied(far) == [1, UNAPPLIED_KEPT + 1, UNAPPLIED_KEPT + 2]


async def test_a_publishers_first_event_whose_apply_failed_starts_it_once(pair):
    """An apply that raised keeps its seq in the record (``failed``): the publisher is
    known there, so neither the events passing it over nor its retry count again."""
    processor = FixableProcessor(fail=True, seq=UNAPPLIED_KEPT + 1)
    consumer = await pair.consumer(processor)
    before = consumer.metrics.unrecorded._value.get()
    mint = MINTS[3]
    await consumer.handle_batch([trade(mint, 1, source="scanner/test")])
    with pytest.raises(ValueError):
        await consumer.handle_batch([trade(mint, UNAPPLIED_KEPT + 1)])
    await consumer.handle_batch([trade(mint, UNAPPLIED_KEPT + 2)])
    processor.fixed = True
    await consumer.handle_batch([trade(mint, UNAPPLIED_KEPT + 1)])
    assert consumer.metrics.unrecorded._value.get() - before == 1
    record = await pair.record(mint)
    assert record.applied == {"scanner": 1, "feed": UNAPPLIED_KEPT + 2}
    assert record.failed == {}
    assert await pair.applied(mint) == [1, UNAPPLIED_KEPT + 2, UNAPPLIED_KEPT + 1]


class EmitsThenFails(RecordingProcessor):
    """For seq ``seq``, until fixed: emits, arms a timer, raises its priority and retires
    the key, then fails (or refuses), its state left as it was."""

    def __init__(self, *, refuse: bool = False, seq: int = 2):
        super().__init__(timers=True)
        self.refuse = refuse
        self.seq = seq
        self.fixed = False

    def apply(self, state: Applied, event: Event, effects: Effects) -> Applied:
        if event.seq != self.seq or self.fixed:
            return super().apply(state, event, effects)
        super().apply(Applied(seqs=list(state.seqs)), event, effects)
        effects.set_timer(event.time + 2 * TIMER_DELAY)
        effects.set_priority(Priority.URGENT)
        effects.retire(RETIRE_TTL)
        if self.refuse:
            raise InvalidInput(f"seq {self.seq} is refused after its effects")
        raise ValueError(f"seq {self.seq} failed after its effects")


@pytest.mark.parametrize("refuse", [False, True], ids=["failed", "refused"])
async def test_what_an_apply_that_raised_asked_for_is_taken_back(pair, refuse):
    """Its events are not published, its timer, priority and retirement do not stand:
    the retry of a failed event announces it once, with the next seq."""
    bus = await pair.bus()
    announced = await watch(bus)
    processor = EmitsThenFails(refuse=refuse)
    consumer = await pair.consumer(processor)
    mint = MINTS[4]
    await consumer.handle_batch([trade(mint, 1)])
    if refuse:
        await consumer.handle_batch([trade(mint, 2)])
    else:
        with pytest.raises(ValueError):
            await consumer.handle_batch([trade(mint, 2)])
    record = await pair.record(mint)
    assert record.timer == START + 1 + TIMER_DELAY
    assert record.priority == Priority.NORMAL
    assert not record.retired
    assert record.published == 1
    processor.fixed = True
    await consumer.handle_batch([trade(mint, 2), trade(mint, 3)])
    await announced.wait_for(1, key=mint, where=lambda e: e.data.source_seq == 3)
    got = [(e.seq, e.data.source_seq) for e in announced.of(key=mint)]
    if refuse:
        assert got == [(1, 1), (2, 3)]
        assert await pair.applied(mint) == [1, 3]
    else:
        assert got == [(1, 1), (2, 2), (3, 3)]
        assert await pair.applied(mint) == [1, 2, 3]


class FireEmitsThenFails(RecordingProcessor):
    """Its timer's fire emits, re-arms and raises."""

    def __init__(self):
        super().__init__(timers=True)

    def fire(self, state: Applied, effects: Effects) -> Applied:
        effects.emit(
            FeaturesUpdated(
                mint=effects.key,
                feature_set_version="test",
                source_seq=0,
                names=("n",),
                values=(0.0,),
            ),
            time=effects.now,
        )
        effects.set_timer(effects.now + TIMER_DELAY)
        raise ValueError("the fire failed after its effects")


async def test_what_a_fire_that_raised_asked_for_is_taken_back(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    consumer = await pair.consumer(FireEmitsThenFails())
    mint = MINTS[5]
    await consumer.handle_batch([trade(mint, 1)])
    await pair.clock.advance(TIMER_DELAY + 2)
    await consumer.handle_batch([trade(mint, 2)])
    await announced.wait_for(1, key=mint, where=lambda e: e.data.source_seq == 2)
    assert [(e.seq, e.data.source_seq) for e in announced.of(key=mint)] == [(1, 1), (2, 2)]
    record = await pair.record(mint)
    assert record.published == 2
    assert record.timer == START + 2 + TIMER_DELAY


class UnencodableAt(RecordingProcessor):
    """A state that has applied seq ``seq`` cannot be encoded."""

    def __init__(self, seq: int):
        super().__init__()
        self.seq = seq

    def encode(self, state: Applied) -> bytes:
        if self.seq in state.seqs:
            raise OverflowError("int too big to convert")
        return super().encode(state)


class SnapshotProcessor(RecordingProcessor):
    """Announces a key's state as of its last event of a batch (``effects.more``)."""

    def apply(self, state: Applied, event: Event, effects: Effects) -> Applied:
        if not effects.more:
            return super().apply(state, event, effects)
        state.seqs.append(event.seq)
        return state


async def test_an_event_followed_only_by_a_duplicate_is_announced(pair):
    """A late seq applied in a batch whose later event the key has applied already (a
    redelivery): nothing newer follows it, so its change is announced; in a batch of new
    events only the last announces."""
    bus = await pair.bus()
    announced = await watch(bus)
    consumer = await pair.consumer(SnapshotProcessor())
    mint = MINTS[2]
    await consumer.handle_batch([trade(mint, 1)])
    await consumer.handle_batch([trade(mint, 3)])  # 2 overtaken
    await consumer.handle_batch([trade(mint, 2), trade(mint, 3)])
    await consumer.handle_batch([trade(mint, 3), trade(mint, 4), trade(mint, 5)])
    await announced.wait_for(4, key=mint)
    assert [e.data.source_seq for e in announced.of(key=mint)] == [1, 3, 2, 5]
    assert await pair.applied(mint) == [1, 3, 2, 4, 5]


async def test_a_key_that_cannot_be_stored_loses_no_other_keys_change(pair):
    """Its commit fails; the other keys of it are written by the next one, their events
    announced, and the key itself comes back from its stored record."""
    bus = await pair.bus()
    announced = await watch(bus)
    consumer = await pair.consumer(UnencodableAt(seq=2))
    good, bad = MINTS[0], MINTS[1]
    await consumer.handle_batch([trade(good, 1), trade(bad, 1)])
    with pytest.raises(OverflowError):
        await consumer.handle_batch([trade(good, 3), trade(bad, 2)])
    # handed back: the good key's event is a duplicate, stored by the next commit
    await consumer.handle_batch([trade(good, 3)])
    await announced.wait_for(1, key=good, where=lambda e: e.data.source_seq == 3)
    assert [e.data.source_seq for e in announced.of(key=good)] == [1, 3]
    assert await pair.applied(good) == [1, 3]
    assert [e.data.source_seq for e in announced.of(key=bad)] == [1]
    assert await pair.applied(bad) == [1]
    # the bad key's event applies again to its stored record, and fails again
    with pytest.raises(OverflowError):
        await consumer.handle_batch([trade(bad, 2)])
    await consumer.handle_batch([trade(bad, 3)])
    await announced.wait_for(2, key=bad)
    assert await pair.applied(bad) == [1, 3]


async def test_a_key_without_a_record_is_rebuilt_from_its_publishers_history_first(pair):
    stored = {MINTS[0]: [trade(MINTS[0], seq) for seq in range(1, 5)]}
    asked: list[tuple[str, str, int]] = []

    async def history(key: str, publisher: str, before_seq: int) -> list[Event]:
        asked.append((key, publisher, before_seq))
        return [e for e in stored.get(key, []) if e.seq < before_seq]

    bus = await pair.bus()
    announced = await watch(bus)
    consumer = await pair.consumer(RecordingProcessor(), history=history)
    before = consumer.metrics.rebuilt._value.get()
    await bus.publish(trade(MINTS[0], 5))  # its record was lost: seqs 1-4 are history
    await bus.publish(trade(MINTS[1], 1))  # a key from its start needs none
    await announced.wait_for(2)
    assert await pair.applied(MINTS[0]) == [1, 2, 3, 4, 5]
    assert asked == [(MINTS[0], "feed", 5)]
    # the replayed events announced nothing: they did when they first came
    assert [e.data.source_seq for e in announced.events if e.key == MINTS[0]] == [5]
    # its own seqs go on past any it may have published before the loss
    assert [e.seq for e in announced.events if e.key == MINTS[0]] == [5]
    assert consumer.metrics.rebuilt._value.get() - before == 1
    # a late copy of a replayed event is a duplicate; the stream goes on
    await bus.publish(trade(MINTS[0], 3))
    await bus.publish(trade(MINTS[0], 6))
    await announced.wait_for(3)
    assert await pair.applied(MINTS[0]) == [1, 2, 3, 4, 5, 6]
    assert asked == [(MINTS[0], "feed", 5)]


async def _parked(pair: Pair, mint: str, count: int) -> bool:
    record = await pair.record(mint)
    return record is not None and record.parked_to - record.parked_from == count


async def test_a_replica_that_stops_while_a_key_waits_for_its_history_hands_its_events_over(
    pair,
):
    """The events of a key waiting for its history are stored with its record, their
    deliveries done: a replica that stops meanwhile hands them over, and the next owner
    reads the history and applies them, each once, in order."""
    mint = MINTS[0]
    stored = [trade(mint, seq) for seq in range(1, 5)]
    readable = asyncio.Event()

    async def history(key: str, publisher: str, before_seq: int) -> list[Event]:
        await readable.wait()
        return [e for e in stored if e.seq < before_seq]

    bus = await pair.bus()
    announced = await watch(bus)
    first = await pair.consumer(RecordingProcessor(), history=history)
    await bus.publish_many([trade(mint, 5), trade(mint, 6)])
    await eventually(lambda: _parked(pair, mint, 2), what="the key's events parked")
    await asyncio.wait_for(first.stop(), 10)
    pair.consumers.remove(first)
    assert not announced.of(key=mint) and await pair.applied(mint) == []
    readable.set()
    await pair.consumer(RecordingProcessor(), history=history)
    await announced.wait_for(2, key=mint)
    await eventually(
        lambda: _applied_seqs(pair, mint, [1, 2, 3, 4, 5, 6]), what="the key rebuilt and stored"
    )
    assert [e.data.source_seq for e in announced.of(key=mint)] == [5, 6]
    assert not await pair.store.hgetall(f"keyed:parked:{mint}")
    assert await bus.dead_letters("keyed") == []


async def test_a_key_whose_history_cannot_be_read_dead_letters_its_parked_events(pair):
    """A read of the history that fails for a reason of its own (not a dependency's
    wait) is tried again a few times; then the key's parked events are dead-lettered
    with the error, as the bus would their deliveries, and the key's stream goes on."""
    mint = MINTS[0]

    async def history(key: str, publisher: str, before_seq: int) -> list[Event]:
        raise ValueError("a stored row that does not decode")

    bus = await pair.bus()
    consumer = await pair.consumer(RecordingProcessor(), history=history)
    await bus.publish_many([trade(mint, 5), trade(mint, 6)])
    letters = []

    async def dead_lettered() -> bool:
        letters.extend(await bus.dead_letters("keyed"))
        return len(letters) >= 2

    await eventually(dead_lettered, 30, what="the parked events dead-lettered")
    assert sorted(decode_event(letter.body).seq for letter in letters) == [5, 6]
    assert all("history could not be read" in letter.reason for letter in letters)
    await eventually(lambda: _parked(pair, mint, 0), what="nothing left parked")
    assert await pair.applied(mint) == []
    assert consumer.describe()["rebuilding"] == 0


async def test_a_partial_publishers_seqs_skip_without_a_gap_a_loss_or_a_rebuild(pair):
    """A consumer that takes only some of a publisher's types (activity: the feed's
    token.migrated) sees its seqs skip: a key first seen far into that stream is new
    here, not one that lost its record; nothing between is missing; copies still drop."""
    asked: list[tuple[str, str, int]] = []

    async def history(key: str, publisher: str, before_seq: int) -> list[Event]:
        asked.append((key, publisher, before_seq))
        return []

    bus = await pair.bus()
    announced = await watch(bus)
    consumer = await pair.consumer(
        RecordingProcessor(), history=history, partial_publishers=("feed",)
    )
    metrics = consumer.metrics
    unrecorded, gaps = metrics.unrecorded._value.get(), metrics.gaps._value.get()
    far, near = MINTS[4], MINTS[5]
    first = trade(far, UNAPPLIED_KEPT + 325)
    await bus.publish_many([first, trade(near, 5), trade(far, UNAPPLIED_KEPT + 400), first])
    await bus.publish(trade(far, UNAPPLIED_KEPT + 401))  # a barrier behind the copy
    await announced.wait_for(1, key=far, where=lambda e: e.data.source_seq == UNAPPLIED_KEPT + 401)
    await announced.wait_for(1, key=near)
    assert await pair.applied(far) == [UNAPPLIED_KEPT + s for s in (325, 400, 401)]
    assert await pair.applied(near) == [5]
    assert (await pair.record(far)).missing == {} and (await pair.record(near)).missing == {}
    assert metrics.unrecorded._value.get() == unrecorded
    assert metrics.gaps._value.get() == gaps
    assert metrics.duplicates._value.get() >= 1
    assert asked == []


async def test_a_partial_publishers_first_event_far_in_on_a_key_others_started_is_no_loss(pair):
    bus = await pair.bus()
    announced = await watch(bus)
    consumer = await pair.consumer(RecordingProcessor(), partial_publishers=("feed",))
    metrics = consumer.metrics
    unrecorded, gaps = metrics.unrecorded._value.get(), metrics.gaps._value.get()
    mint = MINTS[5]
    await bus.publish(trade(mint, 1, source="scanner/test"))
    await announced.wait_for(1, key=mint)
    await bus.publish(trade(mint, UNAPPLIED_KEPT + 325))
    await announced.wait_for(2, key=mint)
    record = await pair.record(mint)
    assert record.applied == {"scanner": 1, "feed": UNAPPLIED_KEPT + 325}
    assert record.missing == {}
    assert metrics.unrecorded._value.get() == unrecorded
    assert metrics.gaps._value.get() == gaps


class QuietProcessor(RecordingProcessor):
    """A trade of no tokens changes nothing."""

    def apply(self, state: Applied, event: Event, effects: Effects) -> Applied:
        if event.type == "token.trade" and event.data.tokenAmount == 0:
            return UNCHANGED
        return super().apply(state, event, effects)


async def test_a_partitions_time_moves_on_from_its_last_event_not_from_a_later_look(pair):
    """Live (the clock at the market's time), a key's timer is due 30 s after its event.
    Another key of its partition applied the partition's last event 20 s before that, one
    that changed nothing (nothing stored, nothing read the time): when the timer is due
    on the clock the partition's time is there too, so it fires then, not 20 s late."""
    processor = QuietProcessor(timers=True)
    consumer = await pair.consumer(processor)
    timed, other = _in_partition(1, 2)
    await consumer.handle_batch([trade(timed, 1, at=START)])
    await pair.clock.advance_to(START + 5)
    await consumer.handle_batch([trade(other, 1, at=START + 5)])
    await pair.clock.advance_to(START + 10)
    await consumer.handle_batch([trade(other, 2, amount=0.0, at=START + 10)])
    await pair.clock.advance_to(START + TIMER_DELAY)
    assert processor.fired_keys == [timed]


class _CountingStore:
    """The store, counting the keys each write stores."""

    def __init__(self, store: StateStore):
        self._store = store
        self.written: list[str] = []

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    async def write(self, batch) -> None:
        self.written.extend(batch.values)
        await self._store.write(batch)


def quiet(mint: str, seq: int, *, source: str = "feed/test") -> Event:
    return trade(mint, seq, amount=0.0, source=source)


async def test_an_event_that_changed_nothing_stores_nothing_and_the_next_change_its_seq(pair):
    counting = _CountingStore(pair.store)
    processor = QuietProcessor()
    consumer = await pair.consumer(processor, store=counting)
    mint = MINTS[0]
    gaps = consumer.metrics.gaps._value.get()
    await consumer.handle_batch([trade(mint, 1)])
    written, encoded = len(counting.written), processor.encoded
    await consumer.handle_batch([quiet(mint, 2), quiet(mint, 3)])
    await consumer.handle(quiet(mint, 4))
    await consumer.flush()
    assert (len(counting.written), processor.encoded) == (written, encoded)
    assert (await pair.record(mint)).applied == {"feed": 1}
    # known here all the same: a redelivery is a duplicate
    duplicates = consumer.metrics.duplicates._value.get()
    await consumer.handle_batch([quiet(mint, 3)])
    assert consumer.metrics.duplicates._value.get() == duplicates + 1
    await consumer.handle_batch([trade(mint, 5)])
    record = await pair.record(mint)
    assert record.applied == {"feed": 5} and record.missing == {}
    assert await pair.applied(mint) == [1, 5]
    assert consumer.metrics.gaps._value.get() == gaps


async def test_a_new_key_is_stored_by_its_first_event_even_if_it_changed_nothing(pair):
    consumer = await pair.consumer(QuietProcessor())
    mint = MINTS[1]
    await consumer.handle_batch([quiet(mint, 1)])
    record = await pair.record(mint)
    assert record is not None and record.applied == {"feed": 1}
    assert mint in await pair.store.hgetall(f"keyed:partition:{partition_of(mint, PARTITIONS)}")


async def test_a_key_handed_over_stores_the_seqs_of_events_that_changed_nothing(pair):
    first = await pair.consumer(QuietProcessor())
    mint = MINTS[2]
    partitions = tuple(range(PARTITIONS))
    await first.handle_batch([trade(mint, 1)])
    # handed over and back: its record lists no outbox, so nothing else stores it again
    await first.revoke(partitions)
    await first.assign(partitions)
    await first.handle_batch([quiet(mint, 2), quiet(mint, 3)])
    assert (await pair.record(mint)).applied == {"feed": 1}
    await first.revoke(tuple(range(PARTITIONS)))
    assert (await pair.record(mint)).applied == {"feed": 3}
    second = await pair.consumer(QuietProcessor())
    await second.handle_batch([quiet(mint, 3), trade(mint, 4)])
    record = await pair.record(mint)
    assert record.applied == {"feed": 4} and record.missing == {}
    assert await pair.applied(mint) == [1, 4]


async def test_events_that_changed_nothing_redelivered_after_a_crash_are_harmless(pair):
    dying = await pair.consumer(QuietProcessor())
    mint = MINTS[3]
    await dying.handle_batch([trade(mint, 1)])
    await dying.handle_batch([quiet(mint, 2), quiet(mint, 3)])
    await dying.abandon()  # what it held in memory is lost
    pair.consumers.remove(dying)
    assert (await pair.record(mint)).applied == {"feed": 1}
    taking_over = await pair.consumer(QuietProcessor())
    # seq 2 was acked; seq 3 comes again, then a change
    await taking_over.handle_batch([quiet(mint, 3), trade(mint, 4)])
    record = await pair.record(mint)
    assert record.applied == {"feed": 4}
    assert await pair.applied(mint) == [1, 4]
    # the acked one waits as if overtaken; if a copy of it comes it changes nothing
    assert record.missing == {"feed": [2]}
    await taking_over.handle_batch([quiet(mint, 2)])
    assert await pair.applied(mint) == [1, 4]
    assert (await pair.record(mint)).missing == {}


async def test_a_publishers_first_event_is_stored_so_a_restored_record_knows_it(pair):
    """A publisher's first event on a key with a live record is stored though it changed
    nothing: the record restored after a crash knows the publisher, so its next event
    far on is a gap, not an unrecorded start."""
    dying = await pair.consumer(QuietProcessor())
    mint = MINTS[4]
    await dying.handle_batch([trade(mint, 1)])
    await dying.handle_batch([quiet(mint, 1, source="scanner/test")])
    await dying.handle_batch(
        [quiet(mint, s, source="scanner/test") for s in range(2, UNAPPLIED_KEPT + 2)]
    )
    await dying.abandon()  # the seqs of the events that changed nothing are lost
    pair.consumers.remove(dying)
    assert (await pair.record(mint)).applied == {"feed": 1, "scanner": 1}
    taking_over = await pair.consumer(QuietProcessor())
    metrics = taking_over.metrics
    unrecorded, gaps = metrics.unrecorded._value.get(), metrics.gaps._value.get()
    await taking_over.handle_batch([trade(mint, UNAPPLIED_KEPT + 2, source="scanner/test")])
    assert metrics.unrecorded._value.get() == unrecorded
    assert metrics.gaps._value.get() == gaps + 1
    record = await pair.record(mint)
    assert record.applied == {"feed": 1, "scanner": UNAPPLIED_KEPT + 2}
    assert await pair.applied(mint) == [1, UNAPPLIED_KEPT + 2]


@pytest.mark.parametrize("outbox", [False, True], ids=["published", "unpublished"])
async def test_an_event_that_waits_for_its_history_as_its_key_retires_keeps_the_key(pair, outbox):
    """An event that waits for its key's history (a second publisher's first event, far
    into its seq) right after the key's retirement is kept with the key's record: its
    delivery is done once that is stored, and the retirement does not stand (the record
    stays live and indexed, whatever other commits store meanwhile). Once the history
    is read the event is applied and announced. ``outbox``: the retirement's batch
    holds the key's earlier event too."""
    reading, read = asyncio.Event(), asyncio.Event()

    async def history(key: str, publisher: str, before_seq: int) -> list[Event]:
        reading.set()
        await read.wait()
        return []

    bus = await pair.bus()
    announced = await watch(bus)
    consumer = await pair.consumer(RecordingProcessor(), history=history)
    mint, other = MINTS[0], MINTS[1]
    first = [trade(mint, 1)]
    if not outbox:
        await consumer.handle_batch(first)
        first = []
    # the migration retires the key; the second publisher's event waits for its history
    await asyncio.wait_for(
        consumer.handle_batch([*first, migrated(mint, 2), trade(mint, 5, source="scanner/test")]),
        10,
    )
    await asyncio.wait_for(reading.wait(), 10)
    await consumer.handle_batch([trade(other, 1)])
    record = await pair.record(mint)
    assert not record.retired and record.parked_to - record.parked_from == 1
    index = f"keyed:partition:{partition_of(mint, PARTITIONS)}"
    assert mint in await pair.store.hgetall(index)
    read.set()
    await announced.wait_for(2, key=mint)
    await eventually(
        lambda: _applied_seqs(pair, mint, [1, 5]), what="the waiting event applied and stored"
    )
    record = await pair.record(mint)
    assert record.applied == {"feed": 2, "scanner": 5} and not record.retired
    assert record.parked_to == record.parked_from
    assert not await pair.store.hgetall(f"keyed:parked:{mint}")
    assert mint in consumer.keys()
    assert mint in await pair.store.hgetall(index)


async def _applied_seqs(pair: Pair, mint: str, seqs: list[int]) -> bool:
    return await pair.applied(mint) == seqs


class _HeldDeadLetters:
    """The bus with its dead letters held from :meth:`hold` until :meth:`release` (a slow
    broker round trip): the work of a key that refused an event waits meanwhile."""

    def __init__(self, bus: EventBus):
        self._bus = bus
        self.holding = asyncio.Event()
        self._released = asyncio.Event()
        self._released.set()

    def hold(self) -> None:
        self._released.clear()

    def __getattr__(self, name: str):
        return getattr(self._bus, name)

    async def dead_letter(self, *args, **kwargs):
        if not self._released.is_set():
            self.holding.set()
            await self._released.wait()
        return await self._bus.dead_letter(*args, **kwargs)

    def release(self) -> None:
        self._released.set()


async def test_a_flush_after_a_commit_that_could_not_be_stored_returns(pair):
    """The commit that failed took every change made: what is left of it to store (the
    other keys' changes, not the dropped key's) is stored by a flush, which returns, and
    the consumer stops."""
    consumer = await pair.consumer(UnencodableAt(seq=2))
    bad, good = MINTS[1], MINTS[2]
    await consumer.handle_batch([trade(bad, 1)])
    with pytest.raises(OverflowError):
        await consumer.handle_batch([trade(bad, 2), trade(good, 1)])
    await asyncio.wait_for(consumer.flush(), 10)
    assert await pair.applied(good) == [1]
    await asyncio.wait_for(consumer.stop(), 10)
    assert await pair.applied(bad) == [1]


async def test_work_under_way_on_a_key_dropped_as_unencodable_fails_and_comes_back(pair):
    """A key's work that waits (here for the dead letter of an event it refused) while a
    commit drops the key (its state cannot be encoded) is not acked with nothing stored:
    it fails, and its events handed back apply to the key's stored record."""
    bus = _HeldDeadLetters(await pair.bus())
    consumer = await pair.consumer(UnencodableAt(seq=2), bus=bus)
    bad, other = MINTS[1], MINTS[2]
    await consumer.handle_batch([trade(bad, 1)])
    bus.hold()
    waiting = [trade(bad, 2), trade(bad, 3, amount=-5.0)]
    applying = asyncio.ensure_future(consumer.handle_batch(waiting))
    await asyncio.wait_for(bus.holding.wait(), 10)
    # another key's commit takes the bad key's change: it cannot be stored
    with pytest.raises(OverflowError):
        await consumer.handle_batch([trade(other, 1)])
    bus.release()
    with pytest.raises(RuntimeError, match="left memory"):  # the bus hands them back
        await asyncio.wait_for(applying, 10)
    await consumer.handle_batch([trade(other, 1)])
    with pytest.raises(OverflowError):
        await consumer.handle_batch([waiting[0]])
    await consumer.handle_batch([waiting[1]])
    record = await pair.record(bad)
    assert record.applied == {"feed": 3} and record.refused == {"feed": [3]}
    assert await pair.applied(bad) == [1]
    assert await pair.applied(other) == [1]


async def test_a_key_retiring_behind_work_that_changed_nothing_leaves_after_it(pair):
    """Work of the key under way when its retirement is stored (here a redelivery,
    queued behind every worker's wait) keeps it in memory until that work is done; having
    changed nothing, the key leaves then."""
    held = _HeldStore(pair.store, hold=False)
    bus = _HeldDeadLetters(await pair.bus())
    consumer = await pair.consumer(RecordingProcessor(), store=held, bus=bus)
    mint = MINTS[0]
    await consumer.handle_batch([trade(mint, 1)])
    held.hold_next()
    retiring = asyncio.ensure_future(consumer.handle_batch([migrated(mint, 2)]))
    await asyncio.wait_for(held.holding.wait(), 10)
    # every worker waits for a dead letter; the redelivery of the key's event waits behind
    bus.hold()
    busy = [f"busy{i}" for i in range(consumer.config.workers)]
    waiting = [
        asyncio.ensure_future(consumer.handle_batch([trade(key, 1, amount=-5.0)])) for key in busy
    ]
    await asyncio.wait_for(bus.holding.wait(), 10)
    await eventually(lambda: consumer.pool.busy == consumer.config.workers)
    redelivered = consumer.handle(trade(mint, 1))
    held.release()
    await asyncio.wait_for(retiring, 10)
    assert (await pair.record(mint)).retired
    bus.release()
    await asyncio.wait_for(asyncio.gather(redelivered, *waiting), 10)
    await eventually(lambda: mint not in consumer.keys(), what="the retired key to leave")
    assert (await pair.record(mint)).retired


async def test_a_commit_that_cannot_be_stored_fails_only_the_deliveries_it_took(pair):
    """The deliveries of the commit written before it, still being published, are not
    failed with it."""
    held = _HeldStore(pair.store, hold=False)
    consumer = await pair.consumer(UnencodableAt(seq=2), store=held)
    bad, good = MINTS[1], MINTS[2]
    await consumer.handle_batch([trade(bad, 1)])
    held.hold_next()
    storing = asyncio.ensure_future(consumer.handle_batch([trade(good, 1)]))
    await asyncio.wait_for(held.holding.wait(), 10)
    failing = asyncio.ensure_future(consumer.handle_batch([trade(bad, 2)]))
    await eventually(lambda: consumer.pool.queue_depth == 0 and consumer.pool.busy == 0)
    held.release()
    await asyncio.wait_for(storing, 10)
    with pytest.raises(OverflowError):
        await asyncio.wait_for(failing, 10)
    assert await pair.applied(good) == [1]
    assert await pair.applied(bad) == [1]


async def test_a_revocation_while_a_key_cannot_be_stored_hands_the_others_over(pair):
    """A commit that fails on a key that cannot be stored while the partitions are
    handed over fails that key's deliveries, not the hand-over: the other keys are
    stored and every key leaves memory."""
    held = _HeldStore(pair.store, hold=False)
    consumer = await pair.consumer(UnencodableAt(seq=2), store=held)
    bad, good = MINTS[1], MINTS[2]
    await consumer.handle_batch([trade(bad, 1)])
    held.hold_next()
    storing = asyncio.ensure_future(consumer.handle_batch([trade(good, 1)]))
    await asyncio.wait_for(held.holding.wait(), 10)
    failing = asyncio.ensure_future(consumer.handle_batch([trade(bad, 2), trade(good, 3)]))
    await eventually(lambda: consumer.pool.queue_depth == 0 and consumer.pool.busy == 0)
    revoking = asyncio.ensure_future(consumer.revoke(tuple(range(PARTITIONS))))
    await eventually(lambda: not consumer.owned)
    held.release()
    await asyncio.wait_for(storing, 10)
    with pytest.raises(OverflowError):
        await asyncio.wait_for(failing, 10)
    await asyncio.wait_for(revoking, 10)
    assert len(consumer) == 0
    assert await pair.applied(good) == [1, 3]
    assert await pair.applied(bad) == [1]


async def test_keys_of_a_write_under_way_when_the_store_lost_its_contents_are_indexed_again(
    pair,
):
    """The loss is found while a commit is being written: the keys of that commit are
    written back with their partition's index entry, as every other key held here, so
    a replica taking the partition over restores them (and arms their timers)."""
    losing = LosingStore(pair.clock)
    held = _HeldStore(losing, hold=False)
    consumer = await pair.consumer(RecordingProcessor(timers=True), store=held)
    mint = MINTS[3]
    index = f"keyed:partition:{partition_of(mint, PARTITIONS)}"
    await consumer.handle_batch([trade(mint, 1)])
    assert mint in await losing.hgetall(index)
    held.hold_next()
    storing = asyncio.ensure_future(consumer.handle_batch([trade(mint, 2)]))
    await asyncio.wait_for(held.holding.wait(), 10)
    losing.lose()
    await consumer.check_epoch()
    held.release()
    await asyncio.wait_for(storing, 10)
    await consumer.flush()
    assert mint in await losing.hgetall(index)
    await consumer.stop()
    pair.consumers.remove(consumer)
    taking_over = RecordingProcessor(timers=True)
    await pair.consumer(taking_over, store=losing)
    await pair.clock.advance(TIMER_DELAY + 5)
    assert taking_over.fired_keys == [mint]


async def test_a_copy_of_an_applied_event_does_not_bring_a_retired_key_back(pair):
    """A retired key loaded again by a redelivery of an event it applied changes nothing:
    it leaves memory again, its record still retired (its stored timer not armed)."""
    forgotten: list[str] = []
    processor = RecordingProcessor(timers=True)
    consumer = await pair.consumer(processor, on_forgotten=forgotten.append)
    mint = MINTS[4]
    await consumer.handle_batch([trade(mint, 1), trade(mint, 2), migrated(mint, 3)])
    await eventually(lambda: mint not in consumer.keys(), what="the key retired")
    await consumer.handle_batch([trade(mint, 2)])
    assert mint not in consumer.keys()
    await consumer.handle(trade(mint, 1))
    assert mint not in consumer.keys()
    assert forgotten == [mint, mint, mint]
    record = await pair.record(mint)
    assert record.retired and record.applied == {"feed": 3}
    assert await pair.applied(mint) == [1, 2]
    await pair.clock.advance(TIMER_DELAY + 5)
    assert processor.fired_keys == []


class _DyingStore:
    """The store, whose writes never return once armed, but the first (a replica that
    dies right after that one)."""

    def __init__(self, store: StateStore):
        self._store = store
        self.armed = False
        self.dead = asyncio.Event()
        self._written = False

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    async def _once(self, name: str, *args):
        if self.armed:
            if self._written:
                self.dead.set()
                await asyncio.Event().wait()
            self._written = True
        return await getattr(self._store, name)(*args)

    async def write(self, batch) -> None:
        await self._once("write", batch)

    async def delete_many(self, keys) -> None:
        await self._once("delete_many", keys)

    async def hset_many(self, items, ttl=None) -> None:
        await self._once("hset_many", items, ttl)


async def test_a_replica_dying_while_it_drops_expired_index_entries_keeps_the_others(pair):
    """Assigned a partition whose index lists an expired key, a replica drops that entry;
    dying meanwhile, it leaves the live keys listed, so the next owner restores them and
    fires their timers."""
    dying_store = _DyingStore(pair.store)
    dying = await pair.consumer(RecordingProcessor(timers=True), store=dying_store)
    live, expired = _same_partition(MINTS[6], 2)
    await dying.handle_batch([trade(live, 1), trade(expired, 1)])
    partitions = tuple(range(PARTITIONS))
    await dying.revoke(partitions)
    await pair.store.delete_many([f"keyed:key:{expired}"])
    dying_store.armed = True
    assigning = asyncio.ensure_future(dying.assign(partitions))
    died = asyncio.ensure_future(dying_store.dead.wait())
    await asyncio.wait([assigning, died], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assigning.cancel()
    died.cancel()
    await dying.abandon()
    pair.consumers.remove(dying)
    index = f"keyed:partition:{partition_of(live, PARTITIONS)}"
    assert list(await pair.store.hgetall(index)) == [live]
    taking_over = RecordingProcessor(timers=True)
    await pair.consumer(taking_over)
    await pair.clock.advance(TIMER_DELAY + 5)
    assert taking_over.fired_keys == [live]
