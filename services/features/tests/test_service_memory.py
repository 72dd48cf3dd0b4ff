"""FeaturesService over the in-memory bus and store."""

from __future__ import annotations

from collections import Counter

import httpx
import msgspec
import pytest
from fastapi import FastAPI
from features_helpers import market_events
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import TokenLifecycle, make_event
from pumpflow.common.features import FeatureManager
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state import MemoryStateStore
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import EventCollector, TokenEvents, eventually
from pumpflow.features.service import FeaturesService, FeaturesSettings

TRADE_TYPES = ("token.created", "token.trade")


async def start_service(bus, store, clock) -> FeaturesService:
    settings = FeaturesSettings.load(service="features", transport="memory", partitions=4)
    service = FeaturesService(settings, registry=CollectorRegistry())
    await service.start(ServiceContext(settings=settings, bus=bus, clock=clock, store=store))
    return service


@pytest.fixture
async def system():
    clock = ReplayClock(1_700_000_000.0)
    bus = InMemoryBus(partitions=4, synchronous=True, source="test")
    await bus.start()
    store = MemoryStateStore(clock)
    collector = await EventCollector("collector").attach(bus, "features.updated")
    yield bus, store, clock, collector
    await bus.close()


def expected_features(events) -> dict[str, tuple]:
    manager = FeatureManager()
    for e in events:
        manager.update_feature_history(e)
    return {m: manager.generate_features(m).values for m in manager.mints()}


def assert_continuous(collector: EventCollector, events) -> None:
    counts: dict[str, int] = {}
    for e in events:
        if e.type in TRADE_TYPES:
            counts[e.key] = counts.get(e.key, 0) + 1
    assert set(collector.by_key()) == set(counts)
    for mint, updates in collector.by_key().items():
        assert [u.seq for u in updates] == list(range(1, counts[mint] + 1)), mint


async def test_every_trade_gives_one_update_and_the_store_holds_the_latest(system):
    bus, store, clock, collector = system
    events = market_events(3, 120.0)
    service = await start_service(bus, store, clock)
    for e in events:
        clock.set_sync(e.time)
        await bus.publish(e)
    assert_continuous(collector, events)
    by_id = {e.id: e for e in events}
    for mint, updates in collector.by_key().items():
        last = updates[-1]
        cause = by_id[last.causation_id]
        assert cause.key == mint and last.data.source_seq == cause.seq
        assert last.data.feature_set_version == service.manager.version
    expected = expected_features(events)
    for mint, values in expected.items():
        stored = await service.read_features(mint)
        assert tuple(stored["features"][n] for n in service.manager.names) == values
        assert stored["version"] == service.manager.version
    # The HTTP endpoint serves the same.
    app = FastAPI()
    app.include_router(service.router())
    mint = next(iter(expected))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://features"
    ) as client:
        found = await client.get(f"/features/{mint}")
        missing = await client.get("/features/nope")
    assert found.status_code == 200
    assert found.json()["features"]["price"] == expected[mint][0]
    assert missing.status_code == 404
    await service.stop()


async def test_a_restarted_replica_resumes_from_the_store(system):
    bus, store, clock, collector = system
    events = market_events(4, 150.0)
    half = len(events) // 2
    first = await start_service(bus, store, clock)
    for e in events[:half]:
        await bus.publish(e)
    await first.stop()
    # A new process: fresh bus (no memory of seen seqs) and service, the same store.
    bus2 = InMemoryBus(partitions=4, synchronous=True, source="test2")
    await bus2.start()
    await bus2.subscribe(
        Subscription(service="collector", patterns=("features.updated",), handler=collector)
    )
    second = await start_service(bus2, store, clock)
    # The broker redelivers what was in flight at the crash: duplicates, dropped.
    for e in events[half - 5 : half]:
        await bus2.publish(e)
    for e in events[half:]:
        await bus2.publish(e)
    counts = second.consumer_metrics.counts()
    assert counts["duplicates"] == 5
    assert counts["restored"] > 0
    assert_continuous(collector, events)
    for mint, values in expected_features(events).items():
        stored = await second.read_features(mint)
        assert tuple(stored["features"][n] for n in second.manager.names) == values
    await second.stop()
    await bus2.close()


async def test_inactive_tokens_are_dropped_and_expire(system):
    bus, store, clock, _collector = system
    events = [e for e in market_events(5, 30.0) if e.type in TRADE_TYPES]
    service = await start_service(bus, store, clock)
    for e in events:
        await bus.publish(e)
    mint = events[0].key
    assert mint in service.consumer.keys()
    lifecycle = TokenLifecycle(mint=mint, state="inactive", previous_state="declining")
    await bus.publish(make_event(lifecycle, source="activity/x", time=clock.now(), seq=1))
    assert mint not in service.consumer.keys()
    assert await service.read_features(mint) is not None
    await clock.advance(service.settings.features_inactive_ttl_s + 1)
    assert await service.read_features(mint) is None
    await service.stop()


