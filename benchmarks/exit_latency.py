"""Exit-order latency with a trade backlog: the critical lane against a queue of trades.

For each transport and backlog size, ``backlog`` ``token.trade`` events are queued
for trading's consumer group (4 partitions), a consumer of the group starts, and once
it has handled its first trade an ``exit.order`` is published
(:func:`pumpflow.common.testing.backlog.exit_order_through_backlog`). Figures per run:
the time to enqueue the backlog (publisher confirms on RabbitMQ), the exit order's
latency from publish to its handler, the trades handled before it arrived (all, and
those after its publish: deliveries already prefetched ahead of it), and the
drain time from the order's publish to the last trade handled: what an order queued
behind the trades would have waited. The consumer does no work per trade beyond
yielding to the loop (``--work-ms`` adds an awaited sleep, as trading's store would).

Run: .venv/bin/python benchmarks/exit_latency.py [--backlogs 10000 50000] [--runs 3]
[--work-ms 0] [--skip-rabbitmq]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import uuid

from pumpflow.common.bus import InMemoryBus
from pumpflow.common.bus.rabbitmq import RabbitMQBus
from pumpflow.common.testing.backlog import TRADING, exit_order_through_backlog

AMQP_URL = os.environ.get("PUMPFLOW_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PARTITIONS = 4


async def one_run(transport: str, backlog: int, work_s: float):
    if transport == "memory":
        bus = InMemoryBus(partitions=PARTITIONS, source="bench/exit")
    else:
        bus = RabbitMQBus(
            url=AMQP_URL,
            namespace=f"bench{uuid.uuid4().hex[:10]}",
            partitions=PARTITIONS,
            source="bench/exit",
        )
    await bus.start()
    try:
        return await exit_order_through_backlog(
            bus, backlog, partitions=PARTITIONS, trade_work_s=work_s, drain=True, within=600
        )
    finally:
        if transport == "rabbitmq":
            await bus.delete_topology(services=[TRADING])
        await bus.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work-ms", type=float, default=0.0)
    parser.add_argument("--skip-rabbitmq", action="store_true")
    args = parser.parse_args()
    transports = ["memory"] + ([] if args.skip_rabbitmq else ["rabbitmq"])
    print(
        f"{'transport':<9} {'backlog':>7} {'enqueue s':>9} {'latency ms':>16} "
        f"{'trades before':>15} {'in between':>10} {'drain s':>8}"
    )
    for transport in transports:
        for backlog in args.backlogs:
            runs = [
                await one_run(transport, backlog, args.work_ms / 1000) for _ in range(args.runs)
            ]
            latencies = sorted(r.latency_s * 1000 for r in runs)
            print(
                f"{transport:<9} {backlog:>7} "
                f"{statistics.median(r.enqueue_s for r in runs):>9.2f} "
                f"{latencies[0]:>7.2f}-{latencies[-1]:<8.2f} "
                f"{max(r.trades_before for r in runs):>15,} "
                f"{max(r.trades_in_between for r in runs):>10,} "
                f"{statistics.median(r.drain_s for r in runs):>8.2f}",
                flush=True,
            )
            assert all(r.trades_before < r.backlog for r in runs)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
