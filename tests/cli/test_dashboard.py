"""``pumpflow run``'s live dashboard: what it draws from a real embedded run, and the
plain lines it leaves to logs and CI."""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console as RichConsole

from pumpflow.cli.console import Console
from pumpflow.cli.dashboard import (
    LIFECYCLE,
    RATED,
    Dashboard,
    RecentLines,
    exit_progress,
    wants_dashboard,
)
from pumpflow.cli.run import run_embedded_market
from pumpflow.common.clock import ReplayClock
from pumpflow.common.exit import ExitProgress
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.testing import eventually
from pumpflow.common.trading import TradingState
from pumpflow.trading.ledger import MemoryLedger
from pumpflow.trading.service import TradingService
from pumpflow.trading.settings import TradingSettings

FRAME = "pumpflow run +"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_the_dashboard_draws_the_run_live_and_the_plain_output_keeps_only_the_end(tmp_path):
    screen = RichConsole(file=io.StringIO(), force_terminal=True, width=150, height=50, record=True)
    out = io.StringIO()
    report = tmp_path / "run.html"
    status = await run_embedded_market(
        duration=3.0, speed=40.0, seed=7, launches_per_minute=60.0, every=1.0, out=out,
        screen=screen, report=report,
    )  # fmt: skip
    assert status == 0
    frames = screen.export_text().split(FRAME)[1:]
    # redrawn a few times a second for three seconds, and once more at the end
    assert len(frames) >= 6, len(frames)
    last = frames[-1]
    # a Ctrl-C stops the run; once it is stopping, another cuts its end short
    assert "|  Ctrl-C stops" in frames[0], frames[0]
    # the run ended at its duration: a first Ctrl-C in its end changes nothing
    assert "|  stopping: Ctrl-C twice ends now" in last.splitlines()[0], last
    for title in ("tokens by lifecycle state", "events: total, per real second", "trading (paper)",
                  "signals:", "open positions", "latest"):  # fmt: skip
        assert title in last, last
    for state in LIFECYCLE:
        assert re.search(rf"│ {state} +\d+", last), (state, last)
    tokens = int(re.search(r"tokens ([\d,]+)", last)[1].replace(",", ""))
    assert tokens > 20
    states = sum(int(re.search(rf"│ {s} +([\d,]+)", last)[1].replace(",", "")) for s in LIFECYCLE)
    assert states == tokens
    for kind in RATED:
        assert re.search(rf"{re.escape(kind)} +[\d,]+ +[\d,.]+/s", last), (kind, last)
    assert int(re.search(r"signals: ([\d,]+) predictions", last)[1].replace(",", "")) > 0
    for breaker in ("curve", "execution", "rate", "stale"):
        assert f"breaker {breaker}" in last, last
    # the graceful exit ran while the dashboard showed it: the kill switch is thrown
    assert "halted" in last and "NOT STORED" not in last
    assert re.search(r"graceful exit +\d+/\d+ sold out, \d+ in flight", last), last
    # the console's lines went to the dashboard, not to the plain output
    printed = out.getvalue()
    assert "trade subscriptions" not in printed.split("graceful exit")[0]
    assert "graceful exit (pumpflow run ended):" in printed
    lines = printed.strip().splitlines()
    assert lines[-2].startswith("run over:") and lines[-1] == f"report: {report}"
    row = r"graceful exit</td><td>\d+ of \d+ positions sold out"
    assert re.search(row, report.read_text()), "the report's row of the graceful exit"