@pytest.mark.parametrize("retiring", ["inactive", "graduated"])
async def test_a_late_trade_of_a_retired_token_is_announced_and_lets_it_go_again(system, retiring):
    # activity retires a straggler's token again without a lifecycle event, and a
    # graduate's trades on its new pool come after its last one: nothing else lets go
    bus, store, clock, collector = system
    events = [e for e in market_events(5, 30.0) if e.type in TRADE_TYPES]
    service = await start_service(bus, store, clock)
    for e in events:
        await bus.publish(e)
    mint = events[0].key
    lifecycle = TokenLifecycle(mint=mint, state=retiring, previous_state="active")
    await bus.publish(make_event(lifecycle, source="activity/x", time=clock.now(), seq=1))
    assert mint not in service.consumer.keys()
    last = [e for e in events if e.key == mint][-1]
    await clock.advance(60.0)
    late = msgspec.structs.replace(last.data, signature="late")
    await bus.publish(make_event(late, source=last.source, time=clock.now(), seq=last.seq + 1))
    assert collector.by_key()[mint][-1].data.source_seq == last.seq + 1
    assert mint not in service.consumer.keys()
    assert (await service.read_features(mint))["seq"] == last.seq + 1
    await clock.advance(service.settings.features_inactive_ttl_s + 1)
    assert await service.read_features(mint) is None
    await service.stop()


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ({"vTokensInBondingCurve": 0}, "reserves"),
        # more SOL than exists: more lamports than a checkpoint holds
        ({"txType": "buy", "solAmount": 2e10}, "lamports"),
    ],
    ids=["no reserves", "too large to store"],
)
async def test_bad_trade_is_dead_lettered_and_the_stream_goes_on(system, broken, reason):
    bus, store, clock, collector = system
    events = [e for e in market_events(6, 20.0) if e.type in TRADE_TYPES]
    service = await start_service(bus, store, clock)
    for e in events[:3]:
        await bus.publish(e)
    good = next(e for e in events[3:] if e.type == "token.trade")
    bad = msgspec.structs.replace(good.data, **broken)
    await bus.publish(make_event(bad, source="feed/sim", time=good.time, seq=good.seq))
    letters = await bus.dead_letters("features")
    assert len(letters) == 1 and reason in letters[0].reason
    assert service.consumer_metrics.counts()["invalid"] == 1
    for e in events[3:]:
        if e is not good:
            await bus.publish(e)
    assert service.consumer_metrics.counts()["applied"] == len(events) - 1
    assert service.consumer_metrics.counts()["gaps"] == 0  # the dead letter's seq is used up
    # the token's later trades are stored and announced: its state can still be encoded
    last = [e for e in events if e.key == good.key][-1]
    assert last is not good
    await eventually(
        lambda: any(u.data.source_seq == last.seq for u in collector.by_key().get(last.key, ()))
    )
    stored = await service.read_features(last.key)
    assert stored is not None and stored["seq"] == last.seq
    await service.stop()


async def test_idle_tokens_are_compacted_and_publish_the_same_afterwards(system):
    import msgspec

    bus, store, clock, collector = system
    events = [e for e in market_events(7, 90.0) if e.type in TRADE_TYPES]
    split = len(events) // 2
    # Every token falls silent for 1,000 s half way, longer than every window.
    events = events[:split] + [
        msgspec.structs.replace(e, time=e.time + 1_000.0) for e in events[split:]
    ]
    service = await start_service(bus, store, clock)
    for e in events[:split]:
        await clock.advance_to(e.time)
        await bus.publish(e)
    await clock.advance_to(events[split].time - 1.0)
    full = {
        m: len(service.processor.encode(service.consumer.state(m))) for m in service.consumer.keys()
    }
    assert service.consumer.compact(idle_s=0.0) == len(service.consumer) > 0
    assert (await service.status())["compact"] == len(service.consumer)
    # idle tokens are held frozen (windows gone, wallets as ids): smaller than a checkpoint
    held = {m: len(service.consumer._keys[m].raw) for m in full}
    assert sum(held.values()) < sum(full.values())
    for e in events[split:]:
        await clock.advance_to(e.time)
        await bus.publish(e)
    assert_continuous(collector, events)
    published = {m: updates[-1].data.values for m, updates in collector.by_key().items()}
    assert published == expected_features(events)
    await service.stop()


