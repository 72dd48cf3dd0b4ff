"""The exit service's settings: each one it defines does something."""

from __future__ import annotations

import re
from pathlib import Path

from pumpflow.common.runtime.settings import CommonSettings
from pumpflow.exit.settings import ExitSettings

_SOURCE = Path(__file__).parents[1] / "src" / "pumpflow" / "exit"


def test_every_setting_of_the_exit_is_read_by_its_code():
    """A setting defined and never read promises what the service does not do (a closed
    position's token leaving memory on a TTL of its own, say)."""
    code = "\n".join(p.read_text() for p in _SOURCE.glob("*.py"))
    own = set(ExitSettings.model_fields) - set(CommonSettings.model_fields)
    unread = sorted(name for name in own if not re.search(rf"\.{name}\b", code))
    assert unread == []


def test_an_empty_variable_turns_a_rule_off(monkeypatch):
    """``PUMPFLOW_EXIT_MAX_HOLD_S=`` (an env file's way to say it): the rule is off, as
    its description says, not a number the service cannot parse."""
    for variable in ("PUMPFLOW_EXIT_STOP_LOSS", "PUMPFLOW_EXIT_MAX_HOLD_S"):
        monkeypatch.setenv(variable, "")
    rules = ExitSettings.load(service="exit", transport="memory").rules()
    assert rules.stop_loss is None and rules.max_hold_s is None
    assert rules.quiet_s == ExitSettings.model_fields["exit_quiet_s"].default
