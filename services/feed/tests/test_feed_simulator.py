"""The feed service against the simulator over a real WebSocket on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import logging

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock, WallClock
from pumpflow.common.events import Event, FeedSubscription, encode_payload, make_event
from pumpflow.common.pumpportal import ACK_KEYS, ACK_UNSUBSCRIBED_KEYS, API_KEY_REQUIRED
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import EventCollector, base58_key, eventually
from pumpflow.common.testing.factories import TokenEvents
from pumpflow.feed.database_feed import DatabaseDataFeed
from pumpflow.feed.interface import ALL_EVENTS, FeedRecord
from pumpflow.feed.service import ACCOUNTS_KEY, FeedService
from pumpflow.feed.settings import FeedSettings
from pumpflow.simulator import server as simulator
from pumpflow.simulator.faults import FaultConfig
from pumpflow.simulator.market import Market, MarketConfig

SPEED = 40.0


class Harness:
    def __init__(self, server, bus: InMemoryBus, service: FeedService, registry: CollectorRegistry):
        self.server = server
        self.bus = bus
        self.service = service
        #: the service's metrics, its own
        self.registry = registry
        self.events: list[Event] = []
        #: the feed's announcements of its trade stream
        self.said: list[Event] = []

    def of(self, mint: str, event_type: str = "token.trade") -> list[Event]:
        return [e for e in self.events if e.key == mint and e.type == event_type]

    def created(self) -> list[str]:
        return [e.key for e in self.events if e.type == "token.created"]


async def start_harness(
    *,
    faults=FaultConfig(),
    db=None,
    seed=7,
    rate=120.0,
    per_subscription=False,
    require_api_key=False,
    retest_clock=None,
    **settings,
) -> Harness:
    server = simulator.SimulatorServer(
        market=Market(MarketConfig(seed=seed, launches_per_minute=rate)),
        speed=SPEED,
        faults=faults,
        per_subscription=per_subscription,
        require_api_key=require_api_key,
    )
    await server.start()
    bus = InMemoryBus(partitions=4, synchronous=True, source="feed/test")
    await bus.start()
    settings = FeedSettings(
        pumpportal_ws_url=server.url,
        feed_record=db is not None,
        feed_backoff_initial_s=0.05,
        transport="memory",
        replica="test",
        **settings,
    )
    registry = CollectorRegistry()
    service = FeedService(settings, registry=registry, retest_clock=retest_clock)
    harness = Harness(server, bus, service, registry)

    harness.events = (await EventCollector("probe").attach(bus, "token.*")).events
    harness.said = (await EventCollector("said").attach(bus, "feed.trade_stream")).events
    await service.start(ServiceContext(settings=settings, bus=bus, clock=WallClock(), db=db))
    await asyncio.wait_for(service.socket.wait_connected(), 5)
    return harness


async def stop_harness(h: Harness) -> None:
    await h.service.stop()
    await h.server.stop()
    await h.bus.close()


async def test_new_token_subscribes_its_trades_and_unsubscribe_stops_them():
    h = await start_harness()
    try:
        await eventually(lambda: any(h.of(m) for m in h.created()))
        mint = next(m for m in h.created() if h.of(m))
        assert mint in h.service.socket.active_mints
        assert h.of(mint, "token.created")[0].seq == 1
        # the activity service's command, over the bus
        command = make_event(
            FeedSubscription(action="unsubscribe", mints=(mint,), reason="inactive"),
            source="activity/test", time=0.0,
        )  # fmt: skip
        await h.bus.publish(command)
        await eventually(lambda: mint not in h.service.socket.active_mints)
        await eventually(lambda: h.service.socket.pending_messages == 0)
        # barrier: the server answers the unsubscribe after every frame it queued before;
        # frames are published in order, so once the feed has the answer, every trade of
        # the mint that was on the wire has been published (the bus is synchronous)
        await eventually(
            lambda: ACK_UNSUBSCRIBED_KEYS in h.service.socket.notices,
            what="the server's answer to the unsubscribe",
        )
        count = len(h.of(mint))
        others = len(h.events)
        await eventually(lambda: len(h.events) > others + 20)  # the market goes on
        assert len(h.of(mint)) == count
        assert h.service.subscriptions()["count"] == len(h.service.socket.active_mints)
    finally:
        await stop_harness(h)


async def test_dropped_connection_resubscribes_every_active_mint():
    h = await start_harness()
    try:
        await eventually(lambda: sum(1 for m in h.created() if h.of(m)) >= 3)
        before = set(h.service.socket.active_mints)
        assert await h.server.drop_connections() == 1
        await eventually(lambda: h.service.socket.sessions == 2 and h.service.socket.is_connected)
        await eventually(lambda: h.service.socket.pending_messages == 0)
        assert before <= h.service.socket.active_mints
        # trades of mints created before the drop flow again on the new connection
        mark = len(h.events)
        await eventually(lambda: any(e.key in before and e.type == "token.trade"
                                   for e in h.events[mark:]))  # fmt: skip
        assert h.service.socket.metrics.reconnects._value.get() >= 1
    finally:
        await stop_harness(h)


async def test_malformed_frames_are_dead_lettered_while_valid_ones_keep_flowing():
    h = await start_harness(faults=FaultConfig(malformed_rate=0.05, duplicate_rate=0.05, seed=3))
    try:
        await eventually(lambda: len(h.events) >= 300 and h.service.socket.invalid_frames >= 3)
        await h.service.socket.dead_letters.flush()
        letters = await h.bus.dead_letters("feed", limit=1000)
        assert len(letters) >= 3
        assert all(letter.reason for letter in letters)
        # duplicates sent by the server never reach the bus
        signatures = [(e.type, e.data.signature, e.data.txType) for e in h.events]
        assert len(signatures) == len(set(signatures))
        assert h.service.manager.duplicates > 0
        # per-mint seq has no gaps
        by_mint: dict[str, list[int]] = {}
        for e in h.events:
            by_mint.setdefault(e.key, []).append(e.seq)
        assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in by_mint.values())
    finally:
        await stop_harness(h)


@pytest.mark.postgres
async def test_record_then_replay_gives_the_same_events(pg_pool):
    h = await start_harness(db=pg_pool)
    try:
        await eventually(lambda: len(h.events) >= 200)
    finally:
        await h.service.stop()  # flushes: every received event is stored and published
        await h.server.stop()
    live = list(h.events)
    await h.bus.close()
    store = TokenEventStore(pg_pool)
    assert await store.count() == len(live)
    replayed: list[Event] = []

    async def capture(record: FeedRecord) -> None:
        replayed.append(record.event)

    feed = DatabaseDataFeed(store, clock=ReplayClock())
    feed.register_callback(ALL_EVENTS, capture)
    await feed.run()
    # arrival order is time order (ties keep arrival order)
    assert replayed == live
    assert [encode_payload(e.data) for e in replayed] == [encode_payload(e.data) for e in live]


WALLET = base58_key("livewallet")
_wallet_trades = itertools.count()


def wallet_trade(h: Harness, mint: str) -> dict:
    """A trade of the live wallet in ``mint``: the curve of a trade the market made."""
    market_trade = next(e for e in reversed(h.events) if e.type == "token.trade")
    frame = msgspec.json.decode(encode_payload(market_trade.data))
    signature = base58_key(f"walletsale{next(_wallet_trades)}", 88)
    return {**frame, "mint": mint, "traderPublicKey": WALLET, "signature": signature}


def on_server(h: Harness, *, mint: str | None = None, wallet: str | None = None) -> bool:
    """Whether the simulator's connection holds the subscription (what it filters by)."""
    return any(
        (mint is None or mint in client.mints) and (wallet is None or wallet in client.accounts)
        for client in h.server._clients
    )


