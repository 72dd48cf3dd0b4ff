"""An operator's sale (``exit.sale_requested``, ``POST /positions/{mint}/sell``): the
owner of the mint orders it as one of the position's rules, a share of what the rules
have not ordered sold; a copy of the request sells nothing more; nothing is sold
without the position asked for, nor while a graceful exit sells every position; a
refused sale gives its tokens back to the rules. Over the HTTP API beside the real
trading service, the position is sold."""

from __future__ import annotations

import functools

import httpx
import pytest

from pumpflow.common.bus import partition_of
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.bus.ownership import BalancedBus, OwnershipConfig
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import Event, OrderRejected, SaleRequested, make_event
from pumpflow.common.exit import REQUESTED
from pumpflow.common.runtime.http import create_app
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.testing import EventCollector, TokenEvents, eventually
from pumpflow.common.testing.plugin import bus_harness_fixture
from pumpflow.exit.records import MemoryExitStore
from pumpflow.exit.service import ExitService
from pumpflow.trading.ledger import MemoryLedger

from .helpers import START, embedded, exit_service, hold, on_broker, started
from .test_graceful_service import open_positions, trading

HELD = 1e6
PARTITIONS = 4
harness = bus_harness_fixture(partitions=PARTITIONS, synchronous=True)
AUTH = {"Authorization": "Bearer secret"}


def request(mint: str, *, source: str = "exit/api", time: float = START, **fields) -> Event:
    return make_event(SaleRequested(mint=mint, **fields), source=source, time=time)


async def held_position(bus, tokens: TokenEvents):
    mint = tokens.mint()
    return mint, await hold(bus, tokens, mint, tokens_held=HELD)


async def test_a_requested_share_is_ordered_as_a_rule_and_its_copy_sells_nothing():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service()
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint, position = await held_position(bus, tokens)
        half = request(mint, fraction=0.5, reason="taking some off", time=clock.now())
        await bus.publish(half)
        [event] = watch.of("exit.order")
        assert event.critical
        order = event.data
        assert order.reason == REQUESTED
        assert order.order_id == f"{position.position_id}:rule:1"
        assert order.token_amount == pytest.approx(HELD * 0.5)
        # the same request delivered again (a redelivery; an API retry with its id)
        await bus.publish(half)
        assert watch.count("exit.order") == 1
        # all of the rest, then nothing is left to a rule's sale
        await bus.publish(request(mint, time=clock.now()))
        rest = watch.payloads("exit.order")[-1]
        assert rest.order_id == f"{position.position_id}:rule:2"
        assert rest.token_amount == pytest.approx(HELD * 0.5)
        while tokens.curves[mint].price < position.entry_price * 3:
            await bus.publish(tokens.buy(mint, "whale", sol=1.0))
        await bus.publish(request(mint, time=clock.now()))
        assert watch.count("exit.order") == 2
        assert service.metrics.orders(REQUESTED) == 2
        ordered = service.metrics._f.requests.labels("ordered")._value.get()
        refused = service.metrics._f.requests.labels("refused")._value.get()
        assert (ordered, refused) == (2, 1)


async def test_no_sale_without_the_position_asked_for_nor_during_a_graceful_exit():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service()
    answers = []
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        service.processor.on_request = lambda mint, event, order, why: answers.append(
            (mint, order, why)
        )
        unheld = tokens.mint()
        await bus.publish(tokens.created(unheld, sol=5.0))
        await bus.publish(request(unheld, time=clock.now()))
        mint, position = await held_position(bus, tokens)
        await bus.publish(request(mint, position_id="pos-other", time=clock.now()))
        service.processor.halted = True  # as a graceful exit under way sets it
        await bus.publish(request(mint, time=clock.now()))
        assert watch.count("exit.order") == 0
        assert answers == [
            (unheld, None, "no position held"),
            (mint, None, f"the position held is {position.position_id}"),
            (mint, None, "a graceful exit is selling every position"),
        ]
        service.processor.halted = False
        await bus.publish(request(mint, position_id=position.position_id, time=clock.now()))
        assert watch.payloads("exit.order")[0].token_amount == pytest.approx(HELD)


