"""The fault suite's kit: the pipeline as processes, faults injected, and its ledger.

:class:`Pipeline` runs the simulator (with a sent log), feed, features and activity (and
the model, an optional stage a scenario asks for) as processes on the servers it is
given, taps the bus, injects faults (kill -9 of a service, a socket dropped) and times
each recovery. :meth:`Pipeline.finish` stops the
market, lets the services drain, stops them and returns a :class:`Ledger`: what the
simulator sent, what Postgres stored, what the bus carried and what each consumer
applied, compared event by event (a server may be frozen too, behind a
:class:`~pumpflow.common.testing.proxy.TcpProxy` of the test's own):

- *sent*: data frames the simulator's sockets took (its sent log), good and hostile;
- *stored*: rows of ``token_events``; a good frame sent and not stored is *lost*;
- *carried*: token events with a seq that a tap queue got (in the order it got them);
- *applied*: the consumers' durable records in Redis: features' state counts the
  events it folded in and keeps the last feed seq applied, activity keeps the last
  features seq applied. Features applied an event twice when it counts more events
  than were published, and lost one when it counts fewer.
- *predicted* (with the model): the model's record keeps the last features and activity
  seqs it applied, and its state counts the vectors it scored (the policy scores only
  some: see :mod:`pumpflow.common.model.processor`); a tap of its own carries the
  ``model.prediction`` events. Each vector scored must come out once per arm (one
  prediction id per causation and arm), every seq the model gave carried, in order,
  and no two of a token closer in event time than the scoring interval.

No pytest here: benchmarks and scripts may run a pipeline too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.events import Event
from pumpflow.common.testing.servers import free_port
from pumpflow.common.testing.stack import ProcessStack, http_get, http_json
from pumpflow.common.testing.waiting import eventually

SERVICES = ("feed", "features", "activity")
#: stages a pipeline runs only when asked (``Pipeline(stages=...)``), after the others
OPTIONAL_STAGES = ("model",)
#: event types a consumer applies by seq, per publisher
TOKEN_TYPES = ("token.created", "token.trade", "token.migrated")
AUDIT = "audit"
#: the consumer group of the tap on the model's predictions
AUDIT_PREDICTIONS = "audit_predictions"
#: prefix of a hostile frame's signature (the simulator's HOSTILE_SIGNATURE)
HOSTILE_SIGNATURE = "hostile"
_TX_OF_TYPE = {"token.created": "create", "token.migrated": "migrate"}


@dataclass(frozen=True, kw_only=True)
class MarketOptions:
    """The simulated market and the faults its socket injects."""

    seed: int = 5
    #: token launches per market minute
    rate: float = 60.0
    #: market seconds per wall second
    speed: float = 5.0
    drop_every_s: float | None = None
    hostile_rate: float = 0.0
    hostile_kinds: tuple[str, ...] = ()
    duplicate_rate: float = 0.0

    def argv(self, port: int, sent_log: Path, stats: Path) -> list[str]:
        argv = [
            "sim", "serve", "--port", str(port), "--seed", str(self.seed),
            "--rate", str(self.rate), "--speed", str(self.speed),
            "--sent-log", str(sent_log), "--stats-out", str(stats),
        ]  # fmt: skip
        if self.drop_every_s:
            argv += ["--drop-every", str(self.drop_every_s)]
        if self.hostile_rate:
            argv += ["--hostile-rate", str(self.hostile_rate)]
        if self.hostile_kinds:
            argv += ["--hostile-kinds", ",".join(self.hostile_kinds)]
        if self.duplicate_rate:
            argv += ["--duplicate-rate", str(self.duplicate_rate)]
        return argv


def scrape(port: int) -> dict[str, float]:
    """The /metrics of the service on ``port``: ``name{labels}`` -> value ({} while down)."""
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        return {}
    values: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                continue
    return values


def metric(values: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels``."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for series, value in values.items():
        base, _, rest = series.partition("{")
        if base == name and all(w in rest for w in wanted):
            total += value
    return total


class BusTap:
    """A queue of its own on the token events: the order and copies the bus carried."""

    def __init__(self) -> None:
        #: (key, seq) in the order they came, copies included
        self.deliveries: list[tuple[str, int]] = []

    async def __call__(self, event: Event) -> None:
        if event.seq is not None and event.key is not None:
            self.deliveries.append((event.key, event.seq))

    def summary(self) -> dict[str, int]:
        """Distinct events carried, copies, and events that came after a later one of their key."""
        seen: set[tuple[str, int]] = set()
        highest: dict[str, int] = {}
        copies = reordered = 0
        for key, seq in self.deliveries:
            if (key, seq) in seen:
                copies += 1
                continue
            seen.add((key, seq))
            if seq < highest.get(key, 0):
                reordered += 1
            highest[key] = max(highest.get(key, 0), seq)
        return {"carried": len(seen), "copies": copies, "reordered": reordered}


@dataclass(frozen=True, slots=True)
class Carried:
    """One ``model.prediction`` as a tap got it."""

    key: str
    seq: int
    id: str
    causation_id: str | None
    arm: str
    time: float


class PredictionTap:
    """A queue of its own on ``model.prediction``: every prediction the bus carried."""

    def __init__(self) -> None:
        #: in the order they came, copies (one id again) included
        self.deliveries: list[Carried] = []

    async def __call__(self, event: Event) -> None:
        if event.seq is not None and event.key is not None:
            self.deliveries.append(
                Carried(
                    key=event.key,
                    seq=event.seq,
                    id=event.id,
                    causation_id=event.causation_id,
                    arm=event.data.arm,
                    time=event.time,
                )
            )

    def by_mint(self) -> tuple[dict[str, list[Carried]], int, int]:
        """Each mint's distinct predictions in the order they first came, copies of one
        id, and predictions that came after a later seq of their mint."""
        seen: set[str] = set()
        highest: dict[str, int] = {}
        mints: dict[str, list[Carried]] = defaultdict(list)
        copies = reordered = 0
        for carried in self.deliveries:
            if carried.id in seen:
                copies += 1
                continue
            seen.add(carried.id)
            if carried.seq < highest.get(carried.key, 0):
                reordered += 1
            highest[carried.key] = max(highest.get(carried.key, 0), carried.seq)
            mints[carried.key].append(carried)
        return dict(mints), copies, reordered


@dataclass
class Ledger:
    """What each stage of the pipeline holds after a run, and what went missing between."""

    #: good data frames the simulator's sockets took (distinct), by tx type
    sent: Counter[str] = field(default_factory=Counter)
    #: copies of good frames sent (the simulator's duplicates and resends)
    sent_copies: int = 0
    #: hostile frames sent, by class
    hostile_sent: Counter[str] = field(default_factory=Counter)
    #: the simulator's own counters (undelivered: queued for a connection that ended)
    simulator: dict[str, int] = field(default_factory=dict)
    #: token events stored, and those of them with a seq (published)
    stored: int = 0
    published: int = 0
    #: hostile frames found stored, by class (signature prefix)
    hostile_stored: list[str] = field(default_factory=list)
    #: good frames sent and not stored (a sample of their signatures, and how many)
    lost: int = 0
    lost_sample: list[str] = field(default_factory=list)
    #: stored events whose seqs of a mint do not run 1..n
    seq_holes: int = 0
    #: the tap's summary: carried, copies, reordered
    bus: dict[str, int] = field(default_factory=dict)
    #: per consumer: applied, lost, twice (durable), and its metrics' view
    consumers: dict[str, dict[str, float]] = field(default_factory=dict)
    #: with the model: the vectors it scored by its states and what the bus carried of
    #: them (see :func:`_prediction_counts`)
    predictions: dict[str, int] = field(default_factory=dict)
    #: mints features folded fewer events of than were stored, with their records'
    #: bookkeeping (a sample), to tell a loss from a miscount
    features_short: list[dict[str, Any]] = field(default_factory=list)
    #: dead letters per service queue
    dead_letters: dict[str, int] = field(default_factory=dict)
    #: seconds from the end of each fault to the pipeline flowing again
    recoveries: list[float] = field(default_factory=list)
    #: exit codes of the services' final SIGTERM
    exit_codes: dict[str, int] = field(default_factory=dict)
    #: the feed's own count of what it could not keep (frames, sessions)
    feed_reported: dict[str, float] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        """The figures docs/reliability.md reports, as one flat dict."""
        return {
            "sent": sum(self.sent.values()),
            "hostile_sent": sum(self.hostile_sent.values()),
            "stored": self.stored,
            "published": self.published,
            "lost": self.lost,
            "market_while_away": self.simulator.get("unconnected", 0),
            "undelivered": self.simulator.get("undelivered", 0),
            "carried": self.bus.get("carried", 0),
            "reordered": self.bus.get("reordered", 0),
            **{
                f"{name}_{what}": value
                for name, counts in self.consumers.items()
                for what, value in counts.items()
            },
            **{f"predictions_{what}": value for what, value in self.predictions.items()},
            "dead_letters": dict(self.dead_letters),
            "recovery_s": [round(r, 1) for r in self.recoveries],
            "exit_codes": dict(self.exit_codes),
        }

    def report(self) -> str:
        return json.dumps(self.figures(), sort_keys=True)

    def problems(self, *, may_lose: bool = False) -> list[str]:
        """Every way the run broke the guarantees; empty when it kept them.

        ``may_lose``: the fault cut the socket or killed the feed, so frames in flight
        (sent, never read or never stored) and the market while it was away may be
        lost, as long as the feed counted the interruption; nothing stored may be.
        """
        found = []
        if self.lost and not may_lose:
            found.append(f"{self.lost} good frames sent and never stored: {self.lost_sample}")
        if self.lost and may_lose and not any(self.feed_reported.values()):
            found.append(f"{self.lost} frames lost silently (the feed reported no interruption)")
        away = self.simulator.get("unconnected", 0)
        if away and not may_lose:
            found.append(f"the feed let go of the socket while the market sent {away} frames")
        if self.hostile_stored:
            found.append(f"hostile frames stored: {self.hostile_stored[:5]}")
        if self.seq_holes:
            found.append(f"{self.seq_holes} mints whose stored seqs do not run 1..n")
        if self.bus.get("reordered"):
            found.append(f"{self.bus['reordered']} events carried after a later one of their mint")
        if self.bus.get("carried", 0) < self.published:
            found.append(
                f"the bus carried {self.bus.get('carried', 0)} of {self.published} published events"
            )
        for name, counts in self.consumers.items():
            if counts.get("lost"):
                detail = f": {self.features_short}" if name == "features" else ""
                found.append(f"{name} never applied {counts['lost']:g} events{detail}")
            if counts.get("twice"):
                found.append(f"{name} applied {counts['twice']:g} events twice")
        found += _prediction_problems(self.predictions)
        for service, code in self.exit_codes.items():
            if code != 0:
                found.append(f"{service} exited {code} on SIGTERM")
        return found


@dataclass(frozen=True, kw_only=True)
class Servers:
    """Where the pipeline's RabbitMQ, Redis and Postgres answer."""

    amqp_url: str
    redis_url: str
    postgres_dsn: str


