"""Leases in Postgres: the operations :class:`~pumpflow.common.lease.Lease` needs.

Postgres keeps its contents across a restart, so a claim here is never lost with the
server (:meth:`epoch` says so), and every expiry is judged by the server's own clock
(``clock_timestamp()``), never a client's.
"""

from __future__ import annotations

import math

import asyncpg

#: what :meth:`PostgresLeaseStore.epoch` returns: contents that are never lost
DURABLE_EPOCH = (b"postgres", math.inf)

_TAKE = """
INSERT INTO leases (name, holder, expires_at)
VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
WHERE leases.expires_at <= clock_timestamp()
RETURNING 1
"""
_EXTEND = """
UPDATE leases SET expires_at = clock_timestamp() + make_interval(secs => $3)
WHERE name = $1 AND holder = $2 AND expires_at > clock_timestamp()
RETURNING 1
"""
_DROP = "DELETE FROM leases WHERE name = $1 AND holder = $2 RETURNING 1"
_HOLDER = "SELECT holder FROM leases WHERE name = $1 AND expires_at > clock_timestamp()"
_LEFT = """
SELECT extract(epoch FROM expires_at - clock_timestamp())::float8 FROM leases
WHERE name = $1 AND expires_at > clock_timestamp()
"""


class PostgresLeaseStore:
    """Lease keys as rows of ``leases`` (migration 0004) in the pool's schema."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        return await self.pool.fetchval(_TAKE, key, bytes(value).decode(), ttl) is not None

    async def extend_if_equal(self, key: str, value: bytes, ttl: float) -> bool:
        return await self.pool.fetchval(_EXTEND, key, bytes(value).decode(), ttl) is not None

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        return await self.pool.fetchval(_DROP, key, bytes(value).decode()) is not None

    async def get(self, key: str) -> bytes | None:
        holder = await self.pool.fetchval(_HOLDER, key)
        return None if holder is None else holder.encode()

    async def expires_in(self, key: str) -> float | None:
        return await self.pool.fetchval(_LEFT, key)

    async def epoch(self) -> tuple[bytes, float]:
        return DURABLE_EPOCH
