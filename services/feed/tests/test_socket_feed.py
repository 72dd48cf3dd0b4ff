"""SocketDataFeed and the service over a real WebSocket on 127.0.0.1, against a scripted peer."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from websockets.asyncio.server import ServerConnection, serve

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock, WallClock
from pumpflow.common.events import Event, FeedSubscription, make_event
from pumpflow.common.pumpportal import (
    ACK_KEYS,
    ACK_MIGRATION,
    ACK_NEW_TOKEN,
    API_KEY_REQUIRED,
    FrameKind,
)
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import base58_key, eventually
from pumpflow.feed import reference_frames as ref
from pumpflow.feed import socket_feed
from pumpflow.feed.database_feed import DatabaseDataFeed
from pumpflow.feed.interface import ALL_EVENTS, FeedError, FeedRecord
from pumpflow.feed.manager import DataFeedManager, FeedManagerConfig
from pumpflow.feed.metrics import FeedMetrics
from pumpflow.feed.ratelimit import SlidingWindowLimiter
from pumpflow.feed.recorder import Recorder, RecorderConfig
from pumpflow.feed.service import FeedService
from pumpflow.feed.settings import FeedSettings
from pumpflow.feed.socket_feed import SocketDataFeed, SocketFeedConfig

MINT_A, MINT_B, MINT_C = (base58_key(f"Mint{c}") for c in "ABC")
STRANGER = base58_key("Stranger")


def signature(label: str) -> str:
    return base58_key(label, 88)


def create(mint: str) -> bytes:
    return ref.CREATE.replace(b"8yZ1rj5nHbUFuCbnoowE6rHLZYiuTe1tbxEskgzUpump", mint.encode()) \
        .replace(b"3ShNEcfKhWrvFVTwHCK7FjgWXABAZgo9Cpr2S6AGngg9xDifcQyY2mGQQ85p11vxSRvQ3B3Sba"
                 b"ajobL1rfSJmyjG", signature(f"create-{mint}").encode())  # fmt: skip


def trade(mint: str, i: int) -> bytes:
    return ref.SELL.replace(b"14k7LpDRKvyVuMWfGe1vB5ByoQh1yUQPetApMBLuzw1f", mint.encode()) \
        .replace(b"5PEnuUTTiqyEoeXtSdFPC38pY1bFCXFAFXKq52WQBCUPzC8sJLhxNDxPDB9YBrQWZDxB6GTz"
                 b"JcPKH399ZpwUP1LY", signature(f"trade-{mint}-{i}").encode())  # fmt: skip


class Peer:
    """A PumpPortal-protocol server that records what clients send."""

    def __init__(self) -> None:
        self.connections: list[ServerConnection] = []
        self.received: list[dict] = []
        self.paths: list[str] = []
        self.trade_keys: set[str] = set()
        #: the key's wallet holds 0.02 SOL: trade subscriptions are acknowledged, else refused
        self.funded = True
        self.changed = asyncio.Event()

    async def handler(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        self.paths.append(ws.request.path)
        self.trade_keys = set()
        async for message in ws:
            msg = json.loads(message)
            self.received.append(msg)
            method = msg["method"]
            if method == "subscribeNewToken":
                await ws.send(json.dumps({"message": ACK_NEW_TOKEN}))
            elif method == "subscribeMigration":
                await ws.send(json.dumps({"message": ACK_MIGRATION}))
            elif method in ("subscribeTokenTrade", "subscribeAccountTrade") and not self.funded:
                await ws.send(json.dumps({"message": API_KEY_REQUIRED}))
            elif method == "subscribeTokenTrade":
                self.trade_keys.update(msg["keys"])
                await ws.send(json.dumps({"message": ACK_KEYS}))
            elif method == "unsubscribeTokenTrade":
                self.trade_keys.difference_update(msg["keys"])
            self.changed.set()

    async def send(self, *frames: bytes) -> None:
        ws = self.connections[-1]
        for frame in frames:
            await ws.send(frame.decode())

    async def until(self, predicate, limit_s: float = 5.0) -> None:
        async with asyncio.timeout(limit_s):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def methods(self) -> list[str]:
        return [m["method"] for m in self.received]


@pytest.fixture
async def peer():
    p = Peer()
    async with serve(p.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        p.url = f"ws://127.0.0.1:{port}/api/data"
        yield p


@pytest.fixture
async def bus_and_events():
    bus = InMemoryBus(partitions=4, synchronous=True, source="feed/test")
    await bus.start()
    got: list[Event] = []

    async def handler(event: Event) -> None:
        got.append(event)

    await bus.subscribe(Subscription(service="probe", patterns=("token.*",), handler=handler))
    yield bus, got
    await bus.close()


def make_feed(
    peer, bus, *, clock=None, on_trade_stream=None, **kwargs
) -> tuple[SocketDataFeed, DataFeedManager]:
    metrics = FeedMetrics(CollectorRegistry())
    config = SocketFeedConfig(url=peer.url, backoff_initial_s=0.05, **kwargs)
    feed = SocketDataFeed(
        config,
        clock=clock or WallClock(),
        bus=bus,
        metrics=metrics,
        on_trade_stream=on_trade_stream,
    )
    manager = DataFeedManager(bus, config=FeedManagerConfig(source="feed/test"), metrics=metrics)
    manager.add_data_feed(feed)
    return feed, manager


async def start(manager: DataFeedManager, feed: SocketDataFeed) -> None:
    """Start the manager and wait for the first session."""
    await manager.start()
    await asyncio.wait_for(feed.wait_connected(), 5)


async def test_new_token_leads_to_its_trade_subscription(peer, bus_and_events):
    bus, got = bus_and_events
    feed, manager = make_feed(peer, bus)
    await start(manager, feed)
    await peer.until(lambda: peer.methods()[:2] == ["subscribeNewToken", "subscribeMigration"])
    await peer.send(create(MINT_A))
    await peer.until(lambda: MINT_A in peer.trade_keys)
    await peer.send(trade(MINT_A, 1), trade(MINT_A, 2))
    await eventually(lambda: len(got) == 3)
    assert [(e.type, e.key, e.seq) for e in got] == [
        ("token.created", MINT_A, 1), ("token.trade", MINT_A, 2), ("token.trade", MINT_A, 3),
    ]  # fmt: skip
    assert feed.active_mints == {MINT_A}
    assert feed.metrics.frames_by_kind[FrameKind.CONTROL].value >= 3  # acks
    assert feed.metrics.frames_by_kind[FrameKind.SELL].value == 2
    await manager.stop()


async def test_unsubscribe_stops_trades(peer, bus_and_events):
    bus, _got = bus_and_events
    feed, manager = make_feed(peer, bus)
    await start(manager, feed)
    await peer.send(create(MINT_A), create(MINT_B))
    await peer.until(lambda: peer.trade_keys == {MINT_A, MINT_B})
    await manager.unsubscribe_from_token(MINT_A)
    await peer.until(lambda: peer.trade_keys == {MINT_B})
    assert {"method": "unsubscribeTokenTrade", "keys": [MINT_A]} in peer.received
    assert feed.active_mints == {MINT_B}
    # subscribing again (a feed.subscription "subscribe" command) restores it
    await manager.subscribe_to_token(MINT_A)
    await peer.until(lambda: peer.trade_keys == {MINT_A, MINT_B})
    await manager.stop()


async def test_dropped_connection_resubscribes_every_active_mint(peer, bus_and_events):
    bus, got = bus_and_events
    feed, manager = make_feed(peer, bus)
    await start(manager, feed)
    mints = [base58_key(f"Mint{i}") for i in range(30)]
    await peer.send(*(create(m) for m in mints))
    await peer.until(lambda: peer.trade_keys == set(mints))
    await manager.unsubscribe_from_token(mints[0])
    await peer.until(lambda: mints[0] not in peer.trade_keys)
    await peer.connections[-1].close()
    await peer.until(lambda: len(peer.connections) == 2 and peer.trade_keys == set(mints[1:]))
    assert feed.sessions == 2
    assert feed.metrics.reconnects._value.get() == 1
    second = peer.received[[m["method"] for m in peer.received].index("subscribeNewToken", 1) :]
    assert [m["method"] for m in second[:2]] == ["subscribeNewToken", "subscribeMigration"]
    await eventually(lambda: feed.is_connected)
    await peer.send(trade(mints[5], 1))
    await eventually(lambda: any(e.type == "token.trade" for e in got))
    await manager.stop()


async def test_malformed_frames_are_dead_lettered_and_valid_ones_keep_flowing(peer, bus_and_events):
    bus, got = bus_and_events
    feed, manager = make_feed(peer, bus)
    await start(manager, feed)
    bad_schema = trade(MINT_A, 9).replace(b'"tokenAmount": 36189.104326', b'"tokenAmount": "x"')
    await peer.send(create(MINT_A), b"{oops", bad_schema, ref.ERROR_STRING, trade(MINT_A, 1))
    await eventually(lambda: len(got) == 2)
    assert [e.type for e in got] == ["token.created", "token.trade"]
    await feed.dead_letters.flush()
    letters = await bus.dead_letters("feed")
    assert [letter.body for letter in letters] == [b"{oops", bad_schema]
    assert "not JSON" in letters[0].reason
    assert "tokenAmount" in letters[1].reason
    assert feed.invalid_frames == 2
    assert feed.metrics.invalid_frames._value.get() == 2
    assert "unsubscribeMigration is not a valid method" in feed.notices
    await manager.stop()


async def test_a_text_frame_that_is_not_utf8_is_dead_lettered_on_the_same_connection(
    peer, bus_and_events
):
    bus, got = bus_and_events
    feed, manager = make_feed(peer, bus)
    await start(manager, feed)
    not_utf8 = b'{"message": "\xff\xfe"}'
    await peer.connections[-1].send(not_utf8, text=True)
    await peer.send(create(MINT_A))
    await eventually(lambda: len(got) == 1)
    await feed.dead_letters.flush()
    assert [letter.body for letter in await bus.dead_letters("feed")] == [not_utf8]
    assert feed.sessions == 1 and len(peer.connections) == 1
    await manager.stop()


async def test_an_error_handling_one_frame_is_that_frames_error_and_the_session_goes_on(
    peer, bus_and_events, monkeypatch
):
    bus, got = bus_and_events
    feed, manager = make_feed(peer, bus)
    await start(manager, feed)
    deep = b'{"txType": "buy", "signature": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    unforeseen = b'{"message": "a frame no decoder foresaw"}'
    decode = socket_feed.decode_frame

    def decode_frame(data: bytes):
        if data == unforeseen:
            raise ZeroDivisionError("no decoder foresaw this")
        return decode(data)

    monkeypatch.setattr(socket_feed, "decode_frame", decode_frame)
    await peer.send(create(MINT_A), deep, trade(MINT_A, 1), unforeseen, trade(MINT_A, 2))
    await eventually(lambda: len(got) == 3, what="the frames after the bad ones")
    assert [e.data.signature for e in got] == [
        signature(f"create-{MINT_A}"), signature(f"trade-{MINT_A}-1"),
        signature(f"trade-{MINT_A}-2"),
    ]  # fmt: skip
    assert feed.sessions == 1 and len(peer.connections) == 1
    await feed.dead_letters.flush()
    letters = await bus.dead_letters("feed")
    assert [letter.body for letter in letters] == [deep, unforeseen]
    assert "ZeroDivisionError: no decoder foresaw this" in letters[1].reason
    assert feed.invalid_frames == 2 and feed.metrics.invalid_frames._value.get() == 2
    await manager.stop()


async def test_a_huge_control_frame_leaves_a_small_log_line_and_small_state(
    peer, bus_and_events, caplog
):
    bus, got = bus_and_events
    feed, manager = make_feed(peer, bus)
    await start(manager, feed)
    caplog.set_level(logging.DEBUG, logger="pumpflow.feed")
    # as large as the protocol's limit allows (a larger one is rejected as such)
    huge_message = json.dumps({"message": "m" * 250_000}).encode()
    huge_errors = json.dumps({"errors": ["e" * 1000] * 250}).encode()
    await peer.send(huge_message, huge_errors, create(MINT_A))
    await eventually(lambda: len(got) == 1)
    assert feed.metrics.frames_by_kind[FrameKind.ERROR].value == 1
    # by content: the acknowledgement of the new mint's subscription may come between
    logged = [r.getMessage() for r in caplog.records if "PumpPortal" in r.getMessage()]
    message_lines = [line for line in logged if "mmmm" in line]
    error_lines = [line for line in logged if "eeee" in line]
    assert len(message_lines) == len(error_lines) == 1
    assert all(len(line) < 1_000 for line in logged)
    assert f"... ({len(huge_message):,} bytes)" in message_lines[0]
    assert f"... ({len(huge_errors):,} bytes)" in error_lines[0]
    assert sum(len(notice) for notice in feed.notices) < 2_000
    # a flood of them is logged within a budget, and says how many it held back
    caplog.clear()
    await peer.send(*(b'{"errors": "flood %d"}' % i for i in range(100)), create(MINT_B))
    await eventually(lambda: len(got) == 2)
    flood = [r.getMessage() for r in caplog.records if "PumpPortal error" in r.getMessage()]
    assert 1 <= len(flood) <= 10 and len(feed.notices) == 32
    await manager.stop()


async def test_a_frame_over_the_read_limit_is_dead_lettered_as_a_prefix_on_the_same_connection(
    peer, bus_and_events, caplog
):
    bus, got = bus_and_events
    feed, manager = make_feed(peer, bus)
    await start(manager, feed)
    caplog.set_level(logging.WARNING, logger="pumpflow.feed")
    oversize = b'{"message": "' + b"m" * socket_feed.MAX_READ_BYTES + b'"}'
    await peer.send(create(MINT_A), oversize, oversize)
    await peer.until(lambda: MINT_A in peer.trade_keys)
    await peer.send(trade(MINT_A, 1))
    await eventually(lambda: len(got) == 2)
    assert feed.invalid_frames == 2 and len(peer.connections) == 1 and feed.sessions == 1
    await feed.dead_letters.flush()
    letters = await bus.dead_letters("feed")
    prefix = oversize[: socket_feed.OVERSIZE_PREFIX_BYTES]
    assert [letter.body for letter in letters] == [prefix, prefix]
    reason = (f"frame of {len(oversize):,} bytes over the read limit of "
              f"{socket_feed.MAX_READ_BYTES:,}")  # fmt: skip
    assert all(reason in letter.reason for letter in letters)
    lines = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(lines) == 2 and all(reason in line and len(line) < 1_000 for line in lines)
    await manager.stop()


async def test_a_frame_over_the_socket_limit_is_reported_and_the_feed_reconnects(
    peer, bus_and_events, caplog
):
    bus, got = bus_and_events
    feed, manager = make_feed(peer, bus)
    await start(manager, feed)
    caplog.set_level(logging.ERROR, logger="pumpflow.feed")
    oversize = b'{"message": "' + b"m" * socket_feed.MAX_TRANSPORT_BYTES + b'"}'
    await peer.send(create(MINT_A), oversize)
    await peer.until(lambda: len(peer.connections) == 2)
    await peer.until(lambda: MINT_A in peer.trade_keys)  # subscribed again
    await peer.send(trade(MINT_A, 1))
    await eventually(lambda: len(got) == 2)
    assert feed.invalid_frames == 1
    [line] = [r.getMessage() for r in caplog.records if "closed the connection" in r.getMessage()]
    assert f"a frame over {socket_feed.MAX_TRANSPORT_BYTES} bytes" in line and len(line) < 300
    await manager.stop()


async def test_dead_letters_never_hold_up_the_reader(peer):
    """A broker slow to confirm: frames go on being read; the letters follow once it does."""
    sink = GatedSink()
    feed = SocketDataFeed(SocketFeedConfig(url=peer.url), clock=WallClock(), bus=sink)
    await feed.connect()
    bad = [b'{"txType": "buy", "n": %d}' % i for i in range(500)]
    async with asyncio.timeout(5):
        for frame in bad:
            await feed._on_frame(frame)  # the reader's path: returns without the broker
    assert feed.invalid_frames == 500 and sink.bodies == []
    sink.gate.set()
    await feed.disconnect()  # sends what is queued
    assert sink.bodies == bad


class GatedSink:
    """Takes dead letters only once ``gate`` is set (a broker that is slow to confirm)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.bodies: list[bytes] = []

    async def dead_letter(self, body, *, service, reason, event_type=None, **_) -> None:
        await self.gate.wait()
        self.bodies.append(body)


