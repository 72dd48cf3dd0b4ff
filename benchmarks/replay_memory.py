"""Replay memory: DatabaseDataFeed's store streams millions of rows in flat memory.

Fills a scratch schema with ``--rows`` stored trade events (server-side, with
generate_series, so filling is quick), then replays them all in time order through
``TokenEventStore.stream`` (a server-side cursor) and prints the process's resident
memory at points along the way, with the replay rate. Flat memory means the RSS at
the end is about the RSS after the first tenth.

    .venv/bin/python benchmarks/replay_memory.py [--rows 1000000] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid

import asyncpg

from pumpflow.common.db.pool import create_pool
from pumpflow.common.storage import TokenEventStore

TEMPLATE = {
    "signature": "SIG",
    "mint": "MINT",
    "traderPublicKey": "3c6KJRkWtYoGHokK1x1YrYUsNUT672J3RHRgsodhC6KJ",
    "txType": "buy",
    "tokenAmount": 36189.104326,
    "solAmount": 0.001014365,
    "newTokenBalance": 36189.104326,
    "bondingCurveKey": "2bQpbWV1FYiddhyEceQf3FuviVPd4JQKYnptHnCEGKR5",
    "vTokensInBondingCurve": 1071666285.328535,
    "vSolInBondingCurve": 30.03733572726111,
    "marketCapSol": 28.028628070587033,
    "pool": "pump",
}


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def fill(pool: asyncpg.Pool, rows: int) -> None:
    frame = json.dumps(TEMPLATE, separators=(",", ":"))
    head, rest = frame.split('"SIG"', 1)
    middle, tail = rest.split('"MINT"', 1)
    await pool.execute(
        """
        INSERT INTO token_events (signature, tx_type, mint, event_time, seq, source,
                                  event_id, payload, frame)
        SELECT sig, 'buy', mint, 1.7e9 + n * 0.01, n / 1000 + 1,
               'feed/bench', md5(n::text), f::jsonb, f
        FROM generate_series(1, $1) AS n,
             -- base58 keys of real lengths (no 0 in base58: digits 0 become o)
             LATERAL (SELECT rpad('Sig' || translate(n::text, '0', 'o'), 88, 'x') AS sig,
                             rpad('Mint' || translate((n % 1000)::text, '0', 'o'), 44, 'x')
                                 AS mint) AS keys,
             LATERAL (SELECT $2 || '"' || sig || '"' || $3 || '"' || mint || '"' || $4 AS f)
                 AS frames
        """,
        rows,
        head,
        middle,
        tail,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    pool = await create_pool(args.dsn, schema)
    try:
        began = time.perf_counter()
        await fill(pool, args.rows)
        print(f"filled {args.rows:,} rows in {time.perf_counter() - began:.1f} s")
        store = TokenEventStore(pool)
        marks = {int(args.rows * f) for f in (0.1, 0.25, 0.5, 0.75, 1.0)}
        print(f"before replay: RSS {rss_mib():.1f} MiB")
        count = 0
        began = time.perf_counter()
        async for _ in store.stream():
            count += 1
            if count in marks:
                took = time.perf_counter() - began
                print(
                    f"replayed {count:>10,} rows: RSS {rss_mib():7.1f} MiB, "
                    f"{count / took:,.0f} events/s"
                )
        assert count == args.rows, (count, args.rows)
    finally:
        await pool.close()
        conn = await asyncpg.connect(args.dsn)
        try:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
