"""The graceful exit of the exit service beside the real trading service, embedded on
a replay clock: system.shutdown sells every position trading holds, in tranches, by
the deadline, reported and stored; a restart in the middle resumes without selling
any tranche twice; an entry in flight at the shutdown keeps the exit open until it
fills, then its position is sold too, even when the exit's consumer is far behind on
its partition (trading's barrier lists it)."""

from __future__ import annotations

import asyncio
import functools
import math

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.routing import partition_of
from pumpflow.common.clock import ReplayClock
from pumpflow.common.curve import CurveState, pool_after_trade, quote_sell, sell_for_impact
from pumpflow.common.events import (
    BarrierPosition,
    ExitOrder,
    ExitReport,
    FeaturesUpdated,
    ModelPrediction,
    OrderFilled,
    OrderRejected,
    PositionClosed,
    PositionOpened,
    PositionUpdated,
    SaleRequested,
    ShutdownBarrier,
    SystemShutdown,
    TokenLifecycle,
    make_event,
)
from pumpflow.common.priority import Priority
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.testing import EventCollector, TokenEvents, eventually
from pumpflow.common.testing.plugin import bus_harness_fixture
from pumpflow.common.trading import MIGRATION_POOL
from pumpflow.exit.records import (
    BARRIER,
    ExitOrderRecord,
    MemoryExitStore,
    PostgresExitStore,
    entry_position_id,
)
from pumpflow.trading.ledger import MemoryLedger
from pumpflow.trading.service import TradingService
from pumpflow.trading.settings import TradingSettings

from .helpers import (
    START,
    FlakyExitStore,
    Outage,
    as_trading,
    embedded,
    exit_service,
    filled,
    hold,
    kill,
    on_broker,
    opened,
    started,
)

PARTITIONS = 4
#: the in-memory bus (synchronous) and RabbitMQ
harness = bus_harness_fixture(partitions=PARTITIONS, synchronous=True)

#: a features vector inside every default entry filter of trading
GOOD_FEATURES = {
    "time_since_launch": 60.0,
    "curve_progress": 0.2,
    "creator_holding_share": 0.02,
    "creator_sold": 0.0,
    "buy_volume_sol_60s": 5.0,
    "unique_traders": 25.0,
    "top_buyer_share": 0.2,
    "price": 5e-8,
}


def trading(ledger: MemoryLedger, **settings: object) -> TradingService:
    config = TradingSettings.load(service="trading", transport="memory", **settings)
    return TradingService(config, registry=CollectorRegistry(), ledger=ledger)


async def open_positions(bus, clock: ReplayClock, tokens: TokenEvents, count: int) -> list[str]:
    """``count`` tokens trading enters on a prediction each (filled after its latency)."""
    mints = []
    for _ in range(count):
        mint = tokens.mint()
        await _enter(bus, clock, tokens, mint)
        mints.append(mint)
    await clock.advance(1.0)
    return mints


async def until_finished(service, clock: ReplayClock, *, step: float = 0.25) -> None:
    while not service.finished.is_set():
        await clock.advance(step)
        await asyncio.sleep(0)


async def test_a_shutdown_sells_every_position_by_the_deadline_and_reports_it():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    ledger, records = MemoryLedger(), MemoryExitStore()
    trader, exits = trading(ledger), exit_service(records)
    async with embedded(clock, trader, exits) as (system, watch):
        mints = await open_positions(system.bus, clock, tokens, 5)
        assert set(trader.book.open_positions) == set(mints)
        assert len(exits.positions()) == 5
        shutdown = SystemShutdown(reason="test shutdown")
        await system.bus.publish(make_event(shutdown, source="test", time=clock.now()))
        await until_finished(exits, clock)

        assert trader.book.open_count == 0
        summary = exits.summary
        assert summary.positions == 5 and summary.positions_left == 0
        assert summary.deadline_margin_s > 0
        orders = watch.payloads("exit.order")
        assert all(o.order_id.split(":exit:")[0] == o.position_id for o in orders)
        assert len({o.order_id for o in orders}) == len(orders)
        filled = {f.order_id: f for f in watch.payloads("order.filled") if f.side == "sell"}
        assert set(filled) == {o.order_id for o in orders}
        # the reports match the fills
        [graceful] = [r for r in watch.payloads("exit.report") if r.graceful]
        assert graceful.sol_recovered == pytest.approx(sum(f.sol_amount for f in filled.values()))
        assert graceful.positions_left == 0
        run = await records.latest_run()
        assert run.finished_at is not None and run.summary["positions_left"] == 0
        stored = await records.run_orders(run.run_id)
        assert sorted(o.order_id for o in stored) == sorted(filled)
        assert all(o.state == "filled" for o in stored)
        assert "graceful exit (test shutdown): 5 positions, 5 sold out" in exits.summary.text()
        assert exits.progress()["progress"]["sold_out"] == 5


async def test_a_restart_in_the_middle_resumes_and_sells_no_tranche_twice():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    ledger, records = MemoryLedger(), MemoryExitStore()
    trader = trading(ledger)
    # tranches spaced far apart: the first replica goes after the first tranches
    first = exit_service(records, exit_min_tranche_interval_s=20.0, exit_max_tranche_impact=0.005)
    async with embedded(clock, trader, first) as (system, watch):
        await open_positions(system.bus, clock, tokens, 3)
        shutdown = SystemShutdown(reason="restart test")
        await system.bus.publish(make_event(shutdown, source="test", time=clock.now()))
        while len(watch.payloads("exit.order")) < 3:
            await clock.advance(0.25)
            await asyncio.sleep(0)
        await clock.advance(1.0)
        sent_before = {o.order_id for o in watch.payloads("exit.order")}
        assert trader.book.open_count == 3  # each sold a tranche, none sold out
        # the replica goes; its store and records stay (a new one picks them up)
        await first.stop()
        second = await started(
            system, records, exit_min_tranche_interval_s=20.0, exit_max_tranche_impact=0.005
        )
        await until_finished(second, clock, step=1.0)
        assert trader.book.open_count == 0
        orders = [o.order_id for o in watch.payloads("exit.order")]
        assert len(orders) == len(set(orders)), "an order id was sent twice"
        assert sent_before < set(orders)
        summary = second.summary
        assert summary.positions == 3 and summary.positions_left == 0
        sells = [f for f in watch.payloads("order.filled") if f.side == "sell"]
        assert summary.sol_recovered == pytest.approx(sum(f.sol_amount for f in sells))
        await second.stop()


async def test_an_outage_of_the_records_as_a_tranche_fills_is_waited_out():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = FlakyExitStore()
    # the outage outlasts no wait for a fill (a tranche given up would be retried)
    trader, exits = trading(MemoryLedger()), exit_service(records, exit_order_timeout_s=5.0)
    async with embedded(clock, trader, exits) as (system, watch):
        await open_positions(system.bus, clock, tokens, 2)
        shutdown = SystemShutdown(reason="records out")
        await system.bus.publish(make_event(shutdown, source="test", time=clock.now()))
        await until_finished(exits, clock)

        assert records.failures == 0
        assert trader.book.open_count == 0
        sells = [f for f in watch.payloads("order.filled") if f.side == "sell"]
        # every fill counted (none given up for want of its outcome, none sold twice)
        assert exits.summary.sol_recovered == pytest.approx(sum(f.sol_amount for f in sells))
        assert exits.summary.positions_left == 0
        orders = [o.order_id for o in watch.payloads("exit.order")]
        assert sorted(orders) == sorted(f.order_id for f in sells)
        run = await records.latest_run()
        stored = await records.run_orders(run.run_id)
        assert {o.order_id: o.state for o in stored} == {o: "filled" for o in orders}


class _ReadsOut(MemoryExitStore):
    """Records whose database is out for the first ``failures`` reads of a run's closes
    and the first ``listings`` changes of a run (a restart, say)."""

    def __init__(self, failures: int = 1, listings: int = 0):
        super().__init__()
        self.failures = failures
        self.listings = listings

    async def run_closes(self, run_id):
        if self.failures:
            self.failures -= 1
            raise Outage("the records' database is restarting")
        return await super().run_closes(run_id)

    async def update_run(self, run_id, **changes):
        if self.listings and changes.get("partitions"):
            self.listings -= 1
            raise Outage("the records' database is restarting")
        return await super().update_run(run_id, **changes)


