"""Exit sees every token's trades, so every token is a key here: a token activity
retires with nothing in play leaves memory and the partition's index, as tokens come
and go by the thousand a day; one with a position stays until it is closed. A token
whose partition moves to another replica leaves this one's memory, its market too. An
entry that ended before its token retired is still seen by the graceful exit when
trading's barrier lists it."""

from __future__ import annotations

import asyncio

import pytest

from pumpflow.common.bus import partition_of
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.bus.ownership import BalancedBus, OwnershipConfig
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import (
    BarrierEntry,
    OrderFilled,
    OrderRejected,
    OrderRequested,
    PositionClosed,
    ShutdownBarrier,
    SystemShutdown,
    TokenLifecycle,
    make_event,
)
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.testing import TokenEvents, eventually
from pumpflow.exit.records import BARRIER, MemoryExitStore, entry_position_id
from pumpflow.exit.service import ExitService

from .helpers import START, embedded, exit_service, opened, started

TOKENS = 300
PARTITIONS = 4
BEAT = OwnershipConfig(heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0)


def lifecycle(clock: ReplayClock, mint: str, state: str, previous: str = "active"):
    payload = TokenLifecycle(mint=mint, state=state, previous_state=previous)
    return make_event(payload, source="activity/test", time=clock.now())


async def index_entries(system, service) -> int:
    """Keys the exit partitions' indexes list (what a new owner restores)."""
    partitions = service.consumer.owned | service.consumer.restored
    found = 0
    for partition in partitions:
        found += len(await system.store.hgetall(f"{service.consumer._index_prefix}{partition}"))
    return found


async def test_retired_tokens_leave_memory_and_the_index():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service()
    async with embedded(clock, service) as (system, _):
        bus = system.bus
        held = tokens.mint()
        await bus.publish(tokens.created(held, sol=5.0))
        await bus.publish(tokens.buy(held, "whale", sol=10.0))
        position = opened(tokens, held)
        await bus.publish(position)
        for n in range(TOKENS):
            mint = tokens.mint()
            await bus.publish(tokens.created(mint, sol=1.0))
            await bus.publish(tokens.buy(mint, "alice", sol=0.5))
            await bus.publish(tokens.sell(mint, "alice", tokens=1000.0))
            await bus.publish(lifecycle(clock, mint, "inactive" if n % 2 else "graduated"))
            await clock.advance(1.0)
        await bus.publish(lifecycle(clock, held, "inactive"))
        await service.consumer.flush()
        # the held token stays (its rules watch its position); the others are gone
        assert set(service.consumer.keys()) == {held}
        assert set(service.processor._unheld) <= {held}
        assert await index_entries(system, service) == 1

        # a late trade on a graduate's pool loads it, and it goes again
        late = tokens.mint()
        await bus.publish(tokens.created(late, sol=1.0))
        await bus.publish(lifecycle(clock, late, "graduated"))
        await bus.publish(tokens.buy(late, "bob", sol=0.5, pool="pump-amm"))
        await service.consumer.flush()
        assert late not in set(service.consumer.keys())
        assert late not in service.processor._unheld

        # the position closed, its retired token goes too
        data = position.data
        closed = PositionClosed(
            position_id=data.position_id, mint=held, token_amount=0.0, cost_sol=data.cost_sol,
            entry_price=data.entry_price, reason="test",
        )  # fmt: skip
        await bus.publish(make_event(closed, source="trading/test", time=clock.now()))
        await service.consumer.flush()
        assert len(service.consumer) == 0
        assert await index_entries(system, service) == 0