async def test_hostile_frames_are_dead_lettered_and_the_connection_goes_on(peer, bus_and_events):
    bus, got = bus_and_events
    feed, manager = make_feed(peer, bus)
    await start(manager, feed)
    deep = b'{"message": ' + b"[" * 1_000 + b"]" * 1_000 + b"}"
    huge_signature = trade(MINT_A, 1).replace(
        signature(f"trade-{MINT_A}-1").encode(), b"5" * 10_240
    )
    twice = trade(MINT_A, 2).replace(b'"txType": "sell"', b'"txType": "buy", "txType": "sell"')
    await peer.send(deep, huge_signature, twice, create(MINT_A))
    await eventually(lambda: len(got) == 1)
    await feed.dead_letters.flush()
    letters = await bus.dead_letters("feed")
    assert [letter.body for letter in letters] == [deep, huge_signature, twice]
    assert "nested too deep" in letters[0].reason
    assert "`signature`" in letters[1].reason and "`txType`" in letters[2].reason
    assert feed.sessions == 1 and len(peer.connections) == 1
    await manager.stop()


async def test_subscriptions_are_batched_within_the_key_limit(peer, bus_and_events):
    bus, _got = bus_and_events
    feed, manager = make_feed(peer, bus, max_keys_per_message=7, auto_subscribe_trades=False)
    await start(manager, feed)
    await peer.until(lambda: "subscribeMigration" in peer.methods())
    await manager.subscribe_to_token([f"M{i}" for i in range(20)])
    await peer.until(lambda: len(peer.trade_keys) == 20)
    sizes = [len(m["keys"]) for m in peer.received if m["method"] == "subscribeTokenTrade"]
    assert sizes == [7, 7, 6]
    await manager.stop()