async def published(h: Harness, frame: dict) -> list[Event]:
    """Send ``frame`` from the simulator; the events the feed published of it."""
    assert await h.server.inject(frame) >= 1
    await eventually(
        lambda: any(e.data.signature == frame["signature"] for e in h.events),
        within=5,
        what=f"the wallet's trade {frame['signature'][:12]} on the bus",
    )
    # barrier: a market frame sent after it is published after it
    mark = len(h.events)
    await eventually(lambda: len(h.events) > mark + 5)
    return [e for e in h.events if e.data.signature == frame["signature"]]


async def test_the_wallets_trades_stream_whatever_mints_are_subscribed_and_after_a_drop():
    """Trading's wallet (feed.subscription accounts) is streamed on the account-trade
    subscription: its trades of a mint the feed unsubscribed, or never streamed, are
    published in the mint's seq order; after a dropped connection it is subscribed again;
    a trade on both its token's and its wallet's streams is published once, one seq."""
    h = await start_harness(per_subscription=True, feed_unsubscribe_grace_s=0.0)
    try:
        await eventually(lambda: sum(1 for m in h.created() if h.of(m)) >= 2)
        quiet, streamed = [m for m in h.created() if h.of(m)][:2]
        command = FeedSubscription(
            action="subscribe", mints=(), accounts=(WALLET,), reason="live wallet"
        )
        await h.bus.publish(make_event(command, source="trading/test", time=0.0))
        await h.bus.publish(make_event(
            FeedSubscription(action="unsubscribe", mints=(quiet,), reason="inactive"),
            source="activity/test", time=0.0,
        ))  # fmt: skip
        await eventually(lambda: on_server(h, wallet=WALLET) and not on_server(h, mint=quiet))
        assert h.service.subscriptions()["accounts"] == [WALLET]

        # the sale of a token the activity service unsubscribed
        [sale] = await published(h, wallet_trade(h, quiet))
        seqs = [e.seq for e in h.events if e.key == quiet]
        assert seqs == list(range(1, len(seqs) + 1)) and sale.seq == seqs[-1]
        # a mint the feed never streamed
        never = base58_key("neverstreamedpump")
        assert never not in h.service.socket.active_mints
        assert len(await published(h, wallet_trade(h, never))) == 1

        # on both streams: sent twice, published once, and the mint's seqs have no gap
        duplicates = h.service.manager.duplicates
        assert on_server(h, mint=streamed, wallet=WALLET)
        frame = wallet_trade(h, streamed)
        [both] = await published(h, frame)
        assert h.service.manager.duplicates == duplicates + 1
        seqs = [e.seq for e in h.events if e.key == streamed]
        assert seqs == list(range(1, len(seqs) + 1)) and both.seq in seqs

        # a dropped connection: the wallet is subscribed again on the next one
        assert await h.server.drop_connections() == 1
        await eventually(lambda: h.service.socket.sessions == 2 and on_server(h, wallet=WALLET))
        [again] = await published(h, wallet_trade(h, quiet))
        assert again.seq == sale.seq + 1
    finally:
        await stop_harness(h)


