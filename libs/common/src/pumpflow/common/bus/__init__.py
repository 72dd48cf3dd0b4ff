"""Event bus: one interface, two transports (in-memory and RabbitMQ).

``RabbitMQBus`` is imported lazily (``pumpflow.common.bus.rabbitmq``) so that the
embedded mode does not load aio-pika; :func:`create_bus` picks the transport.
"""

from pumpflow.common.bus.abc import (
    DeadLetter,
    EventBus,
    EventPublisher,
    EventSubscriber,
    Handler,
    Subscription,
)
from pumpflow.common.bus.dispatch import Dispatcher
from pumpflow.common.bus.eventlog import EventLog
from pumpflow.common.bus.factory import BusConfig, create_bus
from pumpflow.common.bus.idempotency import Sequencer
from pumpflow.common.bus.memory import InMemoryBus
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
    "BusConfig",
    "DeadLetter",
    "Dispatcher",
    "EventBus",
    "EventLog",
    "EventPublisher",
    "EventSubscriber",
    "Handler",
    "InMemoryBus",
    "RabbitMQBus",
    "Sequencer",
    "Subscription",
    "create_bus",
    "partition_of",
    "resolve_types",
    "routing_key",
    "routing_key_for",
    "topic_matches",
]


def __getattr__(name: str):
    if name == "RabbitMQBus":
        from pumpflow.common.bus.rabbitmq import RabbitMQBus

        return RabbitMQBus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
