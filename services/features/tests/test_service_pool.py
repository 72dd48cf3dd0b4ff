"""FeaturesService on the worker pool: priority when behind, order, group commit, the cache."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from features_helpers import market_events
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import TokenLifecycle, make_event
from pumpflow.common.features import FeatureManager
from pumpflow.common.priority import Priority
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state import MemoryStateStore
from pumpflow.common.state.feature_cache import FeatureCache
from pumpflow.common.testing import EventCollector
from pumpflow.features.service import FeaturesService, FeaturesSettings

TRADE_TYPES = ("token.created", "token.trade")


class CountingStore(MemoryStateStore):
    """A memory store that counts its round trips by method."""

    def __init__(self, clock):
        super().__init__(clock)
        self.calls: Counter[str] = Counter()

    async def write(self, batch):
        self.calls["write"] += 1
        await super().write(batch)

    async def get_many(self, keys):
        self.calls["get_many"] += 1
        return await super().get_many(keys)


@pytest.fixture
async def system():
    clock = ReplayClock(1_700_000_000.0)
    bus = InMemoryBus(partitions=4, synchronous=True, source="test")
    await bus.start()
    collector = await EventCollector("collector").attach(bus, "features.updated")
    yield bus, CountingStore(clock), clock, collector
    await bus.close()


async def start_service(bus, store, clock, *, workers: int) -> FeaturesService:
    settings = FeaturesSettings.load(
        service="features", transport="memory", partitions=4, features_workers=workers
    )
    service = FeaturesService(settings, registry=CollectorRegistry())
    await service.start(ServiceContext(settings=settings, bus=bus, clock=clock, store=store))
    return service


def streams(seed: int, duration_s: float) -> dict[str, list]:
    by_mint: dict[str, list] = {}
    for e in market_events(seed, duration_s):
        if e.type in TRADE_TYPES:
            by_mint.setdefault(e.key, []).append(e)
    return by_mint


async def backlog(service: FeaturesService, events) -> None:
    """Hand ``events`` over while the pool's workers are all busy, then let them go."""
    gate = asyncio.Event()
    blockers = [
        service.consumer.pool.submit(f"blocker-{i}", gate.wait)
        for i in range(service.settings.features_workers)
    ]
    await asyncio.sleep(0)  # the workers take the blockers
    handlers = [asyncio.ensure_future(service.consumer.handle(e)) for e in events]
    await asyncio.sleep(0)  # each handler submits its work and waits for it
    assert service.consumer.pool.queue_depth == len(events)
    gate.set()
    await asyncio.gather(*blockers, *handlers)


def assert_in_order(collector: EventCollector, by_mint: dict[str, list]) -> None:
    """One update per event, per mint in seq order, and the last one is the expected."""
    for mint, stream in by_mint.items():
        updates = collector.by_key()[mint]
        assert [u.data.source_seq for u in updates] == [e.seq for e in stream], mint
        assert [u.seq for u in updates] == list(range(1, len(stream) + 1)), mint
        manager = FeatureManager()
        for e in stream:
            manager.update_feature_history(e)
        assert updates[-1].data.values == manager.generate_features(mint).values


async def test_when_behind_a_high_priority_tokens_events_go_first(system):
    bus, store, clock, collector = system
    by_mint = streams(11, 120.0)
    busiest = sorted(by_mint.items(), key=lambda kv: -len(kv[1]))[:2]
    # the low-priority token is the older one: its events arrive first
    (low, low_stream), (high, high_stream) = sorted(busiest, key=lambda kv: kv[1][0].time)
    assert len(low_stream) >= 5 and len(high_stream) >= 5
    service = await start_service(bus, store, clock, workers=1)
    for mint, priority in ((low, Priority.LOW), (high, Priority.URGENT)):
        lifecycle = TokenLifecycle(mint=mint, state="active", priority=priority)
        await bus.publish(make_event(lifecycle, source="activity/t", time=clock.now(), seq=1))
    # the backlog in arrival (event-time) order: the low token's events come first
    events = sorted(low_stream + high_stream, key=lambda e: (e.time, e.key != low))
    assert events[0].key == low
    await backlog(service, events)
    # the high-priority token was served entirely before the low one
    assert [e.key for e in collector.events] == [high] * len(high_stream) + [low] * len(low_stream)
    assert_in_order(collector, {low: low_stream, high: high_stream})
    for mint, stream in ((low, low_stream), (high, high_stream)):
        stored = await service.read_features(mint)
        assert stored["seq"] == stream[-1].seq
        assert stored["out_seq"] == len(stream)
    await service.stop()


async def test_a_lifecycle_priority_reranks_work_already_queued(system):
    bus, store, clock, collector = system
    by_mint = streams(12, 90.0)
    (first, first_stream), (second, second_stream) = sorted(
        by_mint.items(), key=lambda kv: -len(kv[1])
    )[:2]
    service = await start_service(bus, store, clock, workers=1)
    gate = asyncio.Event()
    blocker = service.consumer.pool.submit("blocker", gate.wait)
    await asyncio.sleep(0)
    handlers = [
        asyncio.ensure_future(service.consumer.handle(e)) for e in first_stream + second_stream
    ]
    await asyncio.sleep(0)
    assert service.consumer.pool.queue_depth == len(handlers)
    # while they wait, the activity service says the second token matters more
    urgent = TokenLifecycle(mint=second, state="active", priority=Priority.URGENT)
    hint = make_event(urgent, source="activity/t", time=clock.now(), seq=1)
    handlers.append(asyncio.ensure_future(service.consumer.handle(hint)))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(blocker, *handlers)
    assert [e.key for e in collector.events] == [second] * len(second_stream) + [first] * len(
        first_stream
    )
    assert_in_order(collector, {first: first_stream, second: second_stream})
    await service.stop()


async def test_many_tokens_share_group_commits_and_nothing_is_lost(system):
    bus, store, clock, collector = system
    by_mint = streams(13, 120.0)
    events = sorted((e for s in by_mint.values() for e in s), key=lambda e: e.time)
    service = await start_service(bus, store, clock, workers=8)
    await backlog(service, events)
    assert_in_order(collector, by_mint)
    assert service.consumer_metrics.counts()["applied"] == len(events)
    # state, tracking and vector of many tokens in one write per group commit
    assert store.calls["write"] == service.consumer.flushes < len(events) / 2
    # one record look-up per new token, and the partitions' seq floors read once, when
    # they were assigned
    assert store.calls["get_many"] == len(by_mint) + 1
    # one format: a fresh cache reads from the store what the service publishes
    fresh = FeatureCache(store)
    for mint, stream in by_mint.items():
        vector = await fresh.get(mint)
        assert vector.values == collector.by_key()[mint][-1].data.values
        assert (await service.read_features(mint))["out_seq"] == len(stream)
    await service.stop()


async def test_reads_check_the_version(system):
    bus, store, clock, _ = system
    by_mint = streams(14, 30.0)
    mint, stream = next(iter(by_mint.items()))
    service = await start_service(bus, store, clock, workers=2)
    for e in stream:
        await service.consumer.handle(e)
    stored = await service.read_features(mint)
    assert stored is not None and stored["seq"] == stream[-1].seq
    await store.hset_many({f"features:{mint}": {"version": "another-set"}})
    assert await service.read_features(mint) is None
    await service.stop()
