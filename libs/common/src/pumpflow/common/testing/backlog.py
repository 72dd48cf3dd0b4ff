"""An exit order against a backlog of trades: what the critical lane is for.

:func:`exit_order_through_backlog` queues ``backlog`` ``token.trade`` events for
trading's consumer group (declared first, so the broker keeps them), starts a
consumer of that group, and once it is working through the trades publishes an
``exit.order``: the order must reach the consumer on the critical lane, ahead of
the trades still queued. The tests assert it; ``benchmarks/exit_latency.py`` times it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from pumpflow.common.bus.abc import EventBus, Subscription
from pumpflow.common.events import Event, ExitOrder, TokenTrade, make_event
from pumpflow.common.priority import Priority
from pumpflow.common.testing.factories import partition_keys
from pumpflow.common.trading import SERVICE_CONSUMES

#: the consumer group the exit orders are for
TRADING = "trading"


def trade_backlog(count: int, mints: list[str]) -> list[Event]:
    """``count`` buys spread over ``mints``, each mint's seq counting from 1."""
    now = time.time()
    seqs = dict.fromkeys(mints, 0)
    events = []
    for n in range(count):
        mint = mints[n % len(mints)]
        seqs[mint] += 1
        payload = TokenTrade(
            signature=f"{n:088d}",
            mint=mint,
            traderPublicKey="7GFaFiXjYtY4d7W2V4C6zjPQ1cgpiHjaCYNeT9mEGdq1",
            txType="buy",
            tokenAmount=35_000_000.0,
            newTokenBalance=35_000_000.0,
            bondingCurveKey="Fh1tCmWb1GbPBZ5GHZ5fRnLBKZ8mDTuvgiXsq6UNzpUb",
            vTokensInBondingCurve=1_037_000_000.0,
            vSolInBondingCurve=31.04,
            marketCapSol=29.93,
            solAmount=1.04,
            pool="pump",
        )
        events.append(make_event(payload, source="feed/backlog", time=now, seq=seqs[mint]))
    return events


@dataclass(frozen=True, slots=True, kw_only=True)
class BacklogRun:
    """How an exit order fared against a queued backlog of trades."""

    backlog: int
    #: wall seconds to publish the backlog (confirmed)
    enqueue_s: float
    #: wall seconds from the exit order's publish to its handler
    latency_s: float
    #: trades the consumer had handled when the exit order reached it
    trades_before: int
    #: of those, trades handled after the order was published
    trades_in_between: int
    #: the order's deadline (wall time) and when it arrived
    deadline: float
    arrived_at: float
    #: with ``drain``: wall seconds from the order's publish to the last trade handled
    #: (what an order queued behind the trades would have waited)
    drain_s: float | None = None


async def exit_order_through_backlog(
    bus: EventBus,
    backlog: int,
    *,
    partitions: int,
    deadline_s: float = 60.0,
    trade_work_s: float = 0.0,
    drain: bool = False,
    within: float = 120.0,
) -> BacklogRun:
    """Queue ``backlog`` trades for trading's group, consume them, and while the consumer
    works through them publish an exit order; how it went. ``deadline_s`` is the order's
    deadline from its publication (the graceful exit's default is 60 s).

    The consumer awaits ``trade_work_s`` per trade, as trading awaits its store: even
    at 0 it yields between trades, so a lane's work never runs as one block. With
    ``drain`` the backlog is consumed to its end and timed too.
    """
    mints = partition_keys(partitions, prefix="mint")
    await bus.declare(TRADING, SERVICE_CONSUMES)
    started = time.perf_counter()
    await bus.publish_many(trade_backlog(backlog, mints))
    enqueue_s = time.perf_counter() - started

    loop = asyncio.get_running_loop()
    working = asyncio.Event()
    drained = asyncio.Event()
    arrived: asyncio.Future[tuple[float, int]] = loop.create_future()
    handled = 0

    async def handler(event: Event) -> None:
        nonlocal handled
        if isinstance(event.data, ExitOrder):
            if not arrived.done():
                arrived.set_result((time.time(), handled))
            return
        if isinstance(event.data, TokenTrade):
            handled += 1
            working.set()
            if handled >= backlog:
                drained.set()
            await asyncio.sleep(trade_work_s)

    subscription = Subscription(service=TRADING, patterns=SERVICE_CONSUMES, handler=handler)
    # deliveries may begin before subscribe returns (RabbitMQ's ownership settles on);
    # the order goes once the consumer consumes every lane and is into the trades
    subscribing = asyncio.create_task(bus.subscribe(subscription))
    try:
        async with asyncio.timeout(within):
            await asyncio.shield(subscribing)
        async with asyncio.timeout(within):
            await working.wait()
        sent_at = time.time()
        handled_at_send = handled
        order = ExitOrder(
            order_id="pos-backlog:exit:1",
            mint=mints[0],
            position_id="pos-backlog",
            token_amount=1_000_000.0,
            slippage_pct=50.0,
            reason="deadline",
            priority=int(Priority.URGENT),
            deadline=sent_at + deadline_s,
        )
        await bus.publish(make_event(order, source="exit/backlog", time=sent_at))
        async with asyncio.timeout(within):
            arrived_at, trades_before = await arrived
        drain_s = None
        if drain:
            async with asyncio.timeout(within):
                await drained.wait()
            drain_s = time.time() - sent_at
    finally:
        await subscribing
        await bus.unsubscribe(subscription)
    return BacklogRun(
        backlog=backlog,
        enqueue_s=enqueue_s,
        latency_s=arrived_at - sent_at,
        trades_before=trades_before,
        trades_in_between=trades_before - handled_at_send,
        deadline=order.deadline,
        arrived_at=arrived_at,
        drain_s=drain_s,
    )
