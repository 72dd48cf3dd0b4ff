"""Two trading replicas as processes over RabbitMQ, Redis and Postgres: one leads, the
other stands by; the kill switch given to the standby halts the leader on its next
round; kill -9 the leader with a paper position open and the kill switch on, and the
standby takes over through the lease with the book and the operator's state
reloaded from Postgres. A prediction for the held token after the take-over orders
nothing, and a new token is still entered once the operator resumes.

The test publishes what the upstream services would (see tests/upstream.py).
"""

from __future__ import annotations

import asyncio
import signal

import msgspec
import pytest

from pumpflow.common.events import ExitOrder, make_event
from pumpflow.common.priority import Priority
from pumpflow.common.testing import (
    EventCollector,
    ProcessStack,
    eventually,
    free_port,
    http_json,
)
from pumpflow.common.trading import MIGRATION_POOL, VENUE_POOL, TokenView
from pumpflow.trading.context import VIEW_PREFIX
from pumpflow.trading.ledger import PostgresLedger

from .test_trading_crash import LATENCY_S, TOKEN, no_orders
from .upstream import Upstream, post

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

LEASE_TTL_S = 3
#: a standby campaigns on; it trades within the lease's TTL of the holder's death, and
#: this bound leaves the two shared cores room for the reload
TAKE_OVER_S = 6 * LEASE_TTL_S
LOW_SCORE = "score # < 0.6"
HELD_ALREADY = "held already (or an entry is in flight): one entry a token"


@pytest.fixture
async def replicas(pg_pool, redis_client, process_stack: ProcessStack, rabbitmq_harness):
    process_stack.configure(
        api_token=TOKEN,
        trading_paper_latency_s=LATENCY_S,
        trading_lease_ttl_s=LEASE_TTL_S,
        trading_max_feed_lag_s=120,
        consumer_groups="trading",
    )
    bus = await rabbitmq_harness.bus(partitions=4, source="test/upstream")
    watch = await EventCollector("watch").attach(bus, "order.*", "position.*", "trading.*")
    ports = {"trading-a": free_port(), "trading-b": free_port()}
    return process_stack, ports, Upstream(bus), watch


def roles(ports: dict[str, int]) -> dict[str, str | None]:
    """Each replica's role by its /state, None while it does not answer."""
    views = {name: http_json(f"http://127.0.0.1:{port}/state") for name, port in ports.items()}
    return {name: (view or {}).get("role") for name, view in views.items()}


async def leader_and_standby(stack: ProcessStack, ports: dict[str, int]) -> tuple[str, str]:
    """Serve both replicas; the names of the one that leads and the one standing by."""
    for name, port in ports.items():
        stack.serve("trading", name=name, replica=name, http_port=port)

    async def one_leads() -> bool:
        found = await asyncio.to_thread(roles, ports)
        return sorted(found.values(), key=str) == ["active", "standby"]

    await eventually(one_leads, 60, what="one replica active, one standby", details=stack.logs,
                     interval=0.2)  # fmt: skip
    found = roles(ports)
    [leader] = [name for name, role in found.items() if role == "active"]
    [standby] = [name for name, role in found.items() if role == "standby"]
    return leader, standby


def all_acked(port: int) -> bool:
    """True once the replica behind ``port`` holds no message the broker delivered it
    unacked (buffered, being handled, or handled with its ack held back)."""
    body = http_json(f"http://127.0.0.1:{port}/readyz") or {}
    return body.get("checks", {}).get("bus", {}).get("unacked") == 0


async def kill_leader(stack: ProcessStack, leader: str, standby: str, port: int) -> None:
    """kill -9 the leader; wait until the standby trades."""
    stack.procs[leader].send_signal(signal.SIGKILL)
    await asyncio.to_thread(stack.procs[leader].wait, 30)

    async def took_over() -> bool:
        return (await asyncio.to_thread(roles, {standby: port}))[standby] == "active"

    await eventually(took_over, TAKE_OVER_S, what=f"{standby} takes over", details=stack.logs,
                     interval=0.2)  # fmt: skip


