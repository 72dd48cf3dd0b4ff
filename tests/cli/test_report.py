"""Reports: a backtest writes one, ``pumpflow report`` writes it again from the saved
results or from the Postgres ledger, and a real browser draws every plot offline."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections import Counter
from html import escape
from pathlib import Path

import msgspec
import pytest

from pumpflow.cli.main import main
from pumpflow.cli.run import graceful_exit_note, not_flat_reason
from pumpflow.common.events import ExitLine
from pumpflow.common.exit import GracefulExitSummary
from pumpflow.report import html, results, svg
from pumpflow.report.gather import from_ledger, slippage_pct
from pumpflow.report.results import Results, Sale, Trade
from pumpflow.trading.ledger import (
    FillRecord,
    LedgerChange,
    MemoryLedger,
    OrderRecord,
    PositionRecord,
    PostgresLedger,
)

from ..browser import open_page

#: per plot: its box, the shapes it holds and the pixels it drew, the coloured ones
#: (bars, lines, points; the axes and labels are grey) apart
DRAWN = """
(async () => {
  const found = {};
  for (const figure of document.querySelectorAll('figure.plot')) {
    const svg = figure.querySelector('svg');
    const box = svg.getBoundingClientRect();
    const image = new Image();
    image.src = 'data:image/svg+xml;charset=utf-8,'
      + encodeURIComponent(new XMLSerializer().serializeToString(svg));
    await image.decode();
    const canvas = document.createElement('canvas');
    canvas.width = Math.round(box.width);
    canvas.height = Math.round(box.height);
    const context = canvas.getContext('2d');
    context.drawImage(image, 0, 0, canvas.width, canvas.height);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let inked = 0, coloured = 0;
    for (let i = 0; i < pixels.length; i += 4) {
      if (pixels[i + 3] === 0) continue;
      inked++;
      const [r, g, b] = [pixels[i], pixels[i + 1], pixels[i + 2]];
      if (Math.max(r, g, b) - Math.min(r, g, b) > 80) coloured++;
    }
    found[figure.id] = {
      width: box.width, height: box.height, inked, coloured,
      shapes: svg.querySelectorAll('rect, polyline, circle').length,
    };
  }
  return found;
})()
"""


@pytest.fixture(scope="module")
def backtest_report(tmp_path_factory) -> tuple[Path, str]:
    """A backtest of four minutes of seed 6 and its report: (report path, what it printed)."""
    import contextlib
    import io

    path = tmp_path_factory.mktemp("report") / "backtest.html"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(
            ["backtest", "--seed", "6", "--minutes", "4", "--quiet", "--report", str(path)]
        )
    assert status == 0
    return path, out.getvalue()


def _without_time(page: str) -> str:
    return re.sub(r"written [0-9-]+ [0-9:]+ UTC", "", page)


def test_a_backtest_writes_its_report_and_results_that_agree_with_its_text(backtest_report):
    path, printed = backtest_report
    assert f"report 'run': {path}" in printed
    found = results.load(path.with_suffix(".json"))
    # the ledger's view agrees with the book's the backtest printed
    entries = int(re.search(r"entries (\d+)", printed)[1])
    bought = float(re.search(r"entries \d+, ([\d.]+) SOL", printed)[1])
    assert sum(t.bought_sol for t in found.trades) == pytest.approx(bought, abs=1e-3)
    realised = float(re.search(r"realised ([-+][\d.]+) SOL", printed)[1])
    assert len(found.trades) == entries > 0
    assert sum(t.realized_pnl_sol for t in found.trades) == pytest.approx(realised, abs=1e-4)
    # the curve steps at every sale, partial ones of open positions included
    assert found.sales and results.equity_curve(found)[-1][1] == pytest.approx(realised, abs=1e-4)
    closed = int(re.search(r"closed (\d+)", printed)[1])
    assert len(found.closed) == closed
    # what only the embedded run can tell: the funnel narrows, the model is calibrated
    funnel = found.lifecycle
    assert funnel["new"] >= funnel["active"] >= funnel["declining"] > 0
    assert found.calibration and sum(b.count for b in found.calibration[0].bins) > 100
    # every filled order whose decision saw a market has a slippage
    filled = sum(n for k, n in found.orders.items() if k.startswith("filled"))
    assert 0 < len(found.slippage) <= filled
    page = path.read_text()
    for plot_id, _ in html.PLOTS:
        assert f'<figure class="plot" id="{plot_id}">' in page
    assert "not kept" not in page and "no data" not in page
    # which stream and which settings: what tells two reports apart
    assert re.fullmatch(r"seed 6, 4 minutes: [\d,]+ frames", found.source), found.source
    assert found.notes["settings"] == "the base's"
    assert "trading_min_score=0.5" in found.notes["base"]
    assert found.source in page and escape(found.notes["base"]) in page


def test_pumpflow_report_renders_the_saved_results_again(backtest_report, tmp_path, capsys):
    path, _ = backtest_report
    again = tmp_path / "again.html"
    assert main(["report", "--results", str(path.with_suffix(".json")), "--out", str(again)]) == 0
    assert f"report: {again}" in capsys.readouterr().out
    assert _without_time(again.read_text()) == _without_time(path.read_text())


def test_saved_results_are_written_again_where_the_help_says(backtest_report, tmp_path, capsys):
    path, _ = backtest_report
    saved = tmp_path / "saved.json"
    saved.write_text(path.with_suffix(".json").read_text())
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "beside --results' file" in " ".join(capsys.readouterr().out.split())
    assert main(["report", "--results", str(saved)]) == 0
    assert f"report: {saved.with_suffix('.html')}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (json.dumps({"title": "x"}), "source"),
        # any object with a title and a source would otherwise draw an empty report
        (json.dumps({"title": "x", "source": "y"}), "trades"),
        ("# pumpflow\n", "malformed"),
        ("5", "Expected"),
        # a dataset file, one JSON object a line: its first is an object, not results
        ('{"t": 1.0, "frame": {}}\n{"t": 2.0, "frame": {}}\n', "malformed"),
    ],
)
def test_a_file_that_is_not_results_is_refused_by_name(tmp_path, text, why, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert main(["report", "--results", str(bad)]) == 2  # input refused, as a bad flag is
    assert re.search(rf"bad\.json: not a pumpflow results file.*{why}", capsys.readouterr().err)


def test_results_that_are_not_there_are_named_in_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    assert main(["report", "--results", str(missing)]) == 2
    said = capsys.readouterr().err
    assert said == f"pumpflow report: {missing}: No such file or directory\n"


def test_a_backtests_comparison_given_as_results_says_which_files_are_the_results(tmp_path, capsys):
    compared = tmp_path / "compared.json"
    report = tmp_path / "r.html"
    argv = ["backtest", "--seed", "1", "--minutes", "1", "--quiet", "--config", "a=", "--config"]
    assert main([*argv, "b=", "--json", str(compared), "--report", str(report)]) == 0
    capsys.readouterr()
    assert main(["report", "--results", str(compared)]) == 2
    said = capsys.readouterr().err.rstrip("\n")
    assert said == (
        f"pumpflow report: {compared}: the comparison pumpflow backtest --json writes, not one "
        "report's results: each configuration's are in the .json beside its report"
    )
    for name in ("a", "b"):
        assert main(["report", "--results", str(tmp_path / f"r-{name}.json")]) == 0


async def test_the_report_renders_in_chromium_with_every_plot_drawn_and_nothing_fetched(
    backtest_report,
):
    path, _ = backtest_report
    async with open_page(path) as page:
        fetched = [url for url in page.requests if url != path.as_uri()]
        drawn = await page.evaluate(DRAWN)
        title = await page.evaluate("document.title")
    assert fetched == []
    assert title == "pumpflow backtest: run"
    assert sorted(drawn) == sorted(plot_id for plot_id, _ in html.PLOTS)
    for plot_id, figures in drawn.items():
        assert figures["width"] > 300 and figures["height"] > 150, (plot_id, figures)
        assert figures["shapes"] > 0, (plot_id, figures)
        # the bars, line or points themselves, not only the axes
        assert figures["coloured"] > 200, (plot_id, figures)


async def test_the_comparison_renders_in_chromium_a_curve_per_configuration_fetching_nothing(
    tmp_path,
):
    """Each configuration's equity curve in its own colour, from its first entry to the
    last sale of any (held at its last PnL): one that sold nothing flat at zero."""

    def trade(n: int, pnl: float) -> Trade:
        return Trade(position_id=f"p{n}", mint="m", opened_at=60.0 * n, closed_at=60.0 * n + 30,
                     bought_sol=0.1, realized_pnl_sol=pnl, fees_sol=0.0)  # fmt: skip

    def sold(trades: list[Trade]) -> Results:
        sales = tuple(Sale(position_id=t.position_id, mint=t.mint, time=t.closed_at,
                           realized_pnl_sol=t.realized_pnl_sol) for t in trades)  # fmt: skip
        return Results(title="t", source="s", trades=tuple(trades), sales=sales)

    compared = {
        "early": sold([trade(0, 0.2), trade(1, -0.1)]),
        "late": sold([trade(1, 0.1), trade(4, 0.3)]),
        "idle": Results(title="t", source="s", trades=(), sales=()),
    }
    path = html.write_comparison(
        tmp_path / "r-comparison.html", title="pumpflow backtest compared: early, late, idle",
        source="seed 1", settings=[("base", "trading_min_score=0.5")], columns=["config"],
        rows=[[name] for name in compared], compared=compared,
    )  # fmt: skip
    async with open_page(path) as page:
        fetched = [url for url in page.requests if url != path.as_uri()]
        drawn = await page.evaluate(DRAWN)
        strokes = await page.evaluate(
            "[...document.querySelectorAll('#equity polyline')].map(line =>"
            " [line.getAttribute('stroke'), line.getBBox().x, line.getBBox().x"
            " + line.getBBox().width, line.getBBox().height])"
        )
        legend = await page.evaluate(
            "[...document.querySelectorAll('#equity text')].map(t => t.textContent)"
        )
    assert fetched == []
    assert list(drawn) == ["equity"] and drawn["equity"]["coloured"] > 200
    (early, late, idle) = strokes
    assert len({stroke for stroke, *_ in strokes}) == 3
    # each from its first entry to the last sale of any; idle flat, from the first of any
    assert early[1] == idle[1] < late[1]
    assert early[2] == late[2] == idle[2]
    assert idle[3] == 0 < early[3]
    assert {"early", "late", "idle"} <= set(legend)


def _ledger_change() -> LedgerChange:
    """Two positions of one token: one bought twice and sold at a profit by take_profit,
    one opened after it and still open. Buys name no position, as the service's do."""
    orders, fills = [], []
    for order_id, side, position, reason, price, v_sol, at in (
        ("b1", "buy", "b1", "score 0.7", 3.1e-8, 31.0, 100.0),
        ("b1b", "buy", "b1", "score 0.8", 3.2e-8, 32.0, 120.0),
        ("s1", "sell", "b1", "take_profit", 3.6e-8, 37.0, 160.0),
        ("b2", "buy", "b2", "score 0.6", 3.0e-8, 30.0, 200.0),
    ):
        orders.append(OrderRecord(
            order_id=order_id, mint="mint", side=side, sol_amount=0.1,
            token_amount=None, slippage_pct=5.0, reason=reason, position_id=position,
            cause_id=None, executor="paper", state="filled", requested_at=at, venue="curve",
            expected_v_sol=v_sol, expected_v_tokens=1e9,
        ))  # fmt: skip
        fills.append(FillRecord(
            order_id=order_id, mint="mint", side=side, token_amount=3e6 if side == "buy" else 6e6,
            sol_amount=0.1 if side == "buy" else 0.205, price=price, fee_sol=0.001,
            filled_at=at + 0.5, position_id=position if side == "sell" else None, reason=reason,
        ))  # fmt: skip
    positions = [
        PositionRecord(
            position_id="b1", mint="mint", opened_at=100.5, closed_at=160.5,
            close_reason="take_profit", token_amount=0.0, cost_sol=0.0, entry_price=3.3e-8,
            realized_pnl_sol=0.005, fees_sol=0.002, mark_price=3.6e-8,
        ),
        PositionRecord(
            position_id="b2", mint="mint", opened_at=200.5, closed_at=None, close_reason="",
            token_amount=3e6, cost_sol=0.1, entry_price=3.3e-8, realized_pnl_sol=0.0,
            fees_sol=0.001, mark_price=3.5e-8,
        ),
    ]  # fmt: skip
    return LedgerChange(orders=orders, fills=fills, positions=positions)