@pytest.mark.parametrize("failing", ["reads", "listing"])
async def test_an_outage_of_the_records_as_the_share_takes_up_its_positions_is_waited_out(
    failing,
):
    """The records' database is out as the replica reads the run's tranches and closes
    (or lists its share) to take up its positions: the take-up waits for it, and the
    positions are sold (the share was lost: nothing sold them, the run never ended)."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = _ReadsOut(1, 0) if failing == "reads" else _ReadsOut(0, 1)
    trader, exits = trading(MemoryLedger()), exit_service(records)
    async with embedded(clock, trader, exits) as (system, _):
        await open_positions(system.bus, clock, tokens, 2)
        shutdown = SystemShutdown(reason="records out")
        await system.bus.publish(make_event(shutdown, source="test", time=clock.now()))
        await until_finished(exits, clock)

        assert (records.failures, records.listings) == (0, 0)
        assert trader.book.open_count == 0
        assert exits.summary is not None and exits.summary.positions_left == 0
        assert (await records.latest_run()).finished_at is not None


async def test_http_shutdown_needs_the_token_then_the_exit_is_served():
    import httpx

    from pumpflow.common.runtime.http import create_app

    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    trader, exits = trading(MemoryLedger()), exit_service(api_token="secret")
    async with embedded(clock, trader, exits) as (system, _):
        await open_positions(system.bus, clock, tokens, 2)
        app = create_app(exits, system.contexts["exit"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/positions")).json()["count"] == 2
            assert (await client.post("/shutdown")).status_code == 401
            assert exits.run is None
            bad = await client.post(
                "/shutdown", json={"reason": 5}, headers={"Authorization": "Bearer secret"}
            )
            assert bad.status_code == 422 and "'reason' must be text" in bad.text
            assert exits.run is None
            asked = await client.post(
                "/shutdown", json={"reason": "http"}, headers={"Authorization": "Bearer secret"}
            )
            assert asked.status_code == 200
            await until_finished(exits, clock)
            progress = (await client.get("/progress")).json()
            # over: the rules are back for what a resumed trading buys
            assert progress["progress"]["sold_out"] == 2 and progress["accepting_entries"]
            assert "graceful exit (http): 2 positions, 2 sold out" in progress["text"]
            summary = (await client.get("/summary")).json()
            assert summary["run"]["summary"]["positions_left"] == 0
            assert (await client.get("/orders")).json()["count"] >= 2
            # the count is of the orders listed; more says the limit left some out
            cut = (await client.get("/orders?limit=1")).json()
            assert (cut["count"], len(cut["orders"]), cut["more"]) == (1, 1, True)

            # a second shutdown is a run of its own: the first's report is not its
            asked = await client.post(
                "/shutdown", json={"reason": "again"}, headers={"Authorization": "Bearer secret"}
            )
            assert asked.status_code == 200
            # over at once or not yet (trading's answer may come first): never the first's
            assert "(http)" not in (await client.get("/progress")).json().get("text", "")
            await advancing(
                clock, lambda: exits.summary is not None, what="the second exit finished"
            )
            progress = (await client.get("/progress")).json()
            assert "graceful exit (again): 0 positions" in progress["text"]
            assert await exits.records.active_run() is None  # no run left open
        assert trader.book.open_count == 0


async def test_a_tranche_given_up_for_lost_that_fills_late_counts_and_nothing_is_oversold():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    ledger, records = MemoryLedger(), MemoryExitStore()
    # every tranche outlives its wait (fills come only as the replay clock moves): each
    # is given up, its tokens not offered again, and its fill lands late
    trader = trading(ledger)
    exits = exit_service(records, exit_order_timeout_s=1e-6)
    async with embedded(clock, trader, exits) as (system, watch):
        bought = {
            e.data.position_id: e.data.token_amount
            for e in await _opened(system, clock, tokens, watch, 3)
        }
        shutdown = SystemShutdown(reason="late fills")
        await system.bus.publish(make_event(shutdown, source="test", time=clock.now()))
        await until_finished(exits, clock)

        assert trader.book.open_count == 0
        sells = [f for f in watch.payloads("order.filled") if f.side == "sell"]
        sold: dict[str, float] = {}
        for fill in sells:
            sold[fill.position_id] = sold.get(fill.position_id, 0.0) + fill.token_amount
        for position_id, held in bought.items():
            assert sold[position_id] == pytest.approx(held, rel=1e-9), (position_id, sells)
        summary = exits.summary
        assert summary.positions_left == 0
        assert summary.sol_recovered == pytest.approx(sum(f.sol_amount for f in sells))


async def test_a_tranche_without_an_outcome_on_a_clock_that_stands_still_is_not_asked_again():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    ledger, records = MemoryLedger(), MemoryExitStore()
    # the replay clock stands still from the shutdown on: trading's fills, which follow
    # it, do not come, nor does the deadline; a tranche refused is tried again at once
    trader = trading(ledger)
    registry = CollectorRegistry()
    exits = exit_service(
        records, registry=registry, exit_order_timeout_s=0.05, exit_min_tranche_interval_s=0.0
    )

    def gauge(what: str) -> float | None:
        return registry.get_sample_value("pumpflow_exit_graceful", {"what": what})

    async with embedded(clock, trader, exits) as (system, watch):
        [event] = await _opened(system, clock, tokens, watch, 1)
        held = event.data.token_amount
        stopped_at = clock.now()
        shutdown = SystemShutdown(reason="outcomes lost")
        await system.bus.publish(make_event(shutdown, source="test", time=stopped_at))

        def given_up() -> bool:
            progress = exits.progress().get("progress", {})
            return progress.get("unconfirmed_tokens", 0.0) >= held * (1 - 1e-9)

        await eventually(
            given_up,
            20.0,
            what="the tranche given up for lost, its tokens unconfirmed",
            details=lambda: f"{len(watch.payloads('exit.order'))} tranches asked",
        )
        assert clock.now() == stopped_at
        [order] = watch.payloads("exit.order")
        assert order.token_amount == pytest.approx(held, rel=1e-9)
        assert not exits.finished.is_set()
        # what an alert reads, from the replica's look at its exit (once a second)
        await eventually(
            lambda: gauge("unconfirmed_tranches") == 1,
            20.0,
            what="the unconfirmed tranche on /metrics",
            details=lambda: f"unconfirmed_tranches {gauge('unconfirmed_tranches')}",
        )
        assert gauge("unconfirmed_tokens") == pytest.approx(held, rel=1e-9)

        # the clock moves on: the tranche fills, late, and ends the exit
        await advancing(clock, exits.finished.is_set, what="the graceful exit finished")
        assert trader.book.open_count == 0
        [order] = watch.payloads("exit.order")
        sells = [f for f in watch.payloads("order.filled") if f.side == "sell"]
        assert [f.order_id for f in sells] == [order.order_id]
        assert sells[0].token_amount == pytest.approx(held, rel=1e-9)
        [line] = exits.summary.lines
        assert line.completed and line.unconfirmed_tranches == 0
        assert exits.summary.sol_recovered == pytest.approx(sells[0].sol_amount)
        assert "UNCONFIRMED" not in exits.summary.text()
        assert gauge("unconfirmed_tranches") == 0 and gauge("unconfirmed_tokens") == 0


async def test_an_entry_in_flight_at_the_shutdown_is_waited_for_and_its_position_sold():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    ledger, records = MemoryLedger(), MemoryExitStore()
    trader, exits = trading(ledger), exit_service(records)
    async with embedded(clock, trader, exits) as (system, watch):
        await _opened(system, clock, tokens, watch, 4)
        # the next entry's order fills 20 s late (a slow venue): after the other four
        # positions are sold out
        late = tokens.mint()
        start_entry = trader.executor.start_entry

        async def slow_entry(order, *, time):
            return await start_entry(order, time=time + 20.0 if order.mint == late else time)

        trader.executor.start_entry = slow_entry
        await _enter(system.bus, clock, tokens, late)
        [requested] = await watch.wait_for(
            1, "order.requested", where=lambda e: e.data.mint == late
        )
        shutdown = SystemShutdown(reason="late entry")
        await system.bus.publish(make_event(shutdown, source="test", time=clock.now()))
        while trader.book.open_count > 0:
            await clock.advance(0.25)
            await asyncio.sleep(0)
        assert not watch.payloads("position.opened", key=late), "the entry filled too soon"
        run = await records.active_run()
        listed = records.run_positions[run.run_id]

        def four_closed():
            closed = [p for p, (state, _) in listed.items() if state == "exited"]
            return len(closed) == 4

        looks = 0
        get_run = records.get_run

        async def looked_at(run_id: str):
            nonlocal looks
            looks += 1
            return await get_run(run_id)

        records.get_run = looked_at
        await eventually(four_closed, what="the four positions closed in the run")
        # polls of the run go on: the entry in flight keeps it open
        seen = looks
        await eventually(lambda: looks >= seen + 2, what="two more polls of the run")
        assert listed[f"entry:{requested.data.order_id}"][0] == "open"
        assert (await records.get_run(run.run_id)).finished_at is None
        assert not exits.finished.is_set()

        await until_finished(exits, clock)
        [opened] = watch.payloads("position.opened", key=late)
        [bought] = [e for e in watch.of("order.filled", key=late) if e.data.side == "buy"]
        assert bought.time > run.started_at
        assert listed[f"entry:{requested.data.order_id}"][0] == "withdrawn"
        assert trader.book.open_count == 0
        orders = watch.payloads("exit.order")
        assert len({o.order_id for o in orders}) == len(orders)
        sold = sum(
            f.token_amount for f in watch.payloads("order.filled", key=late) if f.side == "sell"
        )
        assert sold == pytest.approx(opened.token_amount, rel=1e-9)
        summary = exits.summary
        assert summary.positions == 5 and summary.positions_left == 0
        assert opened.position_id in {line.position_id for line in summary.lines}


async def _enter(bus, clock: ReplayClock, tokens: TokenEvents, mint: str) -> None:
    """Trading's entry on ``mint``: the token, its features and a prediction."""
    now = clock.now()
    features = FeaturesUpdated(
        mint=mint, feature_set_version="test", source_seq=1,
        names=tuple(GOOD_FEATURES), values=tuple(GOOD_FEATURES.values()),
    )  # fmt: skip
    lifecycle = TokenLifecycle(mint=mint, state="active", priority=int(Priority.URGENT))
    prediction = ModelPrediction(
        mint=mint, model_id="m1", arm="a", feature_set_version="test", score=0.9
    )
    for event in (
        tokens.created(mint, sol=0.5, trader="dev"),
        tokens.buy(mint, "alice", sol=3.0),
        make_event(features, source="features/test", time=now),
        make_event(lifecycle, source="activity/test", time=now),
        make_event(prediction, source="model/test", time=now),
    ):
        await bus.publish(event)


async def _opened(system, clock, tokens, watch, count):
    mints = await open_positions(system.bus, clock, tokens, count)
    return await watch.wait_for(count, "position.opened", where=lambda e: e.data.mint in mints)


