"""``pumpflow run``: the whole system in one process on a simulated market.

The simulator serves PumpPortal's protocol on a local socket; the feed, features,
activity, model, trading (paper) and exit services run embedded over the in-memory bus
and store, on a clock that runs ``--speed`` times faster than the wall so the simulator
and the services agree on event time. On a terminal a live dashboard
(:mod:`pumpflow.cli.dashboard`) shows tokens by lifecycle state, event rates, the
model's signals, open positions, PnL and the breakers; with ``--plain`` or without a
terminal (a log, CI) a console subscriber prints status lines. No servers are needed.
At the end (``--duration``, Ctrl-C or SIGTERM) trading's kill switch stops entries, a
``system.shutdown`` has the exit service sell every open position, its report is
printed, and the HTML report is written (:mod:`pumpflow.report`; its path last).

Exit status: 0 the run ended flat; 1 it did not (:data:`NOT_FLAT`: trading still holds
positions after the graceful exit, or the exit never reported; one line on stderr says
how many and why), or the reader of its output left; 2 a bad setting; 130 a second
Ctrl-C (143 a second SIGTERM) cut the run's end short (:class:`StopSignals`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import msgspec

from pumpflow.common.runtime.arguments import non_negative, positive, probability
from pumpflow.common.text import counted

if TYPE_CHECKING:
    from rich.console import Console as RichConsole

#: the entry score of the run's paper trading. The shipped model's scores on the
#: simulator's market peak near 0.6 (seed 7's first 10 market minutes, the run's
#: default: 10,522 predictions, median 0.22, 99th percentile 0.60, highest 0.74), so
#: the service's default (0.6) would pass under 1% of them to trading's filters; 0.5
#: passes the top ~4%, enough to show positions and PnL.
RUN_MIN_SCORE = 0.5
#: the run's paper trading lets the creator-sold filter go: on the simulator's market
#: most tokens scored 0.5 or more had a creator sale (seed 7, the run's 10 market
#: minutes: with the filter 2 positions, 9,313 predictions refused for it; without, 20
#: positions), so with it the run would show next to no trading
RUN_SETTINGS = {"trading_reject_creator_sold": False}
#: how the run and a backtest trade, whatever the environment or the config file says:
#: their markets are simulated or past (a recording's mints are real tokens), and an
#: order of theirs sent to the trade API would spend the wallet's SOL now
PAPER = {"trading_executor": "paper", "trading_live_enabled": False}


def paper_note(command: str) -> str | None:
    """The line telling that ``command`` trades on paper though the settings ask for live
    trading (None: they do not)."""
    from pumpflow.common.runtime.settings import SettingsError
    from pumpflow.trading.service import TradingService

    settings_class = TradingService.settings_class
    try:
        settings = settings_class.load(service="trading", transport="memory")
    except SettingsError:  # the command's own load says what is wrong
        return None
    asked = [key for key, paper in PAPER.items() if getattr(settings, key) != paper]
    if not asked:
        return None
    variables = settings_class.variables()
    given = ", ".join(f"{variables[key]}={str(getattr(settings, key)).lower()}" for key in asked)
    return f"pumpflow {command}: trades on paper; the settings' live trading ({given}) is not used"


#: the stale breaker's feed lag in wall seconds (the service's default, in market ones)
FEED_LAG_S = 2.0
#: the stale breaker's silence in wall seconds: at 60x the service's 30 market seconds
#: are half a wall second, which a busy machine's scheduler alone can take from the loop
SILENCE_S = 3.0
#: wall seconds the graceful exit waits for trading's barrier (what trading had in flight
#: when it halted): trading sends it as it handles the shutdown, which a busy machine can
#: put off a second or more, and the service's 10 market seconds are half a wall second
#: at 20x; an entry in flight that fills after the exit ended stays open
BARRIER_WAIT_S = 3.0
#: wall seconds the run gives the graceful exit past its deadline and the wait for the
#: outcome of a sale sent at it: the exit's records and its look at them (a second)
EXIT_GRACE_S = 10.0
#: the exit status of a run whose graceful exit left positions open or never reported:
#: 1, as any command's that did not do what it was asked (``pumpflow stop``'s too)
NOT_FLAT = 1
#: the signals that end a run: the first gracefully, another at once
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run pumpflow embedded on a simulated market (one process, no servers)",
        description=(
            "Run the simulator, feed, features, activity, model, trading (paper) and exit "
            "services in one process over the in-memory bus, and print the market, positions "
            "and PnL as they go. Ctrl-C stops cleanly, selling every position held; a second "
            "Ctrl-C stops at once, cutting the graceful exit, the report or the teardown "
            "short (a line on stderr says which). Exit status 0 when it ends flat; 1 when "
            "positions are left open (or the graceful exit never reported: a line on stderr "
            "says how many and why), or when the reader of its output left; 2 on a bad "
            "setting; 130 when a second Ctrl-C cut its end short."
        ),
    )
    parser.add_argument(
        "--duration",
        type=non_negative,
        default=60.0,
        help="real seconds to run; 0 runs until Ctrl-C (60)",
    )
    parser.add_argument(
        "--speed", type=positive, default=10.0, help="market time per real second (10)"
    )
    parser.add_argument("--seed", type=int, default=7, help="simulator seed (7)")
    parser.add_argument(
        "--launches", type=positive, default=30.0, help="token launches per market minute (30)"
    )
    parser.add_argument(
        "--every", type=positive, default=2.0, help="real seconds between plain status lines (2)"
    )
    parser.add_argument(
        "--min-score",
        type=probability,
        default=None,
        help=f"model score trading enters on (PUMPFLOW_TRADING_MIN_SCORE, else {RUN_MIN_SCORE:g})",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print every creation and lifecycle change"
    )
    parser.add_argument(
        "--plain", action="store_true",
        help="plain status lines instead of the live dashboard (always so without a terminal)",
    )  # fmt: skip
    parser.add_argument(
        "--report", metavar="FILE.html", help="the HTML report at the end (reports/run-...html)"
    )
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    from pumpflow.cli.dashboard import wants_dashboard
    from pumpflow.cli.report import default_path, report_writable

    report = report_writable(
        args.report or default_path("run", f"seed{args.seed}"), flag="--report"
    )
    screen = _screen() if wants_dashboard(args.plain, sys.stdout) else None
    signals = StopSignals(terminal=screen is not None)
    code = asyncio.run(
        run_embedded_market(
            duration=args.duration,
            speed=args.speed,
            seed=args.seed,
            launches_per_minute=args.launches,
            every=args.every,
            verbose=args.verbose,
            min_score=args.min_score,
            report=report,
            screen=screen,
            signals=signals,
        )
    )
    return signals.end(code)


def _screen() -> RichConsole:
    from rich.console import Console as RichConsole

    return RichConsole()


async def run_embedded_market(
    *,
    duration: float,
    speed: float,
    seed: int,
    launches_per_minute: float,
    every: float,
    verbose: bool = False,
    out: TextIO = sys.stdout,
    min_score: float | None = None,
    report: str | Path | None = None,
    screen: RichConsole | None = None,
    signals: StopSignals | None = None,
) -> int:
    """Run the embedded system for ``duration`` real seconds (0: until interrupted, or
    until the reader of ``out`` leaves); write the HTML report to ``report`` at the end.
    With a ``screen`` the live dashboard draws on it; without, the console prints plain
    status lines every ``every`` seconds. ``signals`` stop it (SIGINT and SIGTERM: their
    own, taken for the run, unless given)."""
    from pumpflow.activity.service import ActivityService
    from pumpflow.cli.console import Console
    from pumpflow.cli.dashboard import Dashboard, RecentLines
    from pumpflow.cli.output import READER_GONE, LeavableOutput
    from pumpflow.common.clock import WallClock
    from pumpflow.common.runtime.embedded import run_embedded
    from pumpflow.features.service import FeaturesService
    from pumpflow.feed.service import FeedService
    from pumpflow.model.service import ModelService
    from pumpflow.report import html
    from pumpflow.report.gather import Collector, model_figures, stream_performance
    from pumpflow.report.results import auc_text, precision_text, predictions_text
    from pumpflow.simulator.market import Market, MarketConfig
    from pumpflow.simulator.server import SimulatorServer
    from pumpflow.trading.service import TradingService

    # the run's own trading defaults: what the environment or the config file sets, or
    # --min-score, wins; a bad value is refused before the simulator starts
    trading = TradingService(
        TradingService.settings_class.load_with_defaults(
            {
                "trading_min_score": RUN_MIN_SCORE,
                # lag is judged in market seconds: a wall-clock hiccup counts ``speed`` times
                "trading_max_feed_lag_s": FEED_LAG_S * max(1.0, speed),
                "trading_max_silence_s": max(30.0, SILENCE_S * speed),
                "trading_max_token_silence_s": max(30.0, SILENCE_S * speed),
                **RUN_SETTINGS,
            },
            service="trading",
            transport="memory",
            **({} if min_score is None else {"trading_min_score": min_score}),
            **PAPER,
        )
    )
    exits = run_exit_service(speed)
    clock = WallClock(speed=speed)
    market = Market(MarketConfig(seed=seed, launches_per_minute=launches_per_minute))
    server = SimulatorServer(market=market, speed=speed)
    await server.start()
    signals = signals or StopSignals(terminal=screen is not None)
    stop = signals.stop
    # a reader gone (``| head``) stops the run as Ctrl-C does
    out = LeavableOutput(out, on_gone=stop.set)
    signals.install()
    signals.cutting = (
        "the graceful exit",
        "positions it had not sold stay open; no report is written",
    )
    not_flat: str | None = None
    try:
        feed = FeedService(
            FeedService.settings_class.load(
                service="feed",
                transport="memory",
                pumpportal_ws_url=server.url,
                feed_record=False,
            )
        )
        async with run_embedded(
            [feed, FeaturesService, ActivityService, ModelService, trading, exits],
            clock=clock,
            # the model measures its live precision where trading enters
            settings={"trading_min_score": trading.settings.trading_min_score},
        ) as system:
            # under the dashboard the console's lines go to its "latest" panel
            recent = RecentLines()
            console = Console(
                system=system, clock=clock, speed=speed, verbose=verbose,
                out=out if screen is None else recent,
            )  # fmt: skip
            await console.attach()
            collector = Collector()
            await collector.attach(system.bus)
            print(
                f"pumpflow embedded: simulator {server.url} at {speed:g}x, seed {seed}, "
                f"{launches_per_minute:g} launches/min; services: "
                f"{', '.join(system.services)}. Ctrl-C stops.",
                file=out,
                flush=True,
            )
            if (note := paper_note("run")) is not None:
                print(note, file=out, flush=True)
            if screen is None:
                status = asyncio.create_task(console.status_loop(every))
            else:
                dashboard = Dashboard(console, recent, interrupted=lambda: signals.received)
                status = asyncio.create_task(dashboard.run(screen))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(duration or None):
                    await stop.wait()
            # the dashboard goes on showing the sales; the exit's report follows it
            exit_report = out if screen is None else io.StringIO()
            not_flat = await graceful_exit(
                system, clock=clock, speed=speed, out=exit_report, names=console.symbols()
            )
            signals.cutting = ("the run's end", "no report is written")
            status.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await status
            if screen is not None:
                out.write(exit_report.getvalue())
                console.out = out
            # the feed before the simulator: a feed whose server went away first would
            # try to reconnect; and with the stream ended the drain on exit has an end
            await system["feed"].stop()
        console.print_summary()
        if report is not None:
            # read from the stopped system: its ledger and model stay in memory
            performance = await stream_performance(system["model"])
            results = await collector.results(
                system, title=f"pumpflow run: seed {seed}",
                source=f"simulated market, seed {seed}, {launches_per_minute:g} launches a "
                f"minute, at {speed:g}x", performance=performance,
            )  # fmt: skip
            figures = model_figures(system["model"], performance)
            notes = {
                "market minutes": f"{(clock.now() - console.started_at) / 60:.1f}",
                "tokens / trades": f"{console.counts['token.created']:,} / "
                f"{console.counts['token.trade']:,}",
                "predictions": predictions_text(
                    console.counts["model.prediction"], figures.predicted
                ),
                "live AUC": auc_text(figures.auc),
                "precision": precision_text(figures.precision, figures.selected),
            }
            summary = system["exit"].summary
            if summary is not None:
                notes["graceful exit"] = graceful_exit_note(summary)
            signals.cutting = ("the report", f"{report} and its results may be missing or cut")
            path = html.write(msgspec.structs.replace(results, notes=notes), report)
            print(f"report: {path}", file=out, flush=True)
        signals.cutting = (
            "the teardown",
            "nothing is lost" + ("" if report is None else ", the report is written"),
        )
    finally:
        signals.release()
        await server.stop()
    if not_flat is not None:
        # last, under the report's path: what a script or the person at the terminal sees
        print(f"pumpflow run: {not_flat}", file=sys.stderr, flush=True)
        return NOT_FLAT
    return READER_GONE if out.gone else 0


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM of a run: the first sets :attr:`stop`, and the run
    ends gracefully; another after it means stop now, wherever the run's end is, up to
    the process's exit (:meth:`end`). That one ends the process at once, its teardown
    abandoned, with one line on stderr naming what it cut short and what that leaves
    (:attr:`cutting`) and the shell's status for the signal: 130 for Ctrl-C."""

    def __init__(self, *, terminal: bool = False):
        self.stop = asyncio.Event()
        #: the live dashboard draws on the terminal, its cursor hidden
        self.terminal = terminal
        #: what a second signal would cut short, and what that leaves undone
        self.cutting = ("the run", "what it had not done is left undone")
        self.received = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: sets the terminal's modes back as they were at :meth:`install`
        self._restore_modes: Callable[[], None] = lambda: None

    def install(self) -> None:
        """Take the signals on the running loop until the first comes; on a terminal, keep
        its modes to set back at a second (the dashboard stops its echo)."""
        from pumpflow.cli.dashboard import restore_modes, terminal_modes

        self._loop = asyncio.get_running_loop()
        if self.terminal:
            # imported now: a signal handler must not import (it may interrupt an import)
            modes = terminal_modes(sys.stdout)
            self._restore_modes = lambda: restore_modes(modes)
        for sig in STOP_SIGNALS:
            self._loop.add_signal_handler(sig, self._first)

    def release(self) -> None:
        """Give the signals back, unless one came: the run is ending for it, and the
        next one ends the process, however far its end has got."""
        if not self.received:
            for sig in STOP_SIGNALS:
                self._loop.remove_signal_handler(sig)

    def end(self, code: int) -> int:
        """``code``, the run's status; once a signal came, the process ends here with it,
        its output flushed. The interpreter's exit gives the signals back to the system
        before its modules' teardown, a moment in which another would kill the process
        with no word."""
        if self.received:
            _flush_standard_streams()
            os._exit(code)
        return code

    def _first(self) -> None:
        self.received = True
        self.stop.set()
        # the process's own handler, not the loop's: it acts after the loop is closed too
        # (asyncio.run's teardown), and while a call blocks the loop (the report's writing)
        for sig in STOP_SIGNALS:
            self._loop.remove_signal_handler(sig)
            signal.signal(sig, self._again)

    def _again(self, signum: int, frame: object) -> None:
        what, leaves = self.cutting
        name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        _flush_standard_streams()
        # past the streams' buffers: the handler may have interrupted a write to them
        with contextlib.suppress(OSError):
            if self.terminal:
                self._restore_modes()
                os.write(1, b"\x1b[?25h\n")
            line = f"pumpflow run: a second {name} cut {what} short: {leaves}\n"
            os.write(2, line.encode())
        os._exit(128 + signum)


