"""Trading's keyed events carry a seq per mint, so the exit's keyed consumer drops a copy
of one delivered again after a newer one (a redelivery to the next owner of its
partition, a republication), on the in-memory bus and on RabbitMQ, beside the real
trading service."""

from __future__ import annotations

from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import ExitOrder, make_event
from pumpflow.common.testing import TokenEvents
from pumpflow.common.testing.plugin import bus_harness_fixture
from pumpflow.exit.records import MemoryExitStore
from pumpflow.trading.ledger import MemoryLedger

from .helpers import START, embedded, exit_service
from .test_graceful_service import _enter, advancing, trading

PARTITIONS = 4
#: the in-memory bus (synchronous) and RabbitMQ
harness = bus_harness_fixture(partitions=PARTITIONS, synchronous=True)


def held_tokens(exits, mint: str) -> float | None:
    state = exits.consumer.state(mint)
    return None if state is None or state.position is None else state.position.tokens


async def test_older_position_events_and_a_fill_delivered_again_are_dropped(harness):
    """Two sales sell a quarter of the position each; then the position's opening, the
    first sale's fill and its position.updated come again: the exit holds what the
    second update says (a copy counted, it held more or less than trading), and counts
    three copies."""
    bus = await harness.bus(partitions=PARTITIONS, source="test/embedded")
    clock = ReplayClock(START)
    tokens = TokenEvents(clock)
    trader = trading(MemoryLedger(), partitions=PARTITIONS)
    exits = exit_service(MemoryExitStore(), partitions=PARTITIONS)
    async with embedded(clock, trader, exits, bus=bus) as (_, watch):
        mint = tokens.mint()
        await _enter(bus, clock, tokens, mint)
        # over RabbitMQ the test's own queue may get the opening after the exit holds it
        await advancing(
            clock,
            lambda: held_tokens(exits, mint) and watch.count("position.opened", key=mint),
            what="the position held and its opening seen",
        )
        [opened] = watch.of("position.opened", key=mint)
        for number in (1, 2):
            sale = ExitOrder(
                order_id=f"{opened.data.position_id}:rule:{90 + number}",
                mint=mint,
                position_id=opened.data.position_id,
                token_amount=opened.data.token_amount / 4,
                reason="test",
            )
            await bus.publish(make_event(sale, source="exit/test", time=clock.now()))
            await advancing(
                clock,
                lambda n=number: watch.count("position.updated", key=mint) == n,
                what=f"sale {number} filled",
            )
        first_fill, _ = [f for f in watch.of("order.filled", key=mint) if f.data.side == "sell"]
        first, second = watch.of("position.updated", key=mint)
        left = second.data.token_amount
        await advancing(clock, lambda: held_tokens(exits, mint) == left, what="the exit's rest")

        # numbered 1, 2, ... per mint in the order published: nothing for a consumer to miss
        published = [
            e.seq for e in watch.of(key=mint) if e.type.startswith(("order.", "position."))
        ]
        assert published == list(range(1, len(published) + 1))

        before = exits.consumer.metrics.counts()
        copies = (opened, first_fill, first)
        for copy in copies:
            await bus.publish(copy)

        def dropped() -> float:
            return exits.consumer.metrics.counts()["duplicates"] - before["duplicates"]

        # other events of the token may apply meanwhile: the copies' own count is waited for
        await advancing(clock, lambda: dropped() >= len(copies), what="the copies dropped")
        assert held_tokens(exits, mint) == left, "a copy counted again"
        counts = exits.consumer.metrics.counts()
        assert counts["duplicates"] == before["duplicates"] + len(copies)
        assert counts["gaps"] == 0
