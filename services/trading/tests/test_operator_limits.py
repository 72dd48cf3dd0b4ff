"""The risk limits an operator changes on a running system (``PUT /limits``, ``DELETE
/limits``, all or ``?limit=NAME``): validated as their settings are, applied by the
replica trading from its next decision, stored in the ledger for a restart or a replica
taking over."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
import pytest
from prometheus_client import CollectorRegistry

from pumpflow.cli.main import build_parser
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.runtime.http import create_app
from pumpflow.common.testing import EventCollector
from pumpflow.common.testing.servers import local_app
from pumpflow.trading.ledger import MemoryLedger, PostgresLedger, Superseded
from pumpflow.trading.service import TradingService
from pumpflow.trading.settings import TradingSettings

from .test_kill_switch import shared_lease  # noqa: F401 (a fixture)
from .test_service import close, publish, ready

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


async def decided(bus, market, watch, mint: str) -> bool:
    """Whether a prediction of ``mint`` (made ready again: a restarted replica knows no
    token view) orders an entry."""
    await ready(bus, market, mint)
    before = watch.count("order.requested")
    await publish(bus, market.prediction(mint))
    return watch.count("order.requested") > before


@pytest.mark.parametrize(
    ("headers", "body", "status", "named"),
    [
        ({}, {"max_concurrent_positions": 2}, 401, ""),
        ({"Authorization": "Bearer wrong"}, {"max_concurrent_positions": 2}, 401, ""),
        (AUTH, {"max_concurrent_positions": 0}, 422, "max_concurrent_positions"),
        (AUTH, {"max_total_exposure_fraction": 1.5}, 422, "max_total_exposure_fraction"),
        (AUTH, {"max_risk_per_trade": "lots"}, 422, "max_risk_per_trade"),
        (AUTH, {"max_concurrent_positions": 1.5}, 422,
         "max_concurrent_positions: input should be a valid integer"),
        (AUTH, {"max_concurrent_positions": True}, 422, "max_concurrent_positions: a number"),
        (AUTH, {"add_to_positions": 0}, 422, "add_to_positions: true or false, not 0"),
        # each value as the JSON that gave it, not as Python writes it
        (AUTH, {"add_to_positions": "false"}, 422, 'add_to_positions: true or false, not "false"'),
        (AUTH, {"add_to_positions": None}, 422, "add_to_positions: true or false, not null"),
        (AUTH, {"reentry_cooldown_s": True}, 422, "reentry_cooldown_s: a number, not true"),
        (AUTH, {"reentry_cooldown_s": -1}, 422,
         "reentry_cooldown_s: input should be greater than or equal to 0"),
        # JSON has no infinity; Python's parser takes it
        (AUTH, '{"reentry_cooldown_s": Infinity}', 422,
         "reentry_cooldown_s: input should be a finite number, not Infinity"),
        (AUTH, {"add_to_positions": True, "reentry_cooldown_s": "60"}, 422,
         'reentry_cooldown_s: a number, not "60"'),
        (AUTH, {"max_positions": 2, "min_score": 0.1}, 422, "max_positions, min_score"),
        (AUTH, {}, 422, "no limit to change"),
        (AUTH, {"max_concurrent_positions": 2, "reason": 5}, 422, "'reason' must be text"),
    ],
)  # fmt: skip
async def test_a_limits_change_refused_changes_nothing(clock, headers, body, status, named):
    ledger = MemoryLedger()
    service = trading(ledger)
    async with running(clock, service) as (_, _, client):
        if isinstance(body, str):
            sent = {"content": body, "headers": {**headers, "Content-Type": "application/json"}}
        else:
            sent = {"json": body, "headers": headers}
        refused = await client.put("/limits", **sent)
        assert refused.status_code == status, refused.text
        said = refused.json()["detail"] if status == 422 else refused.text
        assert named in said and TOKEN not in refused.text
        assert service.risk.limits == service.settings.risk_limits()
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
        said = refused.json()["detail"] if status == 422 else refused.text
        assert named in said and TOKEN not in refused.text
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


async def test_a_stored_limit_this_version_does_not_know_is_ignored_with_a_warning(
    clock, pg_pool, caplog
):
    """A row a newer version stored (then rolled back) does not stop a take-over: the
    limits known apply, the stranger is named in a warning."""
    ledger = PostgresLedger(pg_pool)
    await ledger.load(remembered=10, holder="w1")
    await ledger.set_limits({"max_concurrent_positions": 2}, "drill", holder="w1", now=100.0)
    await pg_pool.execute(
        "INSERT INTO trading_limits (name, value, reason, changed_at) "
        "VALUES ('max_leverage', 3, 'newer', now())"
    )
    caplog.set_level(logging.WARNING)
    service = trading(ledger)
    async with running(clock, service):
        assert service.risk.limits.max_concurrent_positions == 2
    said = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert said and "max_leverage" in said[0], said


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

            given = {"max_total_exposure_fraction": 0.3, "max_concurrent_positions": 2,
                     "add_to_positions": True, "reentry_cooldown_s": 30}  # fmt: skip
            answer = await held.put("/limits", json=given, headers=AUTH)
            assert answer.status_code == 200, answer.text
            shown = (await client.get("/limits")).json()
            assert shown["source"] == "ledger"
            # each in its setting's type, the switch stored as 1 read back as true
            assert {name: shown["limits"][name] for name in given} == given
            assert [type(shown["limits"][name]) for name in given] == [float, int, bool, float]
            for name in given:
                assert shown["sources"][name]["source"] == "operator", name
            assert shown["sources"]["add_to_positions"]["value"] is True
        # the holder goes: the stand-by's successor trades with the stored limits
    successor = trading(ledger)
    async with running(clock, successor):
        limits = successor.risk.limits
        assert limits.max_total_exposure_fraction == 0.3
        assert (limits.max_concurrent_positions, limits.reentry_cooldown_s) == (2, 30.0)
        assert limits.add_to_positions is True


async def test_a_lowered_positions_count_stops_a_burst_of_entries_and_outlives_a_restart(
    clock, market, ledger
):
    """The operator lowers the positions held at once as the market turns: a burst of
    entries stops at the new count (none sold), a restart trades by it (an int), and a
    reset puts back the setting's."""
    service = trading(ledger)
    async with running(clock, service) as (bus, watch, client):
        await enter(bus, market, watch)
        given = {"max_concurrent_positions": 3, "reason": "the market turns"}
        answer = await client.put("/limits", json=given, headers=AUTH)
        assert answer.status_code == 200, answer.text
        burst = [await ready(bus, market) for _ in range(4)]
        for mint in burst:
            await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 3
        assert service.skipped["3 positions already open"] == 2
        await clock.advance(1.0)  # the entries fill
        assert len(service.book.open_positions) == 3
    restarted = trading(ledger)
    async with running(clock, restarted) as (bus, watch, client):
        assert restarted.risk.limits.max_concurrent_positions == 3
        shown = (await client.get("/limits")).json()
        assert type(shown["limits"]["max_concurrent_positions"]) is int, shown["limits"]
        source = shown["sources"]["max_concurrent_positions"]
        assert (source["value"], source["reason"]) == (3, "the market turns"), source
        assert not await decided(bus, market, watch, burst[-1])
        one = {"limit": "max_concurrent_positions"}
        assert (await client.delete("/limits", params=one, headers=AUTH)).status_code == 200
        assert restarted.risk.limits.max_concurrent_positions == 5
        assert await decided(bus, market, watch, burst[-1])


