"""DataFeedManager and Recorder with the real in-memory bus and Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.idempotency import Sequencer
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock
from pumpflow.common.consumer import ConsumerMetrics, KeyedConsumerConfig, KeyedStatefulConsumer
from pumpflow.common.events import Event, encode_payload, make_event
from pumpflow.common.pumpportal import decode_frame
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import AppliedSeqs, base58_key
from pumpflow.feed import reference_frames as ref
from pumpflow.feed.database_feed import DatabaseDataFeed, ReplayConfig
from pumpflow.feed.interface import ALL_EVENTS, DataFeedInterface, FeedRecord, as_mints
from pumpflow.feed.manager import DataFeedManager, FeedManagerConfig, RecentSignatures
from pumpflow.feed.metrics import FeedMetrics
from pumpflow.feed.recorder import JsonlSink, Recorder, RecorderConfig

A, B, C = base58_key("A"), base58_key("B"), base58_key("C")
W, CURVE = base58_key("w"), base58_key("b")
#: SOL reserves on the constant product at 1.07e9 tokens
V_SOL = 30 * 1.073e9 / 1.07e9


def trade(mint: str, i: int, tx: str = "buy") -> bytes:
    return (
        b'{"signature":"%s","mint":"%s","traderPublicKey":"%s","txType":"%s",'
        b'"tokenAmount":%d,"solAmount":0.01,"newTokenBalance":5,"bondingCurveKey":"%s",'
        b'"vTokensInBondingCurve":1.07e9,"vSolInBondingCurve":%r,"marketCapSol":%r}'
        % (signature(mint, i).encode(), mint.encode(), W.encode(), tx.encode(), i + 1,
           CURVE.encode(), V_SOL, V_SOL / 1.07)
    )  # fmt: skip


def signature(mint: str, i: int) -> str:
    return base58_key(f"s-{mint}-{i}", 88)


class ScriptedFeed(DataFeedInterface):
    """A feed that delivers given frames when told to (no transport)."""

    def __init__(self, clock: ReplayClock):
        super().__init__()
        self.clock = clock
        self.subscribed: list[str] = []
        self.unsubscribed: list[str] = []

    async def connect(self) -> None: ...
    async def disconnect(self) -> None: ...

    async def subscribe(self, token_id: str | Iterable[str]) -> None:
        self.subscribed.extend(as_mints(token_id))

    async def unsubscribe(self, token_id: str | Iterable[str]) -> None:
        self.unsubscribed.extend(as_mints(token_id))

    async def get_historical_data(self, token_id, start_time, end_time):
        raise NotImplementedError

    async def push(self, *frames: bytes, step: float = 1.0, subscribed: bool = True) -> None:
        for raw in frames:
            await self.clock.advance(step)
            record = FeedRecord(decode_frame(raw), raw, self.clock.now(), subscribed=subscribed)
            await self._emit(record)


@pytest.fixture
def metrics():
    return FeedMetrics(CollectorRegistry())


async def collecting_bus() -> tuple[InMemoryBus, list[Event]]:
    bus = InMemoryBus(partitions=4, synchronous=True, source="feed/test")
    await bus.start()
    got: list[Event] = []

    async def handler(event: Event) -> None:
        got.append(event)

    await bus.subscribe(Subscription(service="probe", patterns=("token.*",), handler=handler))
    return bus, got


async def test_frames_become_sequenced_events_and_duplicates_are_dropped(metrics):
    bus, got = await collecting_bus()
    clock = ReplayClock(1000.0)
    feed = ScriptedFeed(clock)
    manager = DataFeedManager(bus, config=FeedManagerConfig(source="feed/test"), metrics=metrics)
    manager.add_data_feed(feed)
    await feed.push(ref.CREATE, trade(A, 1), trade(A, 2), trade(A, 1), ref.MIGRATE)
    await bus.drain()
    assert [e.type for e in got] == [
        "token.created", "token.trade", "token.trade", "token.migrated",
    ]  # fmt: skip
    assert [e.seq for e in got] == [1, 1, 2, 1]
    assert [e.time for e in got] == [1001.0, 1002.0, 1003.0, 1005.0]
    assert all(e.source == "feed/test" and e.key == e.data.mint for e in got)
    assert manager.duplicates == 1
    assert metrics.duplicates._value.get() == 1
    await bus.close()


async def test_frames_taken_past_the_leases_deadline_are_neither_numbered_nor_published(
    metrics,
):
    """A replica that stalled wakes past its lease's deadline, its connection's frames
    buffered: another may hold the feed by then and number the same mints, so a seq given
    here could be one of its (consumers would drop one of the two). They are dropped and
    counted; numbering goes on where it was once the lease is held again."""
    bus, got = await collecting_bus()
    clock = ReplayClock(1000.0)
    feed = ScriptedFeed(clock)
    holds = True
    manager = DataFeedManager(
        bus, config=FeedManagerConfig(source="feed/test"), metrics=metrics,
        numbering=lambda: holds,
    )  # fmt: skip
    manager.add_data_feed(feed)
    await feed.push(ref.CREATE, trade(A, 1))
    holds = False
    await feed.push(trade(A, 2), trade(A, 3))
    holds = True
    await feed.push(trade(A, 4))
    await bus.drain()
    assert [(e.type, e.seq) for e in got] == [
        ("token.created", 1), ("token.trade", 1), ("token.trade", 2),
    ]  # fmt: skip
    assert got[-1].data.signature == signature(A, 4)
    assert manager.unled == 2 and metrics.unled_frames._value.get() == 2
    await bus.close()


async def test_subscription_calls_reach_every_feed(metrics):
    clock = ReplayClock()
    feeds = [ScriptedFeed(clock), ScriptedFeed(clock)]
    manager = DataFeedManager(None, config=FeedManagerConfig(source="feed/x"), metrics=metrics)
    for feed in feeds:
        manager.add_data_feed(feed)
    await manager.subscribe_to_token(A)
    await manager.unsubscribe_from_token([A, B])
    assert [f.subscribed for f in feeds] == [[A], [A]]
    assert [f.unsubscribed for f in feeds] == [[A, B], [A, B]]


def test_recent_signatures_is_bounded():
    recent = RecentSignatures(capacity=3)
    assert not recent.seen("buy", "a")
    assert recent.seen("buy", "a")
    assert not recent.seen("sell", "a")  # same signature, other txType
    for sig in "bcd":
        recent.seen("buy", sig)
    assert len(recent) == 3
    assert not recent.seen("sell", "a")  # evicted: the oldest went first


@pytest.mark.postgres
async def test_recorder_stores_then_publishes_and_replay_reproduces_the_stream(pg_pool, metrics):
    bus, got = await collecting_bus()
    store = TokenEventStore(pg_pool)
    recorder = Recorder(store, publisher=bus, config=RecorderConfig(outbox="feed", batch_size=3),
                        metrics=metrics)  # fmt: skip
    manager = DataFeedManager(bus, config=FeedManagerConfig(source="feed/test"),
                              recorder=recorder, metrics=metrics)  # fmt: skip
    clock = ReplayClock(50.0)
    feed = ScriptedFeed(clock)
    manager.add_data_feed(feed)
    await manager.start()
    frames = [ref.CREATE, *(trade(A, i) for i in range(7)), ref.OLD_BUY, ref.MIGRATE]
    await feed.push(*frames, step=0.5)
    await recorder.flush()
    await bus.drain()
    assert len(got) == len(frames)
    assert await store.count() == len(frames)
    # every published event was stored first: the outbox position covers them all
    last_id = await pg_pool.fetchval("SELECT max(id) FROM token_events")
    assert await store.outbox_position("feed") == last_id

    replayed: list[Event] = []
    replay_frames: list[bytes] = []
    db_feed = DatabaseDataFeed(store, clock=ReplayClock())

    async def capture(record: FeedRecord) -> None:
        replayed.append(record.event)
        replay_frames.append(record.frame)

    db_feed.register_callback(ALL_EVENTS, capture)
    assert await db_feed.run() == len(frames)
    assert replayed == got
    assert replay_frames == frames
    assert [encode_payload(e.data) for e in replayed] == [encode_payload(e.data) for e in got]
    await manager.stop()
    await bus.close()


@pytest.mark.postgres
async def test_stored_but_unpublished_events_are_republished_on_restart(pg_pool, metrics):
    store = TokenEventStore(pg_pool)
    await store.outbox_position("feed")  # the service existed before the crash
    clock = ReplayClock(10.0)
    # the "crash": stored, never published (no publisher), outbox not advanced
    crashed = Recorder(store, publisher=None, config=RecorderConfig(outbox="feed"),
                       metrics=metrics)  # fmt: skip
    manager = DataFeedManager(None, config=FeedManagerConfig(source="feed/old"),
                              recorder=crashed, metrics=metrics)  # fmt: skip
    feed = ScriptedFeed(clock)
    manager.add_data_feed(feed)
    await manager.start()
    await feed.push(trade(A, 1), trade(A, 2))
    await crashed.flush()
    await manager.stop()

    bus, got = await collecting_bus()
    restarted = Recorder(store, publisher=bus, config=RecorderConfig(outbox="feed"),
                         metrics=metrics)  # fmt: skip
    assert await restarted.recover() == 2
    await bus.drain()
    assert [(e.key, e.seq) for e in got] == [(A, 1), (A, 2)]
    assert await restarted.recover() == 0  # confirmed now
    # numbering goes on after a restart
    sequencer = Sequencer(await store.last_seq_by_mint())
    assert sequencer.next(A) == 3
    await bus.close()


@pytest.mark.postgres
async def test_a_frame_stored_before_a_restart_is_not_published_again(pg_pool, metrics):
    store = TokenEventStore(pg_pool)
    clock = ReplayClock(10.0)
    first = Recorder(store, publisher=None, metrics=metrics)
    old = DataFeedManager(None, config=FeedManagerConfig(source="feed/old"), recorder=first,
                          metrics=metrics)  # fmt: skip
    feed = ScriptedFeed(clock)
    old.add_data_feed(feed)
    await old.start()
    await feed.push(trade(A, 1), trade(A, 2))
    await first.flush()
    await old.stop()

    # a new process: its signature memory is empty, its numbering restored from the store
    bus, got = await collecting_bus()
    second = Recorder(store, publisher=bus, metrics=metrics)
    manager = DataFeedManager(bus, config=FeedManagerConfig(source="feed/new"), recorder=second,
                              metrics=metrics, clock=clock)  # fmt: skip
    feed = ScriptedFeed(clock)
    manager.add_data_feed(feed)
    await manager.start()  # restores the numbering from the store
    assert manager.sequencer.last(A) == 2
    # the server sends trade 2 again, then a new one
    await feed.push(trade(A, 2), trade(A, 3))
    await second.flush()
    await bus.drain()
    assert [e.data.signature for e in got] == [signature(A, 3)]
    assert await store.count() == 3
    await manager.stop()
    await bus.close()


@pytest.mark.postgres
async def test_a_batch_retried_after_its_commit_is_still_published(pg_pool):
    store = TokenEventStore(pg_pool)
    clock = ReplayClock(10.0)
    sequencer = Sequencer()
    events = []
    for i in range(3):
        payload = decode_frame(trade(B, i))
        events.append(make_event(payload, source="feed/t", time=clock.now(),
                                 seq=sequencer.next(B)))  # fmt: skip
    first = await store.write_batch(events)
    assert first.inserted == 3 and first.to_publish(events) == events
    # the commit went through but its answer was lost: the retry inserts nothing,
    # and every event is still the stored one, so all of them are published
    retried = await store.write_batch(events)
    assert retried.inserted == 0
    assert retried.to_publish(events) == events


@pytest.mark.postgres
async def test_database_feed_paces_and_filters(pg_pool, metrics):
    store = TokenEventStore(pg_pool)
    clock = ReplayClock(100.0)
    feed = ScriptedFeed(clock)
    recorder = Recorder(store, metrics=metrics)
    manager = DataFeedManager(None, config=FeedManagerConfig(source="feed/t"), recorder=recorder,
                              metrics=metrics)  # fmt: skip
    manager.add_data_feed(feed)
    await manager.start()
    await feed.push(trade(A, 1), trade(B, 1), trade(A, 2), trade(B, 2), step=0.2)
    await manager.stop()

    replay_clock = ReplayClock()
    fired: list[float] = []
    replay_clock.call_at(100.5, lambda: fired.append(replay_clock.now()))
    db_feed = DatabaseDataFeed(store, ReplayConfig(speed=4.0, mints=(A, B)), clock=replay_clock)
    await db_feed.unsubscribe([B])
    seen: list[tuple[str, float, float]] = []

    async def capture(record: FeedRecord) -> None:
        seen.append((record.event.key, record.time, replay_clock.now()))

    db_feed.register_callback(ALL_EVENTS, capture)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await db_feed.connect()
    assert await db_feed.wait_done() == 2
    took = loop.time() - began
    assert [(k, round(t, 6)) for k, t, _ in seen] == [(A, 100.2), (A, 100.6)]
    assert all(now == t for _, t, now in seen)  # the clock stands at each event's time
    assert fired == [100.5]
    assert took >= 0.4 / 4.0 * 0.9  # 0.4 s of event time at 4x


async def test_jsonl_sink_writes_one_envelope_per_line(tmp_path, metrics):
    from pumpflow.common.events import decode_event

    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    recorder = Recorder(sink, metrics=metrics)
    manager = DataFeedManager(None, config=FeedManagerConfig(source="record/x"),
                              recorder=recorder, metrics=metrics)  # fmt: skip
    feed = ScriptedFeed(ReplayClock())
    manager.add_data_feed(feed)
    await manager.start()
    await feed.push(ref.CREATE, ref.SELL)
    await manager.stop()
    sink.close()
    lines = path.read_bytes().splitlines()
    assert [decode_event(line).data for line in lines] == [
        decode_frame(ref.CREATE), decode_frame(ref.SELL),
    ]  # fmt: skip


def created(mint: str) -> bytes:
    """The reference creation frame, of ``mint``."""
    payload = decode_frame(ref.CREATE)
    return encode_payload(
        msgspec.structs.replace(payload, mint=mint, signature=base58_key(f"c-{mint}", 88))
    )


async def test_numbering_holds_the_mints_of_the_window_only_and_never_reuses_a_seq(metrics):
    bus, got = await collecting_bus()
    clock = ReplayClock(10.0)
    window = 60.0
    manager = DataFeedManager(bus, config=FeedManagerConfig(source="feed/t",
                              seq_restore_window_s=window), clock=clock,
                              metrics=metrics)  # fmt: skip
    feed = ScriptedFeed(clock)
    manager.add_data_feed(feed)
    await manager.start()
    held = []
    mints = [base58_key(f"M{n}") for n in range(400)]
    for n, mint in enumerate(mints):
        await feed.push(created(mint), trade(mint, 1), trade(mint, 2))
        if n % 10 == 0 and n >= 100:  # an old mint trades again, long after it went quiet
            await feed.push(trade(mints[n - 100], 1000 + n))
        held.append(len(manager.sequencer))
    # a launch every 3 s (or so): about the last 20 are held, not all 400
    assert max(held) < 40
    assert max(held[200:]) <= max(held[:200])
    per_mint: dict[str, list[int]] = {}
    for event in got:
        per_mint.setdefault(event.key, []).append(event.seq)
    for mint, seqs in per_mint.items():
        assert seqs == sorted(set(seqs)), mint  # never a seq twice, never one backwards
        assert seqs[:3] == [1, 2, 3], mint
    assert per_mint[mints[100]][3] > 3  # back after it left: above every seq given
    # and only that event says the mint's numbering starts afresh
    assert [(e.key, e.seq) for e in got if e.renumbered] == [
        (mints[n - 100], per_mint[mints[n - 100]][3]) for n in range(100, 400, 10)
    ]
    await bus.close()


async def seqs_consumer(bus: InMemoryBus) -> KeyedStatefulConsumer:
    """A keyed consumer of the trades on ``bus`` that keeps the seqs each mint applied."""
    clock = ReplayClock(0.0)
    consumer = KeyedStatefulConsumer(
        AppliedSeqs(),
        KeyedConsumerConfig(service="seqs", patterns=("token.trade",)),
        bus=bus,
        store=MemoryStateStore(clock),
        clock=clock,
        source="seqs/test",
        metrics=ConsumerMetrics("seqs", registry=CollectorRegistry()),
    )
    await consumer.start()
    return consumer


@pytest.mark.postgres
async def test_a_renumbered_event_keeps_its_mark_republished_or_replayed_from_the_store(
    pg_pool, metrics
):
    """The first event of a mint's fresh numbering, stored and read back, still says so:
    a consumer takes its jump for no gap."""
    store = TokenEventStore(pg_pool)
    await store.outbox_position("feed")  # the service existed before the crash
    marks = [(1, False), (2, False), (40, True), (41, False)]
    frames = [trade(A, i) for i in range(len(marks))]
    events = [
        make_event(decode_frame(frame), source="feed/old", time=10.0 + i, seq=seq,
                   received_at=10.0 + i, renumbered=renumbered)
        for i, (frame, (seq, renumbered)) in enumerate(zip(frames, marks, strict=True))
    ]  # fmt: skip
    # stored, never published: the feed crashed before its outbox moved
    assert await store.write(events, frames) == len(events)

    bus, got = await collecting_bus()
    consumer = await seqs_consumer(bus)
    restarted = Recorder(store, publisher=bus, config=RecorderConfig(outbox="feed"),
                         metrics=metrics)  # fmt: skip
    assert await restarted.recover() == len(events)
    await bus.drain()
    assert [(e.seq, e.renumbered) for e in got] == marks
    await consumer.flush()
    assert consumer.state(A) == [1, 2, 40, 41]
    assert consumer.metrics.counts()["gaps"] == 0
    await consumer.stop()
    await bus.close()

    replayed: list[Event] = []

    async def capture(record: FeedRecord) -> None:
        replayed.append(record.event)

    db_feed = DatabaseDataFeed(store, clock=ReplayClock())
    db_feed.register_callback(ALL_EVENTS, capture)
    assert await db_feed.run() == len(events)
    assert replayed == events
    # the look-back's older events, and what a consumer rebuilds a lost record from
    older = await db_feed.get_historical_data(A, None, None)
    assert [(e.seq, e.renumbered) for e in older] == marks
    assert [(e.seq, e.renumbered) for e in await store.history(A, "feed", 100)] == marks
    bus, _ = await collecting_bus()
    consumer = await seqs_consumer(bus)
    await bus.publish_many(replayed)
    await bus.drain()
    await consumer.flush()
    assert consumer.state(A) == [1, 2, 40, 41]
    assert consumer.metrics.counts()["gaps"] == 0
    await consumer.stop()
    await bus.close()


@pytest.mark.postgres
async def test_a_restart_restores_the_window_and_goes_on_above_every_stored_seq(pg_pool, metrics):
    store = TokenEventStore(pg_pool)
    clock = ReplayClock(10.0)
    first = Recorder(store, publisher=None, metrics=metrics)
    old = DataFeedManager(None, config=FeedManagerConfig(source="feed/old"), recorder=first,
                          clock=clock, metrics=metrics)  # fmt: skip
    feed = ScriptedFeed(clock)
    old.add_data_feed(feed)
    await old.start()
    old_mint, new_mint = base58_key("OLD"), base58_key("NEW")
    await feed.push(*(trade(old_mint, i) for i in range(5)))
    await clock.advance(4 * 3600.0)
    await feed.push(trade(new_mint, 0), trade(new_mint, 1))
    await first.flush()
    await old.stop()

    bus, got = await collecting_bus()
    second = Recorder(store, publisher=bus, metrics=metrics)
    manager = DataFeedManager(bus, config=FeedManagerConfig(source="feed/new"), recorder=second,
                              clock=clock, metrics=metrics)  # fmt: skip
    feed = ScriptedFeed(clock)
    manager.add_data_feed(feed)
    await manager.start()
    # only the window's mints are held; the floor covers every other
    assert manager.sequencer.snapshot() == {new_mint: 2}
    assert manager.sequencer.floor == 5
    await feed.push(trade(old_mint, 5), trade(new_mint, 2))
    await second.flush()
    await bus.drain()
    assert [(e.key, e.seq, e.renumbered) for e in got] == [
        (old_mint, 6, True),
        (new_mint, 3, False),
    ]
    await manager.stop()
    await bus.close()


@pytest.mark.postgres
async def test_a_replica_leading_again_never_repeats_a_seq_its_successor_gave(pg_pool, metrics):
    """Replica one numbers a mint, stands by while two numbers it further, and leads again
    after the mint went quiet for longer than the window: the mint goes on above two's."""
    store = TokenEventStore(pg_pool)
    clock = ReplayClock(10.0)
    bus, got = await collecting_bus()
    mint, other = base58_key("QUIET"), base58_key("OTHER")

    def replica(source: str) -> tuple[DataFeedManager, ScriptedFeed]:
        recorder = Recorder(store, publisher=bus, metrics=metrics)
        manager = DataFeedManager(bus, config=FeedManagerConfig(source=source),
                                  recorder=recorder, clock=clock, metrics=metrics)  # fmt: skip
        feed = ScriptedFeed(clock)
        manager.add_data_feed(feed)
        return manager, feed

    one, one_feed = replica("feed/one")
    await one.start()
    await one_feed.push(*(trade(mint, i) for i in range(3)))
    await one.recorder.flush()
    await one.disconnect()  # the lease is lost: it stands by, its numbering kept

    two, two_feed = replica("feed/two")
    await two.start()
    await two_feed.push(*(trade(mint, i) for i in range(3, 6)))
    await two.stop()

    await clock.advance(2 * 3600.0)  # the mint is quiet for longer than the window
    await one.start()  # leads again
    await one_feed.push(trade(mint, 6), trade(other, 0))
    await one.recorder.flush()
    await bus.drain()
    seqs = [e.seq for e in got if e.key == mint]
    assert seqs[:6] == [1, 2, 3, 4, 5, 6]
    assert len(seqs) == 7 and seqs[6] > 6, seqs
    await one.stop()
    await bus.close()
