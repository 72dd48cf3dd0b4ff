"""The pool every service reaches Postgres through: its connection failures are named
Postgres's, whichever service's work meets them."""

from __future__ import annotations

import asyncio

import pytest

from pumpflow.common.db.pool import create_pool
from pumpflow.common.dependencies import NETWORK, POSTGRES, WAITS, transient_dependency, wait_out
from pumpflow.common.testing import eventually, free_port

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
