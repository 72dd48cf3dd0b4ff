"""Trading decides the same orders embedded (``pumpflow run``) and as its own process.

A simulated minute (seed 6 at 120 launches a minute: 123 tokens, about 1,800 trades)
goes through features, activity, model and trading embedded on the synchronous
in-memory bus, on a replay clock. Everything trading consumed there, in the order it
consumed it, is then published over RabbitMQ to ``pumpflow serve trading`` (its lease
in Redis and Postgres, its ledger in Postgres), and the two take the same entry
orders: the same ids (derived from the prediction events' ids), tokens, sizes, and the
same order of them per token.

What is compared, and why only that: over RabbitMQ a token's events keep their order
(one partition), but tokens interleave in no fixed order, so a decision that depends
on other tokens (capital, concurrent positions, total exposure, the daily loss) could
differ. The limits are set so they never bind (capital 1,000,000 SOL, a million
positions): an entry's size is then the curve depth's cap, a function of the token's
own curve, and a decision depends on its token's events alone. The slippage limit is
100% so no fill is rejected: the paper fills happen at different times (the process
sends orders on the wall clock), and rejections would count toward the execution
breaker. The stream's times lie an hour ahead of the wall clock so the process's
stale-data breaker (event age against its clock) stays quiet; under 10,000 events are
published, so the event-rate breaker (1,000 a second over 10 s) cannot trip.

Not compared: the fills (their timing differs by construction), the exit service's
sales (its rules run on the clock), and the upstream services across processes (over
RabbitMQ features announces a token's batched events once and the services' outputs
interleave in trading's queues by timing, so trading's inputs would differ from the
embedded run's; here trading gets the embedded run's inputs in both). The whole chain
as processes, fills and exits included, is compared in lock-step by test_parity.py.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest

from pumpflow.activity.service import ActivityService
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import Event
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.testing import EventCollector, ProcessStack, eventually, free_port, http_json
from pumpflow.common.testing.faults import metric, scrape
from pumpflow.common.trading import SERVICE_CONSUMES
from pumpflow.features.service import FeaturesService
from pumpflow.model.service import ModelService
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig
from pumpflow.trading.service import TradingService

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

#: trading's settings in both runs: entries that happen, limits that never bind
PARITY = {
    "trading_min_score": 0.4,
    "trading_reject_creator_sold": False,
    "trading_capital_sol": 1_000_000.0,
    "trading_max_concurrent_positions": 1_000_000,
    # several entries a token, so the order of a token's entries is compared too
    "trading_add_to_positions": True,
    "trading_slippage_pct": 100.0,
}
#: what trading consumes that the embedded run produces (no exit service, no shutdown)
INPUTS = tuple(t for t in SERVICE_CONSUMES if t not in ("exit.order", "system.shutdown"))


def entries(orders: list[Event]) -> dict[str, list[tuple[str, str, float | None]]]:
    """mint -> its entry orders in order: (order id, side, SOL)."""
    by_mint: dict[str, list[tuple[str, str, float | None]]] = defaultdict(list)
    for event in orders:
        order = event.data
        by_mint[order.mint].append((order.order_id, order.side, order.sol_amount))
    return dict(by_mint)


async def embedded_run(start: float) -> tuple[list[Event], list[Event]]:
    """The stream through the embedded services: trading's inputs, in order, and its orders."""
    market = Market(MarketConfig(seed=6, launches_per_minute=120))
    stream = list(market_events(market, 60.0, start_epoch=start, source="feed/sim"))
    clock = ReplayClock(start)
    trading = TradingService(
        TradingService.settings_class.load(service="trading", transport="memory", **PARITY)
    )
    async with run_embedded(
        [FeaturesService, ActivityService, ModelService, trading], clock=clock, synchronous=True
    ) as system:
        # subscribed after trading: handed each event right after trading handled it
        inputs = await EventCollector("inputs").attach(system.bus, *INPUTS)
        orders = await EventCollector("orders").attach(system.bus, "order.requested")
        for event in stream:
            await clock.advance_to(event.time)
            await system.bus.publish(event)
    return inputs.events, orders.events


@pytest.fixture
async def trading_process(pg_pool, redis_client, process_stack: ProcessStack, rabbitmq_harness):
    port = free_port()
    process_stack.configure(http_port=port, consumer_groups="trading", **PARITY)
    bus = await rabbitmq_harness.bus(partitions=4, source="test/upstream")
    orders = await EventCollector("orders").attach(bus, "order.requested")
    process_stack.serve("trading")

    async def active() -> bool:
        body = await asyncio.to_thread(http_json, f"http://127.0.0.1:{port}/state")
        return bool(body) and body.get("role") == "active"

    await eventually(active, 60, what="trading active", details=process_stack.logs, interval=0.2)
    return process_stack, port, bus, orders


async def test_embedded_and_process_take_the_same_entry_orders(trading_process):
    stack, port, bus, process_orders = trading_process
    inputs, embedded_orders = await embedded_run(time.time() + 3600.0)
    expected = entries(embedded_orders)
    # the stream gives entries in several tokens, some more than one
    assert len(expected) >= 5 and max(len(o) for o in expected.values()) >= 2, expected
    assert len(inputs) < 10_000  # under the rate breaker's limit in any 10 s
    predictions = sum(e.type == "model.prediction" for e in inputs)

    await bus.publish_many(inputs)

    async def all_decided() -> dict[str, float] | None:
        values = await asyncio.to_thread(scrape, port)
        decided = metric(values, "pumpflow_trading_predictions_total")
        return values if decided >= predictions else None

    values = await eventually(
        all_decided,
        120,
        what=f"the process decided on all {predictions} predictions",
        details=stack.logs,
        interval=0.5,
    )
    # each prediction that ordered is counted before its order is published: wait for them
    ordered = metric(values, "pumpflow_trading_predictions_total", outcome="order")
    await eventually(
        lambda: len(process_orders.events) >= ordered,
        30,
        what=f"the {ordered:g} orders the process counted",
        details=stack.logs,
    )
    assert entries(process_orders.events) == expected
    state = http_json(f"http://127.0.0.1:{port}/state")
    assert state["state"] == "active", state  # no breaker tripped on the way
