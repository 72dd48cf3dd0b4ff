"""Versioned SQL migrations, applied in order by one idempotent command.

Files ``NNNN_name.sql`` in ``migrations/`` run in one transaction each; applied
versions are recorded in ``schema_migrations`` with the file's checksum, so a
migration edited after it ran is reported instead of silently skipped. One
transaction each means a migration cannot hold a statement that refuses to run in
one (``CREATE INDEX CONCURRENTLY``): it fails, named, and is not recorded.

Migrations run while the previous version's replicas still work on the tables (an
upgrade in place). A migration's DDL needs a strong lock on its table; while it waits
for one (an old replica's open transaction read the table), Postgres queues every
later query of that table behind it, and the running services' writes would stall
with it for as long. So a migration waits for a lock at most :data:`LOCK_TIMEOUT_S`;
then its transaction is rolled back and tried again after a pause, each try logging
who blocks it (``pg_blocking_pids``), and counted as a wait on Postgres
(:data:`~pumpflow.common.dependencies.WAITS`: readiness names it). A process waiting
for another's migrations (the advisory lock) names that process at an interval too.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources

import asyncpg

from pumpflow.common.dependencies import POSTGRES, Backoff, wait_out

log = logging.getLogger(__name__)
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
#: one process at a time applies migrations (to any schema of the database)
_LOCK_ID = 0x7075_6D70

#: how long a migration's statement waits for a lock before its transaction is rolled
#: back and tried again after a pause. The running services' queries of the table
#: queue behind that wait, so it is how long they may stall per try: well under their
#: command timeout (``postgres_command_timeout_s``, 30 s), so a queued write does not
#: fail on it, and far above what their own transactions hold a table (milliseconds),
#: so on a busy table the migration still gets its lock between them.
#:
#: No ``statement_timeout``: a statement that has its lock runs as long as its rows
#: take (a data migration, an index on a big table), and cut it would be rolled back
#: and run again from the start at each try, never done. Such a migration holds its
#: lock meanwhile; it is written in small steps or applied with ``pumpflow migrate``
#: while the services are stopped (docs/reliability.md, "Upgrading").
LOCK_TIMEOUT_S = 3.0
#: a wait for another process's migrations names that process once per this many
#: :data:`LOCK_TIMEOUT_S`: it stalls nothing but this process's start
HOLDER_LOG_EVERY = 10
#: who blocks a migration is looked at this many times per lock timeout
_WATCHES_PER_TIMEOUT = 4
#: at most this many blockers are named in a line, their queries cut to _QUERY_CHARS
_MAX_NAMED = 3
_QUERY_CHARS = 60
_BACKENDS = f"""
SELECT pid, application_name, state, query_start, left(query, {_QUERY_CHARS}) AS query
FROM pg_stat_activity WHERE pid IN ({{}}) ORDER BY query_start"""
#: the backends that block backend $1's wait for a lock
_BLOCKING = _BACKENDS.format("SELECT unnest(pg_blocking_pids($1))")
#: the backends that hold the migrations' lock ($1)
_HOLDING = _BACKENDS.format("""
SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND classid = 0 AND objid = $1
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())""")


class MigrationError(RuntimeError):
    """A migration failed or an applied one was changed."""


class MigrationBlocked(MigrationError):
    """A lock the migrations need is held by another backend: tried again after a pause,
    a wait on Postgres for readiness and the metrics."""

    transient_dependency = POSTGRES


@dataclass(frozen=True, slots=True, kw_only=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("pumpflow.common.db").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(
                Migration(version=int(match[1]), name=match[2], sql=entry.read_text("utf-8"))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions: {versions}")
    return found


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lock_timeout(seconds: float) -> str:
    return f"SET LOCAL lock_timeout = {max(1, round(seconds * 1000))}"


def _named(rows: Sequence[asyncpg.Record]) -> str:
    """Backends (rows of :data:`_BACKENDS`), named for a log line of bounded length."""
    if not rows:
        return "backends gone by now"
    named = [
        f"pid {r['pid']} ({r['application_name'] or 'no application_name'}, {r['state']}, "
        f"query started {r['query_start']:%Y-%m-%d %H:%M:%S%z}: {r['query']!r})"
        if r["query_start"] is not None
        else f"pid {r['pid']} ({r['application_name'] or 'no application_name'}, {r['state']})"
        for r in rows[:_MAX_NAMED]
    ]
    if len(rows) > len(named):
        named.append(f"{len(rows) - len(named)} more")
    return ", ".join(named)


class _Watch:
    """Who blocks the migrating connection's lock waits, looked at from another
    connection (the migrating one waits): ``pg_blocking_pids`` answers only while the
    wait lasts, and it ends, timed out, before the migrating connection could ask."""

    def __init__(
        self,
        pid: int,
        connect: Callable[[], Awaitable[asyncpg.Connection]] | None,
        every_s: float,
    ):
        self._pid = pid
        self._connect = connect
        self._every_s = every_s
        self._conn: asyncpg.Connection | None = None
        #: the blockers last seen by a look, as they were then; empty: none seen
        self._blocking: list[asyncpg.Record] = []

    async def _look(self, done: asyncio.Event) -> None:
        while True:
            try:
                async with asyncio.timeout(self._every_s):
                    await done.wait()
                return
            except TimeoutError:
                pass
            try:
                if self._conn is None:
                    self._conn = await self._connect()
                found = await self._conn.fetch(_BLOCKING, self._pid, timeout=self._every_s * 4)
            except Exception as exc:
                # the blockers go unnamed: the migration itself is not the watch's to fail
                log.warning("cannot see who blocks the migration: %s: %s", type(exc).__name__, exc)
                return
            if found:
                self._blocking = found

    async def run(self, statements: Callable[[], Awaitable[None]]) -> None:
        """Run ``statements``, looking at who blocks them meanwhile."""
        self._blocking = []
        if self._connect is None:
            await statements()
            return
        done = asyncio.Event()
        looking = asyncio.create_task(self._look(done))
        try:
            await statements()
        finally:
            done.set()
            await looking

    def describe(self) -> str:
        """Who blocked the last run, as the watch last saw them."""
        if self._connect is None:
            return "backends not looked at (no connection to look from)"
        if not self._blocking:
            return "backends not seen yet (the next try looks again)"
        return _named(self._blocking)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


async def migrate(
    conn: asyncpg.Connection,
    schema: str = "public",
    *,
    migrations: Sequence[Migration] | None = None,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
    connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
) -> list[int]:
    """Apply pending migrations to ``schema``; return the versions applied now.

    ``migrations``: the set to apply (default: :func:`load_migrations`, this code's).
    A migration waits for a lock at most ``lock_timeout_s``, then is rolled back and
    tried again after a pause (from ``lock_timeout_s``, doubling up to ten times it: the
    table's other queries run at least half the time), for as long as it is blocked.
    ``connect`` opens a second connection to the database, to look at who blocks the
    migration while it waits (without it the blockers go unnamed).
    """
    applied_now: list[int] = []

    async def lock() -> None:
        try:
            async with conn.transaction():
                # a session's lock: held past the transaction, until unlocked
                await conn.execute(_lock_timeout(lock_timeout_s * HOLDER_LOG_EVERY))
                await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        except asyncpg.LockNotAvailableError as exc:
            holders = _named(await conn.fetch(_HOLDING, _LOCK_ID))
            raise MigrationBlocked(f"another process applies migrations: {holders}") from exc

    await wait_out(
        lock, waiter="migrate", what=f"migrating {schema}: the migrations' lock", log_each=True
    )
    watch = _Watch(conn.get_server_pid(), connect, lock_timeout_s / _WATCHES_PER_TIMEOUT)
    try:
        # under the lock: two concurrent IF NOT EXISTS can still collide on the catalog
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
        await conn.execute(f"SET search_path TO {quote_ident(schema)}")
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        for migration in load_migrations() if migrations is None else migrations:
            named = f"{migration.version:04d}_{migration.name}"
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {named} changed after it was applied; add a new "
                        "migration instead"
                    )
                continue

            async def statements(migration: Migration = migration) -> None:
                async with conn.transaction():
                    await conn.execute(_lock_timeout(lock_timeout_s))
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) "
                        "VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )

            async def apply(named: str = named, statements=statements) -> None:
                try:
                    await watch.run(statements)
                except asyncpg.LockNotAvailableError as exc:
                    raise MigrationBlocked(
                        f"no lock within {lock_timeout_s:g} s, rolled back; blocked by "
                        f"{watch.describe()}"
                    ) from exc
                except asyncpg.PostgresError as exc:
                    raise MigrationError(f"migration {named} failed: {exc}") from exc

            await wait_out(
                apply,
                waiter="migrate",
                what=f"migrating {schema}: migration {named}",
                backoff=Backoff(initial_s=lock_timeout_s, max_s=10 * lock_timeout_s),
                log_each=True,
            )
            log.info("applied migration %s", named)
            applied_now.append(migration.version)
    finally:
        await watch.close()
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied_now
