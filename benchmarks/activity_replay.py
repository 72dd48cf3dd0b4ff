"""Activity benchmarks: a simulated market through the analyzer and through the service.

1. Analyzer replay (``pumpflow.activity.replay``): the simulator's frames on a
   ReplayClock as fast as possible, the feed modelled; prints how many tokens are
   streamed at once against how many launched, the messages saved, and frames/s.
2. Service path: the same frames as events, folded into features (a FeatureManager,
   as the features service does) and published as ``features.updated`` to the
   ActivityService on a synchronous in-memory bus (keyed consumer, lifecycle
   publishing, group commits to the in-process store); prints events/s and what was
   published.

Run: .venv/bin/python benchmarks/activity_replay.py [--seed 7] [--minutes 60] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from pumpflow.activity.replay import replay_subscriptions
from pumpflow.activity.service import ActivityService
from pumpflow.activity.settings import ActivitySettings
from pumpflow.common.bus import Subscription
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import Event
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.testing import FeatureUpdates
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig

START = 1_700_000_000.0


async def analyzer_replay(seed: int, seconds: float) -> None:
    report = await replay_subscriptions(Market(MarketConfig(seed=seed)).frames(seconds))
    print(f"== analyzer replay: seed {seed}, {seconds / 60:.0f} simulated minutes")
    print(json.dumps(report.summary(), indent=1))


async def service_path(seed: int, seconds: float) -> None:
    events = list(
        market_events(
            Market(MarketConfig(seed=seed)), seconds, start_epoch=START, source="feed/bench"
        )
    )
    clock = ReplayClock(START)
    bus = InMemoryBus(partitions=16, synchronous=True, source="bench")
    await bus.start()
    published = {"token.lifecycle": 0, "feed.subscription": 0, "unsubscribed": 0}

    async def count(event: Event) -> None:
        published[event.type] += 1
        if event.type == "feed.subscription":
            published["unsubscribed"] += len(event.data.mints)

    await bus.subscribe(
        Subscription(
            service="probe", patterns=("token.lifecycle", "feed.subscription"), handler=count
        )
    )
    settings = ActivitySettings.load(transport="memory", partitions=16, namespace="bench")
    service = ActivityService(settings)
    await service.start(
        ServiceContext(settings=settings, bus=bus, clock=clock, store=MemoryStateStore(clock))
    )
    features = FeatureUpdates(source="features/bench")
    # what activity consumes: the features service's updates, and the migrations
    inputs = [e if e.type == "token.migrated" else features.updated(e) for e in events]
    inputs = [e for e in inputs if e is not None]
    started = time.perf_counter()
    for event in inputs:
        await clock.advance_to(event.time)
        await bus.publish(event)
    await service.flush_subscriptions()
    elapsed = time.perf_counter() - started
    status = await service.status()
    await service.stop()
    await bus.close()
    print(f"== service path: seed {seed}, {seconds / 60:.0f} simulated minutes, synchronous bus")
    print(
        json.dumps(
            {
                "events": len(events),
                "wall_s": round(elapsed, 2),
                "events_per_s": round(len(events) / elapsed),
                "us_per_event": round(elapsed / len(events) * 1e6, 1),
                "published": published,
                "tokens_at_end": status["tokens"],
                "retired": status["retired"],
            },
            indent=1,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="10 simulated minutes")
    args = parser.parse_args()
    seconds = 600.0 if args.quick else args.minutes * 60.0
    asyncio.run(analyzer_replay(args.seed, seconds))
    asyncio.run(service_path(args.seed, seconds))


if __name__ == "__main__":
    main()
