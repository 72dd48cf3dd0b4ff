"""Service paths: the features and activity services on the in-memory bus and store.

A simulated market's token events (features) or the features.updated events they give
(activity) are published at once into a queued in-memory bus (16 partitions, one
worker per partition, as embedded runs use it); the figure is events handled per
second until the bus is drained, with every checkpoint written to the in-process
store. Pass ``--profile FILE`` to write a pyinstrument profile of the features run.

Run: .venv/bin/python benchmarks/services.py [--minutes 20] [--seed 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import Event
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.simulator.dataset import market_events
from pumpflow.simulator.market import Market, MarketConfig

START = 1_700_000_000.0
PARTITIONS = 16


def token_events(seed: int, minutes: float) -> list[Event]:
    market = Market(MarketConfig(seed=seed))
    return list(market_events(market, minutes * 60.0, start_epoch=START, source="feed/bench"))


async def run_service(service_cls, events: list[Event], **settings) -> tuple[float, float]:
    """Events per wall second and per CPU second of the process, of one service
    instance over ``events``, publish to drained bus."""
    clock = ReplayClock(START)
    bus = InMemoryBus(partitions=PARTITIONS, source="bench")
    await bus.start()
    store = MemoryStateStore(clock)
    config = service_cls.settings_class.load(
        service=service_cls.name, transport="memory", partitions=PARTITIONS, **settings
    )
    service = service_cls(config)
    await service.start(ServiceContext(settings=config, bus=bus, clock=clock, store=store))
    clock.set_sync(events[-1].time)
    started = time.perf_counter()
    cpu_started = time.process_time()
    await bus.publish_many(events)
    if not await bus.drain(600.0):
        raise RuntimeError("the bus did not drain")
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    await service.stop()
    await bus.close()
    return len(events) / elapsed, len(events) / cpu


def measure(label: str, service_cls, events: list[Event], repeat: int) -> None:
    runs = [asyncio.run(run_service(service_cls, events)) for _ in range(repeat)]
    rates = [wall for wall, _ in runs]
    cpu = [per_cpu for _, per_cpu in runs]
    print(
        f"{label}: {len(events):,} events, {statistics.median(rates):,.0f} events/s "
        f"(median of {repeat}; {min(rates):,.0f}-{max(rates):,.0f}); per CPU second "
        f"{statistics.median(cpu):,.0f} ({min(cpu):,.0f}-{max(cpu):,.0f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="simulated market minutes")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=("features", "activity"), default=None)
    parser.add_argument(
        "--activity-input",
        choices=("features", "tokens"),
        default="features",
        help="what the activity service consumes (tokens: for code that folds trades itself)",
    )
    parser.add_argument("--profile", metavar="FILE", help="pyinstrument HTML of one features run")
    args = parser.parse_args()

    events = token_events(args.seed, args.minutes)
    if args.only in (None, "features"):
        from pumpflow.features.service import FeaturesService

        if args.profile:
            from pyinstrument import Profiler

            with Profiler(async_mode="disabled") as profiler:
                asyncio.run(run_service(FeaturesService, events))
            with open(args.profile, "w") as out:
                out.write(profiler.output_html())
            print(profiler.output_text(unicode=False, color=False, show_all=False))
        measure("features service", FeaturesService, events, args.repeat)
    if args.only in (None, "activity"):
        from pumpflow.activity.service import ActivityService

        if args.activity_input == "features":
            from pumpflow.common.testing import FeatureUpdates

            activity_input = FeatureUpdates(source="features/bench").of(events)
        else:
            activity_input = events
        measure("activity service", ActivityService, activity_input, args.repeat)


if __name__ == "__main__":
    main()
