"""The feed breaker: trading halts its entries while PumpPortal refuses the feed's trade
subscriptions (``feed.trade_stream``), says so where an operator looks (the
``trading.breaker`` event, ``/state``, the metrics, the log), resumes once the feed says
they are accepted, and a replica taking trading over keeps the breaker as last
announced until the feed speaks again."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from pumpflow.common.events import CircuitBreakerChanged, FeedTradeStream, make_event
from pumpflow.common.pumpportal import ACK_KEYS, API_KEY_REQUIRED
from pumpflow.common.testing import EventCollector
from pumpflow.common.trading import TradingState
from pumpflow.trading.ledger import MemoryLedger, PostgresLedger

from .test_service import publish, ready, running, trading
from .test_take_over_announcements import announced_lines, said, watched_from_the_start


def trade_stream(clock, refused: bool, *, source: str = "feed/one"):
    payload = FeedTradeStream(
        refused=refused, reason=API_KEY_REQUIRED if refused else ACK_KEYS, since=clock.now()
    )
    return make_event(payload, source=source, time=clock.now())


def gauge(registry: CollectorRegistry, name: str, breaker: str = "feed") -> float | None:
    return registry.get_sample_value(name, {"breaker": breaker})


async def test_entries_halt_while_the_feeds_trade_stream_is_refused_and_resume_once_accepted(
    clock, market, caplog
):
    registry = CollectorRegistry()
    service = trading(MemoryLedger(), registry=registry)
    caplog.set_level(logging.INFO, logger="pumpflow.trading")
    async with running(clock, service) as (bus, watch):
        mint = await ready(bus, market)
        await publish(bus, trade_stream(clock, True))
        reason = f"PumpPortal refuses the trade subscriptions of feed/one: {API_KEY_REQUIRED}"
        assert watch.payloads("trading.breaker") == [
            CircuitBreakerChanged(breaker="feed", tripped=True, reason=reason)
        ]
        assert said(watch)[-1] == ("state", "active", "halted")
        state = await service.trading_state_view()
        assert state["state"] == "halted" and state["reason"] == f"feed: {reason}"
        assert state["breakers"]["feed"]["tripped"] is True
        assert state["breakers"]["feed"]["reason"] == reason
        assert gauge(registry, "pumpflow_trading_breaker_tripped") == 1
        assert gauge(registry, "pumpflow_trading_breaker_trips_total") == 1
        assert f"trading: breaker feed tripped: {reason}" in announced_lines(caplog)

        await publish(bus, market.prediction(mint))
        assert watch.payloads("order.requested") == []
        assert service.skipped["trading is halted: feed breaker"] == 1

        # the feed re-announces it: nothing new is said
        await clock.advance(20.0)
        await publish(bus, market.tokens.buy(mint, "bob", sol=0.01), trade_stream(clock, True))
        assert len(watch.payloads("trading.breaker")) == 1

        await publish(bus, trade_stream(clock, False, source="feed/two"))
        [_, recovered] = watch.payloads("trading.breaker")
        assert recovered == CircuitBreakerChanged(
            breaker="feed",
            tripped=False,
            reason=f"PumpPortal accepts the trade subscriptions of feed/two: {ACK_KEYS}",
        )
        assert said(watch)[-1] == ("state", "halted", "active")
        assert (await service.trading_state_view())["breakers"]["feed"]["tripped"] is False
        assert gauge(registry, "pumpflow_trading_breaker_tripped") == 0
        await publish(bus, market.prediction(mint))
        [request] = watch.payloads("order.requested")
        assert request.mint == mint


async def test_a_replica_taking_over_keeps_the_feed_breaker_until_the_feed_says_otherwise(
    clock, market, pg_pool, caplog
):
    """The holder hears the refusal and halts; the next holder starts after it with the
    breaker tripped as last announced, and says nothing of it (the listeners heard it);
    it entered nothing before the feed's next word, which recovers it."""
    first = trading(PostgresLedger(pg_pool))
    async with running(clock, first) as (bus, watch):
        await publish(bus, trade_stream(clock, True))
        assert said(watch) == [("breaker", "feed", "tripped"), ("state", "active", "halted")]

    registry = CollectorRegistry()
    second = trading(PostgresLedger(pg_pool), registry=registry)
    caplog.set_level(logging.INFO, logger="pumpflow.trading")
    caplog.clear()
    async with watched_from_the_start(clock, second) as (bus, watch):
        orders = await EventCollector("orders").attach(bus, "order.*")
        holder = second.leader.holder
        assert said(watch) == []
        assert announced_lines(caplog) == []
        assert second.risk.state is TradingState.HALTED
        breaker = (await second.trading_state_view())["breakers"]["feed"]
        assert breaker["tripped"] is True
        assert breaker["reason"] == (
            f"taken over by {holder}: as last announced, until the feed announces its trade stream"
        )
        assert gauge(registry, "pumpflow_trading_breaker_tripped") == 1
        assert gauge(registry, "pumpflow_trading_breaker_trips_total") == 0
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        assert orders.payloads("order.requested") == []

        await publish(bus, trade_stream(clock, False))
        assert said(watch) == [("breaker", "feed", "recovered"), ("state", "halted", "active")]
        await publish(bus, market.prediction(mint))
        assert len(orders.payloads("order.requested")) == 1