async def test_a_wallet_no_longer_announced_is_unsubscribed_and_kept_for_a_take_over_on_change():
    """Trading announces its wallet, then another in its place: the first, no longer
    announced, is unsubscribed on the server (unsubscribeAccountTrade) once
    feed_account_ttl_s has passed, while the one announced stays; when trading stops
    announcing (gone for good) the last goes too. The wallets kept for a take-over are
    written as they change, not on every renewal of the lease."""
    h = await start_harness(feed_account_ttl_s=1.0, feed_lease_ttl_s=0.6)
    replaced, current = WALLET, base58_key("nextlivewallet")

    async def announce(wallet: str) -> None:
        command = FeedSubscription(
            action="subscribe", mints=(), accounts=(wallet,), reason="live wallet"
        )
        await h.bus.publish(make_event(command, source="trading/test", time=0.0))

    async def stored() -> bytes | None:
        return await h.service.leader.store.get(ACCOUNTS_KEY)

    def holds(value: bytes):
        async def check() -> bool:
            return await stored() == value

        return check

    try:
        # no wallet yet: renewals write none, not an empty list each
        renewed = h.service.leader.renewals
        await eventually(lambda: h.service.leader.renewals >= renewed + 2, what="two renewals")
        assert await stored() is None
        await announce(replaced)
        await eventually(lambda: on_server(h, wallet=replaced), what="the first wallet")

        # trading announces the new wallet on its period; the replaced one is not
        async def announced_and_expired() -> bool:
            await announce(current)
            return on_server(h, wallet=current) and not on_server(h, wallet=replaced)

        await eventually(
            announced_and_expired, interval=0.1, what="the replaced wallet unsubscribed"
        )
        assert h.service.subscriptions()["accounts"] == [current]
        # the server's acknowledgement comes after it dropped the wallet
        await eventually(lambda: ACK_UNSUBSCRIBED_KEYS in h.service.socket.notices,
                         what="the unsubscription acknowledged")  # fmt: skip
        await eventually(holds(current.encode()), what="the wallets kept: the new one")

        # nothing changes over renewals of the lease: nothing is written
        await h.service.leader.store.set(ACCOUNTS_KEY, b"written elsewhere")
        renewals = h.service.leader.renewals

        async def renewed_unchanged() -> bool:
            await announce(current)
            return h.service.leader.renewals >= renewals + 3

        await eventually(renewed_unchanged, interval=0.1, what="three renewals of the lease")
        assert await stored() == b"written elsewhere"

        # trading gone: its wallet goes too, and the empty list is written
        await eventually(lambda: not on_server(h, wallet=current), what="the wallet unsubscribed")
        assert h.service.subscriptions()["accounts"] == []
        await eventually(holds(b""), what="the wallets kept: none")
    finally:
        await stop_harness(h)


