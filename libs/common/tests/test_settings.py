"""Settings: environment with the PUMPFLOW_ prefix; bad values name their variable."""

from __future__ import annotations

import pytest
from pydantic import Field, ValidationError

from pumpflow.common.runtime.settings import CommonSettings, SettingsError


class ExampleSettings(CommonSettings):
    example_batch_size: int = Field(100, ge=1, description="events per batch")


def test_defaults_and_environment(monkeypatch):
    monkeypatch.setenv("PUMPFLOW_PARTITIONS", "8")
    monkeypatch.setenv("PUMPFLOW_TRANSPORT", "memory")
    monkeypatch.setenv("PUMPFLOW_EXAMPLE_BATCH_SIZE", "7")
    settings = ExampleSettings.load(service="example", replica="r9")
    assert settings.partitions == 8
    assert settings.transport == "memory"
    assert settings.example_batch_size == 7
    assert settings.namespace == "pumpflow"
    assert settings.source == "example/r9"


def test_replicas_get_distinct_default_ids():
    replica = CommonSettings.load().replica
    assert replica and "-" in replica


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("PUMPFLOW_PARTITIONS", "many", "valid integer"),
        ("PUMPFLOW_PARTITIONS", "0", "greater than or equal to 1"),
        ("PUMPFLOW_TRANSPORT", "kafka", "'memory' or 'rabbitmq'"),
        ("PUMPFLOW_NAMESPACE", "Bad-Name", "should match pattern"),
        ("PUMPFLOW_HTTP_PORT", "70000", "less than or equal to 65535"),
        ("PUMPFLOW_DRAIN_TIMEOUT_S", "-1", "greater than 0"),
        ("PUMPFLOW_EXAMPLE_BATCH_SIZE", "0", "greater than or equal to 1"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_reason(monkeypatch, variable, value, reason):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        ExampleSettings.load()
    message = str(caught.value)
    assert f"{variable}: " in message
    assert reason in message


def test_every_bad_variable_is_named_at_once(monkeypatch):
    monkeypatch.setenv("PUMPFLOW_PARTITIONS", "x")
    monkeypatch.setenv("PUMPFLOW_LOG_FORMAT", "xml")
    with pytest.raises(SettingsError) as caught:
        CommonSettings.load()
    assert "PUMPFLOW_PARTITIONS" in str(caught.value)
    assert "PUMPFLOW_LOG_FORMAT" in str(caught.value)


def test_settings_are_frozen():
    settings = CommonSettings.load()
    with pytest.raises(ValidationError):
        settings.partitions = 3
