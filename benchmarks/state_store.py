"""Throughput of the StateStore batch calls: in-process and Redis (pipelined).

Run: .venv/bin/python benchmarks/state_store.py [--redis-url URL] [--keys N] [--rounds R]

Prints keys per second for set_many, hset_many (10 fields, with TTL), get_many and
hgetall, and for Redis the pipelined batch against one call per key, which is what the
pipeline saves. Keys live under a fresh namespace that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from pumpflow.common.clock import ReplayClock
from pumpflow.common.state.abc import StateStore
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.state.redis import RedisStateStore


async def measure(label: str, store: StateStore, keys: int, rounds: int) -> None:
    names = [f"tok:{i}" for i in range(keys)]
    values = {name: b"x" * 64 for name in names}
    hashes = [f"feat:{i}" for i in range(keys)]
    fields = {name: {f"f{j}": j * 0.5 for j in range(10)} for name in hashes}

    async def timed(what: str, call) -> None:
        started = time.perf_counter()
        for _ in range(rounds):
            await call()
        elapsed = time.perf_counter() - started
        print(f"{label:<8} {what:<28} {keys * rounds / elapsed:>12,.0f} keys/s")

    await timed(f"set_many x{keys}", lambda: store.set_many(values, ttl=600))
    await timed(f"hset_many x{keys} (10 fields)", lambda: store.hset_many(fields, ttl=600))
    await timed(f"get_many x{keys}", lambda: store.get_many(names))

    async def hget_each() -> None:
        for name in hashes:
            await store.hgetall(name)

    await timed("hgetall one by one", hget_each)

    async def set_each() -> None:
        for name in names:
            await store.set(name, values[name], ttl=600)

    await timed("set one by one", set_each)
    await store.delete_many(await store.scan_keys(""))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    await measure("memory", MemoryStateStore(ReplayClock()), args.keys, args.rounds)
    store = RedisStateStore(url=args.redis_url, namespace=f"bench{uuid.uuid4().hex[:8]}")
    try:
        await measure("redis", store, args.keys, args.rounds)
    finally:
        await store.delete_many(await store.scan_keys(""))
        await store.close()


if __name__ == "__main__":
    asyncio.run(main())
