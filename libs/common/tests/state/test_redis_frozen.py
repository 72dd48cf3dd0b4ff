"""The Redis store while its server is frozen: each call fails in bounded time as Redis's.

A frozen Redis (its host stopped, the network lost without a reset) takes what is sent
and answers nothing. The store reaches it through a proxy of the test's own that stops
forwarding, so the machine's Redis stays untouched.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import pytest

from pumpflow.common.dependencies import NETWORK, REDIS, WAITS, transient_dependency, wait_out
from pumpflow.common.state.abc import WriteBatch
from pumpflow.common.state.redis import RedisStateStore
from pumpflow.common.testing import eventually
from pumpflow.common.testing.proxy import TcpProxy

pytestmark = pytest.mark.redis

#: the store's bound on a socket operation in this test
SOCKET_TIMEOUT_S = 1.0


async def test_a_frozen_redis_fails_each_call_in_bounded_time_and_the_store_recovers(
    namespace, redis_url, redis_client
):
    """A read and a write (a group commit) fail once the socket timeout passed, named
    Redis's, so work waits for Redis (readiness and the metrics name it). Their
    connections are dropped, not handed out again: once Redis answers, the same store
    reads what it wrote and no connection is left waiting on the frozen one."""
    async with TcpProxy(urlsplit(redis_url).port or 6379) as proxy:
        store = RedisStateStore(
            url=proxy.url(redis_url), namespace=namespace, socket_timeout=SOCKET_TIMEOUT_S
        )
        waiting: asyncio.Task | None = None
        try:
            await store.write(WriteBatch.of_hashes({"k": {"n": 1}}))
            proxy.freeze()

            async def read() -> dict[str, bytes]:
                return await store.hgetall("k")

            async def write() -> None:
                await store.write(WriteBatch.of_hashes({"k": {"n": 2}, "other": {"n": 2}}))

            for action in (read, write):
                began = time.monotonic()
                with pytest.raises(Exception) as failed:
                    # beyond the bound, the test's own timeout: named the network's
                    await asyncio.wait_for(action(), 3 * SOCKET_TIMEOUT_S + 1)
                took = time.monotonic() - began
                assert transient_dependency(failed.value) == REDIS, repr(failed.value)
                assert took < SOCKET_TIMEOUT_S + 1, (action.__name__, took)

            # the connections that timed out are closed, not kept for the next call
            pool = store._client.connection_pool
            timed_out = pool._available_connections
            assert timed_out and not any(c.is_connected for c in timed_out), timed_out
            waiting = asyncio.create_task(wait_out(write, waiter="test", what="a write"))
            await eventually(lambda: REDIS in WAITS.describe(), what="a wait for Redis")
            assert NETWORK not in WAITS.describe()
            proxy.thaw()
            await asyncio.wait_for(waiting, 10)
            assert await asyncio.wait_for(read(), 10) == {"n": b"2"}
            assert not pool._in_use_connections, pool._in_use_connections
            assert await asyncio.wait_for(store.ping(), 10)
        finally:
            proxy.thaw()
            if waiting is not None:
                waiting.cancel()
            await store.close()
