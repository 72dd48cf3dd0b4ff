"""Command-line tools of the feed: record a PumpPortal-protocol stream, replay a recording.

    pumpflow-feed record --url ws://127.0.0.1:8765/api/data --out events.jsonl --duration 60
    pumpflow-feed record --dsn postgresql://postgres@127.0.0.1/test --schema pumpflow
    pumpflow-feed replay --schema pumpflow --start 1700000000 --mint <mint> > events.jsonl
    pumpflow-feed replay --schema pumpflow --bus --speed 10

``record`` stops after ``--duration`` seconds or on SIGINT/SIGTERM, flushes what it
holds and exits 0. The API key comes only from PUMPPORTAL_API_KEY or
PUMPPORTAL_API_KEY_FILE, never from the command line (it would show in ``ps``).
The ``pumpflow`` CLI calls :func:`record`, :func:`replay` and :func:`add_arguments`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pumpflow.common.bus.abc import EventBus
from pumpflow.common.clock import Clock, ReplayClock, WallClock
from pumpflow.common.runtime.arguments import (
    UsageError,
    check_window,
    epoch_time,
    positive,
    postgres_dsn,
    postgres_source,
    schema_name,
)
from pumpflow.common.runtime.settings import SettingsError
from pumpflow.common.runtime.signals import stopped_by_signals
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.text import counted
from pumpflow.feed.database_feed import DatabaseDataFeed, ReplayConfig
from pumpflow.feed.interface import ALL_EVENTS, FeedRecord
from pumpflow.feed.manager import DataFeedManager, FeedManagerConfig
from pumpflow.feed.metrics import FeedMetrics
from pumpflow.feed.recorder import EventSink, JsonlSink, Recorder
from pumpflow.feed.settings import FeedSettings
from pumpflow.feed.socket_feed import SocketDataFeed, SocketFeedConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordSummary:
    events: int
    stored: int
    invalid_frames: int
    duplicates: int
    sessions: int


def _default_source() -> str:
    return f"record/{os.uname().nodename}-{os.getpid()}"


async def record(
    *,
    url: str,
    api_key: str | None = None,
    out: str | Path | IO[bytes] | None = None,
    dsn: str | None = None,
    schema: str = "pumpflow",
    duration: float | None = None,
    stop: asyncio.Event | None = None,
    clock: Clock | None = None,
    source: str | None = None,
    subscribe_new_tokens: bool = True,
    subscribe_migrations: bool = True,
    auto_subscribe_trades: bool = True,
    mints: tuple[str, ...] = (),
    backoff_initial: float = 0.5,
) -> RecordSummary:
    """Record normalised events to JSONL (``out``) or Postgres (``dsn``) until stopped."""
    if (out is None) == (dsn is None):
        raise ValueError("give exactly one of out (JSONL) or dsn (Postgres)")
    clock = clock or WallClock()
    stop = stop or asyncio.Event()
    pool = None
    sink: EventSink
    if out is not None:
        sink = JsonlSink(out)
    else:
        from pumpflow.common.db.pool import create_pool

        pool = await create_pool(dsn, schema, max_size=2)
        sink = TokenEventStore(pool)
    metrics = FeedMetrics(registry=None)
    recorder = Recorder(sink, metrics=metrics)
    manager = DataFeedManager(
        None,
        config=FeedManagerConfig(source=source or _default_source()),
        recorder=recorder,
        metrics=metrics,
    )
    socket = SocketDataFeed(
        SocketFeedConfig(
            url=url,
            api_key=api_key,
            subscribe_new_tokens=subscribe_new_tokens,
            subscribe_migrations=subscribe_migrations,
            auto_subscribe_trades=auto_subscribe_trades,
            backoff_initial_s=backoff_initial,
        ),
        clock=clock,
        metrics=metrics,
    )
    manager.add_data_feed(socket)
    try:
        if mints:
            await manager.subscribe_to_token(mints)
        await manager.start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(duration):
                await stop.wait()
    finally:
        await manager.stop()
        if isinstance(sink, JsonlSink):
            sink.close()
        if pool is not None:
            await pool.close()
    return RecordSummary(
        events=manager.events,
        stored=recorder.stored,
        invalid_frames=socket.invalid_frames,
        duplicates=manager.duplicates,
        sessions=socket.sessions,
    )


async def replay(
    *,
    dsn: str,
    schema: str = "pumpflow",
    start: float | None = None,
    end: float | None = None,
    mints: tuple[str, ...] | None = None,
    speed: float | None = None,
    out: str | Path | IO[bytes] | None = None,
    bus: EventBus | None = None,
) -> int:
    """Replay recorded events in time order to JSONL (``out``, default stdout) or a bus;
    NoSuchSchema when ``schema`` is not there (a typo would replay an empty one)."""
    from pumpflow.common.db.pool import create_pool

    pool = await create_pool(dsn, schema, max_size=2, existing=True)
    sink = None if bus is not None else JsonlSink(out if out is not None else sys.stdout.buffer)
    try:
        feed = DatabaseDataFeed(
            TokenEventStore(pool),
            ReplayConfig(start=start, end=end, mints=mints, speed=speed),
            clock=ReplayClock(),
        )

        async def deliver(record: FeedRecord) -> None:
            if bus is not None:
                await bus.publish(record.event)
            else:
                await sink.write_batch([record.event])

        feed.register_callback(ALL_EVENTS, deliver)
        return await feed.run()
    finally:
        if sink is not None:
            sink.close()
        await pool.close()


# ------------------------------------------------------------------------------ argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``record`` and ``replay`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="feed_command", required=True)
    rec = sub.add_parser("record", help="record a PumpPortal-protocol stream")
    rec.add_argument("--url", help="WebSocket URL (default: PUMPPORTAL_WS_URL)")
    rec.add_argument("--out", type=Path, help="JSONL file (default: Postgres)")
    rec.add_argument(
        "--dsn", type=postgres_dsn, help="Postgres DSN (default: PUMPFLOW_POSTGRES_DSN)"
    )
    rec.add_argument(
        "--schema", type=schema_name, help="Postgres schema (default: PUMPFLOW_NAMESPACE)"
    )
    rec.add_argument("--duration", type=positive, help="seconds to record (default: until stopped)")
    rec.add_argument("--mint", action="append", default=[], help="also stream this mint's trades")
    rec.add_argument("--no-new-tokens", action="store_true", help="skip token creations")
    rec.add_argument("--no-migrations", action="store_true", help="skip migrations")
    rec.add_argument("--no-auto-trades", action="store_true", help="no trades of new tokens")
    rep = sub.add_parser("replay", help="replay recorded events in time order")
    rep.add_argument(
        "--dsn", type=postgres_dsn, help="Postgres DSN (default: PUMPFLOW_POSTGRES_DSN)"
    )
    rep.add_argument(
        "--schema", type=schema_name, help="Postgres schema (default: PUMPFLOW_NAMESPACE)"
    )
    rep.add_argument(
        "--start", type=epoch_time, help="first event time (epoch s or ISO, UTC; inclusive)"
    )
    rep.add_argument(
        "--end", type=epoch_time, help="last event time (epoch s or ISO, UTC; exclusive)"
    )
    rep.add_argument("--mint", action="append", help="only these mints (repeatable)")
    rep.add_argument(
        "--speed", type=positive, help="times real time (default: as fast as possible)"
    )
    rep.add_argument("--out", type=Path, help="JSONL file (default: stdout)")
    rep.add_argument("--bus", action="store_true", help="publish onto the bus (PUMPFLOW_*)")


class NothingDone(Exception):
    """A recording or replay that did nothing: the message says why."""


async def run(args: argparse.Namespace) -> int:
    """Run a parsed ``record``/``replay`` command; return the exit code."""
    settings = FeedSettings.load()
    dsn = args.dsn or settings.postgres_dsn
    schema = args.schema or settings.namespace
    if args.feed_command == "record":
        stop = asyncio.Event()
        url = args.url or settings.pumpportal_ws_url
        with stopped_by_signals(stop):
            summary = await record(
                url=url,
                api_key=settings.api_key(),
                out=args.out,
                dsn=None if args.out else dsn,
                schema=schema,
                duration=args.duration,
                stop=stop,
                subscribe_new_tokens=not args.no_new_tokens,
                subscribe_migrations=not args.no_migrations,
                auto_subscribe_trades=not args.no_auto_trades,
                mints=tuple(args.mint),
            )
        print(
            f"recorded {counted(summary.events, 'event')} ({summary.stored:,} new), "
            f"{counted(summary.invalid_frames, 'invalid frame')}, "
            f"{counted(summary.duplicates, 'duplicate')}, {counted(summary.sessions, 'session')}",
            file=sys.stderr,
        )
        if not summary.sessions:
            raise NothingDone(f"never connected to {url}: nothing recorded")
        return 0
    check_window(args.start, args.end)
    bus = None
    if args.bus:
        from pumpflow.common.bus.factory import create_bus
        from pumpflow.common.runtime.wiring import bus_config

        bus = create_bus(bus_config(settings))
        await bus.start()
    try:
        count = await replay(
            dsn=dsn, schema=schema, start=args.start, end=args.end,
            mints=tuple(args.mint) if args.mint else None, speed=args.speed, out=args.out,
            bus=bus,
        )  # fmt: skip
    finally:
        if bus is not None:
            await bus.close()
    print(f"replayed {counted(count, 'event')}", file=sys.stderr)
    if not count:
        window = postgres_source(schema, args.start, args.end)
        if args.mint:
            window += f", of {', '.join(args.mint)}"
        raise NothingDone(f"no events in {window}: nothing replayed")
    return 0


def build_parser(prog: str = "pumpflow-feed") -> argparse.ArgumentParser:
    """The feed's parser; ``prog`` names the command it runs under."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str = "pumpflow-feed") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    from pumpflow.common.db.pool import NoSuchSchema

    try:
        return asyncio.run(run(args))
    except SettingsError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"{prog} {args.feed_command}: {exc}", file=sys.stderr)
        return 2
    except NothingDone as exc:
        print(f"{prog} {args.feed_command}: {exc}", file=sys.stderr)
        return 1
    except NoSuchSchema as exc:  # a flag naming nothing, as a bad flag is
        print(f"{prog} {args.feed_command}: {exc}: nothing recorded there", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
