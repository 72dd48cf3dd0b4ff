"""A setting that may be unset is unset by an empty variable (``PUMPFLOW_EXIT_MAX_HOLD_S=``,
as an env file or compose writes it): what its description says unset means (a rule off,
waiting for ever, every consumer group); a list or mapping set empty is an empty one.
Through the environment, as ``pumpflow settings`` and the services read it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pumpflow.cli import main as cli_main

PUMPFLOW = Path(sys.executable).with_name("pumpflow")


def settings_of(service: str, capsys) -> dict[str, object]:
    """``pumpflow settings <service> --json``: each variable's value."""
    status = cli_main.main(["settings", service, "--json"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    return {row["variable"]: row["value"] for row in json.loads(printed.out)}


@pytest.mark.parametrize(
    ("service", "variable", "unset"),
    [
        # documented "(empty: off)"; their siblings, optional rules too
        ("exit", "PUMPFLOW_EXIT_STOP_LOSS", None),
        ("exit", "PUMPFLOW_EXIT_MAX_HOLD_S", None),
        ("exit", "PUMPFLOW_EXIT_STALE_AFTER_S", None),
        ("exit", "PUMPFLOW_EXIT_QUIET_S", None),
        # documented "empty:" a default of their own
        ("model", "PUMPFLOW_MODEL_MODELS", {}),
        ("model", "PUMPFLOW_MODEL_ARMS", []),
        # documented "unset:" or None
        ("exit", "PUMPFLOW_DEPENDENCY_WAIT_S", None),
        ("exit", "PUMPFLOW_REPLAY_CLOCK_START", None),
        ("exit", "PUMPFLOW_CONSUMER_GROUPS", None),
        ("feed", "PUMPFLOW_FEED_SEQ_RESTORE_WINDOW_S", None),
        ("trading", "PUMPFLOW_TRADING_KEEP_TOKEN_VIEWS", None),
        ("trading", "PUMPFLOW_TRADING_NAME_BLOCKLIST", []),
        ("trading", "PUMPFLOW_TRADING_CREATOR_BLOCKLIST", []),
    ],
)
def test_an_empty_variable_means_what_its_setting_says_unset_means(
    monkeypatch, capsys, service, variable, unset
):
    monkeypatch.setenv(variable, "")
    assert settings_of(service, capsys)[variable] == unset


def test_an_empty_max_hold_turns_the_rule_off_in_pumpflow_settings_exit():
    env = {**os.environ, "PUMPFLOW_EXIT_MAX_HOLD_S": "", "PUMPFLOW_EXIT_STOP_LOSS": ""}
    result = subprocess.run(
        [str(PUMPFLOW), "settings", "exit", "--json"], env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    values = {row["variable"]: row["value"] for row in json.loads(result.stdout)}
    assert values["PUMPFLOW_EXIT_MAX_HOLD_S"] is None
    assert values["PUMPFLOW_EXIT_STOP_LOSS"] is None


def test_a_list_or_mapping_that_is_no_json_is_refused_naming_its_variable(monkeypatch, capsys):
    monkeypatch.setenv("PUMPFLOW_TRADING_NAME_BLOCKLIST", '["rug", "scam"]')
    assert settings_of("trading", capsys)["PUMPFLOW_TRADING_NAME_BLOCKLIST"] == ["rug", "scam"]
    monkeypatch.setenv("PUMPFLOW_MODEL_MODELS", "default=model.onnx")
    assert cli_main.main(["settings", "model", "--json"]) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert "PUMPFLOW_MODEL_MODELS: Value error, not JSON" in printed.err, printed.err
    assert "Traceback" not in printed.err


def test_an_empty_value_of_a_setting_that_cannot_be_unset_says_so(monkeypatch, capsys, tmp_path):
    """A number or a switch has no unset: an empty one is refused as empty, not as text
    that is no number."""
    monkeypatch.setenv("PUMPFLOW_TRADING_MIN_SCORE", "")
    assert cli_main.main(["settings", "trading", "--json"]) == 2
    err = capsys.readouterr().err
    assert "PUMPFLOW_TRADING_MIN_SCORE: Value error, empty, and it cannot be unset" in err, err
    assert "(default 0.6)" in err, err
    monkeypatch.delenv("PUMPFLOW_TRADING_MIN_SCORE")
    config = tmp_path / "pumpflow.toml"
    config.write_text("[trading]\ntrading_live_enabled = ''\n")
    monkeypatch.setenv("PUMPFLOW_CONFIG_FILE", str(config))
    assert cli_main.main(["settings", "trading"]) == 2
    err = capsys.readouterr().err
    assert "[trading] trading_live_enabled: empty, and it cannot be unset" in err, err