async def test_the_dashboard_fits_80_columns_each_row_on_one_line(tmp_path):
    """On an 80-column terminal of rows enough the panels stack rather than squeeze, and a cell
    too long is cut with an ellipsis: no row wraps away from its label."""
    screen = RichConsole(file=io.StringIO(), force_terminal=True, width=80, height=60, record=True)
    status = await run_embedded_market(
        duration=3.0, speed=40.0, seed=7, launches_per_minute=60.0, every=1.0,
        out=io.StringIO(), screen=screen, report=tmp_path / "run.html",
    )  # fmt: skip
    assert status == 0
    last = FRAME + screen.export_text().split(FRAME)[-1]
    lines = last.rstrip("\n").splitlines()
    assert max(len(line) for line in lines) <= 80
    assert re.fullmatch(
        r"pumpflow run \+\d\d:\d\d market time at 40x  \|  stopping: Ctrl-C twice ends now *",
        lines[0],
    )
    assert re.fullmatch(
        r"tokens [\d,]+ \| trades [\d,]+ \| trade subscriptions \d+ \| graduated \d+ *", lines[1]
    ), lines[1]
    for title in ("tokens by lifecycle state", "events: total, per real second", "trading (paper)",
                  "signals: ", "open positions", "latest"):  # fmt: skip
        assert title in last, last
    for kind in RATED:
        assert re.search(rf"│ {re.escape(kind)} +[\d,]+ +[\d,.]+/s +│", last), (kind, last)
    for label in ("realised PnL", "open, marked"):
        assert re.search(rf"│ {label} +[+-]\d+\.\d{{4}} SOL +│", last), (label, last)
    assert re.search(r"│ positions +\d+ open, \d+ closed +│", last), last
    for breaker in ("curve", "execution", "rate", "stale"):
        assert re.search(rf"│ breaker {breaker} +(ok|TRIPPED.*) +│", last), (breaker, last)
    assert re.search(r"│ graceful exit +\d+/\d+ sold out, \d+ in flight +│", last), last
    assert re.search(r"│ token +score +state +mcap SOL │", last), last
    assert re.search(r"│ token +cost +worth +PnL │", last), last
    assert re.search(r"[\d,]+ orders \([\d,]+ rejected\)", last), last
    # the latest lines: each on a row of its own, the longest cut short
    latest = last.split(" latest ")[1].split("╰")[0].strip("─╮\n").splitlines()
    assert len(latest) >= 4
    assert all(re.match(r"│ \+\d\d:\d\d [A-Z]+ ", row) for row in latest), latest


def test_the_dashboard_only_on_a_terminal_and_not_when_plain_is_asked():
    assert wants_dashboard(False, _Terminal())
    assert not wants_dashboard(True, _Terminal())
    # a log file, CI's pipe, make run's output piped to a file
    assert not wants_dashboard(False, io.StringIO())


def test_recent_lines_keep_the_last_whole_lines():
    recent = RecentLines(size=2)
    print("one", file=recent)
    print("two", file=recent)
    recent.write("thr")
    assert list(recent.lines) == ["one", "two"]
    recent.write("ee\n")
    assert list(recent.lines) == ["two", "three"]


class _AwayLedger(MemoryLedger):
    """Trading's ledger, unable to store the operator's state while ``away`` (Postgres)."""

    away = True

    async def set_control(self, state: TradingState, reason: str, **stored: Any) -> None:
        if self.away:
            raise ConnectionError("the ledger is away")
        await super().set_control(state, reason, **stored)


def drawn(renderable) -> str:
    screen = RichConsole(file=io.StringIO(), width=150, height=60, record=True)
    screen.print(renderable)
    return screen.export_text()


async def test_the_trading_panel_says_a_halt_is_not_stored_until_it_is():
    clock = ReplayClock(1_700_000_000.0)
    ledger = _AwayLedger()
    config = TradingSettings.load(
        service="trading", transport="memory", trading_halt_store_wait_s=0.01
    )
    trading = TradingService(config, registry=CollectorRegistry(), ledger=ledger)
    async with run_embedded([trading], clock=clock, synchronous=True) as system:
        console = Console(system=system, clock=clock, speed=1.0, out=io.StringIO())
        dashboard = Dashboard(console, RecentLines())
        assert "NOT STORED" not in drawn(dashboard.render())

        answer = await trading.halt("the ledger is away")
        assert answer["stored"] is False
        assert re.search(r"state +halted, NOT STORED", drawn(dashboard.render()))

        ledger.away = False
        await eventually(
            lambda: trading.state_view()["operator_state_stored"], what="the halt stored"
        )
        shown = drawn(dashboard.render())
        assert re.search(r"state +halted", shown) and "NOT STORED" not in shown


