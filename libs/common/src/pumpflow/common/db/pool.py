"""asyncpg pool bound to the run's schema."""

from __future__ import annotations

import asyncpg

from pumpflow.common.db.migrate import migrate


async def create_pool(
    dsn: str, schema: str, *, min_size: int = 1, max_size: int = 10, apply_migrations: bool = True
) -> asyncpg.Pool:
    """Open a pool whose connections use ``schema``; migrate it first by default."""
    if apply_migrations:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn, schema)
        finally:
            await conn.close()
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={"search_path": schema},
    )
