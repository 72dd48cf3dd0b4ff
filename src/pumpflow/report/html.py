"""The report: one HTML file, its plots inline SVG, its style inline; no script, nothing
fetched, so it opens the same offline, from a mail or an archive."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

from pumpflow.common.text import counted
from pumpflow.report import svg
from pumpflow.report.results import (
    LIFECYCLE,
    NO_SALES,
    Results,
    equity_curve,
    exits_by_rule,
    save,
    summary,
)

#: the plots, in page order: (element id, caption)
PLOTS = (
    ("equity", "Equity curve: realised PnL after fees, sale by sale"),
    ("pnl-per-trade", "PnL per closed trade"),
    ("exits", "Exits by rule"),
    ("lifecycle", "Lifecycle funnel: tokens by state reached"),
    ("calibration", "Model calibration: predicted probability vs observed rate"),
    ("slippage", "Slippage of filled orders against the decision's price"),
)

_STYLE = """
body { font-family: sans-serif; margin: 24px auto; max-width: 1200px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; }
.source { color: #666; margin-top: 0; }
table.summary { border-collapse: collapse; margin: 16px 0 24px; }
table.summary td { padding: 4px 14px 4px 0; border-bottom: 1px solid #eee; }
table.summary td:first-child { color: #555; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 20px; }
figure.plot { margin: 0; border: 1px solid #e0e0e0; border-radius: 6px; padding: 10px; }
figure.plot figcaption { font-size: 14px; font-weight: bold; margin-bottom: 6px; }
figure.plot svg { width: 100%; height: auto; display: block; }
table.comparison { border-collapse: collapse; margin: 16px 0 24px; font-size: 14px; }
table.comparison th, table.comparison td { padding: 4px 10px; border: 1px solid #e0e0e0; }
table.comparison th { background: #f5f5f5; text-align: left; }
"""


#: the equity curve's caption for results that keep no sales
CLOSED_EQUITY = "Equity curve: realised PnL of the closed positions after fees, trade by trade"


#: the comparison's equity plot's caption
COMPARED_EQUITY = "Equity curves: realised PnL after fees, sale by sale, by configuration"


def _not_kept(what: str) -> str:
    return f"{what}: not kept by this source"


def plots(results: Results) -> dict[str, str]:
    """Element id -> the plot's SVG."""
    closed = results.closed
    t0 = min((t.opened_at for t in results.trades), default=0.0)
    equity = [((t - t0) / 60, pnl) for t, pnl in equity_curve(results)]
    pnls = [t.realized_pnl_sol for t in closed]
    exits = exits_by_rule(results)
    if results.lifecycle is None:
        funnel = svg.hbar_chart([], label="lifecycle", x_label="", empty=_not_kept("lifecycle"))
    else:
        states = [s for s in LIFECYCLE if s in results.lifecycle]
        states += sorted(set(results.lifecycle) - set(LIFECYCLE))
        funnel = svg.hbar_chart(
            [(s, results.lifecycle[s]) for s in states], label="lifecycle", x_label="tokens"
        )
    if results.calibration is None:
        calibration = svg.calibration_chart([], label="calibration", empty=_not_kept("predictions"))
    else:
        arms = results.calibration
        calibration = svg.calibration_chart(
            # one arm needs no legend: the caption names it
            [
                (
                    arm.name if len(arms) > 1 else "",
                    [(b.predicted, b.observed, b.count) for b in arm.bins],
                )
                for arm in arms
            ],
            label=" ".join(["calibration", *(arm.name for arm in arms)]),
            empty="no labelled predictions",
        )
    return {
        "equity": svg.line_chart(
            equity, label="equity", x_label="minutes since the first entry",
            y_label="realised PnL (SOL)", step=True,
            empty="no closed trades" if results.sales is None else "no sales",
        ),
        "pnl-per-trade": svg.bar_chart(
            pnls, label="PnL per trade", x_label="closed trade", y_label="PnL (SOL)",
            colors=[svg.GAIN if p > 0 else svg.LOSS for p in pnls], empty="no closed trades",
        ),
        "exits": svg.hbar_chart(
            sorted(exits.items(), key=lambda kv: -kv[1]), label="exits", x_label="positions",
            empty="no exits",
        ),
        "lifecycle": funnel,
        "calibration": calibration,
        "slippage": svg.histogram(
            [s.pct for s in results.slippage], label="slippage", x_label="slippage (%)",
            empty="no filled orders",
        ),
    }  # fmt: skip


def _caption(results: Results, plot_id: str, caption: str) -> str:
    if plot_id == "equity" and results.sales is None:
        caption = f"{CLOSED_EQUITY} ({NO_SALES})"
    if plot_id == "calibration" and results.calibration:
        arms = "; ".join(
            f"{arm.name}, {counted(arm.labels, 'label')}" for arm in results.calibration
        )
        caption += f" ({arms})"
    return caption


def _page(title: str, source: str, body: str, generated_at: float | None) -> str:
    generated = time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() if generated_at is None else generated_at)
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>"
        f'<p class="source">{escape(source)}; written {generated}</p>{body}'
        "</body></html>\n"
    )


def _summary_table(rows: Sequence[tuple[str, str]]) -> str:
    cells = "".join(
        f"<tr><td>{escape(name)}</td><td>{escape(value)}</td></tr>" for name, value in rows
    )
    return f'<table class="summary">{cells}</table>'


def render(results: Results, *, generated_at: float | None = None) -> str:
    """The report's HTML."""
    drawn = plots(results)
    figures = "".join(
        f'<figure class="plot" id="{plot_id}"><figcaption>'
        f"{escape(_caption(results, plot_id, caption))}</figcaption>{drawn[plot_id]}</figure>"
        for plot_id, caption in PLOTS
    )
    body = f'{_summary_table(summary(results))}<div class="plots">{figures}</div>'
    return _page(results.title, results.source, body, generated_at)


def equity_overlay(compared: Mapping[str, Results]) -> str:
    """Every configuration's equity curve (:func:`equity_curve`) on the same axes, from
    the first entry of any to the last sale of any: one that sold nothing stays at zero."""
    t0 = min((t.opened_at for r in compared.values() for t in r.trades), default=0.0)
    curves = {
        name: [((t - t0) / 60, pnl) for t, pnl in equity_curve(r)] for name, r in compared.items()
    }
    end = max((points[-1][0] for points in curves.values() if points), default=None)
    series = []
    for name, points in curves.items():
        if end is not None:
            last = points[-1][1] if points else 0.0
            points = (points or [(0.0, 0.0)]) + [(end, last)]
        series.append((name, points))
    return svg.lines_chart(
        series, label="equity by configuration", x_label="minutes since the first entry",
        y_label="realised PnL (SOL)", step=True, empty="no sales in any configuration",
    )  # fmt: skip


def render_comparison(
    *,
    title: str,
    source: str,
    settings: Sequence[tuple[str, str]],
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    compared: Mapping[str, Results],
    generated_at: float | None = None,
) -> str:
    """The page comparing configurations run on one stream: ``settings`` (the base's and
    what each configuration changes), the table of ``columns`` and ``rows``, and the
    equity curves of the ``compared`` results (by configuration) overlaid."""
    head = "".join(f"<th>{escape(column)}</th>" for column in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return _page(
        title,
        source,
        f"{_summary_table(settings)}"
        f'<table class="comparison"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        '<div class="plots"><figure class="plot" id="equity"><figcaption>'
        f"{escape(COMPARED_EQUITY)}</figcaption>{equity_overlay(compared)}</figure></div>",
        generated_at,
    )


def write_comparison(path: str | Path, **page) -> Path:
    """Write :func:`render_comparison`'s page to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_comparison(**page), encoding="utf-8")
    return path


def write(results: Results, path: str | Path) -> Path:
    """Write the report to ``path`` (.html) and its results beside it (.json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(results), encoding="utf-8")
    save(results, path.with_suffix(".json"))
    return path