def test_a_graceful_exits_unconfirmed_tranches_stand_out():
    progress = ExitProgress(
        started=True, done=False, positions=3, sold_out=1, in_flight=1,
        unconfirmed_tranches=2, unconfirmed_tokens=1.5e6, tranches=4,
        tokens_at_start=9e6, tokens_left=5e6, sol_recovered=0.4, elapsed_s=12.0,
        deadline_margin_s=48.0,
    )  # fmt: skip
    line = exit_progress(progress)
    assert line.plain == (
        "1/3 sold out, 1 in flight, 2 tranches UNCONFIRMED (1.5e+06 tokens may have sold)"
    )
    assert any(span.style == "bold red" for span in line.spans)
    one = exit_progress(replace(progress, unconfirmed_tranches=1))
    assert one.plain.endswith(", 1 tranche UNCONFIRMED (1.5e+06 tokens may have sold)")
    settled = exit_progress(replace(progress, unconfirmed_tranches=0, unconfirmed_tokens=0.0))
    assert settled.plain == "1/3 sold out, 1 in flight" and not settled.spans


def test_a_trading_events_line_counts_its_records_instead_of_listing_them():
    from pumpflow.cli.console import msgspec_line
    from pumpflow.common.events import BarrierPosition, ShutdownBarrier

    held = tuple(BarrierPosition(position_id=f"entry-{i}", mint=f"Mint{i}pump") for i in range(5))
    line = msgspec_line(ShutdownBarrier(reason="pumpflow run ended", positions=held))
    assert line == "reason='pumpflow run ended' entries=() positions=5"
    asked = ShutdownBarrier(reason="stop", positions=held[:1], request_id="r1")
    assert msgspec_line(asked) == "reason='stop' entries=() positions=1 request_id='r1'"


def test_a_position_not_marked_yet_shows_no_worth_in_the_plain_lines_as_on_the_dashboard():
    from types import SimpleNamespace

    from pumpflow.common.trading.positions import Position, PositionBook

    book = PositionBook()
    book.open_positions["Mint1pump"] = Position(
        position_id="entry-1", mint="Mint1pump", opened_at=0.0, tokens=5e6, cost_sol=0.224
    )
    system = SimpleNamespace(services={"trading": SimpleNamespace(book=book)})
    console = Console(system=system, clock=ReplayClock(0.0), speed=1.0, out=io.StringIO())
    (line,) = console.position_lines()
    # worth 0.000 beside a PnL of +0.0000 would say the tokens are worth nothing at no loss
    assert re.search(r"cost 0\.224 SOL +worth - +PnL", line), line


async def test_tokens_that_share_a_symbol_are_told_apart_by_their_mints():
    """Copycat tokens take a symbol already launched: each after the first shows its
    mint's start beside it, so two positions of "LASER" are not one."""
    from types import SimpleNamespace

    from pumpflow.common.testing import TokenEvents

    clock = ReplayClock(0.0)
    tokens = TokenEvents(clock)
    system = SimpleNamespace(services={})
    console = Console(system=system, clock=clock, speed=1.0, out=io.StringIO())
    first, copy, other, long, longer = (
        "LaSeR1pump", "CoPy22pump", "OtHeR3pump", "LoNg44pump", "LoNgEr5pump"
    )  # fmt: skip
    for mint, symbol in ((first, "LASER"), (copy, "LASER"), (other, "BONK"),
                         (long, "SOLBONKINU"), (longer, "SOLBONKINU")):  # fmt: skip
        await console.on_event(tokens.created(mint, symbol=symbol))
    # within the ten characters the dashboard's tables show of a name
    assert console.symbols() == {
        first: "LASER", copy: "LASER~CoPy", other: "BONK", long: "SOLBONKINU",
        longer: "SOLBO~LoNg",
    }  # fmt: skip