async def test_standby_takes_over_with_the_book_and_the_kill_switch(replicas, pg_pool):
    stack, ports, upstream, watch = replicas
    ledger = PostgresLedger(pg_pool)
    leader, standby = await leader_and_standby(stack, ports)

    held = await upstream.ready()
    await upstream.publish(upstream.prediction(held))
    [request] = [
        e.data
        for e in await watch.wait_for(1, "order.requested", where=lambda e: e.data.mint == held)
    ]
    await upstream.trade_after(held, LATENCY_S + 60.0)
    await watch.wait_for(1, "position.opened", where=lambda e: e.data.mint == held)
    # the standby reads the ledger, and trades nothing
    positions = http_json(f"http://127.0.0.1:{ports[standby]}/positions")
    assert positions["role"] == "standby" and positions["source"] == "ledger", positions
    assert [p["mint"] for p in positions["positions"]] == [held], positions
    # the kill switch given to the stand-by (where `docker compose exec` may land): stored,
    # and the leader halts on its next round
    status, body = post(f"http://127.0.0.1:{ports[standby]}/halt", TOKEN, {"reason": "before"})
    assert status == 200 and body["stored"] is True, body
    assert "applies it on its next round" in body["detail"], body

    def leader_halted() -> bool:
        state = http_json(f"http://127.0.0.1:{ports[leader]}/state") or {}
        return (state.get("operator_state"), state.get("operator_reason")) == ("halted", "before")

    await eventually(lambda: asyncio.to_thread(leader_halted), 30,
                     what="the leader halted by the stand-by's halt", details=stack.logs,
                     interval=0.2)  # fmt: skip
    # asked of the stand-by, /state says the operator's halt the ledger holds, not its own
    state = http_json(f"http://127.0.0.1:{ports[standby]}/state")
    assert (state["source"], state["operator_state"], state["state"]) == (
        "ledger", "halted", None
    ), state  # fmt: skip
    assert state["holder"].startswith(f"{leader}:"), state
    # a resume is the leader's alone
    status, body = post(f"http://127.0.0.1:{ports[standby]}/resume", TOKEN, {"reason": "no"})
    assert status == 409, body

    port = ports[standby]
    await kill_leader(stack, leader, standby, port)
    positions = http_json(f"http://127.0.0.1:{port}/positions")
    assert positions["source"] == "book", positions
    assert [p["mint"] for p in positions["positions"]] == [held], positions
    state = http_json(f"http://127.0.0.1:{port}/state")
    assert (state["state"], state["operator_state"], state["operator_reason"]) == (
        "halted", "halted", "before"
    ), state  # fmt: skip

    status, body = post(f"http://127.0.0.1:{port}/resume", TOKEN, {"reason": "after"})
    assert status == 200 and body["state"] == "active", body
    before = no_orders(port)
    # the new leader saw nothing of the held token: what upstream would publish again
    await upstream.ready(held)
    await upstream.publish(upstream.prediction(held))
    fresh = await upstream.ready()
    await upstream.publish(upstream.prediction(fresh))
    await watch.wait_for(1, "order.requested", where=lambda e: e.data.mint == fresh)
    await eventually(
        lambda: asyncio.to_thread(lambda: no_orders(port) > before),
        30, what="the held token's prediction decided", details=stack.logs,
    )  # fmt: skip
    reasons = http_json(f"http://127.0.0.1:{port}/pnl")["no_order_reasons"]
    assert HELD_ALREADY in reasons, reasons
    assert [e.data.order_id for e in watch.of("order.requested") if e.data.mint == held] == [
        request.order_id
    ]
    assert [o["order_id"] for o in await ledger.orders(limit=10, mint=held)] == [request.order_id]
    assert await ledger.control() == ("active", "after")

    assert await stack.stop(standby) == 0, stack.logs()


