"""Two exit replicas and trading as processes over RabbitMQ, Redis and Postgres: a
graceful exit is finished when every position of every partition is, not when the
first replica is done with its share; when a replica dies in the middle, the other
takes its partitions, sells what they hold and only then finishes the run; when a
replica joins in the middle, the partitions it takes are sold by it alone (the old
owner sends no tranche of them any more)."""

from __future__ import annotations

import asyncio
import signal

import pytest

from pumpflow.common.bus.ownership import assign_partitions
from pumpflow.common.bus.routing import partition_of
from pumpflow.common.testing import ProcessStack, free_port
from pumpflow.exit.records import PostgresExitStore

from .exit_stack import TOKEN, ExitStack, exit_stack
from .upstream import post

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

PARTITIONS = 4
REPLICAS = ("exit-a", "exit-b")
#: positions per replica
EACH = 2
#: a sells each position in one tranche; b in many small ones, spaced
FAST = {"exit_max_tranche_impact": 0.2, "exit_min_tranche_interval_s": 0.1}
SLOW = {"exit_max_tranche_impact": 0.002, "exit_min_tranche_interval_s": 2.0}


class Replicas(ExitStack):
    within = 60.0

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.urls = {replica: f"http://127.0.0.1:{free_port()}" for replica in REPLICAS}
        self.expected = assign_partitions(PARTITIONS, REPLICAS)

    def serve(self, replica: str, **settings: object) -> None:
        port = self.urls[replica].rsplit(":", 1)[1]
        self.processes.serve("exit", name=replica, replica=replica, http_port=port, **settings)

    async def owned(self, replica: str) -> set[int] | None:
        body = await self.get(f"{self.urls[replica]}/readyz")
        if not body or not body.get("ready"):
            return None
        return set(body["checks"]["partitions:exit"]["owned"])

    async def split(self) -> None:
        async def split() -> bool:
            owned = [await self.owned(r) for r in REPLICAS]
            return owned == [set(self.expected[r]) for r in REPLICAS]

        async def trading_active() -> bool:
            state = await self.get(f"{self.trading_url}/state")
            return bool(state) and state.get("role") == "active"

        await self.until(split, "the exit replicas to split the partitions")
        await self.until(trading_active, "trading active")

    def mints_of(self, replica: str, count: int) -> list[str]:
        """``count`` new mints on ``replica``'s partitions."""
        return self.mints_on(self.expected[replica], count)

    def mints_on(self, partitions: tuple[int, ...], count: int) -> list[str]:
        """``count`` new mints on ``partitions``."""
        mints = []
        while len(mints) < count:
            mint = self.upstream.tokens.mint()
            if partition_of(mint, PARTITIONS) in partitions:
                mints.append(mint)
        return mints

    async def open(self, mints: list[str]) -> dict[str, str]:
        """Positions trading opens in ``mints``: position id by mint."""
        for mint in mints:
            await self.upstream.ready(mint)
            await self.upstream.publish(self.upstream.prediction(mint))
        opened = await self.watch.wait_for(
            len(mints), "position.opened", where=lambda e: e.data.mint in mints, within=60
        )
        return {e.data.mint: e.data.position_id for e in opened}

    async def hold(self, replica: str, count: int) -> None:
        async def holds() -> bool:
            held = await self.get(f"{self.urls[replica]}/positions")
            return bool(held) and held["count"] == count

        await self.until(holds, f"{replica} holding {count} positions")

    def closed(self) -> set[str]:
        return {c.position_id for c in self.watch.payloads("position.closed")}

    async def closes_watched(self, positions: set[str]) -> None:
        """Wait until the watch holds the close of every one of ``positions``: a run ends
        on trading's closes, which reach the watch on a queue of its own (a token's fills
        come before its close there)."""
        await self.watch.wait_until(
            lambda _: positions <= self.closed(), within=30, what=f"the closes of {positions}"
        )

    def summaries(self) -> list:
        return [r for r in self.watch.payloads("exit.report") if r.graceful]

    async def open_in_trading(self) -> set[str]:
        body = await self.get(f"{self.trading_url}/positions")
        return {p["position_id"] for p in body["positions"]}