async def test_a_rule_sale_refused_during_the_exit_is_sold_by_it_and_the_position_ends_flat():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    ledger, records = MemoryLedger(), MemoryExitStore()
    # a rule's sale is refused at the least move of the market; tranches are not
    trader = trading(ledger)
    exits = exit_service(records, exit_slippage_pct=0.01)
    async with embedded(clock, trader, exits) as (system, watch):
        bus = system.bus
        [event] = await _opened(system, clock, tokens, watch, 1)
        mint, bought = event.data.mint, event.data.token_amount
        while tokens.curves[mint].price < event.data.entry_price * 1.5:
            await bus.publish(tokens.buy(mint, "whale", sol=1.0))
        [rule] = await watch.wait_for(1, "exit.order")
        assert rule.data.reason == "take_profit_1" and ":rule:" in rule.data.order_id
        # the graceful exit begins while the rule's sale is on its way to trading
        shutdown = SystemShutdown(reason="refused rule sale")
        await bus.publish(make_event(shutdown, source="test", time=clock.now()))
        await bus.publish(tokens.sell(mint, "whale", tokens=tokens.balance(mint, "whale") * 0.1))
        await until_finished(exits, clock)

        [refused] = watch.payloads("order.rejected")
        assert refused.order_id == rule.data.order_id
        assert trader.book.open_count == 0
        sells = [f for f in watch.payloads("order.filled") if f.side == "sell"]
        assert all(":exit:" in f.order_id for f in sells)
        assert sum(f.token_amount for f in sells) == pytest.approx(bought, rel=1e-9)
        assert [c.position_id for c in watch.payloads("position.closed")] == [
            event.data.position_id
        ]
        # one report of the position, all of it sold by the exit, before the deadline
        [report] = [r for r in watch.payloads("exit.report") if not r.graceful]
        [line] = report.positions
        assert line.tokens_sold == pytest.approx(bought, rel=1e-9) and line.completed
        assert line.tranches == len(sells)
        summary = exits.summary
        assert summary.positions == 1 and summary.positions_left == 0
        assert summary.deadline_margin_s > 0
        assert summary.sol_recovered == pytest.approx(sum(f.sol_amount for f in sells))


async def advancing(clock: ReplayClock, condition, *, what: str, step: float = 0.25):
    """Move the clock ``step`` at a time until ``condition()`` holds (trading's fills and
    the exit's tranches follow the clock; on a broker they also take their delivery)."""

    async def moved() -> bool:
        if condition():
            return True
        await clock.advance(step)
        return bool(condition())

    await eventually(moved, 60.0, what=what, interval=0.01)


#: a look for late positions far apart (an hour): they are sold as they come, not found
#: by a look
POLL_S = [0.02, pytest.param(3600.0, id="sold-as-it-comes")]


@pytest.mark.parametrize("poll_s", POLL_S)
async def test_a_late_entry_behind_the_exit_consumers_backlog_is_waited_for_and_sold(
    harness, poll_s
):
    bus = await harness.bus(partitions=PARTITIONS, source="test/embedded")
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    ledger, records = MemoryLedger(), MemoryExitStore()
    trader = trading(ledger, partitions=PARTITIONS)
    exits = exit_service(
        records, partitions=PARTITIONS, exit_run_poll_s=poll_s, exit_barrier_wait_s=5.0
    )
    async with embedded(clock, trader, exits, bus=bus) as (_, watch):
        late = tokens.mint()
        lagging = partition_of(late, PARTITIONS)
        others = []
        while len(others) < 2:
            mint = tokens.mint()
            if partition_of(mint, PARTITIONS) != lagging:
                others.append(mint)
        for mint in others:
            await _enter(bus, clock, tokens, mint)
        await advancing(clock, lambda: len(exits.positions()) == 2, what="two positions held")
        # the exit's consumer falls behind on the late mint's partition: what trading
        # publishes there waits in the queue, past the end of everything else
        await bus.release_partitions(exits.consumer.subscription, [lagging])
        await _enter(bus, clock, tokens, late)
        [requested] = await watch.wait_for(
            1, "order.requested", where=lambda e: e.data.mint == late
        )
        shutdown = SystemShutdown(reason="lagging exit")
        await bus.publish(make_event(shutdown, source="test", time=clock.now()))
        run = await eventually(records.active_run, what="the graceful exit begun")
        listed = records.run_positions[run.run_id]

        def others_sold_and_barrier_past() -> bool:
            closed = {p for p, (state, _) in listed.items() if state == "exited"}
            # the barrier came, or the wait for it is over
            return len(closed) == 2 and listed[BARRIER][0] == "withdrawn"

        await advancing(clock, others_sold_and_barrier_past, what="the two others sold")
        await advancing(clock, lambda: trader.book.open_count == 1, what="the late entry filled")
        assert (await records.get_run(run.run_id)).finished_at is None, (
            "the run ended before the exit saw the late entry"
        )
        assert listed[entry_position_id(requested.data.order_id)][0] == "open"

        # the consumer catches up: the entry, its fill and its position come; it is sold
        await bus.consume_partitions(exits.consumer.subscription, [lagging])
        await advancing(clock, exits.finished.is_set, what="the graceful exit finished")
        assert trader.book.open_count == 0
        # on a broker the watch's queue may lag behind the exit's: the position's events
        # come before its close there
        await watch.wait_for(1, "position.closed", key=late)
        [opened] = watch.payloads("position.opened", key=late)
        sold = sum(
            f.token_amount for f in watch.payloads("order.filled", key=late) if f.side == "sell"
        )
        assert sold == pytest.approx(opened.token_amount, rel=1e-9)
        summary = exits.summary
        assert summary.positions == 3 and summary.positions_left == 0
        assert opened.position_id in {line.position_id for line in summary.lines}
        assert listed[entry_position_id(requested.data.order_id)][0] == "withdrawn"


async def test_a_barrier_before_the_shutdown_begins_the_run_and_an_unseen_position_is_left():
    clock = ReplayClock(START)
    records = MemoryExitStore()
    exits = exit_service(records, exit_deadline_s=20.0, exit_run_poll_s=0.02)
    async with embedded(clock, exits) as (system, _):
        # trading's barrier overtook the shutdown; it holds a position this consumer never
        # sees (its events lost behind a backlog that outlasts the run)
        unseen = BarrierPosition(position_id="pos-unseen", mint="MintUnseen")
        barrier = ShutdownBarrier(reason="barrier first", positions=(unseen,))
        await system.bus.publish(make_event(barrier, source="trading/test", time=clock.now()))
        run = await eventually(records.active_run, what="the run begun by the barrier")
        assert run.reason == "barrier first"
        await until_finished(exits, clock)
        ended = await records.get_run(run.run_id)
        # the run waited for it to its deadline, then counted it left, nothing sold
        assert ended.finished_at >= run.deadline
        [line] = exits.summary.lines
        assert line.position_id == "pos-unseen" and line.mint == "MintUnseen"
        assert line.tokens_sold == 0 and not line.completed
        assert exits.summary.positions_left == 1
        # the same barrier told again, late: no second run
        await system.bus.publish(make_event(barrier, source="trading/test", time=run.started_at))
        assert await records.active_run() is None


async def test_a_barrier_of_a_request_whose_run_is_over_holds_nothing_of_the_run_under_way():
    """Trading tells its barrier of an earlier request again (it saw that shutdown again)
    while the next request's run waits for its own: what it lists is the earlier run's,
    over; the run under way lists none of it and ends on its own barrier."""
    clock = ReplayClock(START)
    records = MemoryExitStore()
    exits = exit_service(records, exit_deadline_s=20.0, exit_run_poll_s=0.02)
    async with embedded(clock, exits) as (system, _):
        told = as_trading(system.bus, clock)
        await told(SystemShutdown(reason="first", request_id="a"))
        await told(ShutdownBarrier(reason="first", request_id="a"))
        await until_finished(exits, clock)
        await told(SystemShutdown(reason="second", request_id="b"))
        second = await eventually(records.active_run, what="the second run")
        stale = BarrierPosition(position_id="pos-sold-by-the-first", mint="MintStale")
        await told(ShutdownBarrier(reason="first", request_id="a", positions=(stale,)))
        assert records.run_positions[second.run_id] == {BARRIER: ("open", None)}
        await told(ShutdownBarrier(reason="second", request_id="b"))
        await until_finished(exits, clock)
        ended = await records.get_run(second.run_id)
        assert ended.finished_at < second.deadline and exits.summary.lines == ()


async def test_a_shutdown_older_than_a_request_is_kept_begins_no_run():
    """A request older than ``shutdown_requests_kept_s`` (a dead letter moved back, a
    delivery long unacknowledged) may have been applied and forgotten: it begins none."""
    clock = ReplayClock(START)
    records = MemoryExitStore(requests_kept_s=3600)
    exits = exit_service(records, shutdown_requests_kept_s=3600, exit_run_poll_s=0.02)
    async with embedded(clock, exits) as (system, _):
        old = SystemShutdown(reason="long ago", request_id="old")
        sent = clock.now() - 3660
        await system.bus.publish(make_event(old, source="exit/t", time=sent, event_id="old"))
        assert await records.latest_run() is None
        recent = SystemShutdown(reason="just now", request_id="recent")
        await system.bus.publish(make_event(recent, source="exit/t", time=clock.now() - 60))
        run = await eventually(records.active_run, what="the recent request's run")
        assert run.reason == "just now"


class _StoresThenDies(MemoryExitStore):
    """Records of a replica that dies after storing its first tranche, before sending it."""

    def __init__(self) -> None:
        super().__init__()
        self.dying = True
        self.stored = asyncio.Event()

    async def record_order(self, order):
        new = await super().record_order(order)
        if self.dying and ":exit:" in order.order_id:
            self.stored.set()
            await asyncio.Event().wait()  # the process is gone: nothing more of it runs
        return new


