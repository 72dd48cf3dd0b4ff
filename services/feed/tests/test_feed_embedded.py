"""The feed embedded on a fast market clock: its lease runs on the wall clock."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.clock import WallClock
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.testing import eventually
from pumpflow.feed.service import FeedService
from pumpflow.feed.settings import FeedSettings
from pumpflow.simulator import server as simulator
from pumpflow.simulator.market import Market, MarketConfig

#: market seconds per real second
SPEED = 200.0
#: wall seconds; the same TTL in market time would run out in 10 ms
TTL = 2.0


async def test_at_high_speed_the_lease_is_renewed_on_the_wall_clock_and_never_lost(caplog):
    caplog.set_level(logging.WARNING)
    server = simulator.SimulatorServer(
        market=Market(MarketConfig(seed=3, launches_per_minute=60.0)), speed=SPEED
    )
    await server.start()
    settings = FeedSettings(
        service="feed",
        transport="memory",
        pumpportal_ws_url=server.url,
        feed_record=False,
        feed_lease_ttl_s=TTL,
        replica="fast",
    )
    feed = FeedService(settings, registry=CollectorRegistry())
    try:
        async with run_embedded([feed], clock=WallClock(speed=SPEED)) as system:
            trades = []

            async def count(event) -> None:
                trades.append(event)

            await system.bus.subscribe(
                Subscription(service="probe", patterns=("token.trade",), handler=count)
            )
            assert feed.role == "active"
            await asyncio.wait_for(feed.socket.wait_connected(), 5)
            # two TTLs of wall time, over 13 market minutes
            await eventually(lambda: feed.leader.renewals >= 6 or feed.leader.losses > 0)
            assert feed.leader.losses == 0 and feed.leader.elections == 1
            assert feed.role == "active" and feed.socket.sessions == 1
            assert trades, "the market flowed meanwhile"
            # the feed before the simulator, as `pumpflow run` stops
            await feed.stop()
    finally:
        await server.stop()
    alarming = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert alarming == [], [r.getMessage() for r in alarming]
