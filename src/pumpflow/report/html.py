"""The report: one HTML file, its plots inline SVG, its style inline; no script, nothing
fetched, so it opens the same offline, from a mail or an archive."""

from __future__ import annotations

import time
from collections import Counter
from html import escape
from pathlib import Path

from pumpflow.common.text import counted
from pumpflow.report import svg
from pumpflow.report.results import (
    LIFECYCLE,
    NO_SALES,
    Results,
    equity_curve,
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
"""


#: the equity curve's caption for results that keep no sales
CLOSED_EQUITY = "Equity curve: realised PnL of the closed positions after fees, trade by trade"


def _not_kept(what: str) -> str:
    return f"{what}: not kept by this source"


def plots(results: Results) -> dict[str, str]:
    """Element id -> the plot's SVG."""
    closed = results.closed
    t0 = min((t.opened_at for t in results.trades), default=0.0)
    equity = [((t - t0) / 60, pnl) for t, pnl in equity_curve(results)]
    pnls = [t.realized_pnl_sol for t in closed]
    exits = Counter(t.close_reason or "?" for t in closed)
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
        arms = sorted(results.calibration, key=lambda c: -c.labels)
        calibration = svg.calibration_chart(
            [(b.predicted, b.observed, b.count) for b in arms[0].bins] if arms else [],
            label=f"calibration {arms[0].name}" if arms else "calibration",
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
        arms = sorted(results.calibration, key=lambda c: -c.labels)
        caption += f" ({arms[0].name}, {counted(arms[0].labels, 'label')})"
    return caption


def render(results: Results, *, generated_at: float | None = None) -> str:
    """The report's HTML."""
    generated = time.strftime(
        "%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() if generated_at is None else generated_at)
    )
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{escape(value)}</td></tr>"
        for name, value in summary(results)
    )
    drawn = plots(results)
    figures = "".join(
        f'<figure class="plot" id="{plot_id}"><figcaption>'
        f"{escape(_caption(results, plot_id, caption))}</figcaption>{drawn[plot_id]}</figure>"
        for plot_id, caption in PLOTS
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(results.title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{escape(results.title)}</h1>"
        f'<p class="source">{escape(results.source)}; written {generated}</p>'
        f'<table class="summary">{rows}</table><div class="plots">{figures}</div>'
        "</body></html>\n"
    )


def write(results: Results, path: str | Path) -> Path:
    """Write the report to ``path`` (.html) and its results beside it (.json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(results), encoding="utf-8")
    save(results, path.with_suffix(".json"))
    return path
