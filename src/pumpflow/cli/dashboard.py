"""The live terminal dashboard of ``pumpflow run`` (rich), a few frames a second.

It draws what the run's :class:`~pumpflow.cli.console.Console` counted off the bus and
what the services show read-only (trading's book, risk state and breakers, the feed's
subscriptions, the graceful exit's progress): tokens by lifecycle state, event rates,
the model's signals, open positions, PnL and the breakers (a halt not stored yet and
tranches without an outcome in bold red), and the console's latest lines (entries,
sales, trading state changes). It changes nothing it reads. Without a terminal (a log, CI)
the run prints the console's plain status lines instead (:func:`wants_dashboard`).

It fits the terminal down to 80 columns and 24 rows: narrower than :data:`WIDE_COLUMNS`
the trading panel takes a row of its own, and a cell too long for its column is cut
with an ellipsis, never wrapped onto a line its label does not share. Short of rows, the
tables and the latest lines shorten, the breakers share a row, and, narrow, the trading
panel moves beside the lifecycle and the events panel goes (:meth:`Dashboard.render`).
"""

from __future__ import annotations

import asyncio
import contextlib
import termios
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pumpflow.cli.console import LIFECYCLE
from pumpflow.common.text import counted
from pumpflow.report.results import UNMARKED

if TYPE_CHECKING:
    from rich.console import Console as RichConsole
    from rich.console import ConsoleOptions, RenderResult

    from pumpflow.cli.console import Console
    from pumpflow.common.exit import ExitProgress

#: the event types whose rates are shown, in pipeline order
RATED = (
    "token.created", "token.trade", "features.updated", "token.lifecycle",
    "model.prediction", "order.requested", "order.filled", "position.closed",
)  # fmt: skip
#: the header's hint once the graceful exit has begun, after a Ctrl-C or at the run's
#: end: the first Ctrl-C only begins it, the next ends the run at once
STOPPING = {True: "stopping: Ctrl-C again ends now", False: "stopping: Ctrl-C twice ends now"}
#: wall seconds the event rates are averaged over
RATE_WINDOW_S = 2.0
REFRESH_PER_S = 4.0
#: narrower than this, the top row's three panels do not fit side by side: the trading
#: panel takes a row of its own
WIDE_COLUMNS = 120
#: the most of a token's symbol (or mint) shown in a table: at 80 columns the signals'
#: and the positions' tables then fit side by side without cutting a figure
TOKEN_CHARS = 10
#: the most rows of the signals' and the positions' tables, and of the latest lines
TABLE_ROWS = 6
LATEST_LINES = 8
#: the fewest rows of each that a short terminal still gets before the layout compacts
MIN_TABLE_ROWS = 3
MIN_LATEST_LINES = 3


def wants_dashboard(plain: bool, out: TextIO) -> bool:
    """The dashboard on a terminal unless ``--plain``; plain lines anywhere else."""
    isatty = getattr(out, "isatty", None)
    return not plain and isatty is not None and isatty()


def terminal_modes(out: TextIO) -> tuple[int, list] | None:
    """The modes of the terminal ``out`` writes to, for :func:`restore_modes` (None: no
    terminal)."""
    try:
        fd = out.fileno()
        return fd, termios.tcgetattr(fd)
    except (AttributeError, OSError, ValueError, termios.error):
        return None


def restore_modes(modes: tuple[int, list] | None) -> None:
    """Set a terminal's ``modes`` (:func:`terminal_modes`) back; a terminal gone keeps
    whatever it has."""
    if modes is not None:
        fd, attributes = modes
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, attributes)


@contextlib.contextmanager
def keys_unechoed(out: TextIO) -> Iterator[None]:
    """Keep the terminal ``out`` writes to from echoing keys until the block ends: a key
    echoed under the dashboard's last row (a Ctrl-C's ``^C``) moves the frame down a row,
    and the next, drawn up from there, leaves the first row behind."""
    modes = terminal_modes(out)
    if modes is not None:
        fd, attributes = modes
        quiet = list(attributes)
        quiet[3] &= ~(termios.ECHO | termios.ECHOCTL)
        restore_modes((fd, quiet))
    try:
        yield
    finally:
        restore_modes(modes)


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


class _FitSize:
    """A renderable laid out for the terminal it is drawn on, by ``layout(columns, rows)``."""

    def __init__(self, layout: Callable[[int, int], RenderableType]):
        self.layout = layout

    def __rich_console__(self, console: RichConsole, options: ConsoleOptions) -> RenderResult:
        yield self.layout(options.max_width, options.size.height)


class _LabelledGrid(Table):
    """A borderless table of one-line rows, its first column the labels: a row too wide
    cuts its other cells with an ellipsis and keeps its label whole (a wrapped row would
    no longer line up with its label)."""

    def add_row(self, *cells: str | Text | None, **options: Any) -> None:
        super().add_row(*(_one_line(cell) for cell in cells), **options)


def _one_line(cell: str | Text | None) -> Text | None:
    """``cell`` on one line, cut with an ellipsis at its column's width."""
    if cell is None:
        return None
    text = Text(cell) if isinstance(cell, str) else cell.copy()
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


