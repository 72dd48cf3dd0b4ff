"""Features while Postgres is away: it is needed only to rebuild a token without a record.

Each test runs a Postgres of its own (``own_postgres``) and stops it: never the shared one.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from features_helpers import market_events
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock
from pumpflow.common.db.pool import create_pool
from pumpflow.common.dependencies import POSTGRES, WAITS
from pumpflow.common.features import FeatureManager
from pumpflow.common.runtime.http import create_app
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state import MemoryStateStore
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import EventCollector, eventually
from pumpflow.features.service import FeaturesService, FeaturesSettings

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def expected_features(events) -> dict[str, tuple]:
    manager = FeatureManager()
    for e in events:
        manager.update_feature_history(e)
    return {m: manager.generate_features(m).values for m in manager.mints()}


async def test_a_postgres_outage_leaves_features_ready_and_a_rebuild_waits_for_it(
    own_postgres, namespace
):
    events = market_events(6, 120.0)
    half = len(events) // 2
    pool = await create_pool(own_postgres.dsn, namespace, min_size=1, max_size=4)
    # the feed stored every event; the state store lost every record halfway (a Redis
    # restart without persistence): the tokens traded across it need their history
    await TokenEventStore(pool).write(events)
    clock = ReplayClock(events[half].time)
    bus = InMemoryBus(partitions=4, source="test")
    await bus.start()
    collector = await EventCollector("collector").attach(bus, "features.updated")
    settings = FeaturesSettings.load(
        service="features", transport="memory", partitions=4, namespace=namespace
    )
    service = FeaturesService(settings, registry=CollectorRegistry())
    ctx = ServiceContext(
        settings=settings, bus=bus, clock=clock, store=MemoryStateStore(clock), db=pool
    )
    await service.start(ctx)
    app = create_app(service, ctx)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://features")
    later = events[half:]
    midway = {e.key for e in events[:half]} & {e.key for e in later}
    assert midway, "no token traded across the loss"
    try:
        await asyncio.to_thread(own_postgres.stop)

        async def readiness() -> tuple[int, dict]:
            answer = await http.get("/readyz")
            return answer.status_code, answer.json()

        # Redis and the broker answer: ready, Postgres shown away
        status, body = await readiness()
        assert status == 200, body
        assert body["degraded"] == [POSTGRES]
        assert body["checks"]["postgres"]["ok"] is False
        assert body["checks"]["postgres"]["required"] is False

        for e in later:
            await clock.advance_to(e.time)
            await bus.publish(e)
        retries = service.consumer_metrics.store_retries
        await eventually(lambda: retries._value.get() > 0, what="a rebuild waiting for Postgres")
        # the wait is named Postgres's, and leaves the replica ready
        assert POSTGRES in WAITS.describe()
        status, body = await readiness()
        assert status == 200, body
        assert body["checks"]["dependencies"]["ok"] is True
        assert POSTGRES in body["checks"]["dependencies"]["waiting_on"]
        assert body["degraded"] == [POSTGRES]
        # nothing of a token waiting for its history is announced from a state without it
        for mint in midway:
            assert mint not in collector.by_key(), mint

        await asyncio.to_thread(own_postgres.start)
        assert await bus.drain(60.0)
        expected = expected_features(events)
        for mint in {e.key for e in later}:
            stored = await service.read_features(mint)
            assert tuple(stored["features"][n] for n in service.manager.names) == expected[mint]
        assert service.consumer_metrics.counts()["rebuilt"] == len(midway)
        assert service.consumer_metrics.counts()["invalid"] == 0
        assert await bus.dead_letters("features") == []
        # each one's first update after the loss is of its whole history up to there
        for mint in midway:
            first = collector.by_key()[mint][0].data
            history = [e for e in events if e.key == mint and e.seq <= first.source_seq]
            assert first.values == expected_features(history)[mint], mint
        status, body = await readiness()
        assert status == 200 and body["degraded"] == [], body
        assert body["checks"]["postgres"]["ok"] is True
    finally:
        await http.aclose()
        await service.stop()
        await bus.close()
        await pool.close()
