"""asyncpg pool bound to the run's schema.

Every service reaches Postgres through it (the runner's ``ServiceContext.db``), so its
connections name their failures Postgres's: asyncpg raises the socket's own error when
Postgres is down (ConnectionRefusedError), which names no dependency (``network``), and
what waits for it would be told apart from nothing else in readiness and the metrics
(:func:`pumpflow.common.dependencies.reaching`).

Its commands, and the opening of its connections, are bounded (``command_timeout``): a
Postgres that never answers (a frozen host, a network lost without a reset) fails the
work that meets it with a timeout, Postgres's transient failure, which the work waits
out as Postgres away, instead of hanging it. A call that may rightly take longer gives
its own ``timeout`` (a replay's fetches, ``storage.token_events``). A timed-out command
is cancelled over a connection of its own; asyncpg bounds that request by the command
timeout too and terminates the connection when it fails (0.32, which the library
requires: before, a release waited for ever on a frozen server), so no connection of
the pool is left waiting on the server, and the next use opens a new one.

While Postgres is away, asyncpg reconnects the pool's ``min_size`` connections in the
background and logs each failed try with its traceback, pausing 1 s doubling to 60 s:
:class:`FloorRetriesLogged` keeps those lines to one each.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

import asyncpg

from pumpflow.common.db.migrate import migrate
from pumpflow.common.dependencies import POSTGRES, reaching, transient_dependency
from pumpflow.common.timeouts import POSTGRES_COMMAND_TIMEOUT_S


class PoolNotOpen(ConnectionError):
    """Postgres not reached yet: the pool opened in the background is not open."""

    transient_dependency = POSTGRES


class NoSuchSchema(LookupError):
    """A command that reads history was pointed at a schema Postgres does not have."""

    def __init__(self, schema: str):
        super().__init__(f"no schema {schema!r} in Postgres")


class FloorRetriesLogged(logging.Filter):
    """On asyncpg's pool logger: a failed try at restoring the pool's connection floor
    that is a transient failure of Postgres is logged as one line naming the failure.

    An outage is waited out and logged bounded, as the work's waits are
    (:func:`~pumpflow.common.dependencies.wait_out`); a traceback at each try would bury
    the lines that tell what happened. Any other failure keeps its traceback: it may be
    a bug.
    """

    MESSAGE = "Failed to restore the pool connection floor"

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None or not record.getMessage().startswith(self.MESSAGE):
            return True
        dependency = transient_dependency(error)
        if dependency is not None:
            failure = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            record.msg = f"{record.getMessage()} ({dependency}: {failure})"
            record.args = ()
            record.exc_info = record.exc_text = None
        return True


_FLOOR_RETRIES_LOGGED = FloorRetriesLogged()


async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect``, its connection failures named Postgres's."""
    with reaching(POSTGRES):
        return await asyncpg.connect(*args, **kwargs)


async def create_pool(
    dsn: str,
    schema: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    apply_migrations: bool = True,
    command_timeout: float = POSTGRES_COMMAND_TIMEOUT_S,
    application_name: str | None = None,
    existing: bool = False,
) -> asyncpg.Pool:
    """Open a pool whose connections use ``schema``; migrate it first by default.

    A command, or the opening of a connection, that takes longer than
    ``command_timeout`` seconds fails with a TimeoutError, Postgres's transient failure.
    ``application_name`` names the connections in ``pg_stat_activity``: who holds a
    lock another process waits for (a migration names who blocks it). ``existing``:
    raise :class:`NoSuchSchema` rather than create the schema (a command that reads
    history, where a typo would read an empty one made for it).
    """
    named = {} if application_name is None else {"application_name": application_name}
    if apply_migrations or existing:
        # no command timeout: a migration takes as long as its DDL on the tables' rows
        # (its lock waits are bounded, and retried, by the migration itself); cut, it
        # would be rolled back and run again at every start. Its connections are bounded
        def open_one() -> Awaitable[asyncpg.Connection]:
            return connect(dsn, timeout=command_timeout, server_settings=named)

        conn = await open_one()
        try:
            if existing and not await conn.fetchval(
                "SELECT 1 FROM pg_namespace WHERE nspname = $1", schema
            ):
                raise NoSuchSchema(schema)
            if apply_migrations:
                await migrate(conn, schema, connect=open_one)
        finally:
            await conn.close(timeout=command_timeout)
    # the same filter each time: a logger holds it once
    logging.getLogger("asyncpg.pool").addFilter(_FLOOR_RETRIES_LOGGED)
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={"search_path": schema, **named},
        connect=connect,
        command_timeout=command_timeout,
        timeout=command_timeout,
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
