"""Features, activity and model embedded together, on a synchronous bus and a queued one.

On a synchronous bus every handler runs inside the publish that reaches it: features
publishes an update inside its commit, activity answers with a lifecycle event that
features consumes inside that same publication. The keyed consumer must not wait for
itself there.
"""

from __future__ import annotations

import asyncio

import pytest

from pumpflow.activity.service import ActivityService
from pumpflow.common.clock import ReplayClock
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.testing import EventCollector
from pumpflow.features.service import FeaturesService
from pumpflow.model.service import ModelService
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig

START = 1_700_000_000.0


@pytest.mark.parametrize("synchronous", [True, False], ids=["synchronous", "queued"])
async def test_features_and_activity_run_together(synchronous):
    clock = ReplayClock(START)
    events = list(
        market_events(Market(MarketConfig(seed=5)), 240.0, start_epoch=START, source="feed/sim")
    )
    #: mint -> seq of its last trade or creation: the newest vector announced of it
    last = {e.key: e.seq for e in events if e.type in ("token.created", "token.trade")}
    async with run_embedded(
        [FeaturesService, ActivityService, ModelService], clock=clock, synchronous=synchronous
    ) as system:
        seen = await EventCollector("seen").attach(
            system.bus, "features.updated", "token.lifecycle", "model.prediction"
        )

        async def replay() -> None:
            for event in events:
                await clock.advance_to(event.time)
                await system.bus.publish(event)
            await system.drain()  # queued: timers are set as events are handled
            await clock.advance(600.0)  # past every lifecycle timer
            await system.drain()

        # bounds a hang only: a passing run takes a second or two
        await asyncio.wait_for(replay(), 120.0)
        # a mint's events delivered together are announced once, by the last of them
        await seen.wait_until(
            lambda c: {e.key: e.data.source_seq for e in c.of("features.updated")} == last,
            what="every mint's newest vector",
        )
        lifecycle = seen.of("token.lifecycle")
        states = {e.data.state for e in lifecycle}
        assert {"new", "active", "inactive"} <= states
        # every token went quiet: all retired from both services' memory
        assert len(system["activity"].consumer) == 0
        assert len(system["features"].consumer) == 0
        assert len(system["model"].consumer) == 0
        # every token was scored: its first vector at least
        assert {e.key for e in seen.of("model.prediction")} == set(last)
