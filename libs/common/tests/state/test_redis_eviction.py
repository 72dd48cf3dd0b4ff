"""A Redis that evicts keys at its maxmemory is named at start-up: the services' state
must not be evicted, and one evicted is lost."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aioredis

from pumpflow.common.runtime.runner import warn_if_evicting
from pumpflow.common.state.redis import RedisStateStore
from pumpflow.common.testing.instances import RedisInstance

pytestmark = pytest.mark.redis


async def test_a_redis_evicting_at_its_maxmemory_is_warned_of_and_one_that_refuses_is_not(
    caplog, namespace
):
    server = RedisInstance()
    await asyncio.to_thread(server.start)
    admin = aioredis.Redis.from_url(server.url)
    store = RedisStateStore(url=server.url, namespace=namespace)
    caplog.set_level(logging.WARNING, logger="pumpflow.runtime")
    try:
        # the default: no limit, and none evicted at one
        assert await store.eviction_policy() is None
        await admin.config_set("maxmemory-policy", "allkeys-lru")
        assert await store.eviction_policy() is None  # no maxmemory: nothing evicted
        await admin.config_set("maxmemory", 100 * 2**20)
        assert await store.eviction_policy() == "allkeys-lru"
        await warn_if_evicting(store)
        [warning] = [r.getMessage() for r in caplog.records]
        assert "maxmemory-policy allkeys-lru" in warning and "noeviction" in warning

        caplog.clear()
        await admin.config_set("maxmemory-policy", "noeviction")
        await warn_if_evicting(store)
        assert caplog.records == []
    finally:
        await store.close()
        await admin.aclose()
        await asyncio.to_thread(server.close)
