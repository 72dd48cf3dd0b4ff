"""Event bus throughput and one-hop latency, for both transports.

Run: .venv/bin/python benchmarks/bus_throughput.py [--events N] [--rate R] [--seconds S]

Prints, per transport:
- throughput: events/s through one hop (publish -> the consumer's handler returned;
  for RabbitMQ with publisher confirms, persistent messages and acks), publisher and
  consumer in this one process;
- latency: p50/p99 of publish start -> handler, publishing at a fixed rate; for
  RabbitMQ also this process's CPU per event over that run (publish and confirm,
  delivery, handler, ack) and the ack frames sent per delivery;
- in-memory synchronous mode: events/s with the handler run inside publish.

Targets (docs/benchmarks.md): RabbitMQ >= 4,000 events/s, in-memory synchronous
>= 500,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid

from pumpflow.common.bus import InMemoryBus, Sequencer, Subscription
from pumpflow.common.bus.abc import EventBus
from pumpflow.common.events import Event, TokenTrade, make_event
from pumpflow.common.testing.bus import BusHarness

AMQP_URL = os.environ.get("PUMPFLOW_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MINTS = [f"{uuid.uuid4().hex[:32]}pump" for _ in range(200)]


def make_events(count: int) -> list[Event]:
    """Realistic token.trade events over 200 mints with per-mint seq numbers."""
    sequencer = Sequencer()
    now = time.time()
    events = []
    for n in range(count):
        mint = MINTS[n % len(MINTS)]
        payload = TokenTrade(
            signature=f"{n:088d}",
            mint=mint,
            traderPublicKey="7GFaFiXjYtY4d7W2V4C6zjPQ1cgpiHjaCYNeT9mEGdq1",
            txType="buy",
            tokenAmount=35_000_000.123456,
            newTokenBalance=35_000_000.123456,
            bondingCurveKey="Fh1tCmWb1GbPBZ5GHZ5fRnLBKZ8mDTuvgiXsq6UNzpUb",
            vTokensInBondingCurve=1_037_000_000.5,
            vSolInBondingCurve=31.04,
            marketCapSol=29.93,
            solAmount=1.04,
            pool="pump",
        )
        events.append(make_event(payload, source="feed/bench", time=now, seq=sequencer.next(mint)))
    return events


async def throughput(bus: EventBus, count: int) -> float:
    """Publish ``count`` events (pipelined) and time until the handler saw the last one."""
    handled = 0
    done = asyncio.Event()

    async def handler(_: Event) -> None:
        nonlocal handled
        handled += 1
        if handled == count:
            done.set()

    service = f"bench_{uuid.uuid4().hex[:6]}"
    subscription = Subscription(service=service, patterns=("token.trade",), handler=handler)
    await bus.subscribe(subscription)
    events = make_events(count)
    started = time.perf_counter()
    await bus.publish_many(events)
    async with asyncio.timeout(max(60.0, count / 500)):
        await done.wait()
    rate = count / (time.perf_counter() - started)
    # the runs after this one measure their own consumer alone
    await bus.unsubscribe(subscription)
    return rate


async def latency(bus: EventBus, rate: float, seconds: float) -> tuple[float, float, int, float]:
    """Publish at ``rate`` events/s, one publish at a time.

    Return p50, p99 (ms), the count, and this process's CPU per event (us: publish and
    confirm, delivery, handler, ack).
    """
    sent_at: dict[str, float] = {}
    samples: list[float] = []

    async def handler(event: Event) -> None:
        samples.append(time.perf_counter() - sent_at[event.id])

    service = f"lat_{uuid.uuid4().hex[:6]}"
    await bus.subscribe(Subscription(service=service, patterns=("token.trade",), handler=handler))
    events = make_events(int(rate * seconds))
    started = time.perf_counter()
    cpu = time.process_time()
    for n, event in enumerate(events):
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent_at[event.id] = time.perf_counter()
        await bus.publish(event)
    deadline = time.perf_counter() + 10
    while len(samples) < len(events) and time.perf_counter() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    # the acks held back are part of the cost; the transport sends them within its linger
    while not BusHarness.no_ack_held_back(bus):  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    cpu = time.process_time() - cpu
    cuts = statistics.quantiles(samples, n=100)
    return cuts[49] * 1000, cuts[98] * 1000, len(samples), cpu / len(events) * 1e6


def counted_acks() -> list[int]:
    """Count the AMQP ack frames sent from now on (the returned list's one item)."""
    import aiormq.channel

    count = [0]
    send = aiormq.channel.Channel.basic_ack

    async def basic_ack(self, *args, **kwargs):
        count[0] += 1
        return await send(self, *args, **kwargs)

    aiormq.channel.Channel.basic_ack = basic_ack
    return count


def _consume_in_process(namespace: str, partitions: int, count: int, ready, finished) -> None:
    """Child process: consume ``count`` events, then report the wall time of the last."""

    async def run() -> None:
        from pumpflow.common.bus.rabbitmq import RabbitMQBus

        bus = RabbitMQBus(
            url=AMQP_URL, namespace=namespace, partitions=partitions, source="bench/consumer"
        )
        await bus.start()
        handled = 0
        done = asyncio.Event()

        async def handler(_: Event) -> None:
            nonlocal handled
            handled += 1
            if handled == count:
                finished.put(time.time())
                done.set()

        await bus.subscribe(
            Subscription(service="bench", patterns=("token.trade",), handler=handler)
        )
        ready.set()
        async with asyncio.timeout(max(60.0, count / 500)):
            await done.wait()
        await bus.delete_topology()
        await bus.close()

    asyncio.run(run())


async def two_process_throughput(partitions: int, count: int) -> float:
    """RabbitMQ one hop with the consumer in a second process, as services are deployed."""
    import multiprocessing

    from pumpflow.common.bus.rabbitmq import RabbitMQBus

    context = multiprocessing.get_context("spawn")
    ready, finished = context.Event(), context.Queue()
    namespace = f"bench{uuid.uuid4().hex[:10]}"
    child = context.Process(
        target=_consume_in_process, args=(namespace, partitions, count, ready, finished)
    )
    child.start()
    bus = RabbitMQBus(url=AMQP_URL, namespace=namespace, partitions=partitions, source="feed/b")
    await bus.start()
    try:
        await asyncio.to_thread(ready.wait, 60)
        events = make_events(count)
        started = time.time()
        await bus.publish_many(events)
        last = await asyncio.to_thread(finished.get, True, max(60.0, count / 500))
    finally:
        await bus.close()
        await asyncio.to_thread(child.join, 30)
    return count / (last - started)


async def sync_throughput(count: int) -> float:
    bus = InMemoryBus(partitions=16, synchronous=True, source="feed/bench")
    await bus.start()
    handled = 0

    async def handler(_: Event) -> None:
        nonlocal handled
        handled += 1

    await bus.subscribe(Subscription(service="bench", patterns=("token.trade",), handler=handler))
    events = make_events(count)
    publish = bus.publish
    started = time.perf_counter()
    for event in events:
        await publish(event)
    elapsed = time.perf_counter() - started
    assert handled == count, (handled, count)
    await bus.close()
    return count / elapsed


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per throughput run")
    parser.add_argument("--sync-events", type=int, default=500_000)
    parser.add_argument("--rate", type=float, default=500.0, help="latency run: events/s")
    parser.add_argument("--seconds", type=float, default=5.0, help="latency run: duration")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--skip-rabbitmq", action="store_true")
    args = parser.parse_args()
    print(
        f"cores: {os.cpu_count()}  python: {sys.version.split()[0]}  partitions: {args.partitions}"
    )

    rate = await sync_throughput(args.sync_events)
    print(f"memory (synchronous)  throughput: {rate:>10,.0f} events/s   (target >= 500,000)")

    bus = InMemoryBus(partitions=args.partitions, source="feed/bench")
    await bus.start()
    rate = await throughput(bus, args.events * 5)
    p50, p99, n, _ = await latency(bus, args.rate, args.seconds)
    await bus.close()
    print(f"memory (queued)       throughput: {rate:>10,.0f} events/s")
    print(
        f"memory (queued)       latency at {args.rate:.0f}/s: p50 {p50:.3f} ms  "
        f"p99 {p99:.3f} ms  (n={n})"
    )

    if not args.skip_rabbitmq:
        from pumpflow.common.bus.rabbitmq import RabbitMQBus

        bus = RabbitMQBus(
            url=AMQP_URL,
            namespace=f"bench{uuid.uuid4().hex[:10]}",
            partitions=args.partitions,
            source="feed/bench",
        )
        await bus.start()
        try:
            rate = await throughput(bus, args.events)
            acks = counted_acks()
            p50, p99, n, cpu = await latency(bus, args.rate, args.seconds)
        finally:
            await bus.delete_topology()
            await bus.close()
        print(
            f"rabbitmq              throughput: {rate:>10,.0f} events/s   (target >= 4,000; "
            "confirms, persistent, acks; one process)"
        )
        print(
            f"rabbitmq              latency at {args.rate:.0f}/s: p50 {p50:.3f} ms  "
            f"p99 {p99:.3f} ms  (n={n}); this process's CPU {cpu:.0f} us an event, "
            f"{acks[0] / n:.2f} ack frames a delivery"
        )
        rate = await two_process_throughput(args.partitions, args.events)
        print(
            f"rabbitmq              throughput: {rate:>10,.0f} events/s   (publisher and "
            "consumer in two processes)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