def refused_gauge(feed: SocketDataFeed) -> float:
    return feed.metrics.trade_stream_refused._value.get()


async def test_a_refused_trade_subscription_is_said_once_and_an_accepted_one_resubscribes_all(
    peer, bus_and_events, caplog
):
    """PumpPortal refuses the trade subscriptions of a key not funded with 0.02 SOL: the
    feed's trade stream is refused (said once per change: a warning, the gauge, its
    listener) until a subscription is acknowledged, the key funded meanwhile; then the
    mints refused on this connection are subscribed again, as none of them streams."""
    bus, _got = bus_and_events
    heard = []
    feed, manager = make_feed(peer, bus, on_trade_stream=heard.append)
    peer.funded = False
    caplog.set_level(logging.INFO, logger="pumpflow.feed")
    await start(manager, feed)
    assert feed.trade_stream is None  # nothing asked yet: not known
    await peer.send(create(MINT_A))
    await eventually(lambda: feed.trade_stream is not None)
    stream = feed.trade_stream
    assert stream.refused and stream.reason == API_KEY_REQUIRED
    assert heard == [stream] and refused_gauge(feed) == 1
    await peer.send(create(MINT_B))
    await peer.until(lambda: peer.methods().count("subscribeTokenTrade") == 2)
    await eventually(lambda: feed.notices.count(API_KEY_REQUIRED) == 2)
    assert heard == [stream] and peer.trade_keys == set()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        f"PumpPortal refuses the feed's trade subscriptions: {API_KEY_REQUIRED} No token or "
        "wallet trade streams (trading halts its entries) until one is accepted: give the "
        "feed an API key whose wallet holds at least 0.02 SOL (PUMPPORTAL_API_KEY); "
        "re-tested on a new connection every 300 s while refused "
        "(PUMPFLOW_FEED_REFUSED_RETEST_S)"
    ]

    peer.funded = True
    await peer.send(create(MINT_C))
    await peer.until(lambda: peer.trade_keys == {MINT_A, MINT_B, MINT_C})
    await eventually(lambda: len(heard) == 2)
    assert not heard[1].refused and heard[1].reason == ACK_KEYS
    assert feed.trade_stream is heard[1] and refused_gauge(feed) == 0
    assert "PumpPortal accepts the feed's trade subscriptions again" in caplog.text
    await manager.stop()


