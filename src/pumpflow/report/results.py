"""What a report shows, as data: saved beside the report as JSON, rendered again on demand.

:class:`Results` holds the trades (one per position), each sale's realised PnL, the
filled orders' slippage, the orders by outcome, the tokens by lifecycle state reached
and the model's calibration, each ``None`` where the source does not keep it (the
Postgres ledger keeps no lifecycle nor predictions; results saved before the sales were
kept have none). The figures of the summary are computed here, once, from those:
:func:`equity_curve`, :func:`max_drawdown`, :func:`summary`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import msgspec

from pumpflow.common.text import counted

#: the lifecycle states, in the order a token goes through them
LIFECYCLE = ("new", "active", "declining", "inactive", "graduated")


class Trade(msgspec.Struct, frozen=True, kw_only=True):
    """One position, from its first buy to its last sale (or still open)."""

    position_id: str
    mint: str
    opened_at: float
    closed_at: float | None = None
    close_reason: str = ""
    #: SOL its buys spent, every fee included
    bought_sol: float
    realized_pnl_sol: float
    #: an open position at its mark; None while no trade has marked it (worth unknown)
    unrealized_pnl_sol: float | None = 0.0
    fees_sol: float
    #: the "model/arm" whose live prediction ordered its entry ("": not known, as in a
    #: ledger read back, which keeps no predictions)
    arm: str = ""


class Sale(msgspec.Struct, frozen=True, kw_only=True):
    """A sale's realised PnL at its fill, after every fee, as the position book booked it:
    a position's sales add up to its realised PnL, an open one's partial sales included."""

    position_id: str
    mint: str
    time: float
    realized_pnl_sol: float
    #: the rule or request that sold (its order's reason: take_profit_1, graceful, ...)
    reason: str = ""


class Slippage(msgspec.Struct, frozen=True, kw_only=True):
    """A filled order's price against the market its decision saw, in percent: positive
    is worse (a buy paid more, a sale got less)."""

    order_id: str
    side: str
    reason: str
    time: float
    pct: float


class CalibrationBin(msgspec.Struct, frozen=True, kw_only=True):
    predicted: float
    observed: float
    count: int


class Calibration(msgspec.Struct, frozen=True, kw_only=True):
    """One model arm's predicted probability against the rate its labels came out at."""

    name: str
    labels: int
    bins: tuple[CalibrationBin, ...]


class Results(msgspec.Struct, frozen=True, kw_only=True):
    title: str
    source: str
    #: required: what every saved results file has, and any other JSON object lacks
    trades: tuple[Trade, ...]
    #: every sale in the order the book booked them; None: not kept (results saved before
    #: they were), so the equity curve falls back to the closed positions
    sales: tuple[Sale, ...] | None = None
    slippage: tuple[Slippage, ...] = ()
    #: "filled buy", "rejected sell", ... -> orders
    orders: dict[str, int] = {}
    #: state -> tokens that reached it; None: the source does not keep it
    lifecycle: dict[str, int] | None = None
    calibration: tuple[Calibration, ...] | None = None
    #: more rows for the summary table (frames, predictions, live AUC, ...)
    notes: dict[str, str] = {}

    @property
    def closed(self) -> list[Trade]:
        """The closed trades in the order they closed."""
        done = [t for t in self.trades if t.closed_at is not None]
        return sorted(done, key=lambda t: (t.closed_at, t.position_id))


#: why the equity curve and the drawdown of results without their sales are over the
#: closed positions
NO_SALES = "these results keep no sales"

#: an open position's PnL while no trade of its token since its entry has marked it
UNMARKED = "unmarked"


def unmarked_note(count: int) -> str:
    """What a total of open positions says of the ``count`` unmarked it leaves out: their
    worth is unknown, and counting them at cost would hide the sale's fees and slippage."""
    return f" ({count} {UNMARKED}, left out)" if count else ""


def calibration_bins(
    labels: Iterable[float], scores: Iterable[float], *, bins: int = 10
) -> tuple[CalibrationBin, ...]:
    """Scores in ``bins`` equal-width bins over [0, 1]: each bin's mean score and the share
    of its labels that are 1. Empty bins are left out."""
    sums: list[list[float]] = [[0.0, 0.0, 0] for _ in range(bins)]
    for label, score in zip(labels, scores, strict=True):
        cell = sums[min(max(int(score * bins), 0), bins - 1)]
        cell[0] += score
        cell[1] += label
        cell[2] += 1
    return tuple(
        CalibrationBin(predicted=s / n, observed=o / n, count=int(n)) for s, o, n in sums if n
    )


