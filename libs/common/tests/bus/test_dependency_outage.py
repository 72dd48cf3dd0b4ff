"""A dependency away for a while stalls a lane; it never dead-letters healthy events.

Each test runs a Redis of its own (``own_redis``) and stops it mid-stream. The handler
stores each event in that Redis, as a service stores its state, and records what it
applied once the write went through.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from redis import asyncio as aioredis

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.dependencies import REDIS, WAITS
from pumpflow.common.events import Event
from pumpflow.common.testing import TokenEvents, eventually

MINTS = [f"mint{i}" for i in range(8)]


class StoringHandler:
    """Writes each event to Redis, then records it as applied (per key, in order)."""

    def __init__(self, client: aioredis.Redis):
        self.client = client
        self.applied: dict[str, list[int]] = defaultdict(list)
        self.count = 0

    async def __call__(self, event: Event) -> None:
        await self.client.set(f"applied:{event.key}:{event.seq}", b"1")
        self.applied[event.key].append(event.seq)
        self.count += 1


def waiting_on_redis() -> bool:
    return REDIS in WAITS.describe()


async def test_a_redis_restart_mid_stream_dead_letters_nothing_and_applies_every_event(
    bus, service, own_redis
):
    client = aioredis.Redis.from_url(own_redis.url)
    handler = StoringHandler(client)
    await bus.subscribe(Subscription(service=service, patterns=("token.*",), handler=handler))
    factory = TokenEvents()
    events = [factory.trade(mint) for _ in range(30) for mint in MINTS]
    first, rest = events[:80], events[80:]
    await bus.publish_many(first)
    await eventually(lambda: handler.count == len(first), what="the first events applied")

    await asyncio.to_thread(own_redis.stop)
    await bus.publish_many(rest)
    await eventually(waiting_on_redis, what="the lanes wait for Redis")
    await asyncio.to_thread(own_redis.start)

    await eventually(lambda: handler.count == len(events), what="every event applied")
    assert await bus.dead_letters(service) == []
    for mint in MINTS:
        assert handler.applied[mint] == [e.seq for e in events if e.key == mint]
    await eventually(lambda: not waiting_on_redis(), what="the wait recorded as over")
    await client.aclose()


async def test_a_lane_waiting_for_a_dependency_stops_at_once_and_hands_its_event_back(
    harness, service, own_redis
):
    bus = await harness.bus()
    client = aioredis.Redis.from_url(own_redis.url)
    handler = StoringHandler(client)
    subscription = Subscription(service=service, patterns=("token.*",), handler=handler)
    await bus.subscribe(subscription)
    event = TokenEvents().trade(MINTS[0])
    await asyncio.to_thread(own_redis.stop)
    await bus.publish(event)
    await eventually(waiting_on_redis, what="the lane waits for Redis")

    # without the hand-back this waits as long as Redis is away
    await asyncio.wait_for(bus.unsubscribe(subscription), 10.0)
    assert handler.count == 0

    await asyncio.to_thread(own_redis.start)
    again = StoringHandler(client)
    consumer = await harness.bus()
    await consumer.subscribe(Subscription(service=service, patterns=("token.*",), handler=again))
    await eventually(lambda: again.count == 1, what="the handed back event delivered again")
    assert again.applied[MINTS[0]] == [event.seq]
    assert await consumer.dead_letters(service) == []
    await client.aclose()