async def test_the_trade_stream_refused_is_announced_and_again_when_trading_announces_its_wallet():
    """Connected without a funded key, the feed's trade subscriptions are refused: the
    lease holder announces it (feed.trade_stream, critical, keyless) as it learns it, and
    again when trading announces its wallet (a trading replica starting learns it at
    once); funded and reconnected, it announces the stream accepted. /readyz's status and
    /subscriptions say it too; the feed stays ready (a restart would change nothing)."""
    h = await start_harness(require_api_key=True)
    said = h.said
    try:
        await eventually(lambda: said, what="the refusal announced")
        [refused] = said
        assert (refused.source, refused.key, refused.critical) == ("feed/test", None, True)
        assert refused.data.refused and refused.data.reason == API_KEY_REQUIRED
        status = await h.service.status()
        assert status["ready"] is True
        assert status["trade_stream"] == {
            "state": "refused",
            "reason": API_KEY_REQUIRED,
            "since": refused.data.since,
        }
        assert h.service.subscriptions()["trade_stream"] == status["trade_stream"]

        command = FeedSubscription(
            action="subscribe", mints=(), accounts=(WALLET,), reason="live wallet"
        )
        await h.bus.publish(make_event(command, source="trading/test", time=0.0))
        await eventually(lambda: len(said) == 2, what="announced again for trading")
        assert said[1].data == refused.data

        h.server.fund("")
        assert await h.server.drop_connections() == 1
        await eventually(lambda: len(said) == 3, what="the acceptance announced")
        assert not said[2].data.refused and said[2].data.reason == ACK_KEYS
        assert (await h.service.status())["trade_stream"]["state"] == "accepted"
        await eventually(lambda: on_server(h, wallet=WALLET))
        await eventually(lambda: any(h.of(m) for m in h.created()), what="trades stream")
    finally:
        await stop_harness(h)


async def test_an_announcement_of_the_trade_stream_that_fails_is_tried_again(monkeypatch):
    """Said at each change and when trading asks, never on a timer: a publication of the
    word that fails is tried again (trading keeps the last word it heard)."""
    h = await start_harness(require_api_key=True)
    said = h.said
    try:
        await eventually(lambda: said, what="the refusal announced")
        publish = h.bus.publish
        failed: list[Event] = []

        async def failing_once(event: Event) -> None:
            if event.type == "feed.trade_stream" and not failed:
                failed.append(event)
                raise ConnectionError("the broker went away")
            await publish(event)

        monkeypatch.setattr(h.bus, "publish", failing_once)
        command = FeedSubscription(
            action="subscribe", mints=(), accounts=(WALLET,), reason="live wallet"
        )
        await publish(make_event(command, source="trading/test", time=0.0))
        await eventually(lambda: len(said) == 2, what="said again after the failure")
        assert len(failed) == 1 and said[1].data == said[0].data
    finally:
        await stop_harness(h)


#: a market that makes no token while a test runs: the only frames are the test's
IDLE = 1e-4
_made = TokenEvents(clock=WallClock())
_frames = itertools.count()


def frame_of(event: Event) -> dict:
    """``event`` (of the factory) as PumpPortal's frame, under a signature of its own."""
    frame = msgspec.json.decode(encode_payload(event.data))
    signature = base58_key(f"retestsig{next(_frames)}", 88)
    return {**frame, "signature": signature, "bondingCurveKey": base58_key("retestcurve")}


def created(mint: str) -> dict:
    return frame_of(_made.created(mint, trader=base58_key("dev")))


def retests(h: Harness) -> float:
    return h.registry.get_sample_value("pumpflow_feed_refused_retests_total")


