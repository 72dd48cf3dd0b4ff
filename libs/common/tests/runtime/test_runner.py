from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pumpflow.common.runtime.runner import EXIT_BAD_SETTINGS, run_service
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.testing import free_port

SLOW_SERVICE = Path(__file__).with_name("slow_service.py")


def wait_for(predicate, what: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def journal_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_sigterm_drains_the_handler_in_flight_and_exits_0(tmp_path):
    journal = tmp_path / "journal.txt"
    port = free_port()
    env = {
        **os.environ,
        "PUMPFLOW_TRANSPORT": "memory",
        "PUMPFLOW_HTTP_PORT": str(port),
        "PUMPFLOW_LOG_FORMAT": "text",
        "PUMPFLOW_DRAIN_TIMEOUT_S": "20",
    }
    process = subprocess.Popen(
        [sys.executable, str(SLOW_SERVICE), str(journal)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: "handler started m1" in journal_lines(journal), "the handler")
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert health.status_code == 200
        assert health.json()["service"] == "slowpoke"
        assert ready.status_code == 200, ready.text
        # the handler sleeps a second; it is still in flight when the signal lands
        assert "handler completed m1" not in journal_lines(journal)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert journal_lines(journal) == [
        "handler started m1",
        "handler completed m1",
        "service stopped",
    ], output
    assert "SIGTERM received" in output
    assert "in-flight handlers drained" in output


class Idle(Service):
    name = "idle"

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def stop(self) -> None:
        pass


async def test_bad_settings_exit_2_naming_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("PUMPFLOW_PARTITIONS", "many")
    assert await run_service(Idle) == EXIT_BAD_SETTINGS
    assert "PUMPFLOW_PARTITIONS" in capsys.readouterr().err


async def test_stop_event_ends_a_memory_service_cleanly(monkeypatch):
    monkeypatch.setenv("PUMPFLOW_TRANSPORT", "memory")
    monkeypatch.setenv("PUMPFLOW_HTTP_PORT", "0")
    stop = asyncio.Event()
    runner = asyncio.create_task(run_service(Idle, stop=stop))
    await asyncio.sleep(0.1)
    assert not runner.done()
    stop.set()
    assert await asyncio.wait_for(runner, 30) == 0


class Stateful(Service):
    """Needs Redis and Postgres; writes a marker to both on start."""

    name = "stateful"
    needs_store = True
    needs_db = True

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        await ctx.store.set("started", ctx.settings.replica.encode())
        await ctx.db.execute("CREATE TABLE IF NOT EXISTS marker (replica text)")
        await ctx.db.execute("INSERT INTO marker VALUES ($1)", ctx.settings.replica)

    async def stop(self) -> None:
        await self.ctx.store.set("stopped", b"1")


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.postgres
async def test_distributed_service_connects_what_it_needs_and_reports_ready(
    namespace, amqp_url, redis_url, redis_client
):
    import asyncpg

    from pumpflow.common.bus.rabbitmq import RabbitMQBus
    from pumpflow.common.runtime.settings import CommonSettings

    dsn = os.environ.get("PUMPFLOW_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
    port = free_port()
    settings = CommonSettings(
        service="stateful",
        replica="r1",
        transport="rabbitmq",
        amqp_url=amqp_url,
        redis_url=redis_url,
        postgres_dsn=dsn,
        namespace=namespace,
        http_port=port,
        log_format="text",
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(run_service(Stateful, settings, stop=stop))
    try:
        body = None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(300):
                assert not runner.done(), runner.result()
                try:
                    answer = await http.get("/readyz")
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
                    continue
                body = answer.json()
                if answer.status_code == 200:
                    break
                await asyncio.sleep(0.1)
        assert body is not None and body["ready"] is True, body
        assert set(body["checks"]) == {"bus", "store", "postgres", "service"}
        assert await redis_client.get(f"{namespace}:started") == b"r1"
        stop.set()
        assert await asyncio.wait_for(runner, 60) == 0
        assert await redis_client.get(f"{namespace}:stopped") == b"1"
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval(f'SELECT replica FROM "{namespace}".marker') == "r1"
        finally:
            await conn.close()
    finally:
        stop.set()
        if not runner.done():
            runner.cancel()
        cleanup = RabbitMQBus(url=amqp_url, namespace=namespace, source="test/cleanup")
        await cleanup.delete_topology()
        await cleanup.close()
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
        finally:
            await conn.close()
