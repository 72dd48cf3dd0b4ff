"""The services as separate processes over RabbitMQ, Redis and Postgres.

The same commands and environment a deployment uses (``pumpflow migrate``, then
``pumpflow serve <service>`` with PUMPFLOW_* variables), against the simulator
serving PumpPortal's protocol on a local socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pumpflow.common.testing import free_port

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

BIN = Path(sys.executable).parent
SERVICES = ("feed", "features", "activity")
PARTITIONS = 4


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def _wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


async def _delete_rabbit_topology(amqp_url: str, namespace: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for service in (*SERVICES, "simulator"):
            names = [f"{namespace}.{service}.p{p:02d}" for p in range(PARTITIONS)]
            names += [f"{namespace}.{service}.critical", f"{namespace}.{service}.dlq"]
            for name in names:
                await channel.queue_delete(name)
        for exchange in (f"{namespace}.events", f"{namespace}.dlx"):
            await channel.exchange_delete(exchange)


@pytest.fixture
def stack(tmp_path, namespace, amqp_url, redis_url, redis_client, pg_pool):
    """Simulator + feed + features + activity as processes; yields their HTTP ports."""
    sim_port = free_port()
    ports = {service: free_port() for service in SERVICES}
    env = {
        **os.environ,
        "PUMPFLOW_TRANSPORT": "rabbitmq",
        "PUMPFLOW_NAMESPACE": namespace,
        "PUMPFLOW_PARTITIONS": str(PARTITIONS),
        "PUMPFLOW_AMQP_URL": amqp_url,
        "PUMPFLOW_REDIS_URL": redis_url,
        "PUMPFLOW_LOG_FORMAT": "text",
        "PUMPPORTAL_WS_URL": f"ws://127.0.0.1:{sim_port}/api/data",
    }
    # the pg_pool fixture created and migrated the schema; migrate must be idempotent
    migrate = subprocess.run(
        [BIN / "pumpflow", "migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert migrate.returncode == 0, migrate.stderr
    procs: dict[str, subprocess.Popen] = {}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("simulator", *SERVICES)}
    procs["simulator"] = subprocess.Popen(
        [BIN / "pumpflow", "sim", "serve", "--port", str(sim_port), "--speed", "10",
         "--seed", "5", "--rate", "120"],
        env=env, stdout=logs["simulator"], stderr=subprocess.STDOUT,
    )  # fmt: skip
    for service in SERVICES:
        procs[service] = subprocess.Popen(
            [BIN / "pumpflow", "serve", service],
            env={**env, "PUMPFLOW_HTTP_PORT": str(ports[service])},
            stdout=logs[service],
            stderr=subprocess.STDOUT,
        )
    try:
        yield ports, procs, tmp_path
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        for log in logs.values():
            log.close()
        asyncio.run(_delete_rabbit_topology(amqp_url, namespace))


async def test_services_run_as_processes_and_stop_cleanly(stack, namespace, redis_client, pg_pool):
    ports, procs, logdir = stack

    def logs() -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(logdir.glob("*.log"))
        )

    def all_ready():
        return all(_get(f"http://127.0.0.1:{ports[s]}/readyz")[0] == 200 for s in SERVICES)

    await asyncio.to_thread(_wait_until, all_ready, 60, "every service ready")

    async def lifecycles_seen() -> dict:
        status, body = _get(f"http://127.0.0.1:{ports['activity']}/tokens")
        return json.loads(body) if status == 200 and body not in ("", "[]", "{}") else {}

    deadline = time.monotonic() + 60
    feature_keys: list[bytes] = []
    while time.monotonic() < deadline:
        feature_keys = [k async for k in redis_client.scan_iter(match=f"{namespace}:features:*")]
        stored = await pg_pool.fetchval("SELECT count(*) FROM token_events")
        if len(feature_keys) >= 3 and stored >= 50 and await lifecycles_seen():
            break
        await asyncio.sleep(0.5)
    else:
        raise AssertionError(f"the stack produced too little:\n{logs()}")

    # the feed stored what it published; features wrote hashes that carry their version
    creations = await pg_pool.fetchval("SELECT count(*) FROM tokens")
    assert creations >= 3
    sample = await redis_client.hgetall(feature_keys[0])
    fields = {k.decode() for k in sample}
    assert {"market_cap_sol", "curve_progress", "trades_per_minute"} <= fields
    mint = feature_keys[0].decode().rsplit(":", 1)[1]
    status, body = _get(f"http://127.0.0.1:{ports['features']}/features/{mint}")
    assert status == 200, body
    # every service counted the events it consumed in its metrics
    for service in ("features", "activity"):
        status, metrics = _get(f"http://127.0.0.1:{ports[service]}/metrics")
        assert status == 200
        consumed = [
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("pumpflow_events_consumed_total{") and 'type="token.trade"' in line
        ]
        assert sum(consumed) > 0, f"{service} consumed no trades"

    # SIGTERM drains, checkpoints and exits 0
    for service in SERVICES:
        procs[service].send_signal(signal.SIGTERM)
    for service in SERVICES:
        code = await asyncio.to_thread(procs[service].wait, 60)
        assert code == 0, f"{service} exited {code}\n{logs()}"