class Pipeline:
    """Simulator, feed, features and activity as processes, a bus tap, and their ledger.

    ``stack`` is a :class:`ProcessStack` configured for ``servers`` and ``namespace``
    (whose Postgres schema is migrated). ``stages``: optional stages run too
    (:data:`OPTIONAL_STAGES`; the model costs a process and a tap of its predictions, so
    only the scenarios about it run it). ``settings`` go to every service.
    """

    def __init__(
        self,
        stack: ProcessStack,
        *,
        servers: Servers,
        namespace: str,
        market: MarketOptions = MarketOptions(),
        partitions: int = 4,
        stages: tuple[str, ...] = (),
        **settings: object,
    ):
        unknown = set(stages) - set(OPTIONAL_STAGES)
        if unknown:
            raise ValueError(f"no optional stage {sorted(unknown)}: {OPTIONAL_STAGES}")
        self.stack = stack
        self.servers = servers
        self.namespace = namespace
        self.market = market
        self.partitions = partitions
        #: the services run, in the order they start
        self.services = (*SERVICES, *(s for s in OPTIONAL_STAGES if s in stages))
        self.model = "model" in self.services
        # the deployment these services make (a declared group that never runs fills up)
        groups = ",".join(s for s in self.services if s != "feed")
        self.settings = {"consumer_groups": groups, **settings}
        self.ports = {service: free_port() for service in self.services}
        self.sim_port = free_port()
        self.sent_log = stack.logdir / "sent.tsv"
        self.sim_stats = stack.logdir / "simulator.json"
        #: servers of the test's own by name (rabbitmq, redis, postgres), to fault
        self.instances: dict[str, Any] = {}
        #: proxies the services reach servers through, by the server's name, to freeze
        self.proxies: dict[str, Any] = {}
        self.tap = BusTap()
        self.prediction_tap = PredictionTap()
        self.recoveries: list[float] = []
        #: kill -9s per service
        self.killed: Counter[str] = Counter()
        self._tap_bus = None
        self._feed_sessions = 0.0
        #: stored published events per mint, and the last row id read
        self._stored: dict[str, list[tuple[int, str, bool]]] = defaultdict(list)
        self._stored_upto = 0

    # ---------------------------------------------------------------- running

    async def start(
        self, *, within: float = 90.0, late: tuple[str, ...] = (), late_after: int = 200
    ) -> None:
        """Tap the bus, start the simulator and every service; return once all are ready.

        The services in ``late`` start only once the feed stored ``late_after`` events.
        """
        from pumpflow.common.bus.rabbitmq import RabbitMQBus

        self.stack.configure(PUMPPORTAL_WS_URL=f"ws://127.0.0.1:{self.sim_port}/api/data")
        self._tap_bus = RabbitMQBus(
            url=self.servers.amqp_url,
            namespace=self.namespace,
            partitions=self.partitions,
            source=f"{AUDIT}/test",
        )
        await self._tap_bus.start()
        await self._tap_bus.subscribe(
            Subscription(service=AUDIT, patterns=TOKEN_TYPES, handler=self.tap)
        )
        if self.model:
            await self._tap_bus.subscribe(
                Subscription(
                    service=AUDIT_PREDICTIONS,
                    patterns=("model.prediction",),
                    handler=self.prediction_tap,
                )
            )
        self.stack.pumpflow(
            "simulator", *self.market.argv(self.sim_port, self.sent_log, self.sim_stats)
        )
        for service in self.services:
            if service not in late:
                self.serve(service)
        if late:
            await self.until_recorded(late_after)
            for service in late:
                self.serve(service)
        await self.until_ready(within)

    def serve(self, service: str) -> None:
        self.stack.serve(service, http_port=self.ports[service], **self.settings)

    def ready(self) -> bool:
        return all(
            http_get(f"http://127.0.0.1:{self.ports[s]}/readyz")[0] == 200 for s in self.services
        )

    async def until_ready(self, within: float) -> float:
        began = time.monotonic()
        await eventually(
            lambda: asyncio.to_thread(self.ready),
            within,
            what="every service ready",
            details=self.stack.logs,
            interval=0.25,
        )
        return time.monotonic() - began

    def counts(self) -> dict[str, float]:
        """What flowed so far by each service's metrics (0 for a service that is down)."""
        feed = scrape(self.ports["feed"])
        features = scrape(self.ports["features"])
        activity = scrape(self.ports["activity"])
        applied = "pumpflow_consumer_events_total"
        counts = {
            "feed_recorded": metric(feed, "pumpflow_feed_events_recorded_total"),
            "feed_published": metric(feed, "pumpflow_feed_events_published_total"),
            "features_applied": metric(features, applied, service="features", outcome="applied"),
            "activity_applied": metric(activity, applied, service="activity", outcome="applied"),
        }
        if self.model:
            model = scrape(self.ports["model"])
            counts["model_applied"] = metric(model, applied, service="model", outcome="applied")
            # back means scoring again, not only applying
            counts["model_predicted"] = metric(model, "pumpflow_model_predictions_total")
        return counts

    async def flowing(self, *, within: float = 120.0, since: float | None = None) -> float:
        """Wait until every service is ready and each stage moved events on; return the
        seconds since ``since`` (a monotonic time, default now): the recovery time."""
        began = time.monotonic() if since is None else since
        before = await asyncio.to_thread(self.counts)

        def moved() -> bool:
            # a counter that changed moved on, or belongs to a process started since
            if not self.ready():
                return False
            now = self.counts()
            return all(now[k] > 0 and now[k] != before[k] for k in now)

        await eventually(
            lambda: asyncio.to_thread(moved),
            within,
            what="every stage moving events again",
            details=lambda: f"{self.counts()}\n{self.stack.logs()}",
            interval=0.25,
        )
        took = time.monotonic() - began
        self.recoveries.append(took)
        return took

    async def until_recorded(self, events: int, *, within: float = 120.0) -> None:
        """Wait until the feed stored ``events`` more token events than it had."""
        start = (await asyncio.to_thread(self.counts))["feed_recorded"]

        async def recorded() -> bool:
            return (await asyncio.to_thread(self.counts))["feed_recorded"] >= start + events

        await eventually(
            recorded, within, what=f"{events} more events stored", details=self.stack.logs
        )

    # ---------------------------------------------------------------- faults

    async def kill(self, service: str) -> None:
        """kill -9 ``service`` (what it counted dies with it; the feed's is kept)."""
        if service == "feed":
            await self._keep_feed_counts()
        self.killed[service] += 1
        await self.stack.stop(service, sig=signal.SIGKILL, within=30)

    async def kill_and_restart(self, service: str) -> float:
        """kill -9 ``service``, start it again; return seconds until the pipeline flows."""
        await self.kill(service)
        began = time.monotonic()
        self.serve(service)
        return await self.flowing(since=began)

    async def outage(self, server: str, *, seconds: float | None = None) -> float:
        """Restart ``server`` (``seconds`` None) or stop it that long and start it again;
        return the seconds from its return until the pipeline flows again."""
        instance = self.instances[server]
        if seconds is None:
            await asyncio.to_thread(instance.restart)
        else:
            await asyncio.to_thread(instance.stop)
            # the fault is the outage's length: the market runs on meanwhile
            await asyncio.sleep(seconds)
            await asyncio.to_thread(instance.start)
        back = time.monotonic()
        return await self.flowing(since=back)

    async def freeze(self, server: str) -> float:
        """Freeze ``server`` (its proxy forwards nothing, every connection stays open, as
        with a frozen host) until a service's /readyz names it waited on, then let it go
        on; return the seconds from the thaw until the pipeline flows again."""
        proxy = self.proxies[server]
        proxy.freeze()
        try:
            await eventually(
                lambda: asyncio.to_thread(self.waiting_on, server),
                60,
                what=f"a service waiting on {server}, named in /readyz",
                details=self.stack.logs,
                interval=0.25,
            )
        finally:
            proxy.thaw()
        back = time.monotonic()
        return await self.flowing(since=back)

    async def alarm(self) -> float:
        """Raise the broker's memory alarm, as when it runs short of memory or disk: it
        blocks every connection that publishes (consumers go on), until a service's
        /readyz names RabbitMQ waited on; then clear it and return the seconds from then
        until the pipeline flows again."""
        broker = self.instances["rabbitmq"]

        def watermark(fraction: str) -> None:
            done = broker.ctl("set_vm_memory_high_watermark", fraction)
            if done.returncode != 0:
                raise RuntimeError(f"rabbitmqctl: {done.stdout}{done.stderr}")

        await asyncio.to_thread(watermark, "0.0001")
        try:
            await eventually(
                lambda: asyncio.to_thread(self.waiting_on, "rabbitmq"),
                60,
                what="a service waiting on rabbitmq, named in /readyz",
                details=self.stack.logs,
                interval=0.25,
            )
        finally:
            await asyncio.to_thread(watermark, "0.4")
        back = time.monotonic()
        return await self.flowing(since=back)

    def waiting_on(self, dependency: str) -> list[str]:
        """The services whose /readyz names ``dependency`` waited on."""
        found = []
        for service in self.services:
            body = http_json(f"http://127.0.0.1:{self.ports[service]}/readyz", timeout=10)
            checks = (body or {}).get("checks", {})
            if dependency in checks.get("dependencies", {}).get("waiting_on", {}):
                found.append(service)
        return found

    async def _keep_feed_counts(self) -> None:
        feed = await asyncio.to_thread(scrape, self.ports["feed"])
        self._feed_sessions += metric(feed, "pumpflow_feed_reconnects_total")

    # ---------------------------------------------------------------- the ledger

    async def finish(self, *, drain_within: float = 120.0) -> Ledger:
        """Stop the market, let every stage drain, stop the services; the run's ledger."""
        ledger = Ledger(recoveries=list(self.recoveries))
        await self.stack.stop("simulator", within=30)
        await self._drained(drain_within)
        metrics = {s: await asyncio.to_thread(scrape, self.ports[s]) for s in self.services}
        ledger.feed_reported = {
            "reconnects": self._feed_sessions
            + metric(metrics["feed"], "pumpflow_feed_reconnects_total"),
            "killed": float(self.killed["feed"]),
            "invalid_frames": metric(metrics["feed"], "pumpflow_feed_invalid_frames_total"),
        }
        ledger.exit_codes = await self.stack.stop_all(self.services)
        await self._account(ledger, metrics)
        return ledger

    async def aclose(self) -> None:
        """Kill what still runs and close the tap (a run that failed before :meth:`finish`)."""
        await asyncio.to_thread(self.stack.kill)
        if self._tap_bus is not None:
            bus, self._tap_bus = self._tap_bus, None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await bus.close()

    async def _drained(self, within: float, *, quiet_s: float = 10.0) -> None:
        """Wait until the consumers' records hold everything the feed stored, or until
        they stopped moving for ``quiet_s`` (what never arrives is the ledger's to count)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        progress: tuple[int, ...] = ()
        moved = loop.time()
        while True:
            state = await self._applied_state()
            behind = _behind(state)
            if not behind:
                return
            now = _progress(state)
            if now != progress:
                progress, moved = now, loop.time()
            if loop.time() - moved > quiet_s or loop.time() > deadline:
                return
            await asyncio.sleep(0.5)

    async def _applied_state(self) -> dict[str, Any]:
        """Per mint: stored seqs and the consumers' durable view of them."""
        from pumpflow.common.consumer.keyed import Record
        from pumpflow.common.features import FeatureManager
        from pumpflow.common.features.processor import FeaturesProcessor
        from pumpflow.common.storage import TokenEventStore

        stored = await self._stored_events(TokenEventStore)
        decode = msgspec.msgpack.Decoder(Record).decode
        features = FeaturesProcessor(FeatureManager(), retire_ttl_s=1.0)
        records: dict[str, dict[str, Record]] = {s: {} for s in self.services if s != "feed"}
        import redis.asyncio as redis

        client = redis.Redis.from_url(self.servers.redis_url)
        try:
            for service, found in records.items():
                prefix = f"{self.namespace}:{service}:key:"
                keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
                values = await client.mget(keys) if keys else []
                for k, v in zip(keys, values, strict=True):
                    if v is not None:
                        found[k.decode()[len(prefix) :]] = decode(v)
        finally:
            await client.aclose()
        counted = {}
        for mint, record in records["features"].items():
            try:
                counted[mint] = features.decode(record.state).n_events
            except Exception:  # a state of another version, or unreadable: count none
                counted[mint] = 0
        state = {"stored": stored, "records": records, "features_events": counted}
        if self.model:
            state["model_scored"] = _scored(records["model"])
        return state

    async def _stored_events(self, store_class) -> dict[str, list[tuple[int, str, bool]]]:
        """Per mint: (seq, tx type, foldable by features) of its stored published events
        (read on from the last row read before: rows are only ever added)."""
        from pumpflow.common.db.pool import create_pool
        from pumpflow.common.features.inputs import event_input
        from pumpflow.common.features.processor import invalid_reason

        pool = await create_pool(self.servers.postgres_dsn, self.namespace, max_size=2)
        by_mint = self._stored
        try:
            stream = store_class(pool).stream_stored(order="id", after_id=self._stored_upto)
            async for stored in stream:
                self._stored_upto = stored.row_id
                event = stored.event
                if event.seq is None:
                    continue
                foldable = event.type != "token.migrated" and (
                    invalid_reason(event_input(event)) is None
                )
                by_mint[event.key].append((event.seq, event.type, foldable))
            return by_mint
        finally:
            await pool.close()

    async def _account(self, ledger: Ledger, consumer_metrics: dict[str, dict[str, float]]) -> None:
        from pumpflow.common.db.pool import create_pool

        sent, copies, hostile = read_sent_log(self.sent_log)
        ledger.sent = Counter(tx for tx, _ in sent)
        ledger.sent_copies = copies
        ledger.hostile_sent = hostile
        if self.sim_stats.exists():
            ledger.simulator = json.loads(self.sim_stats.read_text())
        pool = await create_pool(self.servers.postgres_dsn, self.namespace, max_size=2)
        try:
            rows = await pool.fetch("SELECT signature, tx_type, seq FROM token_events")
        finally:
            await pool.close()
        stored = {(r["tx_type"], r["signature"]) for r in rows}
        ledger.stored = len(rows)
        ledger.published = sum(r["seq"] is not None for r in rows)
        ledger.hostile_stored = sorted(s[:40] for _, s in stored if s.startswith(HOSTILE_SIGNATURE))
        missing = [sig for tx_sig in sent if tx_sig not in stored for sig in (tx_sig[1],)]
        ledger.lost = len(missing)
        ledger.lost_sample = missing[:5]
        ledger.bus = self.tap.summary()
        state = await self._applied_state()
        if self.model:
            await self._predictions_carried(state["records"]["model"])
        ledger.seq_holes = sum(
            sorted(seq for seq, _, _ in events) != list(range(1, len(events) + 1))
            for events in state["stored"].values()
        )
        ledger.consumers = _consumer_counts(state, consumer_metrics, killed=self.killed)
        if self.model:
            interval = float(self.settings.get("model_min_interval_s", _min_interval_s()))
            ledger.predictions = _prediction_counts(
                state, self.prediction_tap, min_interval_s=interval
            )
        ledger.features_short = _features_short(state)[:5]
        ledger.dead_letters = await self._dead_letters()

    async def _predictions_carried(self, records: Mapping[str, Any], within: float = 30.0) -> None:
        """Wait until the tap got the last prediction each record gave, or ``within``
        passed (what never comes is the ledger's to count): the model published them as
        it stopped, a moment before."""
        with contextlib.suppress(AssertionError):
            await eventually(
                lambda: not _uncarried(records, self.prediction_tap), within, interval=0.25
            )

    async def _dead_letters(self) -> dict[str, int]:
        import aio_pika

        counts = {}
        connection = await aio_pika.connect(self.servers.amqp_url)
        try:
            for service in self.services:
                channel = await connection.channel()
                try:
                    queue = await channel.declare_queue(
                        f"{self.namespace}.{service}.dlq", passive=True
                    )
                    counts[service] = queue.declaration_result.message_count
                except aio_pika.exceptions.ChannelClosed:
                    counts[service] = 0
        finally:
            await connection.close()
        return counts