async def test_the_most_subscriptions_the_summary_gives_are_counted_between_status_lines():
    out = io.StringIO()
    # no status line in the run: the summary's figure is all the counting
    status = await run_embedded_market(
        duration=1.5, speed=20.0, seed=7, launches_per_minute=60.0, every=600.0, out=out
    )
    assert status == 0
    printed = out.getvalue()
    assert "trade subscriptions 1" not in printed  # no status line
    tokens = int(re.search(r"; (\d+) tokens, \d+ trades", printed)[1])
    most = int(re.search(r"at most (\d+) subscribed at once", printed)[1])
    # every token the feed was told of was subscribed to as it launched
    assert tokens > 0 and most > 0, printed


async def test_a_position_not_marked_yet_reads_unmarked_and_the_totals_say_they_leave_it_out():
    from pumpflow.common.trading.positions import Position

    clock = ReplayClock(1_700_000_000.0)
    config = TradingSettings.load(service="trading", transport="memory")
    trading = TradingService(config, registry=CollectorRegistry(), ledger=MemoryLedger())
    async with run_embedded([trading], clock=clock, synchronous=True) as system:
        trading.book.open_positions["Mint1pump"] = Position(
            position_id="entry-1", mint="Mint1pump", opened_at=0.0, tokens=5e6, cost_sol=0.224
        )
        console = Console(system=system, clock=clock, speed=1.0, out=io.StringIO())
        (line,) = console.position_lines()
        # a PnL of +0.0000 would say the tokens are worth their cost, which is unknown
        assert re.search(r"worth - +PnL unmarked$", line), line
        assert "unrealised +0.0000 SOL (1 unmarked, left out) (fees" in console.trading_line()
        shown = drawn(Dashboard(console, RecentLines()).render())
        totals = r"open, marked +\+0\.0000 SOL +│\n.*│ unmarked +1 open, left out +│"
        assert re.search(totals, shown), shown
        assert re.search(r"Mint1pump +0\.224 +- +unmarked", shown), shown


async def _busy_dashboard(system, trading: TradingService, clock) -> Dashboard:
    """A dashboard of 40 scored tokens, 8 open positions and 8 latest lines: more than
    any panel shows at once."""
    from pumpflow.common.events import ModelPrediction, make_event
    from pumpflow.common.testing import TokenEvents
    from pumpflow.common.trading.positions import Position

    console = Console(system=system, clock=clock, speed=10.0, out=io.StringIO())
    tokens = TokenEvents(clock)
    for i in range(40):
        mint = tokens.mint()
        await console.on_event(tokens.created(mint, symbol=f"TOKEN{i}"))
        score = ModelPrediction(
            mint=mint, model_id="m1", arm="a", feature_set_version="test", score=0.2 + i / 100
        )
        await console.on_event(make_event(score, source="model/test", time=clock.now()))
        if i < 8:
            trading.book.open_positions[mint] = Position(
                position_id=f"entry-{i}", mint=mint, opened_at=0.0, tokens=5e6, cost_sol=0.2,
                mark_value_sol=0.21,
            )  # fmt: skip
    recent = RecentLines()
    for i in range(8):
        print(f"+00:{i:02d} BOUGHT TOKEN{i}     0.200 SOL at 4.000e-08 SOL/token", file=recent)
    return Dashboard(console, recent)


def drawn_on(renderable, columns: int, rows: int) -> list[str]:
    screen = RichConsole(file=io.StringIO(), width=columns, height=rows, record=True)
    screen.print(renderable)
    return screen.export_text().rstrip("\n").splitlines()