@pytest.fixture
async def replicas(pg_pool, redis_client, process_stack: ProcessStack, rabbitmq_harness):
    stack = await exit_stack(
        Replicas,
        process_stack,
        rabbitmq_harness,
        partitions=PARTITIONS,
        heartbeat_interval_s=0.3,
        heartbeat_ttl_s=3.0,
    )
    stack.serve("exit-a", **FAST)
    stack.serve("exit-b", **SLOW)
    stack.serve_trading()
    await stack.split()
    return stack


async def shares(stack: Replicas) -> dict[str, dict[str, str]]:
    """``EACH`` positions on each replica's partitions: position id by mint, by replica."""
    held = {}
    for replica in REPLICAS:
        held[replica] = await stack.open(stack.mints_of(replica, EACH))
    for replica in REPLICAS:
        await stack.hold(replica, EACH)
    return held


async def shut_down(stack: Replicas, reason: str) -> tuple[set[str], set[str]]:
    """Each replica's share opened, then the graceful exit asked of exit-a: the position
    ids of exit-a's share and of exit-b's."""
    held = await shares(stack)
    status, _ = post(f"{stack.urls['exit-a']}/shutdown", TOKEN, {"reason": reason})
    assert status == 200
    return set(held["exit-a"].values()), set(held["exit-b"].values())


def assert_summary_matches_fills(stack: Replicas, summary: dict, positions: set[str]) -> None:
    sells = [f for f in stack.watch.payloads("order.filled") if f.side == "sell"]
    assert len({s.order_id for s in sells}) == len(sells), "an order filled twice"
    assert {line["position_id"] for line in summary["positions"]} == positions, summary
    assert summary["positions_left"] == 0, summary
    assert summary["sol_recovered"] == pytest.approx(sum(s.sol_amount for s in sells))


async def test_the_run_is_finished_only_when_the_slower_replica_is_done(
    replicas: Replicas, pg_pool
):
    stack = replicas
    records = PostgresExitStore(pg_pool)
    fast, slow = await shut_down(stack, "two replicas")

    async def fast_share_done() -> bool:
        progress = (await stack.get(f"{stack.urls['exit-a']}/progress")) or {}
        return fast <= stack.closed() and bool(progress.get("progress", {}).get("done"))

    await stack.until(fast_share_done, "exit-a done with its share")
    run = await records.active_run()
    assert run is not None, "the run was finished when exit-a was done with its share"
    # read after the run: b's positions were open when the run was read unfinished
    assert slow & await stack.open_in_trading(), "exit-b was done already: nothing shown"
    assert stack.summaries() == []
    assert "text" not in await stack.get(f"{stack.urls['exit-a']}/progress")

    async def finished() -> bool:
        stored = await records.get_run(run.run_id)
        return stored.finished_at is not None

    await stack.until(finished, "the run finished")
    assert await stack.open_in_trading() == set()
    await stack.closes_watched(fast | slow)
    stored = await records.get_run(run.run_id)
    assert_summary_matches_fills(stack, stored.summary, fast | slow)
    last_sale = max(f.time for f in stack.watch.of("order.filled") if f.data.side == "sell")
    assert stored.finished_at >= last_sale - 1.0
    # one summary of the whole run, whichever replica finished it; both serve it
    await stack.watch.wait_for(1, "exit.report", where=lambda e: e.data.graceful, within=30)
    [summary] = stack.summaries()
    assert summary.positions_left == 0 and len(summary.positions) == 2 * EACH
    for replica in REPLICAS:

        async def serves_it(replica: str = replica) -> bool:
            body = await stack.get(f"{stack.urls[replica]}/progress")
            return "text" in body

        await stack.until(serves_it, f"{replica} serving the run's summary")
        text = (await stack.get(f"{stack.urls[replica]}/progress"))["text"]
        assert f"{2 * EACH} positions, {2 * EACH} sold out" in text, text
    codes = await stack.processes.stop_all([*REPLICAS, "trading"])
    assert set(codes.values()) == {0}, stack.processes.logs()


