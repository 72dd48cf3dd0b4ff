"""ActivityService over RabbitMQ and Redis: a replica dies, the next carries on from Redis."""

from __future__ import annotations

import msgspec
import pytest

from pumpflow.activity.service import KEY_PREFIX, ActivityService, Checkpoint
from pumpflow.activity.settings import ActivitySettings
from pumpflow.common.bus import Subscription
from pumpflow.common.clock import WallClock
from pumpflow.common.events import Event
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.testing import eventually

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]

PARTITIONS = 4


async def test_replica_hand_over_over_rabbitmq_and_redis(
    namespace, amqp_url, redis_url, redis_client, token_events_class
):
    from pumpflow.common.bus.rabbitmq import RabbitMQBus
    from pumpflow.common.state.redis import RedisStateStore

    clock = WallClock()
    tokens = token_events_class(clock)
    settings = ActivitySettings.load(
        namespace=namespace, partitions=PARTITIONS,
        activity_inactive_after_quiet_s=1.5, activity_decline_after_quiet_s=0.75,
        activity_subscription_batch_s=0.1, activity_checkpoint_interval_s=0.1,
    )
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

    async def replica(source: str) -> tuple[ActivityService, RabbitMQBus]:
        bus = await new_bus(source)
        store = RedisStateStore(url=redis_url, namespace=namespace)
        stores.append(store)
        svc = ActivityService(settings)
        await svc.start(ServiceContext(settings=settings, bus=bus, clock=clock, store=store))
        return svc, bus

    async def collect(event: Event) -> None:
        (lifecycle if event.type == "token.lifecycle" else commands).append(event)

    def states(mint: str) -> list[str]:
        return [
            e.data.state for e in lifecycle
            if e.key == mint and e.data.state != e.data.previous_state
        ]

    try:
        feed = await new_bus("feed/test")
        await feed.subscribe(
            Subscription(
                service="probe", patterns=("token.lifecycle", "feed.subscription"),
                handler=collect,
            )
        )
        first, bus_a = await replica("activity/a")
        await feed.publish_many([tokens.created("A"), tokens.created("B")])
        await feed.publish_many([tokens.trade("A", f"w{i}") for i in range(15)])
        await eventually(lambda: states("A") == ["new", "active"] and states("B") == ["new"])

        # the replica dies: its connection goes, its timers and workers stop with it
        first.analyzer.close()
        await first.pool.stop(drain=False)
        for task in first._tasks:
            task.cancel()
        await bus_a.close()

        second, _ = await replica("activity/b")
        assert second.analyzer.get_token_lifecycle_state("A") == "active"
        assert second.analyzer.get_token_lifecycle_state("B") == "new"
        await eventually(
            lambda: states("A")[-1:] == ["inactive"] and states("B")[-1:] == ["inactive"]
        )
        assert states("A") == ["new", "active", "declining", "inactive"]
        assert states("B") == ["new", "inactive"]
        for mint in "AB":
            seqs = [e.seq for e in lifecycle if e.key == mint]
            assert seqs == list(range(1, len(seqs) + 1)), (mint, seqs)

        await eventually(lambda: {m for c in commands for m in c.data.mints} == {"A", "B"})
        assert all(c.data.action == "unsubscribe" for c in commands)
        assert second.activity_metrics.tracked == 0

        raw = await redis_client.get(f"{namespace}:{KEY_PREFIX}A")
        checkpoint = msgspec.msgpack.decode(raw, type=Checkpoint)
        assert checkpoint.token.state == "inactive" and checkpoint.token.retired
        assert checkpoint.seq == len([e for e in lifecycle if e.key == "A"])
        assert 0 < await redis_client.ttl(f"{namespace}:{KEY_PREFIX}A") <= 3600
        await second.stop()
    finally:
        for bus in reversed(buses):
            await bus.delete_topology()
            await bus.close()
        for store in stores:
            await store.close()


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
            activity_subscription_batch_s=0.1, activity_checkpoint_interval_s=0.1,
        )  # fmt: skip
        store = RedisStateStore(url=redis_url, namespace=namespace)
        stores.append(store)
        bus = BalancedBus(
            await new_bus(f"activity/{name}"), store=store, clock=clock, replica=name, config=beat
        )
        svc = ActivityService(settings)
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
            lambda: owned(bus_a) and owned(bus_b) and len(owned(bus_a)) + len(owned(bus_b))
            == PARTITIONS and not owned(bus_a) & owned(bus_b),
            within=15,
        )
        from_a = {m for m in mints if partition_of(m, PARTITIONS) in owned(bus_a)}
        assert from_a and from_a != set(mints)
        await feed.publish_many([tokens.created(m) for m in mints])
        await feed.publish_many([tokens.trade(m, f"w{i}") for i in range(15) for m in active])
        await eventually(lambda: all(moves(m)[-1:] and moves(m)[-1][1] == "active" for m in active))
        # each replica acts on its own tokens only
        assert all(a.analyzer.get_token_lifecycle_state(m) is None for m in set(mints) - from_a)
        assert all(b.analyzer.get_token_lifecycle_state(m) is None for m in from_a)

        # a stops cleanly while the tokens are about to decline: b takes its tokens over
        await bus_a.stop_consuming()
        await a.stop()
        left = len(lifecycle)
        await eventually(lambda: owned(bus_b) == set(range(PARTITIONS)), within=15)
        assert a.analyzer.live_count == 0
        await eventually(
            lambda: all(moves(m)[-1:] and moves(m)[-1][1] == "inactive" for m in mints)
        )
        await eventually(lambda: {x for c in commands for x in c.data.mints} == set(mints))
        for mint in mints:
            chain = moves(mint)
            expected = ["new", "active", "declining", "inactive"] if mint in active else [
                "new", "inactive"
            ]
            assert [s for _, s, _ in chain] == expected, (mint, chain)
            assert [p for p, _, _ in chain] == [None, *expected[:-1]], (mint, chain)
            seqs = [e.seq for e in lifecycle if e.key == mint]
            assert seqs == list(range(1, len(seqs) + 1)), (mint, seqs)
        # once a has left, b alone publishes, also for the tokens it took over
        assert {e.source for e in lifecycle[left:]} == {"activity/b"}
        assert any(e.key in from_a for e in lifecycle[left:])
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
