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
        # their events were kept with their records, off the bus: applied once rebuilt
        await eventually(
            lambda: service.consumer.describe()["rebuilding"] == 0, 60, what="the rebuilds"
        )
        await service.consumer.flush()
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


@pytest.mark.rabbitmq
@pytest.mark.redis
async def test_a_replica_started_while_postgres_is_down_is_ready_and_rebuilds_once_it_is_back(
    own_postgres, process_stack, namespace, amqp_url
):
    from pumpflow.common.bus.rabbitmq import RabbitMQBus
    from pumpflow.common.testing import free_port
    from pumpflow.common.testing.stack import http_json

    events = market_events(6, 120.0)
    pool = await create_pool(own_postgres.dsn, namespace, min_size=1, max_size=2)
    try:
        await TokenEventStore(pool).write(events)  # the feed stored every event
    finally:
        await pool.close()
    mints = sorted({e.key for e in events})
    # the replica sees one token from the middle of its stream: it has no record of it,
    # and its first three events are stored only (rebuilt from Postgres); its few others
    # wait, held within the consumer's window, while the other tokens go on
    counts = {m: sum(e.key == m for e in events) for m in mints}
    lost = min((m for m in mints if counts[m] > 4), key=counts.get)
    published = [e for e in events if e.key != lost or e.seq > 3]
    await asyncio.to_thread(own_postgres.stop)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    feed = RabbitMQBus(url=amqp_url, namespace=namespace, partitions=4, source="feed/sim")
    await feed.start()
    try:
        collector = await EventCollector("collector").attach(feed, "features.updated")
        process_stack.serve("features", http_port=port, postgres_dsn=own_postgres.dsn)

        async def readiness() -> dict | None:
            body = await asyncio.to_thread(http_json, f"{url}/readyz")
            return body if body is not None and body.get("ready") is True else None

        body = await eventually(
            readiness, 60, what="ready without Postgres", details=process_stack.logs
        )
        assert body["degraded"] == [POSTGRES], body
        assert body["checks"]["postgres"]["required"] is False, body
        assert body["checks"]["postgres"]["waiting"] is True, body

        await feed.publish_many(published)
        expected = expected_features(events)
        others = [m for m in mints if m != lost]

        def features_of(mint: str) -> dict | None:
            return http_json(f"{url}/features/{mint}")

        async def others_done() -> bool:
            found = [await asyncio.to_thread(features_of, m) for m in others]
            return all(
                f is not None
                and tuple(f.get("features", {}).get(n) for n in FeatureManager().names)
                == expected[m]
                for m, f in zip(others, found, strict=True)
            )

        await eventually(
            others_done,
            60,
            what="tokens with records processed",
            details=lambda: str(
                [
                    (m, f, expected[m])
                    for m in others
                    if (f := features_of(m)) is None
                    or tuple(f.get("features", {}).values()) != expected[m]
                ][:2]
            ),
        )

        async def rebuild_waiting() -> dict | None:
            body = await readiness()
            waiting = (body or {}).get("checks", {}).get("dependencies", {})
            return body if POSTGRES in waiting.get("waiting_on", {}) else None

        body = await eventually(rebuild_waiting, 60, what="the rebuild waiting for Postgres")
        assert body["degraded"] == [POSTGRES], body
        assert lost not in collector.by_key()
        assert "detail" in await asyncio.to_thread(features_of, lost)

        await asyncio.to_thread(own_postgres.start)

        async def rebuilt() -> bool:
            found = await asyncio.to_thread(features_of, lost)
            values = tuple(found.get("features", {}).get(n) for n in FeatureManager().names)
            return values == expected[lost]

        await eventually(rebuilt, 60, what="the token rebuilt with its whole history")
        body = await eventually(
            lambda: asyncio.to_thread(
                lambda: (b := http_json(f"{url}/readyz")) and not b.get("degraded") and b
            ),
            60,
            what="Postgres no longer degraded",
        )
        assert body["checks"]["postgres"]["ok"] is True, body
        # the state is readable before its announcement has crossed the broker
        first = (await collector.wait_for(1, "features.updated", key=lost, within=60))[0].data
        history = [e for e in events if e.key == lost and e.seq <= first.source_seq]
        assert first.values == expected_features(history)[lost]
        assert await process_stack.stop("features", within=30) == 0, process_stack.logs()
    finally:
        await feed.delete_topology()
        await feed.close()
