"""The exit service embedded on the in-memory bus and a replay clock: each rule of a
position orders its sale as an ``exit.order`` on the critical lane, numbered per
position; a sale refused gives its rule back; a settled sale is stored and reported."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.clock import ReplayClock
from pumpflow.common.consumer import Record
from pumpflow.common.events import (
    ExitOrder,
    OrderRejected,
    PositionClosed,
    PositionUpdated,
    TokenLifecycle,
    make_event,
)
from pumpflow.common.runtime.runner import run_service
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.testing import TokenEvents, drop_schema, eventually, free_port, http_json
from pumpflow.common.testing.plugin import bus_harness_fixture
from pumpflow.exit.records import MemoryExitStore
from pumpflow.exit.service import ExitService
from pumpflow.exit.settings import ExitSettings

from .helpers import (
    START,
    FlakyExitStore,
    embedded,
    exit_service,
    filled,
    on_broker,
    opened,
    started,
)

HELD = 1e6
PARTITIONS = 4
harness = bus_harness_fixture(partitions=PARTITIONS, synchronous=True)


async def held_position(bus, tokens: TokenEvents):
    """A new token with a buy on its curve and a position of ``HELD`` tokens in it."""
    mint = tokens.mint()
    await bus.publish(tokens.created(mint, sol=5.0))
    await bus.publish(tokens.buy(mint, "whale", sol=10.0))
    position = opened(tokens, mint, tokens_held=HELD)
    await bus.publish(position)
    return mint, position


async def test_the_feeds_creations_it_does_not_take_leave_no_seq_missing():
    """Exit takes the feed's trades, not its creations: seq 1 is skipped by design, so
    a token's record keeps no seq missing (it did, for ever) and counts no gap."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service()
    async with embedded(clock, service) as (system, _):
        mint, _ = await held_position(system.bus, tokens)
        await system.bus.publish(tokens.buy(mint, "whale", sol=1.0))
        raw = await system.store.get(f"exit:key:{mint}")
        record = msgspec.msgpack.decode(raw, type=Record)
        assert record.applied["feed"] == 3
        assert record.missing == {}
        assert service.consumer.metrics.gaps._value.get() == 0


async def test_a_replica_that_stops_says_how_many_positions_of_its_share_are_left_unwatched(
    harness, caplog
):
    """A replica stopping (SIGTERM, a scale-down; not a graceful exit) leaves the exit
    rules of its share's positions not running until a replica takes their partitions:
    over the broker its log warns how many, and that nothing is lost. In one process (an
    embedded run, a backtest) the bus keeps nothing past it: the rules end with the run,
    which its report shows, and no warning. With none held it says nothing."""
    caplog.set_level("INFO", logger="pumpflow.exit")
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service(partitions=PARTITIONS)
    bus = await harness.bus(partitions=PARTITIONS, source="trading/test")
    replica_bus = await on_broker(
        harness, service, clock=clock, store=MemoryStateStore(clock), partitions=PARTITIONS
    )
    try:
        for _ in range(3):
            await held_position(bus, tokens)
        await eventually(lambda: len(service.positions()) == 3, what="three positions held")
    finally:
        service.stopping()
        await service.stop()
        await replica_bus.close()
        await bus.close()
    [said] = [r for r in caplog.records if "positions of this replica's share" in r.getMessage()]
    if harness.transport == "rabbitmq":
        assert said.levelname == "WARNING"
        assert said.getMessage() == (
            "exit: stopping with 3 positions of this replica's share open: their exit rules "
            "(stop-loss, take-profit, timeouts) do not run until a replica takes their "
            "partitions, and run again then (their events wait in the queues)"
        )
    else:
        assert said.levelname == "INFO"
        assert said.getMessage() == (
            "exit: stopping with 3 positions of this replica's share open: the bus keeps no "
            "events past this process, so their exit rules end with it"
        )
    caplog.clear()
    idle = exit_service(partitions=PARTITIONS)
    idle_bus = await on_broker(
        harness, idle, clock=clock, store=MemoryStateStore(clock), partitions=PARTITIONS
    )
    idle.stopping()
    await idle.stop()
    await idle_bus.close()
    assert "positions of this replica's share" not in caplog.text