async def refused_on_a_calm_connection(h: Harness, mint: str) -> None:
    """A token created and its trades refused; then the key funded, on a connection that
    sends no subscription after it (an idle market): nothing tells the feed."""
    assert await h.server.inject(created(mint)) == 1
    await eventually(lambda: h.said, what="the refusal announced")
    [refused] = h.said
    assert refused.data.refused and refused.data.reason == API_KEY_REQUIRED
    await eventually(lambda: h.service.socket.pending_messages == 0)
    h.server.fund("")


async def test_a_refused_key_funded_later_is_re_tested_on_a_new_connection(caplog):
    """While PumpPortal refuses the trade subscriptions, the feed reconnects every
    feed_refused_retest_s (by its own clock, real time; a test's here): a key funded on a
    calm connection is heard at the next re-test, once, logged with when the next is
    due; the stream is announced accepted, the mints are streamed again where their seqs
    stood, and no re-test follows."""
    caplog.set_level(logging.INFO, logger="pumpflow.feed")
    clock = ReplayClock()
    h = await start_harness(require_api_key=True, rate=IDLE, retest_clock=clock)
    period = h.service.settings.feed_refused_retest_s
    mint = base58_key("retestedcoinpump")
    try:
        await refused_on_a_calm_connection(h, mint)
        assert retests(h) == 0 and h.server.counters["connections"] == 1
        await clock.advance(period - 1)
        assert retests(h) == 0 and h.server.counters["connections"] == 1
        await clock.advance(1)
        said = [record.getMessage() for record in caplog.records]
        [retested] = [line for line in said if "re-test the key" in line]
        assert retested.startswith("PumpPortal has refused the feed's trade subscriptions for ")
        assert "(re-test 1; the next 300 s into the new connection while still refused)" in (
            retested
        )
        await eventually(lambda: len(h.said) == 2, what="the acceptance announced")
        accepted = h.said[1].data
        assert not accepted.refused and accepted.reason == ACK_KEYS
        assert retests(h) == 1 and h.server.counters["connections"] == 2
        assert h.service.socket.sessions == 2
        assert (await h.service.status())["trade_stream"]["state"] == "accepted"
        await eventually(lambda: on_server(h, mint=mint), what="the mint streamed again")
        # what a reconnect keeps: the mint's trade goes on from its creation's seq
        bought = frame_of(_made.buy(mint, trader=base58_key("alice"), sol=1.0))
        assert await h.server.inject(bought) == 1
        await eventually(lambda: h.of(mint), what="the trade published")
        assert [e.seq for e in h.events if e.key == mint] == [1, 2]
        # accepted: never re-tested
        await clock.advance(10 * period)
        assert retests(h) == 1 and h.server.counters["connections"] == 2
        assert len(h.said) == 2
    finally:
        await stop_harness(h)


async def test_a_stream_accepted_on_its_connection_is_not_re_tested():
    """Refused, then accepted on the same connection (the key funded, a new token's
    subscription acknowledged): the re-test due while it was refused does not come."""
    clock = ReplayClock()
    h = await start_harness(require_api_key=True, rate=IDLE, retest_clock=clock)
    period = h.service.settings.feed_refused_retest_s
    try:
        await refused_on_a_calm_connection(h, base58_key("refusedcoinpump"))
        assert await h.server.inject(created(base58_key("ackedcoinpump"))) == 1
        await eventually(lambda: len(h.said) == 2, what="the acceptance announced")
        assert not h.said[1].data.refused
        await clock.advance(10 * period)
        assert retests(h) == 0 and h.server.counters["connections"] == 1
        assert h.service.socket.sessions == 1
    finally:
        await stop_harness(h)


async def test_no_re_test_with_the_setting_0():
    """feed_refused_retest_s 0: the refused stream stays as it is (the key funded on a
    calm connection goes unheard) until a reconnect comes by chance."""
    clock = ReplayClock()
    h = await start_harness(
        require_api_key=True, rate=IDLE, retest_clock=clock, feed_refused_retest_s=0
    )
    try:
        await refused_on_a_calm_connection(h, base58_key("neverretestedpump"))
        # past where the default period re-tests (the test above)
        default = FeedSettings.model_fields["feed_refused_retest_s"].default
        await clock.advance(10 * default)
        assert retests(h) == 0 and h.server.counters["connections"] == 1
        assert h.service.socket.trade_stream.refused and len(h.said) == 1
    finally:
        await stop_harness(h)
