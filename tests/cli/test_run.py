"""``pumpflow run`` stops without an alarming log line, at any speed, and leaves no
position open; one that does leave positions open says so, and its status is not 0."""

from __future__ import annotations

import io
import logging
import re

import pytest

from pumpflow.cli.run import (
    BARRIER_WAIT_S,
    NOT_FLAT,
    graceful_exit,
    run_embedded_market,
    run_exit_service,
)
from pumpflow.common.testing.trade_api import fake_trade_api


def market_refusals(message: str) -> bool:
    """The execution breaker over sales the market refused on slippage, and its recovery:
    on a thin, fast simulated curve a few refusals in a row happen by timing, and the
    breaker doing its job is no fault of the run (a stale or curve breaker still is)."""
    execution = "breaker execution" in message or "execution breaker" in message
    recovered = message.startswith("trading: state halted -> active")
    return (execution and ("slippage" in message or "recovered" in message)) or recovered


# at 60x a wall second is a market minute: the run keeps up with a core of its own; beside
# another worker on 2 cores it falls seconds behind, and the stale breaker rightly trips
@pytest.mark.alone
async def test_a_clean_fast_run_logs_no_warning_or_error_and_keeps_the_feed_lease(caplog):
    caplog.set_level(logging.INFO)
    out = io.StringIO()
    status = await run_embedded_market(
        duration=3.0, speed=60.0, seed=7, launches_per_minute=60.0, every=1.0, out=out
    )
    assert status == 0
    printed = out.getvalue()
    assert printed.splitlines()[-1].startswith("run over:"), printed[-2000:]
    # the end: trading stops entering, the exit service sells everything and reports
    assert "graceful exit (pumpflow run ended):" in printed, printed[-2000:]
    assert "open positions after the graceful exit: 0" in printed, printed[-2000:]
    alarming = [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING
        # the kill switch thrown by the shutdown is logged as it always is
        and "state active -> halted: shutdown" not in r.getMessage()
        and not market_refusals(r.getMessage())
    ]
    # e.g. "feed lease lost", or "connect ... failed" of a feed that outlived the simulator
    assert alarming == [], [f"{r.name}: {r.getMessage()}" for r in alarming]
    # the feed stopped before the simulator: it never saw its server go away
    noticed = [r.getMessage() for r in caplog.records if "reconnect" in r.getMessage()]
    assert noticed == []
    elected = [
        r for r in caplog.records if "elected" in r.getMessage() and "feed:" in r.getMessage()
    ]
    assert len(elected) == 1, "the feed was elected once and kept its lease"


async def test_the_environment_sets_the_runs_trading_settings(monkeypatch):
    """``pumpflow run``'s own entry score is a default: PUMPFLOW_TRADING_MIN_SCORE wins."""
    monkeypatch.setenv("PUMPFLOW_TRADING_MIN_SCORE", "1")
    out = io.StringIO()
    status = await run_embedded_market(
        duration=3.0, speed=60.0, seed=7, launches_per_minute=60.0, every=1.0, out=out
    )
    assert status == 0
    printed = out.getvalue()
    assert "BOUGHT" not in printed and "trading: 0 orders" in printed, printed[-2000:]
    assert "score # < 1" in printed


async def test_the_run_trades_on_paper_whatever_the_environment_says(monkeypatch, caplog):
    """A live trader's environment never sends the simulator's orders to the trade API:
    the run fills them on paper, and says it does; nothing it says asks for a setting to
    make it live."""
    caplog.set_level(logging.INFO)
    async with fake_trade_api("error") as api:
        for name, value in {
            "PUMPFLOW_TRADING_EXECUTOR": "live", "PUMPFLOW_TRADING_LIVE_ENABLED": "true",
            "PUMPPORTAL_API_KEY": "the-traders-key",
            "PUMPFLOW_TRADING_LIVE_WALLET": "So11111111111111111111111111111111111111112",
            "PUMPFLOW_TRADING_LIVE_URL": api.url,
        }.items():  # fmt: skip
            monkeypatch.setenv(name, value)
        out = io.StringIO()
        await run_embedded_market(
            duration=3.0, speed=60.0, seed=7, launches_per_minute=60.0, every=1.0, out=out,
            min_score=0.0,
        )  # fmt: skip
    assert api.requests == []
    assert "to trade real money" not in caplog.text
    printed = out.getvalue()
    assert "pumpflow run: trades on paper" in printed, printed[:2000]
    assert "trade API" not in printed, printed[-3000:]
    assert re.search(r"trading: \d+ orders, [1-9]\d* filled", printed), printed[-2000:]


