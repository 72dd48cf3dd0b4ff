"""The delivery journal in Redis: one count per message for every replica, with a TTL."""

from __future__ import annotations

import pytest

from pumpflow.common.bus.journal import JOURNAL_PREFIX, SharedDeliveryJournal
from pumpflow.common.state.redis import RedisStateStore

pytestmark = pytest.mark.redis


async def test_replicas_share_each_count_which_expires_and_goes_when_settled(
    namespace, redis_url, redis_client
):
    # two replicas: a client each, one store
    stores = [RedisStateStore(url=redis_url, namespace=namespace) for _ in range(2)]
    first, second = (SharedDeliveryJournal(store, ttl_s=600) for store in stores)
    try:
        assert await first.attempt("q.p0", "m1") == 1
        assert await second.attempt("q.p0", "m1") == 2  # the other replica goes on
        assert await second.attempt("q.p1", "m1") == 1  # another queue, another count
        keys = [k async for k in redis_client.scan_iter(match=f"{namespace}:{JOURNAL_PREFIX}*")]
        assert len(keys) == 2
        assert all(0 < ttl <= 600_000 for ttl in [await redis_client.pttl(k) for k in keys])
        await first.settle("q.p0", "m1")
        assert await second.attempt("q.p0", "m1") == 1
        await second.clear()
        assert [k async for k in redis_client.scan_iter(match=f"{namespace}:*")] == []
    finally:
        for store in stores:
            await store.close()