async def test_adds_turned_off_refuse_the_next_add_and_outlive_a_restart(
    clock, market, ledger, caplog
):
    """Adds allowed by the settings, the operator turns them off (a JSON false, stored
    0): the next prediction of a token held adds nothing; /limits and the metric say
    it (0), the log says the change; a restart keeps it off; a reset allows adds again."""
    caplog.set_level(logging.INFO)
    registry = CollectorRegistry()
    service = trading(ledger, registry, trading_add_to_positions=True)
    async with running(clock, service) as (bus, watch, client):
        mint = await enter(bus, market, watch)
        await clock.advance(1.0)  # filled
        assert await decided(bus, market, watch, mint)  # an add, by the settings
        await clock.advance(1.0)
        given = {"add_to_positions": False, "reason": "no averaging up"}
        answer = await client.put("/limits", json=given, headers=AUTH)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["limits"]["add_to_positions"] is False
        source = body["sources"]["add_to_positions"]
        assert (source["value"], source["settings"], source["source"]) == (False, True, "operator")
        sample = registry.get_sample_value
        assert sample("pumpflow_trading_limit", {"limit": "add_to_positions"}) == 0
        assert any("no averaging up" in r.getMessage() and "add_to_positions true -> false"
                   in r.getMessage() for r in caplog.records)  # fmt: skip
        assert not await decided(bus, market, watch, mint)
        assert service.skipped["held already (or an entry is in flight): one entry a token"] == 1
        assert service.book.holds(mint)
    restarted = trading(ledger, registry=CollectorRegistry(), trading_add_to_positions=True)
    async with running(clock, restarted) as (bus, watch, client):
        assert restarted.risk.limits.add_to_positions is False
        assert (await client.get("/limits")).json()["limits"]["add_to_positions"] is False
        assert not await decided(bus, market, watch, mint)
        one = {"limit": "add_to_positions"}
        reset = await client.delete("/limits", params=one, headers=AUTH)
        assert reset.status_code == 200, reset.text
        assert reset.json()["sources"]["add_to_positions"]["source"] == "settings"
        assert await decided(bus, market, watch, mint)