def read_sent_log(path: Path) -> tuple[set[tuple[str, str]], int, Counter[str]]:
    """The good frames sent ((tx type, signature)), copies of them, and hostile ones by class."""
    sent: set[tuple[str, str]] = set()
    copies = 0
    hostile: Counter[str] = Counter()
    if not path.exists():
        return sent, copies, hostile
    with path.open(errors="replace") as lines:
        for line in lines:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 5:
                continue  # the last line of a simulator killed mid-write
            _, kind, tx, _, signature = parts
            if kind.startswith("hostile_"):
                hostile[kind.removeprefix("hostile_")] += 1
            elif kind in ("frame", "duplicate"):
                if (tx, signature) in sent:
                    copies += 1
                sent.add((tx, signature))
    return sent, copies, hostile


def _behind(state: dict[str, Any]) -> list[str]:
    """Mints whose stored events a consumer has not applied yet."""
    behind = []
    features = state["records"]["features"]
    activity = state["records"]["activity"]
    for mint, events in state["stored"].items():
        foldable = [seq for seq, _, ok in events if ok]
        record = features.get(mint)
        applied = 0 if record is None else record.applied.get("feed", 0)
        if foldable and applied < max(foldable):
            behind.append(f"{mint}: features applied feed seq {applied} of {max(foldable)}")
            continue
        # (a stored outbox may list events published since: the record is rewritten
        # on the key's next commit; activity's record tells what reached it)
        if record is not None and record.published:
            seen = activity.get(mint)
            last = 0 if seen is None else seen.applied.get("features", 0)
            if last < record.published:
                behind.append(f"{mint}: activity applied features seq {last} of {record.published}")
                continue
        if "model" in state["records"]:
            behind += _model_behind(mint, state["records"])
    return behind