async def _last_features_behind_the_market(*, compact: bool) -> dict[str, float]:
    """A token's features after its last trade, applied 400 s of the clock after the
    market made it (a backlog), with or without a compaction 20 s (of event time)
    before that trade."""
    start, lag = 1_700_000_000.0, 400.0
    tokens = TokenEvents()
    mint = tokens.mint()
    events = [tokens.created(mint, time=start)]
    events += [tokens.buy(mint, f"w{i}", time=start + 2 * i) for i in range(1, 16)]
    last = tokens.sell(mint, "w3", time=events[-1].time + 20)
    clock = ReplayClock(start)
    bus = InMemoryBus(partitions=4, synchronous=True, source="test")
    await bus.start()
    try:
        collector = await EventCollector("collector").attach(bus, "features.updated")
        service = await start_service(bus, MemoryStateStore(clock), clock)
        for event in events:
            await clock.advance_to(event.time + lag)
            await bus.publish(event)
        if compact:
            assert service.consumer.compact(idle_s=0.0) == 1
        await clock.advance_to(last.time + lag)
        await bus.publish(last)
        await service.stop()
        updates = collector.by_key()[mint]
        assert updates[-1].data.source_seq == last.seq
        return dict(zip(updates[-1].data.names, updates[-1].data.values, strict=True))
    finally:
        await bus.close()


async def test_a_token_compacted_while_the_consumer_is_behind_the_market_keeps_its_windows():
    """Idle is judged in the market's time: 400 s of the clock behind it, a token whose
    next trade comes 20 s later is not idle, and compacting it changes no feature."""
    compacted = await _last_features_behind_the_market(compact=True)
    assert compacted == await _last_features_behind_the_market(compact=False)


async def test_a_revoked_partitions_tokens_leave_memory_and_reload_with_the_stores_ttl(system):
    """A token retired on another replica while away comes back here without that TTL."""
    from pumpflow.common.bus.routing import partition_of

    bus, store, clock, _ = system
    events = market_events(5, 120.0)
    by_mint: dict[str, list] = {}
    for e in events:
        if e.type in TRADE_TYPES:
            by_mint.setdefault(e.key, []).append(e)
    mint, stream = max(by_mint.items(), key=lambda kv: len(kv[1]))
    assert len(stream) >= 4
    here = await start_service(bus, store, clock)
    there = await start_service(bus, store, clock)
    for e in stream[:3]:
        clock.set_sync(e.time)
        await here.consumer.handle(e)
    partition = partition_of(mint, 4)
    others = [m for m in by_mint if partition_of(m, 4) != partition]
    for m in others:
        await here.consumer.handle(by_mint[m][0])
    await here.consumer.revoke((partition,))
    assert mint not in here.consumer.keys()
    assert all(m in here.consumer.keys() for m in others)  # other partitions stay
    # meanwhile the other replica owns it and sees it retire: its keys get a TTL
    await there.consumer.assign((partition,))
    retired = make_event(
        TokenLifecycle(mint=mint, state="inactive", previous_state="declining",
                       reason="quiet", priority=0, activity_level=0.0),
        source="activity/test", time=clock.now(), seq=1,
    )  # fmt: skip
    await there.consumer.handle(retired)
    await there.consumer.revoke((partition,))
    # the partition comes back, and so does the token, active again (its trade, then
    # activity's revival: a trade alone lets a retired token go again)
    await here.consumer.assign((partition,))
    await here.consumer.handle(stream[3])
    revived = make_event(
        TokenLifecycle(mint=mint, state="active", previous_state="inactive",
                       reason="revived", priority=3, activity_level=0.2),
        source="activity/test", time=clock.now(), seq=2,
    )  # fmt: skip
    await here.consumer.handle(revived)
    await clock.advance(here.settings.features_inactive_ttl_s + 1)
    stored = await here.read_features(mint)
    assert stored is not None and stored["seq"] == stream[3].seq
    assert here.consumer.state(mint).seq == stream[3].seq


async def test_a_reader_on_receipt_of_an_update_finds_that_vector_stored():
    """features.updated goes out only once its vector is in the store."""
    clock = ReplayClock(1_700_000_000.0)
    bus = InMemoryBus(partitions=4, source="test")
    await bus.start()
    store = MemoryStateStore(clock)
    service = await start_service(bus, store, clock)
    read: list[tuple[int, int | None]] = []
    #: mint -> the last token event seq announced
    announced: dict[str, int] = {}

    async def read_on_receipt(event) -> None:
        stored = await service.read_features(event.key)
        read.append((event.seq, None if stored is None else stored["out_seq"]))
        announced[event.key] = event.data.source_seq

    await bus.subscribe(
        Subscription(service="reader", patterns=("features.updated",), handler=read_on_receipt)
    )
    events = [e for e in market_events(9, 30.0) if e.type in TRADE_TYPES]
    last = {e.key: e.seq for e in events}
    await bus.publish_many(events)
    # a token's events delivered together are announced once, by the last of them
    await eventually(lambda: announced == last)
    assert read
    assert all(stored is not None and stored >= seq for seq, stored in read)
    await service.stop()
    await bus.close()


