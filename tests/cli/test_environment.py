"""A ``PUMPFLOW_`` variable that names no setting is refused before any command runs,
naming the setting it is closest to; one meant for a service this process does not hold
(an image holds one service, an env file serves them all) is that service's to judge."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from pumpflow.cli import main as cli_main
from pumpflow.cli.notify import NotifySettings
from pumpflow.common.runtime.discovery import installed_services, load_service
from pumpflow.common.runtime.settings import SERVICES, CommonSettings, check_environment

ROOT = Path(__file__).resolve().parents[2]
PUMPFLOW = Path(sys.executable).with_name("pumpflow")
TYPO = "PUMPFLOW_TRADING_MAX_CONCURENT_POSITIONS"


def test_a_misspelt_setting_stops_the_command_naming_it_and_the_setting_meant():
    env = {**os.environ, TYPO: "2"}
    result = subprocess.run(
        [str(PUMPFLOW), "settings", "trading"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:]
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"pumpflow: unknown variable {TYPO} (did you mean "
        "PUMPFLOW_TRADING_MAX_CONCURRENT_POSITIONS?): every PUMPFLOW_ variable names a "
        "setting (pumpflow settings <service> lists them)"
    )


def test_every_unknown_variable_is_named_at_once_and_nothing_runs(monkeypatch, capsys):
    monkeypatch.setenv("PUMPFLOW_PARTITONS", "8")
    monkeypatch.setenv("pumpflow_exit_deadline", "30")  # read whatever its case
    assert cli_main.main(["services"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "unknown variables PUMPFLOW_PARTITONS (did you mean PUMPFLOW_PARTITIONS?), " in (
        captured.err
    )
    assert "pumpflow_exit_deadline (did you mean PUMPFLOW_EXIT_DEADLINE_S?)" in captured.err


def test_settings_of_every_service_and_the_projects_own_variables_pass(monkeypatch, capsys):
    # an env file shared by the services: each one's settings, and the model's read of
    # trading's entry score
    monkeypatch.setenv("PUMPFLOW_EXIT_DEADLINE_S", "30")
    monkeypatch.setenv("PUMPFLOW_FEED_RECORD", "false")
    monkeypatch.setenv("PUMPFLOW_TRADING_MIN_SCORE", "0.55")
    monkeypatch.setenv("PUMPFLOW_NOTIFY_INTERVAL_S", "5")
    # the CLI's own, and the test suite's (CI sets the first)
    for variable in ("PUMPFLOW_REQUIRE_TOOLS", "PUMPFLOW_EXIT_URL", "PUMPFLOW_TEST_AMQP_URL"):
        monkeypatch.setenv(variable, os.environ.get(variable, "1"))
    assert cli_main.main(["settings", "model", "--json"]) == 0, capsys.readouterr().err


def test_a_process_leaves_the_settings_of_a_service_it_does_not_hold_to_that_service(
    monkeypatch, capsys
):
    """The feed's image holds the feed alone, and compose hands it the env file every
    service reads: the exit's settings there are the exit's to judge."""
    monkeypatch.setattr(
        cli_main, "service_settings", lambda: {"feed": load_service("feed").settings_class}
    )
    monkeypatch.setenv("PUMPFLOW_EXIT_DEADLINE_S", "30")
    monkeypatch.setenv("PUMPFLOW_EXIT_DEADLNE_S", "30")
    assert cli_main.main(["settings", "feed", "--json"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    # a typo of the feed's own, or of a common setting, is the feed's to refuse
    monkeypatch.setenv("PUMPFLOW_FEED_RECORDS", "false")
    monkeypatch.setenv("PUMPFLOW_LOGLEVEL", "DEBUG")
    assert cli_main.main(["settings", "feed", "--json"]) == 2
    err = capsys.readouterr().err
    assert "PUMPFLOW_FEED_RECORDS (did you mean PUMPFLOW_FEED_RECORD?)" in err
    assert "PUMPFLOW_LOGLEVEL (did you mean PUMPFLOW_LOG_LEVEL?)" in err
    assert "EXIT_DEADLNE" not in err


def test_the_services_each_own_the_settings_named_after_them():
    """What lets a process with one service's settings judge an environment every service
    reads: a setting of a service's own, under no service's name, would be refused by the
    others."""
    assert set(SERVICES) == set(installed_services())
    owned = tuple(f"PUMPFLOW_{name.upper()}_" for name in SERVICES)
    common = set(CommonSettings.model_fields)
    for name in SERVICES:
        settings = load_service(name).settings_class
        variables = settings.variables()
        for field in set(settings.model_fields) - common:
            # its own, another service's it reads too (the model: trading's entry score),
            # or one read under a name of its own (PUMPPORTAL_API_KEY)
            variable = variables[field]
            assert variable.startswith(owned) or not variable.startswith("PUMPFLOW_"), variable


#: what the project's code, deployment, scripts, CI and docs are (its tests' own
#: settings classes and the misspellings tests make aside)
SOURCES = ("libs/*/src", "services/*/src", "src", "scripts", "benchmarks", "deploy", ".ci", "docs")
FILES = ("docker-compose.yml", "Makefile", "README.md")


def project_texts():
    for pattern in SOURCES:
        for folder in ROOT.glob(pattern):
            for path in folder.rglob("*"):
                if path.is_file() and path.suffix not in {".onnx", ".png", ".svg"}:
                    yield path.read_text(errors="replace")
    for name in FILES:
        yield (ROOT / name).read_text()


def test_every_variable_the_project_names_passes():
    named = set()
    for text in project_texts():
        named.update(re.findall(r"\bPUMPFLOW_[A-Z0-9_]*[A-Z0-9]\b", text))
    # the test suite's and CI's, the config file's, the CLI's own
    assert {
        "PUMPFLOW_REQUIRE_TOOLS", "PUMPFLOW_FAULT_REPORT", "PUMPFLOW_TEST_POSTGRES_DSN",
        "PUMPFLOW_CONFIG_FILE", "PUMPFLOW_REPORTS_DIR", "PUMPFLOW_TRADING_URL",
    } <= named  # fmt: skip
    check_environment(
        {**cli_main.service_settings(), "notify": NotifySettings},
        others=cli_main.CLI_VARIABLES,
        environ=dict.fromkeys(named, "1"),
    )
