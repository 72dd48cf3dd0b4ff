"""A replica taking trading over starts with every breaker clear and its state computed
afresh: it tells the consumers of ``trading.breaker`` and ``trading.state`` exactly where
that differs from what they last heard, which the ledger keeps with each announcement
(in Postgres), and nothing where it does not."""

from __future__ import annotations

import contextlib
import logging

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.bus import InMemoryBus
from pumpflow.common.events import CircuitBreakerChanged
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.testing import EventCollector
from pumpflow.common.trading import TradingState
from pumpflow.trading.ledger import Announced, PostgresLedger
from pumpflow.trading.service import TradingService
from pumpflow.trading.settings import TradingSettings

from .test_kill_switch import AwayForCommits
from .test_seqs import KilledBeforePublishing
from .test_service import publish, ready, running, trading


@contextlib.asynccontextmanager
async def watched_from_the_start(clock, service: TradingService):
    """``service`` embedded on a bus watched before it starts: what it publishes as it
    takes over is seen."""
    bus = InMemoryBus(synchronous=True, source="embedded")
    await bus.start()
    try:
        watch = await EventCollector("watch").attach(bus, "trading.*")
        async with run_embedded([service], clock=clock, bus=bus):
            yield bus, watch
    finally:
        await bus.close()


def said(watch: EventCollector) -> list[tuple[str, ...]]:
    """The breakers' and the state's announcements, in the order published."""
    found = []
    for event in watch.of():
        data = event.data
        if event.type == "trading.breaker":
            found.append(("breaker", data.breaker, "tripped" if data.tripped else "recovered"))
        elif event.type == "trading.state":
            found.append(("state", data.previous_state, data.state))
    return found