async def test_a_refusal_ends_at_the_first_subscription_a_new_connection_has_accepted(
    peer, bus_and_events
):
    """Funded while the connection is down: the new connection's subscriptions (every mint
    wanted) are acknowledged, and the stream is accepted; nothing is subscribed twice."""
    bus, _got = bus_and_events
    heard = []
    feed, manager = make_feed(peer, bus, on_trade_stream=heard.append)
    peer.funded = False
    await start(manager, feed)
    await peer.send(create(MINT_A), create(MINT_B))
    await eventually(lambda: feed.trade_stream is not None and feed.pending_messages == 0)
    assert [s.refused for s in heard] == [True]
    peer.funded = True
    await peer.connections[-1].close()
    await peer.until(lambda: len(peer.connections) == 2 and peer.trade_keys == {MINT_A, MINT_B})
    await eventually(lambda: len(heard) == 2)
    assert not heard[1].refused
    await peer.send(trade(MINT_A, 1))
    await eventually(lambda: feed.data_frames == 3)
    second = peer.received[[m["method"] for m in peer.received].index("subscribeNewToken", 1) :]
    keys = [k for m in second if m["method"] == "subscribeTokenTrade" for k in m["keys"]]
    assert sorted(keys) == sorted([MINT_A, MINT_B])
    await manager.stop()


