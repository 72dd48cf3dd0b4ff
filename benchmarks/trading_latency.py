"""Capacity and receipt latency with every service a process over RabbitMQ, Redis and Postgres.

The simulator serves PumpPortal's protocol (``pumpflow sim serve``) with ``--launches``
token launches a market minute at ``--speed`` market seconds a wall second (30 launches
at speed 1 is the market's rate, about 30 trades/s once tokens have accumulated; the
trade rate grows with both, and a higher speed also reaches the steady state sooner);
``pumpflow serve`` runs feed (recording to Postgres), features, activity, model,
trading (paper) and exit, each its own process, as a deployment does (``pumpflow
migrate`` first). This process collects ``model.prediction`` and ``order.requested`` on
its own queues, noting when each arrived. Each ``--speed`` is a step with a fresh stack.

Latency. Each hop names its cause (``causation_id``): an order's is the prediction it
was decided on, a prediction carries the mint and the ``source_seq`` of the token event
its features include, and the feed stamps each token event with the time its frame
arrived (its ``time``, stored with the event in ``token_events``). So:

- receipt to order sent: an entry order's arrival here less its token event's arrival
  at the feed (trading publishes ``order.requested`` after the order is stored and
  handed to the executor; one bus hop to here is included, ~1 ms);
- receipt to decision (entries): the order's own ``time`` (trading's clock when it
  decided);
- receipt to decision (every prediction decided on): trading's histogram
  ``pumpflow_receipt_to_decision_seconds`` (the receipt time travels with the causal
  chain), its growth over the window read from trading's ``/metrics``, quantiles
  interpolated inside the buckets as Prometheus' ``histogram_quantile`` does;
- receipt to prediction: every prediction's arrival here, the same way.

Keeping up, decided from three exact signals over the measured window:

- the backlog on the broker: the ready messages of every service's partition and
  critical queues, sampled every ``--sample`` seconds; a least-squares line through
  them must grow by less than 1% of the window's token events (and 500 messages);
- the feed's intake: each recorded event's receipt less its frame's time on the
  simulator's market clock (the same seed's market, regenerated here, divided by the
  speed), whose median over the window's last fifth may exceed its first fifth's by
  at most ``--max-growth`` seconds (a feed falling behind its socket makes it grow);
- the event age downstream: receipt to prediction, the same comparison; its median over
  the last fifth must also stay under ``--max-age`` seconds (2 s, trading's stale-data
  breaker's default: a stack whose events are older trades on nothing), since the
  consumers' prefetch (16 partitions x 256 per service) holds a standing backlog that
  neither the broker's count nor a growth shows.

Only orders and predictions whose token event arrived inside the measured window
(after ``--warmup`` seconds, for ``--seconds``) count; the trade rate is the feed's
counters of frames received over that window (its recorder to Postgres may lag).
Trading runs with ``pumpflow run``'s entry settings (score 0.5, creator sales allowed)
and limits that do not bind (capital 1,000 SOL, 100,000 positions) so that entries keep
coming; the stale-data breaker keeps its default. All processes run on one machine with
the servers (2 cores here): the figures include their contention. Each process's log,
and each service's ``/metrics`` at the step's end (``<service>.metrics``), stay in the
step's directory (printed when its services are ready) for reading after the run.

CPU per trade event. Each process's CPU seconds over the window (``/proc/<pid>/stat``:
its threads, its live descendants and the children it reaped), divided by the window's
trade events: every service, the simulator, this script's collector and the servers.
With ``--own-servers`` RabbitMQ, Redis and Postgres are servers of the run's own (started
as the tests' instances are: Postgres there runs with ``fsync = off``), so their CPU is
the stack's alone; on the machine's shared servers their rows count every client.

Run: .venv/bin/python benchmarks/trading_latency.py [--launches 30] [--speed 1 4 16]
     [--warmup 60] [--seconds 60] [--own-servers]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import asyncpg
import redis.asyncio as redis
from prometheus_client.parser import text_string_to_metric_families

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.rabbitmq import RabbitMQBus
from pumpflow.common.bus.routing import critical_queue, partition_queue
from pumpflow.common.events import Event, ModelPrediction, OrderRequested
from pumpflow.common.testing import (
    AMQP_URL,
    POSTGRES_DSN,
    REDIS_URL,
    ProcessStack,
    drop_schema,
    free_port,
    http_get,
    stack_env,
)
from pumpflow.common.testing.instances import (
    PostgresInstance,
    RabbitMQInstance,
    RedisInstance,
    ServerInstance,
)
from pumpflow.simulator.market import Market, MarketConfig

SERVICES = ("feed", "features", "activity", "model", "trading", "exit")
PARTITIONS = 16
TARGET_P99_MS = 25.0
HISTOGRAM = "pumpflow_receipt_to_decision_seconds"
#: per service: consumption less the event's time (its publisher's), one hop's wait
AGE = "pumpflow_event_age_seconds"
#: a backlog line growing by more than this share of the window's events is a backlog
BACKLOG_SHARE = 0.01
BACKLOG_FLOOR = 500
#: trading: pumpflow run's entries, limits that never bind
TRADING = {
    "trading_min_score": 0.5,
    "trading_reject_creator_sold": False,
    "trading_capital_sol": 1000.0,
    "trading_max_concurrent_positions": 100_000,
}


class Arrivals:
    """A bus handler noting each event's wall-clock arrival."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, Event]] = []

    async def __call__(self, event: Event) -> None:
        self.seen.append((time.time(), event))