class Replica(ExitService):
    """The exit service as ``pumpflow serve exit`` runs it, on metrics of its own."""

    def __init__(self, settings: ExitSettings):
        super().__init__(settings, registry=CollectorRegistry())


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.postgres
async def test_a_replica_stopped_by_the_runtime_says_how_many_positions_it_leaves_unwatched(
    namespace, amqp_url, redis_url, postgres_dsn, rabbitmq_harness, caplog
):
    """Stopped as by SIGTERM, the runtime's way: its partitions are revoked (their keys
    handed over) before the service stops, and the warning still counts the positions
    of its share."""
    caplog.set_level("INFO", logger="pumpflow.exit")
    port = free_port()
    settings = ExitSettings(
        service="exit",
        replica="r1",
        transport="rabbitmq",
        amqp_url=amqp_url,
        redis_url=redis_url,
        postgres_dsn=postgres_dsn,
        namespace=namespace,
        partitions=PARTITIONS,
        http_port=port,
        log_format="text",
        consumer_groups="exit,exit-control",
    )
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    bus = await rabbitmq_harness.bus(partitions=PARTITIONS, source="trading/test")
    stop = asyncio.Event()
    runner = asyncio.create_task(run_service(Replica, settings, stop=stop))
    try:

        async def held() -> int | None:
            # this process serves it: asked from a thread of its own
            body = await asyncio.to_thread(http_json, f"http://127.0.0.1:{port}/positions")
            return (body or {}).get("count")

        async def answering() -> bool:
            return runner.done() or await held() is not None

        await eventually(answering, 120.0, what="the exit replica answering")
        for _ in range(3):
            await held_position(bus, tokens)

        async def holds_them() -> bool:
            return await held() == 3

        await eventually(holds_them, 60.0, what="three positions held")
        stop.set()
        assert await asyncio.wait_for(runner, 60) == 0
    finally:
        stop.set()
        if not runner.done():
            runner.cancel()
        await bus.close()
        await drop_schema(postgres_dsn, namespace)
    said = [r.getMessage() for r in caplog.records if "of this replica's share" in r.getMessage()]
    assert said == [
        "exit: stopping with 3 positions of this replica's share open: their exit rules "
        "(stop-loss, take-profit, timeouts) do not run until a replica takes their "
        "partitions, and run again then (their events wait in the queues)"
    ], caplog.text


async def _buy_until(bus, tokens: TokenEvents, mint: str, price: float) -> None:
    while tokens.curves[mint].price < price:
        await bus.publish(tokens.buy(mint, "whale", sol=1.0))


async def _sell_until(bus, tokens: TokenEvents, mint: str, price: float) -> None:
    whale = "whale"
    while tokens.curves[mint].price > price:
        held = tokens.balance(mint, whale)
        assert held > 0, "the whale has nothing left to sell"
        await bus.publish(tokens.sell(mint, whale, tokens=held * 0.1))


async def take_profit(bus, tokens, clock, mint, entry):
    await _buy_until(bus, tokens, mint, entry * 1.5)


async def stop_loss(bus, tokens, clock, mint, entry):
    await _sell_until(bus, tokens, mint, entry * 0.69)


async def trailing_stop(bus, tokens, clock, mint, entry):
    await _buy_until(bus, tokens, mint, entry * 1.3)
    await _sell_until(bus, tokens, mint, entry * 1.3 * 0.69)


async def inactivity(bus, tokens, clock, mint, entry):
    await clock.advance(61.0)


async def time_stop(bus, tokens, clock, mint, entry):
    for _ in range(21):  # a trade every 30 s keeps it from going quiet
        await clock.advance(30.0)
        await bus.publish(tokens.buy(mint, "small", sol=0.001))


async def stale_stop(bus, tokens, clock, mint, entry):
    for _ in range(11):
        await clock.advance(30.0)
        await bus.publish(tokens.buy(mint, "small", sol=0.001))


