"""The trading service embedded on the in-memory bus and a replay clock: paper entries
filled after their latency, the ledger, the kill switch, a restart that reloads the book
and reconciles the order in flight without sending anything twice."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import replace

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.abc import EventBus
from pumpflow.common.bus.dispatch import Dispatcher
from pumpflow.common.bus.eventlog import EventLog
from pumpflow.common.bus.redrive import redrive
from pumpflow.common.events import Event, ExitOrder, FeaturesUpdated, SystemShutdown, make_event
from pumpflow.common.lease import LEASE_PREFIX
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.runtime.settings import SettingsError
from pumpflow.common.state import MemoryStateStore, StateStore
from pumpflow.common.state.redis import RedisStateStore
from pumpflow.common.testing import EventCollector, eventually
from pumpflow.common.trading import (
    MIGRATION_POOL,
    SERVICE_CONSUMES,
    VENUE_POOL,
    EntryFilters,
    RiskLimits,
    TradingState,
)
from pumpflow.common.trading.decisions import retaken_id
from pumpflow.trading.context import TokenContext
from pumpflow.trading.ledger import (
    Committed,
    KeyedEvent,
    LedgerChange,
    MemoryLedger,
    OrderRecord,
    PostgresLedger,
    Predecessor,
)
from pumpflow.trading.service import LEASE_NAME, TradingService
from pumpflow.trading.settings import TradingSettings

from .conftest import Market


def trading(
    ledger: MemoryLedger, *, registry: CollectorRegistry | None = None, **settings: object
) -> TradingService:
    config = TradingSettings.load(service="trading", transport="memory", **settings)
    registry = CollectorRegistry() if registry is None else registry
    return TradingService(config, registry=registry, ledger=ledger)


@contextlib.asynccontextmanager
async def running(clock, service: TradingService, *, store: StateStore | None = None):
    async with run_embedded([service], clock=clock, synchronous=True, store=store) as system:
        watch = await EventCollector("watch").attach(
            system.bus, "order.*", "position.*", "trading.*"
        )
        yield system.bus, watch


async def publish(bus: EventBus, *events: Event) -> None:
    for event in events:
        await bus.publish(event)


async def ready(bus: EventBus, market: Market, mint: str | None = None) -> str:
    """A token trading would enter on a prediction (see conftest's ``Market.ready``)."""
    mint = mint or market.tokens.mint()
    await publish(
        bus,
        market.tokens.created(mint, sol=0.5, name="Good Coin", symbol="GOOD", trader="dev"),
        market.tokens.buy(mint, "alice", sol=3.0),
        market.features(mint),
        market.lifecycle(mint),
    )
    return mint


async def entries_queued(bus: EventBus, market: Market, count: int) -> list[str]:
    """``count`` tokens trading would enter (see :func:`ready`), each with a prediction
    to enter it; their mints."""
    mints = []
    for _ in range(count):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        mints.append(mint)
    return mints


async def close(bus, watch, clock, mint: str) -> None:
    """The position held in ``mint`` sold out by an exit order, filled."""
    [opened] = [p for p in watch.payloads("position.opened") if p.mint == mint][-1:]
    sale = ExitOrder(
        order_id=f"{opened.position_id}:exit:1",
        mint=mint,
        position_id=opened.position_id,
        token_amount=opened.token_amount,
    )
    await publish(bus, make_event(sale, source="exit/t", time=clock.now()))
    await clock.advance(1.0)  # the sale fills
    assert watch.payloads("position.closed")[-1].mint == mint


async def trading_replica(
    harness, namespace: str, ledger: MemoryLedger, clock, *, partitions: int
) -> TradingService:
    """A trading replica of its own on RabbitMQ, trading (over ``ledger``)."""
    service = TradingService(
        TradingSettings.load(service="trading", namespace=namespace, partitions=partitions),
        registry=CollectorRegistry(),
        ledger=ledger,
    )
    bus = await harness.bus("trading/broker", partitions=partitions)
    await service.start(
        ServiceContext(
            settings=service.settings, bus=bus, clock=clock, store=MemoryStateStore(clock)
        )
    )
    await eventually(lambda: service.role == "active", within=15)
    return service


async def test_a_prediction_becomes_a_paper_position_stored_in_the_ledger(clock, market):
    ledger = MemoryLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        assert service.role == "active"
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        [request] = watch.payloads("order.requested")
        assert request.mint == mint and request.side == "buy"
        assert watch.count("order.filled") == 0  # the latency has not passed
        [stored] = await ledger.orders(limit=10)
        assert stored["order_id"] == request.order_id and stored["state"] == "sent"

        clock_before = clock.now()
        await clock.advance(1.0)  # the tick finds the order due on the token's last state
        assert clock.now() - clock_before >= service.settings.trading_paper_latency_s
        [fill] = watch.payloads("order.filled")
        [opened] = watch.payloads("position.opened")
        assert fill.order_id == request.order_id
        assert fill.sol_amount == pytest.approx(request.sol_amount, rel=1e-12)
        assert opened.mint == mint and opened.token_amount == fill.token_amount
        [stored] = await ledger.orders(limit=10)
        assert stored["state"] == "filled"
        [position] = await ledger.positions(open_only=True, limit=10)
        assert position["position_id"] == request.order_id
        assert position["token_amount"] == fill.token_amount

        # a later trade marks the position: unrealised PnL after every fee
        await publish(bus, market.tokens.buy(mint, "bob", sol=5.0))
        view = await service.positions()
        [held] = view["positions"]
        assert held["mark_price"] is not None and held["unrealized_pnl_sol"] != 0
        pnl = service.pnl()
        assert pnl["open_positions"] == 1
        assert pnl["unrealized_pnl_sol"] == held["unrealized_pnl_sol"]


async def test_predictions_without_an_order_are_counted_by_reason_with_its_limit(clock, market):
    """Reasons are grouped by what varies (the observed value); the limit stays readable."""
    service = trading(MemoryLedger())
    async with running(clock, service) as (bus, _):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint, score=0.2), market.prediction(mint, score=0.3))
        assert service.pnl()["no_order_reasons"] == {"score # < 0.6": 2}
        # nothing held or paid yet: the figures are still numbers of one type, as JSON
        # readers with types expect them
        pnl = service.pnl()
        for name in (
            "realized_pnl_sol",
            "unrealized_pnl_sol",
            "pnl_sol",
            "fees_sol",
            "exposure_sol",
        ):
            assert type(pnl[name]) is float, (name, pnl[name])


async def test_reasons_naming_an_order_or_a_token_are_counted_as_one(clock, market):
    """A reason naming an order or a token (a copy of a decided prediction, a breaker's
    trip) is counted under one entry for all of them, not one a name: the counts would
    grow for good."""
    service = trading(MemoryLedger())
    async with running(clock, service) as (bus, watch):
        for _ in range(2):
            prediction = market.prediction(await ready(bus, market))
            await publish(bus, prediction)
            await clock.advance(1.0)
            opened = watch.payloads("position.opened")[-1]
            sale = ExitOrder(
                order_id=f"{opened.position_id}:exit:1",
                mint=opened.mint,
                position_id=opened.position_id,
                token_amount=opened.token_amount,
            )
            await publish(bus, make_event(sale, source="exit/t", time=clock.now()))
            await clock.advance(1.0)
            assert not service.book.holds(opened.mint)
            await publish(bus, prediction)  # a copy, decided again: its order exists
        reasons = service.pnl()["no_order_reasons"]
        assert reasons == {"order <id> sent already": 2}, reasons
        mint = await ready(bus, market)
        good = market.tokens.buy(mint, "bob", sol=0.1)
        bad = market.tokens.buy(mint, "eve", sol=0.1, marketCapSol=good.data.marketCapSol * 1.01)
        await publish(bus, good, bad)
        await publish(bus, market.prediction(mint))
        [halted] = [r for r in service.pnl()["no_order_reasons"] if r.startswith("trading")]
        assert halted == "trading is halted: curve breaker", halted