async def test_a_backlog_of_a_token_is_announced_once_with_every_trade_folded_in():
    """features.updated is a snapshot: a token's trades delivered together give one."""
    clock = ReplayClock(1_700_000_000.0)
    bus = InMemoryBus(partitions=4, source="test")
    await bus.start()
    store = MemoryStateStore(clock)
    collector = await EventCollector("collector").attach(bus, "features.updated")
    service = await start_service(bus, store, clock)
    await service.stop()  # the queues stay: the token's trades wait as one backlog
    events = market_events(3, 120.0)
    counts = Counter(e.key for e in events if e.type in TRADE_TYPES)
    mint = counts.most_common(1)[0][0]
    mine = [e for e in events if e.key == mint and e.type in TRADE_TYPES][:12]
    assert len(mine) == 12
    await bus.publish_many(mine)
    service = await start_service(bus, store, clock)
    await collector.wait_for(2, "features.updated")
    await bus.drain()
    # one for the creation (another type), one for the eleven trades
    created, update = collector.of("features.updated")
    assert mine[0].type == "token.created" and created.data.source_seq == mine[0].seq
    assert [created.seq, update.seq] == [1, 2]
    assert update.data.source_seq == mine[-1].seq
    assert update.causation_id == mine[-1].id
    assert update.data.values == expected_features(mine)[mint]
    stored = await service.read_features(mint)
    assert stored["seq"] == mine[-1].seq
    await service.stop()
    await bus.close()


async def test_a_backlog_ending_in_a_refused_trade_stores_its_folded_trades_vector():
    """The stored vector is the one of the seq it is labelled with, announced or not."""
    clock = ReplayClock(1_700_000_000.0)
    bus = InMemoryBus(partitions=4, source="test")
    await bus.start()
    store = MemoryStateStore(clock)
    collector = await EventCollector("collector").attach(bus, "features.updated")
    service = await start_service(bus, store, clock)
    await service.stop()  # the queues stay: the token's events wait as one backlog
    events = market_events(3, 120.0)
    counts = Counter(e.key for e in events if e.type in TRADE_TYPES)
    mint = counts.most_common(1)[0][0]
    mine = [e for e in events if e.key == mint and e.type in TRADE_TYPES][:12]
    last = mine[-1]
    # the backlog's last trade is refused: the ten before it are folded in, unannounced
    bad = msgspec.structs.replace(last.data, vTokensInBondingCurve=0)
    await bus.publish_many(
        [*mine[:-1], make_event(bad, source=last.source, time=last.time, seq=last.seq)]
    )
    service = await start_service(bus, store, clock)
    await collector.wait_for(1, "features.updated")
    await bus.drain()
    assert [u.data.source_seq for u in collector.of("features.updated")] == [mine[0].seq]
    stored = await service.read_features(mint)
    assert stored["seq"] == mine[-2].seq
    values = tuple(stored["features"][n] for n in service.manager.names)
    assert values == expected_features(mine[:-1])[mint]
    await service.stop()
    await bus.close()


@pytest.mark.postgres
async def test_tokens_whose_records_were_lost_are_rebuilt_from_the_stored_feed(system, pg_pool):
    bus, store, clock, collector = system
    events = market_events(6, 120.0)
    # the feed stored every event; the state store lost every record (a Redis restart
    # without persistence) halfway: the rest arrives at a service that has none
    await TokenEventStore(pg_pool).write(events)
    half = len(events) // 2
    settings = FeaturesSettings.load(service="features", transport="memory", partitions=4)
    service = FeaturesService(settings, registry=CollectorRegistry())
    await service.start(
        ServiceContext(settings=settings, bus=bus, clock=clock, store=store, db=pg_pool)
    )
    for e in events[half:]:
        clock.set_sync(e.time)
        await bus.publish(e)
    expected = expected_features(events)
    seen = {e.key for e in events[half:]}
    midway = {e.key for e in events[:half]} & seen
    assert midway, "no token traded across the loss"
    for mint in seen:
        stored = await service.read_features(mint)
        assert tuple(stored["features"][n] for n in service.manager.names) == expected[mint]
    assert service.consumer_metrics.rebuilt._value.get() == len(midway)
    # one update per token for the history and its first event after the loss, not one
    # per replayed event
    for mint in midway:
        after = sum(1 for e in events[half:] if e.key == mint and e.type in TRADE_TYPES)
        assert len(collector.by_key()[mint]) == after
    await service.stop()