async def test_the_standby_answers_pnl_and_limits_from_the_ledger(replicas):
    """The stand-by's book is not the ledger's (it has traded nothing, or traded in a
    term before): its /pnl and /limits say what the ledger holds, as its /positions
    does, and name the holder. A position closed at a gain or a loss, one held, and an
    entry in flight make every figure count."""
    stack, ports, upstream, watch = replicas
    leader, standby = await leader_and_standby(stack, ports)

    sold, held, flying = await upstream.ready(), await upstream.ready(), await upstream.ready()
    for mint in (sold, held):
        await upstream.publish(upstream.prediction(mint))
        await watch.wait_for(1, "order.requested", where=lambda e, m=mint: e.data.mint == m)
        await upstream.trade_after(mint, LATENCY_S + 60.0)
    opened = {
        e.data.mint: e.data
        for e in await watch.wait_for(2, "position.opened", where=lambda e: e.data.mint != flying)
    }
    sale = ExitOrder(
        order_id=f"{opened[sold].position_id}:exit:1",
        mint=sold,
        position_id=opened[sold].position_id,
        token_amount=opened[sold].token_amount,
    )
    await upstream.publish(make_event(sale, source="exit/test", time=upstream.clock.now()))
    await watch.wait_for(1, "order.requested", where=lambda e: e.data.order_id == sale.order_id)
    await upstream.trade_after(sold, 2 * (LATENCY_S + 60.0))
    await watch.wait_for(1, "position.closed", where=lambda e: e.data.mint == sold)
    await upstream.publish(upstream.prediction(flying))
    await watch.wait_for(1, "order.requested", where=lambda e: e.data.mint == flying)

    def views(name: str) -> tuple[dict, dict]:
        base = f"http://127.0.0.1:{ports[name]}"
        return http_json(f"{base}/pnl"), http_json(f"{base}/limits")

    pnl, limits = await asyncio.to_thread(views, leader)
    assert (pnl["role"], pnl["open_positions"], pnl["closed_positions"]) == ("active", 1, 1)
    assert pnl["realized_pnl_sol"] != 0.0
    assert (limits["open_positions"], limits["orders_in_flight"]) == (2, 1), limits
    stood_pnl, stood_limits = await asyncio.to_thread(views, standby)
    for view in (stood_pnl, stood_limits):
        assert (view["role"], view["source"]) == ("standby", "ledger"), view
        assert view["holder"].startswith(f"{leader}:"), view
    for name in ("capital_sol", "realized_pnl_sol", "fees_sol", "exposure_sol"):
        assert stood_pnl[name] == pytest.approx(pnl[name], rel=1e-9), name
    for name in ("open_positions", "closed_positions", "starting_capital_sol"):
        assert stood_pnl[name] == pnl[name], name
    # the marks are the holder's alone
    assert stood_pnl["unrealized_pnl_sol"] is None and stood_pnl["pnl_sol"] is None
    for name in ("capital_sol", "exposure_sol"):
        assert stood_limits[name] == pytest.approx(limits[name], rel=1e-9), name
    for name in ("open_positions", "orders_in_flight", "sales_in_flight", "limits", "breakers"):
        assert stood_limits[name] == limits[name], name
    assert await stack.stop(standby) == 0, stack.logs()


