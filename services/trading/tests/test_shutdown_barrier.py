"""Trading's shutdown barrier when the replica that halted on the shutdown dies before
publishing it: the exit service's graceful exit waits for that barrier, so the replica
trading next publishes it as it takes over (in Postgres, as across processes). And a
shutdown published while no replica trades: it waits in trading's queues for the one
taking over, which halts on it and publishes its barrier before it decides what queued
on its partitions behind it."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.events import FeedTradeStream, SystemShutdown, make_event
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.runtime.topology import declare_groups, groups_of
from pumpflow.common.state import MemoryStateStore
from pumpflow.common.testing import EventCollector, eventually
from pumpflow.common.trading import TradingState
from pumpflow.trading.ledger import MemoryLedger, PostgresLedger
from pumpflow.trading.service import TradingService
from pumpflow.trading.settings import TradingSettings

from .test_seqs import KilledBeforePublishing
from .test_service import entries_queued, publish, ready, running, trading, trading_replica
from .test_take_over_announcements import watched_from_the_start

PARTITIONS = 2


async def test_the_next_replica_publishes_the_barrier_its_predecessor_died_before(
    clock, market, pg_pool
):
    """The holder stores the halt of shutdown request ``stop-1`` and is killed before its
    barrier is out. The next holder publishes the barrier of ``stop-1`` as it takes over,
    listing the position it holds, and stays halted; the shutdown coming again there,
    and a take-over after that, publish no second one."""
    config = TradingSettings.load(service="trading", transport="memory")
    first = KilledBeforePublishing(
        config, registry=CollectorRegistry(), ledger=PostgresLedger(pg_pool)
    )
    request = SystemShutdown(reason="operator", request_id="stop-1")
    shutdown = make_event(request, source="cli/t", time=clock.now(), event_id="stop-1")
    async with running(clock, first) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        await clock.advance(1.0)
        [opened] = watch.payloads("position.opened")
        first.killed = True
        with pytest.raises(ConnectionError):
            await first.on_events([shutdown])
        assert await first.ledger.shutdown_applied("stop-1")
        await first.leader.stop()
        # what the process held dies with it
        first._unpublished = []
        assert watch.count("trading.barrier") == 0

    second = trading(PostgresLedger(pg_pool))
    async with watched_from_the_start(clock, second) as (bus, watch):
        [barrier] = watch.payloads("trading.barrier")
        assert (barrier.request_id, barrier.reason) == ("stop-1", "operator")
        assert [p.position_id for p in barrier.positions] == [opened.position_id]
        assert second.risk.operator_state is TradingState.HALTED
        await publish(bus, shutdown)  # its copy, come again
        assert watch.count("trading.barrier") == 1

    third = trading(PostgresLedger(pg_pool))
    async with watched_from_the_start(clock, third) as (_bus, watch):
        assert third.risk.operator_state is TradingState.HALTED
        assert watch.count("trading.barrier") == 0


async def opened_by_a_replica_gone(clock, market, pool):
    """A paper position opened by a trading replica that then stops; its id."""
    first = trading(PostgresLedger(pool))
    async with running(clock, first) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        await clock.advance(1.0)
        [opened] = watch.payloads("position.opened")
        assert first.risk.operator_state is TradingState.ACTIVE
    return opened.position_id


def stop(clock, request_id: str, reason: str):
    """``pumpflow stop``'s system.shutdown, as the exit service publishes it."""
    request = SystemShutdown(reason=reason, request_id=request_id)
    return make_event(request, source="exit/broker", time=clock.now(), event_id=request_id)


