from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.clock import ReplayClock, WallClock
from pumpflow.common.events import TokenLifecycle, make_event
from pumpflow.common.runtime.runner import (
    EXIT_BAD_SETTINGS,
    EXIT_FAILED,
    run_service,
    service_clock,
)
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.runtime.settings import CommonSettings
from pumpflow.common.testing import ProcessStack, drop_schema, eventually, free_port

SLOW_SERVICE = Path(__file__).with_name("slow_service.py")


async def ready(port: int) -> dict | None:
    """The /readyz body once it answers 200, else None (not listening yet, or not ready)."""
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            answer = await http.get("/readyz", timeout=5)
    except httpx.TransportError:
        return None
    return answer.json() if answer.status_code == 200 else None


def journal_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
async def test_sigterm_drains_the_handler_in_flight_and_exits_0(tmp_path):
    journal = tmp_path / "journal.txt"
    port = free_port()
    env = {**os.environ, "PUMPFLOW_LOG_FORMAT": "text"}
    settings = {"transport": "memory", "http_port": port, "drain_timeout_s": 20}
    async with ProcessStack(env, tmp_path) as stack:
        stack.start("slowpoke", [sys.executable, SLOW_SERVICE, journal], **settings)
        await eventually(
            lambda: "handler started m1" in journal_lines(journal),
            what="the handler to start",
            details=stack.logs,
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            health = await http.get("/healthz", timeout=5)
            readiness = await http.get("/readyz", timeout=5)
        assert health.status_code == 200
        assert health.json()["service"] == "slowpoke"
        assert readiness.status_code == 200, readiness.text
        # the handler sleeps a second; it is still in flight when the signal lands
        assert "handler completed m1" not in journal_lines(journal)
        assert await stack.stop("slowpoke") == 0, stack.logs()
        output = stack.logs(tail=20_000)
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
    port = free_port()
    monkeypatch.setenv("PUMPFLOW_TRANSPORT", "memory")
    monkeypatch.setenv("PUMPFLOW_HTTP_PORT", str(port))
    stop = asyncio.Event()
    runner = asyncio.create_task(run_service(Idle, stop=stop))
    # it runs and serves until told to stop
    await eventually(lambda: runner.done() or ready(port), what="the service ready")
    assert not runner.done(), runner.result()
    stop.set()
    assert await asyncio.wait_for(runner, 30) == 0
    assert await ready(port) is None


def error_lines(caplog) -> list[str]:
    """The error lines logged, none of them with a traceback."""
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in failed if r.exc_info], caplog.text
    return [r.getMessage() for r in failed]


async def test_a_port_in_use_is_one_line_naming_the_address_and_no_traceback(monkeypatch, caplog):
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    monkeypatch.setenv("PUMPFLOW_TRANSPORT", "memory")
    monkeypatch.setenv("PUMPFLOW_HTTP_PORT", str(port))
    try:
        code = await asyncio.wait_for(run_service(Idle), 30)
    finally:
        taken.close()
    assert code == EXIT_FAILED
    said = " ".join(error_lines(caplog))
    assert f"127.0.0.1:{port}" in said and "PUMPFLOW_HTTP_PORT" in said, said
    assert "address already in use" in said.lower(), said


class NeedsRedis(Idle):
    name = "needs-redis"
    needs_store = True