class QueueDepths:
    """The ready messages of every service's durable queues in a namespace, per service."""

    def __init__(self, namespace: str, amqp_url: str) -> None:
        self.amqp_url = amqp_url
        self.names = {
            f"{namespace}.{queue}": service
            for service in SERVICES
            for queue in (
                *(partition_queue(service, p) for p in range(PARTITIONS)),
                critical_queue(service),
            )
        }
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def sample(self) -> dict[str, int]:
        if self._connection is None:
            self._connection = await aio_pika.connect(self.amqp_url)
        depths = dict.fromkeys(SERVICES, 0)
        channel = await self._connection.channel()
        missing = []
        for name, service in self.names.items():
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                missing.append(name)  # a service that consumes no such queue
                channel = await self._connection.channel()
                continue
            depths[service] += queue.declaration_result.message_count or 0
        await channel.close()
        for name in missing:
            del self.names[name]
        return depths

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


@dataclass
class Step:
    """What one rate step measured."""

    launches: float
    speed: float
    trades_per_s: float = 0.0
    events_per_s: float = 0.0
    loads: list[float] = field(default_factory=list)
    backlog_growth: float = 0.0
    backlog_end: dict[str, int] = field(default_factory=dict)
    intake_growth_s: float | None = None
    age_growth_s: float | None = None
    age_end_s: float | None = None
    unstored: float = 0.0
    histogram: str = ""
    lines: list[str] = field(default_factory=list)
    allowed_growth: float = 0.0
    max_growth_s: float = 1.0
    max_age_s: float = 2.0
    #: CPU seconds over the window by process
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def reasons(self) -> list[str]:
        """Why the stack did not keep up (empty: it kept up)."""
        why = []
        if self.backlog_growth > self.allowed_growth:
            why.append(f"broker backlog grew by {self.backlog_growth:,.0f} messages")
        if self.intake_growth_s is None or self.intake_growth_s > self.max_growth_s:
            why.append(f"feed intake lag grew by {_seconds(self.intake_growth_s)}")
        if self.age_growth_s is None or self.age_growth_s > self.max_growth_s:
            why.append(f"receipt to prediction grew by {_seconds(self.age_growth_s)}")
        if self.age_end_s is None or self.age_end_s > self.max_age_s:
            why.append(f"receipt to prediction at the end {_seconds(self.age_end_s)}")
        return why


