"""What the runtime builds from settings for the bus: its config and its ownership config.

The bus takes frozen configs only, so it never depends on the runtime's settings.
"""

from __future__ import annotations

from pumpflow.common.bus.factory import BusConfig
from pumpflow.common.bus.ownership import OwnershipConfig
from pumpflow.common.runtime.settings import CommonSettings


def bus_config(settings: CommonSettings) -> BusConfig:
    """The bus of ``settings.transport`` for this replica."""
    return BusConfig(
        transport=settings.transport,
        source=settings.source,
        partitions=settings.partitions,
        event_log=settings.event_log,
        event_log_sample_rate=settings.event_log_sample_rate,
        amqp_url=settings.amqp_url,
        namespace=settings.namespace,
        prefetch=settings.prefetch,
    )


def ownership_config(settings: CommonSettings) -> OwnershipConfig:
    """How often replicas heartbeat and how long a heartbeat keeps one alive."""
    return OwnershipConfig(
        heartbeat_interval_s=settings.heartbeat_interval_s,
        heartbeat_ttl_s=settings.heartbeat_ttl_s,
    )
