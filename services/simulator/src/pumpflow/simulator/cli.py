"""``pumpflow-sim``: serve the simulated PumpPortal, calibrate, write and load datasets."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path

from pumpflow.common.runtime.arguments import (
    count,
    epoch_time,
    help_text,
    non_negative,
    positive,
    postgres_dsn,
    probability,
    schema_name,
    writable,
)
from pumpflow.common.runtime.signals import stopped_by_signals
from pumpflow.simulator.calibration import calibrate
from pumpflow.simulator.dataset import (
    DatasetError,
    load_dataset,
    read_dataset_raw,
    write_dataset,
)
from pumpflow.simulator.faults import HOSTILE_KINDS, FaultConfig
from pumpflow.simulator.market import Market, MarketConfig
from pumpflow.simulator.server import SimulatorServer


def hostile_kinds(text: str) -> tuple[str, ...]:
    """``--hostile-kinds``: names of :data:`HOSTILE_KINDS`, comma-separated."""
    kinds = tuple(k for k in text.split(",") if k)
    unknown = sorted(set(kinds) - set(HOSTILE_KINDS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {', '.join(unknown)}; known: {', '.join(HOSTILE_KINDS)}"
        )
    return kinds


def build_parser(prog: str = "pumpflow-sim") -> argparse.ArgumentParser:
    """The simulator's parser; ``prog`` names the command it runs under."""
    parser = argparse.ArgumentParser(prog=prog, description=help_text(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)

    def market_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=1, help="market seed (default 1)")
        p.add_argument(
            "--launches", "--rate", dest="rate", type=positive, default=30.0, metavar="LAUNCHES",
            help="token launches per market minute (30), as pumpflow run's and backtest's",
        )  # fmt: skip

    p = sub.add_parser("calibrate", help="measure a run against docs/market.md's statistics")
    market_args(p)
    p.add_argument(
        "--minutes", type=positive, default=60.0, help="simulated minutes of launches (60)"
    )

    p = sub.add_parser("serve", help="serve PumpPortal's data socket from the market")
    market_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (8765; 0: any)")
    p.add_argument(
        "--speed",
        type=non_negative,
        default=1.0,
        help="time-scale factor: 1 real time (the default), 10 ten times faster, 0 as fast as read",
    )
    p.add_argument(
        "--drop-every",
        type=positive,
        default=None,
        metavar="S",
        help="drop every connection (no close frame) every S seconds",
    )
    p.add_argument(
        "--malformed-rate",
        type=probability,
        default=0.0,
        metavar="R",
        help="share of frames replaced by a malformed one",
    )
    p.add_argument(
        "--duplicate-rate",
        type=probability,
        default=0.0,
        metavar="R",
        help="share of frames sent twice",
    )
    p.add_argument(
        "--delay-rate",
        type=probability,
        default=0.0,
        metavar="R",
        help="share of frames held back by a random extra latency",
    )
    p.add_argument(
        "--delay-max",
        type=non_negative,
        default=0.5,
        metavar="S",
        help="longest extra latency of a held-back frame (0.5 s)",
    )
    p.add_argument(
        "--hostile-rate",
        type=probability,
        default=0.0,
        metavar="R",
        help="share of frames followed by a hostile frame",
    )
    p.add_argument(
        "--hostile-kinds",
        type=hostile_kinds,
        default=(),
        metavar="K,K",
        help=f"hostile classes (default all but oversize): {','.join(HOSTILE_KINDS)}",
    )
    p.add_argument(
        "--sent-log",
        default=None,
        metavar="FILE",
        help="append one tab-separated line per data frame sent to a connection",
    )
    p.add_argument(
        "--stats-out",
        default=None,
        metavar="FILE.json",
        help="write the sent counters as JSON on exit",
    )
    p.add_argument(
        "--require-api-key",
        action="store_true",
        help="gate trade subscriptions behind ?api-key= like the live service",
    )
    p.add_argument(
        "--unfunded-key",
        action="append",
        default=[],
        metavar="KEY",
        help="a key whose wallet holds under 0.02 SOL: its trade subscriptions are refused "
        "(repeat for more)",
    )
    p.add_argument(
        "--fund-after",
        type=non_negative,
        default=None,
        metavar="SECONDS",
        help="fund every wallet (the unfunded keys, and connections without a key) this "
        "many real seconds after the start: a drill of a key funded while the feed runs",
    )

    p = sub.add_parser("dataset", help="write a run as JSONL of frames with arrival times")
    market_args(p)
    p.add_argument("--minutes", type=positive, default=60.0, help="simulated minutes (60)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="the file to write")
    p.add_argument(
        "--start-epoch",
        type=epoch_time,
        default=None,
        help="arrival time of the run's start (epoch s or ISO, UTC; default: now)",
    )

    p = sub.add_parser("load", help="load a JSONL dataset into Postgres")
    p.add_argument("file", metavar="FILE.jsonl", help="a `dataset` or `pumpflow record --out` file")
    p.add_argument(
        "--dsn",
        type=postgres_dsn,
        default=None,
        help="Postgres DSN (default: PUMPFLOW_POSTGRES_DSN)",
    )
    p.add_argument(
        "--schema",
        type=schema_name,
        default=None,
        help="Postgres schema (default: PUMPFLOW_NAMESPACE)",
    )
    p.add_argument("--batch-size", type=count, default=5_000, help="rows per insert (5000)")
    return parser


def main(argv: list[str] | None = None, *, prog: str = "pumpflow-sim") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "calibrate":
        report = calibrate(
            MarketConfig(seed=args.seed, launches_per_minute=args.rate), minutes=args.minutes
        )
        print(report.format())
        return 0 if report.ok else 1
    if args.command == "dataset":
        market = Market(MarketConfig(seed=args.seed, launches_per_minute=args.rate))
        start = time.time() if args.start_epoch is None else args.start_epoch
        began = time.perf_counter()
        count = write_dataset(market, args.out, duration_s=args.minutes * 60.0, start_epoch=start)
        took = time.perf_counter() - began
        print(f"wrote {count} frames to {args.out} in {took:.2f} s ({count / took:,.0f} frames/s)")
        return 0
    if args.command == "serve":
        if args.stats_out:
            try:  # before the session, whose counters it would lose at the end
                writable(args.stats_out)
            except OSError as exc:
                print(f"{prog} serve: --stats-out {exc.filename}: {exc.strerror}", file=sys.stderr)
                return 2
        try:
            counters = asyncio.run(_serve(args))
        except CannotListen as exc:
            print(f"{prog} serve: {exc}", file=sys.stderr)
            return 1
        if args.stats_out:
            Path(args.stats_out).write_text(json.dumps(counters))
        return 0
    if args.command == "load":
        try:
            return asyncio.run(_load(args, prog))
        except DatasetError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
    return 2


class CannotListen(Exception):
    """The socket to serve on cannot be had: the message says where and why."""


async def _serve(args: argparse.Namespace) -> dict[str, int]:
    faults = FaultConfig(
        drop_every_s=args.drop_every,
        malformed_rate=args.malformed_rate,
        duplicate_rate=args.duplicate_rate,
        delay_rate=args.delay_rate,
        delay_max_s=args.delay_max,
        hostile_rate=args.hostile_rate,
        hostile_kinds=args.hostile_kinds,
        seed=args.seed,
    )
    server = SimulatorServer(
        market=Market(MarketConfig(seed=args.seed, launches_per_minute=args.rate)),
        host=args.host,
        port=args.port,
        speed=args.speed,
        faults=faults,
        require_api_key=args.require_api_key,
        unfunded_keys=args.unfunded_key,
        fund_after_s=args.fund_after,
        sent_log=args.sent_log,
    )
    try:
        await server.start()
    except OSError as exc:  # the port is another's, or the address is not this machine's
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CannotListen(f"cannot listen on {args.host}:{args.port}: {reason}") from None
    print(f"serving {server.url}", flush=True)
    stop = asyncio.Event()
    with stopped_by_signals(stop):
        await stop.wait()
        await server.stop()
    print(f"sent: {dict(server.counters)}", flush=True)
    return dict(server.counters)


async def _load(args: argparse.Namespace, prog: str) -> int:
    from pumpflow.common.db.pool import create_pool
    from pumpflow.common.runtime.settings import CommonSettings
    from pumpflow.common.storage import TokenEventStore

    settings = CommonSettings.load()
    # a file not there, or no dataset from its first line, gets no schema made for it
    frames = read_dataset_raw(args.file)
    first = next(frames, None)
    if first is None:
        # as a backtest or a training of it would: nothing to run on is a failure
        print(f"{prog}: no frames in {args.file}: nothing stored", file=sys.stderr)
        return 1
    # a batch is one COPY and insert: one of --batch-size rows far beyond the default may
    # need PUMPFLOW_POSTGRES_COMMAND_TIMEOUT_S raised
    pool = await create_pool(
        args.dsn or settings.postgres_dsn,
        args.schema or settings.namespace,
        command_timeout=settings.postgres_command_timeout_s,
    )
    try:
        began = time.perf_counter()
        result = await load_dataset(
            args.file,
            TokenEventStore(pool),
            batch_size=args.batch_size,
            timed_frames=itertools.chain((first,), frames),
        )
        took = time.perf_counter() - began
    finally:
        await pool.close()
    print(
        f"{result.frames} frames read, {result.inserted} stored, {result.rejected} rejected "
        f"in {took:.2f} s ({result.frames / max(took, 1e-9):,.0f} frames/s)"
    )
    return 0 if not result.rejected else 1


if __name__ == "__main__":
    sys.exit(main())
