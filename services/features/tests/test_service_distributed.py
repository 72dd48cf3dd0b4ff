"""FeaturesService over RabbitMQ and Redis: a replica restarted mid-stream resumes from Redis."""

from __future__ import annotations

import pytest
from features_helpers import market_events
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.clock import WallClock
from pumpflow.common.features import FeatureManager
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.testing import eventually
from pumpflow.features.service import FeaturesService, FeaturesSettings

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]

PARTITIONS = 4


def applied(service: FeaturesService) -> float:
    return service.consumer_metrics.counts()["applied"]


async def test_restart_mid_stream_loses_and_doubles_nothing(
    namespace, amqp_url, redis_url, redis_client
):
    from pumpflow.common.bus.rabbitmq import RabbitMQBus
    from pumpflow.common.state.redis import RedisStateStore

    events = [e for e in market_events(8, 300.0) if e.type != "token.migrated"]
    trades = len(events)
    settings = FeaturesSettings.load(service="features", namespace=namespace, partitions=PARTITIONS)
    buses = []

    async def new_bus(source: str) -> RabbitMQBus:
        bus = RabbitMQBus(
            url=amqp_url, namespace=namespace, partitions=PARTITIONS, prefetch=64, source=source
        )
        await bus.start()
        buses.append(bus)
        return bus

    #: mint -> out seq -> (source seq, values)
    updates: dict[str, dict[int, tuple[int, tuple]]] = {}
    republished_differently = []

    async def collect(event) -> None:
        seen = updates.setdefault(event.key, {})
        announced = (event.data.source_seq, event.data.values)
        if event.seq in seen and seen[event.seq] != announced:
            republished_differently.append(event)
        seen[event.seq] = announced

    stores = []
    try:
        feed = await new_bus("feed/test")
        await feed.subscribe(
            Subscription(
                service="collector",
                patterns=("features.updated",),
                handler=collect,
            )
        )
        store_a = RedisStateStore(url=redis_url, namespace=namespace)
        stores.append(store_a)
        bus_a = await new_bus("features/a")
        first = FeaturesService(settings, registry=CollectorRegistry())
        await first.start(
            ServiceContext(settings=settings, bus=bus_a, clock=WallClock(), store=store_a)
        )
        # Half the market before the replica goes away, half after: however fast it
        # works, it cannot have applied the whole stream when it goes.
        half = len(events) // 2
        await feed.publish_many(events[:half])
        await eventually(lambda: applied(first) >= trades // 10)
        # The replica goes away mid-stream (its connection closes; unacked work returns).
        await bus_a.close()
        await feed.publish_many(events[half:])
        assert applied(first) <= half

        store_b = RedisStateStore(url=redis_url, namespace=namespace)
        stores.append(store_b)
        bus_b = await new_bus("features/b")
        second = FeaturesService(settings, registry=CollectorRegistry())
        await second.start(
            ServiceContext(settings=settings, bus=bus_b, clock=WallClock(), store=store_b)
        )
        await eventually(lambda: applied(first) + applied(second) >= trades, 60.0)
        assert await bus_b.drain(10.0)
        assert await feed.drain(10.0)
        assert applied(first) + applied(second) == trades
        assert second.consumer_metrics.counts()["restored"] > 0

        expected = FeatureManager()
        counts: dict[str, int] = {}
        for e in events:
            expected.update_feature_history(e)
            counts[e.key] = counts.get(e.key, 0) + 1
        # a mint's trades delivered together are announced once, by the last of them
        await eventually(
            lambda: all(
                updates.get(mint) and max(updates[mint].values())[0] == n
                for mint, n in counts.items()
            )
        )
        assert not republished_differently
        for mint, n in counts.items():
            assert sorted(updates[mint]) == list(range(1, len(updates[mint]) + 1)), mint
            stored = await second.read_features(mint)
            assert stored["seq"] == n
            want = expected.generate_features(mint)
            assert tuple(stored["features"][k] for k in want.names) == want.values
            assert updates[mint][max(updates[mint])] == (n, want.values)
    finally:
        for bus in reversed(buses):
            await bus.delete_topology()
            await bus.close()
        for store in stores:
            await store.close()