async def test_refusals_are_counted_by_their_kind_not_by_their_text(clock, market):
    """Refusals of one kind count under one key whatever they observed; two kinds never
    merge, though their texts differ only in a name that looks like an id (two entries of
    the name block list); a feature's name, digits, underscores and all, stays whole."""
    blocked = ("moon2024token", "pump9000coin")
    service = trading(MemoryLedger(), trading_name_blocklist=blocked)
    async with running(clock, service) as (bus, _):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint, score=0.2), market.prediction(mint, score=0.3))
        for name in blocked:
            named = market.tokens.mint()
            await publish(
                bus,
                market.tokens.created(named, sol=0.5, name=name, symbol="X", trader="dev"),
                market.tokens.buy(named, "alice", sol=3.0),
                market.features(named),
                market.lifecycle(named),
                market.prediction(named),
            )
        full = market.features(mint).data
        values = dict(zip(full.names, full.values, strict=True))
        del values["buy_volume_sol_60s"]
        thinner = FeaturesUpdated(
            mint=mint,
            feature_set_version=full.feature_set_version,
            source_seq=full.source_seq + 1,
            names=tuple(values),
            values=tuple(values.values()),
        )
        await publish(
            bus, make_event(thinner, source="features/test", time=clock.now()),
            market.prediction(mint),
        )  # fmt: skip
        assert service.pnl()["no_order_reasons"] == {
            "score # < 0.6": 2,
            "name blocked ('moon2024token')": 1,
            "name blocked ('pump9000coin')": 1,
            "features lack ['buy_volume_sol_60s']": 1,
        }


async def test_an_exit_order_for_more_than_is_held_sells_what_is_held(clock, market):
    service = trading(MemoryLedger())
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        await clock.advance(1.0)
        [opened] = watch.payloads("position.opened")
        sale = ExitOrder(
            order_id=f"{opened.position_id}:exit:1",
            mint=mint,
            position_id=opened.position_id,
            token_amount=opened.token_amount * 3,
        )
        await publish(bus, make_event(sale, source="exit/t", time=clock.now()))
        sell = [r for r in watch.payloads("order.requested") if r.side == "sell"]
        assert [r.token_amount for r in sell] == [opened.token_amount]


async def test_the_kill_switch_stops_entries_from_the_next_event(clock, market):
    ledger = MemoryLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await service.halt("test halt")
        [halted] = watch.payloads("trading.state")
        assert halted.state == "halted" and halted.reason == "test halt"
        await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 0
        assert await ledger.control() == ("halted", "test halt")

        await service.resume("test resume")
        await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 1


async def test_a_shutdown_stops_entries_from_the_next_event(clock, market):
    """A shutdown halts entries from the next event; its barrier carries the shutdown's
    request id, by which the exit service knows one of a graceful exit that is over."""
    ledger = MemoryLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        shutdown = SystemShutdown(reason="operator", request_id="stop-1")
        await publish(bus, make_event(shutdown, source="cli/t", time=clock.now()))
        [barrier] = watch.payloads("trading.barrier")
        assert barrier.request_id == "stop-1" and barrier.reason == "operator"
        [halted] = watch.payloads("trading.state")
        assert halted.state == "halted" and halted.reason == "shutdown: operator"
        await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 0
        assert await ledger.control() == ("halted", "shutdown: operator")


async def test_a_shutdown_seen_again_after_a_restart_does_not_halt_a_resumed_trading(
    clock, market, pg_pool
):
    """The replica trading applies a shutdown (halted, its barrier out), restarts, and the
    operator resumes trading. The shutdown comes again (redelivered, or a copy published
    again under its request id): the ledger keeps the request ids whose halt it stored,
    so it halts nothing again and publishes no second barrier. A shutdown without a
    request id halts as ever."""
    ledger = PostgresLedger(pg_pool)

    def shutdown(reason: str, request_id: str | None) -> Event:
        data = SystemShutdown(reason=reason, request_id=request_id)
        return make_event(data, source="cli/t", time=clock.now(), event_id=request_id)

    first = trading(ledger)
    async with running(clock, first) as (bus, watch):
        await publish(bus, shutdown("operator", "stop-1"))
        [barrier] = watch.payloads("trading.barrier")
        assert barrier.request_id == "stop-1"
        assert first.risk.operator_state is TradingState.HALTED

    restarted = trading(ledger)
    async with running(clock, restarted) as (bus, watch):
        assert restarted.risk.operator_reason == "shutdown: operator"
        await restarted.resume("operator resumed")
        await eventually(lambda: restarted.risk.operator_state is TradingState.ACTIVE,
                         what="resumed")  # fmt: skip
        watch.clear()
        await publish(bus, shutdown("operator", "stop-1"))
        # a copy under another event id, the request's all the same
        data = SystemShutdown(reason="operator", request_id="stop-1")
        await publish(bus, make_event(data, source="cli/t", time=clock.now()))
        assert watch.count("trading.barrier") == 0 and watch.count("trading.state") == 0
        assert restarted.risk.operator_state is TradingState.ACTIVE
        assert await ledger.control() == (TradingState.ACTIVE, "operator resumed")
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 1

        await publish(bus, shutdown("no id", None))
        [barrier] = watch.payloads("trading.barrier")
        assert barrier.request_id is None
        assert restarted.risk.operator_reason == "shutdown: no id"
        assert await ledger.control() == (TradingState.HALTED, "shutdown: no id")


async def test_shutdown_requests_are_kept_for_their_setting_and_older_ones_refused(clock, pg_pool):
    """The ledger forgets a request applied more than ``shutdown_requests_kept_s`` ago
    (its barrier out): one that old, come again, is refused for its age, neither halting
    nor barred again; a recent one, come again, is still a repeat."""
    kept = 3600.0
    ledger = PostgresLedger(pg_pool, shutdowns_kept_s=kept)
    service = trading(ledger, shutdown_requests_kept_s=kept)

    def shutdown(request_id: str, *, age_s: float = 0.0) -> Event:
        data = SystemShutdown(reason="operator", request_id=request_id)
        return make_event(data, source="cli/t", time=clock.now() - age_s, event_id=request_id)

    async with running(clock, service) as (bus, watch):
        await publish(bus, shutdown("stop-1"), shutdown("stop-2"))
        assert [b.request_id for b in watch.payloads("trading.barrier")] == ["stop-1", "stop-2"]
        await pg_pool.execute(
            "UPDATE trading_shutdown_requests SET applied_at = now() - interval '61 minutes' "
            "WHERE request_id = 'stop-1'"
        )
        await publish(bus, shutdown("stop-3"))
        assert not await ledger.shutdown_applied("stop-1")
        await service.resume("operator resumed")
        await eventually(lambda: service.risk.operator_state is TradingState.ACTIVE,
                         what="resumed")  # fmt: skip
        watch.clear()
        await publish(bus, shutdown("stop-1", age_s=kept + 60.0), shutdown("stop-2"))
        assert watch.count("trading.barrier") == 0 and watch.count("trading.state") == 0
        assert service.risk.operator_state is TradingState.ACTIVE
        assert await ledger.control() == (TradingState.ACTIVE, "operator resumed")
        # never applied, and as old: refused all the same (whether it was is not known)
        await publish(bus, shutdown("stop-4", age_s=kept + 60.0))
        assert watch.count("trading.barrier") == 0
        assert service.risk.operator_state is TradingState.ACTIVE


async def test_a_halt_stored_by_another_replica_reaches_the_trader_on_its_tick(clock, market):
    ledger = MemoryLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await ledger.set_control("halted", "halted elsewhere")
        await clock.advance(service.settings.trading_tick_s)
        assert service.risk.state == "halted"
        await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 0


