"""End to end: the feed on the simulator and live trading on the fake trade API, embedded.

A position's token goes quiet and the activity service unsubscribes its trades; the
exit's sale still shows, on the wallet's account-trade subscription that trading
announced to the feed, and the sale is confirmed instead of ending "unconfirmed".
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import msgspec
from prometheus_client import CollectorRegistry

from pumpflow.common.clock import Clock, WallClock
from pumpflow.common.events import Event, ExitOrder, FeedSubscription, encode_payload, make_event
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.testing import EventCollector, base58_key, eventually
from pumpflow.common.testing.factories import TokenEvents
from pumpflow.common.testing.trade_api import fake_trade_api
from pumpflow.common.trading import MIN_LIVE_CONFIRM_S
from pumpflow.feed.service import FeedService
from pumpflow.feed.settings import FeedSettings
from pumpflow.simulator.market import Market as SimulatedMarket
from pumpflow.simulator.market import MarketConfig
from pumpflow.simulator.server import SimulatorServer
from pumpflow.trading.ledger import MemoryLedger

from .conftest import Market
from .test_live import WALLET, answered, live

#: a sale not confirmed would be rejected as unconfirmed after it (the least live takes)
CONFIRM_S = MIN_LIVE_CONFIRM_S
MINT = base58_key("quietcoinpump")
CURVE = base58_key("quietcurve")


class Frames:
    """Frames of one token as PumpPortal sends them (keys the decoder takes)."""

    def __init__(self) -> None:
        self.tokens = TokenEvents(clock=WallClock())
        self.serial = 0

    def frame(self, event: Event, signature: str | None = None) -> dict:
        self.serial += 1
        frame = msgspec.json.decode(encode_payload(event.data))
        signature = signature or base58_key(f"marketsig{self.serial}", 88)
        return {**frame, "signature": signature, "bondingCurveKey": CURVE}


def on_server(server: SimulatorServer, *, mint: str | None = None, wallet: str | None = None):
    return any(
        (mint is None or mint in c.mints) and (wallet is None or wallet in c.accounts)
        for c in server._clients
    )


@contextlib.asynccontextmanager
async def idle_feed(
    *,
    require_api_key: bool = False,
    feed_unsubscribe_grace_s: float | None = None,
    retest_clock: Clock | None = None,
) -> AsyncIterator[tuple[SimulatorServer, FeedService]]:
    """A simulator of an idle market (the only frames are the test's), running until the
    block ends, and a feed on it, embedded, not started; ``require_api_key``: the
    server's, ``feed_unsubscribe_grace_s`` and ``retest_clock``: the feed's (None: its
    default)."""
    server = SimulatorServer(
        market=SimulatedMarket(MarketConfig(seed=1, launches_per_minute=0.001)),
        speed=1.0,
        require_api_key=require_api_key,
    )
    given = {"feed_unsubscribe_grace_s": feed_unsubscribe_grace_s}
    await server.start()  # its port, in its url, is known once it listens
    try:
        settings = FeedSettings(
            pumpportal_ws_url=server.url,
            feed_record=False,
            feed_backoff_initial_s=0.05,
            transport="memory",
            replica="e2e",
            **{name: value for name, value in given.items() if value is not None},
        )
        yield server, FeedService(settings, registry=CollectorRegistry(), retest_clock=retest_clock)
    finally:
        await server.stop()


async def test_the_sale_of_a_token_activity_unsubscribed_is_confirmed():
    clock = WallClock()
    market = Market(clock)
    frames = Frames()
    async with idle_feed(feed_unsubscribe_grace_s=0.0) as (server, feed):
        async with fake_trade_api("success") as api:
            trading = live(
                MemoryLedger(),
                api,
                trading_live_confirm_s=CONFIRM_S,
                trading_live_answer_timeout_s=1.0,
            )
            async with run_embedded([feed, trading], clock=clock, synchronous=True) as system:
                bus = system.bus
                watch = await EventCollector("watch").attach(bus, "order.*", "position.*")
                tokens = await EventCollector("tokens").attach(bus, "token.*")
                await feed.socket.wait_connected()
                await eventually(lambda: any(c.new_tokens for c in server._clients), within=10)

                created = frames.tokens.created(
                    MINT, sol=0.5, name="Good Coin", symbol="GOOD", trader=base58_key("dev")
                )
                assert await server.inject(frames.frame(created)) == 1
                # the feed subscribes a new token's trades
                await eventually(lambda: on_server(server, mint=MINT), within=10)
                bought = frames.tokens.buy(MINT, base58_key("alice"), sol=3.0)
                assert await server.inject(frames.frame(bought)) == 1
                await eventually(lambda: tokens.count(key=MINT) == 2, within=10)
                await bus.publish(market.features(MINT))
                await bus.publish(market.lifecycle(MINT))
                await bus.publish(market.prediction(MINT))
                await eventually(lambda: watch.payloads("order.requested"), within=10)
                [request] = watch.payloads("order.requested")
                await answered(trading, api)
                buy = frames.tokens.buy(MINT, WALLET, sol=request.sol_amount)
                await server.inject(frames.frame(buy, api.requests[0].signature))
                await eventually(lambda: watch.payloads("position.opened"), within=10)
                [opened] = watch.payloads("position.opened")

                # the token goes quiet: activity unsubscribes its trades
                await bus.publish(make_event(
                    FeedSubscription(action="unsubscribe", mints=(MINT,), reason="inactive"),
                    source="activity/test", time=clock.now(),
                ))  # fmt: skip
                await eventually(lambda: not on_server(server, mint=MINT), within=10)

                # the exit service sells the rest
                sale = ExitOrder(
                    order_id=f"{opened.position_id}:exit:1",
                    mint=MINT,
                    position_id=opened.position_id,
                    token_amount=opened.token_amount,
                    reason="inactive",
                )
                await bus.publish(make_event(sale, source="exit/test", time=clock.now()))
                await answered(trading, api, requests=2)
                sold = frames.tokens.sell(MINT, WALLET, tokens=opened.token_amount)
                await server.inject(frames.frame(sold, api.requests[1].signature))
                await eventually(
                    lambda: watch.payloads("position.closed") or watch.payloads("order.rejected"),
                    within=CONFIRM_S + 10,
                )
                assert not watch.payloads("order.rejected"), watch.payloads("order.rejected")
                # trading announced its wallet as it took over
                assert on_server(server, wallet=WALLET)
                [closed] = watch.payloads("position.closed")
                assert closed.position_id == opened.position_id
                assert not trading.book.open_positions
