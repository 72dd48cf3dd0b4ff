"""Settings: environment with the PUMPFLOW_ prefix; bad values name their variable."""

from __future__ import annotations

import pytest
from pydantic import Field, ValidationError

from pumpflow.common.runtime.settings import CommonSettings, SettingsError, check_environment


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
        ("PUMPFLOW_LOG_LEVEL", "verbose", "should match pattern"),
        ("PUMPFLOW_EXAMPLE_BATCH_SIZE", "0", "greater than or equal to 1"),
        # a URL its client cannot read would pass for a server away, retried for ever
        ("PUMPFLOW_POSTGRES_DSN", "host=db dbname=test", "postgresql:// or postgres://"),
        ("PUMPFLOW_AMQP_URL", "guest:guest@127.0.0.1:5672", "amqp:// or amqps://"),
        ("PUMPFLOW_REDIS_URL", "127.0.0.1:6379", "redis://, rediss:// or unix://"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_reason(monkeypatch, variable, value, reason):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        ExampleSettings.load()
    message = str(caught.value)
    assert f"{variable}: " in message
    assert reason in message


class ListSettings(CommonSettings):
    example_weights: list[float] = Field(default_factory=list, description="JSON list")


def test_a_bad_item_of_a_list_names_the_variable_and_the_item(monkeypatch):
    """Not a variable of the item's place (``PUMPFLOW_EXAMPLE_WEIGHTS_1``, none such)."""
    monkeypatch.setenv("PUMPFLOW_EXAMPLE_WEIGHTS", '[0.5, "x"]')
    with pytest.raises(SettingsError, match=r"PUMPFLOW_EXAMPLE_WEIGHTS\[1\]: Input should"):
        ListSettings.load()


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


# ------------------------------------------------------------------ the config file


def write_config(tmp_path, text: str):
    path = tmp_path / "pumpflow.toml"
    path.write_text(text)
    return path


def test_config_file_common_then_service_table_then_environment_then_code(monkeypatch, tmp_path):
    path = write_config(
        tmp_path,
        "[common]\npartitions = 8\nlog_level = 'DEBUG'\nprefetch = 32\n"
        "[example]\nexample_batch_size = 5\nprefetch = 64\n"
        "[other]\nexample_batch_size = 9\n",
    )
    monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", str(path))
    monkeypatch.setenv("PUMPFLOW_LOG_LEVEL", "WARNING")
    settings = ExampleSettings.load(service="example", partitions=4)
    assert settings.example_batch_size == 5  # the service's table, not [other]'s
    assert settings.prefetch == 64  # the service's table over [common]
    assert settings.log_level == "WARNING"  # the environment over the file
    assert settings.partitions == 4  # the code over both
    assert ExampleSettings.load(service="other").example_batch_size == 9
    assert ExampleSettings.load(service="third").prefetch == 32


def test_a_commands_own_defaults_yield_to_the_environment_and_the_file(monkeypatch, tmp_path):
    path = write_config(tmp_path, "[common]\nprefetch = 32\n")
    monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", str(path))
    monkeypatch.setenv("PUMPFLOW_EXAMPLE_BATCH_SIZE", "7")
    defaults = {"example_batch_size": 50, "prefetch": 16, "partitions": 2}
    settings = ExampleSettings.load_with_defaults(defaults, service="example")
    assert settings.example_batch_size == 7  # the environment over the command's default
    assert settings.prefetch == 32  # the file over the command's default
    assert settings.partitions == 2  # the command's default over the setting's
    given = ExampleSettings.load_with_defaults(defaults, service="example", example_batch_size=3)
    assert given.example_batch_size == 3  # the code (a flag) over all


def test_config_file_key_of_no_setting_is_named(monkeypatch, tmp_path):
    path = write_config(tmp_path, "[example]\nexample_batch_sise = 5\n")
    monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", str(path))
    with pytest.raises(SettingsError, match=r"\[example\] has no setting named example_batch_sise"):
        ExampleSettings.load(service="example")
    # a service's own setting is not a common one
    path.write_text("[common]\nexample_batch_size = 5\n")
    with pytest.raises(SettingsError, match=r"\[common\] has no setting named example_batch_size"):
        ExampleSettings.load(service="example")


def test_config_file_bad_value_names_its_key_table_and_file(monkeypatch, tmp_path):
    path = write_config(tmp_path, "[example]\nexample_batch_size = 0\n")
    monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", str(path))
    with pytest.raises(SettingsError) as caught:
        ExampleSettings.load(service="example")
    assert f"example_batch_size in [example] of {path}: " in str(caught.value)
    assert "greater than or equal to 1" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[example\n", "not TOML"),
        ("partitions = 8\n", "'partitions' is not a table"),
        ("[exampel]\nprefetch = 1\n", "no service named [exampel] (tables: common, example)"),
    ],
)
def test_config_file_checked_against_every_service(tmp_path, text, reason):
    from pumpflow.common.runtime.settings import check_config_file

    path = write_config(tmp_path, text)
    with pytest.raises(SettingsError) as caught:
        check_config_file(path, {"example": ExampleSettings})
    assert reason in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_log_level_logging_has_not_is_refused_up_front_naming_its_key(tmp_path):
    """Checked with the file, not when a service configures its logging, where it was
    named as PUMPFLOW_LOG_LEVEL, a variable nobody set."""
    from pumpflow.common.runtime.settings import check_config_file

    path = write_config(tmp_path, "[common]\nlog_level = 'verbose'\n")
    with pytest.raises(SettingsError, match=r"\[common\] log_level: String should match"):
        check_config_file(path, {"example": ExampleSettings})
    for level in ("debug", "INFO", "Warning", "WARN", "error", "CRITICAL"):
        path.write_text(f"[common]\nlog_level = '{level}'\n")
        check_config_file(path, {"example": ExampleSettings})