async def test_a_trade_streaming_while_refused_says_the_stream_is_accepted(peer, bus_and_events):
    """A trade is the stream at work, acknowledged or not (the key funded meanwhile)."""
    bus, got = bus_and_events
    heard = []
    feed, manager = make_feed(peer, bus, on_trade_stream=heard.append)
    peer.funded = False
    await start(manager, feed)
    await peer.send(create(MINT_A))
    await eventually(lambda: heard)
    peer.funded = True
    await peer.send(trade(MINT_A, 1))
    await eventually(lambda: len(heard) == 2)
    assert not heard[1].refused and heard[1].reason == "a trade streamed"
    assert [e.type for e in got] == ["token.created", "token.trade"]
    # what the connection was refused is subscribed again
    await peer.until(lambda: peer.trade_keys == {MINT_A})
    assert len(heard) == 2
    await manager.stop()


async def test_api_key_goes_in_the_url_and_never_in_logs(peer, bus_and_events, caplog):
    bus, _got = bus_and_events
    caplog.set_level(logging.DEBUG)
    feed, manager = make_feed(peer, bus, api_key="TOPSECRETKEY")
    await start(manager, feed)
    await peer.until(lambda: len(peer.received) >= 2)
    assert peer.paths == ["/api/data?api-key=TOPSECRETKEY"]
    await peer.connections[-1].close()
    await peer.until(lambda: len(peer.connections) == 2)
    await manager.stop()
    ours = "\n".join(
        r.getMessage() for r in caplog.records if not r.name.startswith("websockets.server")
    )  # the test peer's own server logs are not the feed's
    assert "TOPSECRETKEY" not in ours
    assert "api-key=***" in ours
    assert "GET /api/data?api-key=*** HTTP/1.1" in ours
    assert "TOPSECRETKEY" not in feed.redacted_url


