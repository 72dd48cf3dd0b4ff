"""The feed service against the simulator over a real WebSocket on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest

from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock, WallClock
from pumpflow.common.events import Event, FeedSubscription, encode_payload, make_event
from pumpflow.common.pumpportal import ACK_UNSUBSCRIBED_KEYS
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import EventCollector, eventually
from pumpflow.feed.database_feed import DatabaseDataFeed
from pumpflow.feed.interface import ALL_EVENTS, FeedRecord
from pumpflow.feed.service import FeedService
from pumpflow.feed.settings import FeedSettings
from pumpflow.simulator import server as simulator
from pumpflow.simulator.faults import FaultConfig
from pumpflow.simulator.market import Market, MarketConfig

SPEED = 40.0


class Harness:
    def __init__(self, server, bus: InMemoryBus, service: FeedService):
        self.server = server
        self.bus = bus
        self.service = service
        self.events: list[Event] = []

    def of(self, mint: str, event_type: str = "token.trade") -> list[Event]:
        return [e for e in self.events if e.key == mint and e.type == event_type]

    def created(self) -> list[str]:
        return [e.key for e in self.events if e.type == "token.created"]


async def start_harness(*, faults=FaultConfig(), db=None, seed=7, rate=120.0) -> Harness:
    server = simulator.SimulatorServer(
        market=Market(MarketConfig(seed=seed, launches_per_minute=rate)),
        speed=SPEED,
        faults=faults,
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
    )
    service = FeedService(settings)
    harness = Harness(server, bus, service)

    harness.events = (await EventCollector("probe").attach(bus, "token.*")).events
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