async def test_a_restart_reloads_the_book_and_reconciles_the_order_in_flight(clock, market):
    ledger = MemoryLedger()
    # a long latency keeps the second order in flight when the first replica goes
    first = trading(ledger, trading_paper_latency_s=30.0)
    async with running(clock, first) as (bus, watch):
        held = await ready(bus, market)
        await publish(bus, market.prediction(held))
        await clock.advance(31.0)
        await publish(bus, market.tokens.buy(held, "bob", sol=1.0))
        assert watch.count("position.opened") == 1
        flying = await ready(bus, market)
        in_flight = market.prediction(flying)
        await publish(bus, in_flight)
        assert watch.count("order.requested") == 2 and watch.count("order.filled") == 1
        [order_id] = [r.order_id for r in watch.payloads("order.requested") if r.mint == flying]
        book_before = {m: p.tokens for m, p in first.book.open_positions.items()}

    second = trading(ledger, trading_paper_latency_s=30.0)
    async with running(clock, second) as (bus, watch):
        # the book as it was, the order in flight back in the executor's hands
        assert {m: p.tokens for m, p in second.book.open_positions.items()} == book_before
        assert second.reconciled == {order_id: "resubmitted"}
        assert second.risk.reservations.keys() == {order_id}
        # the prediction again (a redelivery): never a second order
        await publish(bus, in_flight)
        assert watch.count("order.requested") == 0
        # the token trades on after the latency: the order fills, once
        await ready(bus, market, flying)
        await clock.advance(31.0)
        [fill] = watch.payloads("order.filled")
        assert fill.order_id == order_id
        assert second.book.holds(flying) and second.book.holds(held)
        orders = await ledger.orders(limit=10)
        assert sorted(o["state"] for o in orders) == ["filled", "filled"]
        assert second.risk.reservations == {}


async def test_the_next_replica_decides_on_what_the_last_one_learnt_of_a_token(clock, market):
    """A token's creation, features and lifecycle do not come again: the replica trading
    next knows them from the views stored in the state store, and its paper executor
    knows the token's market."""
    ledger, store = MemoryLedger(), MemoryStateStore(clock)
    # one process on a market clock keeps no views unless told to: nobody takes over there
    first = trading(ledger, trading_keep_token_views=True)
    async with running(clock, first, store=store) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint, score=0.1))
        retired = await ready(bus, market)
        await publish(bus, market.lifecycle(retired, state="inactive"))
        assert watch.count("order.requested") == 0

    second = trading(ledger, trading_keep_token_views=True)
    async with running(clock, second, store=store) as (bus, watch):
        assert retired not in second.engine.views
        await publish(bus, market.prediction(mint))
        [request] = watch.payloads("order.requested")
        assert request.mint == mint
        await clock.advance(1.0)
        [opened] = watch.payloads("position.opened")
        assert opened.position_id == request.order_id


async def test_the_next_replica_values_the_positions_it_takes_over_on_their_markets(clock, market):
    """A position held when the replica goes is valued by the next one on the market its
    stored view holds, as it was: not at its cost (no unrealised PnL) until its token
    trades again, which a quiet token may never do."""
    ledger, store = MemoryLedger(), MemoryStateStore(clock)
    first = trading(ledger, trading_keep_token_views=True)
    async with running(clock, first, store=store) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        await clock.advance(1.0)
        assert watch.count("position.opened") == 1
        await publish(bus, market.tokens.sell(mint, "alice"))
        before = first.pnl()["unrealized_pnl_sol"]
        assert before < 0

    second = trading(ledger, trading_keep_token_views=True)
    async with running(clock, second, store=store):
        assert second.book.holds(mint)
        assert second.pnl()["unrealized_pnl_sol"] == pytest.approx(before, rel=1e-12)


async def test_a_pool_trade_redelivered_to_the_next_replica_moves_its_view_once(clock, market):
    """The replica trading next loads the views its predecessor stored before acking; a
    pool trade folded into them that comes again (its holder died before the ack) leaves
    the pool's state in the view, stored and in the executor's market as it was."""
    ledger, store = MemoryLedger(), MemoryStateStore(clock)
    first = trading(ledger, trading_keep_token_views=True)
    async with running(clock, first, store=store) as (bus, _):
        mint = await ready(bus, market)
        await publish(bus, market.tokens.migrated(mint))
        pool_trade = market.tokens.buy(mint, "amm", sol=2.0, pool="pump-amm")
        await publish(bus, pool_trade)
        once = first.engine.views[mint].market.state
        assert once != MIGRATION_POOL

    second = trading(ledger, trading_keep_token_views=True)
    async with running(clock, second, store=store) as (bus, _):
        await publish(bus, pool_trade)
        assert second.engine.views[mint].market.state == once
        assert second.executor.expected(mint) == (VENUE_POOL, once)
        assert (await TokenContext(store, ttl_s=60.0).load())[mint].market.state == once
        # what comes after moves it on
        await publish(bus, market.tokens.sell(mint, "amm", pool="pump-amm"))
        assert second.engine.views[mint].market.state != once


async def test_a_graduates_pool_trades_keep_no_view_or_market_once_it_retired(clock, market):
    """A graduate not held leaves with its graduation; its pool trades, which go on
    streaming, make neither its view nor its market again (one per graduate, for ever),
    in memory or in the store; a held graduate keeps both."""
    service = trading(MemoryLedger(), trading_keep_token_views=True)
    async with running(clock, service) as (bus, watch):
        held = await ready(bus, market)
        await publish(bus, market.prediction(held))
        await clock.advance(1.0)
        assert watch.payloads("position.opened")[-1].mint == held
        graduates = [held] + [await ready(bus, market) for _ in range(3)]
        for mint in graduates:
            await publish(bus, market.tokens.migrated(mint), market.lifecycle(mint, "graduated"))
        for mint in graduates:
            for trader in ("amm1", "amm2"):
                await publish(bus, market.tokens.buy(mint, trader, sol=1.0, pool="pump-amm"))
        retired = set(graduates[1:])
        assert not retired & set(service.engine.views)
        assert not retired & set(service.executor.broker.markets)
        assert held in service.engine.views and held in service.executor.broker.markets
        await service.context.save(service.engine.views)
        assert set(await service.context.load()) & set(graduates) == {held}


async def test_a_redelivered_trade_counts_once_toward_the_rate_breaker(clock, market):
    """The same trade delivered again and again (by its publisher's seq) counts once
    toward the rate breaker: as many distinct events would trip it and halt entries."""
    service = trading(MemoryLedger())
    async with running(clock, service) as (bus, watch):
        # 10 events in the 10 s window: a ready token's events, a trade and a prediction
        # are within it
        service.risk.breaker_settings = replace(
            service.risk.breaker_settings, max_events_per_s=1.0, rate_window_s=10.0
        )
        mint = await ready(bus, market)
        trade = market.tokens.buy(mint, "bob", sol=0.2)
        await publish(bus, *[trade] * 20)
        assert not service.risk.breakers["rate"].tripped
        await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 1


def state_gauge(registry: CollectorRegistry) -> dict[str, float | None]:
    """The service's gauge of the trading state in force, by state."""
    return {
        state.value: registry.get_sample_value("pumpflow_trading_state", {"state": state.value})
        for state in TradingState
    }


async def test_the_state_gauge_says_halted_as_a_breaker_halts_trading(clock, market):
    """A breaker's trip halts trading between two rounds: the gauge (what the dashboard and
    the halted alert read) says so at once, not on the next round (``trading_tick_s``)."""
    registry = CollectorRegistry()
    service = trading(MemoryLedger(), registry=registry)
    async with running(clock, service) as (bus, watch):
        assert state_gauge(registry) == {"active": 1, "reducing": 0, "halted": 0}
        service.risk.breaker_settings = replace(
            service.risk.breaker_settings, max_events_per_s=1.0, rate_window_s=10.0
        )
        mint = await ready(bus, market)
        ticked = clock.now()
        await publish(bus, *[market.tokens.buy(mint, f"w{i}", sol=0.1) for i in range(20)])
        [halted] = watch.payloads("trading.state")
        assert halted.state == "halted" and service.risk.breakers["rate"].tripped
        assert clock.now() - ticked < service.settings.trading_tick_s
        assert state_gauge(registry) == {"active": 0, "reducing": 0, "halted": 1}


