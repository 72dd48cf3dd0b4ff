"""Features while Redis or Postgres is frozen: the work that meets it waits for it, named
in readiness, and goes on once it answers, nothing dead-lettered, lost or applied twice.

A frozen server (its host stopped, the network lost without a reset) takes what is sent
and answers nothing. The replica reaches Redis and Postgres through proxies of the
test's own that stop forwarding, so the machine's servers stay untouched; its store and
pool are the runner's, from settings whose bounds are made short.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
from features_helpers import market_events
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.rabbitmq import RabbitMQBus
from pumpflow.common.clock import WallClock
from pumpflow.common.dependencies import POSTGRES, REDIS, WAITS
from pumpflow.common.events import Event
from pumpflow.common.features import FeatureManager
from pumpflow.common.runtime.http import create_app
from pumpflow.common.runtime.runner import open_pool, redis_store
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import eventually
from pumpflow.common.testing.proxy import TcpProxy
from pumpflow.features.service import FeaturesService, FeaturesSettings

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

PARTITIONS = 4
#: the settings' bounds on a Redis operation and a Postgres command, short for the test
TIMEOUT_S = 1.0
#: pauses the consumer takes while a server is frozen before it thaws: each follows a
#: call that met the frozen server and waited out its bound
PAUSES_FROZEN = 3


@dataclass
class Replica:
    service: FeaturesService
    feed: RabbitMQBus
    bus: RabbitMQBus
    http: httpx.AsyncClient
    redis: TcpProxy
    postgres: TcpProxy

    def applied(self) -> float:
        return self.service.consumer_metrics.counts()["applied"]

    def pauses(self) -> float:
        return self.service.consumer_metrics.store_retries._value.get()

    async def readiness(self) -> tuple[int, dict]:
        answer = await self.http.get("/readyz")
        return answer.status_code, answer.json()

    async def waiting_on(self, dependency: str) -> dict | None:
        """The body of /readyz while it names ``dependency`` waited on, else None."""
        _, body = await self.readiness()
        waiting = body["checks"]["dependencies"]["waiting_on"]
        return body if dependency in waiting else None


@contextlib.asynccontextmanager
async def features(
    namespace: str, amqp_url: str, redis_url: str, postgres_dsn: str
) -> AsyncIterator[Replica]:
    async with (
        TcpProxy(urlsplit(redis_url).port or 6379) as redis_proxy,
        TcpProxy(urlsplit(postgres_dsn).port or 5432) as postgres_proxy,
    ):
        settings = FeaturesSettings.load(
            service="features",
            namespace=namespace,
            partitions=PARTITIONS,
            redis_url=redis_proxy.url(redis_url),
            postgres_dsn=postgres_proxy.url(postgres_dsn),
            redis_socket_timeout_s=TIMEOUT_S,
            postgres_command_timeout_s=TIMEOUT_S,
        )
        store = redis_store(settings)
        pool = await open_pool(settings)
        buses: list[RabbitMQBus] = []
        for source in ("feed/sim", "features/a"):
            bus = RabbitMQBus(
                url=amqp_url, namespace=namespace, partitions=PARTITIONS, prefetch=64, source=source
            )
            await bus.start()
            buses.append(bus)
        feed, bus = buses
        service = FeaturesService(settings, registry=CollectorRegistry())
        ctx = ServiceContext(settings=settings, bus=bus, clock=WallClock(), store=store, db=pool)
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(service, ctx)), base_url="http://features"
        )
        try:
            await service.start(ctx)
            yield Replica(service, feed, bus, http, redis_proxy, postgres_proxy)
        finally:
            redis_proxy.thaw()
            postgres_proxy.thaw()
            await http.aclose()
            await service.stop()
            for bus in reversed(buses):
                await bus.delete_topology()
                await bus.close()
            await store.close()
            await pool.close()


async def assert_applied_once(replica: Replica, events: list[Event]) -> None:
    """Every mint's stored features are those of its events, each folded in once."""
    expected = FeatureManager()
    counts: dict[str, int] = {}
    for e in events:
        expected.update_feature_history(e)
        counts[e.key] = counts.get(e.key, 0) + 1
    for mint, n in counts.items():
        stored = await replica.service.read_features(mint)
        assert stored is not None, mint
        assert stored["seq"] == n, (mint, stored["seq"], n)
        want = expected.generate_features(mint)
        assert tuple(stored["features"][k] for k in want.names) == want.values, mint


