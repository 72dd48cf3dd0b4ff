"""Trading numbers its keyed events per mint, 1, 2, ... in the order it publishes them:
across a take-over (the next replica numbers on above its predecessor, from the ledger
in Postgres, and first publishes what its predecessor stored and died before
publishing), and an event published again after a commit whose reply was lost keeps
the seq it was given, so a consumer sees no gap."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.bus import InMemoryBus
from pumpflow.common.events import ExitOrder, make_event
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.testing import EventCollector
from pumpflow.trading.ledger import PostgresLedger
from pumpflow.trading.service import TradingService
from pumpflow.trading.settings import TradingSettings

from .test_service import LostReplyLedger, lost_reply, publish, ready, running, trading


class KilledBeforePublishing(TradingService):
    """The trading service, whose publication fails once ``killed`` is set."""

    killed = False

    async def _publish(self) -> None:
        if self.killed and self._unpublished:
            raise ConnectionError("killed before publishing")
        await super()._publish()


def numbered(watch: EventCollector, mint: str) -> list[tuple[str, int | None]]:
    """Trading's keyed events of ``mint`` as published: their types and seqs."""
    return [
        (e.type, e.seq) for e in watch.of(key=mint) if e.type.startswith(("order.", "position."))
    ]


async def test_the_next_replica_numbers_a_mints_events_on_above_its_predecessor(
    clock, market, pg_pool
):
    first = trading(PostgresLedger(pg_pool))
    async with running(clock, first) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        await clock.advance(1.0)
        assert numbered(watch, mint) == [
            ("order.requested", 1),
            ("order.filled", 2),
            ("position.opened", 3),
        ]

    # stopped cleanly: nothing left for the next replica to publish again
    assert (await PostgresLedger(pg_pool).load(remembered=1)).outbox == []
    second = trading(PostgresLedger(pg_pool))
    async with running(clock, second) as (bus, watch):
        held = second.book.open_positions[mint]
        await publish(bus, market.tokens.buy(mint, "bob", sol=0.5))
        sale = ExitOrder(
            order_id=f"{held.position_id}:exit:1",
            mint=mint,
            position_id=held.position_id,
            token_amount=held.tokens,
        )
        await publish(bus, make_event(sale, source="exit/t", time=clock.now()))
        await clock.advance(1.0)
        assert numbered(watch, mint) == [
            ("order.requested", 4),
            ("order.filled", 5),
            ("position.closed", 6),
        ]


async def test_events_a_commit_whose_reply_was_lost_numbered_keep_their_seqs(clock, market):
    """The retry stores the same events again: they are published with the seqs the
    lost commit gave them, and the mint's next events follow without a gap."""
    ledger = LostReplyLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        prediction = market.prediction(mint)
        await lost_reply(ledger, service, prediction)
        assert numbered(watch, mint) == []
        await service.on_events([prediction])  # the bus hands it back
        await clock.advance(1.0)
        assert numbered(watch, mint) == [
            ("order.requested", 1),
            ("order.filled", 2),
            ("position.opened", 3),
        ]


async def test_a_withdrawn_orders_request_told_by_the_replica_standing_by_keeps_its_seq(
    clock, market
):
    """The order's store reaches the ledger, its reply lost, then the lease goes: the
    replica standing by publishes the request with the seq the lost commit gave it, and
    the refusal next; the next replica numbers on from there."""
    ledger = LostReplyLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await lost_reply(ledger, service, market.prediction(mint))
        await service.leader.stop()
        assert numbered(watch, mint) == [("order.requested", 1), ("order.rejected", 2)]

    second = trading(ledger)
    async with running(clock, second) as (bus, watch):
        await ready(bus, market, mint)
        await publish(bus, market.prediction(mint))
        assert numbered(watch, mint)[0] == ("order.requested", 3)


async def test_the_next_replica_publishes_what_its_predecessor_stored_and_never_published(
    clock, market, pg_pool
):
    """The order is stored, then the replica dies before publishing its request: the
    next one publishes the request first, with its seq, then the order's fill and the
    position follow; nothing of the mint is missing."""
    config = TradingSettings.load(service="trading", transport="memory")
    first = KilledBeforePublishing(
        config, registry=CollectorRegistry(), ledger=PostgresLedger(pg_pool)
    )
    async with running(clock, first) as (bus, watch):
        mint = await ready(bus, market)
        prediction = market.prediction(mint)
        first.killed = True
        with pytest.raises(ConnectionError):
            await first.on_events([prediction])
        await first.leader.stop()
        # what the process held dies with it
        first._unpublished = []
        assert numbered(watch, mint) == []
        [stored] = await first.ledger.orders(limit=5)

    # watched from before the next replica starts: it publishes as it takes over
    bus = InMemoryBus(synchronous=True, source="embedded")
    await bus.start()
    watch = await EventCollector("watch").attach(bus, "order.*", "position.*")
    second = trading(PostgresLedger(pg_pool))
    async with run_embedded([second], clock=clock, bus=bus):
        [request] = watch.of("order.requested", key=mint)
        assert request.data.order_id == stored["order_id"] and request.causation_id == prediction.id
        await publish(bus, market.tokens.buy(mint, "bob", sol=0.2))
        await clock.advance(1.0)
        assert numbered(watch, mint) == [
            ("order.requested", 1),
            ("order.filled", 2),
            ("position.opened", 3),
        ]
    await bus.close()