@pytest.mark.parametrize(
    "columns, rows", [(80, 24), (80, 50), (100, 30), (120, 24), (120, 40), (200, 60)]
)
async def test_the_dashboard_fits_the_terminal_whole(columns, rows):
    """A terminal shows no more rows than it has: the live view crops the rest to "...",
    at 80x24 everything under the trading panel. Short of rows the tables and the latest
    lines shorten, the breakers take a row together and, narrow, the events panel goes."""
    clock = ReplayClock(1_700_000_000.0)
    config = TradingSettings.load(service="trading", transport="memory")
    trading = TradingService(config, registry=CollectorRegistry(), ledger=MemoryLedger())
    async with run_embedded([trading], clock=clock, synchronous=True) as system:
        dashboard = await _busy_dashboard(system, trading, clock)
        lines = drawn_on(dashboard.render(), columns, rows)
    shown = "\n".join(lines)
    assert len(lines) <= rows, shown
    assert max(len(line) for line in lines) <= columns, shown
    # the header whole: nothing of it cut
    assert re.search(r"graduated \d+ *$", "\n".join(lines[:2]), re.M), shown
    for title in ("tokens by lifecycle state", "trading (paper)", "signals: 40 predictions",
                  "open positions (8, ", "latest"):  # fmt: skip
        assert title in shown, (title, shown)
    assert re.search(r"│ TOKEN39 +0\.59 +new +0\.0 │", shown), shown
    assert re.search(r"│ TOKEN\d +0\.200 +0\.210 +\+0\.0100 │", shown), shown
    assert re.search(r"│ realised PnL +\+0\.0000 SOL", shown), shown
    assert re.search(r"│ positions +8 open, 0 closed", shown), shown
    assert re.search(r"│ breakers? .*ok", shown), shown
    assert re.search(r"│ \+00:07 BOUGHT TOKEN7 ", shown), shown
    assert ("events: total, per real second" in shown) == (columns >= 120 or rows >= 33), shown


async def test_a_resize_clears_the_screen_before_the_next_frame():
    """The terminal rewraps the frame on the screen when its width changes, and the live
    view's cursor moves up the rows it drew, not the rows they became: without a clear,
    the old frame's pieces stay above the new one."""
    import asyncio

    clear, frame = "\x1b[2J", "market time at"
    clock = ReplayClock(1_700_000_000.0)
    config = TradingSettings.load(service="trading", transport="memory")
    trading = TradingService(config, registry=CollectorRegistry(), ledger=MemoryLedger())
    async with run_embedded([trading], clock=clock, synchronous=True) as system:
        dashboard = await _busy_dashboard(system, trading, clock)
        out = io.StringIO()
        screen = RichConsole(file=out, force_terminal=True, width=120, height=40)
        drawing = asyncio.create_task(dashboard.run(screen, refresh_per_s=50.0))
        try:
            await eventually(lambda: out.getvalue().count(frame) >= 3, what="frames")
            assert clear not in out.getvalue()
            screen.size = (80, 24)

            def after_clear() -> str:
                return out.getvalue().partition(clear)[2]

            await eventually(lambda: "breakers " in after_clear(), 10.0, what="a frame at 80x24")
        finally:
            drawing.cancel()
    # one clear, then frames drawn from its top
    assert out.getvalue().count(clear) == 1
    assert after_clear().count(frame) >= 1


async def test_keys_pressed_under_the_dashboard_are_not_echoed_onto_it():
    """The terminal echoes a key where the cursor is, under the frame's last row (full
    width: onto a new line), and the next frame, drawn up from there, leaves its first row
    behind: a Ctrl-C's ``^C`` did so. The dashboard keeps the terminal from echoing while
    it draws and gives back the terminal's modes after."""
    import asyncio
    import os
    import pty
    import termios

    master, follower = pty.openpty()
    loop = asyncio.get_running_loop()
    # drained, the terminal never fills and blocks the frames' writes
    loop.add_reader(master, os.read, master, 1 << 16)
    clock = ReplayClock(1_700_000_000.0)
    config = TradingSettings.load(service="trading", transport="memory")
    trading = TradingService(config, registry=CollectorRegistry(), ledger=MemoryLedger())
    try:
        async with run_embedded([trading], clock=clock, synchronous=True) as system:
            dashboard = await _busy_dashboard(system, trading, clock)
            terminal = io.TextIOWrapper(io.FileIO(follower, "w", closefd=False))
            before = termios.tcgetattr(follower)
            assert before[3] & termios.ECHO and before[3] & termios.ECHOCTL
            screen = RichConsole(file=terminal, force_terminal=True, width=80, height=24)
            drawing = asyncio.create_task(dashboard.run(screen, refresh_per_s=50.0))
            try:
                modes = await eventually(
                    lambda: (m := termios.tcgetattr(follower)) != before and m, 10.0,
                    what="the terminal's modes changed",
                )  # fmt: skip
                assert not modes[3] & (termios.ECHO | termios.ECHOCTL)
            finally:
                drawing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drawing
            assert termios.tcgetattr(follower) == before
    finally:
        loop.remove_reader(master)
        os.close(master)
        os.close(follower)


