"""Migrations: applied once, recorded with checksums, an edited applied one refused."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest

from pumpflow.common.db import migrate as migrate_module
from pumpflow.common.db.migrate import Migration, MigrationError, load_migrations, migrate
from pumpflow.common.testing import eventually

pytestmark = pytest.mark.postgres

POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
async def conn(namespace):
    dsn = os.environ.get("PUMPFLOW_TEST_POSTGRES_DSN", POSTGRES_DSN)
    connection = await asyncpg.connect(dsn)
    try:
        yield connection
    finally:
        await connection.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
        await connection.close()


def test_migration_files_are_numbered_in_order():
    found = load_migrations()
    versions = [m.version for m in found]
    assert versions == sorted(set(versions))
    assert versions[0] == 1
    assert all(m.sql.strip() and len(m.checksum) == 64 for m in found)


async def test_migrate_is_idempotent_and_records_what_it_applied(conn, namespace):
    expected = [m.version for m in load_migrations()]
    assert await migrate(conn, namespace) == expected
    assert await migrate(conn, namespace) == []
    rows = await conn.fetch(
        f'SELECT version, name, checksum FROM "{namespace}".schema_migrations ORDER BY version'
    )
    assert [(r["version"], r["name"], r["checksum"]) for r in rows] == [
        (m.version, m.name, m.checksum) for m in load_migrations()
    ]
    tables = {
        r["table_name"]
        for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", namespace
        )
    }
    assert {"tokens", "token_events", "schema_migrations"} <= tables


async def test_a_changed_applied_migration_is_refused(conn, namespace):
    await migrate(conn, namespace)
    await conn.execute(
        f"UPDATE \"{namespace}\".schema_migrations SET checksum = 'edited' WHERE version = 1"
    )
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await migrate(conn, namespace)


async def test_a_failing_migration_rolls_back_and_is_not_recorded(conn, namespace, monkeypatch):
    real = load_migrations()
    broken = Migration(
        version=real[-1].version + 1,
        name="broken",
        sql="CREATE TABLE half_done (id int); SELECT no_such_function();",
    )
    monkeypatch.setattr(migrate_module, "load_migrations", lambda: [*real, broken])
    with pytest.raises(MigrationError, match=f"{broken.version:04d}_broken failed"):
        await migrate(conn, namespace)
    recorded = await conn.fetch(f'SELECT version FROM "{namespace}".schema_migrations')
    assert sorted(r["version"] for r in recorded) == [m.version for m in real]
    assert await conn.fetchval("SELECT to_regclass($1)", f"{namespace}.half_done") is None
    # once fixed, the next run applies it
    fixed = Migration(version=broken.version, name="broken", sql="CREATE TABLE half_done (id int);")
    monkeypatch.setattr(migrate_module, "load_migrations", lambda: [*real, fixed])
    assert await migrate(conn, namespace) == [fixed.version]


async def test_concurrent_migrations_of_a_new_schema_apply_it_once(conn, namespace):
    import asyncio

    dsn = os.environ.get("PUMPFLOW_TEST_POSTGRES_DSN", POSTGRES_DSN)
    others = [await asyncpg.connect(dsn) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c, namespace) for c in others))
    finally:
        for other in others:
            await other.close()
    expected = [m.version for m in load_migrations()]
    # one of them applied everything; the others found it done
    assert sorted(results, key=len) == [[], [], [], expected]
    assert await conn.fetchval(f'SELECT count(*) FROM "{namespace}".schema_migrations') == len(
        expected
    )


#: the last migration of the released version an upgrade starts from (dd41b71)
RELEASED = 13
#: how that release writes a token event (its TokenEventStore's insert, renumbered unknown)
_RELEASED_INSERT = """
INSERT INTO token_events (
    signature, tx_type, mint, event_time, seq, source, event_id, trader, sol_amount,
    token_amount, v_sol_in_bonding_curve, v_tokens_in_bonding_curve, market_cap_sol,
    payload, frame)
