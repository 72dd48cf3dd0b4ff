"""Trading as a process over RabbitMQ and Postgres: kill -9 with an open position and an
order in flight, then a restart: the position is back, the order reconciled and filled
once, and a redelivered prediction sends nothing. The kill switch over HTTP (with the
API token) stops entries from the next event.

The test publishes what the upstream services would (token events, features,
lifecycle, predictions), stamped by its own clock, so it decides when an order falls
due: the paper latency is long, and a trade stamped past it fills the order.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from pumpflow.common.testing import (
    EventCollector,
    ProcessStack,
    eventually,
    free_port,
    http_json,
)
from pumpflow.common.testing.faults import metric, scrape
from pumpflow.trading.ledger import PostgresLedger

from .upstream import Upstream, post

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

LATENCY_S = 600.0
TOKEN = "test-token"


@pytest.fixture
async def trading(pg_pool, redis_client, process_stack: ProcessStack, rabbitmq_harness):
    port = free_port()
    process_stack.configure(
        http_port=port,
        api_token=TOKEN,
        trading_paper_latency_s=LATENCY_S,
        trading_lease_ttl_s=3,
        # what waits in the queues while the process is down must not trip the stale breaker
        trading_max_feed_lag_s=120,
        consumer_groups="trading",
    )
    bus = await rabbitmq_harness.bus(partitions=4, source="test/upstream")
    watch = await EventCollector("watch").attach(bus, "order.*", "position.*", "trading.*")
    return process_stack, port, Upstream(bus), watch


def no_orders(port: int) -> float:
    """Predictions the process decided on without an order, by its metrics."""
    return metric(scrape(port), "pumpflow_trading_predictions_total", outcome="no_order")


async def wait_active(stack: ProcessStack, port: int) -> None:
    async def active() -> bool:
        body = await asyncio.to_thread(http_json, f"http://127.0.0.1:{port}/state")
        return bool(body) and body.get("role") == "active"

    await eventually(active, 60, what="trading active", details=stack.logs, interval=0.2)


async def test_kill_9_with_a_position_and_an_order_in_flight_then_restart(trading, pg_pool):
    stack, port, upstream, watch = trading
    ledger = PostgresLedger(pg_pool)
    stack.serve("trading")
    await wait_active(stack, port)

    held = await upstream.ready()
    await upstream.publish(upstream.prediction(held))
    await watch.wait_for(1, "order.requested", where=lambda e: e.data.mint == held)
    await upstream.trade_after(held, LATENCY_S + 60.0)
    await watch.wait_for(1, "position.opened", where=lambda e: e.data.mint == held)

    flying = await upstream.ready()
    in_flight = upstream.prediction(flying)
    await upstream.publish(in_flight)
    [request] = [
        e.data
        for e in await watch.wait_for(1, "order.requested", where=lambda e: e.data.mint == flying)
    ][:1]
    [row] = await ledger.orders(limit=1, mint=flying)
    assert row["state"] == "sent"

    stack.procs["trading"].send_signal(signal.SIGKILL)
    await asyncio.to_thread(stack.procs["trading"].wait, 30)
    # the prediction again, as a redelivery would bring it, before and after the restart
    await upstream.publish(in_flight)
    stack.serve("trading")
    await wait_active(stack, port)

    positions = http_json(f"http://127.0.0.1:{port}/positions")
    assert [p["mint"] for p in positions["positions"]] == [held], positions
    limits = http_json(f"http://127.0.0.1:{port}/limits")
    assert limits["orders_in_flight"] == 1  # reconciled: back in the paper executor's hands

    await upstream.trade_after(flying, LATENCY_S + 60.0)
    [filled] = [
        e.data
        for e in await watch.wait_for(1, "order.filled", where=lambda e: e.data.mint == flying)
    ]
    assert filled.order_id == request.order_id
    orders = await ledger.orders(limit=10)
    assert sorted((o["mint"], o["state"]) for o in orders) == sorted(
        [(held, "filled"), (flying, "filled")]
    )
    # one order per prediction on the bus, whatever came again; the restarted replica
    # publishes again what its predecessor stored and may not have published: a copy of
    # one that went out has its id and seq (a keyed consumer drops it)
    requests = watch.of("order.requested")
    assert sorted({e.id: e.data.mint for e in requests}.values()) == sorted([held, flying])
    assert len({(e.id, e.seq) for e in requests}) == len({e.id for e in requests})

    assert http_json(f"http://127.0.0.1:{port}/state")["state"] == "active"
    # the kill switch: refused without the token; with it, the next prediction is refused
    status, _ = post(f"http://127.0.0.1:{port}/halt", None, {"reason": "test"})
    assert status == 401
    status, body = post(f"http://127.0.0.1:{port}/halt", TOKEN, {"reason": "operator halt"})
    assert status == 200 and body["state"] == "halted", body
    await watch.wait_for(1, "trading.state", where=lambda e: e.data.state == "halted")
    # every prediction before was on the filled token's partition: decided by now
    before = no_orders(port)
    third = await upstream.ready()
    await upstream.publish(upstream.prediction(third))
    await eventually(
        lambda: asyncio.to_thread(lambda: no_orders(port) > before),
        30, what="the prediction after the halt decided", details=stack.logs,
    )  # fmt: skip
    assert not [e for e in watch.of("order.requested") if e.data.mint == third]
    assert await ledger.control() == ("halted", "operator halt")
    # the CLI's kill switch, with the token from the environment
    url = f"http://127.0.0.1:{port}"
    done = await asyncio.to_thread(stack.run, "trading", "resume", "--url", url, "--reason", "cli")
    assert done.returncode == 0 and "trading is active (cli)" in done.stdout, done.stderr
    assert await ledger.control() == ("active", "cli")

    assert await stack.stop("trading") == 0, stack.logs()
