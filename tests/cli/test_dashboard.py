"""``pumpflow run``'s live dashboard: what it draws from a real embedded run, and the
plain lines it leaves to logs and CI."""

from __future__ import annotations

import io
import re

from rich.console import Console as RichConsole

from pumpflow.cli.dashboard import LIFECYCLE, RATED, RecentLines, wants_dashboard
from pumpflow.cli.run import run_embedded_market

FRAME = "pumpflow run +"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_the_dashboard_draws_the_run_live_and_the_plain_output_keeps_only_the_end(tmp_path):
    screen = RichConsole(file=io.StringIO(), force_terminal=True, width=150, record=True)
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
    for title in ("tokens by lifecycle state", "events: total, per second", "trading (paper)",
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
    assert "halted" in last
    # the console's lines went to the dashboard, not to the plain output
    printed = out.getvalue()
    assert "trade subscriptions" not in printed.split("graceful exit")[0]
    assert "graceful exit (pumpflow run ended):" in printed
    lines = printed.strip().splitlines()
    assert lines[-2].startswith("run over:") and lines[-1] == f"report: {report}"
    assert report.exists()


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