class _CountedWrites(MemoryStateStore):
    """The in-memory store, counting its writes."""

    writes = 0

    async def write(self, batch) -> None:
        self.writes += 1
        await super().write(batch)


async def test_a_lanes_ready_events_apply_in_order_and_share_one_view_write(clock, market):
    """A lane's deliveries waiting together are one call: each applied in order, the token
    views they changed stored in one write before any is acknowledged (one at a time, each
    event waited for the write of the one before)."""
    store = _CountedWrites()
    service = trading(MemoryLedger())
    async with run_embedded([service], clock=clock, synchronous=False, store=store) as system:
        mint = market.tokens.mint()
        # numbered in this order, as the feed numbers a token's events
        created = market.tokens.created(mint, sol=0.5, trader="dev")
        buys = [market.tokens.buy(mint, f"w{i}", sol=0.1 + i / 100) for i in range(40)]
        writes_before = store.writes
        for event in (created, *buys):
            await system.bus.publish(event)
        await system.bus.drain()
        assert store.writes - writes_before <= 3
        # applied in order: the view holds the last buy's curve
        view = service.engine.views[mint]
        assert view.curve is not None
        assert view.curve.v_sol == pytest.approx(buys[-1].data.vSolInBondingCurve)


class _CountedLedger(MemoryLedger):
    """The in-memory ledger, counting the transactions that write something."""

    commits = 0

    async def commit(self, change: LedgerChange) -> Committed:
        self.commits += bool(change)
        return await super().commit(change)


class BlinkingLedger(MemoryLedger):
    """The in-memory ledger, losing its connection on the next ``failures`` writes (the
    last one once ``held`` is set, if it is given)."""

    failures = 0
    held: asyncio.Event | None = None
    holding = False

    async def commit(self, change: LedgerChange) -> Committed:
        if change and self.failures:
            self.failures -= 1
            if not self.failures and self.held is not None:
                self.holding = True
                await self.held.wait()
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")
        return await super().commit(change)


async def test_a_lanes_events_that_order_nothing_share_one_ledger_transaction(clock, market):
    """Three trades that each fill an order in flight: their fills, outcomes and positions
    stored in one transaction (one event at a time, each was a transaction of its own)."""
    ledger = _CountedLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mints = [await ready(bus, market) for _ in range(3)]
        for mint in mints:
            await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 3 and watch.count("order.filled") == 0
        due = clock.now() + service.settings.trading_paper_latency_s + 1.0
        trades = [market.tokens.buy(mint, "bob", sol=0.2, time=due) for mint in mints]
        commits_before = ledger.commits
        await service.on_events(trades)
        assert ledger.commits - commits_before == 1
        assert watch.count("order.filled") == 3 and watch.count("position.opened") == 3
        orders = await ledger.orders(limit=10)
        assert [o["state"] for o in orders] == ["filled"] * 3
        assert len(await ledger.positions(open_only=True, limit=10)) == 3


async def test_an_order_is_stored_and_sent_before_the_next_event_of_its_lane(clock, market):
    """A prediction that orders and, in the same call, the token's trade past the paper
    latency: the order is in the executor's hands when the trade comes, which fills it."""
    ledger = _CountedLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        due = clock.now() + service.settings.trading_paper_latency_s + 1.0
        commits_before = ledger.commits
        trade = market.tokens.buy(mint, "bob", sol=0.2, time=due)
        await service.on_events([market.prediction(mint), trade])
        [request] = watch.payloads("order.requested")
        [fill] = watch.payloads("order.filled")
        assert fill.order_id == request.order_id
        # the order, then its fill and position
        assert ledger.commits - commits_before == 2
        [stored] = await ledger.orders(limit=10)
        assert stored["state"] == "filled"


class LostReplyLedger(MemoryLedger):
    """The in-memory ledger, storing its next write and then losing the reply (the
    connection closed after the commit)."""

    lose_next = False
    #: the next write fails before it reaches the ledger
    fail_next = False

    async def commit(self, change: LedgerChange) -> Committed:
        if change and self.fail_next:
            self.fail_next = False
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")
        committed = await super().commit(change)
        if change and self.lose_next:
            self.lose_next = False
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")
        return committed


async def lost_reply(ledger: LostReplyLedger, service: TradingService, event: Event) -> None:
    """``service`` decides on ``event``: the commit of what it decided reaches the ledger,
    and its reply is lost (the call fails as the bus sees it, and nothing is sent)."""
    ledger.lose_next = True
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
        await service.on_events([event])
    assert not ledger.lose_next, "nothing was stored"


async def test_an_order_stored_by_a_commit_whose_reply_was_lost_is_sent_once(clock, market):
    """The retry finds the order stored by its own decision: it is sent, once (taken for
    a redelivery's, it was never sent, its capital released, the ledger saying sent)."""
    ledger = LostReplyLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        prediction = market.prediction(mint)
        await lost_reply(ledger, service, prediction)
        assert watch.count("order.requested") == 0
        await service.on_events([prediction])  # the bus hands it back
        [request] = watch.payloads("order.requested")
        await clock.advance(1.0)
        [fill] = watch.payloads("order.filled")
        assert fill.order_id == request.order_id
        [stored] = await ledger.orders(limit=10)
        assert stored["order_id"] == request.order_id and stored["state"] == "filled"
        # a redelivery of the prediction, decided again, sends nothing
        await service.on_events([prediction])
        assert watch.count("order.requested") == 1


async def test_an_order_a_lost_commit_stored_is_stored_refused_by_the_replica_standing_by(
    clock, market
):
    """The store of a prediction's order reaches the ledger, its reply lost; then the
    lease goes. The replica standing by sends nothing, and the row its commit stored says
    so rather than ``sent`` (a take-over would reconcile it as an order of unknown
    outcome, its capital held, and a live one wait for its trade), as do its events."""
    ledger = LostReplyLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await lost_reply(ledger, service, market.prediction(mint))
        await service.leader.stop()
        assert service.role == "standby"
        [order] = await ledger.orders(limit=10)
        assert order["state"] == "rejected", order
        assert order["outcome"].startswith("withdrawn unsent"), order
        # told refused: the next holder takes the prediction handed back for a copy
        assert [r.order_id for r in watch.payloads("order.rejected")] == [order["order_id"]]
        assert watch.count("order.requested") == 1 and watch.count("order.filled") == 0

    second = trading(ledger)
    async with running(clock, second) as (bus, watch):
        assert second.reconciled == {}
        assert second.risk.reservations == {}
        await clock.advance(1.0)
        assert watch.count("order.filled") == 0 and not second.book.holds(mint)


async def test_an_entry_withdrawn_with_its_id_taken_is_decided_again_under_an_id_of_its_own(
    clock, market
):
    """The store of a prediction's order reaches the ledger, its reply lost; the lease
    goes and the replica standing by settles the row withdrawn (its id taken, nothing
    sent). The next holder, handed the prediction back, decides it again: still valid,
    it orders under an id derived from the withdrawn one, sent and filled once."""
    ledger = LostReplyLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        prediction = market.prediction(mint)
        await lost_reply(ledger, service, prediction)
        await service.leader.stop()
        [withdrawn] = watch.payloads("order.rejected")

    second = trading(ledger)
    async with running(clock, second) as (bus, watch):
        await ready(bus, market, mint)
        await second.on_events([prediction])  # handed back
        [request] = watch.payloads("order.requested")
        assert request.order_id == retaken_id(withdrawn.order_id)
        await clock.advance(1.0)
        [fill] = watch.payloads("order.filled")
        assert fill.order_id == request.order_id and second.book.holds(mint)
        await second.on_events([prediction])  # again: the same order, never sent twice
        assert watch.count("order.requested") == 1
        states = {o["order_id"]: o["state"] for o in await ledger.orders(limit=10)}
        assert states == {withdrawn.order_id: "rejected", request.order_id: "filled"}

    third = trading(ledger)
    async with running(clock, third) as (bus, watch):
        await ready(bus, market, mint)
        await third.on_events([prediction])  # a later holder names the same order
        assert watch.count("order.requested") == 0