async def test_a_tranche_stored_and_never_sent_before_a_crash_is_sent_by_the_restarted_replica():
    """The replica stores a tranche (its number taken) and dies before publishing it;
    the restarted one finds it without an outcome, asks for it again under its stored
    order id (trading sells an order id once), and the position ends flat, not with
    that tranche's tokens unconfirmed and held at the deadline."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    ledger, records = MemoryLedger(), _StoresThenDies()
    trader = trading(ledger)
    first = exit_service(records)
    async with embedded(clock, trader, first) as (system, watch):
        [event] = await _opened(system, clock, tokens, watch, 1)
        bought = event.data.token_amount
        shutdown = SystemShutdown(reason="crash before sending")
        await system.bus.publish(make_event(shutdown, source="test", time=clock.now()))
        await eventually(records.stored.is_set, what="the first tranche stored")
        assert watch.payloads("exit.order") == []
        await first.stop()

        records.dying = False
        second = await started(system, records, exit_resume_wait_s=0.05)
        try:
            # the clock stands still until then: the resumed exit is not past its deadline
            await eventually(lambda: watch.payloads("exit.order"), what="the tranche asked again")
            await until_finished(second, clock)
            assert trader.book.open_count == 0
            sells = [f for f in watch.payloads("order.filled") if f.side == "sell"]
            assert sum(f.token_amount for f in sells) == pytest.approx(bought, rel=1e-9)
            orders = [o.order_id for o in watch.payloads("exit.order")]
            assert orders[0].endswith(":exit:1") and len(orders) == len(set(orders))
            [line] = second.summary.lines
            assert line.completed and line.unconfirmed_tranches == 0
        finally:
            await second.stop()


class _RecordsOut(PostgresExitStore):
    """The exit's records in Postgres, out (as a restart of the database) while ``down``:
    a tranche's outcome cannot be stored then."""

    def __init__(self, pool) -> None:
        super().__init__(pool)
        self.down = False
        #: tries to store a tranche's outcome while down
        self.refused = 0

    async def settle(self, order_id, outcome, time):
        if self.down:
            self.refused += 1
            raise Outage("the records' database is restarting")
        return await super().settle(order_id, outcome, time)


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.postgres
async def test_a_kill_while_a_tranches_fill_waits_for_the_records_loses_no_fill(
    rabbitmq_harness, redis_client, redis_url, namespace, pg_pool
):
    """A tranche fills while the exit's records are out; the replica dies trying to store
    the fill, before they are back. The fill is not lost with it: the delivery was not
    acked, so the restarted replica applies and stores it, and the position ends sold
    out, not held back as that tranche's unconfirmed tokens until the deadline (trading
    answers an order id once, so asking again brings nothing)."""
    from pumpflow.common.state.redis import RedisStateStore

    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    ledger, records = MemoryLedger(), _RecordsOut(pg_pool)
    store = RedisStateStore(url=redis_url, namespace=namespace)
    settings = {"partitions": PARTITIONS, "exit_resume_wait_s": 5.0}
    trader = trading(ledger, partitions=PARTITIONS)
    bus = await rabbitmq_harness.bus(partitions=PARTITIONS, source="test/embedded")

    replica = functools.partial(
        on_broker, rabbitmq_harness, clock=clock, store=store, partitions=PARTITIONS
    )

    first = exit_service(records, **settings)
    first_bus = await replica(first)
    second = None
    try:
        async with embedded(clock, trader, bus=bus) as (_, watch):
            mint = tokens.mint()
            await _enter(bus, clock, tokens, mint)
            await advancing(clock, lambda: len(first.positions()) == 1, what="the position held")
            # the replica and the watch take trading's events from queues of their own
            [opened] = [e.data for e in await watch.wait_for(1, "position.opened")]
            await bus.publish(make_event(SystemShutdown(reason="records out"), source="test",
                                         time=clock.now()))  # fmt: skip
            [tranche] = await watch.wait_for(1, "exit.order", within=30)
            records.down = True
            # trading fills it as the clock moves; the replica tries to store the fill,
            # and again, while the records are out
            await advancing(clock, lambda: records.refused >= 2, what="the fill's store tried")
            sold = await watch.wait_for(1, "order.filled", where=lambda e: e.data.side == "sell")
            assert [e.data.order_id for e in sold] == [tranche.data.order_id]

            # the replica dies: nothing more of it runs, what it did not ack goes back
            await kill(first, first_bus)
            records.down = False
            second = exit_service(records, **settings)
            await replica(second)
            await advancing(clock, second.finished.is_set, what="the resumed exit finished")
            # the position's fills come before its close on the watch's queue
            await watch.wait_for(1, "position.closed")

            assert trader.book.open_count == 0
            sells = [f for f in watch.payloads("order.filled") if f.side == "sell"]
            assert sum(f.token_amount for f in sells) == pytest.approx(
                opened.token_amount, rel=1e-9
            )
            [line] = second.summary.lines
            assert line.completed and line.unconfirmed_tranches == 0, line
            assert second.summary.deadline_margin_s > 0
            assert second.summary.sol_recovered == pytest.approx(sum(f.sol_amount for f in sells))
            run = await records.latest_run()
            stored = {o.order_id: o.state for o in await records.run_orders(run.run_id)}
            assert stored == {f.order_id: "filled" for f in sells}
    finally:
        if second is not None:
            await second.stop()
        await store.close()


#: an exit service alone (the test is trading): one tranche of 1e5 tokens sells a
#: position whole; the run waits for no barrier
ALONE = {"exit_barrier_wait_s": 0.0, "exit_run_poll_s": 0.02}


class _Trading:
    """The test as trading: fills each new exit order whole and tells the position's
    tokens left (closed once none are); drops an order id it has seen, as trading
    does, and never answers one in ``lost``."""

    def __init__(self, system, tokens: TokenEvents, watch):
        self.bus, self.tokens, self.watch = system.bus, tokens, watch
        self.publish = as_trading(system.bus, tokens.clock)
        #: order ids seen (answered or dropped)
        self.seen: set[str] = set()
        #: order ids trading never got
        self.lost: set[str] = set()
        self.held: dict[str, PositionOpened] = {}
        self.left: dict[str, float] = {}

    async def hold(self, mint: str, *, tokens_held: float = 1e5, curve: bool = True):
        position = await hold(self.bus, self.tokens, mint, tokens_held=tokens_held, curve=curve)
        self.held[mint], self.left[mint] = position, position.token_amount
        return position

    async def close(self, mint: str, reason: str) -> None:
        await self.publish(PositionClosed(**self._fields(mint), token_amount=0.0, cost_sol=0.0,
                                          reason=reason))  # fmt: skip

    def orders(self, order_id: str) -> int:
        """How often ``order_id`` was asked."""
        return sum(o.order_id == order_id for o in self.watch.payloads("exit.order"))

    async def answer(self) -> None:
        for order in self.watch.payloads("exit.order"):
            if order.order_id in self.seen or order.order_id in self.lost:
                continue
            await self.fill(order)

    async def fill(self, order, tokens: float | None = None) -> None:
        """Fill ``order`` (``tokens`` of it; whole by default): the position's tokens
        left, or its close if none are."""
        self.seen.add(order.order_id)
        sold = order.token_amount if tokens is None else tokens
        price = self.tokens.curves[order.mint].price
        await self.bus.publish(filled(order, price, self.tokens.clock.now(), tokens=sold))
        left = self.left[order.mint] = self.left[order.mint] - sold
        if left > self.held[order.mint].token_amount * 1e-9:
            await self.publish(PositionUpdated(**self._fields(order.mint), token_amount=left,
                                               cost_sol=left * price))  # fmt: skip
        else:
            await self.close(order.mint, "graceful")

    def _fields(self, mint: str) -> dict:
        position = self.held[mint]
        return {"position_id": position.position_id, "mint": mint,
                "entry_price": position.entry_price}  # fmt: skip


async def _shut_down(system, clock: ReplayClock, reason: str) -> None:
    await system.bus.publish(make_event(SystemShutdown(reason=reason), source="test",
                                        time=clock.now()))  # fmt: skip


#: tranches of a 3e7-token position take a small part of it each, spaced
SMALL_TRANCHES = {"exit_max_tranche_impact": 0.002, "exit_min_tranche_interval_s": 5.0}


async def _first_tranche_sold(system, trading: _Trading, watch, reason: str):
    """A position of 3e7 tokens, the graceful exit (``reason``), and its first tranche
    filled: the position and that tranche."""
    held = await trading.hold(trading.tokens.mint(), tokens_held=3e7)
    await _shut_down(system, trading.tokens.clock, reason)
    [order] = await watch.wait_for(1, "exit.order")
    tranche = order.data
    assert tranche.token_amount < held.token_amount / 2
    await trading.fill(tranche)
    return held, tranche


async def test_a_rule_sale_that_fills_short_during_the_exit_leaves_the_rest_to_the_exit():
    """A take-profit step's sale (a quarter) was under way as the exit began, holding
    its tokens back; it fills 40% of its order: the rest is still held and nobody sells
    it but the exit, which does, so the position ends flat within the deadline (it
    stayed held back to the deadline, the position reported left, awaiting a sale that
    had settled)."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    exits = exit_service(records, **ALONE, exit_deadline_s=30.0)
    async with embedded(clock, exits) as (system, watch):
        trading = _Trading(system, tokens, watch)
        mint = tokens.mint()
        position = await trading.hold(mint, tokens_held=1e6)
        while tokens.curves[mint].price < position.entry_price * 1.5:
            await system.bus.publish(tokens.buy(mint, "whale", sol=1.0))
        [rule] = watch.payloads("exit.order")
        assert rule.reason == "take_profit_1" and rule.token_amount == pytest.approx(2.5e5)
        trading.seen.add(rule.order_id)  # answered below, short
        await _shut_down(system, clock, "a rule sale fills short")
        await trading.fill(rule, rule.token_amount * 0.4)
        while not exits.finished.is_set():
            await trading.answer()
            await clock.advance(0.25)
            await asyncio.sleep(0)

        assert trading.left[mint] == pytest.approx(0.0, abs=1e-3)
        tranches = [o for o in watch.payloads("exit.order") if ":exit:" in o.order_id]
        assert sum(o.token_amount for o in tranches) == pytest.approx(9e5)
        summary = exits.summary
        [line] = summary.lines
        assert line.completed and line.pending_tokens == 0.0, line
        assert summary.positions_left == 0 and summary.deadline_margin_s > 0


async def test_a_position_trading_closes_by_other_means_leaves_the_exit_reported_closed():
    """A tranche of the graceful exit fills, then a hand sale closes the rest of the
    position: the exit asks for no more tranches (none would be answered but refused,
    to the deadline), its line says trading closed it and why, and the run ends at once,
    the position not counted left."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    exits = exit_service(records, **ALONE, **SMALL_TRANCHES, exit_order_timeout_s=1.0)
    async with embedded(clock, exits) as (system, watch):
        trading = _Trading(system, tokens, watch)
        held, tranche = await _first_tranche_sold(system, trading, watch, "hand sale")
        # the rest goes by hand
        await trading.close(held.mint, "manual")
        # the clock stands still: the run ends on the close, not on its deadline
        await eventually(exits.finished.is_set, what="the graceful exit finished")

        assert watch.payloads("exit.order") == [tranche]
        summary = exits.summary
        [line] = summary.lines
        assert line.closed == "manual" and line.completed, line
        assert line.tranches == 1 and line.tokens_sold == pytest.approx(tranche.token_amount)
        assert summary.positions_left == 0 and summary.deadline_margin_s > 0
        text = summary.text()
        assert "0 sold out, 1 closed by trading" in text, text
        assert "closed by trading (manual)" in text and "NOT SOLD OUT" not in text
        run = await records.latest_run()
        assert run.summary["positions"][0]["closed"] == "manual"


