"""Event bus: one interface, two transports (in-memory and RabbitMQ)."""

from pumpflow.common.bus.abc import (
    DeadLetter,
    EventBus,
    EventPublisher,
    EventSubscriber,
    Handler,
    Subscription,
)
from pumpflow.common.bus.idempotency import Sequencer, SeqTracker, Verdict
from pumpflow.common.bus.routing import (
    DEFAULT_PARTITIONS,
    partition_of,
    resolve_types,
    routing_key,
    routing_key_for,
    topic_matches,
)

__all__ = [
    "DEFAULT_PARTITIONS",
    "DeadLetter",
    "EventBus",
    "EventPublisher",
    "EventSubscriber",
    "Handler",
    "SeqTracker",
    "Sequencer",
    "Subscription",
    "Verdict",
    "partition_of",
    "resolve_types",
    "routing_key",
    "routing_key_for",
    "topic_matches",
]
