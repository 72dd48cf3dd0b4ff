"""Metrics of the activity service, on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from pumpflow.common.metrics import families


class _Families:
    def __init__(self, registry: CollectorRegistry):
        self.transitions = Counter(
            "pumpflow_activity_transitions",
            "Lifecycle transitions, by new state",
            ["state"],
            registry=registry,
        )
        self.recommendations = Counter(
            "pumpflow_activity_priority_recommendations",
            "Priority changes published without a transition",
            registry=registry,
        )
        self.feed_commands = Counter(
            "pumpflow_activity_feed_commands",
            "feed.subscription commands published",
            ["action"],
            registry=registry,
        )
        self.feed_mints = Counter(
            "pumpflow_activity_feed_command_mints",
            "Mints in feed.subscription commands",
            ["action"],
            registry=registry,
        )
        self.tokens = Gauge(
            "pumpflow_activity_tokens",
            "Tokens held in memory, by state",
            ["state"],
            registry=registry,
        )


class ActivityServiceMetrics:
    """Transitions, recommendations, feed commands and tokens by state.

    Per-event series (applied, duplicates, timers, commits) are the keyed consumer's.
    """

    def __init__(self, *, registry: CollectorRegistry | None = None):
        self._f = families("activity", _Families, registry)
        self.recommendations = self._f.recommendations

    def transition(self, state: str) -> None:
        self._f.transitions.labels(state).inc()

    def transitions(self, state: str) -> float:
        return self._f.transitions.labels(state)._value.get()

    def feed_command(self, action: str, mints: int) -> None:
        self._f.feed_commands.labels(action).inc()
        self._f.feed_mints.labels(action).inc(mints)

    def feed_commands(self, action: str) -> float:
        return self._f.feed_commands.labels(action)._value.get()

    def tokens(self, counts: dict[str, int]) -> None:
        for state, count in counts.items():
            self._f.tokens.labels(state).set(count)
