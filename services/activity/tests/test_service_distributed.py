"""ActivityService over RabbitMQ and Redis: two balanced replicas hand partitions over.

``features.updated`` is published as the features service would (from a FeatureManager).
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.activity.service import ActivityService
from pumpflow.activity.settings import ActivitySettings
from pumpflow.common.bus import Subscription
from pumpflow.common.clock import WallClock
from pumpflow.common.events import Event
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.testing import FeatureUpdates, eventually

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]

PARTITIONS = 4


async def test_two_balanced_replicas_publish_each_transition_once(
    namespace, amqp_url, redis_url, redis_client, token_events_class
):
    """Two replicas split the partitions over RabbitMQ and Redis; one leaves mid-stream."""
    from pumpflow.common.bus.ownership import BalancedBus, OwnershipConfig
    from pumpflow.common.bus.rabbitmq import RabbitMQBus
    from pumpflow.common.bus.routing import partition_of
    from pumpflow.common.state.redis import RedisStateStore

    clock = WallClock()
    tokens = token_events_class(clock)
    features = FeatureUpdates()
    beat = OwnershipConfig(heartbeat_interval_s=0.2, heartbeat_ttl_s=1.5)
    mints = [f"M{i}" for i in range(10)]
    active = mints[:5]
    buses: list[RabbitMQBus] = []
    stores: list[RedisStateStore] = []
    lifecycle: list[Event] = []
    commands: list[Event] = []

    async def new_bus(source: str) -> RabbitMQBus:
        bus = RabbitMQBus(
            url=amqp_url, namespace=namespace, partitions=PARTITIONS, prefetch=64, source=source
        )
        await bus.start()
        buses.append(bus)
        return bus

    async def replica(name: str) -> tuple[ActivityService, BalancedBus]:
        settings = ActivitySettings.load(
            namespace=namespace, partitions=PARTITIONS, replica=name,
            activity_inactive_after_quiet_s=3.0, activity_decline_after_quiet_s=1.5,
            activity_subscription_batch_s=0.1,
        )  # fmt: skip
        store = RedisStateStore(url=redis_url, namespace=namespace)
        stores.append(store)
        bus = BalancedBus(
            await new_bus(f"activity/{name}"), store=store, clock=clock, replica=name, config=beat
        )
        svc = ActivityService(settings, registry=CollectorRegistry())
        await svc.start(ServiceContext(settings=settings, bus=bus, clock=clock, store=store))
        return svc, bus

    async def collect(event: Event) -> None:
        (lifecycle if event.type == "token.lifecycle" else commands).append(event)

    def moves(mint: str) -> list[tuple[str | None, str, str]]:
        return [
            (e.data.previous_state, e.data.state, e.source) for e in lifecycle
            if e.key == mint and e.data.state != e.data.previous_state
        ]  # fmt: skip

    try:
        feed = await new_bus("feed/test")
        await feed.subscribe(
            Subscription(
                service="probe", patterns=("token.lifecycle", "feed.subscription"),
                handler=collect,
            )
        )  # fmt: skip
        a, bus_a = await replica("a")
        b, bus_b = await replica("b")

        def owned(bus: BalancedBus) -> set[int]:
            return set(bus.balancer("activity").owned)

        await eventually(
            lambda: (
                owned(bus_a)
                and owned(bus_b)
                and len(owned(bus_a)) + len(owned(bus_b)) == PARTITIONS
                and not owned(bus_a) & owned(bus_b)
            ),
            within=15,
        )
        from_a = {m for m in mints if partition_of(m, PARTITIONS) in owned(bus_a)}
        assert from_a and from_a != set(mints)
        created = [tokens.created(m) for m in mints]
        trades = [tokens.trade(m, f"w{i}") for i in range(15) for m in active]
        await feed.publish_many(features.of(created + trades))
        await eventually(lambda: all(moves(m)[-1:] and moves(m)[-1][1] == "active" for m in active))
        # each replica acts on its own tokens only
        assert all(a.consumer.state(m) is None for m in set(mints) - from_a)
        assert all(b.consumer.state(m) is None for m in from_a)

        # a stops cleanly while the tokens are about to decline: b takes its tokens over
        await bus_a.stop_consuming()
        await a.stop()
        # what a published before it stopped may still be on its way to the probe
        stopped_at = clock.now()
        await eventually(lambda: owned(bus_b) == set(range(PARTITIONS)), within=15)
        assert len(a.consumer) == 0
        await eventually(
            lambda: all(moves(m)[-1:] and moves(m)[-1][1] == "inactive" for m in mints)
        )
        await eventually(lambda: {x for c in commands for x in c.data.mints} == set(mints))
        for mint in mints:
            chain = moves(mint)
            expected = (
                ["new", "active", "declining", "inactive"]
                if mint in active
                else ["new", "inactive"]
            )
            assert [s for _, s, _ in chain] == expected, (mint, chain)
            assert [p for p, _, _ in chain] == [None, *expected[:-1]], (mint, chain)
            seqs = [e.seq for e in lifecycle if e.key == mint]
            assert seqs == list(range(1, len(seqs) + 1)), (mint, seqs)
        # once a has left, b alone publishes, also for the tokens it took over
        late = [e for e in lifecycle if e.time > stopped_at]
        assert {e.source for e in late} == {"activity/b"}
        assert any(e.key in from_a for e in late)
        unsubscribed = [x for c in commands if c.data.action == "unsubscribe" for x in c.data.mints]
        assert sorted(unsubscribed) == sorted(mints)
        await bus_b.stop_consuming()
        await b.stop()
    finally:
        for bus in reversed(buses):
            await bus.delete_topology()
            await bus.close()
        for store in stores:
            await store.close()
