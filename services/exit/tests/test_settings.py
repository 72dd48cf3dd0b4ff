"""The exit service's settings: each one it defines does something."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pumpflow.common.exit import ExitRules, TakeProfitStep, TrailBand
from pumpflow.common.runtime.settings import CommonSettings, SettingsError
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


def test_the_ladder_trail_stale_gain_and_decline_share_are_settings(monkeypatch):
    """Each of the rules' parameters is a setting, a ladder or bands as JSON pairs."""
    monkeypatch.setenv("PUMPFLOW_EXIT_TAKE_PROFIT", "[[0.3, 0.5], [0.8, 0.5]]")
    monkeypatch.setenv("PUMPFLOW_EXIT_TRAILING", "[[0.1, 0.25], [2, 0.1]]")
    monkeypatch.setenv("PUMPFLOW_EXIT_STALE_MIN_GAIN", "0.05")
    monkeypatch.setenv("PUMPFLOW_EXIT_DECLINE_FRACTION", "0.75")
    rules = ExitSettings.load(service="exit", transport="memory").rules()
    assert rules.take_profit == (
        TakeProfitStep(gain=0.3, fraction=0.5),
        TakeProfitStep(gain=0.8, fraction=0.5),
    )
    assert rules.trailing == (
        TrailBand(peak_gain=0.1, giveback=0.25),
        TrailBand(peak_gain=2.0, giveback=0.1),
    )
    assert rules.stale_min_gain == 0.05 and rules.decline_fraction == 0.75


def test_the_settings_default_to_the_rules_defaults_and_empty_turns_them_off(monkeypatch):
    assert ExitSettings.load(service="exit", transport="memory").rules() == ExitRules()
    for variable in ("PUMPFLOW_EXIT_TAKE_PROFIT", "PUMPFLOW_EXIT_TRAILING"):
        monkeypatch.setenv(variable, "")
    monkeypatch.setenv("PUMPFLOW_EXIT_DECLINE_FRACTION", "")
    rules = ExitSettings.load(service="exit", transport="memory").rules()
    assert rules.take_profit == () and rules.trailing == () and rules.decline_fraction is None


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("PUMPFLOW_EXIT_TAKE_PROFIT", "[[0.5, 1.5]]", "a step's share (1.5) is not in (0, 1]"),
        ("PUMPFLOW_EXIT_TAKE_PROFIT", "[[0.5, 0]]", "a step's share (0) is not in (0, 1]"),
        (
            "PUMPFLOW_EXIT_TAKE_PROFIT",
            "[[0.5, 0.6], [1, 0.6]]",
            "the steps sell 1.2 of the tokens bought, more than the whole (1)",
        ),
        (
            "PUMPFLOW_EXIT_TAKE_PROFIT",
            "[[1, 0.25], [0.5, 0.25]]",
            "the steps' gains do not rise from one step to the next",
        ),
        (
            "PUMPFLOW_EXIT_TAKE_PROFIT",
            "[[0.5, 0.25], [0.5, 0.25]]",
            "the steps' gains do not rise from one step to the next",
        ),
        ("PUMPFLOW_EXIT_TAKE_PROFIT", "[[-0.1, 0.25]]", "a step's gain (-0.1) is not above 0"),
        (
            "PUMPFLOW_EXIT_TAKE_PROFIT",
            "[[0.5, 0.25], [1e400, 0.25]]",
            "a step's gain (inf) is not finite: it would never sell and still count",
        ),
        ("PUMPFLOW_EXIT_TAKE_PROFIT", "[[0.5]]", "Field required"),
        ("PUMPFLOW_EXIT_TAKE_PROFIT", "0.5:0.25", "not JSON"),
        (
            "PUMPFLOW_EXIT_TRAILING",
            "[[0.2, 1.0]]",
            "a band's giveback (1) is not in (0, 1): 1 gives back the whole peak and more",
        ),
        (
            "PUMPFLOW_EXIT_TRAILING",
            "[[1, 0.2], [0.5, 0.1]]",
            "the bands' peak gains do not rise from one band to the next",
        ),
        (
            "PUMPFLOW_EXIT_TRAILING",
            "[[0.2, 0.2], [1, 0.3]]",
            "a band gives back more than the one before",
        ),
        ("PUMPFLOW_EXIT_TRAILING", "[[-0.5, 0.3]]", "a band's peak gain (-0.5) is below 0"),
        (
            "PUMPFLOW_EXIT_TRAILING",
            "[[0.2, 0.3], [1e400, 0.1]]",
            "a band's peak gain (inf) is not finite: it would never be reached",
        ),
        ("PUMPFLOW_EXIT_DECLINE_FRACTION", "1.5", "less than or equal to 1"),
        ("PUMPFLOW_EXIT_DECLINE_FRACTION", "0", "greater than 0"),
        ("PUMPFLOW_EXIT_STALE_MIN_GAIN", "-1", "greater than -1"),
        ("PUMPFLOW_EXIT_STOP_LOSS", "0", "greater than 0"),
        ("PUMPFLOW_EXIT_STOP_LOSS", "-0.2", "greater than 0"),
        ("PUMPFLOW_EXIT_STOP_LOSS", "1", "less than 1"),
        ("PUMPFLOW_EXIT_STOP_LOSS", "1.5", "less than 1"),
        ("PUMPFLOW_EXIT_STOP_LOSS", "nan", "Input should be"),
        ("PUMPFLOW_EXIT_MAX_HOLD_S", "0", "greater than 0"),
        ("PUMPFLOW_EXIT_MAX_HOLD_S", "-5", "greater than 0"),
        ("PUMPFLOW_EXIT_STALE_AFTER_S", "0", "greater than 0"),
        ("PUMPFLOW_EXIT_QUIET_S", "-1", "greater than 0"),
    ],
)
def test_a_bad_rule_setting_is_refused_naming_it(monkeypatch, variable, value, reason):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as refused:
        ExitSettings.load(service="exit", transport="memory")
    assert re.search(rf"{variable}(\[\d+\])*: [^;]*{re.escape(reason)}", str(refused.value))