def equity_curve(results: Results) -> list[tuple[float, float]]:
    """(time, realised PnL so far) at each sale, starting from zero at the first entry,
    so it ends at the realised PnL; at each closed position, its whole realised PnL at its
    close, for results that keep no sales (:data:`NO_SALES`)."""
    if results.sales is None:
        return _closed_curve(results.trades)
    if not results.sales:
        return []
    opened = [t.opened_at for t in results.trades]
    # sales at the same time in the order the book booked them (the ledger's, the order
    # they were filled and published in): the curve, and its drawdown, go as they went
    sales = sorted(results.sales, key=lambda s: s.time)
    points = [(min(opened, default=sales[0].time), 0.0)]
    total = 0.0
    for sale in sales:
        total += sale.realized_pnl_sol
        points.append((sale.time, total))
    return points


def _closed_curve(trades: Sequence[Trade]) -> list[tuple[float, float]]:
    """(time, realised PnL of the closed trades so far) at each closed trade, starting
    from zero."""
    closed = [t for t in trades if t.closed_at is not None]
    # positions closed at the same time in the order of their openings and tokens: their
    # ids come from the ids of the events that decided them, which differ from run to
    # run, and the order of such a tie moves the curve between them (and its drawdown)
    closed.sort(key=lambda t: (t.closed_at, t.opened_at, t.mint, t.position_id))
    if not closed:
        return []
    points = [(min(t.opened_at for t in closed), 0.0)]
    total = 0.0
    for trade in closed:
        total += trade.realized_pnl_sol
        points.append((trade.closed_at, total))
    return points


def max_drawdown(results: Results) -> float:
    """The largest fall of the realised PnL from its running peak along
    :func:`equity_curve`."""
    peak = drawdown = 0.0
    for _, total in equity_curve(results):
        peak = max(peak, total)
        drawdown = max(drawdown, peak - total)
    return drawdown


def exits_by_rule(results: Results) -> Counter[str]:
    """Closed positions by the rule (or request) that closed them."""
    return Counter(t.close_reason or "?" for t in results.closed)


def sales_by_rule(results: Results) -> dict[str, tuple[int, float]]:
    """Each rule's (or request's) sales and their realised PnL after fees, a ladder's
    partial sales of positions still open included: how an exit strategy earned (empty
    for results that keep no sales)."""
    found: dict[str, tuple[int, float]] = {}
    for sale in results.sales or ():
        count, realized = found.get(sale.reason or "?", (0, 0.0))
        found[sale.reason or "?"] = (count + 1, realized + sale.realized_pnl_sol)
    return dict(sorted(found.items()))


def sales_text(results: Results) -> str:
    """``rule n (+x SOL), ...`` of :func:`sales_by_rule`."""
    by_rule = sales_by_rule(results)
    return ", ".join(f"{rule} {n} ({realized:+.4f} SOL)" for rule, (n, realized) in by_rule.items())


def figure_text(value: float) -> str:
    """A live figure to 3 places; n/a when undefined (NaN: one class of labels, or no
    score at the threshold)."""
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def predictions_text(total: int, predicted: Mapping[str, Mapping[str, int]]) -> str:
    """``total``, then each "model/arm"'s predictions with the versions that made them."""
    arms = ", ".join(
        f"{arm} {sum(versions.values()):,} ("
        + ", ".join(
            f"version {v}" if len(versions) == 1 else f"version {v} {n:,}"
            for v, n in sorted(versions.items())
        )
        + ")"
        for arm, versions in sorted(predicted.items())
    )
    return f"{total:,}" + (f": {arms}" if arms else "")


def auc_text(auc: Mapping[str, tuple[float, int]]) -> str:
    """Each "model/arm"'s live AUC with its labels (n/a: none yet)."""
    return (
        ", ".join(f"{k} {figure_text(a)} ({counted(n, 'label')})" for k, (a, n) in auc.items())
        or "n/a"
    )


def precision_text(
    precision: Mapping[str, tuple[float, float]], selected: Mapping[str, tuple[int, int]]
) -> str:
    """Each "model/arm"'s live precision at its threshold, with how many of its labels
    were scored there (n/a: none yet)."""

    def of(arm: str, threshold: float) -> str:
        if arm not in selected:
            return f"score >= {threshold:.2f}"
        scored, labels = selected[arm]
        return f"{scored:,} of {counted(labels, 'label')} scored >= {threshold:.2f}"

    return (
        ", ".join(f"{k} {figure_text(p)} ({of(k, t)})" for k, (p, t) in precision.items()) or "n/a"
    )


