"""The pool every service reaches Postgres through: its connection failures are named
Postgres's, whichever service's work meets them."""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import urlsplit

import pytest

from pumpflow.common.db.pool import create_pool
from pumpflow.common.dependencies import NETWORK, POSTGRES, WAITS, transient_dependency, wait_out
from pumpflow.common.testing import drop_schema, eventually, free_port
from pumpflow.common.testing.proxy import TcpProxy

pytestmark = pytest.mark.postgres


async def test_a_connection_the_pool_cannot_make_is_named_postgres_s(namespace):
    """asyncpg raises the socket's own error when nothing listens (ConnectionRefusedError,
    which names no dependency: ``network``); the pool's connections, and the migration's
    before it, name it Postgres's."""
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    with pytest.raises(OSError) as migrating:
        await create_pool(dsn, namespace)
    assert transient_dependency(migrating.value) == POSTGRES
    pool = await create_pool(dsn, namespace, min_size=0, apply_migrations=False)
    try:
        with pytest.raises(OSError) as querying:
            await pool.fetchval("SELECT 1")
        assert transient_dependency(querying.value) == POSTGRES
    finally:
        await pool.close()


@pytest.mark.slow
async def test_work_waiting_for_a_postgres_restart_waits_for_postgres_not_the_network(
    own_postgres, namespace
):
    """A service's store (the trading ledger, the labels store, the feed's recorder, the
    exit's records) queries the pool; Postgres stops under it. The wait is Postgres's in
    what readiness and the metrics read (:data:`WAITS`), and the work goes through once
    Postgres is back."""
    pool = await create_pool(own_postgres.dsn, namespace, min_size=0, max_size=2)
    waiting: asyncio.Task | None = None
    try:
        assert await pool.fetchval("SELECT 1") == 1
        await asyncio.to_thread(own_postgres.stop)
        waiting = asyncio.create_task(
            wait_out(lambda: pool.fetchval("SELECT 1"), waiter="test", what="a query")
        )
        await eventually(lambda: POSTGRES in WAITS.describe(), what="a wait for Postgres")
        assert NETWORK not in WAITS.describe()
        await asyncio.to_thread(own_postgres.start)
        assert await asyncio.wait_for(waiting, 60) == 1
    finally:
        if waiting is not None:
            waiting.cancel()
        await pool.close()


#: the pool's bound on a command (and a connection) in the tests of a frozen server
COMMAND_TIMEOUT_S = 1.0


async def proxied_pool(proxy: TcpProxy, postgres_dsn: str, namespace: str, size: int):
    """A pool of ``size`` connections to Postgres through ``proxy`` (to freeze or close),
    its commands bounded by COMMAND_TIMEOUT_S."""
    return await create_pool(
        proxy.url(postgres_dsn),
        namespace,
        min_size=size,
        max_size=size,
        apply_migrations=False,
        command_timeout=COMMAND_TIMEOUT_S,
    )


async def test_a_frozen_postgres_fails_each_command_in_bounded_time_and_the_pool_recovers(
    pg_pool, postgres_dsn, namespace
):
    """A frozen Postgres (its host stopped, the network lost without a reset) takes what
    is sent and answers nothing. A query fails once the pool's command timeout passed,
    its release at most as long after (asyncpg's cancel request meets the same frozen
    server, then the connection is terminated); so does a transaction (a group commit)
    and the connection that replaces them. Each failure is Postgres's, so work waits
    for Postgres (readiness and the metrics name it). Once the server answers again
    the same pool serves every connection it may hold: none is left waiting on it."""
    async with TcpProxy(urlsplit(postgres_dsn).port or 5432) as proxy:
        pool = await proxied_pool(proxy, postgres_dsn, namespace, 2)
        waiting: asyncio.Task | None = None
        try:
            assert await pool.fetchval("SELECT 1") == 1
            proxy.freeze()

            async def query() -> None:
                await pool.fetchval("SELECT 1")

            async def transaction() -> None:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute("SELECT 1")

            # both connections time out; the third action needs a new one
            for action in (query, transaction, transaction):
                began = time.monotonic()
                with pytest.raises(Exception) as failed:
                    # beyond the bound, the test's own timeout: named the network's
                    await asyncio.wait_for(action(), 3 * COMMAND_TIMEOUT_S + 1)
                took = time.monotonic() - began
                assert transient_dependency(failed.value) == POSTGRES, repr(failed.value)
                assert took < 2 * COMMAND_TIMEOUT_S + 1, (action.__name__, took)

            waiting = asyncio.create_task(wait_out(query, waiter="test", what="a query"))
            await eventually(lambda: POSTGRES in WAITS.describe(), what="a wait for Postgres")
            assert NETWORK not in WAITS.describe()
            proxy.thaw()
            await asyncio.wait_for(waiting, 10)

            async def every_connection() -> list[int]:
                held = [await pool.acquire() for _ in range(2)]
                try:
                    return [await conn.fetchval("SELECT 2") for conn in held]
                finally:
                    for conn in held:
                        await pool.release(conn)

            assert await asyncio.wait_for(every_connection(), 10) == [2, 2]
        finally:
            proxy.thaw()
            if waiting is not None:
                waiting.cancel()
            await asyncio.wait_for(pool.close(), 10)


