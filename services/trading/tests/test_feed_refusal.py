"""End to end: the feed on a simulator that refuses its trade subscriptions (no key
funded with 0.02 SOL), and live trading on the fake trade API, embedded.

Only creations stream: no token trade, and no trade of the wallet that would confirm a
live order. The feed says so (``feed.trade_stream``), trading's feed breaker halts its
entries, and a token known only by its creation, scored to enter, is not entered; the
key funded, the feed's next subscription is acknowledged, trading resumes and enters;
funded on a calm connection (no subscription after it), the feed's next re-test (a new
connection) tells, and trading resumes.
Over RabbitMQ, what the feed says while no trading replica runs waits in trading's
queues: the replica that starts next has its feed breaker as last announced, and
applies what the feed said before it decides what queued on its partitions behind it.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.clock import ReplayClock, WallClock
from pumpflow.common.events import FeedTradeStream, make_event
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.runtime.topology import declare_groups, groups_of
from pumpflow.common.state import MemoryStateStore
from pumpflow.common.testing import EventCollector, base58_key, eventually
from pumpflow.common.testing.trade_api import fake_trade_api
from pumpflow.common.trading import TradingState
from pumpflow.feed.service import FeedService
from pumpflow.feed.settings import FeedSettings
from pumpflow.simulator.market import Market as SimulatedMarket
from pumpflow.simulator.market import MarketConfig
from pumpflow.simulator.server import API_KEY_REQUIRED, SimulatorServer
from pumpflow.trading.ledger import MemoryLedger

from .conftest import Market
from .test_live import WALLET, answered, live
from .test_live_wallet_stream import Frames, idle_feed, on_server
from .test_service import entries_queued, trading_replica


async def test_live_trading_enters_nothing_while_the_feeds_trade_stream_is_refused():
    clock = WallClock()
    market = Market(clock)
    frames = Frames()
    # no key is funded
    async with idle_feed(require_api_key=True) as (server, feed):
        async with fake_trade_api("success") as api:
            trading = live(MemoryLedger(), api)
            async with run_embedded([feed, trading], clock=clock, synchronous=True) as system:
                bus = system.bus
                watch = await EventCollector("watch").attach(bus, "order.*", "trading.*")
                tokens = await EventCollector("tokens").attach(bus, "token.*")
                await feed.socket.wait_connected()
                # trading announced its wallet as it took over: refused on the server
                await eventually(lambda: trading.risk.breakers["feed"].tripped, within=10)
                [trip] = watch.payloads("trading.breaker")
                assert trip.breaker == "feed" and trip.tripped and API_KEY_REQUIRED in trip.reason
                assert (await trading.trading_state_view())["state"] == "halted"
                assert (await feed.status())["trade_stream"]["state"] == "refused"
                assert not on_server(server, wallet=WALLET)

                first = base58_key("refusedcoinpump")
                created = frames.tokens.created(
                    first, sol=0.5, name="Good Coin", symbol="GOOD", trader=base58_key("dev")
                )
                assert await server.inject(frames.frame(created)) == 1
                await eventually(lambda: first in trading.engine.views, within=10)
                await bus.publish(market.features(first))
                await bus.publish(market.lifecycle(first))
                await bus.publish(market.prediction(first))
                await eventually(lambda: trading.skipped, within=10)
                assert trading.skipped == {"trading is halted: feed breaker": 1}
                assert watch.payloads("order.requested") == [] and api.requests == []

                # funded: the next subscription (a new token's) is acknowledged, and the
                # feed subscribes again every mint and the wallet refused before
                server.fund("")
                second = base58_key("fundedcoinpump")
                created = frames.tokens.created(
                    second, sol=0.5, name="Good Coin", symbol="GOOD", trader=base58_key("dev")
                )
                assert await server.inject(frames.frame(created)) == 1
                await eventually(lambda: not trading.risk.breakers["feed"].tripped, within=10)
                [_, recovered] = watch.payloads("trading.breaker")
                assert recovered.breaker == "feed" and not recovered.tripped
                assert (await trading.trading_state_view())["state"] == "active"
                await eventually(lambda: on_server(server, mint=first, wallet=WALLET), within=10)
                bought = frames.tokens.buy(first, base58_key("alice"), sol=3.0)
                assert await server.inject(frames.frame(bought)) == 1
                await eventually(lambda: tokens.count(key=first) == 2, within=10)
                await bus.publish(market.prediction(first))
                await eventually(lambda: watch.payloads("order.requested"), within=10)
                await answered(trading, api)
                [request] = watch.payloads("order.requested")
                assert request.mint == first


async def test_a_key_funded_on_a_calm_connection_resumes_trading_at_the_feeds_re_test():
    """Nothing is subscribed after the key is funded (a calm market): no answer tells the
    feed, until it re-tests the key on a new connection (feed_refused_retest_s, on the
    test's clock here); the stream accepted, trading's feed breaker recovers."""
    clock = WallClock()
    retest = ReplayClock()
    frames = Frames()
    async with idle_feed(require_api_key=True, retest_clock=retest) as (server, feed):
        async with fake_trade_api("success") as api:
            trading = live(MemoryLedger(), api)
            async with run_embedded([feed, trading], clock=clock, synchronous=True) as system:
                watch = await EventCollector("watch").attach(system.bus, "trading.*")
                await feed.socket.wait_connected()
                await eventually(lambda: trading.risk.breakers["feed"].tripped, within=10)
                mint = base58_key("calmcoinpump")
                created = frames.tokens.created(
                    mint, sol=0.5, name="Calm Coin", symbol="CALM", trader=base58_key("dev")
                )
                assert await server.inject(frames.frame(created)) == 1
                await eventually(lambda: feed.socket.pending_messages == 0, within=10)
                server.fund("")
                assert trading.risk.breakers["feed"].tripped

                await retest.advance(feed.settings.feed_refused_retest_s)
                await eventually(lambda: not trading.risk.breakers["feed"].tripped, within=10)
                [_, recovered] = watch.payloads("trading.breaker")
                assert recovered.breaker == "feed" and not recovered.tripped
                assert (await trading.trading_state_view())["state"] == "active"
                assert server.counters["connections"] == 2
                await eventually(lambda: on_server(server, mint=mint, wallet=WALLET), within=10)


PARTITIONS = 2


@pytest.mark.rabbitmq
async def test_a_trading_replica_started_after_the_feeds_word_hears_it_over_the_broker(
    rabbitmq_harness, namespace
):
    """Each a process of its own on RabbitMQ: the feed is refused and says so before any
    trading replica runs (trading's queues declared by the feed's process as it
    connects); trading, started after, hears it from its queue and halts. It stops; the
    key is funded and the feed says the stream is accepted while no trading replica runs:
    the next one, starting with the feed breaker as its predecessor announced it
    (tripped), hears the acceptance from its queue and recovers it."""
    server = SimulatorServer(
        market=SimulatedMarket(MarketConfig(seed=1, launches_per_minute=120.0)),
        speed=1.0,
        require_api_key=True,
    )
    await server.start()
    rabbitmq_harness.delete_after(["trading"])
    clock = WallClock()
    settings = FeedSettings(
        pumpportal_ws_url=server.url,
        feed_record=False,
        feed_backoff_initial_s=0.05,
        namespace=namespace,
        partitions=PARTITIONS,
        replica="broker",
    )
    feed = FeedService(settings, registry=CollectorRegistry())
    ledger = MemoryLedger()
    trading = None
    try:
        feed_bus = await rabbitmq_harness.bus("feed/broker", partitions=PARTITIONS)
        # as every process of a deployment does as it connects (pumpflow.common.runtime)
        await declare_groups(feed_bus, groups_of(["trading"]))
        await feed.start(
            ServiceContext(
                settings=settings, bus=feed_bus, clock=clock, store=MemoryStateStore(clock)
            )
        )
        await eventually(
            lambda: feed.socket.trade_stream is not None, within=15, what="the refusal"
        )
        assert feed.socket.trade_stream.refused

        trading = await trading_replica(
            rabbitmq_harness, namespace, ledger, clock, partitions=PARTITIONS
        )
        await eventually(
            lambda: trading.risk.breakers["feed"].tripped, within=15, what="the feed breaker"
        )
        assert trading.risk.state is TradingState.HALTED
        assert "feed/broker" in trading.risk.breakers["feed"].reason
        await trading.stop()
        trading = None

        server.fund("")
        assert await server.drop_connections() == 1
        await eventually(
            lambda: not feed.socket.trade_stream.refused, within=15, what="the acceptance"
        )
        trading = await trading_replica(
            rabbitmq_harness, namespace, ledger, clock, partitions=PARTITIONS
        )
        await eventually(
            lambda: not trading.risk.breakers["feed"].tripped, within=15, what="the recovery"
        )
        assert trading.risk.state is TradingState.ACTIVE
    finally:
        if trading is not None:
            await trading.stop()
        await feed.stop()
        await server.stop()


#: tokens with a prediction to enter each, queued on trading's partitions while no replica
#: trades (under the concurrent positions limit)
BACKLOG = 3


@pytest.mark.rabbitmq
@pytest.mark.parametrize("refused", [True, False], ids=["refusal-queued", "no-refusal"])
async def test_a_refusal_queued_before_a_backlog_trips_the_next_holders_breaker_before_any_entry(
    clock, market, rabbitmq_harness, namespace, refused
):
    """The feed says PumpPortal refuses its trade subscriptions while no trading replica
    runs, then predictions that would enter queue on trading's partitions behind it. The
    replica taking trading over trips its feed breaker before it decides any of them: it
    orders no entry. Without the refusal, the same backlog enters."""
    rabbitmq_harness.delete_after(["trading"])
    others = await rabbitmq_harness.bus("feed/broker", partitions=PARTITIONS)
    await declare_groups(others, groups_of(["trading"]))
    if refused:
        word = FeedTradeStream(refused=True, reason=API_KEY_REQUIRED, since=clock.now())
        await others.publish(make_event(word, source="feed/broker", time=clock.now()))
    await entries_queued(others, market, BACKLOG)

    watch = await rabbitmq_harness.collector("order.*", name="watch")
    holder = await trading_replica(
        rabbitmq_harness, namespace, MemoryLedger(), clock, partitions=PARTITIONS
    )
    try:
        await eventually(
            lambda: sum(holder.skipped.values()) + watch.count("order.requested") == BACKLOG,
            within=15,
            what="every prediction decided",
        )
        if refused:
            assert watch.payloads("order.requested") == []
            assert holder.skipped == {"trading is halted: feed breaker": BACKLOG}
            assert holder.risk.breakers["feed"].tripped
        else:
            assert watch.count("order.requested") == BACKLOG
            assert not holder.risk.breakers["feed"].tripped
    finally:
        await holder.stop()
