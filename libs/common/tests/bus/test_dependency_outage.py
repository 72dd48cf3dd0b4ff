"""A dependency away for a while stalls a lane; it never dead-letters healthy events.

Each test runs a Redis of its own on a free port and stops it mid-stream (the shared
servers are never touched). The handler stores each event in that Redis, as a service
stores its state, and records what it applied once the write went through.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from redis import asyncio as aioredis

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.dependencies import REDIS, WAITS
from pumpflow.common.events import Event
from pumpflow.common.testing import TokenEvents, eventually, free_port

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


class RedisInstance:
    """A Redis of the test's own (no persistence), stopped and started at will."""

    def __init__(self, directory):
        self.port = free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self) -> None:
        import subprocess
        import time

        self.process = subprocess.Popen(
            ["/usr/bin/redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
        )
        import redis as sync_redis

        client = sync_redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except sync_redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
            self.process = None


@pytest.fixture
async def redis_instance(tmp_path):
    instance = RedisInstance(tmp_path)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


async def test_a_redis_restart_mid_stream_dead_letters_nothing_and_applies_every_event(
    bus, service, redis_instance
):
    client = aioredis.Redis.from_url(redis_instance.url)
    handler = StoringHandler(client)
    await bus.subscribe(Subscription(service=service, patterns=("token.*",), handler=handler))
    factory = TokenEvents()
    events = [factory.trade(mint) for _ in range(30) for mint in MINTS]
    first, rest = events[:80], events[80:]
    await bus.publish_many(first)
    await eventually(lambda: handler.count == len(first), what="the first events applied")

    redis_instance.stop()
    await bus.publish_many(rest)
    await eventually(waiting_on_redis, what="the lanes wait for Redis")
    redis_instance.start()

    await eventually(lambda: handler.count == len(events), what="every event applied")
    assert await bus.dead_letters(service) == []
    for mint in MINTS:
        assert handler.applied[mint] == [e.seq for e in events if e.key == mint]
    await eventually(lambda: not waiting_on_redis(), what="the wait recorded as over")
    await client.aclose()


async def test_a_lane_waiting_for_a_dependency_stops_at_once_and_hands_its_event_back(
    harness, service, redis_instance
):
    bus = await harness.bus()
    client = aioredis.Redis.from_url(redis_instance.url)
    handler = StoringHandler(client)
    subscription = Subscription(service=service, patterns=("token.*",), handler=handler)
    await bus.subscribe(subscription)
    event = TokenEvents().trade(MINTS[0])
    redis_instance.stop()
    await bus.publish(event)
    await eventually(waiting_on_redis, what="the lane waits for Redis")

    # without the hand-back this waits as long as Redis is away
    await asyncio.wait_for(bus.unsubscribe(subscription), 10.0)
    assert handler.count == 0

    redis_instance.start()
    again = StoringHandler(client)
    consumer = await harness.bus()
    await consumer.subscribe(Subscription(service=service, patterns=("token.*",), handler=again))
    await eventually(lambda: again.count == 1, what="the handed back event delivered again")
    assert again.applied[MINTS[0]] == [event.seq]
    assert await consumer.dead_letters(service) == []
    await client.aclose()