async def test_the_runs_report_gives_each_arm_s_predictions_version_and_live_figures(
    monkeypatch, tmp_path
):
    """Arms compared in a run: the report says what each arm's model did, by version."""
    import json
    from html import unescape

    from pumpflow.common.model import read_model
    from pumpflow.model import DEFAULT_MODEL_PATH

    version = read_model(DEFAULT_MODEL_PATH)[1].version
    models = {"entry": str(DEFAULT_MODEL_PATH), "twin": str(DEFAULT_MODEL_PATH)}
    arms = [{"name": "control", "model_id": "entry"}, {"name": "twin", "model_id": "twin"}]
    monkeypatch.setenv("PUMPFLOW_MODEL_MODELS", json.dumps(models))
    monkeypatch.setenv("PUMPFLOW_MODEL_ARMS", json.dumps(arms))
    report = tmp_path / "run.html"
    status = await run_embedded_market(
        duration=3.0, speed=60.0, seed=7, launches_per_minute=60.0, every=1.0,
        out=io.StringIO(), report=report,
    )  # fmt: skip
    assert status == 0
    rows = dict(re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", unescape(report.read_text())))
    predicted = re.fullmatch(
        rf"([\d,]+): entry/control ([\d,]+) \(version {version}\), "
        rf"twin/twin ([\d,]+) \(version {version}\)",
        rows["predictions"],
    )
    assert predicted, rows["predictions"]
    total, control, twin = (int(n.replace(",", "")) for n in predicted.groups())
    assert control > 0 and twin > 0 and control + twin == total
    for figure in ("live AUC", "precision"):
        assert "entry/control" in rows[figure] and "twin/twin" in rows[figure], rows


@pytest.mark.parametrize("speed", [1.0, 20.0, 60.0])
def test_the_runs_exit_waits_for_tradings_barrier_in_wall_seconds(speed, monkeypatch):
    """The barrier comes as fast as trading handles the shutdown, in wall time: at 20x the
    service's 10 market seconds would be half a wall second, which a busy machine takes."""
    waits = run_exit_service(speed).settings.exit_barrier_wait_s
    assert waits / speed >= BARRIER_WAIT_S and waits >= 10.0
    monkeypatch.setenv("PUMPFLOW_EXIT_BARRIER_WAIT_S", "4")
    assert run_exit_service(speed).settings.exit_barrier_wait_s == 4.0


async def test_a_graceful_exit_that_leaves_positions_open_ends_the_run_non_zero(
    monkeypatch, capsys
):
    """A run that ends holding positions says how many and why, and its status is not 0:
    a script running it cannot tell from its output alone."""
    # a paper order fills 180 market seconds (3 wall seconds at 60x) after it is sent:
    # entries of the run's first seconds fill, whatever the price did meanwhile
    monkeypatch.setenv("PUMPFLOW_TRADING_PAPER_LATENCY_S", "180")
    monkeypatch.setenv("PUMPFLOW_TRADING_SLIPPAGE_PCT", "1000")
    # the graceful exit has no time: its sales get no outcome while it waits (0.05 s) and
    # it ends with them unconfirmed, trading still holding the positions
    monkeypatch.setenv("PUMPFLOW_EXIT_DEADLINE_S", "0.001")
    monkeypatch.setenv("PUMPFLOW_EXIT_ORDER_TIMEOUT_S", "0.05")
    out = io.StringIO()
    status = await run_embedded_market(
        duration=5.0, speed=60.0, seed=7, launches_per_minute=60.0, every=1.0, out=out,
        min_score=0.0,
    )  # fmt: skip
    printed = out.getvalue()
    held = re.search(r"open positions after the graceful exit: (\d+)", printed)
    assert held is not None, printed[-2000:]
    left = int(held[1])
    assert left > 0, printed[-2000:]
    assert status == NOT_FLAT
    said = [line for line in capsys.readouterr().err.splitlines() if "left open" in line]
    assert len(said) == 1, said
    assert re.match(rf"pumpflow run: {left} positions? left open after the graceful exit: "
                    r"it ended [\d.]+s past its deadline", said[0]), said  # fmt: skip
    assert "with sales that got no outcome" in said[0], said


#: a features vector inside every default entry filter of trading
GOOD_FEATURES = {
    "time_since_launch": 60.0,
    "curve_progress": 0.2,
    "creator_holding_share": 0.02,
    "creator_sold": 0.0,
    "buy_volume_sol_60s": 5.0,
    "unique_traders": 25.0,
    "top_buyer_share": 0.2,
    "price": 5e-8,
}


async def test_the_run_waits_for_a_sales_outcome_as_long_as_the_graceful_exit_does():
    """The graceful exit waits for a sale's outcome ``exit_order_timeout_s`` of wall time,
    past its deadline: the run waits as long, so a fill 11 wall seconds after the sale
    ends the run flat with the exit's report, not given up on 10 seconds after the
    deadline."""
    from pumpflow.common.clock import WallClock
    from pumpflow.common.events import (
        FeaturesUpdated,
        ModelPrediction,
        TokenLifecycle,
        make_event,
    )
    from pumpflow.common.priority import Priority
    from pumpflow.common.runtime.embedded import run_embedded
    from pumpflow.common.testing import EventCollector, TokenEvents, eventually
    from pumpflow.exit.service import ExitService
    from pumpflow.trading.service import TradingService

    speed = 60.0
    latency_s = 11.0 * speed  # a paper order fills 11 wall seconds after it is sent
    clock = WallClock(speed=speed)
    trader = TradingService(
        TradingService.settings_class.load(
            service="trading", transport="memory", trading_paper_latency_s=latency_s,
            trading_max_feed_lag_s=3600.0, trading_max_silence_s=3600.0,
        )
    )  # fmt: skip
    exits = ExitService(
        ExitService.settings_class.load(
            service="exit", transport="memory", exit_deadline_s=0.001,
            exit_order_timeout_s=30.0,
        )
    )  # fmt: skip
    tokens = TokenEvents(clock)
    out = io.StringIO()
    async with run_embedded([trader, exits], clock=clock) as system:
        watch = await EventCollector("watch").attach(system.bus, "order.*")
        mint, now = tokens.mint(), clock.now()
        features = FeaturesUpdated(
            mint=mint, feature_set_version="test", source_seq=1,
            names=tuple(GOOD_FEATURES), values=tuple(GOOD_FEATURES.values()),
        )  # fmt: skip
        lifecycle = TokenLifecycle(mint=mint, state="active", priority=int(Priority.URGENT))
        prediction = ModelPrediction(
            mint=mint, model_id="m1", arm="a", feature_set_version="test", score=0.9
        )
        for event in (
            tokens.created(mint, sol=0.5, trader="dev"),
            tokens.buy(mint, "alice", sol=3.0),
            make_event(features, source="features/test", time=now),
            make_event(lifecycle, source="activity/test", time=now),
            make_event(prediction, source="model/test", time=now),
        ):
            await system.bus.publish(event)
        (requested,) = await watch.wait_for(1, "order.requested")
        # a trade the stream stamps past the entry's latency fills it at once: past the
        # order's time, which a loaded machine puts wall seconds (minutes at 60x) after now
        filling = tokens.buy(mint, "bob", sol=0.1, time=requested.time + latency_s + 1)
        await system.bus.publish(filling)
        await eventually(lambda: len(exits.positions()) == 1, 10.0, what="the exit holds it")
        not_flat = await graceful_exit(
            system, clock=clock, speed=speed, out=out, names={mint: "WIFHAT"}
        )
    printed = out.getvalue()
    assert "did not end" not in printed, printed
    assert "graceful exit (pumpflow run ended): 1 position, 1 sold out" in printed, printed
    # each position by its token's name, as every other line of the run shows it
    assert re.search(r"^  WIFHAT +deadline +1 tranche", printed, re.M), printed
    assert "open positions after the graceful exit: 0" in printed, printed
    assert not_flat is None


def test_a_second_ctrl_c_under_the_dashboard_gives_the_terminal_its_modes_back():
    """The dashboard keeps the terminal from echoing keys; a second Ctrl-C ends the
    process at once, past the dashboard's own clean-up, and sets the terminal's modes back
    itself: the shell's next command would otherwise not see what is typed."""
    import os
    import pty
    import subprocess
    import sys
    import termios

    script = """
import asyncio, os, signal, sys
from pumpflow.cli.dashboard import keys_unechoed
from pumpflow.cli.run import StopSignals

async def main():
    signals = StopSignals(terminal=True)
    signals.install()
    with keys_unechoed(sys.stdout):
        os.kill(os.getpid(), signal.SIGINT)
        await signals.stop.wait()
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(30)

asyncio.run(main())
"""
    master, follower = pty.openpty()
    try:
        before = termios.tcgetattr(follower)
        assert before[3] & termios.ECHO
        proc = subprocess.run(
            [sys.executable, "-c", script], stdout=follower, stderr=subprocess.PIPE,
            text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 130, proc.stderr
        assert "a second interrupt cut" in proc.stderr, proc.stderr
        assert termios.tcgetattr(follower) == before
    finally:
        os.close(master)
        os.close(follower)