async def test_a_frame_drawn_again_shows_the_figures_of_its_render():
    """The live view draws a frame again when a line is printed above it (a log line): it
    shows what was read when it was rendered, its signals still best first, not a mix of
    that order and the scores come since."""
    clock = ReplayClock(1_700_000_000.0)
    config = TradingSettings.load(service="trading", transport="memory")
    trading = TradingService(config, registry=CollectorRegistry(), ledger=MemoryLedger())
    async with run_embedded([trading], clock=clock, synchronous=True) as system:
        dashboard = await _busy_dashboard(system, trading, clock)
        frame = dashboard.render()
        for token in dashboard.console.tokens.values():
            token.score = 0.0
        for position in trading.book.open_positions.values():
            position.mark_value_sol = 0.1
        shown = "\n".join(drawn_on(frame, 80, 24))
    scores = [float(score) for score in re.findall(r"│ TOKEN\d+ +(\d\.\d\d) ", shown)]
    assert scores == [0.59, 0.58, 0.57, 0.56, 0.55], shown
    assert "-0.1000" not in shown and "+0.0100" in shown, shown


async def test_the_plain_status_line_writes_its_counts_as_the_dashboard_does():
    """Thousands grouped, as the dashboard's header and the run's summary write them."""
    from types import SimpleNamespace

    from pumpflow.common.testing import TokenEvents

    clock = ReplayClock(1_700_000_000.0)
    console = Console(
        system=SimpleNamespace(services={}), clock=clock, speed=1.0, out=io.StringIO()
    )
    tokens = TokenEvents(clock)
    for _ in range(1_001):
        await console.on_event(tokens.created())
    console.counts["token.trade"] = 12_345
    line = console.status_line()
    assert re.search(r" tokens 1,001 \| trades 12,345 \(", line), line


async def test_a_tokens_first_state_reads_without_a_previous_one():
    """--verbose prints each lifecycle change; a token's first has no state before it,
    and its line said ``None -> new``."""
    from types import SimpleNamespace

    from pumpflow.common.events import TokenLifecycle, make_event
    from pumpflow.common.testing import TokenEvents

    clock = ReplayClock(1_700_000_000.0)
    out = io.StringIO()
    console = Console(
        system=SimpleNamespace(services={}), clock=clock, speed=1.0, out=out, verbose=True
    )
    tokens = TokenEvents(clock)
    mint = tokens.mint()
    await console.on_event(tokens.created(mint, symbol="WIFHAT"))
    for previous, state, reason in ((None, "new", "first seen"), ("new", "active", "busy")):
        change = TokenLifecycle(mint=mint, state=state, previous_state=previous, reason=reason)
        await console.on_event(make_event(change, source="activity/test", time=clock.now()))
    first, then = out.getvalue().splitlines()[1:]
    assert re.fullmatch(r"\+00:00 WIFHAT +new \(first seen\)", first), first
    assert re.fullmatch(r"\+00:00 WIFHAT +new -> active \(busy\)", then), then


