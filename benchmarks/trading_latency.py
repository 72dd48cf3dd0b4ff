"""Receipt-to-order latency with every service a process over RabbitMQ, Redis and Postgres.

The simulator serves PumpPortal's protocol (``pumpflow sim serve``) at wall speed with
``--launches`` token launches a market minute (30 is the market's rate and gives about
30 trades/s; the trade rate grows with it); ``pumpflow serve`` runs feed (recording to
Postgres), features, activity, model, trading (paper) and exit, each its own process,
as a deployment does (``pumpflow migrate`` first). This process collects
``model.prediction`` and ``order.requested`` on its own queues, noting when each
arrived.

Each hop names its cause (``causation_id``): an order's is the prediction it was
decided on, a prediction carries the mint and the ``source_seq`` of the token event
its features include, and the feed stamps each token event with the time its frame
arrived (its ``time``, stored with the event in ``token_events``). So:

- receipt to order sent: an entry order's arrival here less its token event's arrival
  at the feed (trading publishes ``order.requested`` after the order is stored and
  handed to the executor; one bus hop to here is included, ~1 ms);
- receipt to decision: the order's own ``time`` (trading's clock when it decided);
- receipt to prediction: every prediction's arrival here, the same way (many more
  samples: the model's path, what each decision waits for).

Only orders and predictions whose token event arrived inside the measured window (after
``--warmup`` seconds, for ``--seconds``) count; the trade rate is the feed's recorded
trades over that window. Trading runs with ``pumpflow run``'s entry settings (score 0.5,
creator sales allowed) and limits that do not bind (capital 1,000 SOL, 100,000
positions) so that entries keep coming; the stale-data breaker keeps its default.
All processes run on one machine with the servers (2 cores here): the figures include
their contention.

Run: .venv/bin/python benchmarks/trading_latency.py [--launches 500] [--warmup 60]
     [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import redis.asyncio as redis

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.rabbitmq import RabbitMQBus
from pumpflow.common.events import Event, ModelPrediction, OrderRequested
from pumpflow.common.testing import (
    AMQP_URL,
    POSTGRES_DSN,
    REDIS_URL,
    ProcessStack,
    drop_schema,
    free_port,
    http_get,
    stack_env,
)

SERVICES = ("feed", "features", "activity", "model", "trading", "exit")
PARTITIONS = 16
TARGET_P99_MS = 25.0
#: trading: pumpflow run's entries, limits that never bind
TRADING = {
    "trading_min_score": 0.5,
    "trading_reject_creator_sold": False,
    "trading_capital_sol": 1000.0,
    "trading_max_concurrent_positions": 100_000,
}


class Arrivals:
    """A bus handler noting each event's wall-clock arrival."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, Event]] = []

    async def __call__(self, event: Event) -> None:
        self.seen.append((time.time(), event))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def describe(name: str, latencies_s: list[float]) -> str:
    if not latencies_s:
        return f"{name}: no samples"
    ms = [v * 1000.0 for v in latencies_s]
    return (
        f"{name}: {len(ms):,} samples, p50 {statistics.median(ms):.1f} ms, "
        f"p90 {percentile(ms, 0.9):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms, "
        f"max {max(ms):.1f} ms"
    )


async def wait_ready(procs: ProcessStack, ports: dict[str, int], within: float = 90.0) -> None:
    deadline = time.monotonic() + within
    while True:
        statuses = {
            s: (await asyncio.to_thread(http_get, f"http://127.0.0.1:{p}/readyz"))[0]
            for s, p in ports.items()
        }
        if all(code == 200 for code in statuses.values()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"services not ready: {statuses}\n{procs.logs()}")
        await asyncio.sleep(0.5)


