"""Build a bus from a description of it; the runtime derives one from its settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pumpflow.common.bus.abc import EventBus
from pumpflow.common.bus.eventlog import EventLog, EventLogMode
from pumpflow.common.bus.journal import DeliveryJournal
from pumpflow.common.bus.routing import DEFAULT_PARTITIONS

Transport = Literal["memory", "rabbitmq"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BusConfig:
    """Which transport to build and how."""

    transport: Transport
    #: event source of this replica, ``<service>/<replica>``
    source: str
    partitions: int = DEFAULT_PARTITIONS
    event_log: EventLogMode = "none"
    event_log_sample_rate: float = 0.01
    #: RabbitMQ only; kept out of repr, it may carry a password
    amqp_url: str = field(default="amqp://guest:guest@127.0.0.1:5672/", repr=False)
    namespace: str = "pumpflow"
    prefetch: int = 256
    #: RabbitMQ only: tries of the first connection before ``start`` raises
    connect_attempts: int = 30


def create_bus(config: BusConfig, *, journal: DeliveryJournal | None = None) -> EventBus:
    """Return an unstarted bus of ``config.transport`` (``memory`` or ``rabbitmq``).

    ``journal``: where RabbitMQ counts redeliveries (a store the replicas share); the
    in-memory bus counts them itself.
    """
    event_log = EventLog(config.event_log, config.event_log_sample_rate)
    if config.transport == "memory":
        from pumpflow.common.bus.memory import InMemoryBus

        return InMemoryBus(partitions=config.partitions, source=config.source, event_log=event_log)
    if config.transport == "rabbitmq":
        # imported here so the embedded mode never needs aio-pika loaded
        from pumpflow.common.bus.rabbitmq import RabbitMQBus

        return RabbitMQBus(
            url=config.amqp_url,
            namespace=config.namespace,
            partitions=config.partitions,
            prefetch=config.prefetch,
            source=config.source,
            event_log=event_log,
            connect_attempts=config.connect_attempts,
            journal=journal,
        )
    raise ValueError(f"unknown bus transport {config.transport!r}")