async def test_after_a_ctrl_c_the_header_says_another_ends_the_run_now(tmp_path):
    """The first Ctrl-C begins the graceful exit and the header says so: one more cuts it
    short."""
    import asyncio
    import os
    import signal

    from pumpflow.cli.run import STOP_SIGNALS, StopSignals

    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    screen = RichConsole(file=io.StringIO(), force_terminal=True, width=120, height=40, record=True)
    signals = StopSignals(terminal=True)

    async def interrupt() -> None:
        await eventually(lambda: screen.export_text(clear=False).count(FRAME) >= 2, what="frames")
        os.kill(os.getpid(), signal.SIGINT)

    try:
        interrupting = asyncio.create_task(interrupt())
        status = await run_embedded_market(
            duration=60.0, speed=40.0, seed=7, launches_per_minute=60.0, every=1.0,
            out=io.StringIO(), screen=screen, report=tmp_path / "run.html", signals=signals,
        )  # fmt: skip
        await interrupting
    finally:
        # the first signal left the process's own handlers, which end it at once
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert status == 0 and signals.received
    last = screen.export_text().split(FRAME)[-1]
    assert "|  stopping: Ctrl-C again ends now" in last.splitlines()[0], last


@pytest.mark.parametrize("columns, rows", [(80, 24), (80, 50), (120, 40)])
async def test_a_breakers_long_reason_is_cut_not_the_labels_beside_it(columns, rows):
    """A breaker tripped on a mint's frame has a reason longer than the trading panel is
    wide: it is cut with an ellipsis, and the panel's labels stay whole."""
    clock = ReplayClock(1_700_000_000.0)
    config = TradingSettings.load(service="trading", transport="memory")
    trading = TradingService(config, registry=CollectorRegistry(), ledger=MemoryLedger())
    async with run_embedded([trading], clock=clock, synchronous=True) as system:
        dashboard = await _busy_dashboard(system, trading, clock)
        # a mint of pump.fun's length, as the feed's frames carry
        mint = "6ms46Ddb2trzYkAfHbZMAQi1gQC53GV2RyGbRM1Kpump"
        reason = f"{mint} frame off the curve maths by 0.0123"
        trading.risk.breakers["curve"].fault(clock.now(), reason)
        shown = "\n".join(drawn_on(dashboard.render(), columns, rows))
    for label in ("state", "realised PnL", "open, marked", "fees", "exposure", "positions"):
        assert re.search(rf"│ {label} +\S", shown), (label, shown)
    assert re.search(r"│ breaker curve +TRIPPED 6ms46.*… │", shown), shown


async def test_a_sale_of_part_of_a_position_has_its_line():
    """A take-profit sells part of a position: its cost and the realised PnL change, and a
    line says why, as a sale of the whole does (that one's line is the position's close)."""
    from types import SimpleNamespace

    from pumpflow.common.events import OrderFilled, OrderRequested, make_event
    from pumpflow.common.testing import TokenEvents
    from pumpflow.common.trading.positions import Position, PositionBook

    clock = ReplayClock(1_700_000_000.0)
    book = PositionBook()
    system = SimpleNamespace(services={"trading": SimpleNamespace(book=book)})
    out = io.StringIO()
    console = Console(system=system, clock=clock, speed=1.0, out=out)
    tokens = TokenEvents(clock)
    mint = tokens.mint()
    await console.on_event(tokens.created(mint, symbol="WIFHAT"))
    book.open_positions[mint] = Position(
        position_id="entry-1", mint=mint, opened_at=0.0, tokens=2.5e6, cost_sol=0.119
    )

    async def sale(order_id: str, reason: str) -> None:
        for data in (
            OrderRequested(order_id=order_id, mint=mint, side="sell", token_amount=2.5e6,
                           reason=reason),
            OrderFilled(order_id=order_id, mint=mint, side="sell", token_amount=2.5e6,
                        sol_amount=0.1234, price=5e-8),
        ):  # fmt: skip
            await console.on_event(make_event(data, source="trading/test", time=clock.now()))

    await sale("exit-1", "take_profit_1")
    assert out.getvalue().splitlines()[-1] == (
        "+00:00 SOLD PART WIFHAT     for 0.123 SOL (take_profit_1); the rest held"
    )
    # the last of it sold: the position's close says so
    del book.open_positions[mint]
    await sale("exit-2", "take_profit_2")
    assert "take_profit_2" not in out.getvalue()
