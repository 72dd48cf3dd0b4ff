"""A RabbitMQ consumer the broker cancels consumes again once its queue is back.

The broker cancels a consumer whose queue goes away: RabbitMQ 3.10's classic queue
process crashes now and then when a single-active consumer comes and goes, and restarts
from its durable contents; a failover or a deletion does the same. Here the queues are
deleted and declared again, as the restart brings them back.
"""

from __future__ import annotations

import pytest

from pumpflow.common.bus import Subscription
from pumpflow.common.events import Event
from pumpflow.common.testing import eventually

from .test_publish_order import trade_event

pytestmark = pytest.mark.rabbitmq

PATTERNS = ("token.*",)


async def test_a_consumer_the_broker_cancels_consumes_again_once_its_queue_is_back(
    namespace, amqp_url
):
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    service = f"svc_{namespace}"
    bus = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=2, source="feed/r1")
    arrived: list[tuple[str, int]] = []

    async def record(event: Event) -> None:
        arrived.append((event.key, event.seq))

    await bus.start()
    try:
        await bus.declare(service, PATTERNS)
        await bus.subscribe(Subscription(service=service, patterns=PATTERNS, handler=record))
        mints = [f"mint{m:02d}" for m in range(8)]  # both partitions
        await bus.publish_many([trade_event(m, 1) for m in mints])
        await eventually(lambda: len(arrived) == len(mints), what="the first events")
        # the partition queues, which the service's declaration brings back
        partitioned = [c for c in bus._consumers if c.partition is not None]
        assert {c.partition for c in partitioned} == {0, 1}
        tags = {c.tag for c in partitioned}
        for consumer in partitioned:
            await bus._channel.queue_delete(consumer.queue_name)  # the broker cancels it
        await bus.declare(service, PATTERNS)
        await eventually(
            lambda: all(c.tag is not None and c.tag not in tags for c in partitioned),
            what="every partition's consumer consuming again",
        )
        await bus.publish_many([trade_event(m, 2) for m in mints])
        await eventually(
            lambda: {(m, 2) for m in mints} <= set(arrived),
            what="the events published after the queues came back",
            details=lambda: f"arrived: {arrived}",
        )
    finally:
        await bus.delete_topology()
        await bus.close()
