"""Trading's shutdown barrier when the replica that halted on the shutdown dies before
publishing it: the exit service's graceful exit waits for that barrier, so the replica
trading next publishes it as it takes over (in Postgres, as across processes)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.events import SystemShutdown, make_event
from pumpflow.common.trading import TradingState
from pumpflow.trading.ledger import PostgresLedger
from pumpflow.trading.settings import TradingSettings

from .test_seqs import KilledBeforePublishing
from .test_service import publish, ready, running, trading
from .test_take_over_announcements import watched_from_the_start


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
    async with watched_from_the_start(clock, third) as (bus, watch):
        assert third.risk.operator_state is TradingState.HALTED
        assert watch.count("trading.barrier") == 0
