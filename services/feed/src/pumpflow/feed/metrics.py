"""Prometheus metrics of the feed."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from pumpflow.common.pumpportal import FrameKind


class FeedMetrics:
    """Counters and gauges; children of labelled metrics are bound once (hot path)."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY):
        self.frames = Counter(
            "pumpflow_feed_frames_total", "Frames received, by kind", ["kind"], registry=registry
        )
        self.frames_by_kind = {kind: self.frames.labels(kind.value) for kind in FrameKind}
        self.invalid_frames = Counter(
            "pumpflow_feed_invalid_frames_total", "Frames that failed validation",
            registry=registry,
        )  # fmt: skip
        self.bytes_received = Counter(
            "pumpflow_feed_bytes_received_total", "Bytes of frames received", registry=registry
        )
        self.reconnects = Counter(
            "pumpflow_feed_reconnects_total", "Connections re-established", registry=registry
        )
        self.connected = Gauge(
            "pumpflow_feed_connected", "1 while the socket is connected", registry=registry
        )
        self.active_subscriptions = Gauge(
            "pumpflow_feed_active_subscriptions", "Mints whose trades are subscribed",
            registry=registry,
        )  # fmt: skip
        self.subscribe_messages = Counter(
            "pumpflow_feed_subscribe_messages_total", "Subscription messages sent, by method",
            ["method"], registry=registry,
        )  # fmt: skip
        self.duplicates = Counter(
            "pumpflow_feed_duplicates_total", "Token events dropped as duplicate signatures",
            registry=registry,
        )  # fmt: skip
        self.published = Counter(
            "pumpflow_feed_events_published_total", "Token events published", registry=registry
        )
        self.recorded = Counter(
            "pumpflow_feed_events_recorded_total", "Token events stored", registry=registry
        )
        self.record_errors = Counter(
            "pumpflow_feed_record_errors_total", "Failed writes of event batches",
            registry=registry,
        )  # fmt: skip
        self.record_pending = Gauge(
            "pumpflow_feed_record_pending", "Events waiting to be stored", registry=registry
        )


_default: FeedMetrics | None = None


def default_metrics() -> FeedMetrics:
    """The process-wide metrics on the default registry (what /metrics serves)."""
    global _default
    if _default is None:
        _default = FeedMetrics()
    return _default