async def decline(bus, tokens, clock, mint, entry):
    lifecycle = TokenLifecycle(mint=mint, state="declining", previous_state="active")
    await bus.publish(make_event(lifecycle, source="activity/test", time=clock.now()))


async def migration(bus, tokens, clock, mint, entry):
    await bus.publish(tokens.migrated(mint))


RULES = {
    "take_profit_1": (take_profit, 0.25),
    "stop_loss": (stop_loss, 1.0),
    "trailing_stop": (trailing_stop, 1.0),
    "inactivity": (inactivity, 1.0),
    "time_stop": (time_stop, 1.0),
    "stale_stop": (stale_stop, 1.0),
    "decline": (decline, 0.5),
    "migration": (migration, 1.0),
}
#: rules switched off so that the one under test is the first to fire
QUIET = {
    "time_stop": {"exit_stale_after_s": None},
    "stale_stop": {},
}


@pytest.mark.parametrize("rule", sorted(RULES))
async def test_each_rule_orders_its_sale_on_the_critical_lane(rule):
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    script, share = RULES[rule]
    service = exit_service(**QUIET.get(rule, {}))
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint, position = await held_position(bus, tokens)
        entry = position.data.entry_price
        assert watch.count("exit.order") == 0
        await script(bus, tokens, clock, mint, entry)
        [event] = watch.of("exit.order")
        order: ExitOrder = event.data
        assert event.critical
        assert order.reason == rule
        assert order.order_id == f"{position.data.position_id}:rule:1"
        assert order.token_amount == pytest.approx(HELD * share)
        assert service.metrics.orders(rule) == 1