async def test_a_take_over_waits_for_the_predecessor_to_withdraw_the_entry_it_never_sent(
    clock, market
):
    """An entry's store reaches the ledger, its reply lost; the next holder takes over
    before the replica that lost the lease has stood by. It waits for it: the entry is
    read withdrawn, not in flight, so it never fills unsent; the prediction, handed back,
    is decided again under an id of its own, sent and filled once."""
    ledger = LostReplyLedger()
    first = trading(ledger)
    second = trading(ledger, trading_predecessor_wait_s=30.0)
    async with running(clock, first) as (bus, watch):
        mint = await ready(bus, market)
        prediction = market.prediction(mint)
        await lost_reply(ledger, first, prediction)

        async def lose_the_lease_late() -> None:
            # the next holder has the lease and is taking over
            await eventually(lambda: second.leader is not None and second.leader.is_leader,
                             what="the next holder elected")  # fmt: skip
            await first.leader.stop()

        losing = asyncio.create_task(lose_the_lease_late())
        async with running(clock, second) as (bus2, watch2):
            await losing
            [withdrawn] = watch.payloads("order.rejected")
            assert second.reconciled == {} and second.risk.reservations == {}
            await clock.advance(1.0)
            assert watch2.count("order.filled") == 0 and not second.book.holds(mint)

            await ready(bus2, market, mint)
            await second.on_events([prediction])  # handed back
            [request] = watch2.payloads("order.requested")
            assert request.order_id == retaken_id(withdrawn.order_id)
            await clock.advance(1.0)
            [fill] = watch2.payloads("order.filled")
            assert fill.order_id == request.order_id
        states = {o["order_id"]: o["state"] for o in await ledger.orders(limit=10)}
        assert states == {withdrawn.order_id: "rejected", request.order_id: "filled"}


async def test_a_predecessor_that_stands_by_too_late_stores_nothing_behind_the_next_holder(
    clock, market
):
    """As above, but the replica that lost the lease stands by only after the next
    holder gave up waiting and read the ledger: the entry its lost commit stored is then
    the next holder's, in flight as after a crash (paper fills it), and the late
    stand-by can neither settle it withdrawn nor tell it refused: one outcome, not two."""
    ledger = LostReplyLedger()
    first = trading(ledger)
    second = trading(ledger, trading_predecessor_wait_s=0.05)
    async with running(clock, first) as (bus, watch):
        mint = await ready(bus, market)
        await lost_reply(ledger, first, market.prediction(mint))
        [order] = await ledger.orders(limit=10)
        async with running(clock, second) as (_, watch2):
            assert second.reconciled == {order["order_id"]: "resubmitted"}
            await first.leader.stop()
            assert first.role == "standby"
            assert watch.count("order.rejected") == 0
            await clock.advance(1.0)
            [fill] = watch2.payloads("order.filled")
            assert fill.order_id == order["order_id"] and second.book.holds(mint)
        [stored] = await ledger.orders(limit=10)
        assert stored["state"] == "filled"


class AwayOnceLedger(MemoryLedger):
    """The in-memory ledger, away for a take-over's first read of its predecessor."""

    away = True

    async def predecessor(self) -> Predecessor | None:
        if self.away:
            self.away = False
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")
        return await super().predecessor()


async def test_a_take_over_whose_ledger_is_away_is_given_up_and_the_lease_campaigned_for_again(
    clock, market
):
    """Postgres goes away as a replica takes over: the take-over fails and the lease is
    released, not held while the ledger is waited for (a replica cut off from Postgres
    alone would keep the lease renewed in Redis, and no other could trade meanwhile).
    The campaign takes it again, and the take-over, the ledger back, trades."""
    ledger = AwayOnceLedger()
    service = trading(ledger, trading_lease_ttl_s=1.0)
    async with running(clock, service) as (bus, watch):
        await eventually(lambda: service.role == "active", 10.0, what="the take-over again")
        assert service.leader.elections == 2 and service.leader.losses == 1
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 1


async def test_a_replica_superseded_mid_flush_hands_its_events_back_as_it_stands_by(clock, market):
    """Another replica took over the ledger while this one's loss of the lease is not
    seen yet (a stalled renewal): the commit of a prediction's entry is refused. The
    prediction waits, neither sent nor dead-lettered (the bus would after a failure's
    few attempts, lost to the next holder), until this replica stands by, at once, not
    a renewal later, and hands it back; what it could not store is left to the next
    holder."""
    ledger = MemoryLedger()
    # renewed next in 200 s: the refusal alone has it stand by within the timeout
    service = trading(ledger, trading_lease_ttl_s=600.0)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await service.leader.lease.store.set_many(
            {LEASE_PREFIX + LEASE_NAME: b"another replica"}, ttl=60.0
        )
        await ledger.load(remembered=10, holder="another replica")
        async with asyncio.timeout(10.0):
            # handled inline: it returns once handed back
            await publish(bus, market.prediction(mint))
        assert service.role == "standby"
        assert await bus.dead_letters("trading") == []
        assert watch.count("order.requested") == 0 and watch.count("order.rejected") == 0
        assert await ledger.orders(limit=10) == []


async def test_a_shutdown_meeting_a_take_over_is_handed_back_not_taken_as_handled(
    clock, market, caplog
):
    """A ``system.shutdown`` comes to a replica another took the ledger over from, its
    lease's loss not seen yet. Its halt is refused by the ledger: the shutdown is neither
    acknowledged as handled (no barrier announced from a book no longer the ledger's) nor
    dead-lettered; it waits, as for a dependency, until the replica stands by, at once,
    and is handed back to trading's queue (its replicas share it), where the holder
    takes it; the halt is stored for it, as any halt meeting a take-over is, and that is
    all that is stored from here."""
    ledger = MemoryLedger()
    service = trading(ledger, trading_lease_ttl_s=600.0)
    async with running(clock, service) as (bus, watch):
        await ready(bus, market)
        await service.leader.lease.store.set_many(
            {LEASE_PREFIX + LEASE_NAME: b"another replica"}, ttl=600.0
        )
        await ledger.load(remembered=10, holder="another replica")
        caplog.clear()
        caplog.set_level(logging.INFO, "pumpflow.common.bus.dispatch")
        shutdown = make_event(SystemShutdown(reason="operator"), source="cli/t", time=clock.now())
        async with asyncio.timeout(10.0):
            await publish(bus, shutdown)  # handled inline: it returns once handed back
        assert service.role == "standby"
        assert await bus.dead_letters("trading") == []
        assert watch.count("trading.barrier") == 0
        assert await ledger.control() == (TradingState.HALTED, "shutdown: operator")
        assert await ledger.orders(limit=10) == []
        assert [r.getMessage() for r in caplog.records if r.exc_info] == []
        assert any("handed back" in r.getMessage() for r in caplog.records)
        holder = await EventCollector("holder").attach(
            bus, *SERVICE_CONSUMES, service="trading", shared_keyless=True
        )
        assert [e.id for e in holder.of("system.shutdown")] == [shutdown.id]
        assert await bus.drain(timeout=2.0)


class OutboxWatchingLedger(MemoryLedger):
    """The in-memory ledger, noting the outbox's event ids after each commit."""

    def __init__(self) -> None:
        super().__init__()
        self.outboxes: list[set[str]] = []

    async def commit(self, change: LedgerChange) -> Committed:
        committed = await super().commit(change)
        self.outboxes.append(set(self._outbox))
        return committed