async def test_tokens_of_a_partition_moved_to_another_replica_leave_this_ones_memory():
    """A replica joins: the partitions it takes leave the first replica with their
    tokens, what the processor holds of them beside their state (their market) too."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    bus = InMemoryBus(partitions=PARTITIONS, synchronous=True, source="test")
    await bus.start()
    store = MemoryStateStore(clock)
    services: dict[str, tuple[ExitService, BalancedBus]] = {}

    async def replica(name: str) -> ExitService:
        balanced = BalancedBus(bus, store=store, clock=clock, replica=name, config=BEAT)
        service = exit_service(partitions=PARTITIONS, replica=name)
        ctx = ServiceContext(settings=service.settings, bus=balanced, clock=clock, store=store)
        await service.start(ctx)
        services[name] = (service, balanced)
        return service

    def owned(name: str) -> set[int]:
        return set(services[name][1].balancer("exit").owned)

    try:
        a = await replica("a")
        mints = [tokens.mint() for _ in range(16)]
        for mint in mints:
            await bus.publish(tokens.created(mint, sol=1.0))
            await bus.publish(tokens.buy(mint, "alice", sol=0.5))
        await a.consumer.flush()
        assert set(a.consumer.keys()) == set(a.processor._unheld) == set(mints)

        await replica("b")
        await clock.advance(3 * BEAT.heartbeat_interval_s)
        assert owned("a") and owned("b") and owned("a") | owned("b") == set(range(PARTITIONS))
        kept = {m for m in mints if partition_of(m, PARTITIONS) in owned("a")}
        assert kept and kept != set(mints)
        assert set(a.consumer.keys()) == kept
        assert set(a.processor._unheld) == kept
    finally:
        for service, balanced in reversed(services.values()):
            await balanced.balancer("exit").stop(leave=True)
            await service.stop()
        await bus.close()


@pytest.mark.parametrize("outcome", ["refused", "landed"])
async def test_an_entry_ended_before_its_token_retired_is_seen_when_the_barrier_lists_it(
    outcome: str,
):
    """Trading's entry ends (refused, or landed and its position closed), its token
    retires, then the shutdown and trading's barrier listing that entry come: the run
    ends on the barrier, not on the deadline."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    exits = exit_service(records, exit_run_poll_s=0.02, exit_barrier_wait_s=10.0)
    async with embedded(clock, exits) as (system, _):
        bus = system.bus

        async def trading(payload) -> None:
            await bus.publish(make_event(payload, source="trading/test", time=clock.now()))

        mint = tokens.mint()
        await bus.publish(tokens.created(mint, sol=1.0))
        await trading(OrderRequested(order_id="entry-1", mint=mint, side="buy", sol_amount=0.1))
        if outcome == "refused":
            await trading(OrderRejected(order_id="entry-1", mint=mint, reason="slippage"))
        else:
            await trading(OrderFilled(
                order_id="entry-1", mint=mint, side="buy", token_amount=1e6, sol_amount=0.1,
                price=1e-7, position_id="pos-1",
            ))  # fmt: skip
            position = opened(tokens, mint)
            await bus.publish(position)
            data = position.data
            await trading(PositionClosed(
                position_id=data.position_id, mint=mint, token_amount=0.0,
                cost_sol=data.cost_sol, entry_price=data.entry_price, reason="test",
            ))  # fmt: skip
        await bus.publish(lifecycle(clock, mint, "inactive"))
        await exits.consumer.flush()
        assert mint not in set(exits.consumer.keys())

        await bus.publish(make_event(SystemShutdown(reason="retired"), source="test",
                                     time=clock.now()))  # fmt: skip
        run = await eventually(records.active_run, what="the graceful exit begun")
        barrier = ShutdownBarrier(
            reason="retired", entries=(BarrierEntry(order_id="entry-1", mint=mint),)
        )
        await trading(barrier)
        listed = records.run_positions[run.run_id]
        barrier_waited = run.started_at + exits.settings.exit_barrier_wait_s
        while (await records.get_run(run.run_id)).finished_at is None:
            assert clock.now() < barrier_waited, "the run waits for an entry that had ended"
            await clock.advance(0.25)
            await asyncio.sleep(0)
        await eventually(exits.finished.is_set, what="the graceful exit finished")
        assert listed[BARRIER][0] == "withdrawn"
        assert listed[entry_position_id("entry-1")][0] == "withdrawn"
        assert exits.summary.positions == 0


async def test_a_replica_restarted_in_the_run_sees_an_entry_ended_before_its_token_retired():
    """Trading's entry is refused and its token retires; the shutdown comes and the
    replica restarts before trading's barrier, which lists that entry, comes: the
    restarted replica knows it ended, and the run ends on the barrier, not on the
    deadline."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    settings = {"exit_run_poll_s": 0.02, "exit_barrier_wait_s": 10.0}
    first = exit_service(records, **settings)
    async with embedded(clock, first) as (system, _):
        bus = system.bus

        async def trading(payload) -> None:
            await bus.publish(make_event(payload, source="trading/test", time=clock.now()))

        mint = tokens.mint()
        await bus.publish(tokens.created(mint, sol=1.0))
        await trading(OrderRequested(order_id="entry-1", mint=mint, side="buy", sol_amount=0.1))
        await trading(OrderRejected(order_id="entry-1", mint=mint, reason="slippage"))
        await bus.publish(lifecycle(clock, mint, "inactive"))
        await first.consumer.flush()
        assert mint not in set(first.consumer.keys())
        await bus.publish(make_event(SystemShutdown(reason="restart"), source="test",
                                     time=clock.now()))  # fmt: skip
        run = await eventually(records.active_run, what="the graceful exit begun")

        # the replica goes; its store and records stay (a new one picks them up)
        await first.stop()
        second = await started(system, records, **settings)
        try:
            barrier = ShutdownBarrier(
                reason="restart", entries=(BarrierEntry(order_id="entry-1", mint=mint),)
            )
            await trading(barrier)
            barrier_waited = run.started_at + second.settings.exit_barrier_wait_s
            while (await records.get_run(run.run_id)).finished_at is None:
                assert clock.now() < barrier_waited, "the run waits for an entry that had ended"
                await clock.advance(0.25)
                await asyncio.sleep(0)
            await eventually(second.finished.is_set, what="the graceful exit finished")
            listed = records.run_positions[run.run_id]
            assert listed[entry_position_id("entry-1")][0] == "withdrawn"
        finally:
            await second.stop()