async def test_a_trade_on_its_pool_tells_the_migration_and_sells_everything():
    """The token's migrate frame never came (PumpPortal keeps no history: one sent while
    the feed reconnects is lost): its first trade on the AMM pool tells the migration,
    and the migration rule sells everything as the frame would have, once."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service()
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint, position = await held_position(bus, tokens)
        await bus.publish(tokens.buy(mint, "bob", sol=0.5, pool="pump-amm"))
        [event] = watch.of("exit.order")
        order: ExitOrder = event.data
        assert order.reason == "migration"
        assert order.position_id == position.data.position_id
        assert order.token_amount == pytest.approx(HELD)
        # the frame coming late changes nothing
        await bus.publish(tokens.migrated(mint))
        await bus.publish(tokens.buy(mint, "bob", sol=0.5, pool="pump-amm"))
        assert watch.count("exit.order") == 1


async def test_tokens_added_to_a_position_are_sold_with_it():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service()
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint, position = await held_position(bus, tokens)
        # a second entry into the token (trading's add_to_positions)
        added = PositionUpdated(
            **{**msgspec.structs.asdict(position.data), "token_amount": HELD * 1.5}
        )
        await bus.publish(make_event(added, source="trading/test", time=clock.now()))
        await stop_loss(bus, tokens, clock, mint, position.data.entry_price)
        [event] = watch.of("exit.order")
        assert event.data.reason == "stop_loss"
        assert event.data.token_amount == pytest.approx(HELD * 1.5)


async def test_a_refused_sale_gives_its_rule_back_and_a_filled_one_is_reported():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = None
    service = exit_service()
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint, position = await held_position(bus, tokens)
        entry = position.data.entry_price
        await _buy_until(bus, tokens, mint, entry * 1.5)
        [first] = watch.payloads("exit.order")
        refused = OrderRejected(
            order_id=first.order_id, mint=mint, reason="slippage", side="sell",
            position_id=first.position_id,
        )  # fmt: skip
        await bus.publish(make_event(refused, source="trading/test", time=clock.now()))
        # the next trade finds the step due again: a new order, the next number
        await bus.publish(tokens.buy(mint, "small", sol=0.001))
        second = watch.payloads("exit.order")[-1]
        assert second.reason == "take_profit_1"
        assert second.order_id.endswith(":rule:2")
        price = tokens.curves[mint].price
        await bus.publish(filled(second, price, clock.now()))
        await system.drain()
        records = service.records
        [report] = await watch.wait_for(1, "exit.report")
        assert report.data.reason == "take_profit_1"
        [line] = report.data.positions
        assert line.tokens_sold == pytest.approx(second.token_amount)
        assert line.slippage == pytest.approx(1 - 0.99 * price / line.mark_price)
        stored = {o["order_id"]: o["state"] for o in await records.orders(limit=10)}
        assert stored == {first.order_id: "rejected", second.order_id: "filled"}


async def test_an_outage_of_the_records_as_a_sale_settles_is_waited_out():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = FlakyExitStore(failures=2)
    service = exit_service(records)
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint, position = await held_position(bus, tokens)
        await _buy_until(bus, tokens, mint, position.data.entry_price * 1.5)
        [order] = watch.payloads("exit.order")
        price = tokens.curves[mint].price
        await bus.publish(filled(order, price, clock.now()))
        [report] = await watch.wait_for(1, "exit.report")
        assert records.failures == 0
        assert report.data.reason == "take_profit_1"
        stored = {o["order_id"]: o["state"] for o in await records.orders(limit=10)}
        assert stored == {order.order_id: "filled"}


async def test_tokens_added_after_a_sale_filled_are_sold_with_the_rest():
    """A take-profit step sold a quarter, then trading adds to the position: the rules
    sell everything held, the tokens added included (not the holding less the sale)."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service()
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint, position = await held_position(bus, tokens)
        await take_profit(bus, tokens, clock, mint, position.data.entry_price)
        [step] = watch.payloads("exit.order")
        assert step.token_amount == pytest.approx(HELD * 0.25)
        await bus.publish(filled(step, tokens.curves[mint].price, clock.now()))
        fields = msgspec.structs.asdict(position.data)
        sold = PositionUpdated(**{**fields, "token_amount": HELD * 0.75})
        await bus.publish(make_event(sold, source="trading/test", time=clock.now()))
        # a second entry into the token (trading's add_to_positions): half as much again
        added = PositionUpdated(**{**fields, "token_amount": HELD * 1.25})
        await bus.publish(make_event(added, source="trading/test", time=clock.now()))
        await inactivity(bus, tokens, clock, mint, position.data.entry_price)
        last = watch.payloads("exit.order")[-1]
        assert last.reason == "inactivity"
        assert last.token_amount == pytest.approx(HELD * 1.25)