async def test_a_position_whose_rule_sale_gets_no_outcome_by_the_deadline_is_reported_left():
    """An operator's sale of the whole position was ordered before the shutdown and
    trading never answers it: the graceful exit has nothing of its own to sell, yet the
    position is still held at the deadline. Its line, the run's summary and the text a
    person reads say it is not sold out, its tokens tied up in the sale awaiting an
    outcome, not "sold out" with no tranche."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    exits = exit_service(records, **ALONE, exit_deadline_s=20.0)
    async with embedded(clock, exits) as (system, watch):
        mint = tokens.mint()
        held = 1e6
        await hold(system.bus, tokens, mint, tokens_held=held)
        sale = SaleRequested(mint=mint, reason="by hand")
        await system.bus.publish(make_event(sale, source="test", time=clock.now()))
        [rule] = watch.payloads("exit.order")
        assert ":rule:" in rule.order_id and rule.token_amount == pytest.approx(held)
        shutdown = SystemShutdown(reason="test shutdown")
        await system.bus.publish(make_event(shutdown, source="test", time=clock.now()))
        await until_finished(exits, clock)

        assert watch.payloads("exit.order") == [rule]
        summary = exits.summary
        [line] = summary.lines
        assert not line.completed and line.tranches == 0, line
        assert line.pending_tokens == pytest.approx(held)
        assert summary.positions_left == 1 and summary.awaiting == (line,)
        text = summary.text()
        assert "1 position, 0 sold out" in text and "NOT SOLD OUT" in text, text
        assert "AWAITING: rule sales of 1 position got no outcome" in text, text
        run = await records.latest_run()
        assert run.summary["positions_left"] == 1
        assert run.summary["positions"][0]["pending_tokens"] == pytest.approx(held)


async def test_positions_opened_after_a_finished_graceful_exit_and_a_resume_get_their_rules():
    """A graceful exit over, the operator resumes trading: what it buys then is sold by
    the rules again (the exit's halt of the rules ends with the run)."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    ledger, records = MemoryLedger(), MemoryExitStore()
    trader, exits = trading(ledger), exit_service(records, exit_max_hold_s=60.0)
    async with embedded(clock, trader, exits) as (system, watch):
        await _opened(system, clock, tokens, watch, 1)
        shutdown = SystemShutdown(reason="test shutdown")
        await system.bus.publish(make_event(shutdown, source="test", time=clock.now()))
        await until_finished(exits, clock)
        assert trader.book.open_count == 0

        ended = exits.progress()["progress"]
        assert ended["done"] and ended["deadline_margin_s"] > 0
        await clock.advance(20.0)  # less than trading's silence breaker
        # as it ended: its deadline margin does not run on past it
        assert exits.progress()["progress"] == ended and exits.manager is None

        await trader.resume("after the exit")
        [opened] = await _opened(system, clock, tokens, watch, 1)
        assert exits.progress()["accepting_entries"]
        await advancing(
            clock,
            lambda: any(o.position_id == opened.data.position_id and ":rule:" in o.order_id
                        for o in watch.payloads("exit.order")),
            what="the new position's max-hold sale",
        )  # fmt: skip
        await advancing(clock, lambda: trader.book.open_count == 0, what="the position sold")


class _LinesOut(PostgresExitStore):
    """The exit's records in Postgres, refusing to close a position of the run (its
    line) while ``down``."""

    def __init__(self, pool) -> None:
        super().__init__(pool)
        self.down = False
        #: tries to store a line while down
        self.refused = 0

    async def update_run(self, run_id, *, lines=(), **changes):
        lines = list(lines)
        if self.down and lines:
            self.refused += 1
            raise Outage("the records' database is restarting")
        return await super().update_run(run_id, lines=lines, **changes)


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.postgres
async def test_a_kill_before_a_position_closed_by_trading_reached_the_run_still_reports_it_closed(
    rabbitmq_harness, redis_url, namespace, pg_pool
):
    """A tranche of the graceful exit fills, then a hand sale closes the rest; the
    replica applies the close (its state written, the event acked) but dies before the
    position's line reaches the run's records. The resumed replica holds the position
    no more: it reports it closed by trading, with the tranche sold, not as left unsold."""
    from pumpflow.common.state.redis import RedisStateStore

    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = _LinesOut(pg_pool)
    store = RedisStateStore(url=redis_url, namespace=namespace)
    settings = {
        "partitions": PARTITIONS,
        "exit_resume_wait_s": 5.0,
        "exit_max_tranche_impact": 0.002,
        "exit_min_tranche_interval_s": 5.0,
        # no trading here to answer the shutdown with its barrier
        "exit_barrier_wait_s": 0.0,
        "exit_run_poll_s": 0.02,
    }
    bus = await rabbitmq_harness.bus(partitions=PARTITIONS, source="trading/test")
    watch = await EventCollector("watch").attach(bus, "exit.*")

    replica = functools.partial(
        on_broker, rabbitmq_harness, clock=clock, store=store, partitions=PARTITIONS
    )

    async def trading(payload) -> None:
        await bus.publish(make_event(payload, source="trading/test", time=clock.now()))

    first = exit_service(records, **settings)
    first_bus = await replica(first)
    second = None
    try:
        mint = tokens.mint()
        await bus.publish(tokens.created(mint, sol=5.0))
        await bus.publish(tokens.buy(mint, "whale", sol=10.0))
        position = opened(tokens, mint, tokens_held=3e7)
        held = position.data
        await bus.publish(position)
        await eventually(lambda: len(first.positions()) == 1, what="the position held")
        await trading(SystemShutdown(reason="hand sale"))
        [first_order] = await watch.wait_for(1, "exit.order", within=30)
        tranche = first_order.data
        price = tokens.curves[mint].price
        await trading(
            OrderFilled(
                order_id=tranche.order_id, mint=mint, side="sell",
                token_amount=tranche.token_amount, sol_amount=tranche.token_amount * price,
                price=price, position_id=held.position_id,
            )
        )  # fmt: skip
        left = held.token_amount - tranche.token_amount
        fields = {"position_id": held.position_id, "mint": mint, "entry_price": held.entry_price}
        await trading(PositionUpdated(**fields, token_amount=left, cost_sol=left * price))
        records.down = True
        await trading(PositionClosed(**fields, token_amount=0.0, cost_sol=0.0, reason="manual"))
        # the close applied and written; its line tried, not stored
        await eventually(lambda: records.refused >= 1, what="the position's line tried")
        await first.consumer.flush()
        assert first.consumer.state(mint).position is None

        # the replica dies: nothing more of it runs
        await kill(first, first_bus)
        records.down = False
        second = exit_service(records, **settings)
        await replica(second)
        await advancing(clock, second.finished.is_set, what="the resumed exit finished")

        assert watch.payloads("exit.order") == [tranche]
        summary = second.summary
        [line] = summary.lines
        assert line.closed == "manual" and line.completed, line
        assert line.tranches == 1 and line.tokens_sold == pytest.approx(tranche.token_amount)
        assert summary.positions_left == 0
        assert "1 closed by trading" in summary.text() and "NOT SOLD OUT" not in summary.text()
        run = await records.latest_run()
        assert run.summary["positions"][0]["closed"] == "manual"
    finally:
        if second is not None:
            await second.stop()
        await store.close()


class _SlowPartition(MemoryStateStore):
    """Keys whose partition index ``held`` is read only once let ``through``: that
    partition's keys load last, as a store under load has them."""

    def __init__(self, clock: ReplayClock):
        super().__init__(clock)
        self.held: str | None = None
        self.through = asyncio.Event()

    async def hgetall(self, key: str) -> dict[str, bytes]:
        if key == self.held:
            await self.through.wait()
        return await super().hgetall(key)


async def test_a_partition_still_loading_as_a_share_resumes_keeps_its_position_in_the_run():
    """Partitions come to a replica in the middle of a run with another owner's tranches
    stored: the share it resumes as one has its keys loaded does not close, unsold, the
    exit of a position whose partition is still loading; that position is sold once it
    has loaded, and only then is the run over."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records, keys = MemoryExitStore(), _SlowPartition(clock)
    exits = exit_service(
        records,
        exit_min_tranche_interval_s=20.0,
        exit_max_tranche_impact=0.005,
        exit_deadline_s=600.0,
        exit_run_poll_s=0.02,
        exit_resume_wait_s=0.2,
    )
    async with embedded(clock, exits, store=keys) as (system, watch):
        partitions = system.bus.partitions
        # one position that stays, one on each partition that comes back: kept, slow
        mints: dict[int, str] = {}
        while len(mints) < 3:
            mint = tokens.mint()
            mints.setdefault(partition_of(mint, partitions), mint)
        [(_, small), (kept, first), (slow, last)] = list(mints.items())
        held = {small: 1e5, first: 1e7, last: 1e7}
        positions = {}
        for mint, amount in held.items():
            await system.bus.publish(tokens.created(mint, sol=5.0))
            await system.bus.publish(tokens.buy(mint, "whale", sol=10.0))
            position = opened(tokens, mint, tokens_held=amount)
            positions[mint] = position.data.position_id
            await system.bus.publish(position)
        assert len(exits.positions()) == 3
        answered: set[str] = set()

        async def answer() -> None:
            for order in watch.payloads("exit.order"):
                if order.order_id not in answered:
                    answered.add(order.order_id)
                    price = tokens.curves[order.mint].price
                    await system.bus.publish(filled(order, price, clock.now()))

        async def step() -> None:
            """Answer the tranches asked; move the clock on once the exit has their
            outcomes (the next tranche is spaced from the fill's time, not the test's)."""
            await answer()
            progress = exits.exit_progress()
            if progress is None or progress.in_flight == 0:
                await clock.advance(5.0)

        shutdown = SystemShutdown(reason="partitions move")
        await system.bus.publish(make_event(shutdown, source="test", time=clock.now()))

        async def first_tranches() -> bool:
            await answer()
            return {o.mint for o in watch.payloads("exit.order")} == set(held)

        await eventually(first_tranches, 10, what="a first tranche of each position")
        await answer()
        run = await records.active_run()
        # another owner took the two partitions for a while: its tranches are stored
        await exits.consumer.revoke((kept, slow))

        async def share_over() -> bool:
            return exits.manager is not None and exits.manager.summary is not None

        await eventually(share_over, 10, what="the share of the partition that stayed")
        assert records.run_positions[run.run_id][positions[small]][0] == "exited"
        # both come back; the second's keys load last
        keys.held = f"exit:partition:{slow}"
        await exits.consumer.assign((kept,))
        loading = asyncio.create_task(exits.consumer.assign((slow,)))

        async def kept_sold() -> bool:
            await step()
            state = records.run_positions[run.run_id][positions[first]][0]
            return state != "open"

        await eventually(kept_sold, 20, what="the kept partition's position sold")
        assert records.run_positions[run.run_id][positions[first]][0] == "exited"
        stored = await records.get_run(run.run_id)
        assert stored.finished_at is None, stored.summary
        assert records.run_positions[run.run_id][positions[last]][0] == "open"
        keys.through.set()
        await loading

        async def finished() -> bool:
            await step()
            return (await records.get_run(run.run_id)).finished_at is not None

        await eventually(finished, 20, what="the run finished")
        summary = (await records.get_run(run.run_id)).summary
        assert summary["positions_left"] == 0, summary
        assert {line["position_id"] for line in summary["positions"]} == set(positions.values())
        assert all(line["completed"] for line in summary["positions"]), summary
        assert summary["finished_at"] < run.deadline - 300.0, "sold by the deadline's sweep"


async def test_a_close_while_a_resumed_replica_waits_to_sell_ends_its_position_closed():
    """A replica resumes the graceful exit and waits for the outcome of a tranche sent
    before; meanwhile trading closes a position that had no tranche yet. The close is
    the run's: once the replica sells, the position ends closed by trading, and the run
    ends then, not at its deadline with that position's row still open."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    settings = {**ALONE, "exit_resume_wait_s": 30.0}
    first = exit_service(records, **settings)
    async with embedded(clock, first) as (system, watch):
        trading = _Trading(system, tokens, watch)
        sold = await trading.hold(tokens.mint())
        # no curve: no tranche before the final sweep
        quiet = await trading.hold(tokens.mint(), curve=False)
        await _shut_down(system, clock, "close while resuming")
        [tranche] = await watch.wait_for(1, "exit.order")
        assert tranche.data.mint == sold.mint
        await first.stop()

        second = await started(system, records, **settings)
        try:
            await trading.close(quiet.mint, "manual")
            await second.consumer.flush()
            assert second.manager is None, "the share began before the tranche's outcome"
            await trading.answer()
            # the clock stands still: the run ends on the close, not on its deadline
            await eventually(second.finished.is_set, 10, what="the resumed exit finished")
            summary = second.summary
            lines = {line.position_id: line for line in summary.lines}
            line = lines[quiet.position_id]
            assert line.closed == "manual" and line.completed and line.tranches == 0, line
            assert lines[sold.position_id].completed and not lines[sold.position_id].closed
            assert summary.positions_left == 0 and clock.now() == START
        finally:
            await second.stop()


async def test_a_position_closed_while_the_replica_was_down_is_reported_closed_by_trading():
    """A tranche of the graceful exit fills; the replica goes, and while it is down a
    hand sale closes the rest of the position. The resumed replica applies the close
    before it sells: its report says the position was closed by trading (and why), with
    the tranche sold, not that it ended unsold."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    settings = {**ALONE, **SMALL_TRANCHES}
    first = exit_service(records, **settings)
    async with embedded(clock, first) as (system, watch):
        trading = _Trading(system, tokens, watch)
        held, tranche = await _first_tranche_sold(system, trading, watch, "hand sale while down")
        run = await records.active_run()

        async def fill_stored() -> bool:
            return [o.state for o in await records.run_orders(run.run_id)] == ["filled"]

        await eventually(fill_stored, what="the tranche's fill stored")
        await first.stop()
        await trading.close(held.mint, "manual")

        second = await started(system, records, **settings)
        try:
            await eventually(second.finished.is_set, 10, what="the resumed exit finished")
            assert watch.payloads("exit.order") == [tranche]
            summary = second.summary
            [line] = summary.lines
            assert line.closed == "manual" and line.completed, line
            assert line.tranches == 1 and line.tokens_sold == pytest.approx(tranche.token_amount)
            text = summary.text()
            assert "closed by trading (manual)" in text and "NOT SOLD OUT" not in text, text
            assert (await records.get_run(run.run_id)).summary["positions"][0]["closed"] == "manual"
        finally:
            await second.stop()


#: a share that goes on: a big position sold in many tranches, far apart
LONG_SHARE = {
    **ALONE,
    "exit_min_tranche_interval_s": 20.0,
    "exit_max_tranche_impact": 0.005,
    "exit_deadline_s": 600.0,
}


async def _share_without_a_partition(system, exits, trading: _Trading, watch, *, moving_held):
    """A position on a partition another replica owns as the graceful exit begins, and
    this replica's share going on with a big position elsewhere (its first tranche
    filled): the run, the moving position and its partition."""
    tokens = trading.tokens
    partitions = system.bus.partitions
    stays = tokens.mint()
    moving = tokens.mint()
    while partition_of(moving, partitions) == partition_of(stays, partitions):
        moving = tokens.mint()
    moved = partition_of(moving, partitions)
    await trading.hold(stays, tokens_held=1e7)
    position = await trading.hold(moving, tokens_held=moving_held)
    await exits.consumer.revoke((moved,))
    await _shut_down(system, tokens.clock, "partition taken over")
    [first] = await watch.wait_for(1, "exit.order")
    assert first.data.mint == stays
    await trading.answer()
    return await exits.records.active_run(), position, moved


def _sent_by_the_old_owner(run, position: PositionOpened, number: int, tokens: float):
    """The record of the old owner's tranche ``number`` of ``position``, sent now."""
    return ExitOrderRecord(
        order_id=f"{position.position_id}:exit:{number}", mint=position.mint,
        position_id=position.position_id, rule="graceful", number=number, token_amount=tokens,
        sent_at=run.started_at, tokens_at_start=position.token_amount,
        started_at=run.started_at, run_id=run.run_id,
    )  # fmt: skip


