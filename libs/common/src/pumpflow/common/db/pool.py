"""asyncpg pool bound to the run's schema.

Every service reaches Postgres through it (the runner's ``ServiceContext.db``), so its
connections name their failures Postgres's: asyncpg raises the socket's own error when
Postgres is down (ConnectionRefusedError), which names no dependency (``network``), and
what waits for it would be told apart from nothing else in readiness and the metrics
(:func:`pumpflow.common.dependencies.reaching`).
"""

from __future__ import annotations

from typing import Any

import asyncpg

from pumpflow.common.db.migrate import migrate
from pumpflow.common.dependencies import POSTGRES, reaching


class PoolNotOpen(ConnectionError):
    """Postgres not reached yet: the pool opened in the background is not open."""

    transient_dependency = POSTGRES


async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect``, its connection failures named Postgres's."""
    with reaching(POSTGRES):
        return await asyncpg.connect(*args, **kwargs)


async def create_pool(
    dsn: str, schema: str, *, min_size: int = 1, max_size: int = 10, apply_migrations: bool = True
) -> asyncpg.Pool:
    """Open a pool whose connections use ``schema``; migrate it first by default."""
    if apply_migrations:
        conn = await connect(dsn)
        try:
            await migrate(conn, schema)
        finally:
            await conn.close()
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={"search_path": schema},
        connect=connect,
    )


class BackgroundPool:
    """A pool its owner opens in the background (:meth:`opened` hands it over).

    Until then every use raises :class:`PoolNotOpen`, a transient failure of Postgres,
    so the work that needs it waits for it as for Postgres down.
    """

    def __init__(self) -> None:
        self._pool: asyncpg.Pool | None = None

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    def opened(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        if self._pool is None:
            raise PoolNotOpen("Postgres not reached since the start: the pool is not open yet")
        return getattr(self._pool, name)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