def test_a_consumer_group_no_service_runs_is_refused_naming_its_variable(monkeypatch, tmp_path):
    """Checked with the settings (the config file's up-front check too), not first where
    a replica declares the groups once connected, exiting 1 without naming it."""
    from pumpflow.common.runtime.settings import check_config_file

    monkeypatch.setenv("PUMPFLOW_CONSUMER_GROUPS", "features, activty")
    with pytest.raises(SettingsError, match=r"PUMPFLOW_CONSUMER_GROUPS: .*'activty'"):
        CommonSettings.load()
    monkeypatch.setenv("PUMPFLOW_CONSUMER_GROUPS", "features, exit-control")
    assert CommonSettings.load().consumer_group_names == ["features", "exit-control"]
    path = write_config(tmp_path, "[common]\nconsumer_groups = 'trading,exits'\n")
    with pytest.raises(SettingsError, match=r"\[common\] consumer_groups: .*'exits'"):
        check_config_file(path, {"example": ExampleSettings})


def test_an_empty_value_unsets_a_setting_that_may_be_unset_in_the_file_too(monkeypatch, tmp_path):
    """``dependency_wait_s = ""`` (TOML has no null) passes the file's up-front check and
    reads unset, as the empty variable does; a list or mapping given as text that is no
    JSON is refused naming its key."""
    from pumpflow.common.runtime.settings import check_config_file

    path = write_config(tmp_path, "[common]\ndependency_wait_s = ''\nconsumer_groups = ''\n")
    check_config_file(path, {"example": ExampleSettings})
    monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", str(path))
    settings = ExampleSettings.load(service="example")
    assert settings.dependency_wait_s is None
    # unset: every group, not none of them
    assert settings.consumer_group_names is None

    class Listed(ExampleSettings):
        example_names: tuple[str, ...] = Field((), description="names (JSON list)")

    path.write_text("[example]\nexample_names = 'a,b'\n")
    with pytest.raises(SettingsError, match=r"\[example\] example_names: not JSON"):
        check_config_file(path, {"example": Listed})


def test_missing_config_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", str(tmp_path / "absent.toml"))
    with pytest.raises(SettingsError, match=r"absent\.toml: No such file"):
        ExampleSettings.load()


class ExitLikeSettings(CommonSettings):
    exit_deadline_s: float = Field(60.0, gt=0, description="a setting of the exit service's")


def test_a_variable_of_no_setting_is_refused_naming_the_closest():
    environ = {
        "PUMPFLOW_EXAMPLE_BATCH_SIZ": "7",
        "PUMPFLOW_PARTITONS": "8",
        "PUMPFLOW_SOMETHING_ELSE": "1",
        "PUMPFLOW_EXAMPLE_BATCH_SIZE": "7",
        "PUMPFLOW_CONFIG_FILE": "pumpflow.toml",
        "PUMPFLOW_REPORTS_DIR": "reports",
        "PATH": "/usr/bin",
    }
    with pytest.raises(SettingsError) as caught:
        check_environment({"example": ExampleSettings}, others=["PUMPFLOW_REPORTS_DIR"],
                          environ=environ)  # fmt: skip
    assert str(caught.value).startswith(
        "unknown variables PUMPFLOW_EXAMPLE_BATCH_SIZ (did you mean "
        "PUMPFLOW_EXAMPLE_BATCH_SIZE?), PUMPFLOW_PARTITONS (did you mean "
        "PUMPFLOW_PARTITIONS?), PUMPFLOW_SOMETHING_ELSE: "
    )


def test_a_variable_of_a_service_held_elsewhere_is_that_services_to_judge():
    """A process with the exit's settings judges them; one without leaves them to it."""
    environ = {"PUMPFLOW_EXIT_DEADLINE_S": "30", "pumpflow_exit_deadlne_s": "30"}
    check_environment({"example": ExampleSettings}, environ=environ)
    with pytest.raises(SettingsError, match=r"variable pumpflow_exit_deadlne_s \(did you "
                       r"mean PUMPFLOW_EXIT_DEADLINE_S\?\)"):  # fmt: skip
        check_environment({"exit": ExitLikeSettings}, environ=environ)


def test_a_bad_servers_url_is_refused_without_echoing_it(monkeypatch):
    """A URL may hold a password: the refusal names its scheme, not the URL."""
    monkeypatch.setenv("PUMPFLOW_POSTGRES_DSN", "postgresq://admin:s3cret@db/test")
    with pytest.raises(SettingsError) as caught:
        CommonSettings.load()
    assert "'postgresq'" in str(caught.value)
    assert "s3cret" not in str(caught.value)
