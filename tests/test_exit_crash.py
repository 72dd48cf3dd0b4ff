"""The exit service and trading as processes over RabbitMQ, Redis and Postgres: kill -9
of the exit service in the middle of a graceful exit, then a restart: it resumes from
its Postgres records, every position is sold out, none sold twice, and the stored
summary matches trading's fills; a position trading closed before the kill is reported
closed by trading. Trading killed -9 between a shutdown's halt and its barrier: restarted,
it publishes the barrier, and the graceful exit goes on without waiting it out."""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict

import pytest

from pumpflow.common.events import SystemShutdown, make_event
from pumpflow.common.testing import EventCollector, ProcessStack, free_port
from pumpflow.common.trading import TradingState
from pumpflow.exit.records import PostgresExitStore
from pumpflow.trading.ledger import PostgresLedger

from .exit_stack import TOKEN, ExitStack, exit_stack
from .upstream import post

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

POSITIONS = 4


class Stack(ExitStack):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.exit_url = f"http://127.0.0.1:{free_port()}"

    def serve_exit(self) -> None:
        self.processes.serve("exit", http_port=self.exit_url.rsplit(":", 1)[1])

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
    return await exit_stack(
        Stack,
        process_stack,
        rabbitmq_harness,
        # tranches small and spaced, so the kill lands in the middle of the exit
        exit_max_tranche_impact=0.002,
        exit_min_tranche_interval_s=1.0,
    )


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
        # a replica still starting answers 503, a detail without a count
        return bool(held) and held.get("count") == POSITIONS

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
    # the run ended on trading's closes, which reach the watch on a queue of its own: a
    # token's fills come before its close there
    await stack.watch.wait_for(POSITIONS, "position.closed")

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
        return bool(held) and held.get("count") == len(bought)

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
    # the run ended on trading's closes, which reach the watch on a queue of its own
    await stack.watch.wait_for(len(bought), "position.closed")
    closed = stack.watch.payloads("position.closed")
    assert sorted(c.position_id for c in closed) == sorted(bought)
    state = await stack.get(f"{stack.trading_url}/state")
    assert state["state"] == "halted", state  # no entry after the stop
    assert await stack.processes.stop("exit") == 0, stack.processes.logs()
    assert await stack.processes.stop("trading") == 0, stack.processes.logs()


async def test_trading_killed_between_a_shutdowns_halt_and_its_barrier_publishes_it_restarted(
    stack: Stack, pg_pool
):
    """Trading stores the halt of a shutdown request and is killed -9 before it publishes
    its barrier, which the exit service's graceful exit waits for (here far longer than
    the test). The test kills trading, then leaves in Postgres and on the bus what that
    kill leaves: the halt with the request's id, and the shutdown, which the exit takes
    up and trading's queue keeps. Restarted, trading publishes the barrier as it takes
    over, and the graceful exit sells the position and ends long before its wait for the
    barrier would."""
    stack.processes.configure(exit_barrier_wait_s=600.0, exit_deadline_s=600.0)
    records = PostgresExitStore(pg_pool)
    barriers = await EventCollector("barriers").attach(stack.upstream.bus, "trading.barrier")
    stack.serve_exit()
    stack.serve_trading()
    await stack.ready()
    bought = await stack.open_positions(1)

    async def exit_holds_it() -> bool:
        held = await stack.get(f"{stack.exit_url}/positions")
        return bool(held) and held.get("count") == 1

    await stack.until(exit_holds_it, "the exit service holding the position")
    stack.processes.procs["trading"].send_signal(signal.SIGKILL)
    await asyncio.to_thread(stack.processes.procs["trading"].wait, 30)
    await PostgresLedger(pg_pool).set_control(
        TradingState.HALTED, "shutdown: operator", shutdowns={"stop-1": "operator"}
    )
    request = SystemShutdown(reason="operator", request_id="stop-1")
    stack.upstream._now()
    await stack.upstream.publish(
        make_event(request, source="cli/test", time=stack.upstream.clock.now())
    )

    async def begun() -> bool:
        return await records.active_run() is not None

    await stack.until(begun, "the graceful exit begun, waiting for trading's barrier")
    stack.serve_trading()

    async def finished() -> bool:
        latest = await records.latest_run()
        return latest is not None and latest.finished_at is not None

    await stack.until(finished, "the graceful exit finished", within=90)
    # the exit took the barrier from a queue of its own; this collector's may lag behind
    [barrier] = [e.data for e in await barriers.wait_for(1, "trading.barrier")]
    assert barrier.request_id == "stop-1"
    assert [p.position_id for p in barrier.positions] == list(bought)
    summary = (await records.latest_run()).summary
    assert summary["positions_left"] == 0 and len(summary["positions"]) == 1, summary
    positions = await stack.get(f"{stack.trading_url}/positions")
    assert positions["positions"] == [], positions
    assert await stack.processes.stop("exit") == 0, stack.processes.logs()
    assert await stack.processes.stop("trading") == 0, stack.processes.logs()


