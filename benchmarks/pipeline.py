"""Embedded pipeline end to end: raw PumpPortal frames -> feed -> features -> activity.

A simulated market's frames, encoded to bytes as the simulator sends them, are handed
one by one to the feed service's per-frame path (``SocketDataFeed._on_frame``, what
the socket reader calls: decode + validate, auto-subscription of new mints, dedup,
envelope with per-mint seq, look-back, publish), with no Postgres recorder
(``feed_record=False``, as ``pumpflow run``). Feed, features and activity run as in
``pumpflow run``: one process, ``run_embedded`` with the queued in-memory bus (16
partitions) and the in-process store. The clock is a ReplayClock set to each frame's
market time; every market second it fires the due timers (activity's quiet timers,
the look-back's pruning).

Two shapes of input:

- paced (default): the frames of one market second (about 27), then one yield to the
  bus workers, and each due timer's effects awaited before the next frame, as a
  ReplayClock does. Every lane has one or two events ready when it runs: the per-event
  path, what a live socket at market rates gives.
- backlog (``--chunk N --live-timers``): N frames between yields, as the socket reader
  hands what is buffered when it is behind (websockets hands every buffered frame
  without yielding; one 256 KiB read holds about 500 frames), and timers run as a
  WallClock runs them: fired at their market time, their effects left to run beside
  the next frames. Lanes then have batches ready: the system's throughput. Under a
  backlog the services lag the clock, so activity's quiet timers see older state and
  its lifecycle events differ from the paced run's.

The feed holds a real connection, to a local socket that swallows its subscribe
messages and sends nothing: the feed runs connected (sending subscriptions for new
mints) while its frames come from here. So every frame of the market reaches it,
trades of mints activity retired included, which a live server would no longer send:
the feed stores those unpublished and counts them ("unsubscribed trades"), as it
would a stray trade live. The figure is frames/s from the first frame
handed to the feed until the bus is drained (every features.updated and
token.lifecycle handled), and frames per CPU second of the process (other work on
the machine disturbs it less). ``--profile FILE`` writes a pyinstrument text profile
of one more run's timed part, ``--cprofile FILE`` cProfile stats. ``--loop-wait`` runs
a probe that yields to the event loop over and over and reports the loop thread's CPU
time until its next turn: what an event of the critical lane, ready at that moment,
waits behind the work the loop runs first (the batches applied in one stretch among
it, and the frames handed between yields), on a core of its own.

Run: .venv/bin/python benchmarks/pipeline.py [--minutes 20] [--seed 3] [--repeat 3]
     [--chunk 512 --live-timers]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import msgspec
from prometheus_client import CollectorRegistry
from websockets.asyncio.server import serve

from pumpflow.activity.service import ActivityService
from pumpflow.common.bus.metrics import BUS_METRICS
from pumpflow.common.clock import ReplayClock
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.features.service import FeaturesService
from pumpflow.feed.service import FeedService
from pumpflow.simulator.market import Market, MarketConfig

START = 1_700_000_000.0
PARTITIONS = 16
#: market seconds between timer firings and yields to the bus workers
TICK_S = 1.0
TARGET = 40_000
#: the services behind the feed
CONSUMERS = (FeaturesService, ActivityService)
CHUNK_HELP = (
    "frames handed between yields to the bus workers (0: one market second's, as a "
    "quiet live socket; N: as a reader of a backlog, or a replay, hands what is buffered)"
)
#: what the feed publishes
TOKEN_EVENTS = ("token.created", "token.trade", "token.migrated")


def market_frames(seed: int, minutes: float) -> list[tuple[float, bytes]]:
    """(market seconds, frame bytes) of ``minutes`` of the seeded market."""
    encode = msgspec.json.Encoder().encode
    return [(t, encode(frame)) for t, frame in Market(MarketConfig(seed=seed)).frames(minutes * 60)]


def bus_counts() -> Counter[tuple[str, str, str]]:
    """(published|consumed, service, type) -> count, over every lane, process-wide."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for family in BUS_METRICS.collect():
        kind = family.name.removeprefix("pumpflow_events_")
        if kind not in ("published", "consumed"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                labels = sample.labels
                counts[(kind, labels["service"], labels["type"])] += int(sample.value)
    return counts


@dataclass
class Result:
    frames: int
    seconds: float
    cpu_s: float
    handed_s: float
    timers: int
    counts: Counter = field(default_factory=Counter)
    feed: dict[str, int] = field(default_factory=dict)
    #: the probe's waits for a loop turn, seconds (``--loop-wait``)
    waits: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.frames / self.seconds


async def _swallow(ws) -> None:
    async for _ in ws:  # subscribe messages: nothing is sent back
        pass


async def _probe(waits: list[float]) -> None:
    """Yield to the loop until cancelled, noting the CPU time each next turn took to come.

    CPU time, not wall: what other processes take from the core is not the loop's hold.
    """
    clock = time.thread_time
    while True:
        before = clock()
        await asyncio.sleep(0)
        waits.append(clock() - before)


async def run_pipeline(
    frames: list[tuple[float, bytes]],
    profiler=None,
    *,
    chunk: int = 0,
    partitions: int = PARTITIONS,
    live_timers: bool = False,
    loop_wait: bool = False,
) -> Result:
    """One run: start the services, hand every frame to the feed, wait for the drain."""
    server = await serve(_swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clock = ReplayClock(START, await_timers=not live_timers)
    feed = FeedService(
        FeedService.settings_class.load(
            service="feed", transport="memory", partitions=partitions, feed_record=False,
            pumpportal_ws_url=f"ws://127.0.0.1:{port}/api/data",
        ),
        registry=CollectorRegistry(),
    )  # fmt: skip
    services = [feed] + [
        cls(cls.settings_class.load(service=cls.name, transport="memory", partitions=partitions),
            registry=CollectorRegistry())
        for cls in CONSUMERS
    ]  # fmt: skip
    try:
        async with run_embedded(services, clock=clock, partitions=partitions) as system:
            async with asyncio.timeout(10.0):
                await feed.socket.wait_connected()
            on_frame = feed.socket._on_frame  # what the socket reader calls per frame
            set_sync, advance_to = clock.set_sync, clock.advance_to
            before = bus_counts()
            timers = 0
            next_tick = START + TICK_S
            gc.collect()
            if profiler is not None:
                profiler.start()
            started = time.perf_counter()
            cpu_started = time.process_time()
            unyielded = 0
            waits: list[float] = []
            probe = asyncio.ensure_future(_probe(waits)) if loop_wait else None
            for t, frame in frames:
                at = START + t
                if at >= next_tick:
                    timers += await advance_to(at)
                    next_tick = at + TICK_S
                    if not chunk:
                        await asyncio.sleep(0)  # as a socket reader would, now and then
                else:
                    set_sync(at)
                await on_frame(frame)
                if chunk:
                    unyielded += 1
                    if unyielded >= chunk:
                        unyielded = 0
                        await asyncio.sleep(0)
            handed = time.perf_counter()
            if not await system.drain(600.0):
                raise RuntimeError("the bus did not drain")
            finished = time.perf_counter()
            cpu = time.process_time() - cpu_started
            if probe is not None:
                probe.cancel()
            if profiler is not None:
                profiler.stop()
            counts = bus_counts() - before
            manager = feed.manager
            stats = {
                "published": manager.events,
                "duplicates": manager.duplicates,
                "unsubscribed trades": manager.unsubscribed_trades,
                "invalid": feed.socket.invalid_frames,
                "mints subscribed": len(feed.socket.active_mints),
            }
    finally:
        server.close()
        await server.wait_closed()
    return Result(
        frames=len(frames),
        seconds=finished - started,
        cpu_s=cpu,
        handed_s=handed - started,
        timers=timers,
        counts=counts,
        feed=stats,
        waits=waits,
    )


def describe(result: Result) -> str:
    counts = result.counts
    published = {t: n for (kind, _, t), n in counts.items() if kind == "published"}
    consumed = Counter()
    for (kind, service, _), n in counts.items():
        if kind == "consumed":
            consumed[service] += n
    tokens = {t: published.get(t, 0) for t in TOKEN_EVENTS}
    lines = [
        f"  frames handed to the feed: {result.frames:,}; feed: {result.feed}",
        f"  token events published: {sum(tokens.values()):,} "
        f"({', '.join(f'{t} {n:,}' for t, n in tokens.items())})",
        f"  features.updated: {published.get('features.updated', 0):,}; "
        f"token.lifecycle: {published.get('token.lifecycle', 0):,}; "
        f"feed.subscription: {published.get('feed.subscription', 0):,}; "
        f"clock timers fired: {result.timers:,}",
        f"  events handled by: {', '.join(f'{s} {n:,}' for s, n in sorted(consumed.items()))}",
    ]
    if result.waits:
        waits = sorted(result.waits)
        quantile = lambda q: waits[min(len(waits) - 1, int(q * len(waits)))] * 1e3  # noqa: E731
        lines.append(
            f"  loop turn waited for, CPU ms ({len(waits):,} turns): p50 {quantile(0.5):.2f}, "
            f"p99 {quantile(0.99):.2f}, p99.9 {quantile(0.999):.2f}, max {waits[-1] * 1e3:.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="simulated market minutes")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", metavar="FILE", help="pyinstrument text profile of one run")
    parser.add_argument("--chunk", type=int, default=0, help=CHUNK_HELP)
    parser.add_argument("--partitions", type=int, default=PARTITIONS)
    parser.add_argument(
        "--live-timers", action="store_true", help="timers run as a WallClock runs them"
    )
    parser.add_argument("--cprofile", metavar="FILE", help="cProfile stats of one run")
    parser.add_argument(
        "--loop-wait", action="store_true", help="report the CPU a ready task waits for the loop"
    )
    args = parser.parse_args()
    shape = {"chunk": args.chunk, "partitions": args.partitions, "live_timers": args.live_timers,
             "loop_wait": args.loop_wait}  # fmt: skip

    frames = market_frames(args.seed, args.minutes)
    mb = sum(len(f) for _, f in frames) / 2**20
    if args.cprofile:
        import cProfile

        profile = cProfile.Profile()
        profile.start, profile.stop = profile.enable, profile.disable
        asyncio.run(run_pipeline(frames, profile, **shape))
        profile.dump_stats(args.cprofile)
        print(f"cProfile stats of one run (timed part) written to {args.cprofile}")
    print(f"== embedded pipeline: seed {args.seed}, {args.minutes:g} market minutes, "
          f"{len(frames):,} frames ({mb:.1f} MiB), {PARTITIONS} partitions")  # fmt: skip
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="disabled")
        asyncio.run(run_pipeline(frames, profiler, **shape))
        with open(args.profile, "w") as out:
            out.write(profiler.output_text(unicode=False, color=False, show_all=False))
        print(f"profile of one run (timed part) written to {args.profile}")
    results = []
    for n in range(args.repeat):
        result = asyncio.run(run_pipeline(frames, **shape))
        results.append(result)
        print(f"run {n + 1}: {result.rate:,.0f} frames/s, {result.frames / result.cpu_s:,.0f} "
              f"per CPU second ({result.seconds:.2f} s; frames "
              f"handed in {result.handed_s:.2f} s, then {result.seconds - result.handed_s:.2f} s "
              f"to drain)")  # fmt: skip
    if results:
        print(describe(results[-1]))
    rates = [r.rate for r in results]
    cpu = [r.frames / r.cpu_s for r in results]
    print(f"pipeline end to end: {statistics.median(rates):,.0f} frames/s "
          f"(median of {args.repeat}; {min(rates):,.0f}-{max(rates):,.0f}; "
          f"target >= {TARGET:,}); per CPU second {statistics.median(cpu):,.0f} "
          f"({min(cpu):,.0f}-{max(cpu):,.0f})")  # fmt: skip


if __name__ == "__main__":
    main()
