"""The requirements' feed interfaces, by their exact names and positional parameters."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock, WallClock
from pumpflow.common.features.history import HistoryConfig
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import EventCollector, eventually
from pumpflow.feed.database_feed import DatabaseDataFeed, ReplayConfig
from pumpflow.feed.interface import DataFeedInterface, FeedRecord
from pumpflow.feed.lookback import LookBack
from pumpflow.feed.manager import DataFeedManager
from pumpflow.feed.metrics import FeedMetrics
from pumpflow.feed.recorder import Recorder
from pumpflow.feed.socket_feed import SocketDataFeed, SocketFeedConfig
from pumpflow.simulator import server as simulator
from pumpflow.simulator.market import Market, MarketConfig

FEED_METHODS = {
    "connect": [],
    "disconnect": [],
    "subscribe": ["token_id"],
    "unsubscribe": ["token_id"],
    "get_historical_data": ["token_id", "start_time", "end_time"],
    "register_callback": ["event_type", "callback"],
}
MANAGER_METHODS = {
    "__init__": ["event_bus"],
    "add_data_feed": ["feed"],
    "subscribe_to_token": ["token_id"],
    "unsubscribe_from_token": ["token_id"],
}


def positional(function) -> list[str]:
    """Names of the parameters a caller may pass by position (self left out)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = list(inspect.signature(function).parameters.values())[1:]
    return [p.name for p in params if p.kind in kinds]


@pytest.mark.parametrize("cls", [DataFeedInterface, SocketDataFeed, DatabaseDataFeed])
def test_every_feed_has_the_interface_methods_with_their_positional_parameters(cls):
    for name, params in FEED_METHODS.items():
        assert positional(getattr(cls, name)) == params, f"{cls.__name__}.{name}"
        assert inspect.iscoroutinefunction(getattr(cls, name)) == (name != "register_callback")


def test_the_manager_has_the_interface_methods_with_their_positional_parameters():
    for name, params in MANAGER_METHODS.items():
        assert positional(getattr(DataFeedManager, name)) == params, name


async def test_the_socket_feed_and_the_manager_called_as_the_requirements_list_them():
    server = simulator.SimulatorServer(
        market=Market(MarketConfig(seed=5, launches_per_minute=240.0)), speed=40.0
    )
    await server.start()
    event_bus = InMemoryBus(partitions=4, synchronous=True, source="feed/test")
    await event_bus.start()
    published = (await EventCollector("probe").attach(event_bus, "token.*")).events
    clock = WallClock()
    metrics = FeedMetrics(CollectorRegistry())
    feed = SocketDataFeed(
        SocketFeedConfig(url=server.url, auto_subscribe_trades=False, backoff_initial_s=0.05),
        clock=clock,
        metrics=metrics,
        lookback=LookBack(HistoryConfig(), clock=clock, prune_every_s=60.0),
    )
    manager = DataFeedManager(event_bus)
    manager.add_data_feed(feed)
    created: list[FeedRecord] = []
    trades: list[FeedRecord] = []

    async def on_created(record: FeedRecord) -> None:
        created.append(record)

    async def on_trade(record: FeedRecord) -> None:
        trades.append(record)

    feed.register_callback("token.created", on_created)
    feed.register_callback("token.trade", on_trade)
    try:
        await feed.connect()
        await eventually(lambda: len(created) >= 1)
        token_id = created[0].payload.mint
        await manager.subscribe_to_token(token_id)
        since = clock.now()  # memory covers the mint from its subscription on
        await eventually(lambda: any(r.payload.mint == token_id for r in trades))
        assert token_id in feed.active_mints
        assert all(r.payload.txType == "create" for r in created)  # by event type
        history = await feed.get_historical_data(token_id, since, clock.now() + 1)
        assert history and all(e.key == token_id and e.type == "token.trade" for e in history)
        assert {e.id for e in history} <= {e.id for e in published}
        await manager.unsubscribe_from_token(token_id)
        assert token_id not in feed.active_mints
        await feed.subscribe(token_id)
        assert token_id in feed.active_mints
        await feed.unsubscribe(token_id)
        assert token_id not in feed.active_mints
        await feed.disconnect()
        assert not feed.is_connected
    finally:
        await manager.stop()
        await server.stop()
        await event_bus.close()


@pytest.mark.postgres
async def test_the_database_feed_called_as_the_requirements_list_them(pg_pool):
    server = simulator.SimulatorServer(
        market=Market(MarketConfig(seed=5, launches_per_minute=240.0)), speed=40.0
    )
    await server.start()
    store = TokenEventStore(pg_pool)
    live = SocketDataFeed(SocketFeedConfig(url=server.url), clock=WallClock())
    recorder = Recorder(store)
    recording = DataFeedManager(None, recorder=recorder)
    recording.add_data_feed(live)
    try:
        await recording.start()
        await eventually(lambda: recorder.stored >= 100)
    finally:
        await recording.stop()
        await server.stop()
    stored = [e async for e in store.stream()]
    token_id = max({e.key for e in stored}, key=lambda m: sum(e.key == m for e in stored))
    theirs = [e for e in stored if e.key == token_id]

    feed = DatabaseDataFeed(store, ReplayConfig(), clock=ReplayClock())
    replayed: list[FeedRecord] = []

    async def on_any(record: FeedRecord) -> None:
        replayed.append(record)

    feed.register_callback("*", on_any)
    history = await feed.get_historical_data(token_id, theirs[0].time, theirs[-1].time)
    assert [e.id for e in history] == [e.id for e in theirs[:-1]]  # end is exclusive
    await feed.unsubscribe(token_id)
    await feed.subscribe(token_id)  # included again
    await feed.connect()
    await asyncio.wait_for(feed.wait_done(), 30)
    await feed.disconnect()
    assert [r.event.id for r in replayed] == [e.id for e in stored]