async def test_kill_9_after_trading_closed_a_position_before_its_line_reached_the_run(
    stack: Stack, pg_pool, redis_client, namespace
):
    """A tranche of the graceful exit fills, then a hand sale closes the rest. The exit
    applies the close and writes its state, but its line cannot reach the run's records
    (the run's row is locked) when it is killed -9. Restarted, it holds the position no
    more: it reports it closed by trading, with the tranche sold, not left unsold. The
    test is trading here: it answers the tranche and closes the position."""
    import msgspec

    from pumpflow.common.consumer.keyed import Record
    from pumpflow.common.events import (
        OrderFilled,
        PositionClosed,
        PositionOpened,
        PositionUpdated,
        make_event,
    )
    from pumpflow.common.exit import ExitState
    from pumpflow.common.testing.stack import http_get

    # no trading process to answer the shutdown with its barrier; one tranche only
    stack.processes.configure(exit_barrier_wait_s=0.0, exit_min_tranche_interval_s=600.0)
    records = PostgresExitStore(pg_pool)
    upstream = stack.upstream
    stack.serve_exit()

    async def ready() -> bool:
        status, _ = await asyncio.to_thread(http_get, f"{stack.exit_url}/readyz")
        return status == 200

    await stack.until(ready, "the exit service consuming")
    mint = await upstream.ready()
    price = upstream.tokens.curves[mint].price
    fields = {"position_id": "pos-hand", "mint": mint, "entry_price": price}

    async def trading(payload) -> None:
        upstream._now()
        await upstream.publish(make_event(payload, source="trading/test",
                                          time=upstream.clock.now()))  # fmt: skip

    await trading(PositionOpened(**fields, token_amount=3e7, cost_sol=3e7 * price,
                                 mark_price=price))  # fmt: skip

    async def holds_it() -> bool:
        held = await stack.get(f"{stack.exit_url}/positions")
        return bool(held) and held.get("count") == 1

    await stack.until(holds_it, "the exit service holding the position")
    status, _ = post(f"{stack.exit_url}/shutdown", TOKEN, {"reason": "hand sale"})
    assert status == 200
    [order] = await stack.watch.wait_for(1, "exit.order", within=40)
    tranche = order.data
    await trading(
        OrderFilled(
            order_id=tranche.order_id, mint=mint, side="sell", token_amount=tranche.token_amount,
            sol_amount=tranche.token_amount * price, price=price, position_id="pos-hand",
        )
    )  # fmt: skip
    left = 3e7 - tranche.token_amount
    await trading(PositionUpdated(**fields, token_amount=left, cost_sol=left * price))
    run = await records.active_run()
    assert run is not None

    async def filled_stored() -> bool:
        stored = await records.run_orders(run.run_id)
        return [o.state for o in stored] == ["filled"]

    await stack.until(filled_stored, "the tranche's fill stored")
    # the run's row locked: no line of it can be stored until the kill
    locked = await pg_pool.acquire()
    holding = locked.transaction()
    await holding.start()
    try:
        await locked.execute(
            "SELECT 1 FROM exit_runs WHERE run_id = $1 FOR NO KEY UPDATE", run.run_id
        )
        await trading(PositionClosed(**fields, token_amount=0.0, cost_sol=0.0, reason="manual"))

        async def close_written() -> bool:
            raw = await redis_client.get(f"{namespace}:exit:key:{mint}")
            if raw is None:
                return False
            record = msgspec.msgpack.decode(raw, type=Record)
            return msgspec.msgpack.decode(record.state, type=ExitState).position is None

        await stack.until(close_written, "the close applied and its state written")
        stack.processes.procs["exit"].send_signal(signal.SIGKILL)
        await asyncio.to_thread(stack.processes.procs["exit"].wait, 30)
    finally:
        await holding.rollback()
        await pg_pool.release(locked)
    assert (await records.get_run(run.run_id)).finished_at is None

    stack.serve_exit()

    async def finished() -> bool:
        latest = await records.get_run(run.run_id)
        return latest.finished_at is not None

    await stack.until(finished, "the resumed graceful exit finished", within=60)
    summary = (await records.get_run(run.run_id)).summary
    [line] = summary["positions"]
    assert line.get("closed") == "manual" and line["completed"], line
    assert line["tranches"] == 1 and line["tokens_sold"] == pytest.approx(tranche.token_amount)
    assert summary["positions_left"] == 0, summary
    served: dict = {}

    async def summary_served() -> bool:
        # the route may answer before the restarted service has its records (an error
        # body, or none within the 2 s a loaded machine may miss)
        served["body"] = await stack.get(f"{stack.exit_url}/summary")
        return isinstance(served["body"], dict) and "text" in served["body"]

    await stack.until(summary_served, "the summary served")
    text = served["body"]["text"]
    assert "closed by trading (manual)" in text and "NOT SOLD OUT" not in text, text
    assert await stack.processes.stop("exit") == 0, stack.processes.logs()
