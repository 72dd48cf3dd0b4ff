"""The delivery journal in Redis: one count per message for every replica, with a TTL."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from pumpflow.common.bus import Subscription
from pumpflow.common.bus.abc import DELIVERY_LIMIT
from pumpflow.common.bus.journal import JOURNAL_PREFIX, SharedDeliveryJournal
from pumpflow.common.events import Event, decode_event
from pumpflow.common.state.redis import RedisStateStore
from pumpflow.common.testing import RABBITMQ, BusHarness
from pumpflow.common.testing.proxy import TcpProxy

from .test_contract import crash_until_dead_lettered, trade_event

pytestmark = pytest.mark.redis


async def test_replicas_share_each_count_which_expires_and_goes_when_settled(
    namespace, redis_url, redis_client
):
    # two replicas: a client each, one store
    stores = [RedisStateStore(url=redis_url, namespace=namespace) for _ in range(2)]
    first, second = (SharedDeliveryJournal(store, ttl_s=600) for store in stores)
    try:
        assert await first.attempt("q.p0", "m1", "a") == 1
        assert await second.attempt("q.p0", "m1", "b") == 2  # the other replica goes on
        assert await second.attempt("q.p1", "m1", "c") == 1  # another queue, another count
        keys = [k async for k in redis_client.scan_iter(match=f"{namespace}:{JOURNAL_PREFIX}*")]
        assert len(keys) == 2
        assert all(0 < ttl <= 600_000 for ttl in [await redis_client.pttl(k) for k in keys])
        await first.settle("q.p0", "m1")
        assert await second.attempt("q.p0", "m1", "d") == 1
        await second.clear()
        assert [k async for k in redis_client.scan_iter(match=f"{namespace}:*")] == []
    finally:
        for store in stores:
            await store.close()


async def test_a_start_counted_again_after_its_reply_was_lost_counts_once(namespace, redis_url):
    async with TcpProxy(urlsplit(redis_url).port or 6379) as proxy:
        store = RedisStateStore(url=proxy.url(redis_url), namespace=namespace)
        journal = SharedDeliveryJournal(store, ttl_s=600)
        try:
            assert await store.ping()  # connected: the next reply is the count's
            proxy.lose_replies(1)
            with pytest.raises(RedisConnectionError):
                await journal.attempt("q.p0", "m1", "start-1")
            assert proxy.lost_replies == 1
            assert await journal.attempt("q.p0", "m1", "start-1") == 1
            assert await journal.attempt("q.p0", "m1", "start-2") == 2
        finally:
            await journal.clear()
            await store.close()


@pytest.mark.rabbitmq
async def test_a_lost_reply_to_a_count_costs_the_poison_message_no_start(
    namespace, amqp_url, redis_url
):
    """The consumers' journals count in Redis through a proxy that loses the reply to
    the first count: the bus counts that start again, once. The poison message is
    dead-lettered after as many deliveries as when no reply is lost."""
    poison = trade_event("mintL", 1)
    deliveries = 0
    over = asyncio.Event()  # set at the end only, so the crashed buses can close

    async def dies_on_poison(event: Event) -> None:
        nonlocal deliveries
        deliveries += 1
        await over.wait()  # its consumer dies with it before this returns

    async with TcpProxy(urlsplit(redis_url).port or 6379) as proxy:
        store = RedisStateStore(url=proxy.url(redis_url), namespace=namespace)
        harness = BusHarness(RABBITMQ, namespace=namespace, amqp_url=amqp_url)
        harness.journal_store = store
        service = f"svc_{namespace}"
        subscription = Subscription(service=service, patterns=("token.*",), handler=dies_on_poison)
        try:
            publisher = await harness.bus()
            consumer = await harness.bus()
            await consumer.subscribe(subscription)
            await publisher.publish(poison)
            assert await store.ping()  # connected: the next reply is the first count's
            proxy.lose_replies(1)

            async def crash() -> None:
                nonlocal consumer, subscription
                fresh = Subscription(service=service, patterns=("token.*",), handler=dies_on_poison)
                consumer = await harness.crash_consumer(consumer, subscription, fresh)
                subscription = fresh

            crashes, letters = await crash_until_dead_lettered(
                publisher, service, lambda: deliveries, crash
            )
            assert proxy.lost_replies == 1
            assert deliveries == crashes == DELIVERY_LIMIT + 1
            assert [decode_event(letter.body).id for letter in letters] == [poison.id]
        finally:
            over.set()
            await harness.teardown()
            await store.close()