async def test_a_replica_superseded_then_elected_again_drops_no_event_of_the_one_between(
    clock, market
):
    """The replica published an event, then another took over and stored an event of the
    same id (as an order's late fill has its refusal's) and an order of its own. Elected
    again, the replica does not tell that event published with its first commit (the
    refusal of that order), before it has published it: it stays in the outbox until
    then."""
    ledger = OutboxWatchingLedger()
    service = trading(ledger, trading_lease_ttl_s=1.0)
    key = LEASE_PREFIX + LEASE_NAME
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        [requested] = watch.of("order.requested")
        lease = service.leader.lease
        await lease.store.set_many({key: b"another replica"}, ttl=60.0)
        await ledger.load(remembered=10, holder="another replica")
        # an order the paper executor refuses to take over: its refusal is a change
        theirs = OrderRecord(
            order_id="theirs", mint=mint, side="buy", sol_amount=0.1, token_amount=None,
            slippage_pct=5.0, reason="", position_id=None, cause_id=None, executor="live",
            state="sent", requested_at=clock.now(), venue="curve",
        )  # fmt: skip
        again = KeyedEvent(event=requested)
        await ledger.commit(
            LedgerChange(
                orders=[theirs], events=[again], gone=[requested.id], holder="another replica"
            )
        )
        await eventually(lambda: service.role == "standby", 10.0, what="the lease lost")
        commits = len(ledger.outboxes)
        await lease.store.delete_many([key])
        await eventually(lambda: service.role == "active", 10.0, what="elected again")
        assert service.reconciled["theirs"] == "rejected"
        assert requested.id in ledger.outboxes[commits]


async def test_a_replica_superseded_in_a_timed_round_stands_by_at_once_without_a_traceback(
    clock, market, caplog
):
    """A timed round's commit (a paper fill come due) is refused: another replica took
    over the ledger. The replica stands by then, long before its lease's renewal would
    tell, and says so in a line, not with a traceback each round."""
    ledger = MemoryLedger()
    service = trading(ledger, trading_lease_ttl_s=600.0)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        [request] = watch.payloads("order.requested")
        await service.leader.lease.store.set_many(
            {LEASE_PREFIX + LEASE_NAME: b"another replica"}, ttl=600.0
        )
        await ledger.load(remembered=10, holder="another replica")
        caplog.clear()
        await clock.advance(1.0)
        await eventually(lambda: service.leader.role == "standby", 10.0,
                         what="the superseded replica standing by")  # fmt: skip
        assert service.role == "standby" and service.leader.losses == 1
        assert watch.count("order.filled") == 0
        [stored] = await ledger.orders(limit=10)
        assert stored["order_id"] == request.order_id and stored["state"] == "sent"
        assert [r.getMessage() for r in caplog.records if r.exc_info] == []
        assert any("another replica took over the ledger" in r.getMessage()
                   for r in caplog.records)  # fmt: skip


async def test_a_sale_a_lost_commit_stored_is_refused_aloud_by_the_replica_standing_by(
    clock, market
):
    """An exit's sale whose store reaches the ledger, its reply lost; then the lease goes.
    The replica standing by settles the row refused and says so (its request and
    refusal published): the next holder takes the sale, handed back to it, for a copy of
    the stored one and publishes nothing of it, so the exit would otherwise wait for an
    outcome that never comes (a tranche to the run's deadline, a rule's sale for ever)."""
    ledger = LostReplyLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        await clock.advance(1.0)
        [opened] = watch.payloads("position.opened")
        sale = ExitOrder(
            order_id=f"{opened.position_id}:exit:1",
            mint=mint,
            position_id=opened.position_id,
            token_amount=opened.token_amount,
        )
        await lost_reply(ledger, service, make_event(sale, source="exit/t", time=clock.now()))
        await service.leader.stop()
        stored = {o["order_id"]: o for o in await ledger.orders(limit=10)}
        assert stored[sale.order_id]["state"] == "rejected"
        [refusal] = watch.payloads("order.rejected")
        assert refusal.order_id == sale.order_id
        assert [r.order_id for r in watch.payloads("order.requested") if r.side == "sell"] == [
            sale.order_id
        ]
        assert watch.count("order.filled") == 1  # the entry's only

    second = trading(ledger)
    async with running(clock, second) as (bus, watch):
        # handed back to the next holder: a copy of the stored sale, nothing published
        await second.on_events([make_event(sale, source="exit/t", time=clock.now())])
        await clock.advance(1.0)
        assert watch.count("order.requested") == 0 and second.book.holds(mint)


async def test_an_entry_a_lost_commit_never_stored_is_withdrawn_without_a_word(clock, market):
    """The lease goes while an entry's store fails before it reached the ledger: nothing
    of it is published by the replica standing by, and the next holder decides its
    prediction again."""
    ledger = LostReplyLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        prediction = market.prediction(mint)
        ledger.fail_next = True
        with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
            await service.on_events([prediction])
        await service.leader.stop()
        assert await ledger.orders(limit=10) == []
        assert watch.count("order.requested") == 0 and watch.count("order.rejected") == 0

    second = trading(ledger)
    async with running(clock, second) as (bus, watch):
        await ready(bus, market, mint)
        await second.on_events([prediction])
        await clock.advance(1.0)
        assert watch.count("order.filled") == 1


async def test_a_shutdown_handed_back_after_its_barrier_sends_no_second_one(clock, market):
    """A batch of the critical lane, the shutdown then an exit order whose store fails:
    the bus hands each back alone, and the shutdown, halted on and announced already,
    halts and announces nothing again (a second barrier would list its positions again
    for the exit service's graceful exit to wait for)."""
    ledger = BlinkingLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        await clock.advance(1.0)
        [opened] = watch.payloads("position.opened")
        shutdown = make_event(SystemShutdown(reason="operator"), source="cli/t", time=clock.now())
        sale = ExitOrder(
            order_id=f"{opened.position_id}:exit:1",
            mint=mint,
            position_id=opened.position_id,
            token_amount=opened.token_amount,
        )
        ledger.failures = 1
        dispatcher = Dispatcher(service="trading", lane="critical", event_log=EventLog("none"))
        dead = await dispatcher.dispatch_batch(
            [shutdown, make_event(sale, source="exit/t", time=clock.now())],
            service._subscription,
        )
        assert dead == []
        [barrier] = watch.payloads("trading.barrier")
        assert [p.position_id for p in barrier.positions] == [opened.position_id]
        assert [s.state for s in watch.payloads("trading.state")] == ["halted"]
        [sell] = [r for r in watch.payloads("order.requested") if r.side == "sell"]
        assert sell.order_id == sale.order_id


@pytest.mark.parametrize("back", ["for the stand-by", "after it"])
async def test_a_replica_standing_by_sends_no_order_the_ledger_failed_to_store(clock, market, back):
    """Postgres fails on a prediction's order, then the lease goes. Whether the ledger is
    back for the stand-by or only for a later write of the views (another lane's
    handler), the order is neither stored nor sent (the next holder, which read the
    ledger already, would never know of it), nor are the views that decided it stored;
    the prediction, not acknowledged, is the next holder's to decide."""
    ledger, store = BlinkingLedger(), MemoryStateStore(clock)
    service = trading(ledger, trading_keep_token_views=True)
    async with running(clock, service, store=store) as (bus, watch):
        mint = await ready(bus, market)
        ledger.failures = 1 if back == "for the stand-by" else 1_000_000
        with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
            await service.on_events([market.prediction(mint)])
        await service.leader.stop()
        assert service.role == "standby"
        ledger.failures = 0
        with pytest.raises(RuntimeError, match="views not stored"):
            await service.context.save(service.engine.views)
        assert await ledger.orders(limit=10) == []
        assert watch.count("order.requested") == 0
        ledger.failures = 1_000_000


async def test_views_a_handler_in_flight_saves_after_a_clean_stand_by_are_stored(clock, market):
    """Standing by with the ledger holding every change: the views of a handler still
    in flight are not ahead of it, and are stored (refused, the handler would fail and
    its events go round again at every stop)."""
    store = MemoryStateStore(clock)
    service = trading(MemoryLedger(), trading_keep_token_views=True)
    async with running(clock, service, store=store) as (bus, _):
        mint = await ready(bus, market)
        await store.delete_many([f"trading:view:{mint}"])
        service.context.change(mint)  # decided, its view's write still to come
        await service.leader.stop()
        assert service.role == "standby"
        await service.context.save(service.engine.views)
        assert await store.get(f"trading:view:{mint}") is not None