async def test_a_request_for_a_token_never_seen_leaves_no_key_behind():
    """A mint mistyped, or of a token long gone: nothing is sold, and the key the request
    made leaves memory and the partition's index (no lifecycle would ever retire it);
    its record keeps the request's id for the retirement's TTL, so a copy sells
    nothing should the token trade meanwhile."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service()
    answers = []
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        service.processor.on_request = lambda mint, event, order, why: answers.append(why)
        mint = tokens.mint()
        typo = request(mint, time=clock.now())
        await bus.publish(typo)
        await service.consumer.flush()
        assert answers == ["no position held"]
        assert mint not in set(service.consumer.keys())
        await hold(bus, tokens, mint, tokens_held=HELD)
        await bus.publish(typo)
        assert watch.count("exit.order") == 0 and answers == ["no position held"]


async def test_a_refused_requested_sale_gives_its_tokens_back_to_the_rules(caplog):
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service()
    async with embedded(clock, service) as (system, watch):
        bus = system.bus
        mint, position = await held_position(bus, tokens)
        await bus.publish(request(mint, fraction=0.25, time=clock.now()))
        [order] = watch.payloads("exit.order")
        refusal = OrderRejected(
            order_id=order.order_id, mint=mint, reason="slippage", side="sell",
            position_id=position.position_id,
        )  # fmt: skip
        with caplog.at_level("WARNING", logger="pumpflow.exit"):
            await bus.publish(make_event(refusal, source="trading/test", time=clock.now()))
            # the operator was told "sale ordered" and no rule orders it again: said loud
            await eventually(
                lambda: any(
                    r.levelname == "WARNING" and order.order_id in r.getMessage()
                    and "not ordered again" in r.getMessage()
                    for r in caplog.records
                ),
                within=10.0,
            )  # fmt: skip
        # the stop loss sells everything held: the refused quarter too
        whale = "whale"
        while tokens.curves[mint].price > position.entry_price * 0.69:
            await bus.publish(tokens.sell(mint, whale, tokens=tokens.balance(mint, whale) * 0.1))
        stop = watch.payloads("exit.order")[-1]
        assert stop.reason == "stop_loss"
        assert stop.token_amount == pytest.approx(HELD)


async def test_a_request_over_the_broker_is_ordered_by_the_partitions_owner(harness, namespace):
    """Published by one process's API, applied by the exit replica that owns the mint
    (here the only one), over the real transport too."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    service = exit_service(partitions=PARTITIONS)
    bus = await harness.bus(partitions=PARTITIONS, source="trading/test")
    watch = await EventCollector("watch").attach(bus, "exit.*")
    replica_bus = await on_broker(
        harness, service, clock=clock, store=MemoryStateStore(clock), partitions=PARTITIONS
    )
    try:
        mint, position = await held_position(bus, tokens)
        await eventually(lambda: len(service.positions()) == 1, what="the position held")
        answered, answer = await service.request_sale(
            SaleRequested(mint=mint, fraction=0.5), request_id="req-1", wait_s=30.0
        )
        assert answered and answer["ordered"], answer
        assert answer["order_id"] == f"{position.position_id}:rule:1"
        [order] = await watch.wait_for(1, "exit.order", within=30)
        assert order.data.order_id == answer["order_id"]
        assert order.data.token_amount == pytest.approx(HELD * 0.5)
        # the same id asked again: the answer again, nothing published
        again = await service.request_sale(
            SaleRequested(mint=mint, fraction=0.5), request_id="req-1", wait_s=30.0
        )
        assert again == (True, answer)
    finally:
        await service.stop()
        await replica_bus.close()
        await bus.close()