async def test_a_re_entry_cooldown_set_counts_from_the_close_of_tokens_closed_before_it(
    clock, market, ledger
):
    """A token sold out before the operator sets a cooldown is in it, counted from its
    close, not from the change: refused under a cooldown longer than the time since,
    entered under a shorter one; a restart keeps the cooldown (and the close); a reset
    puts back the setting's (at once)."""
    service = trading(ledger)
    async with running(clock, service) as (bus, watch, client):
        mint = await enter(bus, market, watch)
        await clock.advance(1.0)
        await close(bus, watch, clock, mint)
        await clock.advance(3.0)
        given = {"reentry_cooldown_s": 60, "reason": "stops are the end"}
        answer = await client.put("/limits", json=given, headers=AUTH)
        assert answer.status_code == 200, answer.text
        assert answer.json()["sources"]["reentry_cooldown_s"]["value"] == 60.0
        assert not await decided(bus, market, watch, mint)
        assert service.skipped["closed #s ago, in the re-entry cooldown of 60s"] == 1
    restarted = trading(ledger)
    async with running(clock, restarted) as (bus, watch, client):
        assert restarted.risk.limits.reentry_cooldown_s == 60.0
        assert not await decided(bus, market, watch, mint)
        assert restarted.skipped["closed #s ago, in the re-entry cooldown of 60s"] == 1
        answer = await client.put("/limits", json={"reentry_cooldown_s": 2.5}, headers=AUTH)
        assert answer.status_code == 200, answer.text
        assert await decided(bus, market, watch, mint)  # closed 3 s before the change
        await clock.advance(1.0)
        await close(bus, watch, clock, mint)
        assert not await decided(bus, market, watch, mint)
        one = {"limit": "reentry_cooldown_s"}
        reset = await client.delete("/limits", params=one, headers=AUTH)
        assert reset.status_code == 200, reset.text
        assert reset.json()["sources"]["reentry_cooldown_s"]["source"] == "settings"
        assert await decided(bus, market, watch, mint)


async def pumpflow_trading_limits(base: str, *argv: str) -> int:
    parsed = build_parser().parse_args(["trading", "limits", *argv, "--url", base])
    return await asyncio.wait_for(asyncio.to_thread(parsed.handler, parsed), 60)


async def test_the_cli_sets_shows_and_resets_the_limits_of_the_replica_trading(
    clock, pg_pool, monkeypatch, capsys
):
    """``pumpflow trading limits`` against the replica itself: ``--set`` a switch as
    false, a count and seconds (stored 0, 2, 300), shown with their source; a count
    with a fraction or a negative cooldown refused naming it, nothing stored; ``--reset
    NAME`` puts back that setting alone."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    service = trading(PostgresLedger(pg_pool), trading_add_to_positions=True)

    async def stored() -> dict[str, float]:
        return dict(await pg_pool.fetch("SELECT name, value FROM trading_limits"))

    async with run_embedded([service], clock=clock, synchronous=True) as system:
        async with local_app(create_app(service, system.contexts["trading"])) as base:
            argv = ("--set", "add_to_positions=false", "--set", "max_concurrent_positions=2",
                    "--set", "reentry_cooldown_s=300", "--reason", "the market turns")  # fmt: skip
            assert await pumpflow_trading_limits(base, *argv) == 0
            out = capsys.readouterr().out
            for line in ("add_to_positions false: the operator's (the market turns, at ",
                         "max_concurrent_positions 2: the operator's (the market turns",
                         "reentry_cooldown_s 300: the operator's (the market turns",
                         "max_daily_loss_fraction 0.05: the settings'"):  # fmt: skip
                assert line in out, out
            assert "; settings true\n" in out, out
            given = {"add_to_positions": 0.0, "max_concurrent_positions": 2.0,
                     "reentry_cooldown_s": 300.0}  # fmt: skip
            assert await stored() == given
            limits = service.risk.limits
            assert (limits.add_to_positions, limits.max_concurrent_positions) == (False, 2)
            assert limits.reentry_cooldown_s == 300.0

            for argv, named in [
                (("--set", "add_to_positions=true", "--set", "max_concurrent_positions=1.5"),
                 "max_concurrent_positions: input should be a valid integer"),
                (("--set", "reentry_cooldown_s=-1"), "reentry_cooldown_s: input should be "
                 "greater than or equal to 0"),
            ]:  # fmt: skip
                assert await pumpflow_trading_limits(base, *argv) == 1
                printed = capsys.readouterr()
                assert "422" in printed.err and named in printed.err, printed.err
                assert printed.out == ""
                assert await stored() == given
                assert service.risk.limits == limits

            assert await pumpflow_trading_limits(base, "--reset", "add_to_positions") == 0
            out = capsys.readouterr().out
            assert "add_to_positions true: the settings'" in out, out
            assert "reentry_cooldown_s 300: the operator's" in out, out
            assert await stored() == {
                "max_concurrent_positions": 2.0,
                "reentry_cooldown_s": 300.0,
            }
            assert service.risk.limits.add_to_positions is True