async def test_a_take_over_watches_the_active_tokens_of_the_stored_views_for_silence(
    clock, market, pg_pool, redis_url, namespace, redis_client
):
    """The views a take-over loads hold each token's lifecycle, and activity tells a
    token's lifecycle again only when it changes: the tokens active there are watched
    from the take-over on, so their silence trips the stale breaker while new tokens
    keep coming, without a lifecycle event after the take-over."""
    ledger = PostgresLedger(pg_pool)
    store = RedisStateStore(url=redis_url, namespace=namespace)
    try:
        first = trading(ledger, trading_keep_token_views=True)
        async with running(clock, first, store=store) as (bus, _):
            active = sorted([await ready(bus, market) for _ in range(10)])
        second = trading(ledger, trading_keep_token_views=True)
        async with running(clock, second, store=store) as (bus, watch):
            risk = second.risk
            assert sorted(risk.active_tokens) == active
            silence = risk.breaker_settings.max_token_silence_s
            taken_over = clock.now()
            # the stream flows (a new token every second), the active tokens say nothing
            while not risk.breakers["stale"].tripped:
                assert clock.now() - taken_over <= silence + 2.0, "the breaker never tripped"
                await publish(bus, market.tokens.created(market.tokens.mint()))
                await clock.advance(1.0)
            # silent since the take-over, the moment their last event is taken to be
            assert clock.now() - taken_over > silence
            [trip] = watch.payloads("trading.breaker")
            assert trip.breaker == "stale" and trip.tripped
            assert trip.reason == f"10 of 10 active tokens silent for over {silence:.0f}s"
    finally:
        await store.close()


def test_the_breakers_take_the_feed_lag_silence_and_rate_settings(monkeypatch):
    monkeypatch.setenv("PUMPFLOW_TRADING_MAX_EVENTS_PER_S", "3000")
    breakers = TradingSettings.load(
        service="trading",
        transport="memory",
        trading_max_feed_lag_s=7.0,
        trading_max_silence_s=90.0,
        trading_max_token_silence_s=45.0,
    ).breakers()
    assert (breakers.max_feed_lag_s, breakers.max_silence_s) == (7.0, 90.0)
    assert breakers.max_token_silence_s == 45.0
    assert breakers.max_events_per_s == 3000.0


def test_the_limits_take_the_re_entry_cooldown_setting(monkeypatch):
    monkeypatch.setenv("PUMPFLOW_TRADING_REENTRY_COOLDOWN_S", "90")
    limits = TradingSettings.load(service="trading", transport="memory").limits()
    assert limits.reentry_cooldown_s == 90.0
    # infinite: no JSON for /limits, which shows it
    for bad in ("-1", "inf", "nan"):
        monkeypatch.setenv("PUMPFLOW_TRADING_REENTRY_COOLDOWN_S", bad)
        with pytest.raises(SettingsError, match="PUMPFLOW_TRADING_REENTRY_COOLDOWN_S"):
            TradingSettings.load(service="trading", transport="memory")


def test_the_limits_of_capital_at_risk_are_settings_an_operator_can_tighten(monkeypatch):
    """The daily loss, the total exposure and one token's share of capital are what an
    operator tightens on a bad day or for a first live run; settings, as the risk per
    trade and the positions held are (the module's defaults argued where they stand)."""
    monkeypatch.setenv("PUMPFLOW_TRADING_MAX_DAILY_LOSS_FRACTION", "0.02")
    monkeypatch.setenv("PUMPFLOW_TRADING_MAX_TOTAL_EXPOSURE_FRACTION", "0.2")
    monkeypatch.setenv("PUMPFLOW_TRADING_MAX_POSITION_FRACTION", "0.05")
    monkeypatch.setenv("PUMPFLOW_TRADING_MAX_TOKEN_EXPOSURE_FRACTION", "0.06")
    limits = TradingSettings.load(service="trading", transport="memory").limits()
    assert limits.max_daily_loss_fraction == 0.02
    assert limits.max_total_exposure_fraction == 0.2
    assert (limits.max_position_fraction, limits.max_token_exposure_fraction) == (0.05, 0.06)
    default = TradingSettings.model_fields["trading_max_daily_loss_fraction"].default
    assert default == RiskLimits().max_daily_loss_fraction
    for bad in ("0", "1.5"):
        monkeypatch.setenv("PUMPFLOW_TRADING_MAX_DAILY_LOSS_FRACTION", bad)
        with pytest.raises(SettingsError, match="PUMPFLOW_TRADING_MAX_DAILY_LOSS_FRACTION"):
            TradingSettings.load(service="trading", transport="memory")


@pytest.mark.parametrize("variable", ["NAME", "CREATOR"])
@pytest.mark.parametrize("entry", ["", "  "])
def test_a_blank_block_list_entry_is_refused_naming_its_variable(monkeypatch, variable, entry):
    """A blank name is a substring of every name: it would block every token, without a
    word (a stray comma in the list, say)."""
    monkeypatch.setenv(f"PUMPFLOW_TRADING_{variable}_BLOCKLIST", json.dumps(["scam", entry]))
    with pytest.raises(SettingsError, match=f"PUMPFLOW_TRADING_{variable}_BLOCKLIST"):
        TradingSettings.load(service="trading", transport="memory")
    with pytest.raises(ValueError, match="blank"):
        EntryFilters(**{f"{variable.lower()}_blocklist": ("scam", entry)})


async def test_a_retired_tokens_view_and_market_go_once_its_position_closes(clock, market):
    """A token retired while a position is held keeps its view and market for the exit's
    sales; once the position closes they go (they stayed, one per traded token, for ever),
    in memory and in the store."""
    service = trading(MemoryLedger(), trading_keep_token_views=True)
    async with running(clock, service) as (bus, watch):
        traded = []
        for _ in range(6):
            mint = await ready(bus, market)
            traded.append(mint)
            await publish(bus, market.prediction(mint))
            await clock.advance(1.0)
            opened = watch.payloads("position.opened")[-1]
            assert opened.mint == mint
            await publish(bus, market.lifecycle(mint, state="inactive"))
            assert mint in service.engine.views  # held: the exit still sells on its market
            await close(bus, watch, clock, mint)
        await clock.advance(1.0)  # the next tick lets the last one go
        assert not set(traded) & set(service.engine.views)
        assert not set(traded) & set(service.executor.broker.markets)
        await service.context.save(service.engine.views)
        assert not set(traded) & set(await service.context.load())