async def test_a_partition_taken_up_in_the_middle_of_a_share_numbers_on_from_its_tranches():
    """A partition comes to a replica while its share is still selling; its old owner
    sent tranches of the partition's position since that share began. The position is
    taken up numbering on from them: its next tranche is not one whose order id trading
    has seen (and drops), and it is sold, not left waiting to the deadline."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    exits = exit_service(records, **LONG_SHARE, exit_order_timeout_s=1.0)
    async with embedded(clock, exits) as (system, watch):
        trading = _Trading(system, tokens, watch)
        run, position, moved = await _share_without_a_partition(
            system, exits, trading, watch, moving_held=1e5
        )
        # since then the other owner sent two tranches of its position, both refused
        for number in (1, 2):
            sent = _sent_by_the_old_owner(run, position, number, position.token_amount)
            refused = OrderRejected(order_id=sent.order_id, mint=position.mint,
                                    reason="slippage", side="sell",
                                    position_id=position.position_id)  # fmt: skip
            await records.record_order(sent.settled(refused, clock.now()))
            trading.seen.add(sent.order_id)
        share = exits.manager
        await exits.consumer.assign((moved,))

        async def moving_sold() -> bool:
            await trading.answer()
            listed = records.run_positions[run.run_id].get(position.position_id)
            return listed is not None and listed[0] == "exited"

        # the clock stands still: sold by its own tranche, not by the deadline's sweep
        await eventually(moving_sold, 10, what="the position taken up sold")
        assert exits.manager is share and share.summary is None, "taken up by a new share"
        asked = [o.order_id for o in watch.payloads("exit.order") if o.mint == position.mint]
        assert asked == [f"{position.position_id}:exit:3"], asked


class _Slow(MemoryExitStore):
    """Records whose reads of a run's tranches, and stores of their outcomes, wait while
    their gate is shut (a database under load)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads, self.settles = asyncio.Event(), asyncio.Event()
        self.reads.set()
        self.settles.set()
        #: a read waits at the gate
        self.reading = asyncio.Event()

    async def run_orders(self, run_id):
        if not self.reads.is_set():
            self.reading.set()
            await self.reads.wait()
        return await super().run_orders(run_id)

    async def settle(self, order_id, outcome, time):
        await self.settles.wait()
        return await super().settle(order_id, outcome, time)


