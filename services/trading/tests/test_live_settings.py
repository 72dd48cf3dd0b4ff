"""The settings a trader switching to live trading gives: refused at start when they
would spend, send or show what the trader did not mean, each refusal naming its
variable and never the key."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.runtime.settings import SettingsError
from pumpflow.common.testing import base58_key
from pumpflow.common.testing.trade_api import FakeTradeApi, fake_trade_api
from pumpflow.trading.ledger import MemoryLedger
from pumpflow.trading.service import TradingService
from pumpflow.trading.settings import TradingSettings

from .test_live import KEY, WALLET, answered, bought, entered, live_settings, sell_all
from .test_service import running

#: an address nothing is asked at: the settings are refused before any call
URL = "http://127.0.0.1:9/api/trade"


def load(**settings: object) -> TradingSettings:
    return TradingSettings.load(service="trading", transport="memory", **settings)


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        # a fraction where the setting is a percent: every order refused on slippage
        ("PUMPFLOW_TRADING_SLIPPAGE_PCT", "0", "greater than 0"),
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


@pytest.mark.parametrize("slippage", [500.0, 50.5])
def test_live_with_an_entry_slippage_over_50_percent_is_refused_at_start(slippage, monkeypatch):
    """500 (a slip of the decimal point) would buy at up to six times the price; paper
    takes it (a study's every entry filled)."""
    monkeypatch.setenv("PUMPFLOW_TRADING_SLIPPAGE_PCT", str(slippage))
    assert load().trading_slippage_pct == slippage
    settings = load(**live_settings(FakeTradeApi(url=URL)))
    with pytest.raises(SettingsError) as refused:
        TradingService(settings, registry=CollectorRegistry(), ledger=MemoryLedger())
    assert str(refused.value) == (
        f"PUMPFLOW_TRADING_SLIPPAGE_PCT: {slippage:g} is over the 50% a live entry may pay "
        "over its price (a percent: 5 is 5%)"
    )


@pytest.mark.parametrize("confirm_s", [10.0, 89.5])
def test_live_with_a_confirmation_wait_shorter_than_a_transaction_can_land_is_refused_at_start(
    confirm_s, monkeypatch
):
    """An order given up before its transaction's blockhash expired frees its capital
    while its trade may still land: a position the book does not know. Paper takes any
    wait (it never reads it: a paper order fills after its latency)."""
    monkeypatch.setenv("PUMPFLOW_TRADING_LIVE_CONFIRM_S", str(confirm_s))
    assert load().trading_live_confirm_s == confirm_s
    TradingService(load(), registry=CollectorRegistry(), ledger=MemoryLedger())
    settings = load(**live_settings(FakeTradeApi(url=URL)))
    with pytest.raises(SettingsError) as refused:
        TradingService(settings, registry=CollectorRegistry(), ledger=MemoryLedger())
    assert str(refused.value) == (
        f"PUMPFLOW_TRADING_LIVE_CONFIRM_S: {confirm_s:g} is under the 90 s a live order must "
        "wait for its trade: a Solana transaction can land until its blockhash expires (150 "
        "blocks, 60 to 90 s), and an order given up before that frees its capital while its "
        "trade may still land, a position the book would not know"
    )
    assert settings.start_line() == f"trading would not start: {refused.value}"


@pytest.mark.parametrize("confirm_s", [90.0, 300.0])
def test_live_with_a_confirmation_wait_a_transaction_cannot_outlast_is_taken(
    confirm_s, monkeypatch
):
    monkeypatch.setenv("PUMPFLOW_TRADING_LIVE_CONFIRM_S", str(confirm_s))
    settings = load(**live_settings(FakeTradeApi(url=URL)))
    assert settings.live_refusal() is None
    assert settings.live_execution().confirm_s == confirm_s


def logged(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


async def test_live_trading_says_so_at_start_and_in_every_view(clock, caplog):
    """Nobody mistakes a live replica for a paper one: its start says LIVE with where
    its orders go, and /readyz (the service's status), /state and the metrics name the
    executor."""
    caplog.set_level(logging.INFO)
    async with fake_trade_api() as api:
        registry = CollectorRegistry()
        service = TradingService(
            load(**live_settings(api)), registry=registry, ledger=MemoryLedger()
        )
        async with running(clock, service):
            status = await service.status()
            state = await service.trading_state_view()
    assert status["executor"] == state["executor"] == "live"
    assert registry.get_sample_value("pumpflow_trading_executor", {"executor": "live"}) == 1
    assert registry.get_sample_value("pumpflow_trading_executor", {"executor": "paper"}) == 0
    [said] = [m for m in logged(caplog, logging.WARNING) if "LIVE" in m]
    assert api.url in said and WALLET in said
    assert KEY not in caplog.text


@pytest.mark.parametrize(
    ("given", "level", "said"),
    [
        ({}, logging.INFO, "trading on paper: orders fill on the curve, no money moves"),
        (
            {"pumpportal_api_key": KEY},
            logging.INFO,
            "PumpPortal's API key is set and not used",
        ),
        (
            {"trading_live_enabled": True, "pumpportal_api_key": KEY},
            logging.WARNING,
            "PUMPFLOW_TRADING_LIVE_ENABLED is true, but PUMPFLOW_TRADING_EXECUTOR is paper",
        ),
    ],
)
async def test_paper_trading_says_so_at_start_and_why_a_live_setting_given_is_not_used(
    clock, caplog, given, level, said, monkeypatch
):
    monkeypatch.delenv("PUMPPORTAL_API_KEY", raising=False)
    caplog.set_level(logging.INFO)
    registry = CollectorRegistry()
    service = TradingService(load(**given), registry=registry, ledger=MemoryLedger())
    async with running(clock, service):
        status = await service.status()
        state = await service.trading_state_view()
    assert status["executor"] == state["executor"] == "paper"
    assert registry.get_sample_value("pumpflow_trading_executor", {"executor": "paper"}) == 1
    assert [m for m in logged(caplog, level) if said in m], caplog.text
    assert KEY not in caplog.text


@pytest.mark.parametrize(
    ("environment", "said"),
    [
        ({}, "set PUMPPORTAL_API_KEY or PUMPPORTAL_API_KEY_FILE"),
        ({"PUMPPORTAL_API_KEY": "  "}, "PUMPPORTAL_API_KEY is set but blank: give the key"),
    ],
)
def test_live_without_a_key_says_whether_one_was_given_blank(environment, said, monkeypatch):
    monkeypatch.delenv("PUMPPORTAL_API_KEY", raising=False)
    monkeypatch.delenv("PUMPPORTAL_API_KEY_FILE", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = load(**{**live_settings(FakeTradeApi(url=URL)), "pumpportal_api_key": None})
    with pytest.raises(SettingsError) as refused:
        TradingService(settings, registry=CollectorRegistry(), ledger=MemoryLedger())
    assert str(refused.value) == f"the live executor needs PumpPortal's API key: {said}"


def test_live_with_a_key_file_open_to_every_user_is_refused_at_start(tmp_path, monkeypatch):
    monkeypatch.delenv("PUMPPORTAL_API_KEY", raising=False)
    path = tmp_path / "key"
    path.write_text(KEY)
    path.chmod(0o644)
    values = {**live_settings(FakeTradeApi(url=URL)), "pumpportal_api_key": None}
    settings = load(**values, pumpportal_api_key_file=path)
    with pytest.raises(SettingsError, match="is readable by every user"):
        TradingService(settings, registry=CollectorRegistry(), ledger=MemoryLedger())


def test_live_with_a_key_file_that_is_no_text_is_refused_at_start_naming_it(tmp_path, monkeypatch):
    # a wallet's binary keypair named for the API key's file
    monkeypatch.delenv("PUMPPORTAL_API_KEY", raising=False)
    path = tmp_path / "id.bin"
    path.write_bytes(bytes([0xFF, 0xFE]) + KEY.encode())
    path.chmod(0o600)
    values = {**live_settings(FakeTradeApi(url=URL)), "pumpportal_api_key": None}
    settings = load(**values, pumpportal_api_key_file=path)
    with pytest.raises(SettingsError) as refused:
        TradingService(settings, registry=CollectorRegistry(), ledger=MemoryLedger())
    assert str(refused.value) == (
        f"PUMPPORTAL_API_KEY_FILE: {path} is not text (UTF-8): give the key on one line"
    )
    assert KEY not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        # the reference's form, copied whole: the key would sit in a setting shown as a URL
        (
            f"https://pumpportal.fun/api/trade?api-key={KEY}",
            "PUMPFLOW_TRADING_LIVE_URL: Value error, the trade API's URL carries a query: "
            "give the key in PUMPPORTAL_API_KEY (or PUMPPORTAL_API_KEY_FILE), not in the URL",
        ),
        # the key goes in the URL's query: over plain HTTP anyone on the way reads it
        (
            "http://pumpportal.fun/api/trade",
            "PUMPFLOW_TRADING_LIVE_URL: Value error, http:// sends the API key in clear text: use "
            "https:// (plain http only to this machine, 127.0.0.1 or localhost)",
        ),
    ],
)
def test_a_trade_api_url_that_would_show_or_leak_the_key_is_refused(url, said, monkeypatch):
    monkeypatch.setenv("PUMPFLOW_TRADING_LIVE_URL", url)
    with pytest.raises(SettingsError) as refused:
        load()
    assert str(refused.value) == f"invalid settings: {said}"


@pytest.mark.parametrize(
    "url",
    ["https://pumpportal.fun/api/trade", "http://127.0.0.1:8080/api/trade",
     "http://localhost/api/trade", "http://[::1]:9/api/trade"],
)  # fmt: skip
def test_a_trade_api_url_over_https_or_to_this_machine_is_taken(url, monkeypatch):
    monkeypatch.setenv("PUMPFLOW_TRADING_LIVE_URL", url)
    assert load().trading_live_url == url


def test_the_settings_repr_shows_no_secret(monkeypatch):
    """A repr lands in tracebacks and debug lines: no password of a URL nor key in it."""
    monkeypatch.setenv("PUMPFLOW_AMQP_URL", "amqp://trader:broker-password-1@127.0.0.1:5672/")
    monkeypatch.setenv("PUMPFLOW_POSTGRES_DSN", "postgresql://trader:pg-password-2@127.0.0.1/t")
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", "api-token-value-3")
    monkeypatch.setenv("PUMPPORTAL_API_KEY", KEY)
    shown = repr(load())
    for secret in ("broker-password-1", "pg-password-2", "api-token-value-3", KEY):
        assert secret not in shown
    assert "amqp://trader:***@127.0.0.1:5672/" in shown


async def test_the_slippage_and_priority_fee_set_reach_the_trade_api(clock, market):
    """What the trader sets is what each request carries: the entry's slippage setting
    and the priority fee (a sale carries the exit's own slippage and the same fee)."""
    settings = {"trading_slippage_pct": 12.5, "trading_live_priority_fee_sol": 0.0007}
    async with fake_trade_api() as api, entered(clock, market, api, **settings) as run:
        opened = await bought(run, api, market)
        sale = await sell_all(run, opened, clock, reason="take profit")
        await answered(run.service, api, 2)
    bought_with, sold_with = (call.body for call in api.requests)
    assert (bought_with["slippage"], bought_with["priorityFee"]) == (12.5, 0.0007)
    assert (sold_with["slippage"], sold_with["priorityFee"]) == (sale.slippage_pct, 0.0007)
    assert sold_with["slippage"] != 12.5


#: a wallet's keypair as base58 (64 bytes: the private key and the public one), what a
#: trader may paste for the public key
KEYPAIR = base58_key("the trader's keypair", 88)


@pytest.mark.parametrize(
    ("wallet", "said"),
    [
        (KEYPAIR, "64 bytes long, as a private key is: give the wallet's public key"),
        # solana-keygen's file: the keypair's bytes as a JSON list
        ("[174,47,154,16,202,193,206,113]", "not a public key"),
        # a mistyped public key: base58 has no 0, O, I or l
        ("HDypasvYsG5MuABAfaTf78FVYMmYedcbefZ7pxWEhVQ0", "not a public key"),
        ("HDypasvYsG5MuABAfaTf78FVYMmYed", "not a public key"),
    ],
)
def test_a_live_wallet_that_is_no_public_key_is_refused_without_showing_it(
    wallet, said, monkeypatch, caplog
):
    """Orders whose wallet the stream never shows land unbooked and unsold; and a private
    key given for the wallet would be logged with the settings."""
    monkeypatch.setenv("PUMPFLOW_TRADING_LIVE_WALLET", wallet)
    with pytest.raises(SettingsError) as refused:
        load()
    assert f"PUMPFLOW_TRADING_LIVE_WALLET: Value error, {said}" in str(refused.value)
    assert wallet not in str(refused.value) and wallet not in caplog.text


def test_a_live_wallet_that_is_a_public_key_is_taken(monkeypatch):
    monkeypatch.setenv("PUMPFLOW_TRADING_LIVE_WALLET", WALLET)
    assert load().trading_live_wallet == WALLET
