"""The trading replica's terms as leader, on the real lease and Postgres: one timer loop
a term, whatever a tick was doing when the lease went and came back."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.lease import LEASE_PREFIX
from pumpflow.common.testing import eventually
from pumpflow.trading.ledger import MemoryLedger, PostgresLedger
from pumpflow.trading.service import LEASE_NAME, TradingService
from pumpflow.trading.settings import TradingSettings

from .test_service import entries_queued, running, trading, trading_replica

#: partitions of the replicas on RabbitMQ here
PARTITIONS = 2

#: short, so that the lease goes and comes back within a test's patience
LEASE_TTL_S = 2.0


class CountedTicks(TradingService):
    """The trading service, counting its timed rounds."""

    ticks = 0

    async def _on_tick(self, *args) -> None:
        self.ticks += 1
        await super()._on_tick(*args)


async def waiting_on_a_lock(conn, table: str) -> bool:
    """True while another session waits for a lock on ``table`` (of the pool's schema)."""
    return await conn.fetchval(
        "SELECT count(*) > 0 FROM pg_locks WHERE NOT granted AND relation = $1::regclass",
        table,
    )


async def test_a_re_election_during_a_tick_leaves_one_timer_loop(clock, pg_pool):
    """A tick waits for Postgres while the lease goes to another holder and comes back:
    the new term runs one timer loop, the tick of the term before starts none."""
    config = TradingSettings.load(
        service="trading", transport="memory", trading_lease_ttl_s=LEASE_TTL_S
    )
    service = CountedTicks(config, registry=CollectorRegistry(), ledger=PostgresLedger(pg_pool))
    tick_s = config.trading_tick_s
    async with running(clock, service):
        lease = service.leader.lease
        key = LEASE_PREFIX + LEASE_NAME
        async with pg_pool.acquire() as holder, pg_pool.acquire() as watcher:
            async with holder.transaction():
                # the tick's read of the operator's state waits here, mid-tick
                await holder.execute("LOCK TABLE trading_control IN ACCESS EXCLUSIVE MODE")
                tick = asyncio.create_task(clock.advance(tick_s))
                await eventually(lambda: waiting_on_a_lock(watcher, "trading_control"),
                                 what="the tick waiting for Postgres")  # fmt: skip
                assert service.ticks == 1
                await lease.store.set_many({key: b"another replica"}, ttl=LEASE_TTL_S * 10)
                await eventually(lambda: service.role == "standby", LEASE_TTL_S * 5,
                                 what="the lease lost")  # fmt: skip
                await lease.store.delete_many([key])
                # the take-over reads the ledger, and waits for the lock too
                await eventually(lambda: service.leader.elections == 2, LEASE_TTL_S * 5,
                                 what="the lease taken again")  # fmt: skip
            await tick
        await eventually(lambda: service.role == "active", what="trading again")
        for _ in range(3):
            before = service.ticks
            await clock.advance(tick_s)
            assert service.ticks - before == 1


@pytest.mark.rabbitmq
async def test_the_replica_trading_stopped_with_positions_held_says_what_waits_for_the_next(
    clock, market, rabbitmq_harness, namespace, caplog
):
    """Stopped while it holds positions (SIGTERM, a scale-down), the replica trading
    warns: no order of theirs executes (the exit's sales included) until a replica
    trades again; their events wait in the queues."""
    caplog.set_level("INFO", logger="pumpflow.trading")
    rabbitmq_harness.delete_after(["trading"])
    others = await rabbitmq_harness.bus("feed/broker", partitions=PARTITIONS)
    holder = await trading_replica(
        rabbitmq_harness, namespace, MemoryLedger(), clock, partitions=PARTITIONS
    )
    try:
        await entries_queued(others, market, 2)

        async def held() -> bool:
            await clock.advance(1.0)  # the paper fills come due
            return holder.book.open_count == 2

        await eventually(held, within=15, what="two positions held")
        exposure = holder.risk.total_exposure
    finally:
        await holder.stop()
    said = [r.getMessage() for r in caplog.records if "stopping while" in r.getMessage()]
    assert said == [
        f"trading: stopping while it trades, holding 2 positions ({exposure:.4f} SOL): no "
        "order of theirs executes, the exit's sales included, until a replica trades "
        "again (a stand-by at once, else the next to start; their events wait in the queues)"
    ], caplog.text


async def test_an_embedded_replica_holding_positions_stops_without_that_warning(
    clock, market, caplog
):
    """In one process (``pumpflow run``, a backtest) no replica comes next: the run's
    graceful exit and its report say what is held."""
    caplog.set_level("INFO", logger="pumpflow.trading")
    service = trading(MemoryLedger())
    async with running(clock, service) as (bus, _):
        await entries_queued(bus, market, 1)
        await clock.advance(1.0)  # the paper fill comes due
        assert service.book.open_count == 1
    assert "stopping while" not in caplog.text


def test_when_trading_passes_to_a_stand_by_is_said_in_tenths_of_a_second():
    """The default lease (10 s) is renewed every third of it: 3.33333... s, said as
    3.3 s, and the latest as a whole second up."""
    from pumpflow.common.lease import Claim
    from pumpflow.trading.service import _lease_passes

    late = Claim(holder="t1:ab12", runs_out_in_s=1.2, renewed_s_ago=8.8, late=True)
    assert _lease_passes(late, 10 / 3) == (
        "its lease's holder (t1:ab12) has not renewed it for 9 s (due every 3.3 s); unless "
        "it does, the lease runs out in 2 s and a stand-by takes trading over within 3.3 s "
        "after (6 s at the latest)"
    )
    assert _lease_passes(Claim(holder=None), 10 / 3) == (
        "no replica holds its lease now, a stand-by takes it within 3.3 s"
    )
