"""The operator's controls of the exit service while the broker takes no publication
(short of memory or disk it blocks every publisher; or frozen): ``pumpflow stop`` and
``pumpflow sell`` get their answer within ``exit_publish_wait_s``, saying the request
waits for the broker (exit status 4); it goes out once, when the broker takes it. And
``pumpflow stop`` asked again under its request id, or trading's barrier of it told
again: one graceful exit, not two.

The replica reaches the broker through a proxy of the test's own, frozen; the CLI asks
it over HTTP, as an operator's shell does."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from prometheus_client import CollectorRegistry

from pumpflow.cli.api import UNPUBLISHED
from pumpflow.cli.main import build_parser
from pumpflow.common.clock import WallClock
from pumpflow.common.events import ShutdownBarrier, SystemShutdown, make_event
from pumpflow.common.runtime.http import create_app
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state import MemoryStateStore
from pumpflow.common.testing import EventCollector, eventually
from pumpflow.common.testing.bus import proxied_buses
from pumpflow.common.testing.servers import local_app
from pumpflow.exit.records import ExitStore, MemoryExitStore, PostgresExitStore
from pumpflow.exit.service import ExitService
from pumpflow.exit.settings import ExitSettings

pytestmark = pytest.mark.rabbitmq

PARTITIONS = 2
#: the answer waits this long for the broker; the CLI allows it twenty times over
PUBLISH_WAIT_S = 0.5
TOKEN = "control-token"
MINT = "MintBlockedBroker1pump"


@contextlib.asynccontextmanager
async def replica_behind_proxy(
    namespace: str, amqp_url: str, records: ExitStore | None = None, **settings: object
):
    """An exit replica reaching the broker through a proxy, served over HTTP; a watch of
    the operator's requests on the broker itself. Yields (proxy, service, its URL, watch,
    the watch's bus)."""
    settings = ExitSettings.load(
        service="exit",
        namespace=namespace,
        partitions=PARTITIONS,
        api_token=TOKEN,
        **{"exit_publish_wait_s": PUBLISH_WAIT_S, **settings},
    )
    clock = WallClock()
    async with proxied_buses(
        amqp_url, namespace=namespace, partitions=PARTITIONS, source="exit/e"
    ) as (proxy, bus, watching):
        # trading.state: the critical lane's keyless markers, on system.shutdown's queue
        watch = await EventCollector("watch").attach(
            watching, "system.shutdown", "exit.sale_requested", "trading.state"
        )
        records = MemoryExitStore() if records is None else records
        service = ExitService(settings, registry=CollectorRegistry(), records=records)
        ctx = ServiceContext(settings=settings, bus=bus, clock=clock, store=MemoryStateStore(clock))
        await service.start(ctx)
        try:
            async with local_app(create_app(service, ctx)) as base:
                try:
                    yield proxy, service, base, watch, watching
                finally:
                    # before the server stops: it waits for the calls in flight
                    proxy.thaw()
        finally:
            proxy.thaw()
            await service.stop()


async def pumpflow(*argv: str) -> int:
    parsed = build_parser().parse_args(list(argv))
    return await asyncio.wait_for(asyncio.to_thread(parsed.handler, parsed), 60)


async def test_stop_while_the_broker_takes_no_publication_is_accepted_and_goes_out_once(
    namespace, amqp_url, monkeypatch, capsys
):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with replica_behind_proxy(namespace, amqp_url) as (proxy, service, base, watch, bus):
        proxy.freeze()
        stop = ("stop", "--no-wait", "--reason", "blocked", "--request-id", "r1", "--url", base)
        assert await pumpflow(*stop) == UNPUBLISHED
        said = capsys.readouterr()
        assert said.out == ""
        assert said.err.startswith(
            "pumpflow stop: system.shutdown (blocked) accepted, not published yet: RabbitMQ "
            "has not confirmed it"
        ), said.err
        assert "it goes out once the broker takes it" in said.err
        assert "pumpflow stop --request-id r1" in said.err, said.err
        # asked again under its id (the operator unsure it went through): not sent twice
        assert await pumpflow(*stop) == UNPUBLISHED
        assert watch.count("system.shutdown") == 0

        proxy.thaw()
        [shutdown] = await watch.wait_for(1, "system.shutdown", within=30)
        assert shutdown.data.reason == "blocked" and shutdown.data.request_id == "r1"
        await eventually(lambda: not service._publishing, what="the publication settled")
        await watch.barrier(bus, event_type="trading.state")
        assert watch.count("system.shutdown") == 1