def announced_lines(caplog) -> list[str]:
    """The log lines of the breakers' and the state's changes."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(("trading: breaker ", "trading: state "))
    ]


def trips(registry: CollectorRegistry, breaker: str) -> float | None:
    return registry.get_sample_value("pumpflow_trading_breaker_trips_total", {"breaker": breaker})


async def trip_the_stale_breaker(bus, clock, market, service: TradingService) -> None:
    """A token event delivered past the feed lag limit: the stale breaker trips and
    halts trading."""
    mint = await ready(bus, market)
    late = market.tokens.buy(mint, "bob", sol=0.1)
    await clock.advance(service.risk.breaker_settings.max_feed_lag_s + 1.0)
    await publish(bus, late)
    assert service.risk.breakers["stale"].tripped and service.risk.state is TradingState.HALTED


async def test_a_take_over_after_a_tripped_breaker_says_it_recovered_and_the_state_changed(
    clock, market, pg_pool, caplog
):
    """The holder trips the stale breaker and says so (halted); the next one starts clear
    and active, and says exactly that: the breaker recovered, the state halted -> active,
    each once, its log and its counters saying the same."""
    first = trading(PostgresLedger(pg_pool))
    async with running(clock, first) as (bus, watch):
        await trip_the_stale_breaker(bus, clock, market, first)
        assert said(watch) == [("breaker", "stale", "tripped"), ("state", "active", "halted")]

    registry = CollectorRegistry()
    second = trading(PostgresLedger(pg_pool), registry=registry)
    caplog.set_level(logging.INFO, logger="pumpflow.trading")
    caplog.clear()
    async with watched_from_the_start(clock, second) as (_, watch):
        holder = second.leader.holder
        assert said(watch) == [("breaker", "stale", "recovered"), ("state", "halted", "active")]
        [recovered] = watch.payloads("trading.breaker")
        assert recovered == CircuitBreakerChanged(
            breaker="stale", tripped=False, reason=f"taken over by {holder}: starts clear"
        )
        [state] = watch.payloads("trading.state")
        assert state.reason == f"taken over by {holder}: starts active", state
        assert announced_lines(caplog) == [
            f"trading: breaker stale recovered: taken over by {holder}: starts clear",
            f"trading: state halted -> active: taken over by {holder}: starts active",
        ]
        assert trips(registry, "stale") == 0
        tripped = registry.get_sample_value(
            "pumpflow_trading_breaker_tripped", {"breaker": "stale"}
        )
        assert tripped == 0
        assert registry.get_sample_value("pumpflow_trading_state", {"state": "active"}) == 1

    # told: the replica after it has nothing to say
    third = trading(PostgresLedger(pg_pool))
    async with watched_from_the_start(clock, third) as (_, watch):
        assert said(watch) == []


async def test_a_take_over_with_nothing_tripped_says_nothing_of_breakers_or_state(
    clock, market, pg_pool, caplog
):
    """A first start, and a take-over from a holder whose breaker tripped and recovered
    (both said): the consumers heard what holds, so nothing is published, logged or
    counted of the breakers or the state."""
    first = trading(PostgresLedger(pg_pool))
    caplog.set_level(logging.INFO, logger="pumpflow.trading")
    async with watched_from_the_start(clock, first) as (bus, watch):
        assert said(watch) == []
        await trip_the_stale_breaker(bus, clock, market, first)
        # quiet for the recovery, the token trading on so that silence trips nothing
        mint = await ready(bus, market)
        for _ in range(int(first.risk.breaker_settings.recovery_s // 10) + 1):
            await clock.advance(10.0)
            await publish(bus, market.tokens.buy(mint, "carol", sol=0.01))
        assert not first.risk.breakers["stale"].tripped
        assert said(watch) == [
            ("breaker", "stale", "tripped"),
            ("state", "active", "halted"),
            ("breaker", "stale", "recovered"),
            ("state", "halted", "active"),
        ]

    registry = CollectorRegistry()
    second = trading(PostgresLedger(pg_pool), registry=registry)
    caplog.clear()
    async with watched_from_the_start(clock, second) as (_, watch):
        assert said(watch) == []
        assert announced_lines(caplog) == []
        assert trips(registry, "stale") == 0


async def test_an_operators_halt_carried_over_is_not_announced_again(
    clock, market, pg_pool, caplog
):
    """The kill switch halted the holder, which said so; the next one starts halted by the
    ledger's stored state and says nothing: nothing changed for the consumers. A halt
    stored and never announced (given to a stand-by as the holder stopped) is announced by
    the take-over, once."""
    ledger = PostgresLedger(pg_pool)
    first = trading(ledger)
    async with running(clock, first) as (_, watch):
        await first.halt("operator halt")
        assert said(watch) == [("state", "active", "halted")]

    registry = CollectorRegistry()
    second = trading(ledger, registry=registry)
    caplog.set_level(logging.INFO, logger="pumpflow.trading")
    caplog.clear()
    async with watched_from_the_start(clock, second) as (_, watch):
        assert second.risk.state is TradingState.HALTED
        assert second.risk.operator_reason == "operator halt"
        assert said(watch) == []
        assert announced_lines(caplog) == []
        assert registry.get_sample_value("pumpflow_trading_state", {"state": "halted"}) == 1
        await second.resume("resumed")
        assert said(watch) == [("state", "halted", "active")]

    # the operator's halt, stored by a stand-by: the holder never said it
    await ledger.set_control(TradingState.HALTED, "from a stand-by")
    third = trading(ledger)
    async with watched_from_the_start(clock, third) as (_, watch):
        holder = third.leader.holder
        assert said(watch) == [("state", "active", "halted")]
        [state] = watch.payloads("trading.state")
        assert state.reason == f"taken over by {holder}: starts halted: from a stand-by"


async def test_announcements_stored_and_never_published_go_out_before_the_take_overs(
    clock, market, pg_pool
):
    """The holder stores its breaker's trip and its halt, then dies before publishing
    them: the next one publishes them from the ledger's outbox first, then what it starts
    with, so the consumers end where trading is."""
    config = TradingSettings.load(service="trading", transport="memory")
    first = KilledBeforePublishing(
        config, registry=CollectorRegistry(), ledger=PostgresLedger(pg_pool)
    )
    async with running(clock, first) as (bus, watch):
        mint = await ready(bus, market)
        late = market.tokens.buy(mint, "bob", sol=0.1)
        await clock.advance(first.risk.breaker_settings.max_feed_lag_s + 1.0)
        first.killed = True
        with pytest.raises(ConnectionError):
            await first.on_events([late])
        await first.leader.stop()
        # what the process held dies with it
        first._unpublished = []
        assert said(watch) == []

    second = trading(PostgresLedger(pg_pool))
    async with watched_from_the_start(clock, second) as (_, watch):
        assert said(watch) == [
            ("breaker", "stale", "tripped"),
            ("state", "active", "halted"),
            ("breaker", "stale", "recovered"),
            ("state", "halted", "active"),
        ]
        # published, they leave the outbox: a take-over after this one says nothing again
    assert (await PostgresLedger(pg_pool).load(remembered=1)).outbox == []


async def test_a_halt_told_with_the_ledger_away_is_named_by_a_stop_that_cannot_store_it(
    clock, market, pg_pool
):
    """The ledger takes the operator's halt but no commit: the halt is told at once,
    what it said unstored; a stop that cannot store it either says so."""
    ledger = AwayForCommits(pg_pool)
    service = trading(ledger)
    async with running(clock, service) as (_, watch):
        ledger.away = True
        await service.halt("operator halt")
        assert said(watch) == [("state", "active", "halted")]
        with pytest.raises(RuntimeError, match="what 1 announcements said unstored"):
            await service.stop()
    assert (await PostgresLedger(pg_pool).load(remembered=1)).announced == Announced()
