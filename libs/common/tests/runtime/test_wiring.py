"""The runtime turns settings into the bus's frozen configs."""

from __future__ import annotations

import pytest

from pumpflow.common.bus import BusConfig, create_bus
from pumpflow.common.bus.ownership import OwnershipConfig
from pumpflow.common.runtime.settings import CommonSettings, SettingsError
from pumpflow.common.runtime.wiring import bus_config, ownership_config


def test_bus_config_follows_the_settings():
    settings = CommonSettings(
        service="svc",
        replica="r1",
        transport="rabbitmq",
        amqp_url="amqp://u:p@broker:5672/",
        namespace="abc",
        partitions=8,
        prefetch=7,
        event_log="sampled",
        event_log_sample_rate=0.5,
    )
    assert bus_config(settings) == BusConfig(
        transport="rabbitmq",
        source="svc/r1",
        partitions=8,
        event_log="sampled",
        event_log_sample_rate=0.5,
        amqp_url="amqp://u:p@broker:5672/",
        namespace="abc",
        prefetch=7,
    )
    memory = create_bus(bus_config(CommonSettings(transport="memory", partitions=4)))
    assert memory.describe()["transport"] == "memory" and memory.partitions == 4


def test_heartbeat_settings_have_defaults_and_are_checked():
    settings = CommonSettings()
    assert settings.balance_partitions is True
    assert ownership_config(settings) == OwnershipConfig(
        heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0
    )
    quick = CommonSettings(heartbeat_interval_s=0.2, heartbeat_ttl_s=0.8)
    assert ownership_config(quick) == OwnershipConfig(heartbeat_interval_s=0.2, heartbeat_ttl_s=0.8)
    with pytest.raises(SettingsError, match="PUMPFLOW_HEARTBEAT_TTL_S"):
        CommonSettings.load(heartbeat_interval_s=2.0, heartbeat_ttl_s=2.0)
