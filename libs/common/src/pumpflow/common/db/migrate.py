"""Versioned SQL migrations, applied in order by one idempotent command.

Files ``NNNN_name.sql`` in ``migrations/`` run in one transaction each; applied
versions are recorded in ``schema_migrations`` with the file's checksum, so a
migration edited after it ran is reported instead of silently skipped.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
#: one process at a time applies migrations (to any schema of the database)
_LOCK_ID = 0x7075_6D70


class MigrationError(RuntimeError):
    """A migration failed or an applied one was changed."""


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


async def migrate(conn: asyncpg.Connection, schema: str = "public") -> list[int]:
    """Apply pending migrations to ``schema``; return the versions applied now."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
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
        for migration in load_migrations():
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} changed after "
                        "it was applied; add a new migration instead"
                    )
                continue
            async with conn.transaction():
                try:
                    await conn.execute(migration.sql)
                except asyncpg.PostgresError as exc:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} failed: {exc}"
                    ) from exc
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            log.info("applied migration %04d_%s", migration.version, migration.name)
            applied_now.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied_now