#: asyncpg's line for each failed try at reconnecting the pool's ``min_size`` connections
FLOOR_RETRY = "Failed to restore the pool connection floor; retrying"


def floor_retries(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "asyncpg.pool" and FLOOR_RETRY in r.message]


@pytest.mark.parametrize("outage", ["gone", "frozen"])
async def test_a_pool_reconnecting_to_a_postgres_away_logs_one_line_a_try(
    caplog, postgres_dsn, namespace, outage
):
    """asyncpg reconnects the pool's floor in the background (pauses from 1 s doubling
    to 60 s) and logs each failed try with its traceback, some 30 lines; a Postgres
    away is waited out, so each try is one line naming the failure."""
    caplog.set_level(logging.WARNING, logger="asyncpg.pool")
    async with TcpProxy(urlsplit(postgres_dsn).port or 5432) as proxy:
        pool = await proxied_pool(proxy, postgres_dsn, namespace, 1)
        try:
            assert await pool.fetchval("SELECT 1") == 1
            if outage == "gone":
                await proxy.close()  # its connections reset, its port refuses
            else:
                proxy.freeze()
                with pytest.raises(TimeoutError):
                    await pool.fetchval("SELECT 1")  # the connection is dropped after it
            await eventually(lambda: floor_retries(caplog), what="a failed floor restore")
        finally:
            proxy.thaw()
            await asyncio.wait_for(pool.close(), 10)
    for record in floor_retries(caplog):
        assert record.exc_info is None and record.exc_text is None
        assert "postgres" in record.message, record.message


async def test_a_floor_restore_failing_for_another_reason_keeps_its_traceback(caplog, pg_pool):
    """Not an outage (here a real error of a query, its line as asyncpg writes it, on a
    logger ``pg_pool`` opened the pool on): maybe a bug, its traceback is kept."""
    caplog.set_level(logging.WARNING, logger="asyncpg.pool")
    try:
        await pg_pool.fetchval("SELECT 1 / 0")
    except Exception:
        logging.getLogger("asyncpg.pool").warning(FLOOR_RETRY, exc_info=True)
    (record,) = floor_retries(caplog)
    assert record.exc_info is not None and record.getMessage() == FLOOR_RETRY


async def test_a_service_s_connections_are_named_after_its_replica(namespace, postgres_dsn):
    """Who holds a lock another process waits for (a migration names who blocks it) is
    told by the replica it belongs to in pg_stat_activity."""
    from pumpflow.common.runtime.runner import open_pool
    from pumpflow.common.runtime.settings import CommonSettings

    settings = CommonSettings(
        service="trading",
        replica="r1",
        transport="memory",
        postgres_dsn=postgres_dsn,
        namespace=namespace,
    )
    pool = await open_pool(settings)
    try:
        name = await pool.fetchval("SELECT current_setting('application_name')")
        assert name == "pumpflow trading/r1"
    finally:
        await pool.close()
        await drop_schema(postgres_dsn, namespace)