def _seconds(value: float | None) -> str:
    return "n/a (no samples)" if value is None else f"{value:.2f} s"


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, str, float]]:
    """Every process's parent, name and CPU seconds (its own and its reaped children's)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue  # ended meanwhile
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        # fields[1] is ppid; utime, stime, cutime, cstime are fields 14-17 of stat(5)
        table[int(entry)] = (int(fields[1]), name, sum(map(int, fields[11:15])) * _TICK_S)
    return table


def tree_cpu(roots: dict[str, int], by_name: dict[str, str] | None = None) -> dict[str, float]:
    """CPU seconds so far of each root process with its live descendants, by label.

    ``by_name`` adds, by label, every process tree whose root has that name (a shared
    server's processes).
    """
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)

    def total(pid: int) -> float:
        own = table[pid][2] if pid in table else 0.0
        return own + sum(total(child) for child in children.get(pid, ()))

    cpu = {label: total(pid) for label, pid in roots.items()}
    for name, label in (by_name or {}).items():
        tops = [
            pid for pid, (ppid, n, _) in table.items()
            if n == name and table.get(ppid, (0, "", 0.0))[1] != name
        ]  # fmt: skip
        cpu[label] = sum(total(pid) for pid in tops)
    return cpu


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def describe(name: str, latencies_s: list[float]) -> str:
    if not latencies_s:
        return f"{name}: no samples"
    ms = [v * 1000.0 for v in latencies_s]
    return (
        f"{name}: {len(ms):,} samples, p50 {statistics.median(ms):.1f} ms, "
        f"p90 {percentile(ms, 0.9):.1f} ms, p99 {percentile(ms, 0.99):.1f} ms, "
        f"max {max(ms):.1f} ms"
    )


def growth(samples: list[tuple[float, float]]) -> float | None:
    """Median of the last fifth of ``(time, value)`` samples less that of the first fifth."""
    if len(samples) < 10:
        return None
    ordered = [v for _, v in sorted(samples)]
    fifth = len(ordered) // 5
    return statistics.median(ordered[-fifth:]) - statistics.median(ordered[:fifth])


def last_fifth(samples: list[tuple[float, float]]) -> float | None:
    """Median of the last fifth of ``(time, value)`` samples."""
    if len(samples) < 10:
        return None
    ordered = [v for _, v in sorted(samples)]
    return statistics.median(ordered[-(len(ordered) // 5) :])


def line_growth(samples: list[tuple[float, float]]) -> float:
    """How much a least-squares line through ``(time, value)`` rises over their span."""
    if len(samples) < 2:
        return 0.0
    slope = statistics.linear_regression([t for t, _ in samples], [v for _, v in samples])[0]
    return slope * (samples[-1][0] - samples[0][0])


def buckets(metrics_text: str, name: str = HISTOGRAM) -> dict[float, float]:
    """A histogram's cumulative bucket counts by upper bound, summed over its series."""
    counts: dict[float, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                bound = float(sample.labels["le"])
                counts[bound] = counts.get(bound, 0.0) + sample.value
    return counts


def histogram_quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear inside the bucket the rank falls in."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower  # beyond the last finite bound: its bound, as Prometheus says
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def feed_frames(metrics_text: str) -> tuple[float, float, float]:
    """The feed's trade frames and token frames received so far, and its events unstored."""
    trades = events = pending = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "pumpflow_feed_frames_total":
                kind = sample.labels.get("kind")
                trades += sample.value if kind in ("buy", "sell") else 0.0
                events += sample.value if kind in ("buy", "sell", "create", "migrate") else 0.0
            elif sample.name == "pumpflow_feed_record_pending":
                pending += sample.value
    return trades, events, pending


def hop_ages(before: dict[str, str], after: dict[str, str]) -> str:
    """Each service's event age over the window: where a backlog waits."""
    parts = []
    for service in SERVICES:
        first, last = buckets(before.get(service, ""), AGE), buckets(after.get(service, ""), AGE)
        window = {b: last[b] - first.get(b, 0.0) for b in last}
        p50, p99 = histogram_quantile(0.5, window), histogram_quantile(0.99, window)
        if p50 is not None and p99 is not None:
            parts.append(f"{service} p50 {p50 * 1000:,.0f} ms, p99 {p99 * 1000:,.0f} ms")
    return "event age at each consumer (pumpflow_event_age_seconds): " + "; ".join(parts)


#: per-hop figures: (metric, label grouping the series, what it is)
HOPS = (
    ("pumpflow_receipt_age_seconds", "type", "receipt to handler start"),
    ("pumpflow_handler_seconds", "type", "handler (apply, commit, publish)"),
    ("pumpflow_worker_pool_queue_wait_seconds", None, "pool queue wait"),
    ("pumpflow_consumer_commit_seconds", None, "checkpoint commit"),
    ("pumpflow_consumer_publish_seconds", None, "publish with confirms"),
    ("pumpflow_feed_record_stage_seconds", "stage", "feed recorder"),
)


def labelled_buckets(metrics_text: str, name: str, label: str | None) -> dict[str, dict]:
    """A histogram's cumulative bucket counts by upper bound, per value of ``label``."""
    found: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                group = sample.labels.get(label, "") if label else ""
                counts = found.setdefault(group, {})
                bound = float(sample.labels["le"])
                counts[bound] = counts.get(bound, 0.0) + sample.value
    return found


def hop_breakdown(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Each service's receipt age at its handlers and the steps of its hop, p50 / p99."""
    lines = ["per hop over the window (p50 / p99, ms; n):"]
    for service in SERVICES:
        parts = []
        for name, label, what in HOPS:
            first = labelled_buckets(before.get(service, ""), name, label)
            last = labelled_buckets(after.get(service, ""), name, label)
            for group, counts in sorted(last.items()):
                window = {b: c - first.get(group, {}).get(b, 0.0) for b, c in counts.items()}
                total = window.get(float("inf"), 0.0)
                p50, p99 = histogram_quantile(0.5, window), histogram_quantile(0.99, window)
                if total > 0 and p50 is not None and p99 is not None:
                    tag = f"{what} {group}".strip()
                    parts.append(f"{tag} {p50 * 1000:.1f} / {p99 * 1000:.1f} ({total:,.0f})")
        if parts:
            lines.append(f"  {service}: " + "; ".join(parts))
    return lines


def schedstats(procs: ProcessStack) -> dict[str, tuple[int, int, int]]:
    """Per service process: ns on a CPU, ns waiting for one (runnable), timeslices run."""
    found = {}
    for service in SERVICES:
        proc = procs.procs.get(service)
        path = Path(f"/proc/{proc.pid}/schedstat") if proc is not None else None
        if path is not None and path.exists():
            on_cpu, waiting, slices = (int(v) for v in path.read_text().split()[:3])
            found[service] = (on_cpu, waiting, slices)
    return found


def describe_scheduling(before: dict, after: dict, seconds: float) -> str:
    """How long each process waited for a CPU while runnable: the machine's share of a hop."""
    parts = []
    for service, (cpu, wait, slices) in after.items():
        cpu0, wait0, slices0 = before.get(service, (0, 0, 0))
        runs = max(slices - slices0, 1)
        parts.append(
            f"{service} CPU {(cpu - cpu0) / 1e9 / seconds:.2f} s/s, runnable waiting "
            f"{(wait - wait0) / 1e9 / seconds:.2f} s/s, {(wait - wait0) / runs / 1e6:.2f} ms "
            f"a run ({runs / seconds:,.0f} runs/s)"
        )
    return "run queue (/proc/<pid>/schedstat over the window): " + "; ".join(parts)


def describe_histogram(before: dict[float, float], after: dict[float, float]) -> str:
    window = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in after}
    total = window.get(float("inf"), 0.0)
    if total <= 0:
        return f"receipt to decision ({HISTOGRAM}): no decisions in the window"
    quantiles = {q: histogram_quantile(q, window) for q in (0.5, 0.9, 0.99)}
    return (
        f"receipt to decision ({HISTOGRAM}, every prediction decided on): {total:,.0f} "
        + ", ".join(f"p{int(q * 100)} {v * 1000:.1f} ms" for q, v in quantiles.items() if v)
    )


#: the machine's shared servers by process name, when the run has none of its own
SHARED_SERVERS = {"beam.smp": "rabbitmq", "redis-server": "redis", "postgres": "postgres"}


def process_cpu(procs: ProcessStack, servers: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of every process of the stack, the servers and this script."""
    roots = {name: proc.pid for name, proc in procs.procs.items()}
    cpu = tree_cpu({**roots, **servers}, None if servers else SHARED_SERVERS)
    cpu["benchmark (collector)"] = time.process_time()
    return cpu


def cpu_lines(step: Step, span: float, servers: dict[str, int]) -> list[str]:
    """The window's CPU per process, per trade event and as a share of a core."""
    trades = step.trades_per_s * span
    if not step.cpu_s or trades <= 0:
        return ["CPU per process: not sampled"]
    shared = "" if servers else " (servers shared: every client's CPU)"
    lines = [f"CPU over the window by process{shared}, per trade event and share of a core:"]
    total = 0.0
    for name, seconds in sorted(step.cpu_s.items(), key=lambda kv: -kv[1]):
        total += seconds
        lines.append(f"  {name:22s} {seconds:7.2f} s  {seconds / trades * 1e6:7.0f} us/trade  "
                     f"{seconds / span:5.2f} cores")  # fmt: skip
    lines.append(f"  {'all':22s} {total:7.2f} s  {total / trades * 1e6:7.0f} us/trade  "
                 f"{total / span:5.2f} cores")  # fmt: skip
    return lines


#: the broker's own counts (RabbitMQ 3.10+): messages published to it, and delivered
#: from its classic queues, the queues every service consumes
BROKER_COUNTS = (
    "G = rabbit_global_counters:overview(), "
    "{maps:get(messages_received_total, maps:get([{protocol,amqp091}], G)), "
    "maps:get(messages_delivered_total, "
    "maps:get([{protocol,amqp091},{queue_type,rabbit_classic_queue}], G))}."
)


def broker_counts(broker: RabbitMQInstance | None) -> tuple[float, int, int] | None:
    """When, and how many messages the run's own broker took in and delivered; None for
    the shared broker (no node of the run's own to ask) or a call that failed."""
    if broker is None:
        return None
    began = time.time()
    try:
        done = broker.ctl("eval", BROKER_COUNTS)
    except (OSError, subprocess.SubprocessError):  # a CLI that hangs or cannot start
        return None
    numbers = done.stdout.strip().strip("{}").split(",")
    if done.returncode != 0 or len(numbers) != 2 or not all(n.isdigit() for n in numbers):
        return None
    # the counters are read some time during the call: its middle is the best guess
    return (began + time.time()) / 2, int(numbers[0]), int(numbers[1])


def broker_line(before: tuple | None, after: tuple | None, trades_per_s: float) -> str:
    """Messages a second through the broker over the window, and a trade event."""
    if before is None or after is None or after[0] <= before[0]:
        return "broker messages: not counted (only a broker of the run's own, --own-servers)"
    span = after[0] - before[0]
    published = (after[1] - before[1]) / span
    delivered = (after[2] - before[2]) / span
    per_trade = (
        f" ({published / trades_per_s:.2f} and {delivered / trades_per_s:.2f} a trade event)"
        if trades_per_s
        else ""
    )
    return (f"broker messages: {published:,.0f} published and {delivered:,.0f} delivered a "
            f"second{per_trade}")  # fmt: skip


async def wait_ready(procs: ProcessStack, ports: dict[str, int], within: float = 90.0) -> None:
    deadline = time.monotonic() + within
    while True:
        statuses = {
            s: (await asyncio.to_thread(http_get, f"http://127.0.0.1:{p}/readyz"))[0]
            for s, p in ports.items()
        }
        if all(code == 200 for code in statuses.values()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"services not ready: {statuses}\n{procs.logs()}")
        await asyncio.sleep(0.5)


async def metrics_text(ports: dict[str, int]) -> dict[str, str]:
    """Every service's ``/metrics``."""
    texts = {}
    for service, port in ports.items():
        status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
        if status != 200:
            raise RuntimeError(f"{service}'s /metrics answered {status}")
        texts[service] = body
    return texts


def market_times(seed: float, launches: float, signatures: set[str], until_s: float) -> dict:
    """Each frame's time on the simulator's market clock, by signature (the same market)."""
    times = {}
    market = Market(MarketConfig(seed=int(seed), launches_per_minute=launches))
    for t, frame in market.frames(until_s):
        if frame["signature"] in signatures:
            times[frame["signature"]] = t
    return times


async def measure(args: argparse.Namespace, speed: float) -> Step:
    step = Step(
        launches=args.launches, speed=speed, max_growth_s=args.max_growth, max_age_s=args.max_age
    )
    namespace = f"bench_trading_{uuid.uuid4().hex[:8]}"
    logdir = Path(tempfile.mkdtemp(prefix="pumpflow-latency-"))
    env = stack_env(
        namespace=namespace,
        amqp_url=args.amqp_url,
        redis_url=args.redis_url,
        postgres_dsn=args.postgres_dsn,
        partitions=PARTITIONS,
        **TRADING,
    )
    procs = ProcessStack(env, logdir)
    sim_port = free_port()
    ports = {s: free_port() for s in SERVICES}
    procs.configure(PUMPPORTAL_WS_URL=f"ws://127.0.0.1:{sim_port}/api/data")
    bus = RabbitMQBus(url=args.amqp_url, namespace=namespace, partitions=PARTITIONS, source="bench")
    arrivals = Arrivals()
    depths = QueueDepths(namespace, args.amqp_url)
    db = None
    try:
        migrate = procs.run("migrate")
        if migrate.returncode != 0:
            raise RuntimeError(migrate.stderr)
        db = await asyncpg.create_pool(
            args.postgres_dsn, min_size=1, max_size=2, server_settings={"search_path": namespace}
        )
        await bus.start()
        await bus.subscribe(
            Subscription(
                service="bench-latency",
                patterns=("model.prediction", "order.requested"),
                handler=arrivals,
            )
        )
        sim_started = time.time()
        procs.pumpflow(
            "simulator", "sim", "serve", "--port", str(sim_port), "--speed", str(speed),
            "--seed", str(args.seed), "--rate", str(args.launches),
        )  # fmt: skip
        for service in SERVICES:
            procs.serve(service, http_port=ports[service])
        await wait_ready(procs, ports)
        started = time.time()
        print(f"services ready; simulator at {args.launches:g} launches/min, speed {speed:g}; "
              f"logs in {logdir}", flush=True)  # fmt: skip
        window = (started + args.warmup, started + args.warmup + args.seconds)
        backlog: list[tuple[float, float]] = []
        before: dict[str, str] | None = None
        after: dict[str, str] | None = None
        before_at = after_at = 0.0
        sched_before: dict[str, tuple[int, int, int]] = {}
        sched_after: dict[str, tuple[int, int, int]] = {}
        cpu_before: dict[str, float] = {}
        counts_before = counts_after = None
        count_broker = functools.partial(asyncio.to_thread, broker_counts, args.broker)
        while time.time() < window[1] + args.settle:
            await asyncio.sleep(args.sample)
            now = time.time()
            sampled = await depths.sample()
            if window[0] <= now <= window[1]:
                backlog.append((now, float(sum(sampled.values()))))
                step.loads.append(os.getloadavg()[0])
                if before is None:
                    counts_before = asyncio.create_task(count_broker())
                    cpu_before = process_cpu(procs, args.servers)
                    before, before_at = await metrics_text(ports), time.time()
                    sched_before = schedstats(procs)
            elif now > window[1] and after is None:
                counts_after = asyncio.create_task(count_broker())
                cpu_after = process_cpu(procs, args.servers)
                after, after_at = await metrics_text(ports), time.time()
                sched_after = schedstats(procs)
                step.backlog_end = sampled
                step.cpu_s = {k: cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after}
            queued = ", ".join(f"{s} {n:,}" for s, n in sampled.items() if n)
            print(f"  {now - started:5.0f} s: {len(arrivals.seen):,} collected, queued "
                  f"{sum(sampled.values()):,} ({queued}), "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
        rows = await db.fetch(
            "SELECT mint, seq, event_time, tx_type, signature FROM token_events "
            "WHERE event_time >= $1 AND event_time < $2",
            *window,
        )
        arrived = {(r["mint"], r["seq"]): r["event_time"] for r in rows}
        # the rate the feed received (its counters): the recorder may still be behind
        first = feed_frames((before or {}).get("feed", ""))
        last = feed_frames((after or {}).get("feed", ""))
        span = max(after_at - before_at, 1e-9)
        step.trades_per_s = (last[0] - first[0]) / span
        step.events_per_s = (last[1] - first[1]) / span
        step.unstored = last[2]
        step.allowed_growth = max(BACKLOG_FLOOR, BACKLOG_SHARE * len(rows))
        step.backlog_growth = line_growth(backlog)
        clock = market_times(
            args.seed,
            args.launches,
            {r["signature"] for r in rows},
            (window[1] - sim_started + 5.0) * speed,
        )
        step.intake_growth_s = growth([
            (r["event_time"], r["event_time"] - clock[r["signature"]] / speed)
            for r in rows if r["signature"] in clock
        ])  # fmt: skip
        predictions: dict[str, tuple[float, float]] = {}  # event id -> (arrival, token time)
        to_prediction, to_sent, to_decided = [], [], []
        ages = []
        for at, event in arrivals.seen:
            data = event.data
            if isinstance(data, ModelPrediction):
                token_time = arrived.get((data.mint, data.source_seq))
                if token_time is not None:
                    predictions[event.id] = (at, token_time)
                    to_prediction.append(at - token_time)
                    ages.append((token_time, at - token_time))
        step.age_growth_s = growth(ages)
        step.age_end_s = last_fifth(ages)
        for at, event in arrivals.seen:
            data = event.data
            if isinstance(data, OrderRequested) and data.side == "buy":
                cause = predictions.get(event.causation_id or "")
                if cause is not None:
                    to_sent.append(at - cause[1])
                    to_decided.append(event.time - cause[1])
        loads = step.loads or [os.getloadavg()[0]]
        step.lines = [
            f"== every service a process over RabbitMQ: {args.launches:g} launches/min at speed "
            f"{speed:g}, {step.trades_per_s:,.0f} trade events/s ({step.events_per_s:,.0f} "
            f"token events/s received by the feed) over {args.seconds:g} s after "
            f"{args.warmup:g} s; load average {min(loads):.1f}-{max(loads):.1f}",
            f"the feed's recorder: {len(rows) / args.seconds:,.0f} token events/s of the window "
            f"stored {args.settle:g} s after it, {step.unstored:,.0f} waiting to be stored",
            f"backlog on the broker: line grew {step.backlog_growth:,.0f} messages over the "
            f"window (allowed {step.allowed_growth:,.0f}); at its end {step.backlog_end}",
            f"feed intake lag growth {_seconds(step.intake_growth_s)}, receipt to prediction "
            f"growth {_seconds(step.age_growth_s)} (allowed {args.max_growth:g} s), at the end "
            f"{_seconds(step.age_end_s)} (allowed {args.max_age:g} s)",
            describe("receipt to order sent (entries)", to_sent),
            describe("receipt to decision (entries, the order's time)", to_decided),
            describe_histogram(
                buckets((before or {}).get("trading", "")),
                buckets((after or {}).get("trading", "")),
            ),
            hop_ages(before or {}, after or {}),
            *hop_breakdown(before or {}, after or {}),
            describe_scheduling(sched_before, sched_after, max(after_at - before_at, 1e-9)),
            describe("receipt to prediction", to_prediction),
            *cpu_lines(step, span, args.servers),
            broker_line(
                counts_before and await counts_before,
                counts_after and await counts_after,
                step.trades_per_s,
            ),
        ]
        step.lines.append(
            "keeps up" if not step.reasons else "falls behind: " + "; ".join(step.reasons)
        )
        if after:
            first = buckets((before or {}).get("trading", ""))
            last = buckets(after["trading"])
            window_counts = {b: last[b] - first.get(b, 0.0) for b in last}
            p99 = histogram_quantile(0.99, window_counts)
            met = p99 is not None and p99 * 1000 <= TARGET_P99_MS
            step.lines.append(
                f"target receipt-to-decision p99 <= {TARGET_P99_MS:g} ms: "
                f"{'met' if met else 'not met'} at this rate"
            )
        _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{ports['trading']}/state")
        for service, text in (await metrics_text(ports)).items():
            (logdir / f"{service}.metrics").write_text(text)
        step.lines.append(f"trading state at the end: {body[:300]}")
        print("\n".join(step.lines), flush=True)
        return step
    finally:
        await asyncio.to_thread(procs.kill)
        await depths.close()
        await bus.close()
        await procs.aclose()
        cleanup = RabbitMQBus(url=args.amqp_url, namespace=namespace, partitions=PARTITIONS,
                              source="bench/cleanup")  # fmt: skip
        try:
            await cleanup.delete_topology(services=["bench-latency", *SERVICES])
        finally:
            await cleanup.close()
        if db is not None:
            await db.close()
        await drop_schema(args.postgres_dsn, namespace)
        client = redis.from_url(args.redis_url)
        keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def run(args: argparse.Namespace) -> None:
    args.amqp_url, args.redis_url, args.postgres_dsn = AMQP_URL, REDIS_URL, POSTGRES_DSN
    args.servers = {}
    args.broker = None
    servers: list[ServerInstance] = []
    if args.own_servers:
        servers = [RabbitMQInstance(), RedisInstance(), PostgresInstance()]
        for server in servers:
            await asyncio.to_thread(server.start)
        rabbitmq, redis_server, postgres = servers
        args.broker = rabbitmq
        args.amqp_url, args.redis_url = rabbitmq.url, redis_server.url
        args.postgres_dsn = postgres.dsn
        args.servers = {s.name: s._process.pid for s in servers if s._process is not None}
    try:
        steps = [await measure(args, speed) for speed in args.speed]
    finally:
        for server in servers:
            await asyncio.to_thread(server.close)
    print("\n== steps (keeps up: no growing backlog on the broker, feed intake and event age "
          "stable)")  # fmt: skip
    for step in steps:
        loads = step.loads or [0.0]
        verdict = "keeps up" if not step.reasons else "falls behind"
        print(f"  {step.launches:g} launches/min x speed {step.speed:g}: "
              f"{step.trades_per_s:,.0f} trade events/s, load average "
              f"{min(loads):.1f}-{max(loads):.1f}: {verdict}")  # fmt: skip
    kept = [s.trades_per_s for s in steps if not s.reasons]
    print(f"highest sustained: {max(kept):,.0f} trade events/s" if kept
          else "highest sustained: none of the steps kept up")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=float, default=30.0, help="launches a market minute")
    parser.add_argument("--speed", type=float, nargs="+", default=[1.0],
                        help="market seconds a wall second; one step each (1)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before measuring")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds measured")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds after the window for late events"
    )
    parser.add_argument("--sample", type=float, default=3.0, help="seconds between samples")
    parser.add_argument(
        "--own-servers", action="store_true",
        help="RabbitMQ, Redis and Postgres of the run's own, their CPU the stack's alone",
    )  # fmt: skip
    parser.add_argument(
        "--max-growth", type=float, default=1.0,
        help="seconds the intake lag and event age may grow over the window (1)",
    )  # fmt: skip
    parser.add_argument(
        "--max-age", type=float, default=2.0,
        help="seconds receipt to prediction may take at the window's end (2)",
    )  # fmt: skip
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
