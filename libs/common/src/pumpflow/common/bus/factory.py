"""Build the bus a service runs on from its settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pumpflow.common.bus.abc import EventBus
from pumpflow.common.bus.eventlog import EventLog

if TYPE_CHECKING:
    from pumpflow.common.runtime.settings import CommonSettings


def create_bus(settings: CommonSettings) -> EventBus:
    """Return an unstarted bus of ``settings.transport`` (``memory`` or ``rabbitmq``)."""
    event_log = EventLog(settings.event_log, settings.event_log_sample_rate)
    if settings.transport == "memory":
        from pumpflow.common.bus.memory import InMemoryBus

        return InMemoryBus(
            partitions=settings.partitions, source=settings.source, event_log=event_log
        )
    if settings.transport == "rabbitmq":
        # imported here so the embedded mode never needs aio-pika loaded
        from pumpflow.common.bus.rabbitmq import RabbitMQBus

        return RabbitMQBus(
            url=settings.amqp_url,
            namespace=settings.namespace,
            partitions=settings.partitions,
            prefetch=settings.prefetch,
            source=settings.source,
            event_log=event_log,
        )
    raise ValueError(f"unknown bus transport {settings.transport!r}")
