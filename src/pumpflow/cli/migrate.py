"""``pumpflow migrate``: apply the SQL migrations to the settings' Postgres schema."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable

from pumpflow.common.runtime.arguments import postgres_dsn, schema_name
from pumpflow.common.runtime.logging import redact_url
from pumpflow.common.runtime.settings import CommonSettings, SettingsError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "migrate", help="apply database migrations (PUMPFLOW_POSTGRES_DSN, schema = namespace)"
    )
    parser.add_argument(
        "--dsn", type=postgres_dsn, help="Postgres DSN (default: PUMPFLOW_POSTGRES_DSN)"
    )
    parser.add_argument("--schema", type=schema_name, help="schema (default: PUMPFLOW_NAMESPACE)")
    parser.set_defaults(handler=migrate_command)


async def apply(dsn: str, schema: str) -> list[int]:
    import asyncpg

    from pumpflow.common.db.migrate import migrate
    from pumpflow.common.dependencies import reaching

    def connect() -> Awaitable[asyncpg.Connection]:
        return asyncpg.connect(dsn, server_settings={"application_name": "pumpflow migrate"})

    # a refused connection says only an address: the operator learns it is Postgres's
    with reaching("postgres"):
        conn = await connect()
    try:
        return await migrate(conn, schema, connect=connect)
    finally:
        await conn.close()


def migrate_command(args: argparse.Namespace) -> int:
    try:
        settings = CommonSettings.load(service="migrate")
    except SettingsError as exc:
        print(f"pumpflow: {exc}", file=sys.stderr)
        return 2
    dsn = args.dsn or settings.postgres_dsn
    schema = args.schema or settings.namespace
    import asyncpg

    from pumpflow.common.db.migrate import MigrationError

    try:
        applied = asyncio.run(apply(dsn, schema))
    except ConnectionError:
        raise  # the CLI's one line: cannot connect, and to what
    except (MigrationError, OSError, asyncpg.PostgresError) as exc:
        print(f"pumpflow migrate: {exc}", file=sys.stderr)
        return 1
    where = f"{redact_url(dsn)} schema {schema}"
    if applied:
        print(f"applied migrations {', '.join(f'{v:04d}' for v in applied)} to {where}")
    else:
        print(f"{where} is up to date")
    return 0
