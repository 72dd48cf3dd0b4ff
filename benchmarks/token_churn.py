"""Token churn: many short-lived tokens through the feed's numbering, features and activity.

Launches a token every ``--every`` simulated seconds, each trading ``--trades`` times
over its first minute and then going quiet for good (as about 95% of real tokens do
within 15 minutes, docs/market.md), on a ReplayClock as fast as it goes. The feed's
DataFeedManager numbers the events (no recorder) and publishes them on a synchronous
in-memory bus to the features and activity services. Every ``--sample`` tokens it
prints the per-mint entries each part holds (the feed's Sequencer, each service's
keyed consumer and partition indexes, the records in the store) and the process's
resident memory: bounded means they level off once the oldest tokens retire, instead
of growing with the tokens launched. (The feed's memory of recent signatures grows to its own cap,
``--dedup``, 200,000 by default: a run shorter than that shows it growing.)

    .venv/bin/python benchmarks/token_churn.py [--tokens 20000] [--every 2] [--sample 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry

from pumpflow.activity.service import ActivityService
from pumpflow.activity.settings import ActivitySettings
from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import encode_payload
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.testing.factories import TokenEvents
from pumpflow.features.service import FeaturesService, FeaturesSettings
from pumpflow.feed.interface import FeedRecord
from pumpflow.feed.manager import DataFeedManager, FeedManagerConfig

START = 1_700_000_000.0
PARTITIONS = 4


@dataclass(frozen=True, slots=True)
class Sample:
    """Entries held after ``tokens`` tokens launched (``at``: simulated seconds)."""

    tokens: int
    at: float
    sequencer: int
    features_keys: int
    activity_keys: int
    store_keys: int
    #: keys the services' partition indexes list (what a new owner restores)
    index_entries: int
    rss_mib: float


def rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def churn(
    tokens: int,
    *,
    every_s: float = 2.0,
    trades: int = 5,
    sample_every: int = 1000,
    feed: FeedManagerConfig | None = None,
) -> AsyncIterator[Sample]:
    """Run the churn; yield a :class:`Sample` every ``sample_every`` tokens."""
    clock = ReplayClock(START)
    registry = CollectorRegistry()
    features = FeaturesService(
        FeaturesSettings.load(service="features", transport="memory", partitions=PARTITIONS),
        registry=registry,
    )
    activity = ActivityService(
        ActivitySettings.load(service="activity", transport="memory", partitions=PARTITIONS),
        registry=registry,
    )
    factory = TokenEvents(start=START)
    async with run_embedded(
        [features, activity], clock=clock, partitions=PARTITIONS, synchronous=True
    ) as system:
        manager = DataFeedManager(
            system.bus, config=feed or FeedManagerConfig(source="feed/churn"), clock=clock
        )
        store = system.store

        async def record(event) -> None:
            payload = event.data
            await manager.on_record(
                FeedRecord(payload=payload, frame=encode_payload(payload), time=clock.now())
            )

        for n in range(1, tokens + 1):
            launch = START + n * every_s
            await clock.advance_to(launch)
            mint = f"churn{n:07d}pump"
            await record(factory.created(mint, time=launch))
            for i in range(trades):
                at = launch + (i + 1) * 60.0 / (trades + 1)
                await clock.advance_to(at)
                await record(factory.trade(mint, f"wallet{i}", sol=0.5, time=at))
            # the event factory's own memory of the token, which is not under test
            factory.curves.pop(mint, None)
            for i in range(trades):
                factory.holdings.pop((mint, f"wallet{i}"), None)
            factory.holdings.pop((mint, "creator"), None)
            factory.seq.forget(mint)
            if n % sample_every == 0:
                await system.drain()
                yield Sample(
                    tokens=n,
                    at=clock.now() - START,
                    sequencer=len(manager.sequencer),
                    features_keys=len(features.consumer),
                    activity_keys=len(activity.consumer),
                    store_keys=len(await store.scan_keys("")),
                    index_entries=sum(
                        [
                            len(await store.hgetall(f"{service}:partition:{p}"))
                            for service in ("features", "activity")
                            for p in range(PARTITIONS)
                        ]
                    ),
                    rss_mib=round(rss_mib(), 1),
                )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--every", type=float, default=2.0, help="simulated s between launches")
    parser.add_argument("--trades", type=int, default=5, help="trades per token")
    parser.add_argument("--sample", type=int, default=2_000, help="tokens between samples")
    parser.add_argument(
        "--seq-window",
        default="1800",
        help="the feed's seq_restore_window_s ('none': every mint kept, as it used to be)",
    )
    parser.add_argument(
        "--dedup", type=int, default=200_000, help="signatures the feed remembers (its cap)"
    )
    args = parser.parse_args()
    window = None if args.seq_window == "none" else float(args.seq_window)
    feed = FeedManagerConfig(
        source="feed/churn", seq_restore_window_s=window, dedup_capacity=args.dedup
    )
    logging.basicConfig(level=logging.ERROR)
    print(f"start: RSS {rss_mib():.1f} MiB")
    async for sample in churn(
        args.tokens, every_s=args.every, trades=args.trades, sample_every=args.sample, feed=feed
    ):
        print(json.dumps(asdict(sample)))


if __name__ == "__main__":
    asyncio.run(main())
