"""A sale's outcome never overtakes the trades trading settled it on: trading's order and
position events are no critical types, so the exit's keyed consumer takes them from the
token's partition queue, behind every trade the feed published before them, however
long the backlog there. The rules that look again at an outcome (a step refused, or
filled short) judge it at a mark at least as new as the market it settled on, on the
in-memory bus and on RabbitMQ, beside the real trading service."""

from __future__ import annotations

import pytest

from pumpflow.common.bus.dispatch import Bindings
from pumpflow.common.bus.routing import partition_of
from pumpflow.common.clock import ReplayClock
from pumpflow.common.exit import CONSUMES
from pumpflow.common.testing import TokenEvents, eventually
from pumpflow.common.testing.plugin import bus_harness_fixture
from pumpflow.exit.records import MemoryExitStore
from pumpflow.trading.ledger import MemoryLedger

from .helpers import START, embedded, exit_service
from .test_graceful_service import _enter, advancing, trading

PARTITIONS = 4
#: the in-memory bus (synchronous) and RabbitMQ
harness = bus_harness_fixture(partitions=PARTITIONS, synchronous=True)
#: the trades queued behind the step's order, before trading settles it
BACKLOG = 200


def test_every_type_the_exit_consumes_rides_its_tokens_partition_lane():
    """A critical type would overtake its token's trades queued on the partition lane: an
    outcome would be judged at a mark older than the market it settled on."""
    bindings = Bindings.of_patterns(CONSUMES, 1)
    assert bindings.critical == ()
    assert set(bindings.partition) == set(CONSUMES)


async def test_a_steps_refusal_behind_a_backlog_of_trades_is_judged_at_their_mark(harness):
    """The first step is ordered at +50%. The exit's consumer stops taking the token's
    partition; the token dumps to +25% and trades on; trading refuses the step (the dump
    slipped it past its limit). The consumer takes the partition again: the dump and the
    backlog come before the refusal, so the step comes back at the mark they left, below
    its gain, and is ordered again only as a trade brings the gain back, at that trade's
    mark; not at once at the mark it was first ordered at."""
    bus = await harness.bus(partitions=PARTITIONS, source="test/embedded")
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    records = MemoryExitStore()
    trader = trading(MemoryLedger(), partitions=PARTITIONS)
    exits = exit_service(records, partitions=PARTITIONS)
    async with embedded(clock, trader, exits, bus=bus) as (_, watch):
        mint = tokens.mint()
        await _enter(bus, clock, tokens, mint)

        def state():
            return exits.consumer.state(mint)

        await advancing(
            clock, lambda: state() is not None and state().position, what="the position held"
        )
        entry = state().position.entry_price
        while tokens.curves[mint].price < entry * 1.5:
            await bus.publish(tokens.buy(mint, "whale", sol=1.0))
        [first] = await watch.wait_for(1, "exit.order", key=mint)
        assert first.data.reason == "take_profit_1"
        first_id = first.data.order_id
        peak = state().pending[first_id].mark_price
        assert peak == pytest.approx(tokens.curves[mint].price)
        # trading holds the sale (its latency not passed) on the market it was sent on
        await watch.wait_for(1, "order.requested", where=lambda e: e.data.order_id == first_id)

        lagging = partition_of(mint, PARTITIONS)
        await bus.release_partitions(exits.consumer.subscription, [lagging])
        while tokens.curves[mint].price > entry * 1.25:
            whale = tokens.balance(mint, "whale")
            await bus.publish(tokens.sell(mint, "whale", tokens=whale * 0.02))
        for _ in range(BACKLOG):
            await bus.publish(tokens.buy(mint, "small", sol=0.0001))
        behind = tokens.curves[mint].price
        await advancing(
            clock,
            lambda: watch.count("order.rejected", key=mint),
            what="trading refused the step on the dumped market",
        )
        [refused] = watch.payloads("order.rejected", key=mint)
        assert refused.order_id == first_id and refused.cause == "slippage"

        await bus.consume_partitions(exits.consumer.subscription, [lagging])
        await eventually(
            lambda: (record := records.exit_orders.get(first_id)) and record.state == "rejected",
            what="the exit applied the refusal",
        )
        # the refusal gave the step back at the backlog's mark: nothing ordered again
        assert state().rule_orders == 1, "the step was ordered again at the mark before the dump"
        assert state().watch.mark_price == pytest.approx(behind)
        assert records.exit_orders[first_id].mark_price == pytest.approx(peak)

        while tokens.curves[mint].price < entry * 1.5:
            await bus.publish(tokens.buy(mint, "whale", sol=1.0))
        recovered = tokens.curves[mint].price
        orders = await watch.wait_for(2, "exit.order", key=mint)
        assert [(o.data.reason, o.data.token_amount) for o in orders] == [
            ("take_profit_1", first.data.token_amount),
            ("take_profit_1", pytest.approx(first.data.token_amount)),
        ]
        assert state().pending[orders[1].data.order_id].mark_price == pytest.approx(recovered)
        assert state().rule_orders == 2