@pytest.mark.postgres
async def test_the_postgres_ledger_gives_the_report_the_memory_ledger_gives(
    pg_pool, postgres_dsn, namespace, tmp_path
):
    change = _ledger_change()
    memory = MemoryLedger()
    await memory.commit(change)
    await PostgresLedger(pg_pool).commit(change)
    kept = await from_ledger(memory, title="t", source="s")
    assert await from_ledger(PostgresLedger(pg_pool), title="t", source="s") == kept
    closed, held = kept.trades
    assert (closed.close_reason, closed.realized_pnl_sol, closed.bought_sol) == (
        "take_profit", 0.005, 0.2
    )  # fmt: skip
    assert held.bought_sol == 0.1
    assert [(s.position_id, s.time, round(s.realized_pnl_sol, 9)) for s in kept.sales] == [
        ("b1", 160.5, 0.005)
    ]
    # the open one at its mark: 3e6 tokens at 3.5e-8 against 0.1 SOL of cost
    assert held.closed_at is None and held.unrealized_pnl_sol == pytest.approx(0.005)
    assert [round(s.pct, 6) for s in kept.slippage] == [
        0.0, 0.0, round(100 * (1 - 3.6 / 3.7), 6), 0.0
    ]  # fmt: skip
    assert kept.orders == {"filled buy": 3, "filled sell": 1}

    out = tmp_path / "ledger.html"
    argv = ["report", "--dsn", postgres_dsn, "--schema", namespace, "--out", str(out)]
    assert await asyncio.to_thread(main, argv) == 0
    page = out.read_text()
    assert "lifecycle: not kept by this source" in page
    assert "<td>win rate</td><td>100% (1 of 1)</td>" in page


