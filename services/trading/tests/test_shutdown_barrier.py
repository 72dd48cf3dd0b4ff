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


async def stored_by_the_exit(pool, request_id: str, reason: str) -> None:
    """A shutdown request as the exit service stores it when its graceful exit applies it
    (its run and the request's row; services/exit, records.py)."""
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO exit_runs (run_id, reason, started_at, deadline) VALUES ($1, $2, 0, 60)",
            f"run-{request_id}",
            reason,
        )
        await conn.execute(
            "INSERT INTO exit_run_requests (request_id, run_id) VALUES ($1, $2)",
            request_id,
            f"run-{request_id}",
        )


async def test_a_shutdown_requested_while_no_replica_traded_halts_the_next_holder(
    clock, market, pg_pool
):
    """``pumpflow stop`` while no trading replica runs: the exit service applies it (its
    graceful exit sells what it can), and trading's copy, a keyless event on a replica's
    own queue, goes to no one. The replica that takes trading next starts halted on it,
    announces its barrier and keeps the request, so its copy coming again halts nothing
    again; an operator's resume since then stands at the next take-over."""
    first = trading(PostgresLedger(pg_pool))
    async with running(clock, first) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        await clock.advance(1.0)
        [opened] = watch.payloads("position.opened")
        assert first.risk.operator_state is TradingState.ACTIVE

    await stored_by_the_exit(pg_pool, "stop-down", "operator, trading down")

    second = trading(PostgresLedger(pg_pool))
    async with watched_from_the_start(clock, second) as (bus, watch):
        assert second.risk.operator_state is TradingState.HALTED
        assert "operator, trading down" in second.risk.operator_reason
        [barrier] = watch.payloads("trading.barrier")
        assert barrier.request_id == "stop-down"
        assert [p.position_id for p in barrier.positions] == [opened.position_id]
        assert await second.ledger.shutdown_applied("stop-down")
        copy = SystemShutdown(reason="operator, trading down", request_id="stop-down")
        await publish(bus, make_event(copy, source="cli/t", time=clock.now(), event_id="stop-down"))
        assert watch.count("trading.barrier") == 1
        await second.resume("operator resumes")

    third = trading(PostgresLedger(pg_pool))
    async with watched_from_the_start(clock, third) as (bus, watch):
        assert third.risk.operator_state is TradingState.ACTIVE
        assert watch.count("trading.barrier") == 0


async def test_the_replica_trading_halts_on_a_shutdown_it_never_had(clock, market, pg_pool):
    """``pumpflow stop`` while the replica trading reconnects to RabbitMQ: its queue is
    recreated after the shutdown went out, so its copy goes to no one, yet the exit
    service applied it. The replica finds the request within
    ``trading_shutdown_check_s``, halts on it and announces its barrier once; an
    operator's resume after that stands."""
    service = trading(PostgresLedger(pg_pool))
    period = service.settings.trading_shutdown_check_s
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        await clock.advance(1.0)
        [opened] = watch.payloads("position.opened")

        await stored_by_the_exit(pg_pool, "stop-lost", "operator, queue recreated")
        await clock.advance(period)
        assert service.risk.operator_state is TradingState.HALTED
        assert "operator, queue recreated" in service.risk.operator_reason
        [barrier] = watch.payloads("trading.barrier")
        assert barrier.request_id == "stop-lost"
        assert [p.position_id for p in barrier.positions] == [opened.position_id]
        assert await service.ledger.shutdown_applied("stop-lost")
        await clock.advance(3 * period)
        assert watch.count("trading.barrier") == 1

        await service.resume("operator resumes")
        await clock.advance(3 * period)
        assert service.risk.operator_state is TradingState.ACTIVE
        assert watch.count("trading.barrier") == 1


async def test_a_shutdown_the_replica_trading_had_is_not_applied_again(clock, market, pg_pool):
    """The usual stop: trading's copy arrives as the exit service stores the request.
    The periodic look finds it applied already: no second halt, no second barrier."""
    service = trading(PostgresLedger(pg_pool))
    period = service.settings.trading_shutdown_check_s
    async with running(clock, service) as (bus, watch):
        await stored_by_the_exit(pg_pool, "stop-had", "operator")
        copy = SystemShutdown(reason="operator", request_id="stop-had")
        await publish(bus, make_event(copy, source="cli/t", time=clock.now(), event_id="stop-had"))
        assert watch.count("trading.barrier") == 1
        await service.resume("operator resumes")
        await clock.advance(3 * period)
        assert service.risk.operator_state is TradingState.ACTIVE
        assert watch.count("trading.barrier") == 1
