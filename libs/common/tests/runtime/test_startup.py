"""Start-up with a dependency down: HTTP at once, /readyz names it, SIGTERM stops at once,
and the replica gets ready on its own once the dependency appears.

Each test points one dependency at a server of its own that is not started yet (its
port free), the others at the machine's, and runs a service needing all three as a
process.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from pumpflow.common.runtime.runner import EXIT_FAILED, run_service
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.runtime.settings import CommonSettings
from pumpflow.common.runtime.startup import Startup
from pumpflow.common.testing import (
    drop_schema,
    eventually,
    free_port,
    migrations_split_at_fills_altered,
)
from pumpflow.common.testing.instances import (
    PostgresInstance,
    RabbitMQInstance,
    RedisInstance,
    ServerInstance,
)
from pumpflow.common.testing.stack import http_get, http_json

NEEDY_SERVICE = Path(__file__).with_name("needy_service.py")
#: SIGTERM while waiting must end the process within this (it takes well under a second)
STOP_WITHIN_S = 5.0


def _instance(dependency: str) -> tuple[ServerInstance, dict[str, str]]:
    """A server of the test's own (not started) and the setting pointing at it."""
    if dependency == "rabbitmq":
        server = RabbitMQInstance()
        return server, {"amqp_url": server.url}
    if dependency == "redis":
        server = RedisInstance()
        return server, {"redis_url": server.url}
    server = PostgresInstance()
    return server, {"postgres_dsn": server.dsn}


DEPENDENCIES = [
    pytest.param("rabbitmq", marks=[pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]),
    pytest.param("redis", marks=[pytest.mark.rabbitmq, pytest.mark.postgres]),
    pytest.param("postgres", marks=[pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.redis]),
]


@pytest.mark.parametrize("dependency", DEPENDENCIES)
async def test_a_replica_waits_for_a_missing_dependency_serving_readyz_and_stops_at_once(
    process_stack, namespace, postgres_dsn, dependency
):
    server, pointing = _instance(dependency)
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def serve():
        return process_stack.start(
            "needy", [sys.executable, NEEDY_SERVICE], http_port=port, **pointing
        )

    async def waiting() -> dict | None:
        status, _ = await asyncio.to_thread(http_get, f"{url}/healthz")
        body = await asyncio.to_thread(http_json, f"{url}/readyz")
        if status != 200 or body is None or body.get("ready") is not False:
            return None
        return body if body.get("waiting_for") == [dependency] else None

    try:
        serve()
        body = await eventually(
            waiting, 30, what=f"/readyz waiting for {dependency}", details=process_stack.logs
        )
        check = body["checks"][dependency]
        assert check["ok"] is False and check["error"], body
        # its own routes are not served half started
        status, _ = await asyncio.to_thread(http_get, f"{url}/nothing-here")
        assert status == 404
        stopping = time.monotonic()
        assert await process_stack.stop("needy", within=STOP_WITHIN_S) == 0, process_stack.logs()
        assert time.monotonic() - stopping < STOP_WITHIN_S

        serve()
        await eventually(waiting, 30, what=f"waiting again for {dependency}")
        await asyncio.to_thread(server.start)

        async def ready() -> bool:
            body = await asyncio.to_thread(http_json, f"{url}/readyz")
            return body is not None and body.get("ready") is True

        await eventually(ready, 60, what="ready once it appeared", details=process_stack.logs)
        assert await process_stack.stop("needy", within=30) == 0, process_stack.logs()
    finally:
        await asyncio.to_thread(server.close)
        if dependency != "postgres":
            await drop_schema(postgres_dsn, namespace)


class _NeedsRedis(Service):
    name = "impatient"
    needs_store = True

    async def start(self, ctx: ServiceContext) -> None:
        return None

    async def stop(self) -> None:
        return None


async def test_a_dependency_still_missing_after_the_configured_wait_exits_1():
    settings = CommonSettings(
        service="impatient",
        transport="memory",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        http_port=0,
        dependency_retry_max_s=0.1,
        dependency_wait_s=0.5,
    )
    assert await asyncio.wait_for(run_service(_NeedsRedis, settings), 10) == EXIT_FAILED


async def test_reach_retries_with_a_capped_backoff_and_names_what_it_waits_for():
    settings = CommonSettings(service="probe", transport="memory", dependency_retry_max_s=0.05)
    startup = Startup(settings)
    failures = 3

    async def attempt() -> str:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionError("refused")
        return "connected"

    reaching = asyncio.create_task(startup.reach("redis", attempt))
    await eventually(lambda: startup.checks().get("redis", {}).get("attempts", 0) >= 1, 5)
    assert startup.waiting_for == ["redis"]
    assert startup.checks()["redis"]["error"] == "ConnectionError: refused"
    assert await reaching == "connected"
    assert startup.waiting_for == [] and failures == 0


class _WorksWithoutPostgres(Service):
    name = "patient"
    needs_db = True
    optional_dependencies = frozenset({"postgres"})
    ctx: ServiceContext | None = None

    async def start(self, ctx: ServiceContext) -> None:
        type(self).ctx = ctx

    async def stop(self) -> None:
        return None


