"""Storing trading's token views: what it costs per event in Redis.

The replica that trades stores each token view an event changed before it acks the
event (:class:`~pumpflow.trading.context.TokenContext`); handlers of the bus's lanes
that wait meanwhile share one write. This drives ``TokenContext`` as the service does
(a change, then ``save``) with views of the default feature set's size, from one lane
(one write per event: the cost when events come one at a time) and from several
lanes at once (the writes shared), against a real Redis, and prints per event the
wall time and the process's CPU time, the writes made and the load average. It also
times loading the views, as a replica taking over does.

Run: .venv/bin/python benchmarks/trading_context.py [--redis-url URL] [--events N]
     [--lanes 1 16] [--tokens 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

from pumpflow.common.curve import CurveState
from pumpflow.common.events import ModelPrediction, TokenLifecycle
from pumpflow.common.features import default_feature_set
from pumpflow.common.state.redis import RedisStateStore
from pumpflow.common.trading import TokenView
from pumpflow.common.trading.paper import Market
from pumpflow.trading.context import VIEW_PREFIX, TokenContext


def token_view(mint: str, names: list[str]) -> TokenView:
    curve = CurveState(v_sol=40.0, v_tokens=800_000_000.0)
    return TokenView(
        mint=mint,
        name="Good Coin",
        symbol="GOOD",
        creator="7GFaFiXjYtY4d7W2V4C6zjPQ1cgpiHjaCYNeT9mEGdq1",
        created_at=1.0,
        curve=curve,
        market=Market(state=curve),
        lifecycle=TokenLifecycle(mint=mint, state="active", priority=4),
        prediction=ModelPrediction(
            mint=mint, model_id="m1", arm="a", feature_set_version="v", score=0.7
        ),
        features={name: 0.5 for name in names},
        features_time=2.0,
    )


class CountedStore(RedisStateStore):
    writes = 0

    async def write(self, batch) -> None:
        self.writes += 1
        await super().write(batch)


async def run(args: argparse.Namespace) -> None:
    names = [definition.name for definition in default_feature_set()]
    store = CountedStore(url=args.redis_url, namespace=f"bench-{uuid.uuid4().hex[:8]}")
    views = {f"mint{i}": token_view(f"mint{i}", names) for i in range(args.tokens)}
    context = TokenContext(store, ttl_s=600.0)
    size = len(context._encoder.encode(views["mint0"]))
    print(f"{len(names)} features, a view is {size} bytes; {args.events} events per run")
    try:
        for lanes in args.lanes:
            store.writes = 0

            async def lane(k: int, lanes: int = lanes) -> None:
                for i in range(args.events // lanes):
                    context.change(f"mint{(k * 7919 + i) % args.tokens}")
                    await context.save(views)

            wall, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(lane(k) for k in range(lanes)))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            per_event = 1e6 / args.events
            print(
                f"{lanes:>3} lanes: {store.writes:,} writes, per event {wall * per_event:,.0f} us"
                f" wall, {cpu * per_event:,.0f} us CPU; load average {os.getloadavg()[0]:.2f}"
            )
        wall, cpu = time.perf_counter(), time.process_time()
        loaded = await context.load()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"load of {len(loaded):,} views: {1e3 * wall:.1f} ms wall, {1e3 * cpu:.1f} ms CPU")
    finally:
        await store.delete_many(VIEW_PREFIX + mint for mint in views)
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--events", type=int, default=8000)
    parser.add_argument("--lanes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=500)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
