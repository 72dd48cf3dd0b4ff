"""The services as separate processes over RabbitMQ, Redis and Postgres.

The same commands and environment a deployment uses (``pumpflow migrate``, then
``pumpflow serve <service>`` with PUMPFLOW_* variables), against the simulator
serving PumpPortal's protocol on a local socket.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from pumpflow.common.testing import ProcessStack, eventually, free_port, http_get

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

SERVICES = ("feed", "features", "activity")


@pytest.fixture
def stack(pg_pool, redis_client, process_stack) -> tuple[ProcessStack, dict[str, int]]:
    """Simulator + feed + features + activity as processes; their HTTP ports by service.

    Asked for after the servers' fixtures, so the processes end before the schema goes.
    """
    sim_port = free_port()
    ports = {service: free_port() for service in SERVICES}
    process_stack.configure(PUMPPORTAL_WS_URL=f"ws://127.0.0.1:{sim_port}/api/data")
    # the pg_pool fixture created and migrated the schema; migrate must be idempotent
    migrate = process_stack.run("migrate")
    assert migrate.returncode == 0, migrate.stderr
    process_stack.pumpflow(
        "simulator", "sim", "serve", "--port", str(sim_port), "--speed", "10",
        "--seed", "5", "--rate", "120",
    )  # fmt: skip
    for service in SERVICES:
        process_stack.serve(service, http_port=ports[service])
    return process_stack, ports


async def test_services_run_as_processes_and_stop_cleanly(stack, namespace, redis_client, pg_pool):
    procs, ports = stack

    def all_ready() -> bool:
        return all(http_get(f"http://127.0.0.1:{ports[s]}/readyz")[0] == 200 for s in SERVICES)

    await eventually(
        lambda: asyncio.to_thread(all_ready),
        60,
        what="every service ready",
        details=procs.logs,
        interval=0.25,
    )

    def lifecycles_seen() -> bool:
        status, body = http_get(f"http://127.0.0.1:{ports['activity']}/tokens")
        return status == 200 and bool(json.loads(body or "null"))

    async def produced() -> list[bytes] | None:
        # the vectors, <ns>:features:<mint> (the service keeps other records under features:)
        feature_keys = [
            k
            async for k in redis_client.scan_iter(match=f"{namespace}:features:*")
            if k.count(b":") == 2
        ]
        stored = await pg_pool.fetchval("SELECT count(*) FROM token_events")
        if len(feature_keys) >= 3 and stored >= 50 and await asyncio.to_thread(lifecycles_seen):
            return feature_keys
        return None

    feature_keys = await eventually(
        produced,
        60,
        what="features in Redis, events in Postgres and lifecycles",
        details=procs.logs,
        interval=0.5,
    )

    # the feed stored what it published; features wrote hashes that carry their version
    creations = await pg_pool.fetchval("SELECT count(*) FROM tokens")
    assert creations >= 3
    sample = await redis_client.hgetall(feature_keys[0])
    fields = {k.decode() for k in sample}
    assert {"market_cap_sol", "curve_progress", "trades_per_minute"} <= fields
    mint = feature_keys[0].decode().rsplit(":", 1)[1]
    status, body = http_get(f"http://127.0.0.1:{ports['features']}/features/{mint}")
    assert status == 200, body
    # every service counted the events it consumed in its metrics (of whichever types)
    for service in ("features", "activity"):
        status, metrics = http_get(f"http://127.0.0.1:{ports[service]}/metrics")
        assert status == 200
        consumed = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("pumpflow_events_consumed_total{")
        ]
        assert sum(consumed) > 0, f"{service} consumed no events"

    # SIGTERM drains, checkpoints and exits 0
    codes = await procs.stop_all(SERVICES)
    assert codes == dict.fromkeys(SERVICES, 0), procs.logs()