@pytest.mark.rabbitmq
async def test_a_stop_published_while_no_replica_traded_halts_the_next_one(
    clock, market, pg_pool, rabbitmq_harness, namespace
):
    """``pumpflow stop`` while no trading replica runs, over RabbitMQ: trading's copy
    waits in its group's queue (declared by every process as it connects, the exit's
    here). The replica that takes trading next halts on it once it has reloaded the
    book, publishes its barrier listing the position it holds and keeps the request, so
    its copy coming again halts nothing again; an operator's resume since then stands
    at the next take-over."""
    position_id = await opened_by_a_replica_gone(clock, market, pg_pool)
    rabbitmq_harness.delete_after(["trading"])
    exit_bus = await rabbitmq_harness.bus("exit/broker", partitions=PARTITIONS)
    await declare_groups(exit_bus, groups_of(["trading"]))
    await exit_bus.publish(stop(clock, "stop-down", "operator, trading down"))

    watch = await rabbitmq_harness.collector("trading.*", name="watch")
    second = TradingService(
        TradingSettings.load(service="trading", namespace=namespace, partitions=PARTITIONS),
        registry=CollectorRegistry(),
        ledger=PostgresLedger(pg_pool),
    )
    trading_bus = await rabbitmq_harness.bus("trading/broker", partitions=PARTITIONS)
    await second.start(
        ServiceContext(
            settings=second.settings, bus=trading_bus, clock=clock, store=MemoryStateStore(clock)
        )
    )
    try:
        await eventually(lambda: watch.payloads("trading.barrier"), within=15, what="the barrier")
        [barrier] = watch.payloads("trading.barrier")
        assert (barrier.request_id, barrier.reason) == ("stop-down", "operator, trading down")
        assert [p.position_id for p in barrier.positions] == [position_id]
        assert second.risk.operator_state is TradingState.HALTED
        assert "operator, trading down" in second.risk.operator_reason
        assert await second.ledger.shutdown_applied("stop-down")

        # its copy, then the feed's word behind it on the same queue: once the word is
        # heard, the copy was handled
        await exit_bus.publish(stop(clock, "stop-down", "operator, trading down"))
        word = FeedTradeStream(refused=False, reason="acknowledged", since=clock.now())
        await exit_bus.publish(make_event(word, source="feed/broker", time=clock.now()))
        await eventually(lambda: second.risk.feed_heard_at is not None, within=15)
        assert watch.count("trading.barrier") == 1
        await second.resume("operator resumes")
    finally:
        await second.stop()

    third = trading(PostgresLedger(pg_pool))
    async with watched_from_the_start(clock, third) as (_bus, watch):
        assert third.risk.operator_state is TradingState.ACTIVE
        assert watch.count("trading.barrier") == 0


#: tokens with a prediction to enter each, queued on trading's partitions while no replica
#: trades (under the concurrent positions limit)
BACKLOG = 3


@pytest.mark.rabbitmq
@pytest.mark.parametrize("stopped", [True, False], ids=["stop-queued", "no-stop"])
async def test_a_stop_queued_before_a_backlog_halts_the_next_holder_before_it_decides_any(
    clock, market, rabbitmq_harness, namespace, stopped, caplog
):
    """``pumpflow stop`` while no trading replica runs, then predictions that would enter,
    queued on trading's partitions behind it. The replica taking trading over halts on
    the stop and publishes its barrier before it decides any of them: it orders no
    entry. Without the stop, the same backlog enters."""
    rabbitmq_harness.delete_after(["trading"])
    others = await rabbitmq_harness.bus("exit/broker", partitions=PARTITIONS)
    await declare_groups(others, groups_of(["trading"]))
    if stopped:
        await others.publish(stop(clock, "stop-first", "operator, before the backlog"))
    await entries_queued(others, market, BACKLOG)

    watch = await rabbitmq_harness.collector("order.*", "trading.*", name="watch")
    caplog.set_level(logging.INFO, logger="pumpflow.trading")
    holder = await trading_replica(
        rabbitmq_harness, namespace, MemoryLedger(), clock, partitions=PARTITIONS
    )
    try:
        await eventually(
            lambda: sum(holder.skipped.values()) + watch.count("order.requested") == BACKLOG,
            within=15,
            what="every prediction decided",
        )
        # the operator reads in the log that what waited was applied, and in what state
        # the partitions' backlog is decided
        [caught_up] = [r.getMessage() for r in caplog.records if "caught up" in r.getMessage()]
        assert f"state {'halted' if stopped else 'active'}" in caught_up, caught_up
        if not stopped:
            assert watch.count("order.requested") == BACKLOG
            assert holder.risk.operator_state is TradingState.ACTIVE
            return
        assert watch.payloads("order.requested") == []
        assert holder.skipped == {
            "trading is halted: shutdown: operator, before the backlog": BACKLOG
        }
        await eventually(lambda: watch.payloads("trading.barrier"), within=15, what="the barrier")
        [barrier] = watch.payloads("trading.barrier")
        assert (barrier.request_id, barrier.entries) == ("stop-first", ())
        assert holder.risk.operator_state is TradingState.HALTED
        [said] = [r.getMessage() for r in caplog.records if "barrier of" in r.getMessage()]
        assert "stop-first (operator, before the backlog) goes out: 0 entries" in said, said
    finally:
        await holder.stop()


