"""The feed service distributed: simulator -> feed -> Postgres -> RabbitMQ -> a consumer."""

from __future__ import annotations

import pytest

from pumpflow.common.clock import WallClock
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import EventCollector, eventually
from pumpflow.feed.service import FeedService
from pumpflow.feed.settings import FeedSettings
from pumpflow.simulator import server as simulator
from pumpflow.simulator.market import Market, MarketConfig

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]


async def test_events_are_stored_then_delivered_over_rabbitmq(pg_pool, namespace, amqp_url):
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    server = simulator.SimulatorServer(
        market=Market(MarketConfig(seed=5, launches_per_minute=120)), speed=40.0
    )
    await server.start()
    # the stop publishes what is stored; a broker shared with busy suites may take longer
    # than the production bound for that, and the bound is not what this test is about
    settings = FeedSettings(pumpportal_ws_url=server.url, namespace=namespace,
                            amqp_url=amqp_url, replica="t", partitions=4,
                            feed_stop_flush_s=120)  # fmt: skip
    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=4, source=settings.source)
    await bus.start()
    got = (await EventCollector("probe").attach(bus, "token.*")).events
    service = FeedService(settings)
    await service.start(ServiceContext(settings=settings, bus=bus, clock=WallClock(), db=pg_pool))
    try:
        await eventually(lambda: len(got) >= 100, within=20, what="100 events delivered")
    finally:
        await service.stop()
        await server.stop()
        await bus.drain(10)
        await bus.delete_topology()
        await bus.close()
    stored = [e async for e in TokenEventStore(pg_pool).stream()]
    assert len(stored) >= len(got) >= 100
    # whatever a consumer received had been stored before, with the same envelope
    by_id = {e.id: e for e in stored}
    assert all(by_id[e.id] == e for e in got)
