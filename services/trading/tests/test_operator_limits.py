"""The risk limits an operator changes on a running system (``PUT /limits``, ``DELETE
/limits``, all or ``?limit=NAME``): validated as their settings are, applied by the
replica trading from its next decision, stored in the ledger for a restart or a replica
taking over."""

from __future__ import annotations

import contextlib
import logging

import httpx
import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.runtime.http import create_app
from pumpflow.common.testing import EventCollector
from pumpflow.trading.ledger import MemoryLedger, PostgresLedger, Superseded
from pumpflow.trading.service import TradingService
from pumpflow.trading.settings import TradingSettings

from .test_kill_switch import shared_lease  # noqa: F401 (a fixture)
from .test_service import publish, ready

TOKEN = "limits-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def trading(ledger, registry: CollectorRegistry | None = None, **settings) -> TradingService:
    config = TradingSettings.load(
        service="trading", transport="memory", api_token=TOKEN, **settings
    )
    return TradingService(config, registry=registry or CollectorRegistry(), ledger=ledger)


@contextlib.asynccontextmanager
async def running(clock, service: TradingService):
    async with run_embedded([service], clock=clock, synchronous=True) as system:
        watch = await EventCollector("watch").attach(system.bus, "order.*", "position.*")
        app = create_app(service, system.contexts["trading"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://trading") as client:
            yield system.bus, watch, client


async def enter(bus, market, watch) -> str:
    """A token entered on a prediction; its mint."""
    mint = await ready(bus, market)
    before = watch.count("order.requested")
    await publish(bus, market.prediction(mint))
    assert watch.count("order.requested") == before + 1
    return mint


@pytest.mark.parametrize(
    ("headers", "body", "status", "named"),
    [
        ({}, {"max_concurrent_positions": 2}, 401, ""),
        ({"Authorization": "Bearer wrong"}, {"max_concurrent_positions": 2}, 401, ""),
        (AUTH, {"max_concurrent_positions": 0}, 422, "max_concurrent_positions"),
        (AUTH, {"max_total_exposure_fraction": 1.5}, 422, "max_total_exposure_fraction"),
        (AUTH, {"max_risk_per_trade": "lots"}, 422, "max_risk_per_trade"),
        (AUTH, {"max_positions": 2, "min_score": 0.1}, 422, "max_positions, min_score"),
        (AUTH, {}, 422, "no limit to change"),
        (AUTH, {"max_concurrent_positions": 2, "reason": 5}, 422, "'reason' must be text"),
    ],
)
async def test_a_limits_change_refused_changes_nothing(clock, headers, body, status, named):
    ledger = MemoryLedger()
    service = trading(ledger)
    async with running(clock, service) as (_, _, client):
        refused = await client.put("/limits", json=body, headers=headers)
        assert refused.status_code == status, refused.text
        assert named in refused.text and TOKEN not in refused.text
        assert service.risk.limits.max_concurrent_positions == 5
        assert await ledger.limits() == {}
        assert (await client.delete("/limits", headers=headers)).status_code in (status, 200)


@pytest.mark.parametrize(
    ("headers", "names", "status", "named"),
    [
        ({}, ["max_concurrent_positions"], 401, ""),
        (AUTH, ["max_positions"], 422, "unknown limits: max_positions (known: max_risk_per"),
        (AUTH, ["max_concurrent_positions", "min_score", "max_positions"], 422,
         "unknown limits: max_positions, min_score ("),
        (AUTH, [""], 422, "unknown limits:  ("),
    ],
)  # fmt: skip
async def test_a_reset_of_limits_refused_resets_nothing(clock, headers, names, status, named):
    ledger = MemoryLedger()
    service = trading(ledger)
    async with running(clock, service) as (_, _, client):
        given = {"max_concurrent_positions": 2, "max_daily_loss_fraction": 0.02}
        assert (await client.put("/limits", json=given, headers=AUTH)).status_code == 200
        refused = await client.delete("/limits", params={"limit": names}, headers=headers)
        assert refused.status_code == status, refused.text
        assert named in refused.text and TOKEN not in refused.text
        assert service.risk.limits.max_concurrent_positions == 2
        assert {name: s.value for name, s in (await ledger.limits()).items()} == given


async def test_limits_change_without_a_configured_token_is_forbidden(clock):
    config = TradingSettings.load(service="trading", transport="memory")
    service = TradingService(config, registry=CollectorRegistry(), ledger=MemoryLedger())
    async with running(clock, service) as (_, _, client):
        for method in ("PUT", "DELETE"):
            answer = await client.request(
                method, "/limits", json={"max_concurrent_positions": 2}, headers=AUTH
            )
            assert answer.status_code == 403, answer.text


async def test_a_lowered_limit_refuses_the_next_entry_and_a_reset_restores_the_setting(
    clock, market, caplog
):
    """Two positions held, the operator lowers the positions to 1: nothing is sold, the
    limit shows exceeded, the next entry is refused; back to the settings, it enters."""
    caplog.set_level(logging.INFO)
    registry = CollectorRegistry()
    service = trading(MemoryLedger(), registry)
    async with running(clock, service) as (bus, watch, client):
        await enter(bus, market, watch)
        await enter(bus, market, watch)
        answer = await client.put(
            "/limits",
            json={"max_concurrent_positions": 1, "max_daily_loss_fraction": 0.02,
                  "reason": "a bad day"},
            headers=AUTH,
        )  # fmt: skip
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["limits"]["max_concurrent_positions"] == 1
        assert body["limits"]["max_daily_loss_fraction"] == 0.02
        source = body["sources"]["max_concurrent_positions"]
        assert source["source"] == "operator" and source["settings"] == 5, source
        assert source["reason"] == "a bad day" and source["changed_at"] is not None
        assert body["sources"]["max_total_exposure_fraction"]["source"] == "settings"
        assert [e["limit"] for e in body["exceeded"]] == ["positions"]
        assert any("a bad day" in r.getMessage() and "max_concurrent_positions 5 -> 1"
                   in r.getMessage() for r in caplog.records)  # fmt: skip
        assert (
            registry.get_sample_value(
                "pumpflow_trading_limit", {"limit": "max_concurrent_positions"}
            )
            == 1
        )
        assert (
            registry.get_sample_value("pumpflow_trading_limit_changes_total", {"action": "set"})
            == 1
        )
        assert watch.count("order.requested") == 2

        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 2
        assert "1 positions already open" in str(service.skipped)
        assert len(service.book.open_positions) + len(service.risk.reservations) >= 2

        reset = await client.delete("/limits", params={"reason": "calmer"}, headers=AUTH)
        assert reset.status_code == 200, reset.text
        assert reset.json()["limits"]["max_concurrent_positions"] == 5
        assert reset.json()["sources"]["max_concurrent_positions"]["source"] == "settings"
        assert reset.json()["exceeded"] == []
        assert (
            registry.get_sample_value("pumpflow_trading_limit_changes_total", {"action": "reset"})
            == 1
        )
        await enter(bus, market, watch)
        limits = (await client.get("/limits")).json()
        assert limits["sources"]["max_concurrent_positions"]["source"] == "settings"


@pytest.fixture(params=["memory", "postgres"])
def ledger(request):
    if request.param == "memory":
        return MemoryLedger()
    return PostgresLedger(request.getfixturevalue("pg_pool"))


async def test_a_reset_of_named_limits_puts_back_their_settings_alone(
    clock, market, caplog, ledger
):
    """Two limits set, the operator resets one (``?limit=NAME``): it is the setting's
    again, stored, logged and counted as a reset; the other stays the operator's."""
    caplog.set_level(logging.INFO)
    registry = CollectorRegistry()
    service = trading(ledger, registry)
    async with running(clock, service) as (bus, watch, client):
        await enter(bus, market, watch)
        await enter(bus, market, watch)
        given = {"max_concurrent_positions": 1, "max_daily_loss_fraction": 0.02,
                 "max_total_exposure_fraction": 0.3, "reason": "a bad day"}  # fmt: skip
        assert (await client.put("/limits", json=given, headers=AUTH)).status_code == 200
        caplog.clear()
        reset = await client.delete(
            "/limits",
            params={"limit": ["max_concurrent_positions", "max_total_exposure_fraction",
                              "max_concurrent_positions"], "reason": "calmer"},
            headers=AUTH,
        )  # fmt: skip
        assert reset.status_code == 200, reset.text
        body = reset.json()
        assert body["limits"]["max_concurrent_positions"] == 5
        assert body["limits"]["max_total_exposure_fraction"] == 0.5
        assert body["limits"]["max_daily_loss_fraction"] == 0.02
        sources = body["sources"]
        assert sources["max_concurrent_positions"]["source"] == "settings"
        assert sources["max_total_exposure_fraction"]["source"] == "settings"
        kept = sources["max_daily_loss_fraction"]
        assert kept["source"] == "operator" and kept["reason"] == "a bad day", kept
        assert body["exceeded"] == []
        assert service.risk.limits.max_concurrent_positions == 5
        assert service.risk.limits.max_daily_loss_fraction == 0.02
        assert set(await ledger.limits()) == {"max_daily_loss_fraction"}
        said = [r.getMessage() for r in caplog.records if "by the operator" in r.getMessage()]
        assert len(said) == 1 and "limits reset" in said[0] and "calmer" in said[0], said
        assert "max_concurrent_positions 1 -> 5" in said[0]
        assert "max_total_exposure_fraction 0.3 -> 0.5" in said[0]
        assert "max_daily_loss_fraction" not in said[0]
        counted = registry.get_sample_value
        assert counted("pumpflow_trading_limit_changes_total", {"action": "reset"}) == 1
        assert counted("pumpflow_trading_limit_changes_total", {"action": "set"}) == 1
        assert counted("pumpflow_trading_limit", {"limit": "max_concurrent_positions"}) == 5
        await enter(bus, market, watch)
    restarted = trading(ledger)
    async with running(clock, restarted):
        assert restarted.risk.limits.max_concurrent_positions == 5
        assert restarted.risk.limits.max_daily_loss_fraction == 0.02


async def test_a_predecessors_reset_of_named_limits_is_fenced_off(ledger):
    """A reset of some limits is the holder's write as a change is: a predecessor's, late,
    is refused and leaves what its successor stored."""
    await ledger.load(remembered=10, holder="w1")
    values = {"max_concurrent_positions": 1, "max_daily_loss_fraction": 0.02}
    await ledger.set_limits(values, "w1's", holder="w1", now=100.0)
    await ledger.load(remembered=10, holder="w2")
    with pytest.raises(Superseded):
        await ledger.set_limits({"max_concurrent_positions": None}, "late", holder="w1", now=101.0)
    assert set(await ledger.limits()) == set(values)
    await ledger.set_limits({"max_concurrent_positions": None}, "w2's", holder="w2", now=102.0)
    assert set(await ledger.limits()) == {"max_daily_loss_fraction"}


async def test_limits_stored_outlive_a_restart_and_a_reset_is_stored_too(
    clock, market, pg_pool, caplog
):
    caplog.set_level(logging.INFO)
    ledger = PostgresLedger(pg_pool)
    first = trading(ledger)
    async with running(clock, first) as (_, _, client):
        answer = await client.put(
            "/limits", json={"max_concurrent_positions": 1, "reason": "drill"}, headers=AUTH
        )
        assert answer.status_code == 200, answer.text
    caplog.clear()
    second = trading(ledger)
    async with running(clock, second) as (bus, watch, client):
        assert second.risk.limits.max_concurrent_positions == 1
        said = [r.getMessage() for r in caplog.records if "over the settings" in r.getMessage()]
        assert said and "max_concurrent_positions=1 (settings 5" in said[0], said
        assert "drill" in said[0]
        await enter(bus, market, watch)
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 1
        body = (await client.get("/limits")).json()
        assert body["sources"]["max_concurrent_positions"]["reason"] == "drill"
        assert (await client.delete("/limits", headers=AUTH)).status_code == 200
    third = trading(ledger)
    async with running(clock, third):
        assert third.risk.limits.max_concurrent_positions == 5
        assert await ledger.limits() == {}


async def test_only_the_replica_trading_changes_limits_and_a_stand_by_shows_the_stored(
    clock,
    market,
    pg_pool,
    shared_lease,  # noqa: F811
):
    ledger = PostgresLedger(pg_pool)
    holder, standby = trading(ledger), trading(ledger)
    async with running(clock, holder) as (_, _, held):
        async with running(clock, standby) as (_, _, client):
            assert (holder.role, standby.role) == ("active", "standby")
            refused = await client.put(
                "/limits", json={"max_concurrent_positions": 1}, headers=AUTH
            )
            assert refused.status_code == 409, refused.text
            assert f"{holder.leader.holder} holds it" in refused.json()["detail"]
            assert (await client.delete("/limits", headers=AUTH)).status_code == 409
            one = {"limit": "max_concurrent_positions"}
            refused = await client.delete("/limits", params=one, headers=AUTH)
            assert refused.status_code == 409, refused.text
            assert await ledger.limits() == {}

            answer = await held.put(
                "/limits", json={"max_total_exposure_fraction": 0.3}, headers=AUTH
            )
            assert answer.status_code == 200, answer.text
            shown = (await client.get("/limits")).json()
            assert shown["source"] == "ledger"
            assert shown["limits"]["max_total_exposure_fraction"] == 0.3
            assert shown["sources"]["max_total_exposure_fraction"]["source"] == "operator"
        # the holder goes: the stand-by's successor trades with the stored limits
    successor = trading(ledger)
    async with running(clock, successor):
        assert successor.risk.limits.max_total_exposure_fraction == 0.3