def _model_behind(mint: str, records: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What of ``mint``'s vectors and lifecycle the model has not applied yet."""
    seen = records["model"].get(mint)
    for publisher in ("features", "activity"):
        record = records[publisher].get(mint)
        published = 0 if record is None else record.published
        last = 0 if seen is None else seen.applied.get(publisher, 0)
        if last < published:
            return [f"{mint}: model applied {publisher} seq {last} of {published}"]
    return []


def _progress(state: dict[str, Any]) -> tuple[int, ...]:
    """Sums of the seqs each consumer applied: they change while anything moves."""
    applied = [
        sum(sum(r.applied.values()) for r in records.values())
        for records in state["records"].values()
    ]
    return (*applied, sum(len(events) for events in state["stored"].values()))


def _features_short(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Mints features folded fewer events of than were stored, each with its record."""
    short = []
    for mint, events in state["stored"].items():
        want = sum(ok for _, _, ok in events)
        got = state["features_events"].get(mint, 0)
        if got >= want:
            continue
        record = state["records"]["features"].get(mint)
        short.append(
            {
                "mint": mint,
                "stored": want,
                "folded": got,
                "stored_seqs": len(events),
                "record": None
                if record is None
                else {
                    "applied": record.applied,
                    "published": record.published,
                    "retired": record.retired,
                    "missing": record.missing,
                    "failed": record.failed,
                    "refused": record.refused,
                },
            }
        )
    return short


def _consumer_counts(
    state: dict[str, Any], metrics: Mapping[str, Mapping[str, float]], *, killed: Counter[str]
) -> dict[str, dict[str, float]]:
    """Applied, lost and twice per consumer, from the durable records (and metrics).

    Features' state counts the events it folded in: exact. Activity's record keeps
    only the last features seq applied, so its holes and doubles are read from its
    applied counter, which is exact only for a process that ran the whole run (a
    killed one applies again what it had not stored, as it should).
    """
    features = state["records"]["features"]
    activity = state["records"]["activity"]
    f_applied = f_lost = f_twice = 0
    a_applied = a_lost = 0
    a_expected = 0
    for mint, events in state["stored"].items():
        a_expected += sum(kind == "token.migrated" for _, kind, _ in events)
        want = sum(ok for _, _, ok in events)
        got = state["features_events"].get(mint, 0)
        f_applied += min(got, want)
        f_lost += max(0, want - got)
        f_twice += max(0, got - want)
        record = features.get(mint)
        published = record.published if record is not None else 0
        seen = activity.get(mint)
        last = seen.applied.get("features", 0) if seen is not None else 0
        a_applied += min(last, published)
        a_lost += max(0, published - last)
        a_expected += published
    applied = "pumpflow_consumer_events_total"
    out = {}
    for name, counts in (
        ("features", {"applied": f_applied, "lost": f_lost, "twice": f_twice}),
        ("activity", {"applied": a_applied, "lost": a_lost}),
    ):
        values = metrics.get(name, {})
        counts["gaps_metric"] = metric(values, "pumpflow_consumer_gaps_total", service=name)
        counts["duplicates_metric"] = metric(
            values, "pumpflow_consumer_duplicates_total", service=name
        )
        counts["applied_metric"] = metric(values, applied, service=name, outcome="applied")
        counts["invalid_metric"] = metric(values, applied, service=name, outcome="invalid")
        out[name] = counts
    if not killed["activity"]:
        counted = out["activity"]["applied_metric"] + out["activity"]["invalid_metric"]
        out["activity"]["twice"] = max(0, counted - a_expected)
        out["activity"]["lost"] = max(out["activity"]["lost"], a_expected - counted)
    if "model" in state["records"]:
        out["model"] = _model_counts(state["records"], metrics.get("model", {}), killed=killed)
    return out


def _model_counts(
    records: Mapping[str, Mapping[str, Any]], values: Mapping[str, float], *, killed: Counter[str]
) -> dict[str, float]:
    """Applied, lost (and twice, for a model that ran the whole run) of the vectors and
    lifecycle events features and activity published, as activity's are counted."""
    applied = lost = expected = 0
    for publisher in ("features", "activity"):
        for mint, record in records[publisher].items():
            seen = records["model"].get(mint)
            last = 0 if seen is None else seen.applied.get(publisher, 0)
            applied += min(last, record.published)
            lost += max(0, record.published - last)
            expected += record.published
    events = "pumpflow_consumer_events_total"
    counts: dict[str, float] = {
        "applied": applied,
        "lost": lost,
        "gaps_metric": metric(values, "pumpflow_consumer_gaps_total", service="model"),
        "duplicates_metric": metric(values, "pumpflow_consumer_duplicates_total", service="model"),
        "applied_metric": metric(values, events, service="model", outcome="applied"),
        "invalid_metric": metric(values, events, service="model", outcome="invalid"),
    }
    if not killed["model"]:
        counted = counts["applied_metric"] + counts["invalid_metric"]
        counts["twice"] = max(0, counted - expected)
        counts["lost"] = max(counts["lost"], expected - counted)
    return counts


def _scored(records: Mapping[str, Any]) -> dict[str, int]:
    """Per mint: the vectors the model's stored state says it scored."""
    from pumpflow.common.model.processor import ScoringState

    decode = msgspec.msgpack.Decoder(ScoringState).decode
    scored = {}
    for mint, record in records.items():
        try:
            scored[mint] = decode(record.state).scored
        except msgspec.DecodeError:  # a state of another version: it says nothing
            scored[mint] = 0
    return scored


def _min_interval_s() -> float:
    from pumpflow.common.model.settings import ScoringPolicy

    return ScoringPolicy().min_interval_s


def _prediction_counts(
    state: Mapping[str, Any], tap: PredictionTap, *, min_interval_s: float
) -> dict[str, int]:
    """What the model says it scored (its states) against what the bus carried.

    - ``scored``: vectors scored, by the states; ``predicted``: vectors (causation ids)
      the bus carried a prediction of; ``carried``: predictions (ids), ``copies`` of
      one id carried again (a stored outbox published again: dropped by seq downstream);
    - ``lost``: vectors scored with no prediction carried (per mint, by the count);
    - ``twice``: a second prediction (another id) of one vector and arm, another id
      under one seq, or vectors predicted that no state counts scored;
    - ``uncarried``: seqs the model gave, from a mint's first carried to its record's
      last, the bus never carried (a key may number from above its partition's floor,
      so not from 1: a first prediction never carried is ``lost`` by the count);
    - ``reordered``: predictions carried after a later seq of their mint;
    - ``too_soon``: predictions of a mint closer in event time than the scoring
      interval to the one before (the policy scores a token at most that often).
    """
    mints, copies, reordered = tap.by_mint()
    scored = state["model_scored"]
    records = state["records"]["model"]
    counts = Counter(dict.fromkeys(PREDICTION_FIGURES, 0))
    counts.update(scored=sum(scored.values()), copies=copies, reordered=reordered)
    for mint in scored.keys() | mints.keys():
        carried = mints.get(mint, [])
        vectors = {c.causation_id for c in carried}
        counts["carried"] += len(carried)
        counts["predicted"] += len(vectors)
        counts["lost"] += max(0, scored.get(mint, 0) - len(vectors))
        counts["twice"] += (
            len(carried)
            - len({(c.causation_id, c.arm) for c in carried})
            + len(carried)
            - len({c.seq for c in carried})
            + max(0, len(vectors) - scored.get(mint, 0))
        )
        record = records.get(mint)
        if record is not None and record.published:
            seqs = {c.seq for c in carried}
            first = min(seqs, default=1)
            counts["uncarried"] += sum(s not in seqs for s in range(first, record.published + 1))
        # one moment per vector scored (a shadow arm's predictions share it)
        times = sorted({c.causation_id: (c.seq, c.time) for c in carried}.values())
        counts["too_soon"] += sum(
            later - earlier < min_interval_s
            for (_, earlier), (_, later) in itertools.pairwise(times)
        )
    return dict(counts)


#: the figures of :func:`_prediction_counts`, each there in every ledger with the model
PREDICTION_FIGURES = (
    "scored", "predicted", "carried", "copies", "lost", "twice", "uncarried", "reordered",
    "too_soon",
)  # fmt: skip


def _uncarried(records: Mapping[str, Any], tap: PredictionTap) -> int:
    """Seqs the model's records gave that the tap has not got (yet)."""
    highest: dict[str, int] = {}
    for carried in tap.deliveries:
        highest[carried.key] = max(highest.get(carried.key, 0), carried.seq)
    return sum(max(0, r.published - highest.get(mint, 0)) for mint, r in records.items())


def _prediction_problems(counts: Mapping[str, int]) -> list[str]:
    found = []
    if counts.get("lost"):
        found.append(f"the model scored {counts['lost']} vectors it published no prediction of")
    if counts.get("uncarried"):
        found.append(f"the bus never carried {counts['uncarried']} predictions the model made")
    if counts.get("twice"):
        found.append(f"{counts['twice']} predictions published twice")
    if counts.get("reordered"):
        found.append(f"{counts['reordered']} predictions carried after a later one of their mint")
    if counts.get("too_soon"):
        found.append(f"{counts['too_soon']} predictions within the scoring interval of the last")
    return found
