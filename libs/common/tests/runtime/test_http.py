from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.dispatch import HELD
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.bus.ownership import BalancedBus
from pumpflow.common.clock import ReplayClock, WallClock
from pumpflow.common.dependencies import POSTGRES, REDIS, WAITS
from pumpflow.common.runtime.http import HttpServer, create_app, require_token
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.runtime.settings import CommonSettings
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.state.redis import RedisStateStore


class Probe(Service):
    name = "probe"
    needs_store = True

    def __init__(self, settings: CommonSettings):
        super().__init__(settings)
        self.status_value: dict[str, Any] | Exception = {"tokens": 3}
        self.resets = 0

    async def start(self, ctx: ServiceContext) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def status(self) -> dict[str, Any]:
        if isinstance(self.status_value, Exception):
            raise self.status_value
        return self.status_value

    def router(self) -> APIRouter:
        router = APIRouter()

        @router.get("/probe/count")
        async def count() -> dict[str, int]:
            return {"resets": self.resets}

        @router.post("/probe/reset", dependencies=[Depends(require_token)])
        async def reset() -> dict[str, int]:
            self.resets += 1
            return {"resets": self.resets}

        return router


class NeedsDb(Probe):
    name = "needsdb"
    needs_store = False
    needs_db = True


def make(service_cls=Probe, *, token: str | None = "s3cret-token", store=None, db=None):
    settings = CommonSettings(service=service_cls.name, replica="r1", api_token=token)
    bus = InMemoryBus(source=settings.source)
    clock = ReplayClock()
    ctx = ServiceContext(
        settings=settings,
        bus=bus,
        clock=clock,
        store=store if store is not None else MemoryStateStore(clock),
        db=db,
    )
    service = service_cls(settings)
    return service, ctx, create_app(service, ctx)


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc")


async def test_healthz_answers_while_the_process_lives():
    _, _, app = make()
    async with client(app) as http:
        answer = await http.get("/healthz")
    assert answer.status_code == 200
    assert answer.json() == {"alive": True, "service": "probe", "replica": "r1"}


async def test_readyz_follows_the_bus_the_store_and_the_service():
    service, ctx, app = make()
    async with client(app) as http:
        answer = await http.get("/readyz")
        assert answer.status_code == 503
        assert answer.json()["checks"]["bus"]["ok"] is False

        await ctx.bus.start()
        answer = await http.get("/readyz")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["ready"] is True
        assert set(body["checks"]) == {"bus", "store", "service"}
        assert body["checks"]["bus"]["transport"] == "memory"
        assert body["checks"]["service"] == {"tokens": 3, "ok": True}

        service.status_value = {"ready": False, "why": "warming up"}
        answer = await http.get("/readyz")
        assert answer.status_code == 503
        assert answer.json()["checks"]["service"] == {
            "ready": False,
            "why": "warming up",
            "ok": False,
        }

        service.status_value = RuntimeError("model not loaded")
        answer = await http.get("/readyz")
        assert answer.status_code == 503
        assert "model not loaded" in answer.json()["checks"]["service"]["error"]
    await ctx.bus.close()


async def test_readyz_shows_the_partitions_a_balanced_replica_owns():
    settings = CommonSettings(service="probe", replica="r1")
    clock = ReplayClock(start=100.0)
    store = MemoryStateStore(clock)
    bus = BalancedBus(InMemoryBus(partitions=4), store=store, clock=clock, replica="r1")
    ctx = ServiceContext(settings=settings, bus=bus, clock=clock, store=store)
    await bus.start()

    async def ignore(event) -> None:
        pass

    await bus.subscribe(Subscription(service="probe", patterns=("token.*",), handler=ignore))
    app = create_app(Probe(settings), ctx)
    try:
        async with client(app) as http:
            answer = await http.get("/readyz")
            assert answer.status_code == 200, answer.text
            checks = answer.json()["checks"]
            assert checks["partitions:probe"]["owned"] == [0, 1, 2, 3]
            assert checks["partitions:probe"]["ok"] is True
            assert checks["bus"]["transport"] == "memory" and "ownership" not in checks["bus"]
            bus.balancers["probe"].healthy = False  # as after a failed heartbeat
            answer = await http.get("/readyz")
            assert answer.status_code == 503
            assert answer.json()["checks"]["partitions:probe"]["ok"] is False
    finally:
        await bus.close()


