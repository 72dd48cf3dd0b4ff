"""The live terminal dashboard of ``pumpflow run`` (rich), a few frames a second.

It draws what the run's :class:`~pumpflow.cli.console.Console` counted off the bus and
what the services show read-only (trading's book, risk state and breakers, the feed's
subscriptions, the graceful exit's progress): tokens by lifecycle state, event rates,
the model's signals, open positions, PnL and the breakers (a halt not stored yet and
tranches without an outcome in bold red), and the console's latest lines (entries,
sales, trading state changes). It changes nothing it reads. Without a terminal (a log, CI)
the run prints the console's plain status lines instead (:func:`wants_dashboard`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from rich.console import Console as RichConsole

    from pumpflow.cli.console import Console
    from pumpflow.common.exit import ExitProgress

LIFECYCLE = ("new", "active", "declining", "inactive", "graduated")
#: the event types whose rates are shown, in pipeline order
RATED = (
    "token.created", "token.trade", "features.updated", "token.lifecycle",
    "model.prediction", "order.requested", "order.filled", "position.closed",
)  # fmt: skip
#: wall seconds the event rates are averaged over
RATE_WINDOW_S = 2.0
REFRESH_PER_S = 4.0


def wants_dashboard(plain: bool, out: TextIO) -> bool:
    """The dashboard on a terminal unless ``--plain``; plain lines anywhere else."""
    isatty = getattr(out, "isatty", None)
    return not plain and isatty is not None and isatty()


class RecentLines:
    """A text sink keeping the last ``size`` lines printed to it (the console's, while the
    dashboard owns the screen)."""

    def __init__(self, size: int = 8):
        self.lines: deque[str] = deque(maxlen=size)
        self._partial = ""

    def write(self, text: str) -> int:
        *done, self._partial = (self._partial + text).split("\n")
        self.lines.extend(line for line in done if line)
        return len(text)

    def flush(self) -> None:
        pass


class Dashboard:
    """Render the state of an embedded run as one rich renderable."""

    def __init__(self, console: Console, recent: RecentLines, *, clock_wall=time.monotonic):
        self.console = console
        self.recent = recent
        self.clock_wall = clock_wall
        self._history: deque[tuple[float, Counter[str]]] = deque()

    # ---------------------------------------------------------------- figures

    def rates(self) -> dict[str, float]:
        """Events per wall second by type, over the last :data:`RATE_WINDOW_S`."""
        now, counts = self.clock_wall(), Counter(self.console.counts)
        self._history.append((now, counts))
        while len(self._history) > 2 and now - self._history[1][0] >= RATE_WINDOW_S:
            self._history.popleft()
        then, before = self._history[0]
        elapsed = now - then
        if elapsed <= 0:
            return dict.fromkeys(RATED, 0.0)
        return {kind: (counts[kind] - before[kind]) / elapsed for kind in RATED}

    def _trading(self) -> Any:
        trading = self.console.system.services.get("trading")
        return trading if getattr(trading, "risk", None) is not None else None

    # ---------------------------------------------------------------- panels

    def _header(self) -> Text:
        c = self.console
        return Text.assemble(
            ("pumpflow run ", "bold"),
            f"{c.market_clock()} market time at {c.speed:g}x  |  tokens {len(c.tokens):,}  |  "
            f"trades {c.counts['token.trade']:,}  |  trade subscriptions {c.subscribed()}  |  "
            f"graduated {len(c.graduated)}  |  Ctrl-C stops",
        )

    def _lifecycle(self) -> Panel:
        states = Counter(t.state for t in self.console.tokens.values())
        table = Table.grid(padding=(0, 2))
        table.add_column()
        table.add_column(justify="right")
        for state in LIFECYCLE:
            table.add_row(state, f"{states[state]:,}")
        return Panel(table, title="tokens by lifecycle state")

    def _rates(self) -> Panel:
        table = Table.grid(padding=(0, 2))
        table.add_column()
        table.add_column(justify="right")
        table.add_column(justify="right")
        for kind, rate in self.rates().items():
            table.add_row(kind, f"{self.console.counts[kind]:,}", f"{rate:,.1f}/s")
        return Panel(table, title="events: total, per second")

    def _trading_panel(self) -> Panel:
        trading = self._trading()
        if trading is None:
            return Panel("not running", title="trading")
        pnl, risk = trading.pnl(), trading.risk
        table = Table.grid(padding=(0, 2))
        table.add_column()
        table.add_column(justify="right")
        style = "green" if risk.state == "active" else "bold red"
        state = Text(str(risk.state), style=style)
        if not trading.state_view()["operator_state_stored"]:
            # the kill switch holds here only: a take-over or a restart would trade again
            state.append(", NOT STORED", style="bold red")
        table.add_row("state", state)
        table.add_row("realised PnL", _signed(pnl["realized_pnl_sol"]))
        table.add_row("open, marked", _signed(pnl["unrealized_pnl_sol"]))
        table.add_row("fees", f"{pnl['fees_sol']:.4f} SOL")
        table.add_row("exposure", f"{pnl['exposure_sol']:.3f} SOL")
        table.add_row(
            "positions", f"{pnl['open_positions']} open, {pnl['closed_positions']} closed"
        )
        for name, breaker in sorted(risk.breakers.items()):
            table.add_row(
                f"breaker {name}",
                Text(f"TRIPPED {breaker.reason}", style="bold red", no_wrap=True,
                     overflow="ellipsis") if breaker.tripped
                else Text("ok", style="green"),
            )  # fmt: skip
        exits = self.console.system.services.get("exit")
        progress = None if exits is None else exits.exit_progress()
        if progress is not None:
            table.add_row("graceful exit", exit_progress(progress))
        return Panel(table, title="trading (paper)")

    def _signals(self) -> Panel:
        c = self.console
        scored = [t for t in c.tokens.values() if t.score is not None and t.state != "inactive"]
        scored.sort(key=lambda t: t.score, reverse=True)
        table = Table(box=None, padding=(0, 1), expand=True)
        for column in ("token", "score", "state", "mcap SOL"):
            table.add_column(column, justify="left" if column == "token" else "right")
        for token in scored[:6]:
            table.add_row(
                token.symbol[:12], f"{token.score:.2f}", token.state,
                f"{token.features.get('market_cap_sol', 0.0):.1f}",
            )  # fmt: skip
        counts = c.counts
        title = (
            f"signals: {counts['model.prediction']:,} predictions, {counts['order.requested']:,} "
            f"orders ({counts['order.rejected']:,} rejected)"
        )
        return Panel(table, title=title)

    def _positions(self) -> Panel:
        trading = self._trading()
        held = [] if trading is None else list(trading.book.open_positions.values())
        held.sort(key=lambda p: p.pnl_sol, reverse=True)
        table = Table(box=None, padding=(0, 1), expand=True)
        for column in ("token", "cost SOL", "worth SOL", "PnL SOL"):
            table.add_column(column, justify="left" if column == "token" else "right")
        for position in held[:6]:
            token = self.console.tokens.get(position.mint)
            worth = position.mark_value_sol
            table.add_row(
                token.symbol[:12] if token else position.mint[:12], f"{position.cost_sol:.3f}",
                "-" if worth is None else f"{worth:.3f}", _signed(position.pnl_sol, unit=""),
            )  # fmt: skip
        more = f", {len(held) - 6} more" if len(held) > 6 else ""
        return Panel(table, title=f"open positions ({len(held)}{more})")

    def _recent(self) -> Panel:
        lines = list(self.recent.lines) or ["(nothing yet)"]
        return Panel("\n".join(lines), title="latest")

    def render(self) -> Group:
        top = Table.grid(expand=True, padding=(0, 1))
        for _ in range(3):
            top.add_column(ratio=1)
        top.add_row(self._lifecycle(), self._rates(), self._trading_panel())
        middle = Table.grid(expand=True, padding=(0, 1))
        middle.add_column(ratio=1)
        middle.add_column(ratio=1)
        middle.add_row(self._signals(), self._positions())
        return Group(self._header(), top, middle, self._recent())

    async def run(self, screen: RichConsole, refresh_per_s: float = REFRESH_PER_S) -> None:
        """Redraw on ``screen`` until cancelled; rendering happens on the event loop, so it
        reads the services between their handlers, never during one."""
        from rich.live import Live

        with Live(self.render(), console=screen, auto_refresh=False) as live:
            try:
                while True:
                    await asyncio.sleep(1.0 / refresh_per_s)
                    live.update(self.render(), refresh=True)
            finally:
                live.update(self.render(), refresh=True)


def exit_progress(progress: ExitProgress) -> Text:
    """A graceful exit's progress in a line; tranches without an outcome stand out."""
    text = Text(
        f"{progress.sold_out}/{progress.positions} sold out, {progress.in_flight} in flight",
        no_wrap=True,
        overflow="ellipsis",
    )
    if progress.unconfirmed_tranches:
        text.append(
            f", {progress.unconfirmed_tranches} tranches UNCONFIRMED "
            f"({progress.unconfirmed_tokens:.6g} tokens may have sold)",
            style="bold red",
        )
    return text


def _signed(value: float, unit: str = " SOL") -> Text:
    return Text(f"{value:+.4f}{unit}", style="green" if value > 0 else "red" if value < 0 else "")