class SlowToSayIfResumed(MemoryLedger):
    """A ledger slow to answer whether a resume came after a stop: the stop's handling
    is under way, and not over, until the test lets it."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()

    async def resumed_after(self, at: float) -> bool:
        self.asked.set()
        await self.answer.wait()
        return await super().resumed_after(at)


async def test_the_partitions_wait_for_the_stop_being_applied_not_only_for_its_delivery(
    clock, market, rabbitmq_harness, namespace, monkeypatch
):
    """The stop that waited is delivered first, and its handling takes a while (the
    ledger slow): the replica taking over consumes none of its partitions meanwhile, as
    it waits to have caught up, so no prediction behind the stop is decided before the
    halt, however the lanes race."""
    # the ledger's slowness is the test's to end, not the halt's wait for the ledger
    monkeypatch.setenv("PUMPFLOW_TRADING_HALT_STORE_WAIT_S", "60")
    rabbitmq_harness.delete_after(["trading"])
    others = await rabbitmq_harness.bus("exit/broker", partitions=PARTITIONS)
    await declare_groups(others, groups_of(["trading"]))
    await others.publish(stop(clock, "stop-slow", "operator, the ledger slow"))
    await entries_queued(others, market, BACKLOG)
    watch = await rabbitmq_harness.collector("order.*", name="watch")
    ledger = SlowToSayIfResumed()
    starting = asyncio.create_task(
        trading_replica(rabbitmq_harness, namespace, ledger, clock, partitions=PARTITIONS)
    )
    holder = None
    try:
        await asyncio.wait_for(ledger.asked.wait(), 15)
        # decided at once, were the partitions consumed; else the catch-up's marks wait
        catching_up = lambda: sum(  # noqa: E731
            b.describe().get("catching_up", 0) for b in rabbitmq_harness.buses
        )
        await eventually(
            lambda: watch.count("order.requested") or catching_up(),
            what="an entry decided, or the catch-up waiting",
        )
        assert watch.count("order.requested") == 0
        ledger.answer.set()
        holder = await starting
        await eventually(
            lambda: sum(holder.skipped.values()) == BACKLOG, within=15, what="the backlog"
        )
        assert holder.skipped == {"trading is halted: shutdown: operator, the ledger slow": 3}
        assert watch.count("order.requested") == 0
    finally:
        ledger.answer.set()
        holder = holder or await starting
        await holder.stop()


async def test_a_resume_given_after_a_stop_waiting_for_trading_stands(clock, market, pg_pool):
    """A stop waits in trading's queue (in memory here), and the operator's resume is
    stored after it was requested (given to a replica that took trading over before the
    stop reached it): the replica that takes the stop does not halt on it, nor bar."""
    await opened_by_a_replica_gone(clock, market, pg_pool)
    bus = InMemoryBus(synchronous=True, source="embedded")
    await bus.start()
    try:
        await declare_groups(bus, groups_of(["trading"]))
        await bus.publish(stop(clock, "stop-late", "operator"))
        await clock.advance(1.0)
        ledger = PostgresLedger(pg_pool)
        await ledger.set_control(TradingState.ACTIVE, "operator resumes", now=clock.now())
        watch = await EventCollector("watch").attach(bus, "trading.*")
        second = trading(ledger)
        async with run_embedded([second], clock=clock, bus=bus):
            assert second.risk.operator_state is TradingState.ACTIVE
            assert watch.count("trading.barrier") == 0
            assert not await ledger.shutdown_applied("stop-late")
    finally:
        await bus.close()