async def test_a_frozen_redis_holds_the_commits_until_it_answers_and_loses_nothing(
    namespace, amqp_url, redis_url, postgres_dsn, pg_pool, redis_client
):
    events = [e for e in market_events(8, 120.0) if e.type != "token.migrated"]
    third = len(events) // 3
    async with features(namespace, amqp_url, redis_url, postgres_dsn) as replica:
        await replica.feed.publish_many(events[:third])
        await eventually(lambda: replica.applied() >= third // 2, what="events applied")
        replica.redis.freeze()
        await replica.feed.publish_many(events[third:])
        # the group commits meet the frozen server, each within its bound, and wait
        await eventually(
            lambda: replica.pauses() >= PAUSES_FROZEN, 30, what="commits waiting for Redis"
        )
        assert REDIS in WAITS.describe()
        body = await eventually(lambda: replica.waiting_on(REDIS), what="/readyz naming Redis")
        assert body["ready"] is False, body
        assert await replica.bus.dead_letters("features", remove=False) == []

        replica.redis.thaw()
        await eventually(lambda: replica.applied() >= len(events), 60, what="every event applied")
        assert await replica.bus.drain(30.0)
        assert replica.applied() == len(events)
        await assert_applied_once(replica, events)
        status, body = await replica.readiness()
        assert status == 200 and REDIS not in WAITS.describe(), body
        assert await replica.bus.dead_letters("features", remove=False) == []


async def test_a_frozen_postgres_holds_a_rebuild_until_it_answers_and_loses_nothing(
    namespace, amqp_url, redis_url, postgres_dsn, pg_pool, redis_client
):
    events = [e for e in market_events(6, 120.0) if e.type != "token.migrated"]
    # the feed stored every event; the replica sees one token from the middle of its
    # stream, with no record of it: its first three events are rebuilt from Postgres
    await TokenEventStore(pg_pool).write(events)
    mints = sorted({e.key for e in events})
    counts = {m: sum(e.key == m for e in events) for m in mints}
    lost = min((m for m in mints if counts[m] > 4), key=counts.get)
    published = [e for e in events if e.key != lost or e.seq > 3]
    async with features(namespace, amqp_url, redis_url, postgres_dsn) as replica:
        replica.postgres.freeze()
        await replica.feed.publish_many(published)
        await eventually(
            lambda: replica.pauses() >= PAUSES_FROZEN, 30, what="a rebuild waiting for Postgres"
        )
        assert POSTGRES in WAITS.describe()
        # Postgres is optional to features: named, the replica ready without it
        body = await eventually(
            lambda: replica.waiting_on(POSTGRES), what="/readyz naming Postgres"
        )
        assert body["ready"] is True and body["degraded"] == [POSTGRES], body
        assert replica.service.consumer.describe()["rebuilding"] == 1
        assert await replica.service.read_features(lost) is None

        replica.postgres.thaw()
        await eventually(
            lambda: replica.service.consumer.describe()["rebuilding"] == 0, 60, what="the rebuild"
        )

        async def lost_applied() -> bool:
            stored = await replica.service.read_features(lost)
            return stored is not None and stored["seq"] == counts[lost]

        await eventually(lost_applied, 30, what="the rebuilt token's events applied")
        assert await replica.bus.drain(30.0)
        assert replica.service.consumer_metrics.counts()["rebuilt"] == 1
        assert await replica.bus.dead_letters("features", remove=False) == []
        await assert_applied_once(replica, events)


async def test_a_redis_out_of_memory_holds_the_commits_until_it_takes_writes_and_loses_nothing(
    namespace, amqp_url, postgres_dsn, pg_pool
):
    """A Redis at its ``maxmemory`` (no eviction, as a cache of state must be) refuses
    every write with OOM until memory is freed or the limit raised: the commits wait for
    it as for a Redis away, nothing is dead-lettered."""
    import asyncio

    import redis.asyncio as aioredis

    from pumpflow.common.testing.instances import RedisInstance

    server = RedisInstance()
    await asyncio.to_thread(server.start)
    admin = aioredis.Redis.from_url(server.url)
    try:
        events = [e for e in market_events(8, 120.0) if e.type != "token.migrated"]
        third = len(events) // 3
        async with features(namespace, amqp_url, server.url, postgres_dsn) as replica:
            await replica.feed.publish_many(events[:third])
            await eventually(lambda: replica.applied() >= third // 2, what="events applied")
            await admin.config_set("maxmemory", 1)
            try:
                await replica.feed.publish_many(events[third:])
                await eventually(
                    lambda: replica.pauses() >= PAUSES_FROZEN, 30, what="commits waiting for Redis"
                )
                body = await eventually(
                    lambda: replica.waiting_on(REDIS), what="/readyz naming Redis"
                )
                waited = body["checks"]["dependencies"]["waiting_on"][REDIS]
                assert "maxmemory" in waited["error"], body
                assert body["ready"] is False, body
                assert await replica.bus.dead_letters("features", remove=False) == []
            finally:
                await admin.config_set("maxmemory", 0)
            await eventually(
                lambda: replica.applied() >= len(events), 60, what="every event applied"
            )
            assert await replica.bus.drain(30.0)
            assert replica.applied() == len(events)
            await assert_applied_once(replica, events)
            assert await replica.bus.dead_letters("features", remove=False) == []
    finally:
        await admin.aclose()
        await asyncio.to_thread(server.close)