def _grid(*justify: str) -> Table:
    """A :class:`_LabelledGrid`, a column per ``justify``; the labels' the first."""
    table = _LabelledGrid.grid(padding=(0, 2))
    for index, side in enumerate(justify):
        # only the cells after the label may narrow: a no_wrap column keeps its width
        table.add_column(justify=side, no_wrap=index == 0, overflow="ellipsis")
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

    def __init__(
        self,
        console: Console,
        recent: RecentLines,
        *,
        clock_wall=time.monotonic,
        interrupted: Callable[[], bool] = lambda: False,
    ):
        self.console = console
        self.recent = recent
        self.clock_wall = clock_wall
        #: whether a Ctrl-C (or SIGTERM) came, which a next one follows at once
        self.interrupted = interrupted
        self._history: deque[tuple[float, Counter[str]]] = deque()

    # ---------------------------------------------------------------- figures

    def rates(self) -> dict[str, float]:
        """Events per real (wall) second by type, over the last :data:`RATE_WINDOW_S`: the
        run's throughput; the plain status line's trade rate is per market second."""
        now, counts = self.clock_wall(), Counter(self.console.counts)
        self._history.append((now, counts))
        while len(self._history) > 2 and now - self._history[1][0] >= RATE_WINDOW_S:
            self._history.popleft()
        then, before = self._history[0]
        elapsed = now - then
        if elapsed <= 0:
            return dict.fromkeys(RATED, 0.0)
        return {kind: (counts[kind] - before[kind]) / elapsed for kind in RATED}

    def _exit_progress(self) -> ExitProgress | None:
        """The graceful exit's progress; None until it begins."""
        exits = self.console.system.services.get("exit")
        return None if exits is None else exits.exit_progress()

    def _trading(self) -> Any:
        trading = self.console.system.services.get("trading")
        return trading if getattr(trading, "risk", None) is not None else None

    # ---------------------------------------------------------------- panels

    def _header(self) -> tuple[Text, str]:
        """The run's time, and its counts (one line on a wide screen, two on a narrow)."""
        c = self.console
        when = Text.assemble(
            ("pumpflow run ", "bold"),
            f"{c.market_clock()} market time at {c.speed:g}x  |  "
            + ("Ctrl-C stops" if self._exit_progress() is None else STOPPING[self.interrupted()]),
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
        return Panel(table, title="events: total, per real second")

    def _trading_panel(self, *, compact: bool = False) -> Panel:
        """Trading's state, PnL, positions and breakers; ``compact``: the breakers that
        are ok counted on one row."""
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
        breakers = sorted(risk.breakers.items())
        for name, breaker in breakers:
            if breaker.tripped:
                table.add_row(
                    f"breaker {name}",
                    Text(f"TRIPPED {breaker.reason}", style="bold red"),
                )  # fmt: skip
            elif not compact:
                table.add_row(f"breaker {name}", Text("ok", style="green"))
        ok = sum(not breaker.tripped for _, breaker in breakers)
        if compact and ok:
            table.add_row(
                "breakers",
                Text(f"all {ok} ok" if ok == len(breakers) else f"{ok} others ok", style="green"),
            )
        progress = self._exit_progress()
        if progress is not None:
            table.add_row("graceful exit", exit_progress(progress))
        return Panel(table, title="trading (paper)")

    def _signal_rows(self) -> list[tuple[str, ...]]:
        """The rows of the tokens the live arm scored, not gone inactive, best first: as
        read now, for a frame drawn again later (a line printed above it) to show."""
        tokens = self.console.tokens.values()
        scored = [t for t in tokens if t.score is not None and t.state != "inactive"]
        scored.sort(key=lambda t: t.score, reverse=True)
        return [
            (token.symbol, f"{token.score:.2f}", token.state,
             f"{token.features.get('market_cap_sol', 0.0):.1f}")
            for token in scored[:TABLE_ROWS]
        ]  # fmt: skip

    def _position_rows(self) -> tuple[list[tuple[str | Text, ...]], int]:
        """The rows of trading's open positions, best PnL first, as read now; and how many
        it holds."""
        trading = self._trading()
        held = [] if trading is None else list(trading.book.open_positions.values())
        held.sort(key=lambda p: p.pnl_sol, reverse=True)
        rows = []
        for position in held[:TABLE_ROWS]:
            token = self.console.tokens.get(position.mint)
            worth = position.mark_value_sol
            rows.append((
                token.symbol if token else position.mint, f"{position.cost_sol:.3f}",
                "-" if worth is None else f"{worth:.3f}",
                _signed(position.pnl_sol, unit="") if position.marked else UNMARKED,
            ))  # fmt: skip
        return rows, len(held)

    def _signal_titles(self) -> tuple[str, str]:
        """The signals panel's title and subtitle: predictions, orders, as counted now."""
        counts = self.console.counts
        return (
            f"signals: {counted(counts['model.prediction'], 'prediction')}",
            f"{counted(counts['order.requested'], 'order')} ({counts['order.rejected']:,} "
            "rejected)",
        )

    @staticmethod
    def _signals(rows: list[tuple[str, ...]], titles: tuple[str, str]) -> Panel:
        table = _headed("token", "score", "state", "mcap SOL")
        for row in rows:
            table.add_row(*row)
        title, subtitle = titles
        return Panel(table, title=title, subtitle=subtitle)

    @staticmethod
    def _positions(rows: list[tuple[str | Text, ...]], held: int) -> Panel:
        table = _headed("token", "cost", "worth", "PnL")
        for row in rows:
            table.add_row(*row)
        more = f", {held - len(rows)} more" if held > len(rows) else ""
        return Panel(table, title=f"open positions ({held}{more}), SOL")

    @staticmethod
    def _recent(lines: list[str]) -> Panel:
        return Panel(Text("\n".join(lines), no_wrap=True, overflow="ellipsis"), title="latest")

    def render(self) -> RenderableType:
        """The panels as they are now, laid out for the terminal when drawn: three across
        the top from :data:`WIDE_COLUMNS` on; narrower (80 columns), the trading panel on a
        row of its own under the lifecycle and the events. When that leaves too few rows
        for the tables and the latest lines, the breakers share a row and, narrow, the
        trading panel goes beside the lifecycle, with the events under them if they fit."""
        (when, counts), lifecycle, rates = self._header(), self._lifecycle(), self._rates()
        trading, compact = self._trading_panel(), self._trading_panel(compact=True)
        signals, (positions, held) = self._signal_rows(), self._position_rows()
        titles = self._signal_titles()
        recent = list(self.recent.lines) or ["(nothing yet)"]
        table_rows = max(len(signals), len(positions))

        def layout(columns: int, rows: int) -> Group:
            if columns >= WIDE_COLUMNS and when.cell_len + 5 + len(counts) <= columns:
                header = [Text.assemble(when, "  |  ", counts)]
            else:
                header = [when.copy(), Text(counts.replace("  |  ", " | "))]
            for line in header:
                line.no_wrap, line.overflow = True, "ellipsis"
            if columns >= WIDE_COLUMNS:
                uppers = [[_row(lifecycle, rates, panel)] for panel in (trading, compact)]
            else:
                uppers = [
                    [_row(lifecycle, rates, ratios=(None, 1)), trading],
                    [_row(lifecycle, compact, ratios=(None, 1)), rates],
                    [_row(lifecycle, compact, ratios=(None, 1))],
                ]
            fewest = _lower_height(
                min(table_rows, MIN_TABLE_ROWS), min(len(recent), MIN_LATEST_LINES)
            )
            for upper in uppers:
                room = rows - len(header) - sum(_height(part) for part in upper)
                if room >= fewest:
                    break
            tables, latest = _shares(room, table_rows, min(len(recent), LATEST_LINES))
            lower = [
                _row(
                    self._signals(signals[:tables], titles),
                    self._positions(positions[:tables], held),
                )
            ]
            if latest:
                lower.append(self._recent(recent[-latest:]))
            return Group(*header, *upper, *lower)

        return _FitSize(layout)

    async def run(self, screen: RichConsole, refresh_per_s: float = REFRESH_PER_S) -> None:
        """Redraw on ``screen`` until cancelled; rendering happens on the event loop, so it
        reads the services between their handlers, never during one. A resize clears the
        screen: the terminal rewraps the frame on it, and the live view's cursor would go
        up the rows it drew, not the rows they became, leaving pieces of it above the next."""
        from rich.control import Control
        from rich.live import Live

        with (
            keys_unechoed(screen.file),
            Live(self.render(), console=screen, auto_refresh=False) as live,
        ):
            try:
                size = screen.size
                while True:
                    await asyncio.sleep(1.0 / refresh_per_s)
                    if screen.size != size:
                        size = screen.size
                        screen.control(Control.clear(), Control.home())
                    live.update(self.render(), refresh=True)
            finally:
                live.update(self.render(), refresh=True)


def _height(part: Panel | Table) -> int:
    """The rows a panel of one-line rows, or a row of them, takes."""
    if isinstance(part, Table):
        return max(_height(cell) for column in part.columns for cell in column.cells)
    body = part.renderable
    lines = body.row_count + body.show_header if isinstance(body, Table) else 1
    return lines + 2


def _lower_height(table_rows: int, latest_lines: int) -> int:
    """The rows of the signals' and positions' tables and the latest lines' panel (0
    lines: no panel)."""
    return 3 + table_rows + (2 + latest_lines if latest_lines else 0)


def _shares(room: int, table_rows: int, latest_lines: int) -> tuple[int, int]:
    """The table rows and the latest lines that fit ``room`` rows: the latest lines
    shorten first, then the tables, each down to its fewest; then the latest go, then
    the tables' rows."""
    while _lower_height(table_rows, latest_lines) > room:
        if latest_lines > MIN_LATEST_LINES:
            latest_lines -= 1
        elif table_rows > MIN_TABLE_ROWS:
            table_rows -= 1
        elif latest_lines:
            latest_lines = 0
        elif table_rows:
            table_rows -= 1
        else:
            break
    return table_rows, latest_lines


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