class ArmPnl(msgspec.Struct, frozen=True, kw_only=True):
    """The positions one arm's predictions opened."""

    entries: int
    realized_sol: float
    #: the open ones at their mark (the unmarked left out)
    unrealized_sol: float


def pnl_by_arm(trades: Iterable[Trade]) -> dict[str, ArmPnl]:
    """Each "model/arm"'s entries and PnL, of the trades whose arm is known."""
    found: dict[str, list[Trade]] = {}
    for trade in trades:
        if trade.arm:
            found.setdefault(trade.arm, []).append(trade)
    return {
        arm: ArmPnl(
            entries=len(mine),
            realized_sol=sum(t.realized_pnl_sol for t in mine),
            unrealized_sol=sum(t.unrealized_pnl_sol or 0.0 for t in mine if t.closed_at is None),
        )
        for arm, mine in sorted(found.items())
    }


def pnl_by_arm_text(by_arm: Mapping[str, ArmPnl]) -> str:
    """``model/arm n entries, realised +x SOL, open marked +y; ...``."""
    return "; ".join(
        f"{arm} {counted(a.entries, 'entry', 'entries')}, realised {a.realized_sol:+.4f} SOL, "
        f"open marked {a.unrealized_sol:+.4f}"
        for arm, a in by_arm.items()
    )


def summary(results: Results) -> list[tuple[str, str]]:
    """The summary table's rows: (figure, value)."""
    trades, closed = results.trades, results.closed
    wins = sum(t.realized_pnl_sol > 0 for t in closed)
    realized = sum(t.realized_pnl_sol for t in trades)
    held = [t for t in trades if t.closed_at is None]
    unmarked = sum(t.unrealized_pnl_sol is None for t in held)
    unrealized = sum(t.unrealized_pnl_sol or 0.0 for t in held)
    pnls = [t.realized_pnl_sol for t in closed]
    exits = exits_by_rule(results)
    slips = [s.pct for s in results.slippage]
    over = "" if results.sales is not None else f" (the closed positions only: {NO_SALES})"
    sold = NO_SALES if results.sales is None else sales_text(results) or "none"
    rows = [
        ("trades", f"{len(trades)} ({len(closed)} closed, {len(trades) - len(closed)} open)"),
        ("win rate", f"{wins / len(closed):.0%} ({wins} of {len(closed)})" if closed else "n/a"),
        ("SOL spent on entries", f"{sum(t.bought_sol for t in trades):.4f}"),
        ("realised PnL (SOL, after fees)", f"{realized:+.4f}"),
        ("open positions at their mark (SOL)", f"{unrealized:+.4f}{unmarked_note(unmarked)}"),
        ("total PnL (SOL)", f"{realized + unrealized:+.4f}{unmarked_note(unmarked)}"),
        ("max drawdown (SOL, realised)", f"{max_drawdown(results):.4f}{over}"),
        ("fees (SOL)", f"{sum(t.fees_sol for t in trades):.4f}"),
        ("best / worst trade (SOL)", f"{max(pnls):+.4f} / {min(pnls):+.4f}" if pnls else "n/a"),
        ("exits by rule", ", ".join(f"{k} {v}" for k, v in sorted(exits.items())) or "none"),
        ("sales by rule", sold),
        *(
            [("PnL by arm (entries opened by its predictions)", pnl_by_arm_text(by_arm))]
            if (by_arm := pnl_by_arm(trades))
            else []
        ),
        ("orders", ", ".join(f"{k} {v}" for k, v in sorted(results.orders.items())) or "none"),
        (
            "slippage (%, mean / worst)",
            f"{sum(slips) / len(slips):.2f} / {max(slips):.2f}" if slips else "n/a",
        ),
    ]
    return rows + list(results.notes.items())


def save(results: Results, path: str | Path) -> None:
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(results)))


def load(path: str | Path) -> Results:
    """The results a run saved; a file that is not one names what is wrong."""
    data = Path(path).read_bytes()
    try:
        return msgspec.json.decode(data, type=Results)
    except msgspec.ValidationError as exc:
        try:
            found = msgspec.json.decode(data)
        except msgspec.DecodeError as malformed:  # its first value was read as results
            raise ValueError(f"{path}: not a pumpflow results file: {malformed}") from None
        if isinstance(found, dict) and "configurations" in found:
            raise ValueError(
                f"{path}: the comparison pumpflow backtest --json writes, not one report's "
                "results: each configuration's are in the .json beside its report"
            ) from None
        raise ValueError(f"{path}: not a pumpflow results file: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"{path}: not a pumpflow results file: {exc}") from None