async def test_a_fill_applied_and_not_stored_as_its_position_is_taken_up_counts_once():
    """The old owner's tranche fills as its partition comes here: the fill and the
    position's tokens left are applied when the take-up reads the stored tranches, and
    the fill is stored after. The take-up counts it once, not as a tranche without an
    outcome whose late fill comes off what is left again: the position is sold out,
    with no tokens left held unsold."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = _Slow()
    exits = exit_service(records, **LONG_SHARE)
    async with embedded(clock, exits) as (system, watch):
        trading = _Trading(system, tokens, watch)
        run, position, moved = await _share_without_a_partition(
            system, exits, trading, watch, moving_held=3e6
        )
        sent = _sent_by_the_old_owner(run, position, 1, position.token_amount / 3)
        await records.record_order(sent)
        records.reads.clear()
        await exits.consumer.assign((moved,))
        await eventually(records.reading.is_set, 10, what="the take-up reading the tranches")
        records.settles.clear()
        order = ExitOrder(order_id=sent.order_id, mint=position.mint,
                          position_id=position.position_id, token_amount=sent.token_amount,
                          slippage_pct=10.0, reason="graceful", deadline=run.deadline)  # fmt: skip
        # published on their own: the synchronous bus's publish waits for the store
        filling = asyncio.create_task(trading.fill(order))
        left = position.token_amount - sent.token_amount

        def applied() -> bool:
            state = exits.consumer.state(position.mint)
            return state.position.tokens == pytest.approx(left)

        await eventually(applied, 10, what="the fill and the tokens left applied")
        records.reads.set()
        await eventually(lambda: position.mint in exits.manager.planner.exits, 10,
                         what="the position taken up")  # fmt: skip
        records.settles.set()
        await filling

        async def moving_over() -> bool:
            await trading.answer()
            progress = exits.exit_progress()
            if progress is not None and progress.in_flight == 0:
                await clock.advance(5.0)
            listed = records.run_positions[run.run_id].get(position.position_id)
            return listed is not None and listed[0] != "open"

        await eventually(moving_over, 20, what="the position taken up over")
        sold = [f.token_amount for f in watch.payloads("order.filled") if f.mint == position.mint]
        assert sum(sold) == pytest.approx(position.token_amount, rel=1e-9), sold
        assert records.run_positions[run.run_id][position.position_id][0] == "exited"
        record = exits.manager.records[position.mint]
        assert record.sold_out and not record.unconfirmed and len(record.fills) == len(sold)


async def test_a_tranche_without_an_outcome_is_not_asked_again_on_every_share():
    """A resumed replica asks again for a tranche stored and still without an outcome
    (it may never have been sent); positions that come late each start a share of
    their own, and none of them asks for it again within the order timeout (trading
    drops the copies)."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    # the barrier never comes: the run stays open for the late positions
    settings = {"exit_run_poll_s": 0.02, "exit_resume_wait_s": 0.05, "exit_barrier_wait_s": 600.0}
    first = exit_service(records, **settings)
    async with embedded(clock, first) as (system, watch):
        trading = _Trading(system, tokens, watch)
        lost = await trading.hold(tokens.mint())
        await _shut_down(system, clock, "an outcome lost")
        [tranche] = await watch.wait_for(1, "exit.order")
        trading.lost.add(tranche.data.order_id)
        run = await records.active_run()
        await first.stop()
        await trading.close(lost.mint, "manual")

        second = await started(system, records, **settings)
        try:
            await eventually(lambda: trading.orders(tranche.data.order_id) == 2,
                             10, what="the tranche asked again once resumed")  # fmt: skip
            for _ in range(3):
                late = await trading.hold(tokens.mint())

                async def sold(late=late) -> bool:
                    await trading.answer()
                    listed = records.run_positions[run.run_id].get(late.position_id)
                    return listed is not None and listed[0] == "exited"

                await eventually(sold, 10, what="a late position sold")
                await eventually(lambda: second.manager.summary is not None, 10,
                                 what="its share over")  # fmt: skip
            assert trading.orders(tranche.data.order_id) == 2
        finally:
            await second.stop()


async def test_a_later_position_on_a_mint_whose_exit_is_over_is_sold_too():
    """The graceful exit sells a position out; then trading opens another on the same
    mint (an entry in flight as the run began fills). That one is sold by its own
    tranches too, not left to the deadline, and the run reports a line of each."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    # the barrier comes only at the end: the run stays open for the later position
    settings = {"exit_run_poll_s": 0.02, "exit_barrier_wait_s": 600.0}
    exits = exit_service(records, **settings)
    async with embedded(clock, exits) as (system, watch):
        trading = _Trading(system, tokens, watch)
        mint = tokens.mint()
        first = await trading.hold(mint)
        await _shut_down(system, clock, "a later position")
        run = await eventually(records.active_run, what="the graceful exit begun")

        async def exited(position: PositionOpened) -> bool:
            await trading.answer()
            listed = records.run_positions[run.run_id].get(position.position_id)
            return listed is not None and listed[0] == "exited"

        await eventually(functools.partial(exited, first), 10, what="the first position sold")
        # the exit has the token's curve already
        later = await trading.hold(mint, curve=False)
        await eventually(functools.partial(exited, later), 10, what="the later position sold")
        await trading.publish(ShutdownBarrier(reason="a later position"))
        await eventually(exits.finished.is_set, 10, what="the graceful exit finished")

        asked = [o for o in watch.payloads("exit.order") if o.position_id == later.position_id]
        assert asked and all(o.reason == "graceful" for o in asked), asked
        summary = exits.summary
        lines = {line.position_id: line for line in summary.lines}
        assert set(lines) == {first.position_id, later.position_id}
        assert lines[later.position_id].tokens_sold == pytest.approx(later.token_amount)
        assert lines[first.position_id].tokens_sold == pytest.approx(first.token_amount)
        assert all(line.completed for line in lines.values())
        assert summary.positions_left == 0 and clock.now() == START


async def test_a_close_from_before_the_shutdown_applied_in_the_run_is_not_counted_in_it():
    """Trading closed a position before the shutdown; the exit's consumer, behind,
    applies the close only once the run has queued the position. The position was never
    the run's: it leaves the run with no line (not one closed by trading in it), and
    the run ends on the others."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    exits = exit_service(records, **ALONE)
    async with embedded(clock, exits) as (system, watch):
        trading = _Trading(system, tokens, watch)
        sold = await trading.hold(tokens.mint())
        # no curve: no tranche before the final sweep
        gone = await trading.hold(tokens.mint(), curve=False)
        closed_at = clock.now()
        await clock.advance(1.0)
        await _shut_down(system, clock, "a close from before")
        [tranche] = await watch.wait_for(1, "exit.order")
        assert tranche.data.mint == sold.mint
        run = await records.active_run()
        assert gone.position_id in records.run_positions[run.run_id], "not queued in the run"
        close = PositionClosed(position_id=gone.position_id, mint=gone.mint,
                               entry_price=gone.entry_price, token_amount=0.0, cost_sol=0.0,
                               reason="manual")  # fmt: skip
        await system.bus.publish(make_event(close, source="trading/test", time=closed_at))
        await trading.answer()
        # the clock stands still: the run ends on the close, not on its deadline
        await eventually(exits.finished.is_set, 10, what="the graceful exit finished")

        summary = exits.summary
        assert [line.position_id for line in summary.lines] == [sold.position_id]
        assert summary.positions == 1 and summary.positions_left == 0
        assert "closed by trading" not in summary.text()
        assert records.run_positions[run.run_id][gone.position_id][0] == "withdrawn"
        assert clock.now() == START + 1.0


async def test_a_close_from_before_the_shutdown_applied_as_a_resumed_replica_waits_is_withdrawn():
    """A replica resumes the graceful exit and waits for a tranche's outcome; meanwhile
    its consumer applies a close trading made before the shutdown. Stored with the run,
    the close is taken up as what it is: the position was never the run's (no line),
    and the run ends on the other."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    settings = {**ALONE, "exit_resume_wait_s": 30.0}
    first = exit_service(records, **settings)
    async with embedded(clock, first) as (system, watch):
        trading = _Trading(system, tokens, watch)
        sold = await trading.hold(tokens.mint())
        gone = await trading.hold(tokens.mint(), curve=False)
        closed_at = clock.now()
        await clock.advance(1.0)
        await _shut_down(system, clock, "a close from before, resumed")
        [tranche] = await watch.wait_for(1, "exit.order")
        assert tranche.data.mint == sold.mint
        run = await records.active_run()
        await first.stop()

        second = await started(system, records, **settings)
        try:
            close = PositionClosed(position_id=gone.position_id, mint=gone.mint,
                                   entry_price=gone.entry_price, token_amount=0.0,
                                   cost_sol=0.0, reason="manual")  # fmt: skip
            await system.bus.publish(make_event(close, source="trading/test", time=closed_at))
            await second.consumer.flush()
            assert second.manager is None, "the share began before the tranche's outcome"
            await trading.answer()
            await eventually(second.finished.is_set, 10, what="the resumed exit finished")
            summary = second.summary
            assert [line.position_id for line in summary.lines] == [sold.position_id]
            assert summary.positions_left == 0 and "closed by trading" not in summary.text()
            assert records.run_positions[run.run_id][gone.position_id][0] == "withdrawn"
        finally:
            await second.stop()


def _in_the_run(watch: EventCollector) -> list[ExitOrder]:
    """The graceful exit's orders: those ``watch`` got before its summary. The rules order
    again the moment it is over (a timer due as it ends may fire just after, in the same
    step of the clock), before a test that waited for the end looks."""
    orders = []
    for event in watch.events:
        if isinstance(event.data, ExitReport) and event.data.graceful:
            return orders
        if isinstance(event.data, ExitOrder):
            orders.append(event.data)
    raise AssertionError("no summary of the graceful exit")


async def test_a_position_the_run_left_unsold_on_a_silent_token_gets_its_rules_again():
    """The token's silence came due while the graceful exit sold (the rules decided
    nothing then) and the run ended at its deadline with the position unsold, its
    tranches unanswered: with no event of the token to come, the rules' timers sell it
    once the run is over (cancelled during the run, none was set again: held for good)."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    exits = exit_service(
        records, exit_deadline_s=20.0, exit_order_timeout_s=0.5, exit_run_poll_s=0.02
    )
    async with embedded(clock, exits) as (system, watch):
        mint = tokens.mint()
        position = await hold(system.bus, tokens, mint, tokens_held=1e6)
        await clock.advance(50.0)
        shutdown = SystemShutdown(reason="test shutdown")
        await system.bus.publish(make_event(shutdown, source="test", time=clock.now()))
        await until_finished(exits, clock)
        assert exits.summary.positions_left == 1
        assert not any(":rule:" in o.order_id for o in _in_the_run(watch))
        await advancing(
            clock,
            lambda: any(o.position_id == position.position_id and ":rule:" in o.order_id
                        for o in watch.payloads("exit.order")),
            what="the rules' sale of the position left",
            step=5.0,
        )  # fmt: skip


