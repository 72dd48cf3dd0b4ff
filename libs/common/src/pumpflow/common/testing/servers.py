"""The servers tests run against (RabbitMQ, Redis, PostgreSQL on 127.0.0.1), and ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator

#: overridable per run, e.g. for servers in containers elsewhere
AMQP_URL = os.environ.get("PUMPFLOW_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("PUMPFLOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get(
    "PUMPFLOW_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)


#: ports :func:`free_port` gave: the kernel may offer a closed port again at once, and
#: two servers a test starts side by side would then race for one port
_HANDED_OUT: set[int] = set()


def _worker_share() -> tuple[int, int]:
    """This process's ``(index, count)`` among the run's pytest-xdist workers; ``(0, 1)``
    outside xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2:
        return 0, 1
    return int(worker.removeprefix("gw")), count


def _port_share(port: int, count: int) -> int:
    """The index of the one xdist worker, of ``count``, that may hand ``port`` out.

    Linux's bind() to port 0 offers ports of one parity only (it keeps the other for
    connect()), so ``port % count`` would starve every worker but one; the pair a port
    is in, ``port // 2``, spreads evenly either way.
    """
    return port // 2 % count


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, never given before in
    this process nor to another xdist worker of the run.

    :data:`_HANDED_OUT` is one process's memory, and the kernel may offer one closed
    port to two workers close together: each worker takes only its own share of ports.
    """
    index, count = _worker_share()
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if _port_share(port, count) == index and port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@contextlib.asynccontextmanager
async def local_app(app) -> AsyncIterator[str]:
    """Serve the ASGI ``app`` (a test's fake of an outside API) on a free port of
    127.0.0.1 for the block's duration; its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # the server failed to start: raise its error
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.contextmanager
def rabbitmq_vhost(url: str = AMQP_URL, *, user: str = "guest") -> Iterator[str]:
    """The broker URL in a virtual host of its own, deleted on exit.

    Deleting the vhost removes every exchange and queue declared in it, also those of
    a test interrupted before its own cleanup. Where rabbitmqctl is not at hand (a
    remote broker, or ``PUMPFLOW_TEST_AMQP_URL`` set) ``url`` is used as it is.
    """
    vhost = f"pumpflow-test-{uuid.uuid4().hex[:10]}"
    ctl = shutil.which("rabbitmqctl")
    created = False
    if ctl and os.environ.get("PUMPFLOW_TEST_AMQP_URL") is None:

        def ctl_ok(*args: str) -> bool:
            return subprocess.run([ctl, *args], capture_output=True, timeout=60).returncode == 0

        created = ctl_ok("add_vhost", vhost) and ctl_ok(
            "set_permissions", "-p", vhost, user, ".*", ".*", ".*"
        )
    try:
        yield f"{url.rstrip('/')}/{vhost}" if created else url
    finally:
        if created:
            subprocess.run([ctl, "delete_vhost", vhost], capture_output=True, timeout=60)


async def schema_exists(dsn: str, schema: str) -> bool:
    """Whether Postgres has the schema ``schema`` (a command must not make one up)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return bool(
            await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema)
        )
    finally:
        await conn.close()


def migrations_split_at_fills_altered() -> tuple[list, list]:
    """The migrations before the last one that alters ``fills`` (a table every trading
    replica reads), and that one with those after it: an upgrade in place that an old
    replica's open transaction on ``fills`` blocks."""
    from pumpflow.common.db.migrate import load_migrations

    migrations = load_migrations()
    altering = max(i for i, m in enumerate(migrations) if "ALTER TABLE fills" in m.sql)
    return migrations[:altering], migrations[altering:]


async def drop_schema(dsn: str, schema: str) -> None:
    """Drop a Postgres schema and everything in it (a test's namespace)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
