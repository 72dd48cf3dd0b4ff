"""The features service over RabbitMQ and Redis, against the bus's own one hop.

Service run: ``--replicas`` features replicas (1 or 2) run in this process, each built
as ``pumpflow serve features`` builds it (runner): its own RabbitMQBus connection
(16 partitions, prefetch 256) wrapped in a BalancedBus with the runner's
OwnershipConfig, its own RedisStateStore client, a WallClock. Once the replicas
split the partitions, a publisher bus (another connection) publishes N token events
of a simulated market with ``publish_many``; the figure is events/s from the first
publish until every mint's newest ``features.updated`` (the one including its last
creation or trade; a mint's events delivered together are announced once) reached a
collector consuming them on the publisher's connection. That is two bus hops (feed
-> features -> collector) plus a Redis checkpoint per group commit.

One hop, same run and broker: the same N events published the same way to a
do-nothing consumer on a second connection (as ``bus_throughput.py`` measures it, but
with the consumer on its own connection, like a replica). Each run uses fresh
namespaces, deleted afterwards (queues, exchanges, Redis keys). Everything shares one
event loop: two replicas here share one core, so they show the cost of balancing,
not scaling (``scaling.py`` runs replicas as processes).

Run: .venv/bin/python benchmarks/services_distributed.py [--events 20000] [--replicas 1]
[--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import statistics
import time
import uuid

from prometheus_client import CollectorRegistry

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.factory import create_bus
from pumpflow.common.bus.ownership import BalancedBus, assign_partitions
from pumpflow.common.bus.rabbitmq import RabbitMQBus
from pumpflow.common.clock import WallClock
from pumpflow.common.events import Event
from pumpflow.common.features.inputs import event_input
from pumpflow.common.features.processor import invalid_reason
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.runtime.wiring import bus_config, ownership_config
from pumpflow.common.state.redis import RedisStateStore
from pumpflow.features.service import FeaturesService
from pumpflow.features.settings import FeaturesSettings
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig

AMQP_URL = os.environ.get("PUMPFLOW_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("PUMPFLOW_REDIS_URL", "redis://127.0.0.1:6379/0")
PARTITIONS = 16
TOKEN_EVENTS = ("token.created", "token.trade", "token.migrated")


def token_events(count: int, seed: int) -> list[Event]:
    """The first ``count`` token events of a seeded market, as the feed publishes them."""
    market = Market(MarketConfig(seed=seed))
    events = market_events(market, math.inf, start_epoch=time.time(), source="feed/bench")
    return list(itertools.islice(events, count))


def updates_expected(events: list[Event]) -> dict[str, int]:
    """mint -> seq of its last valid creation or trade: the newest vector announced of it
    (a mint's events delivered together are announced once, by the last)."""
    return {
        e.key: e.seq
        for e in events
        if e.type in ("token.created", "token.trade") and invalid_reason(event_input(e)) is None
    }


class Counted:
    """A handler that sets ``done`` once ``want`` distinct (key, seq) arrived."""

    def __init__(self, want: int):
        self.want = want
        self.seen: set[tuple[str | None, int | None]] = set()
        self.done = asyncio.Event()

    async def __call__(self, event: Event) -> None:
        self.seen.add((event.key, event.seq))  # a redelivered copy counts once
        if len(self.seen) >= self.want:
            self.done.set()


class Newest:
    """A features.updated handler that sets ``done`` once every mint's newest arrived."""

    def __init__(self, want: dict[str, int]):
        self.want = want
        self.newest: dict[str | None, int] = {}
        self.seen: set[tuple[str | None, int | None]] = set()
        self.done = asyncio.Event()

    async def __call__(self, event: Event) -> None:
        self.seen.add((event.key, event.seq))
        seq = event.data.source_seq
        if seq > self.newest.get(event.key, 0):
            self.newest[event.key] = seq
            if seq == self.want.get(event.key) and self.newest == self.want:
                self.done.set()


async def _wait(counted: Counted | Newest, events: int) -> None:
    try:
        async with asyncio.timeout(max(120.0, events / 100)):
            await counted.done.wait()
    except TimeoutError:
        raise RuntimeError(f"{len(counted.seen):,} distinct events arrived: too few") from None


async def _clear_redis(namespace: str) -> None:
    store = RedisStateStore(url=REDIS_URL, namespace=namespace)
    try:
        keys = await store.scan_keys("")
        if keys:
            await store.delete_many(keys)
    finally:
        await store.close()


async def service_run(events: list[Event], replicas: int) -> dict[str, float]:
    """Events/s through ``replicas`` features replicas until the collector got every update."""
    namespace = f"bench_sd_{uuid.uuid4().hex[:8]}"
    clock = WallClock()
    publisher = RabbitMQBus(
        url=AMQP_URL, namespace=namespace, partitions=PARTITIONS, source="feed/bench"
    )
    running: list[tuple[FeaturesService, BalancedBus, RedisStateStore]] = []
    try:
        await publisher.start()
        collector = Newest(updates_expected(events))
        await publisher.subscribe(
            Subscription(service="collector", patterns=("features.updated",), handler=collector)
        )
        names = [f"bench-{i}" for i in range(replicas)]
        for name in names:
            settings = FeaturesSettings.load(
                service="features", transport="rabbitmq", namespace=namespace,
                partitions=PARTITIONS, replica=name, amqp_url=AMQP_URL, redis_url=REDIS_URL,
            )  # fmt: skip
            inner = create_bus(bus_config(settings))
            await inner.start()
            store = RedisStateStore(url=REDIS_URL, namespace=namespace)
            bus = BalancedBus(
                inner, store=store, clock=clock, replica=name, config=ownership_config(settings)
            )
            service = FeaturesService(settings, registry=CollectorRegistry())
            running.append((service, bus, store))
            ctx = ServiceContext(settings=settings, bus=bus, clock=clock, store=store)
            await service.start(ctx)
        # measured once the replicas split the partitions as the rendezvous says
        wanted = assign_partitions(PARTITIONS, names)
        deadline = time.monotonic() + 60.0
        while any(set(b.balancer("features").owned) != set(wanted[b.replica])
                  for _, b, _ in running):  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError("the replicas did not split the partitions in 60 s")
            await asyncio.sleep(0.05)
        started = time.perf_counter()
        await publisher.publish_many(events)
        published = time.perf_counter()
        await _wait(collector, len(events))
        elapsed = time.perf_counter() - started
        applied = sum(s.consumer_metrics.counts()["applied"] for s, _, _ in running)
    finally:
        for service, bus, store in running:
            await bus.stop_consuming()  # as the runner stops: consumers, service, bus
            await service.stop()
            await bus.close()
            await store.close()
        await publisher.delete_topology(services=["features"])
        await publisher.close()
        await _clear_redis(namespace)
    return {
        "rate": len(events) / elapsed,
        "seconds": elapsed,
        "publish_rate": len(events) / (published - started),
        "updates": len(collector.seen),
        "applied": applied,
    }


async def one_hop_run(events: list[Event]) -> float:
    """Events/s publisher -> do-nothing consumer (its own connection), same broker."""
    namespace = f"bench_sd_hop_{uuid.uuid4().hex[:8]}"
    publisher = RabbitMQBus(
        url=AMQP_URL, namespace=namespace, partitions=PARTITIONS, source="feed/bench"
    )
    consumer = RabbitMQBus(
        url=AMQP_URL, namespace=namespace, partitions=PARTITIONS, source="onehop/bench"
    )
    counted = Counted(len(events))
    try:
        await publisher.start()
        await consumer.start()
        await consumer.subscribe(
            Subscription(service="onehop", patterns=TOKEN_EVENTS, handler=counted)
        )
        started = time.perf_counter()
        await publisher.publish_many(events)
        await _wait(counted, len(events))
        return len(events) / (time.perf_counter() - started)
    finally:
        await consumer.delete_topology()
        await consumer.close()
        await publisher.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="token events per run")
    parser.add_argument("--replicas", type=int, choices=(1, 2), default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    events = token_events(args.events, args.seed)
    mints = len({e.key for e in events})
    print(f"== features over RabbitMQ + Redis: {len(events):,} token events, {mints:,} tokens, "
          f"{len(updates_expected(events)):,} mints to announce, {PARTITIONS} partitions, "
          f"{args.replicas} replica(s) in this process")  # fmt: skip
    services, hops = [], []
    for n in range(args.repeat):
        result = await service_run(events, args.replicas)
        hop = await one_hop_run(events)
        services.append(result["rate"])
        hops.append(hop)
        print(f"run {n + 1}: service {result['rate']:,.0f} events/s ({result['seconds']:.2f} s; "
              f"published at {result['publish_rate']:,.0f}/s; {result['updates']:,} updates "
              f"collected, {result['applied']:,.0f} events applied); one hop {hop:,.0f} "
              f"events/s; ratio {result['rate'] / hop:.2f}")  # fmt: skip
    ratios = [s / h for s, h in zip(services, hops, strict=True)]
    rate = statistics.median(services)
    print(f"features service ({args.replicas} replica(s)): {rate:,.0f} events/s "
          f"(median of {args.repeat}; {min(services):,.0f}-{max(services):,.0f})")  # fmt: skip
    print(f"one hop, same broker: {statistics.median(hops):,.0f} events/s "
          f"({min(hops):,.0f}-{max(hops):,.0f})")  # fmt: skip
    print(f"service / one hop: {statistics.median(ratios):.2f} "
          f"({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