async def test_a_copy_delivered_after_a_restart_sells_nothing():
    """The request's id is stored with the mint: the replica that follows a restart
    drops a copy of it (the broker's redelivery of one not acked) and numbers on."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    first = exit_service(records)
    async with embedded(clock, first) as (system, watch):
        bus = system.bus
        mint, position = await held_position(bus, tokens)
        half = request(mint, fraction=0.5, time=clock.now())
        await bus.publish(half)
        assert watch.count("exit.order") == 1
        await first.stop()
        second = await started(system, records)
        try:
            await bus.publish(half)
            assert watch.count("exit.order") == 1
            await bus.publish(request(mint, time=clock.now()))
            [_, rest] = watch.payloads("exit.order")
            assert rest.order_id == f"{position.position_id}:rule:2"
            assert rest.token_amount == pytest.approx(HELD * 0.5)
        finally:
            await second.stop()


async def test_http_sell_needs_the_token_and_sells_the_position_through_trading():
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    trader, exits = trading(MemoryLedger()), exit_service(api_token="secret")
    async with embedded(clock, trader, exits) as (system, watch):
        [mint, other] = await open_positions(system.bus, clock, tokens, 2)
        held = trader.book.open_positions[mint].tokens
        app = create_app(exits, system.contexts["exit"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            sell = functools.partial(client.post, f"/positions/{mint}/sell")
            assert (await sell(json={})).status_code == 401
            for bad, said in [
                ({"fraction": 1.5}, "'fraction' must be over 0 and at most 1"),
                ({"fraction": 0}, "'fraction' must be over 0 and at most 1"),
                ({"fraction": True}, "'fraction' must be a number"),
                ({"fraction": "half"}, "'fraction' must be a number"),
                ({"request_id": "x" * 129}, "'request_id' must be at most 128 characters"),
                ({"position_id": 7}, "'position_id' must be text"),
                ({"wait_s": 61}, "'wait_s' must be at least 0 and at most 60"),
                ({"wait_s": -1}, "'wait_s' must be at least 0 and at most 60"),
                ({"reason": 5}, "'reason' must be text"),
            ]:
                refused = await sell(json=bad, headers=AUTH)
                assert refused.status_code == 422 and said in refused.text, (bad, refused.text)
            assert watch.count("exit.order") == 0

            asked = await sell(
                json={"fraction": 0.5, "reason": "half off", "request_id": "r1"}, headers=AUTH
            )
            assert asked.status_code == 200
            answer = asked.json()
            assert answer["ordered"] and answer["request_id"] == "r1"
            assert answer["token_amount"] == pytest.approx(held * 0.5)
            await clock.advance(1.0)  # the paper fill's latency
            assert trader.book.open_positions[mint].tokens == pytest.approx(held * 0.5)
            # asked again under the same id: the same answer, nothing sold again
            again = await sell(json={"fraction": 0.5, "request_id": "r1"}, headers=AUTH)
            assert again.json() == answer
            await clock.advance(1.0)
            assert trader.book.open_positions[mint].tokens == pytest.approx(held * 0.5)

            rest = await sell(json={}, headers=AUTH)
            assert rest.status_code == 200 and rest.json()["ordered"]
            await clock.advance(1.0)
            assert mint not in trader.book.open_positions
            assert other in trader.book.open_positions
            closed = watch.payloads("position.closed")
            assert [c.mint for c in closed] == [mint]

            nothing = await sell(json={}, headers=AUTH)
            assert nothing.status_code == 200
            assert nothing.json() == {
                "request_id": nothing.json()["request_id"],
                "mint": mint,
                "ordered": False,
                "detail": "no position held",
            }
            orders = (await client.get("/orders")).json()["orders"]
            mine = sorted((o["number"], o["rule"], o["state"]) for o in orders if o["mint"] == mint)
            assert mine == [(1, REQUESTED, "filled"), (2, REQUESTED, "filled")]


async def test_a_request_to_a_replica_not_owning_the_token_is_ordered_by_its_owner(harness):
    """Two replicas, one of them consuming the token's partition (here the first
    started, each partition queue having a single active consumer): asked of the
    other, the request is published and not answered there (202); the owner orders it."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    store = MemoryStateStore(clock)
    bus = await harness.bus(partitions=PARTITIONS, source="trading/test")
    watch = await EventCollector("watch").attach(bus, "exit.*")
    replica = functools.partial(on_broker, harness, clock=clock, store=store, partitions=PARTITIONS)
    replicas = [exit_service(partitions=PARTITIONS) for _ in range(2)]
    buses = [await replica(service) for service in replicas]
    try:
        mint, _ = await held_position(bus, tokens)
        await eventually(
            lambda: sum(len(s.positions()) for s in replicas) == 1, what="the position held"
        )
        [owner] = [s for s in replicas if s.positions()]
        [other] = [s for s in replicas if s is not owner]
        answered, answer = await other.request_sale(
            SaleRequested(mint=mint), request_id="elsewhere", wait_s=0.2
        )
        assert not answered and answer["published"], answer
        [order] = await watch.wait_for(1, "exit.order", within=30)
        assert order.data.reason == REQUESTED
        assert order.data.token_amount == pytest.approx(HELD)
        await eventually(lambda: "elsewhere" in owner._answers, what="the owner's answer")
        assert owner._answers["elsewhere"]["order_id"] == order.data.order_id
        assert owner.metrics._f.requests.labels("ordered")._value.get() == 1
        assert other.metrics._f.requests.labels("ordered")._value.get() == 0
    finally:
        for service, own in zip(replicas, buses, strict=True):
            await service.stop()
            await own.close()
        await bus.close()


async def test_a_request_asked_of_a_replica_not_owning_the_token_names_the_owner():
    """Replicas sharing the partitions: asked of one that does not own the token, the
    request is published and answered by the owner, whose log says what became of it; the
    answer names that replica and the partition, so the operator knows whose log to read
    (with several, ``its log`` named none)."""
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    bus = InMemoryBus(partitions=PARTITIONS, synchronous=True, source="test")
    await bus.start()
    store = MemoryStateStore(clock)
    beat = OwnershipConfig(heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0)
    services: dict[str, tuple[ExitService, BalancedBus]] = {}

    async def replica(name: str) -> None:
        balanced = BalancedBus(bus, store=store, clock=clock, replica=name, config=beat)
        service = exit_service(partitions=PARTITIONS, replica=name)
        ctx = ServiceContext(settings=service.settings, bus=balanced, clock=clock, store=store)
        await service.start(ctx)
        services[name] = (service, balanced)

    try:
        await replica("exit-a")
        await replica("exit-b")
        await clock.advance(3 * beat.heartbeat_interval_s)
        owned = set(services["exit-b"][1].balancer("exit").owned)
        assert owned and owned != set(range(PARTITIONS))
        mint = tokens.mint()
        while partition_of(mint, PARTITIONS) not in owned:
            mint = tokens.mint()
        await hold(bus, tokens, mint, tokens_held=HELD)
        asked = services["exit-a"][0]
        answered, answer = await asked.request_sale(
            SaleRequested(mint=mint), request_id="elsewhere", wait_s=0.2
        )
        assert not answered and answer["published"], answer
        partition = partition_of(mint, PARTITIONS)
        assert f"exit-b, which owns the token's partition {partition}," in answer["detail"]
    finally:
        for service, balanced in reversed(services.values()):
            await balanced.balancer("exit").stop(leave=True)
            await service.stop()
        await bus.close()
