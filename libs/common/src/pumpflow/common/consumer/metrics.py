"""Metrics of the keyed stateful consumer, registered on an injected registry."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pumpflow.common.metrics import families as shared_families
from pumpflow.common.state.abc import WRONG_KINDS

#: fine below 25 ms, where a hop's store and publish waits lie
STEP_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
)  # fmt: skip

LAG = "pumpflow_consumer_lag_seconds"
_LAG_HELP = (
    "Seconds the keyed consumer's state is behind the market, by partition owned (as in "
    "its queue's name): the clock minus the latest market event time the partition "
    "applied (or restored with its records), read when scraped. It grows while nothing "
    "newer is applied: a quiet market (the partition's queue empty) or a consumer "
    "stalled or behind a backlog (its queue holding messages). Partitions that know no "
    "time yet are left out."
)

#: what a consumer tells of its lag: (partition, seconds) of each partition it owns
LagSource = Callable[[], Iterable[tuple[int, float]]]

REBUILDING = "pumpflow_consumer_rebuilding_keys"
_REBUILDING_HELP = (
    "Keys whose events wait, kept with their records, for their history to be read "
    "(the key's record lost, its stored events read from Postgres, which is slow, locked "
    "or away), read when scraped. The partition's other keys go on meanwhile; a count "
    "that stays up says the history cannot be read."
)


class _Lags(Collector):
    """The lag gauge, read from the live consumers when scraped (nothing per event)."""

    def __init__(self, registry: CollectorRegistry):
        #: service -> the consumers' lag readers (weak: a consumer's end ends its series)
        self._sources: list[tuple[str, weakref.WeakMethod]] = []
        registry.register(self)

    def watch(self, service: str, source: LagSource) -> None:
        live = [(s, ref) for s, ref in self._sources if ref() is not None]
        self._sources = [*live, (service, weakref.WeakMethod(source))]  # type: ignore[arg-type]

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(LAG, _LAG_HELP, labels=["service", "partition"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        worst: dict[tuple[str, str], float] = {}
        for service, ref in self._sources:
            source = ref()
            if source is None:
                continue
            for partition, lag in source():
                # two consumers of a service in one process (tests, a hand-over) may
                # both hold a partition a moment: its worst
                labels = (service, f"{partition:02d}")
                worst[labels] = max(lag, worst.get(labels, lag))
        family = GaugeMetricFamily(LAG, _LAG_HELP, labels=["service", "partition"])
        for labels, lag in sorted(worst.items()):
            family.add_metric(labels, lag)
        yield family


class _Families:
    def __init__(self, registry: CollectorRegistry):
        self.events = Counter(
            "pumpflow_consumer_events",
            "Events handed to the keyed consumer, by outcome "
            "(applied, duplicate, invalid, redriven, reordered).",
            ["service", "outcome"],
            registry=registry,
        )
        self.duplicates = Counter(
            "pumpflow_consumer_duplicates",
            "Events dropped because their seq was applied already.",
            ["service"],
            registry=registry,
        )
        self.gaps = Counter(
            "pumpflow_consumer_gaps",
            "Events applied after a gap in their publisher's per-key seq.",
            ["service"],
            registry=registry,
        )
        self.timers = Counter(
            "pumpflow_consumer_timers_fired",
            "Key timers fired on this replica.",
            ["service"],
            registry=registry,
        )
        self.commits = Histogram(
            "pumpflow_consumer_commit_keys",
            "Keys stored by one group commit.",
            ["service"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "pumpflow_consumer_commit_seconds",
            "Time to encode and write one group commit.",
            ["service"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.publish_seconds = Histogram(
            "pumpflow_consumer_publish_seconds",
            "Time to publish the events of the group commits written meanwhile, confirms included.",
            ["service"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.store_retries = Counter(
            "pumpflow_consumer_store_retries",
            "Failed writes or publishes retried (a dependency was down).",
            ["service"],
            registry=registry,
        )
        self.keys = Gauge(
            "pumpflow_consumer_keys",
            "Keys held in memory, by form (live, compact).",
            ["service", "form"],
            registry=registry,
        )
        self.restored = Counter(
            "pumpflow_consumer_restored_keys",
            "Keys loaded from the store when their partition was assigned.",
            ["service"],
            registry=registry,
        )
        self.stalled_commits = Counter(
            "pumpflow_consumer_stalled_commits",
            "Group commits the store refused because a key of theirs holds the wrong kind "
            "(a value or a set where hash fields go: written by something else), by what "
            "it holds; retried until the key is removed, every commit of the replica "
            "waiting meanwhile.",
            ["service", "kind"],
            registry=registry,
        )
        self.store_losses = Counter(
            "pumpflow_consumer_store_losses",
            "Times the store was found to have lost its contents (a new epoch): the keys "
            "held in memory are written again.",
            ["service"],
            registry=registry,
        )
        self.unrecorded = Counter(
            "pumpflow_consumer_unrecorded_starts",
            "First events of a publisher on a key whose record holds nothing of it (a new "
            "key, or one other publishers' events started) further into its seq than a "
            "reordering explains (a store that lost the record, or a consumer that joined "
            "mid-stream); not the seqs of a publisher it takes only some types of, which "
            "skip by design.",
            ["service"],
            registry=registry,
        )
        self.rebuilt = Counter(
            "pumpflow_consumer_rebuilt_keys",
            "Keys without a record rebuilt from their publisher's stored history before "
            "their first event here was applied.",
            ["service"],
            registry=registry,
        )
        self.retired = Counter(
            "pumpflow_consumer_retired_keys",
            "Keys retired (dropped from memory, record kept with a TTL).",
            ["service"],
            registry=registry,
        )
        self.lags = _Lags(registry)
        self.rebuilding = _Rebuilding(registry)


class _Rebuilding(Collector):
    """The keys waiting for their history, read from the live consumers when scraped."""

    def __init__(self, registry: CollectorRegistry):
        #: service -> the consumers' readers (weak: a consumer's end ends its count)
        self._sources: list[tuple[str, weakref.WeakMethod]] = []
        registry.register(self)

    def watch(self, service: str, source: Callable[[], int]) -> None:
        live = [(s, ref) for s, ref in self._sources if ref() is not None]
        self._sources = [*live, (service, weakref.WeakMethod(source))]  # type: ignore[arg-type]

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(REBUILDING, _REBUILDING_HELP, labels=["service"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts: dict[str, int] = {}
        for service, ref in self._sources:
            source = ref()
            if source is not None:
                counts[service] = counts.get(service, 0) + source()
        family = GaugeMetricFamily(REBUILDING, _REBUILDING_HELP, labels=["service"])
        for service, count in sorted(counts.items()):
            family.add_metric([service], count)
        yield family


class ConsumerMetrics:
    """The consumer's series for one service, bound once so the hot path only adds."""

    def __init__(self, service: str, *, registry: CollectorRegistry | None = None):
        families = shared_families("consumer", _Families, registry)
        self.applied = families.events.labels(service, "applied")
        self.invalid = families.events.labels(service, "invalid")
        self.duplicate_events = families.events.labels(service, "duplicate")
        self.redriven = families.events.labels(service, "redriven")
        self.reordered = families.events.labels(service, "reordered")
        self.duplicates = families.duplicates.labels(service)
        self.gaps = families.gaps.labels(service)
        self.timers = families.timers.labels(service)
        self.commit_keys = families.commits.labels(service)
        self.commit_seconds = families.commit_seconds.labels(service)
        self.publish_seconds = families.publish_seconds.labels(service)
        self.store_retries = families.store_retries.labels(service)
        self.live_keys = families.keys.labels(service, "live")
        self.compact_keys = families.keys.labels(service, "compact")
        self.restored = families.restored.labels(service)
        self.retired = families.retired.labels(service)
        self.store_losses = families.store_losses.labels(service)
        self._stalled_commits = families.stalled_commits
        for kind in WRONG_KINDS:
            # from 0, so the first refusal shows as an increase
            self._stalled_commits.labels(service, kind)
        self.service = service
        self.unrecorded = families.unrecorded.labels(service)
        self.rebuilt = families.rebuilt.labels(service)
        self._lags = families.lags
        self._rebuilding = families.rebuilding

    def read_lag(self, source: LagSource) -> None:
        """Export what ``source`` (a consumer's bound method) tells of its lag behind the
        market each time the registry is scraped, for as long as its consumer lives."""
        self._lags.watch(self.service, source)

    def read_rebuilding(self, source: Callable[[], int]) -> None:
        """Export how many keys ``source`` (a consumer's bound method) says wait for their
        history each time the registry is scraped, for as long as its consumer lives."""
        self._rebuilding.watch(self.service, source)

    def stalled_commit(self, kind: str) -> None:
        """Count a commit refused for a key holding ``kind`` (see ``WrongKind``)."""
        self._stalled_commits.labels(self.service, kind).inc()

    def counts(self) -> dict[str, float]:
        """This service's event counters as numbers (for status pages and tests)."""
        return {
            "applied": self.applied._value.get(),
            "duplicates": self.duplicates._value.get(),
            "gaps": self.gaps._value.get(),
            "invalid": self.invalid._value.get(),
            "redriven": self.redriven._value.get(),
            "reordered": self.reordered._value.get(),
            "timers": self.timers._value.get(),
            "restored": self.restored._value.get(),
            "retired": self.retired._value.get(),
            "store_losses": self.store_losses._value.get(),
            "unrecorded_starts": self.unrecorded._value.get(),
            "rebuilt": self.rebuilt._value.get(),
        }