async def test_the_standby_decides_on_what_the_leader_learnt_before_it_died(
    replicas, redis_client, namespace
):
    """A token's creation, features and lifecycle came before the take-over and do not
    come again: the new leader enters it on its next prediction, from the token's view
    the old one stored, and fills the entry on the market that view holds."""
    stack, ports, upstream, watch = replicas
    leader, standby = await leader_and_standby(stack, ports)
    known = await upstream.ready()
    await upstream.publish(upstream.prediction(known, score=0.1))
    stored = f"{namespace}:{VIEW_PREFIX}{known}"

    async def folded() -> bool:
        raw = await redis_client.get(stored)
        return (
            raw is not None and msgspec.msgpack.decode(raw, type=TokenView).prediction is not None
        )

    await eventually(folded, 30, what="the leader's view of the token stored",
                     details=stack.logs)  # fmt: skip
    assert no_orders(ports[leader]) == 1
    # a message the leader had not acked would come again to the new leader, which the
    # assertion below rules out: the leader acks what it handled (within ACK_LINGER_S)
    await eventually(lambda: asyncio.to_thread(all_acked, ports[leader]), 30,
                     what="the leader acked every message it was delivered",
                     details=stack.logs)  # fmt: skip

    port = ports[standby]
    await kill_leader(stack, leader, standby, port)
    await upstream.publish(upstream.prediction(known))

    def reasons() -> dict[str, int]:
        return http_json(f"http://127.0.0.1:{port}/pnl")["no_order_reasons"]

    def decided() -> bool:
        # the low score's prediction may come again too (the leader died before its ack)
        return bool(watch.of("order.requested")) or any(r != LOW_SCORE for r in reasons())

    await eventually(lambda: asyncio.to_thread(decided), 30,
                     what="the token's prediction decided", details=stack.logs)  # fmt: skip
    assert LOW_SCORE not in reasons(), "the token's events came again to the new leader"
    requests = [e.data for e in watch.of("order.requested")]
    assert [r.mint for r in requests] == [known], reasons()
    [request] = requests
    await upstream.trade_after(known, LATENCY_S + 60.0)
    [opened] = [
        e.data
        for e in await watch.wait_for(1, "position.opened", where=lambda e: e.data.mint == known)
    ]
    assert opened.position_id == request.order_id
    assert not watch.of("order.rejected")
    assert await stack.stop(standby) == 0, stack.logs()


async def test_a_pool_trade_that_comes_again_after_the_take_over_moves_the_view_once(
    replicas, redis_client, namespace
):
    """The leader stores a token's view with a trade on the pool folded in, and dies; the
    trade comes again to the new leader (as when the leader died before its ack): the
    pool's state in the view is as if the trade came once."""
    stack, ports, upstream, _ = replicas
    leader, standby = await leader_and_standby(stack, ports)
    mint = await upstream.ready()
    migrated = upstream.tokens.migrated(mint)
    pool_trade = upstream.tokens.buy(mint, "amm", sol=2.0, pool="pump-amm")
    await upstream.publish(migrated, pool_trade)
    stored = f"{namespace}:{VIEW_PREFIX}{mint}"

    async def view() -> TokenView | None:
        raw = await redis_client.get(stored)
        return None if raw is None else msgspec.msgpack.decode(raw, type=TokenView)

    async def traded_on_the_pool() -> bool:
        found = await view()
        # the view may be stored first with the token's curve, before the migration
        return (
            found is not None
            and found.market.venue == VENUE_POOL
            and found.market.state not in (None, MIGRATION_POOL)
        )

    await eventually(traded_on_the_pool, 30, what="the leader's view of the pool stored",
                     details=stack.logs)  # fmt: skip
    once = (await view()).market.state
    await eventually(lambda: asyncio.to_thread(all_acked, ports[leader]), 30,
                     what="the leader acked every message it was delivered",
                     details=stack.logs)  # fmt: skip

    await kill_leader(stack, leader, standby, ports[standby])
    # the trade again, then a lifecycle change behind it on the token's partition
    await upstream.publish(pool_trade, upstream.lifecycle(mint, priority=int(Priority.LOW)))

    async def caught_up() -> bool:
        found = await view()
        return found is not None and found.lifecycle.priority == Priority.LOW

    await eventually(caught_up, 30, what="the new leader's view stored after the trade",
                     details=stack.logs)  # fmt: skip
    assert (await view()).market.state == once
    assert await stack.stop(standby) == 0, stack.logs()