async def test_a_server_that_drops_working_connections_is_rejoined_at_once(bus_and_events):
    """A session that carried market data resets the backoff, however short it was."""
    bus, _ = bus_and_events
    connections = 0

    async def one_frame_then_close(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        await ws.recv()  # the subscription to new tokens
        await ws.send(ref.CREATE.decode())
        await ws.close()

    async with serve(one_frame_then_close, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        metrics = FeedMetrics(CollectorRegistry())
        # sessions of no length: without the reset, twelve reconnects would wait about
        # 0.05 * (2**12 - 1) * 3/4 s, over two and a half minutes
        config = SocketFeedConfig(
            url=f"ws://127.0.0.1:{port}/api/data", backoff_initial_s=0.05, backoff_max_s=600.0
        )
        feed = SocketDataFeed(config, clock=WallClock(), bus=bus, metrics=metrics)
        manager = DataFeedManager(
            bus, config=FeedManagerConfig(source="feed/test"), metrics=metrics
        )
        manager.add_data_feed(feed)
        await manager.start()
        try:
            await eventually(lambda: connections >= 12, within=20)
            assert feed.data_frames >= 11
        finally:
            await manager.stop()


async def test_reconnect_backoff_grows_with_jitter_and_is_capped():
    import random

    config = SocketFeedConfig(url="ws://127.0.0.1:9/x", backoff_initial_s=1.0, backoff_max_s=8.0)
    feed = SocketDataFeed(config, clock=WallClock(), rng=random.Random(1))
    delays = [feed._backoff(a) for a in range(1, 8)]
    ceilings = [1, 2, 4, 8, 8, 8, 8]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered


async def test_unreachable_server_is_retried_until_it_appears(bus_and_events, caplog):
    bus, _ = bus_and_events
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = Peer()
    peer.url = f"ws://127.0.0.1:{port}/api/data"
    feed, manager = make_feed(peer, bus)
    await feed.connect()

    def failed_attempts() -> int:
        return sum(
            1
            for r in caplog.records
            if r.name == "pumpflow.feed.socket_feed" and r.msg.startswith("connect to %s failed")
        )

    # the barrier: attempts that ended, not time that passed
    await eventually(lambda: failed_attempts() >= 2, what="two failed connection attempts")
    assert not feed.is_connected and feed.sessions == 0
    async with serve(peer.handler, "127.0.0.1", port):
        await asyncio.wait_for(feed.wait_connected(), 5)
        await peer.until(lambda: "subscribeNewToken" in peer.methods())
    await manager.stop()


async def test_a_server_away_for_over_a_thousand_attempts_is_still_retried(bus_and_events, caplog):
    """The backoff's ceiling holds however many attempts failed (the feed never gives up)."""
    bus, _ = bus_and_events
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = Peer()
    peer.url = f"ws://127.0.0.1:{port}/api/data"
    feed, manager = make_feed(peer, bus, backoff_max_s=0.001)
    await feed.connect()

    def failed_attempts() -> int:
        return sum(
            1
            for r in caplog.records
            if r.name == "pumpflow.feed.socket_feed" and r.msg.startswith("connect to %s failed")
        )

    # 2**1024 has no float: a backoff computed as one would end the connection loop there
    await eventually(
        lambda: failed_attempts() >= 1100,
        within=30,
        what="1,100 failed connection attempts",
        details=lambda: f"{failed_attempts()} so far; connection loop done: {feed._task.done()}",
    )
    async with serve(peer.handler, "127.0.0.1", port):
        await asyncio.wait_for(feed.wait_connected(), 5)
        await peer.until(lambda: "subscribeNewToken" in peer.methods())
    await manager.stop()


async def test_sliding_window_never_exceeds_the_rate():
    now = [0.0]
    limiter = SlidingWindowLimiter(3, monotonic=lambda: now[0])
    for _ in range(3):
        assert limiter.delay() == 0.0
        await limiter.acquire()
    assert limiter.delay() == pytest.approx(1.0)
    now[0] = 0.6
    assert limiter.delay() == pytest.approx(0.4)
    now[0] = 1.0
    assert limiter.delay() == 0.0


# ---------------------------------------------------------------- trades never subscribed


async def test_trades_of_mints_never_subscribed_are_counted_and_kept_out_of_the_pipeline(
    peer, bus_and_events
):
    bus, got = bus_and_events
    feed, manager = make_feed(peer, bus)
    await start(manager, feed)
    await peer.send(create(MINT_A))
    await peer.until(lambda: MINT_A in peer.trade_keys)
    # the server sends a trade of a mint nobody subscribed to, among wanted ones
    await peer.send(trade(MINT_A, 1), trade(STRANGER, 1), trade(MINT_A, 2))
    await eventually(lambda: len(got) == 3)
    await eventually(lambda: manager.unsubscribed_trades == 1)
    assert [(e.type, e.key) for e in got] == [
        ("token.created", MINT_A), ("token.trade", MINT_A), ("token.trade", MINT_A),
    ]  # fmt: skip
    assert feed.metrics.unsubscribed_trades._value.get() == 1
    assert STRANGER not in feed.active_mints  # a stray trade subscribes nothing
    await manager.stop()


async def test_trades_in_flight_after_an_unsubscribe_pass_within_the_grace_only(
    peer, bus_and_events
):
    bus, got = bus_and_events
    feed, manager = make_feed(peer, bus, unsubscribe_grace_s=0.0)
    await start(manager, feed)
    await peer.send(create(MINT_A), create(MINT_B))
    await peer.until(lambda: peer.trade_keys == {MINT_A, MINT_B})
    await manager.unsubscribe_from_token(MINT_A)
    await peer.until(lambda: peer.trade_keys == {MINT_B})
    await peer.send(trade(MINT_A, 1), trade(MINT_B, 1))
    await eventually(lambda: len(got) == 3)
    await eventually(lambda: manager.unsubscribed_trades == 1)
    assert got[-1].key == MINT_B
    await manager.stop()

    bus2 = InMemoryBus(partitions=4, synchronous=True, source="feed/test")
    await bus2.start()
    graced: list[Event] = []

    async def handler(event: Event) -> None:
        graced.append(event)

    await bus2.subscribe(Subscription(service="probe", patterns=("token.*",), handler=handler))
    feed, manager = make_feed(peer, bus2)  # the default grace: 10 s
    await start(manager, feed)
    await peer.send(create(MINT_C))
    await peer.until(lambda: MINT_C in peer.trade_keys)
    await manager.unsubscribe_from_token(MINT_C)
    await peer.until(lambda: MINT_C not in peer.trade_keys)
    await peer.send(trade(MINT_C, 1))  # sent before the server read the unsubscribe
    await eventually(lambda: len(graced) == 2)
    assert manager.unsubscribed_trades == 0
    await manager.stop()
    await bus2.close()


async def test_the_grace_after_an_unsubscribe_runs_on_the_injected_clock(peer, bus_and_events):
    # a replay: a trade is in flight or not by the clock that stamps the frames,
    # whatever wall time passed
    bus, got = bus_and_events
    clock = ReplayClock(1_700_000_000.0)
    feed, manager = make_feed(peer, bus, clock=clock)  # the default grace: 10 s
    await start(manager, feed)
    await peer.send(create(MINT_A), create(MINT_B))
    await peer.until(lambda: peer.trade_keys == {MINT_A, MINT_B})
    await manager.unsubscribe_from_token([MINT_A, MINT_B])
    await peer.until(lambda: not peer.trade_keys)
    await clock.advance(9.5)
    await peer.send(trade(MINT_A, 1))
    await eventually(lambda: len(got) == 3)
    await clock.advance(0.5)
    await peer.send(trade(MINT_B, 1), trade(MINT_A, 2))
    await eventually(lambda: manager.unsubscribed_trades == 2)
    assert [(e.type, e.key) for e in got] == [
        ("token.created", MINT_A), ("token.created", MINT_B), ("token.trade", MINT_A),
    ]  # fmt: skip
    await manager.stop()


# ---------------------------------------------------------------- the service's history


async def start_service(peer, bus, db=None) -> FeedService:
    settings = FeedSettings(
        pumpportal_ws_url=peer.url, feed_record=db is not None, feed_backoff_initial_s=0.05,
        transport="memory", replica="t",
    )  # fmt: skip
    service = FeedService(settings, registry=CollectorRegistry())
    await service.start(ServiceContext(settings=settings, bus=bus, clock=WallClock(), db=db))
    await asyncio.wait_for(service.socket.wait_connected(), 5)
    return service


async def get(service: FeedService, path: str) -> httpx.Response:
    app = FastAPI()
    app.include_router(service.router())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://feed") as client:
        return await client.get(path)


async def test_recent_events_of_subscribed_mints_are_served_from_memory(peer, bus_and_events):
    bus, got = bus_and_events
    service = await start_service(peer, bus)
    try:
        await peer.send(create(MINT_A))
        await peer.until(lambda: MINT_A in peer.trade_keys)
        await peer.send(trade(MINT_A, 1), trade(MINT_A, 2), trade(MINT_A, 3))
        await eventually(lambda: len(got) == 4)

        body = (await get(service, f"/tokens/{MINT_A}/events")).json()
        assert [(e["type"], e["seq"]) for e in body["events"]] == [
            ("token.created", 1), ("token.trade", 2), ("token.trade", 3), ("token.trade", 4),
        ]  # fmt: skip
        assert body["events"][1]["data"]["signature"] == signature(f"trade-{MINT_A}-1")
        assert body["covered_from"] <= got[0].time
        body = (await get(service, f"/tokens/{MINT_A}/events?type=token.trade&limit=2")).json()
        assert [e["seq"] for e in body["events"]] == [3, 4]
        assert (await get(service, f"/tokens/{MINT_A}/events?type=token.swap")).status_code == 422
        assert (await get(service, "/tokens/Nobody/events")).status_code == 404

        # a window memory covers is answered from it, without a database
        window = await service.socket.get_historical_data(MINT_A, got[0].time, got[3].time)
        assert [e.id for e in window] == [e.id for e in got[:3]]
        # one older than the look-back needs Postgres, which this feed has not
        with pytest.raises(FeedError):
            await service.socket.get_historical_data(MINT_A, got[0].time - 60, None)

        # the activity service unsubscribes it: forgotten
        command = make_event(
            FeedSubscription(action="unsubscribe", mints=(MINT_A,), reason="inactive"),
            source="activity/test", time=0.0,
        )  # fmt: skip
        await bus.publish(command)
        await eventually(lambda: not service.lookback.holds(MINT_A))
        assert (await get(service, f"/tokens/{MINT_A}/events")).status_code == 404
    finally:
        await service.stop()


@pytest.mark.postgres
async def test_older_windows_come_from_postgres_where_stray_trades_are_kept_raw(
    peer, bus_and_events, pg_pool
):
    bus, got = bus_and_events
    store = TokenEventStore(pg_pool)
    service = await start_service(peer, bus, db=pg_pool)
    try:
        await peer.send(create(MINT_A))
        await peer.until(lambda: MINT_A in peer.trade_keys)
        stray = trade(STRANGER, 1)
        await peer.send(trade(MINT_A, 1), stray, trade(MINT_A, 2))
        await eventually(lambda: len(got) == 3)
        await service.recorder.flush()
        assert service.metrics.unsubscribed_trades._value.get() == 1

        # the stray trade is stored as received, without a seq, and never published
        row = await pg_pool.fetchrow(
            "SELECT seq, frame FROM token_events WHERE mint = $1", STRANGER
        )
        assert row["seq"] is None and row["frame"].encode() == stray
        assert all(e.key == MINT_A for e in got)
        # a window older than the look-back: Postgres answers, with the pipeline's events
        window = await service.socket.get_historical_data(MINT_A, got[0].time - 60, None)
        assert [e.id for e in window] == [e.id for e in got]
        assert await service.socket.get_historical_data(STRANGER, None, None) == []
    finally:
        await service.stop()
    # nothing stored is left to publish: the stray is no unconfirmed event either
    restarted = Recorder(store, publisher=bus, config=RecorderConfig(outbox="feed"))
    assert await restarted.recover() == 0
    # and a replay gives what was published live
    replayed: list[Event] = []

    async def capture(record: FeedRecord) -> None:
        replayed.append(record.event)

    replay = DatabaseDataFeed(store, clock=ReplayClock())
    replay.register_callback(ALL_EVENTS, capture)
    assert await replay.run() == 3
    assert [e.id for e in replayed] == [e.id for e in got]