def test_a_bad_item_of_a_ladder_is_named_by_its_place():
    with pytest.raises(SettingsError, match=r"PUMPFLOW_EXIT_TAKE_PROFIT\[1\]\[0\]: "):
        ExitSettings.load(
            service="exit", transport="memory", exit_take_profit='[[0.5, 0.25], ["x", 0.25]]'
        )


@pytest.mark.parametrize(
    "setting",
    [
        {"exit_stop_loss": 0.0},
        {"exit_stop_loss": 1.0},
        {"exit_max_hold_s": 0.0},
        {"exit_stale_after_s": -1.0},
        {"exit_quiet_s": 0.0},
    ],
)
def test_settings_the_rules_cannot_run_on_are_refused_as_settings_not_at_start(setting):
    """A value the rules refuse is a bad setting named with its variable (exit status 2
    before any command), not a traceback as the service builds its rules."""
    with pytest.raises(SettingsError, match=r"PUMPFLOW_EXIT_"):
        ExitSettings.load(service="exit", transport="memory", **setting).rules()


@pytest.mark.parametrize(
    "setting",
    [
        {"exit_refused_retry_s": 60.0},
        {"exit_refused_retry_max_s": 0.5},
        {"exit_refused_retry_s": 5.0, "exit_refused_retry_max_s": 2.0},
    ],
)
def test_a_first_wait_after_refusals_above_the_longest_is_refused_not_cut_to_it(setting):
    """A first wait of 60 s under a longest of 30 s is not what was asked for either
    way: cut to 30 s the setting would be silently ignored."""
    with pytest.raises(SettingsError, match=r"PUMPFLOW_EXIT_REFUSED_RETRY_MAX_S: .*"):
        ExitSettings.load(service="exit", transport="memory", **setting)


def test_a_bad_item_of_a_ladder_in_the_config_file_is_named_by_its_place(tmp_path):
    """As the environment's is (``PUMPFLOW_EXIT_TAKE_PROFIT[1][1]``): a bare "Field
    required" of a ladder of several steps does not say which step lacks its share."""
    from pumpflow.common.runtime.settings import check_config_file

    path = tmp_path / "pumpflow.toml"
    path.write_text("[exit]\nexit_take_profit = [[0.3, 0.5], [0.6]]\n")
    with pytest.raises(SettingsError, match=r"\[exit\] exit_take_profit\[1\]\[1\]: Field required"):
        check_config_file(path, {"exit": ExitSettings})