async def run(args: argparse.Namespace) -> None:
    namespace = f"bench_trading_{uuid.uuid4().hex[:8]}"
    logdir = Path(tempfile.mkdtemp(prefix="pumpflow-latency-"))
    env = stack_env(
        namespace=namespace,
        amqp_url=AMQP_URL,
        redis_url=REDIS_URL,
        partitions=PARTITIONS,
        **TRADING,
    )
    procs = ProcessStack(env, logdir)
    sim_port = free_port()
    ports = {s: free_port() for s in SERVICES}
    procs.configure(PUMPPORTAL_WS_URL=f"ws://127.0.0.1:{sim_port}/api/data")
    bus = RabbitMQBus(url=AMQP_URL, namespace=namespace, partitions=PARTITIONS, source="bench")
    arrivals = Arrivals()
    db = None
    try:
        migrate = procs.run("migrate")
        if migrate.returncode != 0:
            raise RuntimeError(migrate.stderr)
        db = await asyncpg.create_pool(
            POSTGRES_DSN, min_size=1, max_size=2, server_settings={"search_path": namespace}
        )
        await bus.start()
        await bus.subscribe(
            Subscription(
                service="bench-latency",
                patterns=("model.prediction", "order.requested"),
                handler=arrivals,
            )
        )
        procs.pumpflow(
            "simulator", "sim", "serve", "--port", str(sim_port), "--speed", "1",
            "--seed", str(args.seed), "--rate", str(args.launches),
        )  # fmt: skip
        for service in SERVICES:
            procs.serve(service, http_port=ports[service])
        await wait_ready(procs, ports)
        started = time.time()
        print(f"services ready; simulator at {args.launches:g} launches/min; logs in {logdir}")
        loads = []
        window = (started + args.warmup, started + args.warmup + args.seconds)
        while time.time() < window[1] + args.settle:
            await asyncio.sleep(5.0)
            loads.append(os.getloadavg()[0])
            print(f"  {time.time() - started:5.0f} s: {len(arrivals.seen):,} collected, "
                  f"load average {loads[-1]:.1f}", flush=True)  # fmt: skip
        rows = await db.fetch(
            "SELECT mint, seq, event_time, tx_type FROM token_events "
            "WHERE event_time >= $1 AND event_time < $2",
            *window,
        )
        arrived = {(r["mint"], r["seq"]): r["event_time"] for r in rows}
        trades = sum(r["tx_type"] in ("buy", "sell") for r in rows)
        predictions: dict[str, tuple[float, float]] = {}  # event id -> (arrival, token time)
        to_prediction, to_sent, to_decided = [], [], []
        for at, event in arrivals.seen:
            data = event.data
            if isinstance(data, ModelPrediction):
                token_time = arrived.get((data.mint, data.source_seq))
                if token_time is not None:
                    predictions[event.id] = (at, token_time)
                    to_prediction.append(at - token_time)
        buys = 0
        for at, event in arrivals.seen:
            data = event.data
            if isinstance(data, OrderRequested) and data.side == "buy":
                cause = predictions.get(event.causation_id or "")
                if cause is not None:
                    buys += 1
                    to_sent.append(at - cause[1])
                    to_decided.append(event.time - cause[1])
        print(f"== receipt to order over RabbitMQ, every service a process: "
              f"{args.launches:g} launches/min, {trades / args.seconds:,.0f} trade events/s "
              f"({len(rows) / args.seconds:,.0f} token events/s) over {args.seconds:g} s "
              f"after {args.warmup:g} s; load average "
              f"{min(loads):.1f}-{max(loads):.1f}")  # fmt: skip
        print(describe("receipt to order sent (entries)", to_sent))
        print(describe("receipt to decision (the order's time)", to_decided))
        print(describe("receipt to prediction", to_prediction))
        met = to_sent and percentile([v * 1000 for v in to_sent], 0.99) <= TARGET_P99_MS
        print(f"target p99 <= {TARGET_P99_MS:g} ms: {'met' if met else 'not met'}")
        _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{ports['trading']}/state")
        print(f"trading state at the end: {body[:400]}")
    finally:
        await asyncio.to_thread(procs.kill)
        await bus.close()
        await procs.aclose()
        cleanup = RabbitMQBus(url=AMQP_URL, namespace=namespace, partitions=PARTITIONS,
                              source="bench/cleanup")  # fmt: skip
        try:
            await cleanup.delete_topology(services=["bench-latency"])
        finally:
            await cleanup.close()
        if db is not None:
            await db.close()
        await drop_schema(POSTGRES_DSN, namespace)
        client = redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=float, default=500.0, help="launches a minute")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before measuring")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds measured")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds after the window for late events"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
