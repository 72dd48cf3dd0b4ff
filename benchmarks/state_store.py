"""Throughput of the StateStore batch calls: in-process and Redis (pipelined).

Run: .venv/bin/python benchmarks/state_store.py [--redis-url URL] [--keys N] [--rounds R]
[--python-packing]

Prints keys per second for set_many, hset_many (10 fields, with TTL), get_many and
hgetall, and for Redis the pipelined batch against one call per key, which is what the
pipeline saves. Then the client's CPU per ``write`` of a keyed consumer's commit of
1, 4 and 16 keys (a 1.1 KB record with a TTL each, and a new entry in a partition
index), the same with a view of 30 float fields a key (as the features service's
vectors), and per read as a keyed consumer's restore and the feature cache make them:
``hgetall`` of a 1,000-entry partition index, ``get_many`` of 100 such records,
``hgetall`` of a 10-field hash, and ``lists`` of a 2,000-entry list of 40-byte values
(the model service's live labels). Which reply parser redis-py uses (hiredis when
installed) and what packs the commands (hiredis; ``--python-packing``: redis-py's
asyncio connection's own Python code, as the store did before) are printed first.
Keys live under a fresh namespace that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from redis.asyncio.connection import Connection
from redis.utils import HIREDIS_AVAILABLE

from pumpflow.common.clock import ReplayClock
from pumpflow.common.state.abc import StateStore, WriteBatch
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


async def commit_cpu(label: str, store: StateStore, writes: int) -> None:
    """Print this process's CPU per ``write`` of a commit of 1, 4 and 16 keys."""
    record = bytes(1100)
    view = {f"feature_{j}": j * 1.37 + 0.001 for j in range(30)}
    for keys, views in ((1, False), (4, False), (16, False), (1, True), (4, True), (16, True)):
        batch = WriteBatch()
        for i in range(keys):
            batch.set(f"svc:key:{i}", record, ttl=600)
            if views:
                batch.hset(f"svc:view:{i}", view)
        if keys > 1:
            batch.hset("svc:partition:0", {f"{i}": b"1" for i in range(keys)})
        for _ in range(writes // 10):  # warm: connection, script cache
            await store.write(batch)
        started = time.process_time()
        for _ in range(writes):
            await store.write(batch)
        cpu = (time.process_time() - started) / writes * 1e6
        what = f"{keys:>2} keys" + (", views" if views else "")
        print(f"{label:<8} write of a commit, {what:<15} {cpu:>9,.0f} us CPU")


async def read_cpu(label: str, store: StateStore, reads: int) -> None:
    """Print this process's CPU per read of a partition index, of records, of a hash, of a list."""
    records = {f"svc:rec:{i}": bytes(1100) for i in range(100)}
    await store.set_many(records, ttl=600)
    await store.hset_many(
        {
            "svc:index:0": {f"{i}": b"1" for i in range(1000)},
            "svc:vector": {f"f{j}": j * 0.5 for j in range(10)},
        },
        ttl=600,
    )
    await store.append_bounded({"svc:labels": [bytes(40)] * 2000}, keep=2000, ttl=600)
    names = list(records)
    reads_of = {
        "hgetall, 1,000-entry index": lambda: store.hgetall("svc:index:0"),
        "get_many, 100 records": lambda: store.get_many(names),
        "hgetall, 10 fields": lambda: store.hgetall("svc:vector"),
        "lists, 2,000 entries": lambda: store.lists(["svc:labels"]),
    }
    for what, call in reads_of.items():
        for _ in range(reads // 10):
            await call()
        started = time.process_time()
        for _ in range(reads):
            await call()
        cpu = (time.process_time() - started) / reads * 1e6
        print(f"{label:<8} read: {what:<27} {cpu:>9,.0f} us CPU")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--writes", type=int, default=2000, help="commits timed per size")
    parser.add_argument("--reads", type=int, default=2000, help="reads timed per kind")
    parser.add_argument(
        "--python-packing",
        action="store_true",
        help="pack commands with redis-py's asyncio Python code, not hiredis",
    )
    args = parser.parse_args()
    print(f"redis-py reply parser: {'hiredis' if HIREDIS_AVAILABLE else 'pure Python'}")
    await measure("memory", MemoryStateStore(ReplayClock()), args.keys, args.rounds)
    store = RedisStateStore(url=args.redis_url, namespace=f"bench{uuid.uuid4().hex[:8]}")
    if args.python_packing:
        store._client.connection_pool.connection_class = Connection
    print(f"commands packed by: {'redis-py (Python)' if args.python_packing else 'hiredis'}")
    try:
        await measure("redis", store, args.keys, args.rounds)
        await commit_cpu("redis", store, args.writes)
        await read_cpu("redis", store, args.reads)
    finally:
        await store.delete_many(await store.scan_keys(""))
        await store.close()


if __name__ == "__main__":
    asyncio.run(main())