@pytest.mark.redis
async def test_readyz_reports_an_unreachable_store(namespace):
    store = RedisStateStore(url="redis://127.0.0.1:1/0", namespace=namespace)
    _, ctx, app = make(store=store)
    await ctx.bus.start()
    try:
        async with client(app) as http:
            answer = await http.get("/readyz")
        assert answer.status_code == 503
        assert answer.json()["checks"]["store"]["ok"] is False
        assert answer.json()["checks"]["bus"]["ok"] is True
    finally:
        await ctx.bus.close()
        await store.close()


@pytest.mark.postgres
async def test_readyz_names_a_dependency_the_service_waits_for():
    _, ctx, app = make()
    await ctx.bus.start()
    async with client(app) as http:
        with WAITS.waiting(REDIS):
            answer = await http.get("/readyz")
            assert answer.status_code == 503
            waiting = answer.json()["checks"]["dependencies"]
            assert waiting["ok"] is False and REDIS in waiting["waiting_on"]
        answer = await http.get("/readyz")
    assert answer.status_code == 200, answer.text
    assert "dependencies" not in answer.json()["checks"]


async def test_readyz_checks_postgres_only_for_services_that_need_it(pg_pool):
    _, ctx, app = make(NeedsDb, db=pg_pool)
    await ctx.bus.start()
    try:
        async with client(app) as http:
            body = (await http.get("/readyz")).json()
        assert body["ready"] is True
        assert set(body["checks"]) == {"bus", "postgres", "service"}
        assert body["checks"]["postgres"]["ok"] is True
    finally:
        await ctx.bus.close()


async def test_readyz_fails_when_a_needed_database_is_missing():
    _, ctx, app = make(NeedsDb, db=None)
    await ctx.bus.start()
    async with client(app) as http:
        answer = await http.get("/readyz")
    await ctx.bus.close()
    assert answer.status_code == 503
    assert answer.json()["checks"]["postgres"]["ok"] is False


class WorksWithoutDb(NeedsDb):
    name = "workswithoutdb"
    optional_dependencies = frozenset({POSTGRES})


async def test_a_dependency_the_service_works_without_shows_degraded_and_leaves_it_ready():
    _, ctx, app = make(WorksWithoutDb, db=None)
    await ctx.bus.start()
    try:
        async with client(app) as http:
            answer = await http.get("/readyz")
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["degraded"] == [POSTGRES]
            postgres = body["checks"]["postgres"]
            assert (postgres["ok"], postgres["required"]) == (False, False)
            # work waiting for it leaves the service ready too; waiting for another does not
            with WAITS.waiting(POSTGRES):
                answer = await http.get("/readyz")
                assert answer.status_code == 200, answer.text
                assert answer.json()["checks"]["dependencies"]["ok"] is True
                with WAITS.waiting(REDIS):
                    answer = await http.get("/readyz")
                    assert answer.status_code == 503
                    assert answer.json()["degraded"] == [POSTGRES]
    finally:
        await ctx.bus.close()


async def test_metrics_expose_the_default_registry():
    _, _, app = make()
    async with client(app) as http:
        answer = await http.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert 'pumpflow_service_info{replica="r1",service="probe"} 1.0' in answer.text


class Scraped(Probe):
    name = "scraped"


def ready_gauge(metrics: str) -> str | None:
    found = [
        line.rsplit(" ", 1)[1]
        for line in metrics.splitlines()
        if line.startswith('pumpflow_service_ready{service="scraped"}')
    ]
    return found[0] if found else None


async def test_the_ready_gauge_follows_the_service_whoever_asks_readyz():
    """Prometheus scrapes /metrics, not /readyz (nor does the compose healthcheck, which
    asks /healthz): the gauge the ServiceNotReady alert reads must say what /readyz
    would say at the scrape, not what it said when last asked."""
    service, ctx, app = make(Scraped)
    async with client(app) as http:
        # its bus not started: not ready, though /readyz was never asked
        assert ready_gauge((await http.get("/metrics")).text) == "0.0"
        await ctx.bus.start()
        assert (await http.get("/readyz")).status_code == 200
        assert ready_gauge((await http.get("/metrics")).text) == "1.0"
        # the service can no longer work; nobody asks /readyz
        service.status_value = {"ready": False, "why": "model not loaded"}
        assert ready_gauge((await http.get("/metrics")).text) == "0.0"
        service.status_value = {"tokens": 3}
        assert ready_gauge((await http.get("/metrics")).text) == "1.0"
    await ctx.bus.close()


