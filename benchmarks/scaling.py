"""Scaling: features service throughput with 1 and with 2 replicas over RabbitMQ.

For each replica count: a fresh namespace; a simulated market's token events
(``--minutes`` of it) are published into the features partition queues first (a
backlog, nobody consuming); then that many ``pumpflow serve features`` processes start
at once, share the partitions (rendezvous over their heartbeats in Redis), and work the
backlog off: fold each event into the token's state, publish ``features.updated``,
checkpoint to Redis before the ack. Throughput is events over the time from the first
event consumed to the last, read from the replicas' ``/metrics``.

Run: .venv/bin/python benchmarks/scaling.py [--minutes 30] [--replicas 1 2] [--partitions 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import redis.asyncio as redis

from pumpflow.common.bus import Subscription
from pumpflow.common.bus.rabbitmq import RabbitMQBus
from pumpflow.common.events import Event
from pumpflow.common.testing import free_port
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig

BIN = Path(sys.executable).parent
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"
PATTERNS = ("token.created", "token.trade", "token.migrated", "token.lifecycle")
START = 1_700_000_000.0


def consumed(port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pumpflow_events_consumed_total{") and 'service="features"' in line
    )


def spawn(env: dict[str, str], ports: list[int]) -> list[subprocess.Popen]:
    """Start one features replica per port, all at once."""
    return [
        subprocess.Popen(
            [BIN / "pumpflow", "serve", "features"],
            env={**env, "PUMPFLOW_REPLICA": f"bench-{i}", "PUMPFLOW_HTTP_PORT": str(port)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, port in enumerate(ports)
    ]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=60)


async def run(events: list[Event], replicas: int, partitions: int) -> dict[str, float]:
    namespace = f"bench_scaling_{uuid.uuid4().hex[:8]}"
    bus = RabbitMQBus(url=AMQP_URL, namespace=namespace, partitions=partitions, source="bench/1")
    await bus.start()

    async def ignore(event: Event) -> None:
        pass

    # declares the features queues and bindings, consuming none of them
    declared = Subscription(service="features", patterns=PATTERNS, handler=ignore, partitions=())
    await bus.subscribe(declared)
    await bus.unsubscribe(declared)
    started = time.perf_counter()
    await bus.publish_many(events)
    publish_s = time.perf_counter() - started

    env = {
        **os.environ,
        "PUMPFLOW_TRANSPORT": "rabbitmq",
        "PUMPFLOW_NAMESPACE": namespace,
        "PUMPFLOW_PARTITIONS": str(partitions),
        "PUMPFLOW_AMQP_URL": AMQP_URL,
        "PUMPFLOW_REDIS_URL": REDIS_URL,
        "PUMPFLOW_LOG_LEVEL": "WARNING",
        "PUMPFLOW_HEARTBEAT_INTERVAL_S": "0.2",
        "PUMPFLOW_HEARTBEAT_TTL_S": "1.0",
    }
    ports = [free_port() for _ in range(replicas)]
    procs = spawn(env, ports)
    first = last = None
    per_replica: list[float] = [0.0] * replicas
    # the longest time the total did not move while work was left: a stall shows here
    longest_pause, moved_at, seen = 0.0, None, 0.0
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            counts = await asyncio.gather(*(asyncio.to_thread(consumed, p) for p in ports))
            now = time.perf_counter()
            per_replica = [c or 0.0 for c in counts]
            total = sum(per_replica)
            if first is None and total > 0:
                first = moved_at = now
            if total > seen:
                if moved_at is not None:
                    longest_pause = max(longest_pause, now - moved_at)
                moved_at, seen = now, total
            if total >= len(events):
                last = now
                break
            await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(stop, procs)
        await bus.delete_topology(services=["features"])
        await bus.close()
        client = redis.Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    if first is None or last is None:
        raise RuntimeError("the replicas did not work the backlog off in time")
    # the first poll that saw work may be up to one poll interval late
    elapsed = last - first
    return {
        "events_per_s": len(events) / elapsed,
        "seconds": elapsed,
        "publish_events_per_s": len(events) / publish_s,
        "shares": [round(c / max(sum(per_replica), 1), 3) for c in per_replica],
        "longest_pause_s": longest_pause,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="simulated market minutes")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    events = list(
        market_events(
            Market(MarketConfig(seed=args.seed)),
            args.minutes * 60,
            start_epoch=START,
            source="feed/bench",
        )
    )
    mints = len({e.key for e in events})
    print(
        f"== features scaling: {len(events)} events, {mints} tokens, {args.partitions} partitions"
    )
    base = None
    for replicas in args.replicas:
        result = await run(events, replicas, args.partitions)
        base = base or result["events_per_s"]
        print(
            f"{replicas} replica(s): {result['events_per_s']:,.0f} events/s "
            f"({result['seconds']:.1f} s; x{result['events_per_s'] / base:.2f}; "
            f"shares {result['shares']}; longest pause {result['longest_pause_s']:.2f} s; "
            f"backlog published at "
            f"{result['publish_events_per_s']:,.0f} events/s)"
        )


if __name__ == "__main__":
    asyncio.run(main())
