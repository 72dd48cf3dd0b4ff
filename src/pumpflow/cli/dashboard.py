"""The live terminal dashboard of ``pumpflow run`` (rich), a few frames a second.

It draws what the run's :class:`~pumpflow.cli.console.Console` counted off the bus and
what the services show read-only (trading's book, risk state and breakers, the feed's
subscriptions, the graceful exit's progress): tokens by lifecycle state, event rates,
the model's signals, open positions, PnL and the breakers (a halt not stored yet and
tranches without an outcome in bold red), and the console's latest lines (entries,
sales, trading state changes). It changes nothing it reads. Without a terminal (a log, CI)
the run prints the console's plain status lines instead (:func:`wants_dashboard`).

It fits the terminal down to 80 columns: narrower than :data:`WIDE_COLUMNS` the trading
panel takes a row of its own, and a cell too long for its column is cut with an
ellipsis, never wrapped onto a line its label does not share.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pumpflow.common.text import counted
from pumpflow.report.results import UNMARKED

if TYPE_CHECKING:
    from rich.console import Console as RichConsole
    from rich.console import ConsoleOptions, RenderResult

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
#: narrower than this, the top row's three panels do not fit side by side: the trading
#: panel takes a row of its own
WIDE_COLUMNS = 120
#: the most of a token's symbol (or mint) shown in a table: at 80 columns the signals'
#: and the positions' tables then fit side by side without cutting a figure
TOKEN_CHARS = 10


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


class _FitWidth:
    """A renderable laid out for the width it is drawn at, by ``layout(width)``."""

    def __init__(self, layout: Callable[[int], RenderableType]):
        self.layout = layout

    def __rich_console__(self, console: RichConsole, options: ConsoleOptions) -> RenderResult:
        yield self.layout(options.max_width)


def _grid(*justify: str) -> Table:
    """A borderless table of one-line cells, a column per ``justify``: a cell too long is
    cut with an ellipsis (a wrapped row would no longer line up with its label)."""
    table = Table.grid(padding=(0, 2))
    for side in justify:
        table.add_column(justify=side, no_wrap=True, overflow="ellipsis")
    return table


def _headed(*headers: str) -> Table:
    """A table of one-line cells under ``headers``: the first column, the token, left and
    cut at :data:`TOKEN_CHARS` (the figures beside it keep their width), the figures right."""
    table = Table(box=None, padding=(0, 1), expand=True, pad_edge=False, collapse_padding=True)
    for header in headers:
        first = not table.columns
        table.add_column(
            header, justify="left" if first else "right", no_wrap=True, overflow="ellipsis",
            max_width=TOKEN_CHARS if first else None,
        )  # fmt: skip
    return table


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

    def _header(self) -> tuple[Text, str]:
        """The run's time, and its counts (one line on a wide screen, two on a narrow)."""
        c = self.console
        when = Text.assemble(
            ("pumpflow run ", "bold"),
            f"{c.market_clock()} market time at {c.speed:g}x  |  Ctrl-C stops",
        )
        counts = (
            f"tokens {len(c.tokens):,}  |  trades {c.counts['token.trade']:,}  |  "
            f"trade subscriptions {c.subscribed()}  |  graduated {len(c.graduated)}"
        )
        return when, counts

    def _lifecycle(self) -> Panel:
        states = Counter(t.state for t in self.console.tokens.values())
        table = _grid("left", "right")
        for state in LIFECYCLE:
            table.add_row(state, f"{states[state]:,}")
        return Panel(table, title="tokens by lifecycle state")

    def _rates(self) -> Panel:
        table = _grid("left", "right", "right")
        for kind, rate in self.rates().items():
            table.add_row(kind, f"{self.console.counts[kind]:,}", f"{rate:,.1f}/s")
        return Panel(table, title="events: total, per second")

    def _trading_panel(self) -> Panel:
        trading = self._trading()
        if trading is None:
            return Panel("not running", title="trading")
        pnl, risk = trading.pnl(), trading.risk
        table = _grid("left", "right")
        style = "green" if risk.state == "active" else "bold red"
        state = Text(str(risk.state), style=style)
        if not trading.state_view()["operator_state_stored"]:
            # the kill switch holds here only: a take-over or a restart would trade again
            state.append(", NOT STORED", style="bold red")
        table.add_row("state", state)
        table.add_row("realised PnL", _signed(pnl["realized_pnl_sol"]))
        table.add_row("open, marked", _signed(pnl["unrealized_pnl_sol"]))
        unmarked = trading.book.unmarked_count
        if unmarked:
            # the note of the other totals, too wide for the panel: its own row
            table.add_row(UNMARKED, f"{unmarked} open, left out")
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
        table = _headed("token", "score", "state", "mcap SOL")
        for token in scored[:6]:
            table.add_row(
                token.symbol, f"{token.score:.2f}", token.state,
                f"{token.features.get('market_cap_sol', 0.0):.1f}",
            )  # fmt: skip
        counts = c.counts
        return Panel(
            table,
            title=f"signals: {counted(counts['model.prediction'], 'prediction')}",
            subtitle=f"{counted(counts['order.requested'], 'order')} "
            f"({counts['order.rejected']:,} rejected)",
        )

    def _positions(self) -> Panel:
        trading = self._trading()
        held = [] if trading is None else list(trading.book.open_positions.values())
        held.sort(key=lambda p: p.pnl_sol, reverse=True)
        table = _headed("token", "cost", "worth", "PnL")
        for position in held[:6]:
            token = self.console.tokens.get(position.mint)
            worth = position.mark_value_sol
            table.add_row(
                token.symbol if token else position.mint, f"{position.cost_sol:.3f}",
                "-" if worth is None else f"{worth:.3f}",
                _signed(position.pnl_sol, unit="") if position.marked else UNMARKED,
            )  # fmt: skip
        more = f", {len(held) - 6} more" if len(held) > 6 else ""
        return Panel(table, title=f"open positions ({len(held)}{more}), SOL")

    def _recent(self) -> Panel:
        lines = list(self.recent.lines) or ["(nothing yet)"]
        return Panel(Text("\n".join(lines), no_wrap=True, overflow="ellipsis"), title="latest")

    def render(self) -> RenderableType:
        """The panels as they are now, laid out when drawn: three across the top from
        :data:`WIDE_COLUMNS` on; narrower (80 columns), the trading panel on a row of its
        own under the lifecycle and the events."""
        (when, counts), lifecycle, rates = self._header(), self._lifecycle(), self._rates()
        trading, signals, positions = self._trading_panel(), self._signals(), self._positions()
        recent = self._recent()

        def layout(width: int) -> Group:
            if width >= WIDE_COLUMNS:
                header = [Text.assemble(when, "  |  ", counts)]
                top = [_row(lifecycle, rates, trading)]
            else:
                header = [when, Text(counts.replace("  |  ", " | "))]
                top = [_row(lifecycle, rates, ratios=(None, 1)), trading]
            for line in header:
                line.no_wrap, line.overflow = True, "ellipsis"
            return Group(*header, *top, _row(signals, positions), recent)

        return _FitWidth(layout)

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


def _row(*panels: Panel, ratios: tuple[int | None, ...] | None = None) -> Table:
    """Panels side by side across the width (equal shares unless ``ratios``; None: the
    panel's own width)."""
    row = Table.grid(expand=True, padding=(0, 1))
    for ratio in ratios or (1,) * len(panels):
        row.add_column(ratio=ratio)
    row.add_row(*panels)
    return row


def exit_progress(progress: ExitProgress) -> Text:
    """A graceful exit's progress in a line; tranches without an outcome stand out."""
    text = Text(
        f"{progress.sold_out}/{progress.positions} sold out, {progress.in_flight} in flight",
        no_wrap=True,
        overflow="ellipsis",
    )
    if progress.unconfirmed_tranches:
        text.append(
            f", {counted(progress.unconfirmed_tranches, 'tranche')} UNCONFIRMED "
            f"({progress.unconfirmed_tokens:.6g} tokens may have sold)",
            style="bold red",
        )
    return text


def _signed(value: float, unit: str = " SOL") -> Text:
    return Text(f"{value:+.4f}{unit}", style="green" if value > 0 else "red" if value < 0 else "")
