"""The exit service and trading as processes over RabbitMQ, Redis and Postgres: kill -9
of the exit service in the middle of a graceful exit, then a restart: it resumes from
its Postgres records, every position is sold out, none sold twice, and the stored
summary matches trading's fills."""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict

import pytest

from pumpflow.common.testing import (
    EventCollector,
    ProcessStack,
    eventually,
    free_port,
    http_json,
)
from pumpflow.exit.records import PostgresExitStore

from .upstream import Upstream, post

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

TOKEN = "test-token"
POSITIONS = 4


class Stack:
    def __init__(self, processes: ProcessStack, upstream: Upstream, watch: EventCollector):
        self.processes = processes
        self.upstream = upstream
        self.watch = watch
        self.trading_url = f"http://127.0.0.1:{free_port()}"
        self.exit_url = f"http://127.0.0.1:{free_port()}"

    def serve_trading(self) -> None:
        self.processes.serve("trading", http_port=self.trading_url.rsplit(":", 1)[1])

    def serve_exit(self) -> None:
        self.processes.serve("exit", http_port=self.exit_url.rsplit(":", 1)[1])

    async def get(self, url: str):
        return await asyncio.to_thread(http_json, url)

    async def until(self, condition, what: str, within: float = 40.0) -> None:
        await eventually(condition, within, what=what, details=self.processes.logs, interval=0.1)

    async def ready(self) -> None:
        async def up() -> bool:
            state = await self.get(f"{self.trading_url}/state")
            progress = await self.get(f"{self.exit_url}/progress")
            return bool(state) and state.get("role") == "active" and progress is not None

        await self.until(up, "trading active and the exit service answering")

    async def open_positions(self, count: int) -> dict[str, float]:
        """``count`` positions trading opened; tokens bought by position id."""
        mints = [await self.upstream.ready() for _ in range(count)]
        for mint in mints:
            await self.upstream.publish(self.upstream.prediction(mint))
        opened = await self.watch.wait_for(
            count, "position.opened", where=lambda e: e.data.mint in mints, within=40
        )
        return {e.data.position_id: e.data.token_amount for e in opened}


@pytest.fixture
async def stack(pg_pool, redis_client, process_stack: ProcessStack, rabbitmq_harness):
    process_stack.configure(
        api_token=TOKEN,
        trading_lease_ttl_s=3,
        trading_max_feed_lag_s=120,
        consumer_groups="trading,exit,exit-control",
        # tranches small and spaced, so the kill lands in the middle of the exit
        exit_max_tranche_impact=0.002,
        exit_min_tranche_interval_s=1.0,
        exit_deadline_s=40.0,
        exit_run_poll_s=0.2,
        exit_resume_wait_s=5.0,
        exit_order_timeout_s=10.0,
    )
    bus = await rabbitmq_harness.bus(partitions=4, source="test/upstream")
    watch = await EventCollector("watch").attach(bus, "order.*", "position.*", "exit.*")
    return Stack(process_stack, Upstream(bus), watch)


async def test_kill_9_during_a_graceful_exit_then_restart_resumes_and_sells_nothing_twice(
    stack: Stack, pg_pool
):
    records = PostgresExitStore(pg_pool)
    stack.serve_exit()
    stack.serve_trading()
    await stack.ready()
    bought = await stack.open_positions(POSITIONS)

    async def exit_holds_them() -> bool:
        held = await stack.get(f"{stack.exit_url}/positions")
        return bool(held) and held["count"] == POSITIONS

    await stack.until(exit_holds_them, "the exit service holding every position")

    status, _ = post(f"{stack.exit_url}/shutdown", TOKEN, {"reason": "crash test"})
    assert status == 200
    # a tranche of every position sold, then one more sent: the kill lands mid-exit
    await stack.watch.wait_for(
        POSITIONS + 1, "order.filled", where=lambda e: e.data.side == "sell", within=40
    )
    stack.processes.procs["exit"].send_signal(signal.SIGKILL)
    await asyncio.to_thread(stack.processes.procs["exit"].wait, 30)
    run = await records.active_run()
    assert run is not None, "the graceful exit ended before the kill"
    sold_before = len([e for e in stack.watch.of("order.filled") if e.data.side == "sell"])

    stack.serve_exit()

    async def finished() -> bool:
        latest = await records.latest_run()
        return latest is not None and latest.finished_at is not None

    await stack.until(finished, "the resumed graceful exit finished", within=60)

    positions = await stack.get(f"{stack.trading_url}/positions")
    assert positions["positions"] == [], positions
    sells = [e.data for e in stack.watch.of("order.filled") if e.data.side == "sell"]
    assert len(sells) > sold_before, "nothing was sold after the restart"
    assert len({s.order_id for s in sells}) == len(sells), "an order filled twice"
    sold = defaultdict(float)
    for fill in sells:
        sold[fill.position_id] += fill.token_amount
    assert set(sold) == set(bought)
    for position_id, tokens in bought.items():
        assert sold[position_id] == pytest.approx(tokens, rel=1e-9), position_id
    closed = stack.watch.payloads("position.closed")
    assert sorted(c.position_id for c in closed) == sorted(bought)

    latest = await records.latest_run()
    assert latest.run_id == run.run_id
    summary = latest.summary
    assert len(summary["positions"]) == POSITIONS and summary["positions_left"] == 0, summary
    assert summary["sol_recovered"] == pytest.approx(sum(s.sol_amount for s in sells))
    stored = await records.run_orders(run.run_id)
    filled = {o.order_id for o in stored if o.state == "filled"}
    assert filled == {s.order_id for s in sells}
    assert "crash test" in (await stack.get(f"{stack.exit_url}/summary"))["text"]

    assert await stack.processes.stop("exit") == 0, stack.processes.logs()
    assert await stack.processes.stop("trading") == 0, stack.processes.logs()


async def test_pumpflow_stop_runs_the_graceful_exit_of_a_running_exit_service(stack: Stack):
    stack.serve_exit()
    stack.serve_trading()
    await stack.ready()
    bought = await stack.open_positions(2)

    async def exit_holds_them() -> bool:
        held = await stack.get(f"{stack.exit_url}/positions")
        return bool(held) and held["count"] == len(bought)

    await stack.until(exit_holds_them, "the exit service holding both positions")

    def stop(*args: str):
        return stack.processes.run("stop", "--url", stack.exit_url, *args, timeout=90)

    stack.processes.configure(api_token="not-the-token")
    refused = await asyncio.to_thread(stop, "--reason", "wrong token")
    assert refused.returncode == 1 and "401" in refused.stderr, refused
    assert (await stack.get(f"{stack.exit_url}/progress"))["run"] is None

    stack.processes.configure(api_token=TOKEN)
    done = await asyncio.to_thread(stop, "--reason", "cli stop")
    assert done.returncode == 0, (done.stdout, done.stderr, stack.processes.logs())
    assert "system.shutdown published (cli stop)" in done.stdout
    assert "graceful exit (cli stop): 2 positions, 2 sold out" in done.stdout, done.stdout
    assert "SOL recovered" in done.stdout

    positions = await stack.get(f"{stack.trading_url}/positions")
    assert positions["positions"] == [], positions
    closed = stack.watch.payloads("position.closed")
    assert sorted(c.position_id for c in closed) == sorted(bought)
    state = await stack.get(f"{stack.trading_url}/state")
    assert state["state"] == "halted", state  # no entry after the stop
    assert await stack.processes.stop("exit") == 0, stack.processes.logs()
    assert await stack.processes.stop("trading") == 0, stack.processes.logs()
