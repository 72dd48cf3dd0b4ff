"""The feed as a process whose Postgres goes away: not ready, and a stop that says what it lost."""

from __future__ import annotations

import asyncio

import pytest

from pumpflow.common.testing import eventually, free_port, http_json

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]


async def test_the_feed_process_is_not_ready_without_its_store_and_exits_non_zero(
    process_stack, own_postgres
):
    procs = process_stack
    sim_port, http_port = free_port(), free_port()
    procs.configure(
        PUMPPORTAL_WS_URL=f"ws://127.0.0.1:{sim_port}/api/data", postgres_dsn=own_postgres.dsn
    )
    migrate = procs.run("migrate")
    assert migrate.returncode == 0, migrate.stderr
    procs.pumpflow(
        "simulator", "sim", "serve", "--port", str(sim_port), "--speed", "10",
        "--seed", "5", "--rate", "120",
    )  # fmt: skip
    procs.serve("feed", http_port=http_port, feed_record_ready_max_age_s=1.0,
                feed_stop_flush_s=2.0)  # fmt: skip
    readyz = f"http://127.0.0.1:{http_port}/readyz"

    def service_check() -> dict | None:
        body = http_json(readyz)
        return None if body is None else body["checks"].get("service")

    await eventually(
        lambda: asyncio.to_thread(lambda: (http_json(readyz) or {}).get("ready")),
        60, what="the feed ready", details=lambda: f"{http_json(readyz)}\n{procs.logs()}",
        interval=0.25,
    )  # fmt: skip
    await asyncio.to_thread(own_postgres.stop)

    def not_ready_for_the_recorder() -> dict | None:
        check = service_check()
        reason = (check or {}).get("reason") or ""
        return check if reason.startswith("recorder: the oldest of") else None

    check = await eventually(
        lambda: asyncio.to_thread(not_ready_for_the_recorder),
        60, what="not ready, naming the recorder", details=procs.logs, interval=0.25,
    )  # fmt: skip
    assert check["ok"] is False and check["connected"] is True
    assert await procs.stop("feed", within=60) == 1, procs.logs()
    log = procs.logs(tail=20_000)
    assert "events not stored within" in log and "lost (PumpPortal keeps no history)" in log