def _flush_standard_streams() -> None:
    """Write what the streams hold before the process ends without the interpreter's exit;
    a reader gone or a write the caller interrupted keeps it."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, RuntimeError, ValueError, AttributeError):
            stream.flush()


def run_exit_service(speed: float):
    """The run's exit service: its waits on other services in wall seconds at ``speed``
    (the environment or the config file wins)."""
    from pumpflow.exit.service import ExitService

    return ExitService(
        ExitService.settings_class.load_with_defaults(
            {"exit_barrier_wait_s": max(10.0, BARRIER_WAIT_S * speed)},
            service="exit",
            transport="memory",
        )
    )


async def graceful_exit(
    system, *, clock, speed: float, out: TextIO, names: Mapping[str, str] | None = None
) -> str | None:
    """Publish ``system.shutdown`` (trading stops entering, exit sells what is held) and
    print the exit service's report, its tokens by their ``names`` (by mint); why the run
    did not end flat (None: it did)."""
    from pumpflow.common.events import SystemShutdown, make_event

    exits = system["exit"]
    shutdown = SystemShutdown(reason="pumpflow run ended")
    await system.bus.publish(make_event(shutdown, source="run", time=clock.now()))
    # the deadline is on the run's clock; a sale sent at it waits for its outcome in wall
    # seconds, its tokens unconfirmed only after exit_order_timeout_s
    settings = exits.settings
    wall_s = settings.exit_deadline_s / speed + settings.exit_order_timeout_s + EXIT_GRACE_S
    try:
        async with asyncio.timeout(wall_s):
            await _finished(exits)
    except TimeoutError:
        ended = False
        print(f"pumpflow: the graceful exit did not end within {wall_s:.0f}s", file=out)
    else:
        ended = True
        if exits.summary is not None:
            print(exits.summary.text(names), file=out, flush=True)
    left = system["trading"].book.open_count
    print(f"open positions after the graceful exit: {left}", file=out, flush=True)
    if not ended:
        return _left_open(left, f"it did not end within {wall_s:.0f}s")
    return not_flat_reason(left, exits.summary)


def not_flat_reason(left: int, summary) -> str | None:
    """Why a graceful exit that ended (its ``GracefulExitSummary``, None if it failed
    before one) leaves the system not flat, with ``left`` positions still held; None
    when it is flat. ``pumpflow run`` counts them in trading's book (a sale the exit's
    report counts unconfirmed may have filled since); ``pumpflow stop``, which reads
    only the exit's API, in the report."""
    if summary is None:
        return _left_open(left, "it ended without its report (the exit service's log says why)")
    if not left:
        return None
    margin = summary.deadline_margin_s
    when = f"{-margin:.1f}s past its deadline" if margin < 0 else "before its deadline"
    return _left_open(
        left,
        f"it ended {when} (exit_deadline_s {summary.deadline - summary.started_at:g}); its "
        f"report: {summary.positions_left} of {summary.positions} not sold out, "
        f"{len(summary.without_outcome)} with sales that got no outcome",
    )