async def test_sell_while_the_broker_takes_no_publication_is_accepted_and_goes_out_once(
    namespace, amqp_url, monkeypatch, capsys
):
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    async with replica_behind_proxy(namespace, amqp_url) as (proxy, service, base, watch, bus):
        proxy.freeze()
        assert await pumpflow("sell", MINT, "--wait", "1", "--url", base) == UNPUBLISHED
        said = capsys.readouterr()
        assert said.out == ""
        assert said.err.startswith(
            f"pumpflow sell: {MINT}: the sale request accepted, not published yet: RabbitMQ "
            "has not confirmed it"
        ), said.err
        assert "it goes out once the broker takes it" in said.err

        # asked again under its id (a retry of the call) while it waits: not sent twice
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            asked = [
                await client.post(
                    f"/positions/{MINT}/sell",
                    json={"request_id": "again", "wait_s": 0},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                for _ in range(2)
            ]
        for answer in asked:
            assert answer.status_code == 202, answer.text
            body = answer.json()
            assert body["request_id"] == "again" and body["published"] is False, body
            assert "not published yet" in body["detail"], body
        assert watch.count("exit.sale_requested") == 0

        proxy.thaw()
        requested = await watch.wait_for(2, "exit.sale_requested", within=30)
        assert {e.data.mint for e in requested} == {MINT}
        await eventually(lambda: not service._publishing, what="the publications settled")
        await watch.barrier(bus, event_type="exit.sale_requested", keys=[MINT])
        assert watch.count("exit.sale_requested") == 2
        assert sum(e.id == "again" for e in watch.of("exit.sale_requested")) == 1


async def runs(pool) -> list[str]:
    """The graceful exits stored, the earliest first."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT run_id FROM exit_runs ORDER BY started_at")
    return [row["run_id"] for row in rows]


@contextlib.asynccontextmanager
async def graceful_replica(namespace: str, amqp_url: str, pg_pool):
    """:func:`replica_behind_proxy` with its graceful exits in Postgres and no trading,
    whose barrier it waits for a moment only, and a broker it waits for as long as it
    may. Yields (service, its URL, watch, the watch's bus)."""
    records = PostgresExitStore(pg_pool)
    # the broker is not held up here: its confirm may take a loaded machine some tenths
    # of a second, and the answer must say published
    fast = {"exit_barrier_wait_s": 0.2, "exit_run_poll_s": 0.1, "exit_publish_wait_s": 5.0}
    async with replica_behind_proxy(namespace, amqp_url, records, **fast) as (
        _proxy, service, base, watch, bus,
    ):  # fmt: skip
        yield service, base, watch, bus


@pytest.mark.postgres
async def test_stop_asked_again_under_its_request_id_is_the_same_graceful_exit(
    namespace, amqp_url, pg_pool, monkeypatch, capsys, caplog
):
    """``pumpflow stop`` repeated with its ``--request-id`` (a retry after a timeout, an
    operator unsure the first went through) is answered as the same request, with that
    graceful exit's report: no second shutdown is published, and a copy that reaches the
    bus anyway (another replica asked) is applied once. Another id once the exit is over
    is another graceful exit."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    caplog.set_level("INFO", logger="pumpflow.exit")
    async with graceful_replica(namespace, amqp_url, pg_pool) as (service, base, watch, bus):
        stop = ("stop", "--reason", "first", "--request-id", "once", "--url", base)
        assert await pumpflow(*stop) == 0
        said = capsys.readouterr()
        assert "system.shutdown published (first)" in said.out, said.out
        assert "pumpflow stop --request-id once" in said.out, said.out
        assert "graceful exit (first)" in said.out, said.out
        [run] = await runs(pg_pool)

        assert await pumpflow("stop", "--reason", "again", "--request-id", "once",
                              "--url", base) == 0  # fmt: skip
        said = capsys.readouterr()
        assert "system.shutdown published" not in said.out, said.out
        assert f"applied already: graceful exit {run}, over" in said.out, said.out
        assert "graceful exit (first)" in said.out, said.out
        assert said.err == ""
        await watch.barrier(bus, event_type="trading.state")
        assert watch.count("system.shutdown") == 1

        # a copy on the bus (asked of another replica before this one applied it)
        copy = SystemShutdown(reason="copy", request_id="once")
        await bus.publish(make_event(copy, source="exit/other", time=service._ctx.clock.now()))
        await eventually(lambda: "a repeat of request once" in caplog.text, what="the copy applied")
        assert await runs(pg_pool) == [run]
        assert service.run is None, "the copy began a graceful exit"

        assert await pumpflow("stop", "--reason", "next", "--request-id", "other",
                              "--url", base) == 0  # fmt: skip
        said = capsys.readouterr()
        assert "graceful exit (next)" in said.out, said.out
        assert len(await runs(pg_pool)) == 2


@pytest.mark.postgres
async def test_a_barrier_of_a_request_whose_graceful_exit_is_over_begins_none(
    namespace, amqp_url, pg_pool, monkeypatch, caplog
):
    """Trading publishes its barrier again for a shutdown it sees again (redelivered, or
    after its restart), under the shutdown's request id: once that request's graceful
    exit is over, the barrier begins no second one. A barrier of another request, or of
    none, begins the next graceful exit as ever."""
    monkeypatch.setenv("PUMPFLOW_API_TOKEN", TOKEN)
    caplog.set_level("INFO", logger="pumpflow.exit")
    async with graceful_replica(namespace, amqp_url, pg_pool) as (service, base, _watch, bus):
        records = service.records

        async def barrier_told(request_id: str | None) -> None:
            caplog.clear()
            barrier = ShutdownBarrier(reason=f"barrier of {request_id}", request_id=request_id)
            now = service._ctx.clock.now()
            await bus.publish(make_event(barrier, source="trading/t", time=now))
            await eventually(lambda: "trading's barrier" in caplog.text, what="the barrier taken")

        async def over() -> bool:
            return service.run is None and (await records.active_run()) is None

        assert await pumpflow("stop", "--reason", "first", "--request-id", "once",
                              "--url", base) == 0  # fmt: skip
        [first] = await runs(pg_pool)
        assert (await records.get_run(first)).finished_at is not None

        await barrier_told("once")
        assert await runs(pg_pool) == [first], "a barrier of a request applied began a run"
        assert service.run is None

        await barrier_told("next")
        [_, following] = await runs(pg_pool)
        assert (await records.run_of_request("next")).run_id == following
        await eventually(over, what="the graceful exit of the barrier over")

        await barrier_told(None)
        assert len(await runs(pg_pool)) == 3
        await eventually(over, what="the graceful exit of the barrier over")
