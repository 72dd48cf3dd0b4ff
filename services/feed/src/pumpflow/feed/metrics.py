"""Prometheus metrics of the feed, on an injected registry."""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from pumpflow.common.pumpportal import FrameKind


class PlainCounter:
    """A counter of the per-frame path: a plain int, exposed by :class:`_PlainCounters`
    when Prometheus scrapes (a prometheus-client counter costs about 0.4 us an ``inc``
    here, and a frame took three: over a tenth of the feed's time per frame)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class _PlainCounters(Collector):
    """The feed's plain counters as Prometheus counter families."""

    def __init__(self, metrics: FeedMetrics):
        # weak: the registry outlives a feed's metrics in tests that make many
        self._metrics = weakref.ref(metrics)

    def describe(self) -> Iterator[Metric]:
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._metrics())

    @staticmethod
    def _families(metrics: FeedMetrics | None) -> Iterator[Metric]:
        frames = CounterMetricFamily(
            "pumpflow_feed_frames_total", "Frames received, by kind", labels=["kind"]
        )
        received = CounterMetricFamily(
            "pumpflow_feed_bytes_received_total", "Bytes of frames received"
        )
        published = CounterMetricFamily(
            "pumpflow_feed_events_published_total", "Token events published"
        )
        if metrics is not None:
            for kind, counter in metrics.frames_by_kind.items():
                frames.add_metric([kind.value], counter.value)
            received.add_metric([], metrics.bytes_received.value)
            published.add_metric([], metrics.published.value)
        yield from (frames, received, published)


class FeedMetrics:
    """Counters and gauges; children of labelled metrics are bound once (hot path).

    ``registry=None`` keeps them unregistered (a tool that serves no /metrics). Code
    that registers them goes through :meth:`for_registry`, so feeds sharing a registry
    (replicas in one process) share the series instead of registering them twice.
    """

    def __init__(self, registry: CollectorRegistry | None):
        #: frames received by kind, bytes received and events published: counted per
        #: frame, so plain ints (same series as prometheus-client counters)
        self.frames_by_kind = {kind: PlainCounter() for kind in FrameKind}
        self.invalid_frames = Counter(
            "pumpflow_feed_invalid_frames_total", "Frames that failed validation",
            registry=registry,
        )  # fmt: skip
        self.bytes_received = PlainCounter()
        self.reconnects = Counter(
            "pumpflow_feed_reconnects_total", "Connections re-established", registry=registry
        )
        self.connected = Gauge(
            "pumpflow_feed_connected", "1 while the socket is connected", registry=registry
        )
        self.active_subscriptions = Gauge(
            "pumpflow_feed_active_subscriptions",
            "Mints whose trades are subscribed on the PumpPortal connection (0 on a replica "
            "without it)",
            registry=registry,
        )
        self.trade_stream_refused = Gauge(
            "pumpflow_feed_trade_stream_refused",
            "1 while PumpPortal refuses the connection's trade subscriptions (an API key "
            "not funded with 0.02 SOL: no token or wallet trade streams, and trading halts "
            "its entries); 0 once one is accepted, or on a replica without the connection",
            registry=registry,
        )
        self.refused_retests = Counter(
            "pumpflow_feed_refused_retests_total",
            "Connections closed to re-test the API key while PumpPortal refuses the trade "
            "subscriptions (every PUMPFLOW_FEED_REFUSED_RETEST_S; each a reconnect too)",
            registry=registry,
        )
        self.subscribe_messages = Counter(
            "pumpflow_feed_subscribe_messages_total", "Subscription messages sent, by method",
            ["method"], registry=registry,
        )  # fmt: skip
        self.duplicates = Counter(
            "pumpflow_feed_duplicates_total",
            "Token events dropped as duplicate signatures: seen here already, or stored "
            "already as another event (another writer of the schema), not published",
            registry=registry,
        )  # fmt: skip
        self.unled_frames = Counter(
            "pumpflow_feed_unled_frames_total",
            "Frames taken past the feed lease's deadline (a stalled process; another "
            "replica may hold the feed): neither numbered nor published",
            registry=registry,
        )
        self.superseded_events = Counter(
            "pumpflow_feed_superseded_events_total",
            "Events numbered while the replica held the feed's lease and stored after "
            "another took it over (their seqs are the other's by then): stored without "
            "seqs, not published",
            registry=registry,
        )
        self.unsubscribed_trades = Counter(
            "pumpflow_feed_unsubscribed_trades_total",
            "Trades of mints the feed had not subscribed to: stored, not published",
            registry=registry,
        )
        self.published = PlainCounter()
        self.recorded = Counter(
            "pumpflow_feed_events_recorded_total", "Token events stored", registry=registry
        )
        self.record_errors = Counter(
            "pumpflow_feed_record_errors_total", "Failed writes of event batches",
            registry=registry,
        )  # fmt: skip
        self.record_stage = Histogram(
            "pumpflow_feed_record_stage_seconds",
            "Per write batch, by stage: wait (its oldest event queued before the write "
            "began), store, publish (confirms included), mark (the outbox position)",
            ["stage"],
            buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
                     0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )  # fmt: skip
        self.record_wait = self.record_stage.labels("wait")
        self.record_store = self.record_stage.labels("store")
        self.record_publish = self.record_stage.labels("publish")
        self.record_mark = self.record_stage.labels("mark")
        self.record_pending = Gauge(
            "pumpflow_feed_record_pending", "Events waiting to be stored", registry=registry
        )
        self.record_reader_wait = Counter(
            "pumpflow_feed_record_reader_wait_seconds_total",
            "Seconds the socket reader waited for room among the events to store (the market "
            "goes unread meanwhile)",
            registry=registry,
        )
        self.record_rejected = Counter(
            "pumpflow_feed_record_rejected_total",
            "Token events the store refused: dead-lettered with its reason",
            registry=registry,
        )
        self.frame_errors = Counter(
            "pumpflow_feed_frame_errors_total",
            "Frames whose handling failed unexpectedly: dead-lettered, the session goes on",
            registry=registry,
        )
        self.dead_letters_pending = Gauge(
            "pumpflow_feed_dead_letters_pending", "Dead letters waiting for the broker's confirm",
            registry=registry,
        )  # fmt: skip
        self.dead_letters_sent = Counter(
            "pumpflow_feed_dead_letters_sent_total", "Dead letters confirmed by the broker",
            registry=registry,
        )  # fmt: skip
        self.dead_letters_dropped = Counter(
            "pumpflow_feed_dead_letters_dropped_total",
            "Dead letters dropped because their queue was full (the reader never waits)",
            registry=registry,
        )
        self.pruned = Counter(
            "pumpflow_feed_pruned_total",
            "Rows the retention deleted (PUMPFLOW_FEED_RECORD_KEEP_DAYS), by table: "
            "token_events, tokens",
            ["table"], registry=registry,
        )  # fmt: skip
        self.pruned_events = self.pruned.labels("token_events")
        self.pruned_tokens = self.pruned.labels("tokens")
        self.prune_errors = Counter(
            "pumpflow_feed_prune_errors_total",
            "Prunes of old token events that failed (tried again at the next interval)",
            registry=registry,
        )
        if registry is not None:
            registry.register(_PlainCounters(self))

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> FeedMetrics:
        """The feed's metrics on ``registry``, created on first use."""
        metrics = _BY_REGISTRY.get(registry)
        if metrics is None:
            metrics = _BY_REGISTRY[registry] = cls(registry)
        return metrics


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, FeedMetrics] = (
    weakref.WeakKeyDictionary()
)
