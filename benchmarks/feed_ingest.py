"""Feed benchmarks: ingest rate into the in-memory bus, recorder rows/s, memory per mint.

- ingest: raw frames (a simulated market's mix, as bytes) through the feed's frame
  handler: decode + validate + metrics + dedup + envelope + per-mint seq + publish
  into the in-memory bus with one synchronous consumer. No socket I/O.
- decode: ``decode_frame`` alone.
- recorder: ``TokenEventStore.write`` (COPY into staging, insert, tokens upsert) into
  a throw-away Postgres schema, in batches.
- malformed: a flood of frames that fail validation through the same frame handler,
  dead-lettered into RabbitMQ (persistent, with confirms); timed until the last dead
  letter is confirmed (``disconnect``), then the dead-letter queue is counted.
- memory: bytes per subscribed mint (the feed's subscription sets, the Sequencer).

Run: .venv/bin/python benchmarks/feed_ingest.py [--frames N] [--rows N] [--malformed N]
[--no-postgres] [--no-rabbitmq]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import time
import tracemalloc
import uuid

import msgspec
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import WallClock
from pumpflow.common.events import Event, make_event
from pumpflow.common.pumpportal import decode_frame
from pumpflow.feed import reference_frames as ref
from pumpflow.feed.manager import DataFeedManager, FeedManagerConfig
from pumpflow.feed.metrics import FeedMetrics
from pumpflow.feed.socket_feed import SocketDataFeed, SocketFeedConfig

POSTGRES_DSN = os.environ.get(
    "PUMPFLOW_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
AMQP_URL = os.environ.get("PUMPFLOW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _unique_signature(signature: bytes, i: int) -> bytes:
    """``signature`` made unique by ``i``, still 88 base58 characters (base58 has no 0)."""
    tag = str(i).replace("0", "o").rjust(10, "x").encode()
    return tag + signature[len(tag) :]


def market_frames(n: int) -> list[bytes]:
    """n frames of a simulated market, or variations of the reference frames."""
    try:
        from pumpflow.simulator.market import Market, MarketConfig
    except ImportError:
        base = [ref.CREATE, ref.SELL, ref.OLD_BUY, ref.SELL, ref.SELL, ref.MIGRATE]
        out = []
        for i in range(n):
            frame = base[i % len(base)]
            sig = msgspec.json.decode(frame)["signature"].encode()
            out.append(frame.replace(sig, _unique_signature(sig, i)))
        return out
    encode = msgspec.json.Encoder().encode
    frames = []
    for _, frame in Market(MarketConfig(seed=1, launches_per_minute=40)).frames():
        frames.append(encode(frame))
        if len(frames) >= n:
            break
    return frames


async def bench_ingest(frames: list[bytes]) -> None:
    bus = InMemoryBus(partitions=16, synchronous=True, source="feed/bench")
    await bus.start()
    consumed = 0

    async def consumer(event: Event) -> None:
        nonlocal consumed
        consumed += 1

    await bus.subscribe(Subscription(service="bench", patterns=("token.*",), handler=consumer))
    metrics = FeedMetrics(CollectorRegistry())
    feed = SocketDataFeed(SocketFeedConfig(url="ws://127.0.0.1:1/unused"), clock=WallClock(),
                          bus=bus, metrics=metrics)  # fmt: skip
    manager = DataFeedManager(bus, config=FeedManagerConfig(source="feed/bench"), metrics=metrics)
    manager.add_data_feed(feed)
    on_frame = feed._on_frame  # the per-frame path after the socket read
    gc.collect()
    began = time.perf_counter()
    for frame in frames:
        await on_frame(frame)
    took = time.perf_counter() - began
    kinds = {k.value: c.value for k, c in metrics.frames_by_kind.items()}
    print(f"feed ingest: {len(frames) / took:,.0f} frames/s "
          f"({len(frames):,} frames in {took:.2f} s; {consumed:,} events consumed; "
          f"mix {kinds}; {len(feed.active_mints):,} mints subscribed)")  # fmt: skip
    began = time.perf_counter()
    for frame in frames:
        decode_frame(frame)
    took = time.perf_counter() - began
    print(f"decode_frame alone: {len(frames) / took:,.0f} frames/s "
          f"({took / len(frames) * 1e6:.2f} us/frame)")  # fmt: skip
    await bus.close()


async def bench_recorder(frames: list[bytes], rows: int, batch: int) -> None:
    import asyncpg

    from pumpflow.common.db.pool import create_pool
    from pumpflow.common.storage import TokenEventStore

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    pool = await create_pool(POSTGRES_DSN, schema, max_size=2)
    try:
        store = TokenEventStore(pool)
        events = []
        payloads = []
        for i in range(rows):
            frame = frames[i % len(frames)]
            if i >= len(frames):  # make signatures unique beyond the sample
                sig = msgspec.json.decode(frame)["signature"].encode()
                frame = frame.replace(sig, _unique_signature(sig, i))
            payloads.append(frame)
            events.append(make_event(decode_frame(frame), source="feed/bench", time=float(i),
                                     seq=i))  # fmt: skip
        began = time.perf_counter()
        written = 0
        for start in range(0, rows, batch):
            written += await store.write(events[start:start + batch],
                                         payloads[start:start + batch])  # fmt: skip
        took = time.perf_counter() - began
        print(f"recorder: {written / took:,.0f} rows/s into Postgres "
              f"({written:,} rows in batches of {batch:,}, {took:.2f} s)")  # fmt: skip
        began = time.perf_counter()
        again = await store.write(events[:batch], payloads[:batch])
        took = time.perf_counter() - began
        print(f"recorder, duplicate batch of {batch:,}: {again} new rows, {took * 1e3:.0f} ms")
        began = time.perf_counter()
        replayed = 0
        async for _ in store.stream(batch_size=2_000):
            replayed += 1
        took = time.perf_counter() - began
        print(f"replay (cursor, decode): {replayed / took:,.0f} events/s ({replayed:,} events)")
    finally:
        await pool.close()
        conn = await asyncpg.connect(POSTGRES_DSN)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


def malformed_frames(n: int) -> list[bytes]:
    """n frames that fail validation in different ways (bad number, missing field, not JSON)."""
    kinds = (
        ref.SELL.replace(b'"solAmount": 0.001014365', b'"solAmount": "lots"'),
        ref.SELL.replace(b'"mint": "14k7LpDRKvyVuMWfGe1vB5ByoQh1yUQPetApMBLuzw1f", ', b""),
        b'{"txType": "buy", "signature": ',
    )
    return [kinds[i % len(kinds)].replace(b"5PEnuUTT", b"%08d" % i) for i in range(n)]


async def bench_malformed(count: int) -> None:
    """Frames/s through the frame handler when every frame is dead-lettered into RabbitMQ."""
    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    bus = RabbitMQBus(url=AMQP_URL, namespace=f"bench{uuid.uuid4().hex[:10]}", partitions=4,
                      source="feed/bench")  # fmt: skip
    await bus.start()
    try:
        metrics = FeedMetrics(CollectorRegistry())
        feed = SocketDataFeed(SocketFeedConfig(url="ws://127.0.0.1:1/unused"),
                              clock=WallClock(), bus=bus, metrics=metrics)  # fmt: skip
        frames = malformed_frames(count)
        await feed.connect()  # starts the background parts; the URL refuses at once
        on_frame = feed._on_frame
        gc.collect()
        began = time.perf_counter()
        for frame in frames:
            await on_frame(frame)
        reader = time.perf_counter() - began
        await feed.disconnect()  # every dead letter confirmed
        took = time.perf_counter() - began
        channel = await bus._channel.get_underlay_channel()
        stored = (await channel.queue_declare(bus.dlq_name("feed"), passive=True)).message_count
        dropped = getattr(feed.dead_letters, "dropped", 0)
        print(f"malformed flood: the reader's loop {count / reader:,.0f} frames/s; "
              f"{count / took:,.0f} frames/s until every dead letter is confirmed "
              f"({count:,} frames in {took:.2f} s; {stored:,} in the dead-letter queue, "
              f"{dropped:,} dropped and counted: the queue was full; "
              f"{count - stored - dropped:,} not confirmed within the flush bound, "
              f"reported)")  # fmt: skip
    finally:
        await bus.delete_topology(services=("feed",))
        await bus.close()


async def bench_memory(mints: int) -> None:
    metrics = FeedMetrics(CollectorRegistry())
    feed = SocketDataFeed(SocketFeedConfig(url="ws://127.0.0.1:1/unused"), clock=WallClock(),
                          metrics=metrics)  # fmt: skip
    manager = DataFeedManager(None, config=FeedManagerConfig(source="feed/bench"), metrics=metrics)
    names = [f"{uuid.uuid4().hex}{i:012d}pump"[:44] for i in range(mints)]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    await feed.subscribe(names)
    # as after sending: subscribed on the server, nothing pending
    feed._on_server.update(feed._to_subscribe)
    feed._to_subscribe.clear()
    for name in names:
        manager.sequencer.next(name)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    print(f"memory per subscribed mint: {used / mints:,.0f} bytes "
          f"({mints:,} mints; subscription sets + seq; mint strings excluded)")  # fmt: skip
    recent = manager.signatures
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(100_000):
        recent.seen("buy", f"sig{i}")
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    print(f"dedup memory: {used / 100_000:,.0f} bytes per remembered signature "
          f"(capacity bounds it; default 200,000)")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--mints", type=int, default=100_000)
    parser.add_argument("--malformed", type=int, default=20_000)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-rabbitmq", action="store_true")
    args = parser.parse_args()
    # logs cost what they cost in a service (formatted, written), without filling a terminal
    logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"))  # noqa: ASYNC230
    frames = market_frames(args.frames)
    await bench_ingest(frames)
    if not args.no_rabbitmq:
        await bench_malformed(args.malformed)
    if not args.no_postgres:
        await bench_recorder(frames, args.rows, args.batch)
    await bench_memory(args.mints)


if __name__ == "__main__":
    asyncio.run(main())
