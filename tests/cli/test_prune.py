"""``pumpflow prune`` against a real Postgres schema."""

from __future__ import annotations

import asyncio
import time

import pytest

from pumpflow.cli import main as cli_main
from pumpflow.common.events import make_event
from pumpflow.common.pumpportal import decode_frame
from pumpflow.common.storage import TokenEventStore
from pumpflow.feed import reference_frames as ref

pytestmark = pytest.mark.postgres

DAY = 86_400.0


async def _stored(pg_pool) -> TokenEventStore:
    """A create and a sale 40 days old, published, and a migration of an hour ago."""
    store = TokenEventStore(pg_pool)
    now = time.time()
    frames = [(ref.CREATE, now - 40 * DAY), (ref.SELL, now - 39 * DAY), (ref.MIGRATE, now - 3600)]
    events = [
        make_event(decode_frame(raw), source="feed/x", time=t, seq=None, received_at=t)
        for raw, t in frames
    ]
    await store.write(events, [raw for raw, _ in frames])
    await store.mark_published("feed", await store.last_row())
    return store


async def test_a_dry_run_says_what_would_go_and_a_prune_deletes_it(
    pg_pool, namespace, postgres_dsn, capsys
):
    store = await _stored(pg_pool)
    where = ["--dsn", postgres_dsn, "--schema", namespace]
    argv = ["prune", "--keep-days", "30", "--dry-run", *where]
    assert await asyncio.to_thread(cli_main.main, argv) == 0
    out = capsys.readouterr().out
    assert "dry run: would delete 2 token events older than" in out, out
    assert "and 1 token whose events all go" in out and " MB" in out, out
    assert await store.count() == 3
    before = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 30 * DAY))
    assert await asyncio.to_thread(cli_main.main, ["prune", "--before", before, *where]) == 0
    assert "deleted 2 token events older than" in capsys.readouterr().out
    assert [e.type async for e in store.stream()] == ["token.migrated"]
    assert await pg_pool.fetchval("SELECT count(*) FROM tokens") == 0


async def test_a_bound_within_a_day_or_no_bound_is_refused(
    pg_pool, namespace, postgres_dsn, capsys
):
    store = await _stored(pg_pool)
    where = ["--dsn", postgres_dsn, "--schema", namespace]
    recent = ["prune", "--before", str(time.time() - 3600), *where]
    assert await asyncio.to_thread(cli_main.main, recent) == 2
    assert "pumpflow prune: --before must be at least 1 day ago" in capsys.readouterr().err
    for flags in (["--keep-days", "0.5"], []):
        with pytest.raises(SystemExit) as refused:
            cli_main.main(["prune", *flags, *where])
        assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "--keep-days: must be >= 1, not 0.5" in err, err
    assert "one of the arguments --before --keep-days is required" in err, err
    assert await store.count() == 3


async def test_a_keep_longer_than_any_date_deletes_nothing_and_says_so(
    pg_pool, namespace, postgres_dsn, capsys
):
    """Not a traceback of a bound before the year 1: nothing stored is older than 1970."""
    store = await _stored(pg_pool)
    argv = ["prune", "--keep-days", "100000000", "--dsn", postgres_dsn, "--schema", namespace]
    assert await asyncio.to_thread(cli_main.main, argv) == 0
    out = capsys.readouterr().out
    assert "deleted 0 token events older than 1970-01-01T00:00:00Z" in out, out
    assert await store.count() == 3