async def test_a_position_update_delivered_after_its_close_sells_nothing():
    """Trading's update (seq 2) comes after the close (seq 3) that followed it: the
    consumer applies it late, once; the position stays closed here, and no rule orders a
    sale of it (trading would refuse it, the refusal giving the rule back, again and
    again)."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service()
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint = tokens.mint()
        await bus.publish(tokens.created(mint, sol=5.0))
        await bus.publish(tokens.buy(mint, "whale", sol=10.0))
        position = opened(tokens, mint, tokens_held=HELD).data
        fields = msgspec.structs.asdict(position)
        updated = PositionUpdated(**{**fields, "token_amount": HELD / 2})
        closed = PositionClosed(**{**fields, "token_amount": 0.0}, reason="sold by hand")
        for payload, seq in ((position, 1), (closed, 3), (updated, 2)):
            await bus.publish(make_event(payload, source="trading/test", time=clock.now(), seq=seq))
        await service.consumer.flush()
        assert service.positions() == []
        await inactivity(bus, tokens, clock, mint, position.entry_price)
        assert watch.count("exit.order") == 0


async def test_no_rule_of_silence_sells_a_position_whose_trades_are_still_queued():
    """400 s of the clock behind the market (a backlog), exit applies a held token's
    trades, one every 10 s of event time: in the market's time the token is never quiet,
    so nothing is sold for silence."""
    lag = 400.0
    market = ReplayClock(START)
    clock = ReplayClock(START + lag)
    tokens = TokenEvents(market)
    service = exit_service()
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint, _ = await held_position(bus, tokens)
        for _ in range(20):
            await market.advance(10.0)
            await clock.advance(10.0)
            await bus.publish(tokens.buy(mint, "small", sol=0.001))
        assert watch.of("exit.order") == []
        assert service.consumer.state(mint).position is not None


async def test_the_wait_after_refusals_holds_a_silent_position_in_the_markets_time():
    """400 s of the clock behind the market, a silent token's position is ordered sold
    and refused twice: its rules wait a second, in the market's time (the time they
    judge at), then order again, once; no timer fires over and over meanwhile."""
    lag = 400.0
    market = ReplayClock(START)
    clock = ReplayClock(START + lag)
    tokens = TokenEvents(market)
    service = exit_service(exit_stale_after_s=None)
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint, _ = await held_position(bus, tokens)
        await clock.advance(61.0)  # silent for a minute of the market: sold
        for refusal in (1, 2):
            order = watch.payloads("exit.order")[-1]
            assert (order.reason, order.order_id[-1]) == ("inactivity", str(refusal))
            refused = OrderRejected(
                order_id=order.order_id, mint=mint, reason="slippage", side="sell",
                position_id=order.position_id,
            )  # fmt: skip
            await bus.publish(make_event(refused, source="trading/test", time=clock.now()))
            if refusal == 1:
                await clock.advance(0.01)  # the first refusal gives the rule back at once
        fired = service.consumer.metrics.timers._value.get()
        await asyncio.wait_for(clock.advance(0.5), 10.0)
        assert len(watch.payloads("exit.order")) == 2
        assert service.consumer.metrics.timers._value.get() - fired <= 1
        await asyncio.wait_for(clock.advance(0.6), 10.0)
        assert [o.order_id[-1] for o in watch.payloads("exit.order")] == ["1", "2", "3"]


async def test_a_stop_loss_refused_once_orders_again_at_once_on_a_silent_token():
    """The first refusal gives the rule back to order again at once: a stop loss refused
    (the dump moved the price past the sale's limit) orders again as the refusal comes,
    not at the token's next trade (after a rug there may be none for a minute, and the
    next seller's sale comes first)."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service()
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint, position = await held_position(bus, tokens)
        await stop_loss(bus, tokens, clock, mint, position.data.entry_price)
        [first] = watch.payloads("exit.order")
        assert first.reason == "stop_loss"
        await clock.advance(0.5)
        refused = OrderRejected(
            order_id=first.order_id, mint=mint, reason="slippage", side="sell",
            position_id=first.position_id,
        )  # fmt: skip
        await bus.publish(make_event(refused, source="trading/test", time=clock.now()))
        await service.consumer.flush()
        orders = watch.payloads("exit.order")
        assert [(o.reason, o.order_id[-1]) for o in orders] == [
            ("stop_loss", "1"),
            ("stop_loss", "2"),
        ]
        assert orders[1].token_amount == pytest.approx(HELD)


async def test_a_refused_partial_sale_after_a_full_exit_is_sold_by_that_exit():
    """A take-profit step's sale is under way when the trailing stop sells everything
    left; the step's sale is refused: its tokens come back to the rules, and the trailing
    stop, still due, sells them (they stayed held through the dump until a rule of time)."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service()
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint, position = await held_position(bus, tokens)
        entry = position.data.entry_price
        await take_profit(bus, tokens, clock, mint, entry)
        await _sell_until(bus, tokens, mint, tokens.curves[mint].price * 0.69)
        step, trail = watch.payloads("exit.order")
        assert (step.reason, trail.reason) == ("take_profit_1", "trailing_stop")
        await bus.publish(filled(trail, tokens.curves[mint].price, clock.now()))
        refused = OrderRejected(
            order_id=step.order_id, mint=mint, reason="slippage", side="sell",
            position_id=step.position_id,
        )  # fmt: skip
        await bus.publish(make_event(refused, source="trading/test", time=clock.now()))
        await bus.publish(tokens.sell(mint, "whale", tokens=tokens.balance(mint, "whale") * 0.01))
        await service.consumer.flush()
        last = watch.payloads("exit.order")[-1]
        assert (last.reason, last.order_id[-1]) == ("trailing_stop", "3")
        assert last.token_amount == pytest.approx(step.token_amount)


async def test_a_migration_told_by_a_pool_trade_orders_again_only_what_is_held():
    """The first pool trade tells the migration and marks the token in one go: the
    migration's sale is not taken for tokens added to the position, so its refusal
    orders again the tokens held, not twice as many."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service()
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint, _ = await held_position(bus, tokens)
        await bus.publish(tokens.buy(mint, "bob", sol=0.5, pool="pump-amm"))
        [first] = watch.payloads("exit.order")
        refused = OrderRejected(
            order_id=first.order_id, mint=mint, reason="slippage", side="sell",
            position_id=first.position_id,
        )  # fmt: skip
        await bus.publish(make_event(refused, source="trading/test", time=clock.now()))
        await bus.publish(tokens.buy(mint, "bob", sol=0.5, pool="pump-amm"))
        await service.consumer.flush()
        orders = watch.payloads("exit.order")
        assert [o.reason for o in orders] == ["migration", "migration"]
        assert orders[1].token_amount == pytest.approx(HELD)


async def test_tokens_added_while_a_full_exit_is_under_way_are_sold_by_it():
    """The trailing stop orders everything left sold; an entry adds to the position
    before that sale settles (trading's add_to_positions): the trailing stop, still due
    at the token's next trade, sells the tokens added too."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service()
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint, position = await held_position(bus, tokens)
        await trailing_stop(bus, tokens, clock, mint, position.data.entry_price)
        [trail] = watch.payloads("exit.order")
        assert (trail.reason, trail.token_amount) == ("trailing_stop", pytest.approx(HELD))
        added = PositionUpdated(
            **{**msgspec.structs.asdict(position.data), "token_amount": HELD * 1.5}
        )
        await bus.publish(make_event(added, source="trading/test", time=clock.now()))
        await bus.publish(tokens.buy(mint, "small", sol=0.001))
        await service.consumer.flush()
        last = watch.payloads("exit.order")[-1]
        assert (last.reason, last.order_id[-1]) == ("trailing_stop", "2")
        assert last.token_amount == pytest.approx(HELD * 0.5)


async def test_the_ladder_of_the_settings_sells_the_position():
    """``exit_take_profit`` is the ladder the rules sell by: half at +30% (the default
    ladder's first step is +50%)."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service(exit_take_profit="[[0.3, 0.5]]")
    async with embedded(clock, service) as (system, watch):
        mint, position = await held_position(system.bus, tokens)
        await _buy_until(system.bus, tokens, mint, position.data.entry_price * 1.3)
        [order] = watch.payloads("exit.order")
        assert order.reason == "take_profit_1"
        assert order.token_amount == pytest.approx(HELD * 0.5)


async def test_a_replica_started_with_another_ladder_keeps_the_steps_fired_by_their_place():
    """A position's steps that fired are stored by their place in the ladder: the
    replica that follows with another ladder takes its first step as fired and sells the
    second's share of the tokens bought at the second's gain."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    first = exit_service(records)
    async with embedded(clock, first) as (system, watch):
        bus = system.bus
        mint, position = await held_position(bus, tokens)
        entry = position.data.entry_price
        await _buy_until(bus, tokens, mint, entry * 1.5)
        [step] = watch.payloads("exit.order")
        assert step.reason == "take_profit_1"
        assert step.token_amount == pytest.approx(HELD * 0.25)
        await first.stop()
        second = await started(system, records, exit_take_profit="[[0.3, 0.25], [0.6, 0.5]]")
        try:
            await _buy_until(bus, tokens, mint, entry * 1.55)
            assert watch.count("exit.order") == 1
            await _buy_until(bus, tokens, mint, entry * 1.6)
            [_, later] = watch.payloads("exit.order")
            assert later.reason == "take_profit_2"
            assert later.token_amount == pytest.approx(HELD * 0.5)
        finally:
            await second.stop()