async def test_a_dependency_unreachable_past_the_wait_is_one_line_and_no_traceback(
    monkeypatch, caplog
):
    monkeypatch.setenv("PUMPFLOW_TRANSPORT", "memory")
    monkeypatch.setenv("PUMPFLOW_HTTP_PORT", "0")
    port = free_port()
    monkeypatch.setenv("PUMPFLOW_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("PUMPFLOW_DEPENDENCY_WAIT_S", "0.5")
    assert await asyncio.wait_for(run_service(NeedsRedis), 60) == EXIT_FAILED
    said = " ".join(error_lines(caplog))
    assert "redis still unreachable after" in said, said
    # Redis's own error, which names the address and why (refused, a password wanted)
    assert f"127.0.0.1:{port}" in said, said


class Starts(Service):
    """A service that says when it has started; its stop is the subclass's."""

    started = False

    async def start(self, ctx: ServiceContext) -> None:
        type(self).started = True


async def stopped_once_started(service: type[Starts], within: float) -> int:
    """The exit code of ``service`` stopped (as by SIGTERM) once it has started: a stop
    before start-up ends would end it there, with nothing to lose."""
    stop = asyncio.Event()
    runner = asyncio.create_task(run_service(service, stop=stop))
    await eventually(lambda: service.started, what="the service started")
    stop.set()
    return await asyncio.wait_for(runner, within)


class LosesWorkOnStop(Starts):
    name = "loses-work"

    async def stop(self) -> None:
        raise RuntimeError("3 events not stored")


async def test_a_stop_that_fails_exits_non_zero(monkeypatch, caplog):
    monkeypatch.setenv("PUMPFLOW_TRANSPORT", "memory")
    monkeypatch.setenv("PUMPFLOW_HTTP_PORT", "0")
    assert await stopped_once_started(LosesWorkOnStop, 30) == EXIT_FAILED
    assert "3 events not stored" in caplog.text


class StopsOnlyWithTheBroker(Starts):
    """A stop that waits for what does not come (a broker away, say)."""

    name = "stops-with-the-broker"

    async def stop(self) -> None:
        await asyncio.Event().wait()


async def test_the_whole_shutdown_ends_within_its_time_and_exits_non_zero(monkeypatch, caplog):
    """A supervisor kills what outlasts its grace period (compose's stop_grace_period,
    30 s) unlogged: the process ends first, saying what it cut short."""
    monkeypatch.setenv("PUMPFLOW_TRANSPORT", "memory")
    monkeypatch.setenv("PUMPFLOW_HTTP_PORT", "0")
    monkeypatch.setenv("PUMPFLOW_SHUTDOWN_TIMEOUT_S", "1")
    assert await stopped_once_started(StopsOnlyWithTheBroker, 5) == EXIT_FAILED
    # the closes keep a fifth of the time: none of them is blamed for the stop's
    overran = [r.getMessage() for r in caplog.records if "took longer" in r.getMessage()]
    assert overran == ["shutdown: service stop took longer than 0.8 s"]


class OutlastsTheDrain(Service):
    """A handler still running when the drain gives up."""

    name = "outlasts-drain"
    handling = False

    async def start(self, ctx: ServiceContext) -> None:
        self.release = asyncio.Event()
        type(self).service = self
        await ctx.bus.subscribe(
            Subscription(service=self.name, patterns=("token.lifecycle",), handler=self.handle)
        )
        payload = TokenLifecycle(mint="m1", state="active")
        await ctx.bus.publish(make_event(payload, source=ctx.source, time=ctx.clock.now()))

    async def handle(self, event) -> None:
        type(self).handling = True
        await self.release.wait()

    async def stop(self) -> None:
        # after the drain gave up: what the handler waits for goes with the service
        self.release.set()


@pytest.mark.slow
async def test_a_drain_that_gives_up_on_a_handler_in_flight_exits_non_zero(monkeypatch):
    """The handler is cut short (its delivery handled again elsewhere, or lost): the
    shutdown was not the clean one exit 0 says."""
    monkeypatch.setenv("PUMPFLOW_TRANSPORT", "memory")
    monkeypatch.setenv("PUMPFLOW_HTTP_PORT", "0")
    monkeypatch.setenv("PUMPFLOW_DRAIN_TIMEOUT_S", "0.2")
    stop = asyncio.Event()
    runner = asyncio.create_task(run_service(OutlastsTheDrain, stop=stop))
    try:
        await eventually(lambda: OutlastsTheDrain.handling, what="the handler in flight")
        stop.set()
        assert await asyncio.wait_for(runner, 30) == EXIT_FAILED
    finally:
        OutlastsTheDrain.service.release.set()
        stop.set()
        await asyncio.wait_for(runner, 30)


class Stateful(Service):
    """Needs Redis and Postgres; writes a marker to both on start."""

    name = "stateful"
    needs_store = True
    needs_db = True

    async def start(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        await ctx.store.set("started", ctx.settings.replica.encode())
        # a redelivery counted as the bus counts one: where every replica sees it
        bus = getattr(ctx.bus, "inner", ctx.bus)
        await bus.journal.attempt("stateful.p0", "probe", "start-1")
        await ctx.db.execute("CREATE TABLE IF NOT EXISTS marker (replica text)")
        await ctx.db.execute("INSERT INTO marker VALUES ($1)", ctx.settings.replica)

    async def stop(self) -> None:
        await self.ctx.store.set("stopped", b"1")


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.postgres
async def test_distributed_service_connects_what_it_needs_and_reports_ready(
    namespace, amqp_url, redis_url, postgres_dsn, redis_client, rabbitmq_harness
):
    import asyncpg

    dsn = postgres_dsn
    rabbitmq_harness.delete_after(["stateful"])
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
        # the service waits out a broker too loaded to bind its queues at once (10 s an
        # attempt): on a shared machine that can take several attempts
        body = await eventually(
            lambda: runner.done() or ready(port), 120.0, what="the service ready"
        )
        assert not runner.done(), runner.result()
        assert body["ready"] is True, body
        assert set(body["checks"]) == {"bus", "store", "postgres", "service"}
        assert await redis_client.get(f"{namespace}:started") == b"r1"
        counts = [k async for k in redis_client.scan_iter(match=f"{namespace}:delivery-starts:*")]
        assert [await redis_client.smembers(k) for k in counts] == [{b"start-1"}]
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
        await drop_schema(dsn, namespace)


class Keyed(Service):
    """Consumes keyed events, so its replicas share the partitions."""

    name = "keyed"

    async def start(self, ctx: ServiceContext) -> None:
        await ctx.bus.subscribe(
            Subscription(service=self.name, patterns=("token.lifecycle",), handler=self.handle)
        )

    async def handle(self, event) -> None:
        pass

    async def stop(self) -> None:
        pass


@pytest.mark.rabbitmq
@pytest.mark.redis
async def test_a_second_process_with_a_live_replicas_id_exits_1_in_one_line(
    namespace, amqp_url, redis_url, redis_client, rabbitmq_harness, caplog
):
    rabbitmq_harness.delete_after(["keyed"])

    def settings(port: int) -> CommonSettings:
        return CommonSettings(service="keyed", replica="r1", transport="rabbitmq",
                              partitions=4, amqp_url=amqp_url, redis_url=redis_url,
                              namespace=namespace, http_port=port, log_format="text")  # fmt: skip

    port = free_port()
    stop = asyncio.Event()
    runner = asyncio.create_task(run_service(Keyed, settings(port), stop=stop))
    try:
        await eventually(lambda: runner.done() or ready(port), 120.0, what="r1 ready")
        assert not runner.done(), runner.result()
        caplog.clear()
        copy = run_service(Keyed, settings(free_port()), stop=asyncio.Event())
        assert await asyncio.wait_for(copy, 60) == EXIT_FAILED
        said = error_lines(caplog)
        assert len(said) == 1 and "'r1'" in said[0] and "another live process" in said[0], said
        # the holder goes on, ready, its heartbeat in place
        assert (await ready(port))["checks"]["partitions:keyed"]["ok"] is True
        assert await redis_client.exists(f"{namespace}:replicas:keyed:r1")
        stop.set()
        assert await asyncio.wait_for(runner, 60) == 0
    finally:
        stop.set()
        if not runner.done():
            runner.cancel()


def test_a_replay_clock_start_runs_the_service_on_a_replay_clock():
    assert isinstance(service_clock(CommonSettings(service="s")), WallClock)
    replay = service_clock(CommonSettings(service="s", replay_clock_start=1_700_000_000.0))
    assert isinstance(replay, ReplayClock) and replay.now() == 1_700_000_000.0


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.parametrize(
    ("refused", "reason", "setting"),
    [
        ("vhost", "NOT_ALLOWED - vhost {vhost} not found", "vhost"),
        ("login", "ACCESS_REFUSED - Login was refused", "user"),
    ],
)
async def test_a_vhost_or_login_the_broker_refuses_is_said_with_the_brokers_reason(
    monkeypatch, caplog, namespace, amqp_url, refused, reason, setting
):
    parts = urlsplit(amqp_url)
    vhost = f"{namespace}-missing"
    if refused == "vhost":
        parts = parts._replace(path=f"/{vhost}")
    else:
        parts = parts._replace(
            netloc=f"{parts.username}:not-the-password@{parts.hostname}:{parts.port}"
        )
    port = free_port()
    monkeypatch.setenv("PUMPFLOW_TRANSPORT", "rabbitmq")
    monkeypatch.setenv("PUMPFLOW_NAMESPACE", namespace)
    monkeypatch.setenv("PUMPFLOW_AMQP_URL", urlunsplit(parts))
    monkeypatch.setenv("PUMPFLOW_HTTP_PORT", str(port))
    monkeypatch.setenv("PUMPFLOW_DEPENDENCY_RETRY_MAX_S", "0.2")
    monkeypatch.setenv("PUMPFLOW_DEPENDENCY_WAIT_S", "3")
    expected = reason.format(vhost=vhost)
    runner = asyncio.create_task(run_service(Idle))
    try:
        await _said_with_reason(runner, port, expected, setting, caplog)
    finally:
        if not runner.done():
            runner.cancel()


async def _said_with_reason(runner, port, expected, setting, caplog) -> None:
    async def readyz_error() -> str | None:
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                body = (await http.get("/readyz", timeout=5)).json()
        except httpx.TransportError:
            return None
        error = body.get("checks", {}).get("rabbitmq", {}).get("error")
        return error if error and expected in error else None

    # waited out as every dependency is at start-up, the broker's reason shown meanwhile
    error = await eventually(readyz_error, 20, what="/readyz carrying the broker's reason")
    assert f"the AMQP URL's {setting}" in error, error
    assert await asyncio.wait_for(runner, 30) == EXIT_FAILED
    waits = [r.getMessage() for r in caplog.records if "waiting for rabbitmq" in r.getMessage()]
    assert waits and all(expected in line for line in waits), waits
    said = error_lines(caplog)
    assert len(said) == 1, said
    assert expected in said[0] and "PUMPFLOW_AMQP_URL" in said[0], said
    assert "InvalidFrameError" not in caplog.text, caplog.text