async def test_mutating_routes_need_the_token():
    service, _, app = make(token="s3cret-token")
    async with client(app) as http:
        assert (await http.get("/probe/count")).json() == {"resets": 0}
        missing = await http.post("/probe/reset")
        wrong = await http.post("/probe/reset", headers={"Authorization": "Bearer nope"})
        right = await http.post("/probe/reset", headers={"Authorization": "Bearer s3cret-token"})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert service.resets == 1


async def test_without_a_configured_token_mutations_are_refused():
    service, _, app = make(token=None)
    async with client(app) as http:
        answer = await http.post("/probe/reset", headers={"Authorization": "Bearer anything"})
    assert answer.status_code == 403
    assert "token must be configured" in answer.json()["detail"]
    assert service.resets == 0


async def test_uvicorn_serves_in_the_running_loop_and_stops_on_request():
    _, ctx, app = make()
    await ctx.bus.start()
    server = HttpServer(app, host="127.0.0.1", port=0)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).status_code == 200
    finally:
        await server.stop()
        await ctx.bus.close()
    assert server.task is None
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            await http.get("/healthz")


async def test_a_port_in_use_is_a_clear_start_up_error():
    _, _, app = make()
    first = HttpServer(app, host="127.0.0.1", port=0)
    await first.start()
    try:
        second = HttpServer(app, host="127.0.0.1", port=first.port)
        with pytest.raises(OSError, match=f"cannot serve HTTP on 127.0.0.1:{first.port}"):
            await asyncio.wait_for(second.start(), 10)
    finally:
        await first.stop()


async def test_a_replay_clock_moves_by_post_and_fires_its_timers_first():
    _, ctx, app = make()
    fired: list[float] = []
    ctx.clock.call_at(5.0, lambda: fired.append(ctx.clock.now()))
    auth = {"Authorization": "Bearer s3cret-token"}
    async with client(app) as http:
        before = (await http.get("/clock")).json()
        unauthorised = await http.post("/clock", json={"to": 10.0})
        bad = await http.post("/clock", json={"to": "soon"}, headers=auth)
        moved = await http.post("/clock", json={"to": 10.0}, headers=auth)
    assert before["replay"] is True and before["now"] == 0.0 and before["next_timer_at"] == 5.0
    assert isinstance(before["events"], list)
    assert unauthorised.status_code == 401
    assert bad.status_code == 422 and "'to'" in bad.json()["detail"]
    assert moved.status_code == 200
    assert moved.json()["fired"] == 1 and moved.json()["now"] == 10.0
    assert moved.json()["next_timer_at"] is None
    assert fired == [5.0]


async def test_a_held_service_is_released_by_post_clock():
    _, _, app = make()
    auth = {"Authorization": "Bearer s3cret-token"}
    async with client(app) as http:
        held = await http.post("/clock", json={"hold": True}, headers=auth)
        assert held.status_code == 200 and "probe" in HELD
        released = await http.post("/clock", json={"hold": False}, headers=auth)
    assert released.status_code == 200 and "probe" not in HELD


async def test_a_wall_clock_cannot_be_moved():
    settings = CommonSettings(service="probe", replica="r1", api_token="t")
    ctx = ServiceContext(
        settings=settings, bus=InMemoryBus(source=settings.source), clock=WallClock(), store=None
    )
    async with client(create_app(Probe(settings), ctx)) as http:
        now = (await http.get("/clock")).json()
        refused = await http.post("/clock", json={"to": 1.0}, headers={"Authorization": "Bearer t"})
    assert now["replay"] is False and now["next_timer_at"] is None
    assert refused.status_code == 409 and "REPLAY_CLOCK_START" in refused.json()["detail"]


@pytest.mark.parametrize("to", ["NaN", "Infinity", "-Infinity"])
async def test_a_clock_step_to_no_time_is_refused_and_the_clock_stays(to):
    _, ctx, app = make()
    ctx.clock.call_at(5.0, lambda: None)
    auth = {"Authorization": "Bearer s3cret-token", "Content-Type": "application/json"}
    async with client(app) as http:
        refused = await http.post("/clock", content=f'{{"to": {to}}}', headers=auth)
        assert refused.status_code == 422 and "'to' must be a time" in refused.text
        assert ctx.clock.now() == 0.0 and ctx.clock.next_timer_at() == 5.0
        moved = await http.post("/clock", json={"to": 10.0}, headers=auth)
    assert moved.status_code == 200 and moved.json()["fired"] == 1
