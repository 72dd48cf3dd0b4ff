"""The settings a trader switching to live trading gives: refused at start when they
would spend, send or show what the trader did not mean, each refusal naming its
variable and never the key."""

from __future__ import annotations

import pytest

from pumpflow.common.runtime.settings import SettingsError
from pumpflow.trading.settings import TradingSettings


def load(**settings: object) -> TradingSettings:
    return TradingSettings.load(service="trading", transport="memory", **settings)


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        # a fraction where the setting is a percent: every order refused on slippage
        ("PUMPFLOW_TRADING_SLIPPAGE_PCT", "0", "greater than 0"),
        # 500 (a slip of the decimal point) would buy at up to six times the price
        ("PUMPFLOW_TRADING_SLIPPAGE_PCT", "500", "less than or equal to 50"),
        ("PUMPFLOW_TRADING_SLIPPAGE_PCT", "50.5", "less than or equal to 50"),
        # 0.5 SOL a transaction for 0.0005: fifty times the smallest order
        ("PUMPFLOW_TRADING_LIVE_PRIORITY_FEE_SOL", "0.5", "less than or equal to 0.01"),
        ("PUMPFLOW_TRADING_LIVE_PRIORITY_FEE_SOL", "-0.0001", "greater than or equal to 0"),
    ],
)
def test_a_slippage_or_priority_fee_out_of_bounds_is_refused_at_start(
    variable, value, reason, monkeypatch
):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=f"{variable}: .*{reason}"):
        load()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PUMPFLOW_TRADING_SLIPPAGE_PCT", "50"),
        ("PUMPFLOW_TRADING_SLIPPAGE_PCT", "0.5"),
        ("PUMPFLOW_TRADING_LIVE_PRIORITY_FEE_SOL", "0.01"),
        ("PUMPFLOW_TRADING_LIVE_PRIORITY_FEE_SOL", "0"),
    ],
)
def test_a_slippage_or_priority_fee_within_bounds_is_taken(variable, value, monkeypatch):
    monkeypatch.setenv(variable, value)
    settings = load()
    name = variable.removeprefix("PUMPFLOW_").lower()
    assert getattr(settings, name) == float(value)