@pytest.mark.postgres
@pytest.mark.slow
async def test_a_service_whose_postgres_is_optional_starts_without_it_and_opens_it_later(
    namespace,
):
    from pumpflow.common.dependencies import POSTGRES, transient_dependency

    server = PostgresInstance()
    port = free_port()
    settings = CommonSettings(
        service="patient",
        transport="memory",
        namespace=namespace,
        postgres_dsn=server.dsn,
        http_port=port,
        dependency_retry_max_s=0.1,
        # given up on a dependency it needs; one it works without is waited for longer
        dependency_wait_s=0.5,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(run_service(_WorksWithoutPostgres, settings, stop=stop))
    url = f"http://127.0.0.1:{port}/readyz"

    async def readyz() -> dict | None:
        body = await asyncio.to_thread(http_json, url)
        return body if body is not None and "degraded" in body else None

    try:
        body = await eventually(readyz, 30, what="started without Postgres")
        assert body["ready"] is True and body["degraded"] == [POSTGRES], body
        check = body["checks"]["postgres"]
        assert check["ok"] is False and check["waiting"] is True, body
        assert check["required"] is False and "refused" in check["error"].lower(), body
        # what needs the pool meanwhile meets Postgres away, which work waits out
        with pytest.raises(Exception) as raised:
            await _WorksWithoutPostgres.ctx.db.fetchval("SELECT 1")
        assert transient_dependency(raised.value) == POSTGRES

        async def waited_past_the_give_up() -> dict | None:
            body = await readyz()
            waited = body and body["checks"]["postgres"].get("waiting_s", 0) > 1.0
            return body if waited else None

        body = await eventually(waited_past_the_give_up, 30, what="waiting past the give-up")
        assert body["ready"] is True and not running.done(), body

        await asyncio.to_thread(server.start)

        async def opened() -> dict | None:
            body = await readyz()
            return body if body and body["checks"]["postgres"]["ok"] else None

        body = await eventually(opened, 30, what="Postgres reached in the background")
        assert body["ready"] is True and body["degraded"] == [], body
        assert "waiting" not in body["checks"]["postgres"], body
        # opening it applied the migrations, as every service's pool does
        db = _WorksWithoutPostgres.ctx.db
        assert await db.fetchval("SELECT count(*) FROM schema_migrations") > 0
    finally:
        stop.set()
        exit_code = await asyncio.wait_for(running, 30)
        await asyncio.to_thread(server.close)
    assert exit_code == 0


class _NeedsPostgres(Service):
    name = "upgraded"
    needs_db = True

    async def start(self, ctx: ServiceContext) -> None:
        return None

    async def stop(self) -> None:
        return None


@pytest.mark.postgres
async def test_a_replica_whose_migration_is_blocked_says_by_whom_and_starts_once_it_is_not(
    namespace, postgres_dsn, monkeypatch
):
    """An upgrade in place: a replica of the previous version holds a transaction on the
    table the new replica's migration alters. The new replica's /readyz names the
    backend that blocks it, for as long as that lasts (however short the start-up's
    bound on one attempt), and it gets ready once the holder commits."""
    import asyncpg

    from pumpflow.common.db.migrate import migrate
    from pumpflow.common.runtime import startup as startup_module

    # one attempt of the start-up cut well before the migration's lock wait ends
    monkeypatch.setattr(
        startup_module.RetryPolicy,
        "of",
        classmethod(lambda cls, settings: cls(first_pause_s=0.05, attempt_timeout_s=0.5)),
    )
    conn = await asyncpg.connect(postgres_dsn)
    holder = await asyncpg.connect(postgres_dsn)
    port = free_port()
    stop = asyncio.Event()
    running: asyncio.Task | None = None
    settings = CommonSettings(
        service="upgraded",
        transport="memory",
        namespace=namespace,
        postgres_dsn=postgres_dsn,
        http_port=port,
    )
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        released, _ = migrations_split_at_fills_altered()
        await migrate(conn, namespace, migrations=released)
        holding = holder.transaction()
        await holding.start()
        await holder.fetch(f'SELECT * FROM "{namespace}".fills')
        running = asyncio.create_task(run_service(_NeedsPostgres, settings, stop=stop))

        async def blocked() -> dict | None:
            body = await asyncio.to_thread(http_json, url)
            waits = (body or {}).get("checks", {}).get("dependencies", {}).get("waiting_on", {})
            error = waits.get("postgres", {}).get("error", "")
            return body if f"pid {holder.get_server_pid()} (" in error else None

        body = await eventually(blocked, 30, what="/readyz naming the migration's blocker")
        assert body["ready"] is False and body["waiting_for"] == ["postgres"], body
        await holding.commit()

        async def ready() -> bool:
            body = await asyncio.to_thread(http_json, url)
            return body is not None and body.get("ready") is True

        await eventually(ready, 60, what="ready once the holder committed")
    finally:
        stop.set()
        if running is not None:
            assert await asyncio.wait_for(running, 30) == 0
        await holder.close()
        await conn.close()
        await drop_schema(postgres_dsn, namespace)
