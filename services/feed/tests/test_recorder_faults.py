"""The recorder under faults, against real Postgres: a refused row, a store that goes away."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import string
from urllib.parse import urlsplit

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.idempotency import Sequencer
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock
from pumpflow.common.db.pool import create_pool
from pumpflow.common.dependencies import NETWORK, POSTGRES, WAITS
from pumpflow.common.events import Event, encode_payload, make_event
from pumpflow.common.pumpportal import decode_frame
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import EventCollector, eventually
from pumpflow.common.testing.proxy import TcpProxy
from pumpflow.feed import reference_frames as ref
from pumpflow.feed.dead_letters import DeadLetterQueue
from pumpflow.feed.metrics import FeedMetrics
from pumpflow.feed.recorder import Recorder, RecorderConfig

pytestmark = pytest.mark.postgres


def trades(count: int, *, refused_at: tuple[int, ...] = ()) -> list[Event]:
    """Trades of one mint, seq 1..count; those at ``refused_at`` carry a 10 KB signature.

    Such a signature is more than Postgres can index (8191 bytes): it comes straight
    through the recorder here, as a decoder without field bounds would let it.
    """
    clock = ReplayClock(100.0)
    base = decode_frame(ref.SELL)
    out = []
    for i in range(count):
        signature = f"sig-{i}"
        if i in refused_at:
            alphabet = string.ascii_letters + string.digits
            signature = "".join(random.Random(i).choices(alphabet, k=10_000))
        payload = msgspec.structs.replace(base, signature=signature)
        out.append(make_event(payload, source="feed/t", time=clock.now() + i, seq=i + 1))
    return out


async def bus_with_probe() -> tuple[InMemoryBus, EventCollector]:
    bus = InMemoryBus(partitions=2, synchronous=True, source="feed/t")
    await bus.start()
    probe = await EventCollector("probe").attach(bus, "token.*")
    return bus, probe


async def test_a_row_the_store_refuses_is_dead_lettered_and_everything_around_it_stored(pg_pool):
    bus, probe = await bus_with_probe()
    metrics = FeedMetrics(CollectorRegistry())
    letters = DeadLetterQueue(bus, service="feed", metrics=metrics)
    letters.start()
    store = TokenEventStore(pg_pool)
    await store.outbox_position("feed")
    recorder = Recorder(store, publisher=bus, metrics=metrics, dead_letters=letters,
                        config=RecorderConfig(outbox="feed", batch_size=16))  # fmt: skip
    await recorder.start()
    events = trades(40, refused_at=(5, 6, 23))
    for event in events:
        await recorder.add(event)
    await asyncio.wait_for(recorder.flush(), 30)  # never returned: the batch was retried forever
    good = [e for i, e in enumerate(events) if i not in (5, 6, 23)]
    assert await store.count() == len(good)
    await bus.drain()
    assert [e.id for e in probe.events] == [e.id for e in good]  # published, in order
    assert await store.outbox_position("feed") == await pg_pool.fetchval(
        "SELECT max(id) FROM token_events"
    )
    await letters.flush()
    dead = await bus.dead_letters("feed")
    refused = [events[5], events[6], events[23]]
    assert [letter.body for letter in dead] == [encode_payload(e.data) for e in refused]
    assert all("index row requires" in letter.reason for letter in dead)
    assert [f"{e.id} (mint {e.key}, seq {e.seq})" in letter.reason
            for e, letter in zip(refused, dead, strict=True)] == [True] * 3  # fmt: skip
    assert {letter.event_type for letter in dead} == {"token.trade"}
    assert recorder.rejected == 3 and metrics.record_rejected._value.get() == 3
    # the stream goes on
    later = trades(45)[40:]
    for event in later:
        await recorder.add(event)
    await recorder.flush()
    assert await store.count() == len(good) + 5
    assert await recorder.close(5) == 0
    await letters.close(5)
    await bus.close()


@pytest.fixture
async def own_store(own_postgres):
    pool = await create_pool(own_postgres.dsn, "feed_faults", min_size=0, max_size=2)
    yield own_postgres, TokenEventStore(pool)
    await asyncio.wait_for(pool.close(), 10)


async def test_a_store_that_goes_away_is_waited_out_and_readiness_says_why(own_store, caplog):
    server, store = own_store
    bus, probe = await bus_with_probe()
    letters = DeadLetterQueue(bus, service="feed")
    letters.start()
    config = RecorderConfig(retry_initial_s=0.05, retry_max_s=0.2, ready_max_age_s=0.3)
    recorder = Recorder(store, publisher=bus, dead_letters=letters, config=config)
    await recorder.start()
    events = trades(30)
    for event in events[:10]:
        await recorder.add(event)
    await recorder.flush()
    assert recorder.problem() is None
    await asyncio.to_thread(server.stop)
    for event in events[10:]:
        await recorder.add(event)
    problem = await eventually(recorder.problem, what="readiness turned false")
    assert "the oldest of 20 events waiting to be stored has waited" in problem
    assert "last failure: store:" in problem
    await asyncio.to_thread(server.start)
    await asyncio.wait_for(recorder.flush(), 30)
    assert recorder.problem() is None
    assert await store.count() == 30
    await bus.drain()
    assert [e.id for e in probe.events] == [e.id for e in events]
    assert recorder.rejected == 0 and letters.sent == 0 and letters.pending == 0
    assert await bus.dead_letters("feed") == []
    await recorder.close(5)
    await letters.close(5)
    await bus.close()


async def test_a_frozen_store_is_waited_for_by_name_and_loses_nothing(
    pg_pool, postgres_dsn, namespace
):
    """A Postgres that never answers (a frozen host, a network lost without a reset):
    each write fails within the pool's bound, and the recorder waits for Postgres by
    name (/readyz and the metrics read it), then stores and publishes every event once."""
    async with TcpProxy(urlsplit(postgres_dsn).port or 5432) as proxy:
        pool = await create_pool(
            proxy.url(postgres_dsn), namespace, apply_migrations=False, command_timeout=1.0
        )
        store = TokenEventStore(pool)
        bus, probe = await bus_with_probe()
        recorder = Recorder(
            store, publisher=bus, config=RecorderConfig(retry_initial_s=0.05, retry_max_s=0.2)
        )
        await recorder.start()
        try:
            events = trades(20)
            for event in events[:10]:
                await recorder.add(event)
            await recorder.flush()
            proxy.freeze()
            for event in events[10:]:
                await recorder.add(event)
            await eventually(
                lambda: POSTGRES in WAITS.describe(), 30, what="the recorder waiting for Postgres"
            )
            assert NETWORK not in WAITS.describe()
            assert recorder.last_error is not None and "TimeoutError" in recorder.last_error
            proxy.thaw()
            await asyncio.wait_for(recorder.flush(), 30)
            assert POSTGRES not in WAITS.describe()
            assert await store.count() == 20
            await bus.drain()
            assert [e.id for e in probe.events] == [e.id for e in events]
        finally:
            proxy.thaw()
            await recorder.close(5)
            await bus.close()
            await asyncio.wait_for(pool.close(), 10)


async def test_the_pending_gauge_counts_every_event_waiting_while_the_store_is_away(own_store):
    server, store = own_store
    registry = CollectorRegistry()
    config = RecorderConfig(retry_initial_s=0.05, retry_max_s=0.2)
    recorder = Recorder(store, config=config, metrics=FeedMetrics(registry))
    await recorder.start()
    await asyncio.to_thread(server.stop)
    events = trades(30)
    await recorder.add(events[0])
    # the writer holds the first one in its batch, retrying, while the rest queue behind
    await eventually(lambda: recorder.last_error, what="the store's first failure")
    for event in events[1:]:
        await recorder.add(event)
    assert recorder.pending == 30
    assert registry.get_sample_value("pumpflow_feed_record_pending") == 30
    await asyncio.to_thread(server.start)
    await asyncio.wait_for(recorder.flush(), 30)
    assert registry.get_sample_value("pumpflow_feed_record_pending") == 0
    await recorder.close(5)


async def test_a_backlog_near_the_readers_limit_is_not_ready(own_store):
    server, store = own_store
    await asyncio.to_thread(server.stop)
    config = RecorderConfig(max_pending=20, ready_max_pending=10, retry_initial_s=0.05)
    recorder = Recorder(store, config=config)
    await recorder.start()
    for event in trades(9):
        await recorder.add(event)
    assert recorder.problem() is None
    await recorder.add(trades(10)[9])
    assert "10 events wait to be stored (ready below 10; the reader waits at 20)" in (
        recorder.problem() or ""
    )
    assert await recorder.close(0.2) == 10


async def test_a_stop_that_cannot_flush_says_how_many_events_it_lost(own_store, caplog):
    server, store = own_store
    await asyncio.to_thread(server.stop)
    recorder = Recorder(store, config=RecorderConfig(retry_initial_s=0.05))
    await recorder.start()
    for event in trades(7):
        await recorder.add(event)
    caplog.set_level(logging.ERROR)
    assert await recorder.close(0.3) == 7
    assert recorder.unstored == 7
    assert "stop: 7 events not stored within 0.3 s: lost" in caplog.text


async def test_a_stop_ends_in_its_bound_when_the_store_stops_answering(own_postgres, caplog):
    """A server that keeps the connection and never answers (a frozen host, a lost
    network) never acknowledges the cancel of the write in flight: the stop leaves it."""
    pool = await create_pool(own_postgres.dsn, "feed_faults", min_size=1, max_size=1)
    store = TokenEventStore(pool)
    recorder = Recorder(store, config=RecorderConfig(retry_initial_s=0.05))
    await recorder.start()
    events = trades(10)
    for event in events[:3]:
        await recorder.add(event)
    await recorder.flush()
    # the pool's one connection: the backend serving it stops, the server goes on
    backend = await pool.fetchval("SELECT pg_backend_pid()")
    os.kill(backend, signal.SIGSTOP)
    try:
        for event in events[3:]:
            await recorder.add(event)
        caplog.set_level(logging.ERROR)
        closing = asyncio.ensure_future(recorder.close(0.3))
        done, _ = await asyncio.wait({closing}, timeout=5)
        assert done, "the stop waits for the store"  # it waited for ever
        assert closing.result() == 7
        assert "stop: 7 events not stored within 0.3 s: lost" in caplog.text
    finally:
        os.kill(backend, signal.SIGCONT)
    await asyncio.wait_for(pool.close(), 10)


async def test_the_service_is_not_ready_while_it_cannot_store_and_its_stop_fails(own_store):
    from pumpflow.common.clock import WallClock
    from pumpflow.common.runtime.service import ServiceContext
    from pumpflow.feed.service import FeedService
    from pumpflow.feed.settings import FeedSettings
    from pumpflow.simulator import server as simulator
    from pumpflow.simulator.market import Market, MarketConfig

    server, store = own_store
    market = simulator.SimulatorServer(
        market=Market(MarketConfig(seed=3, launches_per_minute=120)), speed=40.0
    )
    await market.start()
    bus, _probe = await bus_with_probe()
    settings = FeedSettings(pumpportal_ws_url=market.url, transport="memory", replica="t",
                            feed_record_ready_max_age_s=0.5, feed_stop_flush_s=0.5)  # fmt: skip
    service = FeedService(settings, registry=CollectorRegistry())
    ctx = ServiceContext(settings=settings, bus=bus, clock=WallClock(), db=store._pool)
    await service.start(ctx)
    try:
        await eventually(lambda: service.recorder.stored >= 5, what="events stored")
        # storing, it is ready: at once, but for a batch a loaded machine held past the
        # half second this test allows
        await eventually(lambda: _ready(service), what="ready while it stores")
        await asyncio.to_thread(server.stop)
        status = await eventually(
            lambda: _not_ready(service), what="not ready while Postgres is away"
        )
        assert status["reason"].startswith("recorder: the oldest of ")
        assert status["connected"] is True
        with pytest.raises(RuntimeError, match=r"without storing [1-9]\d* events"):
            await service.stop()
    finally:
        await service.stop()
        await market.stop()
        await bus.close()


async def _ready(service) -> bool:
    return (await service.status())["ready"] is True


async def _not_ready(service) -> dict | None:
    status = await service.status()
    return None if status["ready"] else status


async def test_a_reader_held_up_by_the_store_is_counted_and_reported(own_store, caplog):
    server, store = own_store
    await asyncio.to_thread(server.stop)
    metrics = FeedMetrics(CollectorRegistry())
    config = RecorderConfig(max_pending=5, ready_max_pending=5, retry_initial_s=0.05,
                            retry_max_s=0.2)  # fmt: skip
    recorder = Recorder(store, config=config, metrics=metrics)
    await recorder.start()
    events = trades(12)
    caplog.set_level(logging.WARNING)
    reader = asyncio.create_task(_add_all(recorder, events))
    await eventually(lambda: "the socket reader waits for the store" in caplog.text)
    assert not reader.done()
    await asyncio.to_thread(server.start)
    await asyncio.wait_for(reader, 30)
    await asyncio.wait_for(recorder.flush(), 30)
    assert await store.count() == 12
    assert recorder.reader_waited_s > 0
    assert metrics.record_reader_wait._value.get() == recorder.reader_waited_s
    assert "the socket reader goes on after waiting" in caplog.text
    await recorder.close(5)


async def _add_all(recorder: Recorder, events: list[Event]) -> None:
    for event in events:
        await recorder.add(event)


async def test_a_refused_seq_is_never_given_again_by_a_restarted_feed(pg_pool):
    bus, _ = await bus_with_probe()
    letters = DeadLetterQueue(bus, service="feed")
    letters.start()
    store = TokenEventStore(pg_pool)
    recorder = Recorder(store, publisher=bus, dead_letters=letters)
    await recorder.start()
    events = trades(3, refused_at=(2,))  # the mint's newest event is refused
    for event in events:
        await recorder.add(event)
    await recorder.flush()
    assert recorder.rejected == 1 and await store.count() == 2
    mint = events[0].key
    # a restarted feed restores its numbering from the store: above the refused seq
    assert await store.last_seq_by_mint() == {mint: 3}
    assert await store.last_seq_by_mint(since=events[2].time) == {mint: 3}
    assert await store.last_seq_by_mint(since=events[2].time + 1) == {}
    assert await store.max_seq() == 3
    restarted = Sequencer(await store.last_seq_by_mint())
    assert restarted.next(mint) == 4
    await recorder.close(5)
    await letters.close(5)
    await bus.close()


class _HeldMarks(TokenEventStore):
    """The real store, whose outbox marks wait until ``release`` is set."""

    def __init__(self, pool):
        super().__init__(pool)
        self.release = asyncio.Event()
        self.marks_begun = 0

    async def mark_published(self, publisher: str, last_id: int) -> None:
        self.marks_begun += 1
        await self.release.wait()
        await super().mark_published(publisher, last_id)


async def test_the_next_batch_is_stored_and_published_while_the_last_mark_waits(pg_pool):
    """The outbox mark is off the receipt path: a slow mark holds no later event, and a
    flush still returns only once the position covers everything published."""
    bus, probe = await bus_with_probe()
    store = _HeldMarks(pg_pool)
    await store.outbox_position("feed")
    recorder = Recorder(store, publisher=bus, metrics=FeedMetrics(CollectorRegistry()),
                        config=RecorderConfig(outbox="feed", batch_size=4))  # fmt: skip
    await recorder.start()
    events = trades(12)
    for event in events[:4]:
        await recorder.add(event)
    await eventually(lambda: store.marks_begun == 1)
    for event in events[4:]:
        await recorder.add(event)
    # stored and published while the first batch's mark still waits
    await eventually(lambda: len(probe.events) == len(events), within=10)
    assert await store.count() == len(events)
    flushed = asyncio.ensure_future(recorder.flush())
    await asyncio.sleep(0)
    assert not flushed.done()
    store.release.set()
    await asyncio.wait_for(flushed, 10)
    assert await store.outbox_position("feed") == await pg_pool.fetchval(
        "SELECT max(id) FROM token_events"
    )
    await recorder.close()


async def test_a_frame_stored_already_as_another_event_is_counted_and_said(pg_pool, caplog):
    """A frame another writer of the schema stored first (a feed replica before a take-over,
    or ``pumpflow record`` or ``sim load`` into the deployment's schema by mistake) is not
    published again: counted as a duplicate and said, so a feed that publishes less than
    it receives says why."""
    caplog.set_level(logging.WARNING, logger="pumpflow.feed")
    bus, probe = await bus_with_probe()
    metrics = FeedMetrics(CollectorRegistry())
    store = TokenEventStore(pg_pool)
    await store.outbox_position("feed")
    events = trades(6)
    # the same frames as other events: another writer's ids and seqs
    elsewhere = [msgspec.structs.replace(e, id=f"{e.id}-elsewhere", seq=None) for e in events[:4]]
    await store.write_batch(elsewhere)
    recorder = Recorder(store, publisher=bus, metrics=metrics,
                        config=RecorderConfig(outbox="feed", batch_size=16))  # fmt: skip
    await recorder.start()
    for event in events:
        await recorder.add(event)
    await asyncio.wait_for(recorder.flush(), 30)
    await bus.drain()
    assert [e.id for e in probe.events] == [e.id for e in events[4:]]
    assert metrics.duplicates._value.get() == 4
    [said] = [r.getMessage() for r in caplog.records if "stored already" in r.getMessage()]
    assert "not published" in said and "(4 so far)" in said, said
    await recorder.close()