def _left_open(left: int, why: str) -> str:
    return f"{counted(left, 'position')} left open after the graceful exit: {why}"


def graceful_exit_note(summary) -> str:
    """The report's row of a graceful exit (a ``GracefulExitSummary``): what it sold and,
    in capitals, the tranches whose outcome never came."""
    note = (
        f"{summary.positions - summary.positions_left:,} of "
        f"{counted(summary.positions, 'position')} sold out in "
        f"{counted(summary.tranches, 'tranche')}, {summary.sol_recovered:.4f} SOL recovered"
    )
    unconfirmed = summary.unconfirmed
    if unconfirmed:
        note += (
            "; UNCONFIRMED: "
            f"{counted(sum(line.unconfirmed_tranches for line in unconfirmed), 'tranche')} "
            f"of {counted(len(unconfirmed), 'position')} got no outcome, their "
            f"{sum(line.unconfirmed_tokens for line in unconfirmed):.6g} tokens may have sold"
        )
    awaiting = summary.awaiting
    if awaiting:
        note += (
            f"; AWAITING: rule sales of {counted(len(awaiting), 'position')} got no outcome, their "
            f"{sum(line.pending_tokens for line in awaiting):.6g} tokens still held or sold"
        )
    return note


async def _finished(exits) -> None:
    await exits.began.wait()
    await exits.finished.wait()
