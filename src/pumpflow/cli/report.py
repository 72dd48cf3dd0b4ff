"""``pumpflow report``: write the HTML report of a run, a backtest or a deployment.

From ``--results FILE.json`` (what ``pumpflow run`` and ``pumpflow backtest`` save beside
their report), or from the trading ledger in Postgres (``--dsn``/``--schema``, or the
settings' ``PUMPFLOW_POSTGRES_DSN`` and ``PUMPFLOW_NAMESPACE``): the positions, orders
and fills trading stored. The ledger keeps no lifecycle nor predictions, so those plots
say so.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from pumpflow.common.runtime.arguments import (
    UsageError,
    help_text,
    postgres_dsn,
    schema_name,
    writable,
)
from pumpflow.common.runtime.settings import setting_text
from pumpflow.common.text import counted

if TYPE_CHECKING:
    from pumpflow.report.results import Results

#: where reports go unless told: PUMPFLOW_REPORTS_DIR, else reports/ here
REPORTS_DIR_ENV = "PUMPFLOW_REPORTS_DIR"


def default_path(kind: str, name: str) -> Path:
    """``<reports folder>/<kind>-<name>-<UTC time>.html``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path(os.environ.get(REPORTS_DIR_ENV) or "reports") / f"{kind}-{name}-{stamp}.html"


def report_writable(path: str | Path, *, flag: str) -> Path:
    """:func:`writable` for an HTML report, whose results are saved beside it as .json:
    a report named so would be overwritten by them."""
    if Path(path).suffix.lower() == ".json":
        raise UsageError(
            f"{flag} {path}: the report's results are saved beside it "
            f"as .json and would overwrite it: give the report an .html name"
        )
    return writable(path)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write the HTML report of saved results or of the Postgres trading ledger",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--results", metavar="FILE.json", help="results a run or backtest saved")
    parser.add_argument(
        "--dsn", type=postgres_dsn, help="Postgres DSN (default: PUMPFLOW_POSTGRES_DSN)"
    )
    parser.add_argument(
        "--schema", type=schema_name, help="Postgres schema (default: PUMPFLOW_NAMESPACE)"
    )
    parser.add_argument(
        "--out",
        metavar="FILE.html",
        help="where to write it (beside --results' file, as .html; the ledger's: "
        "reports/report-...html)",
    )
    parser.set_defaults(handler=report_command)


async def ledger_results(dsn: str, schema: str) -> Results:
    """The results of the trading ledger in ``schema``; NoSuchSchema when there is no
    such schema (a typo would otherwise be migrated into an empty ledger)."""
    from pumpflow.common.db.pool import create_pool
    from pumpflow.report.gather import from_ledger
    from pumpflow.trading.ledger import PostgresLedger

    pool = await create_pool(dsn, schema, max_size=2, existing=True)
    try:
        return await from_ledger(
            PostgresLedger(pool), title=f"pumpflow report: {schema}",
            source=f"trading ledger in Postgres schema {schema}",
        )  # fmt: skip
    finally:
        await pool.close()


def report_command(args: argparse.Namespace) -> int:
    from pumpflow.report import html, results

    if args.results and (args.dsn or args.schema):
        raise SystemExit("pumpflow report: --results or --dsn/--schema, not both")
    if args.out:
        report_writable(args.out, flag="--out")
    if args.results:
        # input the command refuses, as a bad flag is (exit status 2)
        try:
            found = results.load(args.results)
        except OSError as exc:
            raise UsageError(f"{args.results}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        out = Path(args.out) if args.out else Path(args.results).with_suffix(".html")
    else:
        from pumpflow.common.runtime.settings import CommonSettings

        settings = CommonSettings.load(service="report")
        schema = args.schema or settings.namespace
        try:
            found = asyncio.run(ledger_results(args.dsn or settings.postgres_dsn, schema))
        except OSError as exc:
            raise SystemExit(f"pumpflow report: Postgres does not answer: {exc}") from None
        except LookupError as exc:  # NoSuchSchema: a flag naming nothing
            raise UsageError(f"{exc}: no trading ledger to report") from None
        out = Path(args.out) if args.out else default_path("report", schema)
    print(f"report: {html.write(found, out)}", flush=True)
    return 0


def backtest_report_path(path: str | None, name: str, *, several: bool) -> Path:
    """Where the report of the backtest's configuration ``name`` goes (its name in the
    file's when it ran several); its results are saved beside it (.json)."""
    if path is None:
        return default_path("backtest", name)
    if several:
        return Path(path).with_name(f"{Path(path).stem}-{name}.html")
    return Path(path)


def _settings_text(settings: Mapping) -> str:
    return ", ".join(f"{k}={setting_text(v)}" for k, v in settings.items())


def _base_text(base: Mapping) -> str:
    return f"{_settings_text(base)} (pumpflow run's)"


def write_backtest_reports(
    reports: Sequence, path: str | None, *, source: str, base: Mapping,
    settings: Mapping[str, Mapping], several: bool, said: TextIO = sys.stdout,
) -> list[Path]:  # fmt: skip
    """One report per configuration a backtest ran (its name in the file's when it ran
    ``several``, those that failed included), saying the stream (``source``), the base
    every configuration starts from and the settings the configuration changed over it
    (by name)."""
    import msgspec

    from pumpflow.report import html

    written = []
    for r in reports:
        if r.report_data is None:
            continue
        out = backtest_report_path(path, r.name, several=several)
        notes = {
            "settings": _settings_text(settings.get(r.name) or {}) or "the base's",
            "base": _base_text(base),
            "frames": f"{r.frames:,} in {r.seconds:.1f} s",
            "predictions": r.predictions_text(),
            "live AUC": r.auc_text(),
            "precision": r.precision_text(),
        }
        data = msgspec.structs.replace(
            r.report_data, source=f"{source}: {r.report_data.source}", notes=notes
        )
        written.append(html.write(data, out))
        print(f"report '{r.name}': {written[-1]}", file=said, flush=True)
    return written


#: the name the page comparing a backtest's configurations takes where theirs go
COMPARISON = "comparison"


def write_backtest_comparison(
    reports: Sequence, path: str | None, *, source: str, base: Mapping,
    settings: Mapping[str, Mapping], columns: Sequence[str], rows: Sequence[Sequence[str]],
    said: TextIO = sys.stdout,
) -> Path:  # fmt: skip
    """The page comparing the configurations a backtest ran, beside their reports: the
    base and what each changes over it, the table of ``columns`` and ``rows`` and their
    equity curves overlaid."""
    from pumpflow.report import html

    out = html.write_comparison(
        backtest_report_path(path, COMPARISON, several=True),
        title=f"pumpflow backtest compared: {', '.join(r.name for r in reports)}",
        source=f"{source}: {counted(reports[0].frames, 'frame')}",
        settings=[("base settings", _base_text(base))]
        + [
            (f"{r.name} changes", _settings_text(settings.get(r.name) or {}) or "nothing")
            for r in reports
        ],
        columns=columns,
        rows=rows,
        compared={r.name: r.report_data for r in reports if r.report_data is not None},
    )
    print(f"comparison: {out}", file=said, flush=True)
    return out
