"""Trading's token views in Redis: stored by the time ``save`` returns, one write shared
by the handlers waiting meanwhile, and kept for the next write when one fails."""

from __future__ import annotations

import asyncio

import pytest
import redis.exceptions

from pumpflow.common.curve import CurveState
from pumpflow.common.events import TokenLifecycle
from pumpflow.common.state.redis import RedisStateStore
from pumpflow.common.trading import TokenView
from pumpflow.common.trading.paper import Market
from pumpflow.trading.context import VIEW_PREFIX, TokenContext

pytestmark = pytest.mark.redis


class CountedStore(RedisStateStore):
    """The real store, counting its writes."""

    writes = 0

    async def write(self, batch) -> None:
        self.writes += 1
        await super().write(batch)


def token_view(mint: str, v_sol: float = 40.0) -> TokenView:
    curve = CurveState(v_sol=v_sol, v_tokens=800_000_000.0)
    return TokenView(
        mint=mint,
        name="Good Coin",
        curve=curve,
        market=Market(state=curve),
        lifecycle=TokenLifecycle(mint=mint, state="active", priority=4),
        features={"time_since_launch": 60.0},
    )


async def test_views_are_stored_when_save_returns_and_waiting_handlers_share_writes(
    redis_url, namespace, redis_client
):
    store = CountedStore(url=redis_url, namespace=namespace)
    context = TokenContext(store, ttl_s=600.0)
    views = {f"m{i}": token_view(f"m{i}") for i in range(16)}

    async def lane(k: int) -> None:
        for n in range(10):
            views[f"m{k}"] = token_view(f"m{k}", v_sol=40.0 + n)
            context.change(f"m{k}")
            await context.save(views)
            # what this lane changed is stored by now, as it is
            assert (await context.load())[f"m{k}"] == views[f"m{k}"]

    try:
        await asyncio.gather(*(lane(k) for k in range(16)))
        assert await context.load() == views
        assert store.writes < 160  # 160 events
        del views["m3"]  # the engine forgot the token
        context.change("m3")
        await context.save(views)
        assert await redis_client.get(f"{namespace}:{VIEW_PREFIX}m3") is None
        ttl = await redis_client.pttl(f"{namespace}:{VIEW_PREFIX}m0")
        assert 0 < ttl <= 600_000
    finally:
        await store.close()


async def test_a_failed_write_raises_and_its_changes_go_with_the_next(own_redis, namespace):
    store = RedisStateStore(url=own_redis.url, namespace=namespace)
    context = TokenContext(store, ttl_s=600.0)
    views = {"a": token_view("a")}
    try:
        await asyncio.to_thread(own_redis.stop)
        context.change("a")
        with pytest.raises(redis.exceptions.ConnectionError):
            await context.save(views)
        await asyncio.to_thread(own_redis.start)
        views["b"] = token_view("b")
        context.change("b")
        await context.save(views)
        assert await context.load() == views
    finally:
        await store.close()
