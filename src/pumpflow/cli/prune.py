"""``pumpflow prune``: delete the stored token events older than a bound.

The feed does it on its own every hour (``PUMPFLOW_FEED_RECORD_KEEP_DAYS``); this is for
a bound of the operator's (free the disk now, keep less or more), or a stack whose feed
does not record. What a publisher has not confirmed on the bus yet (past its outbox
position), a redriven event not yet published and the highest seq stay whatever their
age; a token goes with the last of its events. Trading's ledger, the exit's records and
the model's labels are never touched here. Deleted in batches of their own transactions,
so a running feed goes on storing meanwhile; a replay or backtest already reading keeps
reading what it began with (its snapshot). Postgres reuses the space for new rows once
autovacuum has passed; it gives it back to the system only on ``VACUUM FULL``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime

from pumpflow.common.runtime.arguments import (
    UsageError,
    bounded,
    epoch_time,
    help_text,
    postgres_dsn,
    schema_name,
)
from pumpflow.common.runtime.logging import redact_url
from pumpflow.common.runtime.settings import DAY_S, MIN_KEEP_DAYS, CommonSettings, keep_bound


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="delete stored token events older than a bound (--dry-run: count them)",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bound = parser.add_mutually_exclusive_group(required=True)
    bound.add_argument(
        "--before",
        type=epoch_time,
        metavar="WHEN",
        help="delete events older than this (epoch s or ISO, UTC; at least a day ago)",
    )
    bound.add_argument(
        "--keep-days",
        type=bounded(at_least=MIN_KEEP_DAYS),
        metavar="DAYS",
        help=f"delete events older than this many days (at least {MIN_KEEP_DAYS:g})",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count what would go and its size; delete nothing"
    )
    parser.add_argument(
        "--batch-size",
        type=bounded(at_least=1, whole=True),
        default=5_000,
        help="events deleted per transaction (5000, about 0.05 s each)",
    )
    parser.add_argument(
        "--dsn", type=postgres_dsn, help="Postgres DSN (default: PUMPFLOW_POSTGRES_DSN)"
    )
    parser.add_argument("--schema", type=schema_name, help="schema (default: PUMPFLOW_NAMESPACE)")
    parser.set_defaults(handler=prune_command)


def prune_command(args: argparse.Namespace) -> int:
    settings = CommonSettings.load(service="prune")
    now = time.time()
    before = args.before if args.before is not None else keep_bound(now, args.keep_days * DAY_S)
    if before > now - MIN_KEEP_DAYS * DAY_S:
        raise UsageError(
            f"--before must be at least {MIN_KEEP_DAYS:g} day ago, not {_when(before)}"
        )
    dsn = args.dsn or settings.postgres_dsn
    schema = args.schema or settings.namespace
    started = time.monotonic()
    pruned = asyncio.run(_prune(dsn, schema, before, args))
    took = time.monotonic() - started
    tokens = f"{pruned.tokens:,} token{'' if pruned.tokens == 1 else 's'}"
    what = (f"{pruned.events:,} token events older than {_when(before)} and {tokens} whose "
            f"events all go (about {pruned.bytes / 1e6:,.0f} MB)")  # fmt: skip
    where = f"{redact_url(dsn)} schema {schema}"
    if args.dry_run:
        print(f"dry run: would delete {what} from {where}")
    else:
        print(f"deleted {what} from {where} in {took:.1f} s")
    if pruned.held:
        print(f"{pruned.held:,} older events kept: not yet published, or the highest seq")
    return 0


async def _prune(dsn: str, schema: str, before: float, args: argparse.Namespace):
    from pumpflow.common.db.pool import NoSuchSchema, create_pool
    from pumpflow.common.storage import REPLAY_FETCH_TIMEOUT_S, TokenEventStore

    try:
        pool = await create_pool(
            dsn,
            schema,
            max_size=1,
            apply_migrations=False,
            existing=True,
            # a dry run reads every row past the bound once: minutes on a long history
            command_timeout=REPLAY_FETCH_TIMEOUT_S,
            application_name="pumpflow prune",
        )
    except NoSuchSchema as exc:  # a flag naming nothing
        raise UsageError(f"no schema {schema} in {redact_url(dsn)}") from exc
    try:
        return await TokenEventStore(pool).prune(
            before, batch_size=args.batch_size, dry_run=args.dry_run, on_batch=_progress()
        )
    finally:
        await pool.close()


def _progress():
    """Say every 100 batches how many events went, on stderr (a long prune is minutes)."""
    done = {"events": 0, "batches": 0}

    def heard(batch) -> None:
        done["events"] += batch.events
        done["batches"] += 1
        if done["batches"] % 100 == 0:
            print(f"  {done['events']:,} deleted so far", file=sys.stderr)

    return heard


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