class _SettleReplyLost(MemoryExitStore):
    """Records that store the first outcome settled and lose the reply (the database
    restarting as the commit returns, say): its retry finds it settled."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = 1

    async def settle(self, order_id, outcome, time):
        settled = await super().settle(order_id, outcome, time)
        if settled and self.lost:
            self.lost -= 1
            raise Outage("the records' database restarted before it answered")
        return settled


async def test_a_late_fill_whose_store_lost_its_reply_counts_in_the_exit():
    """The retry of the store finds the fill settled by the lost one: it is applied all
    the same (it was counted nowhere), not taken for a copy."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = _SettleReplyLost()
    # every tranche outlives its wait: each fill is a late outcome
    trader = trading(MemoryLedger())
    exits = exit_service(records, exit_order_timeout_s=1e-6)
    async with embedded(clock, trader, exits) as (system, watch):
        await _opened(system, clock, tokens, watch, 2)
        shutdown = SystemShutdown(reason="late fill, reply lost")
        await system.bus.publish(make_event(shutdown, source="test", time=clock.now()))
        await until_finished(exits, clock)

        assert records.lost == 0
        sells = [f for f in watch.payloads("order.filled") if f.side == "sell"]
        summary = exits.summary
        assert [line.unconfirmed_tokens for line in summary.lines] == [0.0, 0.0]
        assert [line.tokens_sold > 0 for line in summary.lines] == [True, True]
        assert summary.sol_recovered == pytest.approx(sum(f.sol_amount for f in sells))


class _FinishReplyLost(MemoryExitStore):
    """Records that finish the run and lose the reply of the change that did (the
    database restarting as the commit returns, say): its retry finds the run finished."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = 1

    async def update_run(self, run_id, **changes):
        finished = await super().update_run(run_id, **changes)
        if finished is not None and self.lost:
            self.lost -= 1
            raise Outage("the records' database restarted before it answered")
        return finished


async def test_the_summary_of_a_run_whose_finishing_change_lost_its_reply_is_published():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = _FinishReplyLost()
    trader, exits = trading(MemoryLedger()), exit_service(records)
    async with embedded(clock, trader, exits) as (system, watch):
        await open_positions(system.bus, clock, tokens, 2)
        shutdown = SystemShutdown(reason="finish, reply lost")
        await system.bus.publish(make_event(shutdown, source="test", time=clock.now()))
        await until_finished(exits, clock)

        assert records.lost == 0
        assert exits.summary.positions == 2 and exits.summary.positions_left == 0
        [graceful] = [r for r in watch.payloads("exit.report") if r.graceful]
        assert graceful.positions_left == 0


class _TrancheStoreOut(MemoryExitStore):
    """Records whose database is out as the first tranche is stored (a restart, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def record_order(self, order):
        if order.state == "sent" and self.failures:
            self.failures -= 1
            raise Outage("the records' database is restarting")
        return await super().record_order(order)


async def test_an_outage_of_the_records_as_a_tranche_is_stored_is_waited_out():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = _TrancheStoreOut()
    trader, exits = trading(MemoryLedger()), exit_service(records)
    async with embedded(clock, trader, exits) as (system, watch):
        await open_positions(system.bus, clock, tokens, 2)
        shutdown = SystemShutdown(reason="records out as a tranche is stored")
        await system.bus.publish(make_event(shutdown, source="test", time=clock.now()))
        await until_finished(exits, clock)

        assert records.failures == 0
        assert trader.book.open_count == 0
        assert exits.summary is not None and exits.summary.positions_left == 0
        [graceful] = [r for r in watch.payloads("exit.report") if r.graceful]
        assert graceful.positions_left == 0


async def test_tranches_of_a_token_that_migrates_during_the_exit_are_sized_on_its_pool():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    exits = exit_service(records)
    limit = exits.settings.graceful().max_tranche_impact
    async with embedded(clock, exits) as (system, watch):
        bus, trade = system.bus, as_trading(system.bus, clock)
        mint = tokens.mint()
        await hold(bus, tokens, mint, tokens_held=20e6)
        shutdown = SystemShutdown(reason="migration")
        await bus.publish(make_event(shutdown, source="test", time=clock.now()))
        [first] = await watch.wait_for(1, "exit.order")
        # the curve completes, the first tranche fills on it, and the token migrates
        await bus.publish(tokens.buy(mint, "whale", sol=200.0))
        assert tokens.curves[mint].complete
        await trade(filled(first.data, tokens.curves[mint].price, clock.now(), venue="pump").data)
        await bus.publish(tokens.migrated(mint))

        pool, answered = MIGRATION_POOL, {first.data.order_id}
        while not exits.finished.is_set():
            for order in watch.payloads("exit.order"):
                if order.order_id in answered:
                    continue
                answered.add(order.order_id)
                # each tranche on the pool moves its price by at most the limit
                assert order.token_amount <= sell_for_impact(pool, limit) * (1 + 1e-9)
                quote = quote_sell(pool, order.token_amount)
                pool = quote.after
                fill = filled(order, quote.average_price, clock.now(), venue="pump-amm")
                await trade(fill.data)
            await clock.advance(0.25)
            await asyncio.sleep(0)
        [line] = exits.summary.lines
        assert line.completed and line.tranches == len(answered) > 2


def _tranche_size(pool: CurveState, free: float, limit: float) -> float:
    """The plan's tranche of ``free`` tokens on ``pool``: equal parts under the impact
    ``limit``."""
    cap = sell_for_impact(pool, limit)
    return free if free <= cap else free / math.ceil(free / cap)


async def test_tranches_of_a_migrated_token_are_sized_and_priced_on_its_pool_as_it_moved():
    """The token migrated with the position held (its migration's sale is under way as the
    exit begins) and buys on its pool took 40% of the pool's tokens. The migration's sale
    is refused, so the exit sells the position: its first tranche is sized on the pool
    the buys left, not on the one the migration left, and its report's mark is that
    pool's spot; each tranche after it is sized on the pool as the market's trades and
    the exit's own tranches moved it."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    exits = exit_service(MemoryExitStore())
    limit = exits.settings.graceful().max_tranche_impact
    held = 20e6
    async with embedded(clock, exits) as (system, watch):
        bus, trade = system.bus, as_trading(system.bus, clock)
        mint = tokens.mint()
        await hold(bus, tokens, mint, tokens_held=held)
        await bus.publish(tokens.migrated(mint))
        [migration] = await watch.wait_for(1, "exit.order")
        assert migration.data.reason == "migration"
        pool = MIGRATION_POOL
        for sol in (30.0, 20.0, 10.0):
            bought = sol * pool.v_tokens / (pool.v_sol + sol)
            await bus.publish(tokens.buy(mint, "bob", sol=sol, pool="pump-amm",
                                         tokenAmount=bought, solAmount=sol))  # fmt: skip
            pool = pool_after_trade(pool, "buy", sol, bought)
        assert pool.v_tokens < MIGRATION_POOL.v_tokens * 0.6
        assert _tranche_size(pool, held, limit) != _tranche_size(MIGRATION_POOL, held, limit)
        shutdown = SystemShutdown(reason="migrated")
        await bus.publish(make_event(shutdown, source="test", time=clock.now()))
        await exits.began.wait()
        refused = OrderRejected(
            order_id=migration.data.order_id, mint=mint, reason="slippage", side="sell",
            position_id=migration.data.position_id,
        )  # fmt: skip
        await trade(refused)

        start_price, sold, answered = pool.price, 0.0, {migration.data.order_id}
        while not exits.finished.is_set():
            for order in watch.payloads("exit.order"):
                if order.order_id in answered:
                    continue
                answered.add(order.order_id)
                assert order.reason == "graceful", order
                expected = _tranche_size(pool, held - sold, limit)
                assert order.token_amount == pytest.approx(expected, rel=1e-9)
                quote = quote_sell(pool, order.token_amount)
                fill = filled(order, quote.average_price, clock.now(), venue="pump-amm")
                await trade(fill.data)
                sold += fill.data.token_amount
                moved = fill.data.price * fill.data.token_amount
                pool = pool_after_trade(pool, "sell", moved, fill.data.token_amount)
                # the market trades between two tranches
                await bus.publish(tokens.buy(mint, "carol", sol=1.0, pool="pump-amm",
                                             tokenAmount=1e5, solAmount=1.0))  # fmt: skip
                pool = pool_after_trade(pool, "buy", 1.0, 1e5)
            await clock.advance(0.25)
            await asyncio.sleep(0)
        [line] = exits.summary.lines
        assert line.completed and line.tranches == len(answered) - 1 > 2
        assert line.mark_price == pytest.approx(start_price)