async def test_a_schema_that_holds_no_ledger_is_refused_not_created(
    postgres_dsn, namespace, tmp_path, capsys
):
    """A typo in --schema (or PUMPFLOW_NAMESPACE) must not be migrated into an empty
    ledger whose report says nothing was traded, with exit status 0."""
    from pumpflow.common.testing import drop_schema, schema_exists

    out = tmp_path / "ledger.html"
    argv = ["report", "--dsn", postgres_dsn, "--schema", namespace, "--out", str(out)]
    try:
        assert await asyncio.to_thread(main, argv) == 2  # a flag naming nothing
        assert f"pumpflow report: no schema {namespace!r}" in capsys.readouterr().err
        assert not out.exists()
        assert not await schema_exists(postgres_dsn, namespace)
    finally:
        await drop_schema(postgres_dsn, namespace)


def test_nice_ticks_are_round_and_cover_the_range():
    assert svg.nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert svg.nice_ticks(-0.13, 3.3) == [-1.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    ticks = svg.nice_ticks(5.0, 5.0)
    assert ticks[0] < 5.0 < ticks[-1]
    with pytest.raises(ValueError, match="finite"):
        svg.nice_ticks(0.0, float("nan"))


def test_axis_labels_name_the_values_their_ticks_stand_at():
    # eleven closed trades take a tick every 2.5 trades, and PnL up to 1.2 SOL one every
    # 0.25 SOL: a tick at 7.5 is not labelled 8, nor one at 0.25 SOL 0.2
    drawn = svg.bar_chart(
        [0.12 * i for i in range(11)], label="PnL per trade", x_label="closed trade",
        y_label="PnL (SOL)",
    )  # fmt: skip
    assert re.findall(r">([-0-9.]+)</text>", drawn) == [
        "0", "0.25", "0.50", "0.75", "1.00", "1.25",
        "0", "2.5", "5.0", "7.5", "10.0", "12.5",
    ]  # fmt: skip


def test_slippage_is_positive_when_the_price_is_worse_for_the_side():
    assert slippage_pct("buy", 1.1e-8, 10.0, 1e9) == pytest.approx(10.0)
    assert slippage_pct("sell", 0.9e-8, 10.0, 1e9) == pytest.approx(10.0)
    assert slippage_pct("sell", 1.1e-8, 10.0, 1e9) == pytest.approx(-10.0)


def test_equity_drawdown_and_calibration_figures():
    def trade(n: int, pnl: float) -> Trade:
        return Trade(position_id=f"p{n}", mint="m", opened_at=n, closed_at=n + 10.0,
                     bought_sol=0.1, realized_pnl_sol=pnl, fees_sol=0.0)  # fmt: skip

    trades = [trade(i, pnl) for i, pnl in enumerate([0.3, -0.1, -0.25, 0.5, -0.05])]
    sales = tuple(
        Sale(position_id=t.position_id, mint=t.mint, time=t.closed_at,
             realized_pnl_sol=t.realized_pnl_sol)
        for t in trades
    )  # fmt: skip
    found = Results(title="t", source="s", trades=tuple(trades), sales=sales)
    assert [round(v, 6) for _, v in results.equity_curve(found)] == [
        0.0, 0.3, 0.2, -0.05, 0.45, 0.4
    ]  # fmt: skip
    assert results.max_drawdown(found) == pytest.approx(0.35)
    bins = results.calibration_bins([0, 1, 1, 0, 1], [0.05, 0.15, 0.95, 0.91, 1.0], bins=10)
    assert [(round(b.predicted, 3), b.observed, b.count) for b in bins] == [
        (0.05, 0.0, 1), (0.15, 1.0, 1), (0.953, 2 / 3, 3)
    ]  # fmt: skip


def _sold_in_parts() -> LedgerChange:
    """Two tokens, each bought for 0.1 SOL and sold half at a time, every fee in the
    amounts: "a" half at 160 for 0.08 (+0.03), the rest at 220 for 0.04 (-0.01), closed
    at +0.02; "b" half at 200 for 0.03 (-0.02), still open."""
    orders, fills = [], []
    for order_id, mint, side, tokens, sol, at in (
        ("a1", "a", "buy", 3e6, 0.1, 100.0),
        ("b1", "b", "buy", 3e6, 0.1, 120.0),
        ("a2", "a", "sell", 1.5e6, 0.08, 160.0),
        ("b2", "b", "sell", 1.5e6, 0.03, 200.0),
        ("a3", "a", "sell", 1.5e6, 0.04, 220.0),
    ):
        position = order_id[0] + "1"
        orders.append(OrderRecord(
            order_id=order_id, mint=mint, side=side, sol_amount=sol, token_amount=None,
            slippage_pct=5.0, reason="score 0.7" if side == "buy" else "take_profit",
            position_id=position, cause_id=None, executor="paper", state="filled",
            requested_at=at, venue="curve",
        ))  # fmt: skip
        fills.append(FillRecord(
            order_id=order_id, mint=mint, side=side, token_amount=tokens, sol_amount=sol,
            price=sol / tokens, fee_sol=0.001, filled_at=at,
            position_id=position if side == "sell" else None, reason=orders[-1].reason,
        ))  # fmt: skip
    positions = [
        PositionRecord(
            position_id="a1", mint="a", opened_at=100.0, closed_at=220.0,
            close_reason="take_profit", token_amount=0.0, cost_sol=0.0, entry_price=0.1 / 3e6,
            realized_pnl_sol=0.02, fees_sol=0.003, mark_price=None,
        ),
        PositionRecord(
            position_id="b1", mint="b", opened_at=120.0, closed_at=None, close_reason="",
            token_amount=1.5e6, cost_sol=0.05, entry_price=0.1 / 3e6, realized_pnl_sol=-0.02,
            fees_sol=0.002, mark_price=0.02 / 1.5e6,
        ),
    ]  # fmt: skip
    return LedgerChange(orders=orders, fills=fills, positions=positions)


async def test_the_equity_curve_steps_at_every_sale_and_ends_at_the_realised_pnl():
    """A position's partial sale and its close are two steps, each at its fill, and an
    open position's partial sale is one too: the curve ends at the realised PnL."""
    ledger = MemoryLedger()
    await ledger.commit(_sold_in_parts())
    found = await from_ledger(ledger, title="t", source="s")
    curve = [(t, round(pnl, 9)) for t, pnl in results.equity_curve(found)]
    assert curve == [(100.0, 0.0), (160.0, 0.03), (200.0, 0.01), (220.0, 0.0)]
    closed = found.trades[0]
    assert [s.time for s in found.sales if s.position_id == "a1"] == [160.0, 220.0]
    assert sum(s.realized_pnl_sol for s in found.sales if s.position_id == "a1") == (
        pytest.approx(closed.realized_pnl_sol)
    )
    assert curve[-1][1] == pytest.approx(sum(t.realized_pnl_sol for t in found.trades))
    # each buy is its position's: what the book booked
    assert [t.bought_sol for t in found.trades] == [0.1, 0.1]
    # the sales by the rule that sold: each sale's order's reason, partial ones included
    assert [s.reason for s in found.sales] == ["take_profit"] * 3
    [(count, realized)] = results.sales_by_rule(found).values()
    assert (count, realized) == (3, pytest.approx(0.0, abs=1e-12))
    rows = dict(results.summary(found))
    assert rows["exits by rule"] == "take_profit 1"
    assert re.fullmatch(r"take_profit 3 \([+-]0\.0000 SOL\)", rows["sales by rule"])
    unkept = dict(results.summary(msgspec.structs.replace(found, sales=None)))
    assert unkept["sales by rule"] == results.NO_SALES


async def test_the_drawdown_is_over_every_sale_not_only_the_closed_positions(tmp_path):
    """The closed position alone only gains (0 to +0.02), and the open one's realised
    loss is not a drawdown on the closed positions: sale by sale, the realised PnL falls
    from +0.03 to 0."""
    ledger = MemoryLedger()
    await ledger.commit(_sold_in_parts())
    found = await from_ledger(ledger, title="t", source="s")
    on_closed = results.max_drawdown(msgspec.structs.replace(found, sales=None))
    assert (on_closed, results.max_drawdown(found)) == (0.0, pytest.approx(0.03))
    rows = dict(results.summary(found))
    assert rows["realised PnL (SOL, after fees)"] == "+0.0000"
    assert rows["max drawdown (SOL, realised)"] == "0.0300"
    page = html.write(found, tmp_path / "report.html").read_text()
    assert "<td>max drawdown (SOL, realised)</td><td>0.0300</td>" in page
    assert "Equity curve: realised PnL after fees, sale by sale" in page
    assert results.load(tmp_path / "report.json") == found
    from pumpflow.cli.backtest import Report

    report = Report(
        name="run", frames=10, seconds=1.0, cpu_s=1.0, predictions=0, orders=Counter(),
        entries=2, bought_sol=0.2, realized_sol=0.0, unrealized_sol=0.0, open_positions=1,
        closed_positions=1, wins=1, fees_sol=0.005, max_drawdown_sol=0.03,
    )  # fmt: skip
    assert "max drawdown (realised) 0.0300 SOL" in report.text()


#: results as they were saved before each sale was: trades, no sales
SAVED_WITHOUT_SALES = {
    "title": "pumpflow run: seed 1", "source": "simulated market", "trades": [
        {"position_id": "p1", "mint": "a", "opened_at": 0.0, "closed_at": 10.0,
         "close_reason": "stop_loss", "bought_sol": 0.2, "realized_pnl_sol": -0.03,
         "unrealized_pnl_sol": 0.0, "fees_sol": 0.002},
        {"position_id": "p2", "mint": "b", "opened_at": 5.0, "closed_at": None,
         "close_reason": "", "bought_sol": 0.2, "realized_pnl_sol": -0.02,
         "unrealized_pnl_sol": 0.0, "fees_sol": 0.002},
    ], "slippage": [], "orders": {"filled buy": 2, "filled sell": 2}, "lifecycle": None,
    "calibration": None, "notes": {},
}  # fmt: skip


def test_results_saved_without_their_sales_draw_the_closed_positions_and_say_so(tmp_path, capsys):
    saved = tmp_path / "old.json"
    saved.write_text(json.dumps(SAVED_WITHOUT_SALES))
    assert main(["report", "--results", str(saved)]) == 0
    assert f"report: {tmp_path / 'old.html'}" in capsys.readouterr().out
    page = (tmp_path / "old.html").read_text()
    assert "<td>realised PnL (SOL, after fees)</td><td>-0.0500</td>" in page
    assert (
        "<td>max drawdown (SOL, realised)</td><td>0.0300 (the closed positions only: these "
        "results keep no sales)</td>"
    ) in page
    assert (
        "Equity curve: realised PnL of the closed positions after fees, trade by trade (these "
        "results keep no sales)"
    ) in page
    found = results.load(saved)
    assert found.sales is None
    assert results.equity_curve(found) == [(0.0, 0.0), (10.0, -0.03)]


def _ledger_of(sold: tuple[tuple[str, str, float, float, float], ...]) -> LedgerChange:
    """Positions bought at their opening and sold whole, the sales in the order given
    (position, token, opened at, sold at, its realised PnL in SOL, every fee in it)."""
    orders, fills, positions = [], [], []
    buys = sorted(sold, key=lambda s: s[2])
    sales = [(position, mint, at, pnl, "sell") for position, mint, _, at, pnl in sold]
    legs = [(position, mint, opened, 0.0, "buy") for position, mint, opened, _, _ in buys]
    for position, mint, at, pnl, side in legs + sales:
        # a buy opens the position named by its order id
        order_id = position if side == "buy" else f"{position}-sale"
        sol = 0.2 + pnl if side == "sell" else 0.2
        orders.append(OrderRecord(
            order_id=order_id, mint=mint, side=side, sol_amount=sol, token_amount=None,
            slippage_pct=5.0, reason="stop_loss", position_id=position, cause_id=None,
            executor="paper", state="filled", requested_at=at, venue="curve",
        ))  # fmt: skip
        fills.append(FillRecord(
            order_id=order_id, mint=mint, side=side, token_amount=1e6, sol_amount=sol,
            price=sol / 1e6, fee_sol=0.001, filled_at=at, reason="stop_loss",
            position_id=position if side == "sell" else None,
        ))  # fmt: skip
    for position, mint, opened, at, pnl in sold:
        positions.append(PositionRecord(
            position_id=position, mint=mint, opened_at=opened, closed_at=at,
            close_reason="stop_loss", token_amount=0.0, cost_sol=0.0, entry_price=0.2 / 1e6,
            realized_pnl_sol=pnl, fees_sol=0.002, mark_price=None,
        ))  # fmt: skip
    return LedgerChange(orders=orders, fills=fills, positions=positions)


async def test_sales_at_one_time_follow_the_order_they_were_filled_in():
    """Two sales at one moment: the gain was filled before the loss, so the realised PnL
    rose to +0.3 and fell from there by 0.2; taken the other way round (by the positions'
    openings, the loss's was the earlier) it would have fallen by 0.1 only."""
    ledger = MemoryLedger()
    await ledger.commit(_ledger_of((
        ("gain", "b", 2.0, 10.0, 0.3),
        ("loss", "a", 1.0, 10.0, -0.1),
        ("later", "c", 3.0, 11.0, -0.1),
    )))  # fmt: skip
    found = await from_ledger(ledger, title="t", source="s")
    assert [s.position_id for s in found.sales] == ["gain", "loss", "later"]
    curve = [(t, round(pnl, 9)) for t, pnl in results.equity_curve(found)]
    assert curve == [(1.0, 0.0), (10.0, 0.3), (10.0, 0.2), (11.0, 0.1)]
    assert results.max_drawdown(found) == pytest.approx(0.2)


async def test_an_order_without_an_outcome_reads_in_flight_as_the_text_report_says():
    ledger = MemoryLedger()
    change = _ledger_of((("p1", "a", 1.0, 10.0, 0.1),))
    sent = dataclasses.replace(change.orders[-1], order_id="p1-again", state="sent")
    await ledger.commit(change)
    await ledger.commit(LedgerChange(orders=[sent], fills=[], positions=[]))
    found = await from_ledger(ledger, title="t", source="s")
    assert found.orders == {"filled buy": 1, "filled sell": 1, "in flight sell": 1}
    assert "<td>orders</td><td>filled buy 1, filled sell 1, in flight sell 1</td>" in html.render(
        found
    )


def test_positions_closed_at_one_time_draw_the_same_curve_whatever_their_ids():
    """Results without their sales know no order the positions were closed in, and their
    ids come from random event ids: the tie goes by opening and token."""

    def trade(mint: str, position_id: str, opened: float, closed: float, pnl: float) -> Trade:
        return Trade(position_id=position_id, mint=mint, opened_at=opened, closed_at=closed,
                     bought_sol=0.1, realized_pnl_sol=pnl, fees_sol=0.0)  # fmt: skip

    def drawn(up_id: str, down_id: str) -> tuple[list[float], float]:
        trades = (
            trade("a", "p1", 0.0, 10.0, 5.0),
            trade("b", "p2", 1.0, 20.0, -2.0),
            trade("c", up_id, 2.0, 30.0, 3.0),
            trade("d", down_id, 3.0, 30.0, -3.0),
        )
        found = Results(title="t", source="s", trades=trades, sales=None)
        return [v for _, v in results.equity_curve(found)], results.max_drawdown(found)

    assert drawn("entry-1", "entry-2") == drawn("entry-2", "entry-1") == (
        [0.0, 5.0, 3.0, 6.0, 3.0], pytest.approx(3.0)
    )  # fmt: skip


def test_a_report_with_nothing_in_it_says_so_in_every_plot():
    page = html.render(Results(title="empty", source="nowhere", trades=()))
    assert page.count("no closed trades") == 2
    for message in ("no exits", "lifecycle: not kept", "predictions: not kept", "no filled"):
        assert message in page
    assert re.search(r"(src|href)=|url\(|@import", page) is None


def test_an_a_b_report_draws_the_calibration_of_every_arm_named():
    """Two models side by side are compared on their calibration too: one arm drawn alone
    would leave the other's unseen."""

    def arm(name: str, labels: int, observed: float) -> results.Calibration:
        bins = tuple(
            results.CalibrationBin(predicted=p, observed=observed * p, count=labels // 2)
            for p in (0.2, 0.6)
        )
        return results.Calibration(name=name, labels=labels, bins=bins)

    calibration = (arm("a/a", 900, 1.0), arm("b/b", 1200, 0.5))
    page = html.render(Results(title="AB", source="test", trades=(), calibration=calibration))
    assert "observed rate (a/a, 900 labels; b/b, 1,200 labels)</figcaption>" in page
    drawn = re.findall(r"<title>([^<]*) observed, ([^<]*)</title>", page)
    assert sorted(drawn) == [
        ("0.20 predicted, 0.10", "600 labels"), ("0.20 predicted, 0.20", "450 labels"),
        ("0.60 predicted, 0.30", "600 labels"), ("0.60 predicted, 0.60", "450 labels"),
    ]  # fmt: skip
    assert ">a/a</text>" in page and ">b/b</text>" in page


def test_a_runs_report_says_which_tranches_of_its_graceful_exit_got_no_outcome():
    sold = ExitLine(position_id="p1", mint="m1", tokens_sold=1e6, sol_received=0.25,
                    tranches=2, completed=True)  # fmt: skip
    lost = ExitLine(position_id="p2", mint="m2", tokens_sold=2e6, sol_received=0.5,
                    tranches=1, completed=False, unconfirmed_tranches=2,
                    unconfirmed_tokens=3e6)  # fmt: skip
    # every token in a rule's sale ordered before the exit, with no outcome by its end
    held = ExitLine(position_id="p3", mint="m3", tokens_sold=0.0, sol_received=0.0,
                    tranches=0, completed=False, pending_tokens=4e6)  # fmt: skip
    summary = GracefulExitSummary(
        reason="pumpflow run ended", started_at=0.0, finished_at=50.0, deadline=60.0,
        lines=(sold, lost, held),
    )  # fmt: skip
    note = graceful_exit_note(summary)
    assert note == (
        "1 of 3 positions sold out in 3 tranches, 0.7500 SOL recovered; UNCONFIRMED: 2 "
        "tranches of 1 position got no outcome, their 3e+06 tokens may have sold; "
        "AWAITING: rule sales of 1 position got no outcome, their 4e+06 tokens still held "
        "or sold"
    )
    why = not_flat_reason(2, summary)
    assert why.endswith("its report: 2 of 3 not sold out, 2 with sales that got no outcome")
    page = html.render(
        Results(title="run", source="here", trades=(), notes={"graceful exit": note})
    )
    assert "<td>graceful exit</td><td>1 of 3 positions sold out" in page
    assert "UNCONFIRMED: 2 tranches" in page
    clean = GracefulExitSummary(
        reason="pumpflow run ended", started_at=0.0, finished_at=50.0, deadline=60.0,
        lines=(sold,),
    )  # fmt: skip
    assert (
        graceful_exit_note(clean) == "1 of 1 position sold out in 2 tranches, 0.2500 SOL recovered"
    )


def test_a_graceful_exit_note_says_one_position_and_one_tranche_in_the_singular():
    def line(n: int, tranches: int) -> ExitLine:
        return ExitLine(position_id=f"p{n}", mint=f"m{n}", tokens_sold=1e6, sol_received=0.25,
                        tranches=tranches, completed=True)  # fmt: skip

    def note(*lines: ExitLine) -> str:
        summary = GracefulExitSummary(reason="pumpflow run ended", started_at=0.0,
                                      finished_at=50.0, deadline=60.0, lines=lines)  # fmt: skip
        return graceful_exit_note(summary)

    assert note(line(1, 1)) == "1 of 1 position sold out in 1 tranche, 0.2500 SOL recovered"
    assert note(line(1, 1), line(2, 1)) == (
        "2 of 2 positions sold out in 2 tranches, 0.5000 SOL recovered"
    )


async def test_an_open_position_no_trade_has_marked_reads_unmarked_and_the_totals_leave_it_out(
    tmp_path,
):
    from dataclasses import replace

    change = _ledger_change()
    held = replace(change.positions[1], mark_price=None)
    ledger = MemoryLedger()
    await ledger.commit(LedgerChange(
        orders=change.orders, fills=change.fills, positions=[change.positions[0], held]
    ))  # fmt: skip
    found = await from_ledger(ledger, title="t", source="s")
    # its worth is unknown: a 0.0 would read as tokens worth exactly their cost
    assert found.trades[1].unrealized_pnl_sol is None
    rows = dict(results.summary(found))
    assert rows["open positions at their mark (SOL)"] == "+0.0000 (1 unmarked, left out)"
    assert rows["total PnL (SOL)"] == "+0.0050 (1 unmarked, left out)"
    path = html.write(found, tmp_path / "report.html")
    assert "<td>total PnL (SOL)</td><td>+0.0050 (1 unmarked, left out)</td>" in path.read_text()
    assert results.load(path.with_suffix(".json")).trades[1].unrealized_pnl_sol is None


async def test_an_embedded_runs_report_takes_the_books_unmarked_position_as_unmarked():
    from types import SimpleNamespace

    from pumpflow.common.trading.positions import Position, PositionBook
    from pumpflow.report.gather import Collector

    change = _ledger_change()
    ledger = MemoryLedger()
    await ledger.commit(change)
    book = PositionBook()
    book.open_positions["mint"] = Position(
        position_id="b2", mint="mint", opened_at=200.5, tokens=3e6, cost_sol=0.1
    )

    class System(dict):
        services: dict = {}

    system = System(trading=SimpleNamespace(book=book, ledger=ledger))
    found = await Collector().results(system, title="t", source="s")
    assert found.trades[1].unrealized_pnl_sol is None
    assert dict(results.summary(found))["total PnL (SOL)"] == "+0.0050 (1 unmarked, left out)"


async def test_an_entry_is_the_arm_s_whose_prediction_caused_it_whatever_came_between():
    """Trading's buy names the prediction it acted on; newer predictions of the token (of
    another arm after a change of the shares) may reach the report first."""
    from pumpflow.common.events import ModelPrediction, OrderRequested, make_event
    from pumpflow.report.gather import Collector

    def prediction(model_id: str, arm: str, time: float, *, shadow: bool = False):
        payload = ModelPrediction(mint="m", model_id=model_id, arm=arm, shadow=shadow,
                                  feature_set_version="f", score=0.9)  # fmt: skip
        return make_event(payload, source="model/1", time=time)

    acted_on = prediction("entry", "control", 1.0)
    buy = OrderRequested(order_id="o", mint="m", side="buy", sol_amount=0.1)
    collector = Collector()
    for event in (
        acted_on,
        prediction("twin", "twin", 1.5),
        prediction("entry", "shadow", 1.5, shadow=True),
        make_event(buy, source="trading/1", time=1.6, cause=acted_on),
    ):
        await collector.on_event(event)
    assert collector.entered == {"m": "entry/control"}