@pytest.mark.parametrize(
    ("method", "path", "body", "named"),
    [
        ("POST", "/halt", {"reason": 5}, "'reason' must be text"),
        ("POST", "/halt", {"reason": ["kill"]}, "'reason' must be text"),
        ("POST", "/halt", {"reason": "a\x00b"}, "without NUL"),
        ("POST", "/halt", {"reason": "x" * 501}, "at most 500 characters"),
        ("POST", "/resume", {"reason": {"why": "x"}}, "'reason' must be text"),
        ("GET", "/orders?state=filed", None, "'filled'"),
    ],
)
async def test_a_bad_operator_request_is_refused_naming_it_and_changes_nothing(
    clock, method, path, body, named
):
    import httpx

    from pumpflow.common.runtime.http import create_app

    ledger = MemoryLedger()
    service = trading(ledger, api_token="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    async with run_embedded([service], clock=clock, synchronous=True) as system:
        app = create_app(service, system.contexts["trading"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            refused = await http.request(method, path, json=body, headers=auth)
            assert refused.status_code == 422, refused.text
            assert named in refused.text and "s3cret" not in refused.text
            assert await ledger.control() is None
            assert service.risk.operator_state.value == "active"
            halted = await http.post("/halt", json={"reason": "drill"}, headers=auth)
            assert halted.status_code == 200 and halted.json()["operator_reason"] == "drill"


async def test_a_replica_elected_again_stores_what_its_stand_by_could_not_before_reading_the_ledger(
    clock, market
):
    """An entry's store reaches the ledger, its reply lost; the lease goes, and the
    stand-by's store of its withdrawal fails too (Postgres away). Elected again with no
    other holder between, the replica stores that withdrawal before it reads the ledger:
    the entry is read withdrawn, never taken for an order in flight and filled unsent, and
    its row has one outcome."""
    ledger = LostReplyLedger()
    service = trading(ledger, trading_lease_ttl_s=1.0)
    key = LEASE_PREFIX + LEASE_NAME
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await lost_reply(ledger, service, market.prediction(mint))
        ledger.fail_next = True
        lease = service.leader.lease
        await lease.store.set_many({key: b"another replica"}, ttl=60.0)
        await eventually(lambda: service.role == "standby", 10.0, what="the lease lost")
        assert not ledger.fail_next, "the stand-by stored nothing"
        await lease.store.delete_many([key])
        await eventually(lambda: service.role == "active", 10.0, what="elected again")
        assert service.reconciled == {} and service.risk.reservations == {}
        [order] = await ledger.orders(limit=10)
        assert order["state"] == "rejected", order
        assert order["outcome"].startswith("withdrawn unsent"), order
        await clock.advance(1.0)
        assert watch.count("order.filled") == 0 and not service.book.holds(mint)
        assert [r.order_id for r in watch.payloads("order.rejected")] == [order["order_id"]]


async def test_what_a_failed_stand_by_left_is_dropped_once_another_replica_holds_the_ledger(
    clock, market, caplog
):
    """As above, but another replica read the ledger meanwhile: what the stand-by could
    not store is that replica's to decide, and elected again this one stores none of it
    behind its back (the entry, in flight as after a crash, keeps the one outcome the
    ledger gives it)."""
    ledger = LostReplyLedger()
    service = trading(ledger, trading_lease_ttl_s=1.0, trading_predecessor_wait_s=0.05)
    key = LEASE_PREFIX + LEASE_NAME
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await lost_reply(ledger, service, market.prediction(mint))
        ledger.fail_next = True
        lease = service.leader.lease
        await lease.store.set_many({key: b"another replica"}, ttl=60.0)
        await eventually(lambda: service.role == "standby", 10.0, what="the lease lost")
        await ledger.load(remembered=10, holder="another replica")
        caplog.clear()
        await lease.store.delete_many([key])
        await eventually(lambda: service.role == "active", 10.0, what="elected again")
        [order] = await ledger.orders(limit=10)
        assert service.reconciled == {order["order_id"]: "resubmitted"}
        assert watch.count("order.rejected") == 0
        await clock.advance(1.0)
        [fill] = watch.payloads("order.filled")
        assert fill.order_id == order["order_id"] and service.book.holds(mint)
        [stored] = await ledger.orders(limit=10)
        assert stored["state"] == "filled"
        assert any("another replica took over" in r.getMessage() for r in caplog.records)


async def test_a_shutdown_handed_back_after_its_barriers_store_failed_waits_for_it(clock, market):
    """The barrier waits behind a fill a timed round could not store (Postgres away), and
    its store fails too: the shutdown is handed back. Handed back once Postgres is back,
    it is acknowledged only once its barrier is stored and out, not before: a replica
    gone meanwhile would leave the exit service waiting for a barrier never announced."""
    ledger = BlinkingLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        [entry] = watch.payloads("order.requested")
        ledger.failures = 1  # the fill's store, on the timed round
        await clock.advance(service.settings.trading_tick_s)
        assert service.book.holds(mint) and watch.count("position.opened") == 0
        shutdown = make_event(SystemShutdown(reason="operator"), source="cli/t", time=clock.now())
        ledger.failures = 2  # the halt's announcement, then the barrier
        with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
            await service.on_events([shutdown])
        assert watch.count("trading.barrier") == 0

        await service.on_events([shutdown])  # handed back: returned, it is acknowledged
        [barrier] = watch.payloads("trading.barrier")
        assert [p.position_id for p in barrier.positions] == [entry.order_id]
        assert [s.state for s in watch.payloads("trading.state")] == ["halted"]


async def test_the_orders_a_restart_refuses_itself_count_toward_no_execution_breaker(clock, market):
    """The ledger holds orders the restarted replica refuses itself: two of the live
    executor, a sale of a position gone, an entry decided with no market data. None
    failed at the executor or the venue, so none counts toward the execution breaker:
    it stays clear, entries go on, and the next real failure is the first in a row."""
    ledger = MemoryLedger()
    await ledger.load(remembered=10, holder="the replica before")
    mint = market.tokens.mint()

    def order(order_id: str, **fields: object) -> OrderRecord:
        record = OrderRecord(
            order_id=order_id, mint=mint, side="buy", sol_amount=0.1, token_amount=None,
            slippage_pct=5.0, reason="", position_id=None, cause_id=None, executor="paper",
            state="sent", requested_at=clock.now(), venue="curve",
        )  # fmt: skip
        return replace(record, **fields)

    await ledger.commit(
        LedgerChange(
            orders=[
                order("live-1", executor="live"),
                order("live-2", executor="live"),
                order("sale", side="sell", sol_amount=None, token_amount=1e6, position_id="gone"),
                order("no-market"),
            ],
            holder="the replica before",
        )
    )
    service = trading(ledger)
    async with running(clock, service):
        assert set(service.reconciled.values()) == {"rejected"}
        assert len(service.reconciled) == 4
        assert not service.risk.breakers["execution"].tripped
        assert service.risk.state is TradingState.ACTIVE
        assert service.risk.consecutive_failures == 0


async def test_a_shutdown_dead_lettered_by_a_defect_is_applied_once_redriven(clock, market):
    """A system.shutdown trading dead-lettered (a defect made its halt raise) goes back to
    trading's shared critical queue once the defect is fixed: the replica trading halts
    and publishes the barrier, once."""
    service = trading(MemoryLedger())
    async with running(clock, service) as (bus, watch):
        halt = service.halt
        fixed = False

        async def defective(*args, **kwargs):
            if not fixed:
                raise RuntimeError("a defect of the halt")
            return await halt(*args, **kwargs)

        service.halt = defective
        data = SystemShutdown(reason="operator", request_id="stop-1")
        await publish(bus, make_event(data, source="cli/t", time=clock.now()))
        [letter] = await bus.dead_letters("trading", remove=False)
        assert letter.event_type == "system.shutdown" and "a defect of the halt" in letter.reason
        assert watch.count("trading.barrier") == 0
        assert service.risk.operator_state is TradingState.ACTIVE
        fixed = True
        count = await redrive(bus, "trading")
        assert (count.redriven, count.keyless) == (1, 0)
        [barrier] = watch.payloads("trading.barrier")
        assert barrier.request_id == "stop-1"
        assert service.risk.operator_state is TradingState.HALTED
        assert await service.ledger.control() == (TradingState.HALTED, "shutdown: operator")
        assert await bus.dead_letters("trading", remove=False) == []


async def test_orders_says_when_the_limit_left_some_out(clock, market):
    """``count`` is of the orders listed: ``more`` says whether the ledger holds more."""
    import httpx

    from pumpflow.common.runtime.http import create_app

    service = trading(MemoryLedger())
    async with running(clock, service) as (bus, _):
        await entries_queued(bus, market, 3)
        await clock.advance(1.0)
        app = create_app(service, service._ctx)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            cut = (await http.get("/orders?limit=2")).json()
            whole = (await http.get("/orders?limit=3")).json()
    assert (cut["count"], len(cut["orders"]), cut["more"]) == (2, 2, True)
    assert (whole["count"], len(whole["orders"]), whole["more"]) == (3, 3, False)