VALUES ($1, 'buy', $2, $3, $4, 'feed/old', $5, $6, 1e-05, 10.5, 32.19, 1e9, 32.19,
        $7::jsonb, $8)
"""


def _released_trade(i: int) -> tuple:
    from pumpflow.common.testing import base58_key

    signature, mint, trader = base58_key(f"sig-{i}", 88), base58_key("M"), base58_key(f"w{i}")
    frame = (
        f'{{"signature":"{signature}","mint":"{mint}","traderPublicKey":"{trader}",'
        '"txType":"buy","tokenAmount":10.5,"solAmount":1e-05,"newTokenBalance":0,'
        f'"bondingCurveKey":"{base58_key("bc")}","vTokensInBondingCurve":1000000000,'
        '"vSolInBondingCurve":32.19,"marketCapSol":32.19}'
    )
    return signature, mint, 100.0 + i, i, f"event-{i}", trader, frame, frame


async def test_a_database_of_the_released_version_takes_the_new_migrations(
    conn, namespace, monkeypatch
):
    # an upgrade in place: the schema and rows the release left, then this code's migrate
    from pumpflow.common.db.pool import create_pool
    from pumpflow.common.storage import TokenEventStore

    real = load_migrations()
    released = [m for m in real if m.version <= RELEASED]
    monkeypatch.setattr(migrate_module, "load_migrations", lambda: released)
    assert await migrate(conn, namespace) == [m.version for m in released]
    await conn.execute(f'SET search_path TO "{namespace}"')
    await conn.execute(_RELEASED_INSERT, *_released_trade(1))
    monkeypatch.setattr(migrate_module, "load_migrations", lambda: real)
    assert await migrate(conn, namespace) == [m.version for m in real if m.version > RELEASED]
    # a replica of the release still writing during a rolling upgrade
    await conn.execute(f'SET search_path TO "{namespace}"')
    await conn.execute(_RELEASED_INSERT, *_released_trade(2))
    dsn = os.environ.get("PUMPFLOW_TEST_POSTGRES_DSN", POSTGRES_DSN)
    pool = await create_pool(dsn, namespace, apply_migrations=False)
    try:
        stored = [s async for s in TokenEventStore(pool).stream_stored()]
    finally:
        await pool.close()
    assert [(s.event.seq, s.event.id, s.event.renumbered) for s in stored] == [
        (1, "event-1", False),
        (2, "event-2", False),
    ]
    assert [s.frame for s in stored] == [_released_trade(i)[-1].encode() for i in (1, 2)]


#: the tests' bound on a migration's lock wait: short, so a blocked migration retries soon
TEST_LOCK_TIMEOUT_S = 0.2
_LEDGER = Migration(
    version=1, name="ledger", sql="CREATE TABLE ledger (id int); INSERT INTO ledger VALUES (1);"
)
_ALTER_LEDGER = Migration(version=2, name="ledger_venue", sql="ALTER TABLE ledger ADD venue text;")


def _naming(caplog, pid: int, application_name: str):
    """The log lines that name backend ``pid`` and its application."""
    return lambda: [
        r.getMessage()
        for r in caplog.records
        if f"pid {pid} ({application_name}," in r.getMessage()
    ]


async def _waits_for_a_lock(observer: asyncpg.Connection, pid: int) -> bool:
    return bool(
        await observer.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
            pid,
        )
    )


async def test_a_migration_blocked_by_an_open_transaction_lets_the_table_s_queries_through(
    conn, namespace, postgres_dsn, caplog
):
    """A replica of the old version holds a transaction that read the table a migration
    alters: the migration's wait for its lock is bounded, so a later query of the table
    (the running services' writes) is not queued behind it for longer; the migration
    says who blocks it and goes through once the holder commits."""
    assert await migrate(conn, namespace, migrations=[_LEDGER]) == [1]
    holder = await asyncpg.connect(postgres_dsn, server_settings={"application_name": "old-feed"})
    reader = await asyncpg.connect(postgres_dsn, server_settings={"search_path": namespace})
    migrating: asyncio.Task | None = None
    try:
        holding = holder.transaction()
        await holding.start()
        assert await holder.fetchval(f'SELECT count(*) FROM "{namespace}".ledger') == 1
        migrating = asyncio.create_task(
            migrate(
                conn,
                namespace,
                migrations=[_LEDGER, _ALTER_LEDGER],
                lock_timeout_s=TEST_LOCK_TIMEOUT_S,
                connect=lambda: asyncpg.connect(postgres_dsn),
            )
        )
        await eventually(
            _naming(caplog, holder.get_server_pid(), "old-feed"),
            what="a line naming the backend that blocks the migration",
        )
        # the migration queued for its lock again: a query of the table arriving now
        # waits behind it at most its bound, while the holder still holds the table
        await eventually(
            lambda: _waits_for_a_lock(reader, conn.get_server_pid()),
            what="the migration waiting for its lock",
        )
        assert await asyncio.wait_for(reader.fetchval("SELECT count(*) FROM ledger"), 30) == 1
        assert holder.is_in_transaction() and not migrating.done()
        await holding.commit()
        assert await asyncio.wait_for(migrating, 30) == [2]
    finally:
        if migrating is not None:
            migrating.cancel()
        await holder.close()
        await reader.close()
    assert await conn.fetchval(
        "SELECT count(*) FROM information_schema.columns "
        "WHERE table_schema = $1 AND table_name = 'ledger' AND column_name = 'venue'",
        namespace,
    )
    recorded = await conn.fetch(f'SELECT version FROM "{namespace}".schema_migrations')
    assert sorted(r["version"] for r in recorded) == [1, 2]


async def test_a_migration_waiting_for_another_process_s_migrations_names_that_process(
    conn, namespace, postgres_dsn, caplog
):
    other = await asyncpg.connect(
        postgres_dsn, server_settings={"application_name": "other-migrator"}
    )
    migrating: asyncio.Task | None = None
    try:
        await other.execute("SELECT pg_advisory_lock($1)", migrate_module._LOCK_ID)
        migrating = asyncio.create_task(
            migrate(conn, namespace, migrations=[_LEDGER], lock_timeout_s=TEST_LOCK_TIMEOUT_S)
        )
        await eventually(
            _naming(caplog, other.get_server_pid(), "other-migrator"),
            what="a line naming the process that migrates",
        )
        await other.execute("SELECT pg_advisory_unlock($1)", migrate_module._LOCK_ID)
        assert await asyncio.wait_for(migrating, 30) == [1]
    finally:
        if migrating is not None:
            migrating.cancel()
        await other.close()


async def test_a_blocked_migration_whose_connection_is_lost_fails_instead_of_waiting_on_it(
    conn, namespace, postgres_dsn
):
    """The retries of a blocked migration are on its connection: lost, the migration
    fails for its caller (a service's start-up) to retry on a new one."""
    assert await migrate(conn, namespace, migrations=[_LEDGER]) == [1]
    holder = await asyncpg.connect(postgres_dsn)
    migrating = await asyncpg.connect(postgres_dsn)
    try:
        holding = holder.transaction()
        await holding.start()
        await holder.fetchval(f'SELECT count(*) FROM "{namespace}".ledger')
        task = asyncio.create_task(
            migrate(
                migrating,
                namespace,
                migrations=[_LEDGER, _ALTER_LEDGER],
                lock_timeout_s=TEST_LOCK_TIMEOUT_S,
            )
        )
        await eventually(
            lambda: _waits_for_a_lock(conn, migrating.get_server_pid()),
            what="the migration waiting for its lock",
        )
        await conn.execute("SELECT pg_terminate_backend($1)", migrating.get_server_pid())
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await asyncio.wait_for(task, 30)
    finally:
        await holder.close()
        migrating.terminate()