async def test_a_replica_killed_mid_run_leaves_the_run_open_until_its_partitions_are_sold(
    replicas: Replicas, pg_pool
):
    stack = replicas
    records = PostgresExitStore(pg_pool)
    fast, slow = await shut_down(stack, "a replica dies")
    # b has sold a tranche of each of its positions, a is done with its share: b dies
    await stack.watch.wait_for(
        EACH, "order.filled", where=lambda e: e.data.position_id in slow, within=60
    )

    async def fast_share_done() -> bool:
        return fast <= stack.closed()

    await stack.until(fast_share_done, "exit-a done with its share")
    stack.processes.procs["exit-b"].send_signal(signal.SIGKILL)
    await asyncio.to_thread(stack.processes.procs["exit-b"].wait, 30)
    run = await records.active_run()
    assert run is not None, "the run was finished without exit-b's positions"
    assert slow & await stack.open_in_trading(), "exit-b sold out before the kill"

    async def finished() -> bool:
        stored = await records.get_run(run.run_id)
        return stored.finished_at is not None

    await stack.until(finished, "exit-a finishing the run with exit-b's partitions")
    assert await stack.owned("exit-a") == set(range(PARTITIONS))
    assert await stack.open_in_trading() == set()
    await stack.closes_watched(fast | slow)
    stored = await records.get_run(run.run_id)
    assert_summary_matches_fills(stack, stored.summary, fast | slow)
    codes = await stack.processes.stop_all(["exit-a", "trading"])
    assert set(codes.values()) == {0}, stack.processes.logs()


async def test_a_replica_joining_mid_run_sells_the_partitions_it_takes_and_the_old_owner_stops(
    replicas: Replicas, pg_pool
):
    stack = replicas
    records = PostgresExitStore(pg_pool)
    joined = assign_partitions(PARTITIONS, (*REPLICAS, "exit-c"))
    # exit-b's partitions: one it keeps, one exit-c takes when it joins
    [moving] = set(joined["exit-c"]) & set(stack.expected["exit-b"])
    [kept] = set(stack.expected["exit-b"]) - {moving}
    held = await stack.open([*stack.mints_on((moving,), EACH), *stack.mints_on((kept,), 1)])
    await stack.hold("exit-b", EACH + 1)
    moved = {held[m] for m in held if partition_of(m, PARTITIONS) == moving}
    status, _ = post(f"{stack.urls['exit-a']}/shutdown", TOKEN, {"reason": "a replica joins"})
    assert status == 200
    # exit-b has sold a tranche of each position that moves: exit-c joins
    await stack.watch.wait_for(
        EACH, "order.filled", where=lambda e: e.data.position_id in moved, within=60
    )
    stack.urls["exit-c"] = f"http://127.0.0.1:{free_port()}"
    stack.serve("exit-c", **SLOW)

    async def c_took_its_partitions() -> bool:
        return await stack.owned("exit-c") == set(joined["exit-c"])

    await stack.until(c_took_its_partitions, "exit-c owning its partitions")
    run = await records.active_run()
    assert run is not None, "the run ended before exit-c joined"

    async def finished() -> bool:
        stored = await records.get_run(run.run_id)
        return stored.finished_at is not None

    await stack.until(finished, "the run finished")
    assert await stack.open_in_trading() == set()
    await stack.closes_watched(set(held.values()))
    stored = await records.get_run(run.run_id)
    assert_summary_matches_fills(stack, stored.summary, set(held.values()))
    orders = stack.watch.of("exit.order")
    assert len({o.data.order_id for o in orders}) == len(orders), "an order id sent twice"
    # from exit-c's first tranche of a moved position on, only exit-c sells them
    for position_id in moved:
        sent = [o for o in orders if o.data.position_id == position_id]
        first = next(i for i, o in enumerate(sent) if o.source == "exit/exit-c")
        senders = {o.source for o in sent[first:]}
        assert senders == {"exit/exit-c"}, [(o.source, o.data.order_id) for o in sent]
    codes = await stack.processes.stop_all([*REPLICAS, "exit-c", "trading"])
    assert set(codes.values()) == {0}, stack.processes.logs()
