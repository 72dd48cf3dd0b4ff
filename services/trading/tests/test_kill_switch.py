"""The kill switch while Postgres breaks: a halt applies in the trading replica at once,
says it is not stored yet, and is stored once Postgres is back, for a restart to keep; a
resume is refused meanwhile. The outages are of a Postgres of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import re
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.clock import WallClock
from pumpflow.common.db.pool import create_pool
from pumpflow.common.events import ExitOrder, make_event
from pumpflow.common.lease import LEASE_PREFIX
from pumpflow.common.runtime.embedded import run_embedded
from pumpflow.common.runtime.http import create_app
from pumpflow.common.state import MemoryStateStore
from pumpflow.common.testing import EventCollector, eventually
from pumpflow.common.testing.proxy import TcpProxy
from pumpflow.common.testing.trade_api import fake_trade_api
from pumpflow.common.trading import TradingState, UnbookedTrade
from pumpflow.trading import service as service_module
from pumpflow.trading.ledger import Announced, LedgerChange, MemoryLedger, PostgresLedger
from pumpflow.trading.service import LEASE_NAME, TradingService
from pumpflow.trading.settings import TradingSettings

from .test_live import CONFIRM_S, WALLET, answered, live_settings
from .test_service import publish, ready

TOKEN = "kill-switch-token"


#: a halt's answer waits this long for its store: a loaded machine's Postgres can take
#: a few tenths of a second to store it, and the answer is then 202, not 200
STORE_WAIT_S = 5.0
#: where the store is held up on purpose: the answer says so at once
QUICK_ANSWER = {"trading_halt_store_wait_s": 0.2}


def trading(
    ledger: PostgresLedger, registry: CollectorRegistry | None = None, **overrides
) -> TradingService:
    config = TradingSettings.load(
        service="trading",
        transport="memory",
        api_token=TOKEN,
        **{"trading_halt_store_wait_s": STORE_WAIT_S, **overrides},
    )
    registry = CollectorRegistry() if registry is None else registry
    return TradingService(config, registry=registry, ledger=ledger)


@contextlib.asynccontextmanager
async def running(clock, service: TradingService):
    """The service embedded, a watch on its events, and a client of its HTTP API."""
    async with run_embedded([service], clock=clock, synchronous=True) as system:
        watch = await EventCollector("watch").attach(
            system.bus, "order.*", "position.*", "trading.*"
        )
        app = create_app(service, system.contexts["trading"])
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://trading", headers=headers
        ) as client:
            yield system.bus, watch, client


@pytest.fixture
async def own_ledger(own_postgres, namespace):
    """A ledger on a Postgres of the test's own (``own_postgres``, to stop and start)."""
    pool = await create_pool(own_postgres.dsn, namespace, min_size=0, max_size=4)
    try:
        yield PostgresLedger(pool)
    finally:
        await pool.close()


def stored_gauge(registry: CollectorRegistry) -> float | None:
    """The service's gauge of whether the operator's state is stored."""
    return registry.get_sample_value("pumpflow_trading_operator_state_stored")


async def test_a_halt_with_postgres_down_applies_at_once_and_is_stored_once_it_is_back(
    clock, market, own_postgres, own_ledger
):
    ledger = own_ledger
    registry = CollectorRegistry()
    service = trading(ledger, registry, **QUICK_ANSWER)

    async with running(clock, service) as (bus, watch, client):
        mint = await ready(bus, market)
        assert stored_gauge(registry) == 1
        await asyncio.to_thread(own_postgres.stop)

        answer = await client.post("/halt", json={"reason": "postgres is down"})
        assert answer.status_code == 202, answer.text
        body = answer.json()
        assert body["state"] == "halted" and body["stored"] is False, body
        assert "halted in this replica at once" in body["detail"], body
        assert "NOT stored yet" in body["detail"], body
        assert (await client.get("/state")).json()["operator_state_stored"] is False
        # what an alert reads: the kill switch is not durable yet, and in force
        assert stored_gauge(registry) == 0
        assert registry.get_sample_value("pumpflow_trading_state", {"state": "halted"}) == 1
        # no entry from the next event on
        await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 0
        [halted] = watch.payloads("trading.state")
        assert halted.state == "halted" and halted.reason == "postgres is down"
        # resumed here alone, this replica would trade while the ledger says otherwise
        refused = await client.post("/resume", json={"reason": "too early"})
        assert refused.status_code == 503, refused.text
        assert "not stored yet" in refused.json()["detail"]
        assert service.risk.state is TradingState.HALTED

        await asyncio.to_thread(own_postgres.start)

        async def stored():
            with contextlib.suppress(OSError):
                return await ledger.control() == ("halted", "postgres is down")

        await eventually(stored, what="the halt stored once Postgres is back")
        assert (await client.get("/state")).json()["operator_state_stored"] is True
        assert stored_gauge(registry) == 1
        # told while Postgres was away; what it said is stored with the next round's change
        assert (await ledger.load(remembered=1)).announced == Announced()
        await clock.advance(service.settings.trading_tick_s)
        assert service.risk.state is TradingState.HALTED
        assert (await ledger.load(remembered=1)).announced == Announced(state=TradingState.HALTED)
        assert [s.state for s in watch.payloads("trading.state")] == ["halted"]

    # a restart keeps it
    restarted = trading(ledger)
    async with running(clock, restarted) as (bus, watch, client):
        assert restarted.risk.state is TradingState.HALTED
        assert restarted.risk.operator_reason == "postgres is down"
        answer = await client.post("/resume", json={"reason": "postgres is back"})
        assert answer.status_code == 200 and answer.json()["state"] == "active", answer.text
        assert await ledger.control() == ("active", "postgres is back")
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 1


async def test_an_entry_waiting_for_postgres_when_the_halt_comes_is_never_sent(
    clock, market, own_postgres, own_ledger
):
    """Postgres fails the store of a prediction's order, so the order is not sent yet;
    the halt comes: once Postgres is back the order is stored refused, and never sent."""
    ledger = own_ledger
    registry = CollectorRegistry()
    service = trading(ledger, registry, **QUICK_ANSWER)

    async with running(clock, service) as (bus, watch, client):
        mint = await ready(bus, market)
        assert stored_gauge(registry) == 1
        await asyncio.to_thread(own_postgres.stop)
        with pytest.raises(OSError):
            await service.on_events([market.prediction(mint)])
        assert len(service.risk.reservations) == 1

        answer = await client.post("/halt", json={"reason": "postgres is down"})
        assert answer.status_code == 202 and answer.json()["stored"] is False, answer.text
        assert service.risk.reservations == {}

        await asyncio.to_thread(own_postgres.start)

        async def stored():
            with contextlib.suppress(OSError):
                return await ledger.control() == ("halted", "postgres is down")

        await eventually(stored, what="the halt stored once Postgres is back")
        # the next round stores what waited
        await clock.advance(service.settings.trading_tick_s)
        [order] = await ledger.orders(limit=10)
        assert order["state"] == "rejected", order
        assert order["outcome"] == "halted before it was sent: postgres is down", order
        assert watch.count("order.requested") == 0
        assert service.executor.due(clock.now() + 3600.0) == []
        assert [s.state for s in watch.payloads("trading.state")] == ["halted"]


async def test_the_ledgers_older_state_never_undoes_a_halt_not_stored_yet(clock, market, pg_pool):
    """The halt's store waits for Postgres (a lock on its table) while a tick reads the
    state stored before: the tick leaves the halt in place, and the store goes through
    once the lock is gone."""
    ledger = PostgresLedger(pg_pool)
    await ledger.set_control(TradingState.ACTIVE, "resumed before")
    service = trading(ledger, **QUICK_ANSWER)
    async with running(clock, service) as (bus, watch, client):
        mint = await ready(bus, market)
        async with pg_pool.acquire() as holder, holder.transaction():
            # reads go on, writes wait
            await holder.execute("LOCK TABLE trading_control IN EXCLUSIVE MODE")
            # bounded: a halt that waited for the store would wait for the lock
            answer = await asyncio.wait_for(client.post("/halt", json={"reason": "operator"}), 30)
            assert answer.status_code == 202 and answer.json()["stored"] is False, answer.text
            await clock.advance(service.settings.trading_tick_s)
            assert service.risk.state is TradingState.HALTED
            assert service.risk.operator_reason == "operator"
        await eventually(lambda: service.state_view()["operator_state_stored"],
                         what="the halt stored once the lock is gone")  # fmt: skip
        assert await ledger.control() == ("halted", "operator")
        await clock.advance(service.settings.trading_tick_s)
        await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 0


async def _waiting_for_lock(pool, table: str) -> bool:
    """Whether a statement waits for the lock on ``table`` (of the pool's schema)."""
    async with pool.acquire() as conn:
        return await conn.fetchval(
            "SELECT count(*) > 0 FROM pg_locks WHERE relation = $1::regclass AND NOT granted",
            table,
        )


@contextlib.asynccontextmanager
async def _halt_while_an_entry_waits(pg_pool, service, client, market, mint, *, applied, what):
    """Give a halt while the store of an entry's order waits for a lock on the orders,
    and wait until ``applied()``: yields the lock's connection, a call that releases the
    lock, the entry's decision and the halt's request (tasks); the lock is held until
    released or the block ends."""
    async with pg_pool.acquire() as holder:
        locked = holder.transaction()
        await locked.start()
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                await locked.rollback()

        try:
            await holder.execute("LOCK TABLE orders IN EXCLUSIVE MODE")
            deciding = asyncio.create_task(service.on_events([market.prediction(mint)]))
            await eventually(lambda: _waiting_for_lock(pg_pool, "orders"),
                             what="the entry's store waiting for the lock")  # fmt: skip
            halting = asyncio.create_task(client.post("/halt", json={"reason": "operator"}))
            await eventually(applied, what=what)
            yield holder, release, deciding, halting
        finally:
            await release()


async def test_an_entry_whose_store_fails_after_the_halt_came_is_refused_not_sent(
    clock, market, pg_pool
):
    """The halt comes while the store of an entry's order waits (a lock on the orders):
    the halt leaves it to that store, which fails; the entry is then refused as any
    entry waiting for the ledger when the halt came, never stored as sent nor sent."""
    ledger = PostgresLedger(pg_pool)
    service = trading(ledger)
    async with running(clock, service) as (bus, watch, client):
        mint = await ready(bus, market)
        async with _halt_while_an_entry_waits(
            pg_pool, service, client, market, mint,
            applied=lambda: service.risk.state is TradingState.HALTED, what="the halt applied",
        ) as (holder, _, deciding, halting):  # fmt: skip
            # the store under way fails
            await holder.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks "
                "WHERE relation = 'orders'::regclass AND NOT granted"
            )
            with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises
                await deciding
        answer = await asyncio.wait_for(halting, 30)
        assert answer.status_code == 200 and answer.json()["stored"] is True, answer.text
        await clock.advance(service.settings.trading_tick_s)
        assert watch.count("order.requested") == 0
        [order] = await ledger.orders(limit=10)
        assert order["state"] == "rejected", order
        assert order["outcome"] == "halted before it was sent: operator", order
        assert service.risk.reservations == {}
        assert service.executor.due(clock.now() + 3600.0) == []


async def test_an_entry_whose_store_succeeds_after_the_halt_came_is_refused_not_sent(
    clock, market, pg_pool
):
    """The halt comes while the store of an entry's order waits (a lock on the orders);
    that store then goes through, the order stored as sent: it is refused all the same
    (the halt came before anything was sent), its capital released, never sent, and it
    counts nowhere as a failed execution."""
    ledger = PostgresLedger(pg_pool)
    service = trading(ledger)
    async with running(clock, service) as (bus, watch, client):
        mint = await ready(bus, market)
        async with _halt_while_an_entry_waits(
            pg_pool, service, client, market, mint,
            applied=lambda: service.risk.state is TradingState.HALTED, what="the halt applied",
        ) as (_, release, deciding, halting):  # fmt: skip
            # the store under way goes through
            await release()
            await asyncio.wait_for(deciding, 30)
        answer = await asyncio.wait_for(halting, 30)
        assert answer.status_code == 200 and answer.json()["stored"] is True, answer.text
        await clock.advance(service.settings.trading_tick_s)
        assert service.executor.due(clock.now() + 3600.0) == []
        assert watch.count("order.filled") == 0
        [order] = await ledger.orders(limit=10)
        assert order["state"] == "rejected", order
        assert order["outcome"] == "halted before it was sent: operator", order
        [refusal] = watch.payloads("order.rejected")
        assert refusal.order_id == order["order_id"]
        assert service.risk.reservations == {}
        assert service.risk.consecutive_failures == 0


def stored_halt(service: TradingService, reason: str) -> bool:
    """Whether the halt of ``reason`` is applied and stored (before it was given, the
    state stored is the one before)."""
    view = service.state_view()
    return view["operator_reason"] == reason and view["operator_state_stored"]


async def test_an_entry_whose_store_lost_its_reply_after_the_halt_came_is_stored_refused(
    clock, market, pg_pool, postgres_dsn, namespace
):
    """The halt comes while the store of an entry's order waits (a lock on the orders);
    that store then reaches Postgres but its reply is lost, so the halt refuses the
    entry unsent: the ledger says so (not ``sent``, which a take-over would reconcile as
    an order of unknown outcome, its capital reserved), and nothing is ever sent."""
    async with TcpProxy(urlsplit(postgres_dsn).port or 5432) as proxy:
        pool = await create_pool(proxy.url(postgres_dsn), namespace, apply_migrations=False)
        try:
            ledger = PostgresLedger(pool)
            service = trading(ledger)
            async with running(clock, service) as (bus, watch, client):
                mint = await ready(bus, market)
                async with _halt_while_an_entry_waits(
                    pg_pool, service, client, market, mint,
                    applied=lambda: stored_halt(service, "operator"),
                    what="the halt applied and stored",
                ) as (_, release, deciding, halting):  # fmt: skip
                    # the entry's transaction is stored, its commit's answer never comes
                    proxy.lose_replies(1, containing=b"COMMIT\x00")
                    await release()
                    with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises
                        await deciding
                assert proxy.lost_replies == 1
                answer = await asyncio.wait_for(halting, 30)
                assert answer.status_code == 200 and answer.json()["stored"] is True, answer.text
                await clock.advance(service.settings.trading_tick_s)
                assert watch.count("order.requested") == 0
                [order] = await ledger.orders(limit=10)
                assert order["state"] == "rejected", order
                assert order["outcome"] == "halted before it was sent: operator", order
                assert service.risk.reservations == {}

            # a take-over finds nothing to reconcile, no capital held for it
            restarted = trading(ledger)
            async with running(clock, restarted) as (bus, watch, client):
                assert restarted.reconciled == {}
                assert restarted.risk.reservations == {}
                assert watch.count("order.requested") == 0
        finally:
            await pool.close()


async def test_a_halt_given_while_a_resume_waits_to_apply_stands(clock, market, pg_pool):
    """A resume stored, waiting for a decision under way to apply here (answered so
    within its bound); a halt comes and is stored after it: the halt stands, here as in
    the ledger, and no entry follows."""
    ledger = PostgresLedger(pg_pool)
    await ledger.set_control(TradingState.HALTED, "halted before")
    service = trading(ledger, **QUICK_ANSWER)
    async with running(clock, service) as (bus, watch, client):
        assert service.risk.state is TradingState.HALTED
        mint = await ready(bus, market)
        async with pg_pool.acquire() as holder, holder.transaction():
            await holder.execute("LOCK TABLE orders IN EXCLUSIVE MODE")
            # a decision under way: a sale refused (nothing held) waits to be stored
            sale = ExitOrder(
                order_id="nothing-held", mint=mint, position_id="none", token_amount=1.0
            )
            deciding = asyncio.create_task(
                service.on_events([make_event(sale, source="exit/t", time=clock.now())])
            )
            await eventually(lambda: _waiting_for_lock(pg_pool, "orders"),
                             what="the decision's store waiting for the lock")  # fmt: skip
            resumed = await asyncio.wait_for(client.post("/resume", json={"reason": "resumed"}), 30)
            assert resumed.status_code == 202, resumed.text
            assert resumed.json()["detail"].startswith(
                "resume stored; not applied in this replica yet: the round under way comes "
                "first, and it has not ended within 0.2 s"
            ), resumed.text
            assert service._control == (TradingState.ACTIVE, "resumed")
            halting = asyncio.create_task(client.post("/halt", json={"reason": "halted again"}))
            await eventually(lambda: stored_halt(service, "halted again"),
                             what="the halt stored")  # fmt: skip
        await asyncio.wait_for(deciding, 30)
        halted = await asyncio.wait_for(halting, 30)
        # announced by now or not (it waited for the decision's round): stored either way
        assert halted.status_code in (200, 202) and halted.json()["stored"] is True, halted.text
        assert await ledger.control() == ("halted", "halted again")
        assert service.risk.state is TradingState.HALTED, service.state_view()
        assert service.risk.operator_reason == "halted again"
        await publish(bus, market.prediction(mint))
        assert [o.side for o in watch.payloads("order.requested")] == ["sell"]


async def taken_over(service: TradingService, ledger: PostgresLedger, holder: str) -> None:
    """Another replica, ``holder``, takes trading over: its lease, then the ledger (it
    names itself the holder), before this replica's renewal could tell it."""
    await service.leader.lease.store.set_many({LEASE_PREFIX + LEASE_NAME: holder.encode()},
                                              ttl=600.0)  # fmt: skip
    await ledger.load(remembered=10, holder=holder)


def tracebacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info]


def halts_stored(caplog) -> list[str]:
    """The lines saying a halt met a take-over and was stored for the holder."""
    return [r.getMessage() for r in caplog.records if "met a take-over" in r.getMessage()]


async def test_a_halt_meeting_a_take_over_is_stored_for_the_holder_in_one_line(
    clock, market, pg_pool, caplog
):
    """The halt comes to the replica trading just after another took the ledger over
    (its lease's renewal has not told it yet): the ledger refuses the fenced write, so
    the halt is stored unfenced, the operator's, for the holder to apply. The replica
    says so in one line, no traceback, answers that it is stored and that the holder
    (named) applies it on its next round, and stands by at once."""
    ledger = PostgresLedger(pg_pool)
    # renewed next in 200 s: only the refusal has it stand by within the test
    service = trading(ledger, trading_lease_ttl_s=600.0)
    async with running(clock, service) as (_, _, client):
        await taken_over(service, ledger, "t2:holder")
        caplog.clear()
        answer = await client.post("/halt", json={"reason": "operator"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["stored"] is True, body
        assert "another replica took trading over" in body["detail"], body
        assert "the replica trading (t2:holder) applies it on its next round" in body["detail"]
        await eventually(lambda: service.role == "standby", 10.0, what="standing by")
        assert await ledger.control() == (TradingState.HALTED, "operator")
        assert tracebacks(caplog) == []
        [said] = halts_stored(caplog)
        assert "no longer holds trading" in said and "stored unfenced for the holder" in said
        assert service.state_view()["operator_state_stored"] is True


async def test_a_resume_and_an_acknowledgement_are_refused_unless_this_replica_holds_trading(
    clock, market, pg_pool, caplog
):
    """A resume given to the replica trading just after another took the ledger over is
    refused by the ledger (fenced as a commit): it does not undo the halt the holder was
    given. Once it stands by, the replica refuses a resume and an acknowledgement of
    unbooked trades at once (409, naming the holder): stored, they would apply nowhere,
    or late, over what the holder was given since."""
    ledger = PostgresLedger(pg_pool)
    service = trading(ledger, trading_lease_ttl_s=600.0)
    async with running(clock, service) as (_, _, client):
        await taken_over(service, ledger, "t2:holder")
        await ledger.set_control(TradingState.HALTED, "the holder's", holder="t2:holder")
        trade = UnbookedTrade(signature="s1", mint="MintA", side="buy", tokens=1.0, sol=0.1,
                              time=clock.now(), candidates=())  # fmt: skip
        await ledger.commit(LedgerChange(unbooked=[trade], holder="t2:holder"))
        caplog.clear()
        answer = await client.post("/resume", json={"reason": "late"})
        assert answer.status_code == 409, answer.text
        assert "resume not recorded" in answer.json()["detail"], answer.text
        assert "t2:holder holds it" in answer.json()["detail"], answer.text
        await eventually(lambda: service.role == "standby", 10.0, what="standing by")
        for path, body in (
            ("/resume", {"reason": "operator"}),
            ("/unbooked/acknowledge", {"signatures": None}),
        ):
            answer = await client.post(path, json=body)
            assert answer.status_code == 409, (path, answer.text)
            detail = answer.json()["detail"]
            assert "(it stands by); t2:holder holds it: give it there" in detail, detail
        assert await ledger.control() == (TradingState.HALTED, "the holder's")
        assert [t.signature for t in await ledger.unbooked(since=0.0, limit=10)] == ["s1"]
        assert tracebacks(caplog) == []


class SharedLease(MemoryStateStore):
    """The store replicas hold their lease in, where a holder can stop renewing it
    without resigning (``dead``: its renewals never answer, as of a process killed with
    ``kill -9``), or go on unaware that it lost it (``unaware``: its renewals answer
    done and change nothing, as before a renewal tells it)."""

    def __init__(self, clock) -> None:
        super().__init__(clock)
        self.dead: set[bytes] = set()
        self.unaware: set[bytes] = set()

    async def extend_if_equal(self, key: str, value: bytes, ttl: float) -> bool:
        if bytes(value) in self.dead:
            await asyncio.Event().wait()
        if bytes(value) in self.unaware:
            return True
        return await super().extend_if_equal(key, value, ttl)


@pytest.fixture
def shared_lease(monkeypatch) -> SharedLease:
    """One store the replicas of the test hold their lease in (on a market clock each
    would have one of its own), on the wall clock as leases are."""
    store = SharedLease(WallClock())
    monkeypatch.setattr(service_module, "lease_stores", lambda ctx: [store])
    return store


def halted(service: TradingService, reason: str) -> bool:
    """Whether ``service`` (trading) applies the operator's halt of ``reason``."""
    risk = service.risk
    return risk.operator_state is TradingState.HALTED and risk.operator_reason == reason


async def test_a_halt_given_to_the_stand_by_is_stored_and_the_holder_stops_entering(
    clock, market, pg_pool, shared_lease, caplog
):
    """Two replicas, one trading, one standing by (the one ``docker compose exec``
    reaches, say). The halt given to the stand-by applies nothing there and is stored
    in the ledger, the operator's, unfenced; the answer says so and names the holder,
    which reads it on its next round and enters nothing after. A resume is still the
    holder's alone: the stand-by refuses it (409)."""
    ledger = PostgresLedger(pg_pool)
    holder, standby = trading(ledger), trading(ledger)
    async with running(clock, holder) as (bus, watch, _):
        async with running(clock, standby) as (_, _, client):
            assert (holder.role, standby.role) == ("active", "standby")
            mint = await ready(bus, market)
            answer = await client.post("/halt", json={"reason": "from the stand-by"})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["role"] == "standby" and body["stored"] is True, body
            assert body["detail"].startswith("not applied here: this replica stands by"), body
            named = f"the replica trading ({holder.leader.holder}) applies it on its next round"
            assert named in body["detail"], body
            assert await ledger.control() == (TradingState.HALTED, "from the stand-by")

            await clock.advance(holder.settings.trading_tick_s)
            await eventually(lambda: halted(holder, "from the stand-by"),
                             what="the holder halted on its round")  # fmt: skip
            assert holder.risk.state is TradingState.HALTED
            [said] = watch.payloads("trading.state")
            assert said.state == "halted" and said.reason == "from the stand-by"
            await publish(bus, market.prediction(mint))
            assert watch.count("order.requested") == 0

            refused = await client.post("/resume", json={"reason": "from the stand-by"})
            assert refused.status_code == 409, refused.text
            assert f"{holder.leader.holder} holds it" in refused.json()["detail"]
            assert await ledger.control() == (TradingState.HALTED, "from the stand-by")
            assert tracebacks(caplog) == []


async def killed(holder, shared_lease) -> str:
    """``holder`` (its lease 6 s, renewed every 2) stops renewing its lease, as a process
    killed -9 does, never resigning; its lease holder id, once two renewals are missed."""
    dead = holder.leader.holder
    shared_lease.dead.add(dead.encode())

    async def two_renewals_missed() -> bool:
        return (await shared_lease.expires_in(LEASE_PREFIX + LEASE_NAME) or 0.0) < 2.5

    await eventually(two_renewals_missed, 10.0, what="two renewals missed")
    return dead


def assert_runs_out_soon(detail: str) -> None:
    """``detail`` says when the dead holder's lease runs out: in what two renewals
    missed left of it (under 2.5 s)."""
    runs_out = re.search(r"the lease runs out in (\d+) s and a stand-by takes trading over", detail)
    assert runs_out and int(runs_out[1]) <= 3, detail


async def test_a_halt_to_the_stand_by_after_the_holder_died_says_the_next_holder_starts_halted(
    clock, market, pg_pool, shared_lease, caplog
):
    """The replica trading dies (``kill -9``: it stops renewing its lease, never resigns)
    and the halt reaches the stand-by before the lease runs out. No replica applies it on
    its next round: the answer says it is stored, that the lease's holder (named) is
    late with its renewal, and that whichever replica holds trading next starts halted,
    once the lease runs out (said when). The stand-by takes over then, halted."""
    ledger = PostgresLedger(pg_pool)
    # renewed every 2 s
    holder, standby = (trading(ledger, trading_lease_ttl_s=6.0) for _ in range(2))
    async with running(clock, holder):
        async with running(clock, standby) as (bus, watch, client):
            assert (holder.role, standby.role) == ("active", "standby")
            dead = await killed(holder, shared_lease)
            answer = await client.post("/halt", json={"reason": "holder killed"})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["stored"] is True, body
            detail = body["detail"]
            assert "applies it on its next round" not in detail, detail
            assert "whichever replica holds trading next starts halted" in detail, detail
            assert f"its lease's holder ({dead}) has not renewed it for" in detail, detail
            assert_runs_out_soon(detail)
            assert await ledger.control() == (TradingState.HALTED, "holder killed")

            await eventually(lambda: standby.role == "active", 20.0, what="the take-over")
            assert halted(standby, "holder killed")
            mint = await ready(bus, market)
            await publish(bus, market.prediction(mint))
            assert watch.count("order.requested") == 0
            assert tracebacks(caplog) == []


async def test_a_resume_to_the_stand_by_after_the_holder_died_says_when_to_give_it_again(
    clock, market, pg_pool, shared_lease, caplog
):
    """The replica trading, halted, dies (``kill -9``) and the resume reaches the
    stand-by before the lease runs out. It is refused, as a resume stored by a stand-by
    would apply late over what the holder, should it come back, was given since: the
    answer says the holder (named) is late with its renewal, when the lease runs out and
    a stand-by takes over, and to give the resume to the replica holding trading then,
    which ``pumpflow trading state`` names. Given there, it applies."""
    ledger = PostgresLedger(pg_pool)
    # renewed every 2 s
    holder, standby = (trading(ledger, trading_lease_ttl_s=6.0) for _ in range(2))
    async with running(clock, holder) as (_, _, holder_client):
        async with running(clock, standby) as (_, _, client):
            assert (holder.role, standby.role) == ("active", "standby")
            answer = await holder_client.post("/halt", json={"reason": "before it died"})
            assert answer.status_code == 200, answer.text
            dead = await killed(holder, shared_lease)
            refused = await client.post("/resume", json={"reason": "holder killed"})
            assert refused.status_code == 409, refused.text
            detail = refused.json()["detail"]
            assert "give it there" not in detail, detail
            assert f"its lease's holder ({dead}) has not renewed it for" in detail, detail
            assert_runs_out_soon(detail)
            assert "give it to the replica that holds trading then" in detail, detail
            assert "pumpflow trading state" in detail, detail
            assert await ledger.control() == (TradingState.HALTED, "before it died")

            await eventually(lambda: standby.role == "active", 20.0, what="the take-over")
            assert halted(standby, "before it died")
            resumed = await client.post("/resume", json={"reason": "holder killed"})
            assert resumed.status_code == 200, resumed.text
            assert standby.risk.operator_state is TradingState.ACTIVE
            assert await ledger.control() == (TradingState.ACTIVE, "holder killed")
            assert tracebacks(caplog) == []


async def test_the_stand_by_says_the_operators_state_the_ledger_holds_not_its_own(
    clock, market, pg_pool, shared_lease
):
    """An operator's /state may reach a stand-by (a load balancer routes to any replica):
    its own risk state is no one's in force, as it trades nothing. It says what the ledger
    holds, the operator's state, and names the holder, as its /pnl and /limits do; the
    state in force and what else sets it (the breakers, the daily loss limit) are the
    holder's alone, unknown there."""
    ledger = PostgresLedger(pg_pool)
    holder, standby = trading(ledger), trading(ledger)
    async with running(clock, holder) as (_, _, holder_client):
        async with running(clock, standby) as (_, _, client):
            assert (holder.role, standby.role) == ("active", "standby")
            view = (await client.get("/state")).json()
            assert (view["operator_state"], view["operator_reason"]) == ("active", ""), view
            answer = await holder_client.post("/halt", json={"reason": "from the holder"})
            assert answer.status_code == 200, answer.text

            view = (await client.get("/state")).json()
            said = (view["role"], view["source"], view["holder"])
            assert said == ("standby", "ledger", holder.leader.holder), view
            said = (view["operator_state"], view["operator_reason"])
            assert said == ("halted", "from the holder"), view
            assert view["operator_state_stored"] is True, view
            for unknown in ("state", "reason", "daily_loss_limit_hit", "breakers"):
                assert view[unknown] is None, (unknown, view)
            # what it would say of itself: nothing of the halt
            assert standby.risk.state is TradingState.ACTIVE
            view = (await holder_client.get("/state")).json()
            assert (view["role"], view["source"], view["state"]) == ("active", "book", "halted")


async def test_a_live_stand_by_counts_the_entries_in_flight_at_the_most_they_can_spend(
    clock, market, pg_pool, shared_lease
):
    """A live entry in flight reserves the most its order can spend (its SOL with the
    slippage and the fees on top, the priority fee): the stand-by's /limits and /pnl,
    measured on the ledger, count it so too, and say the exposure the holder's do."""
    ledger = PostgresLedger(pg_pool)
    async with fake_trade_api("silent") as api:
        live = live_settings(api)
        holder, standby = trading(ledger, **live), trading(ledger, **live)
        async with running(clock, holder) as (bus, watch, holder_client):
            async with running(clock, standby) as (_, _, client):
                assert (holder.role, standby.role) == ("active", "standby")
                mint = await ready(bus, market)
                await publish(bus, market.prediction(mint))
                [request] = watch.payloads("order.requested")
                most = holder.risk.entry_spend.most(request.sol_amount)
                assert most > request.sol_amount * 1.07
                for path in ("/limits", "/pnl"):
                    held = (await holder_client.get(path)).json()
                    stood = (await client.get(path)).json()
                    assert (held["source"], stood["source"]) == ("book", "ledger")
                    assert held["exposure_sol"] == pytest.approx(most, rel=1e-12), path
                    assert stood["exposure_sol"] == pytest.approx(most, rel=1e-12), path


async def test_a_stand_by_says_the_pnl_in_full_when_nothing_is_open(
    clock, market, pg_pool, shared_lease
):
    """With no position open there is nothing to mark: the stand-by's /pnl says the
    unrealised PnL (none) and the whole PnL the holder's does; with one open, the marks
    are the holder's alone and it says it does not know them."""
    ledger = PostgresLedger(pg_pool)
    holder, standby = trading(ledger), trading(ledger)
    async with running(clock, holder) as (bus, watch, holder_client):
        async with running(clock, standby) as (_, _, client):
            assert (holder.role, standby.role) == ("active", "standby")
            held = (await holder_client.get("/pnl")).json()
            stood = (await client.get("/pnl")).json()
            assert (held["open_positions"], stood["open_positions"]) == (0, 0)
            for name in ("unrealized_pnl_sol", "pnl_sol"):
                assert stood[name] == held[name] == 0.0, (name, stood)

            mint = await ready(bus, market)
            await publish(bus, market.prediction(mint))
            await clock.advance(holder.settings.trading_tick_s)
            await eventually(lambda: watch.count("position.opened") == 1,
                             what="the position opened")  # fmt: skip
            stood = (await client.get("/pnl")).json()
            assert stood["open_positions"] == 1, stood
            assert stood["unrealized_pnl_sol"] is None and stood["pnl_sol"] is None, stood


async def test_limits_show_the_entry_spend_the_reservations_and_the_limits_a_late_fill_exceeds(
    clock, market, pg_pool, shared_lease
):
    """``/limits`` says what a live entry is checked and reserved at (the entry spend),
    the reservations in flight at that most, and every limit exceeded now with its value
    and excess: a token entered again after its order was given up, then that order's
    trade showing after all, holds twice its limit. The stand-by, measuring on the
    ledger, says what the holder says."""
    ledger = PostgresLedger(pg_pool)
    async with fake_trade_api("silent") as api:
        live = live_settings(
            api,
            trading_live_confirm_s=CONFIRM_S,
            trading_live_answer_timeout_s=0.3,
            trading_capital_sol=5.0,
            trading_max_risk_per_trade=0.05,
            # the confirmation wait passes with no event: a quiet test, not a silent feed
            trading_max_silence_s=2 * CONFIRM_S,
        )
        holder, standby = trading(ledger, **live), trading(ledger, **live)
        async with running(clock, holder) as (bus, watch, holder_client):
            async with running(clock, standby) as (_, _, client):
                assert (holder.role, standby.role) == ("active", "standby")
                spend = holder.risk.entry_spend
                mint = await ready(bus, market)
                await publish(bus, market.prediction(mint, score=1.0))
                [given_up] = watch.payloads("order.requested")
                await answered(holder, api)
                await clock.advance(CONFIRM_S + 1)
                [refused] = watch.payloads("order.rejected")
                assert refused.order_id == given_up.order_id

                api.behaviour = "success"
                await publish(bus, market.prediction(mint, score=1.0))
                await answered(holder, api, 2)
                for call in api.requests:
                    trade = market.tokens.buy(
                        mint, WALLET, sol=call.body["amount"], signature=call.signature
                    )
                    await publish(bus, trade)
                await eventually(lambda: len(watch.payloads("order.filled")) == 2)
                api.behaviour = "silent"
                other = await ready(bus, market)
                await publish(bus, market.prediction(other, score=1.0))
                [in_flight] = [r for r in watch.payloads("order.requested") if r.mint == other]

                cap = 5.0 * holder.risk.limits.max_token_exposure_fraction
                exposure = holder.book.exposure(mint)
                assert exposure > cap
                views = [(await c.get("/limits")).json() for c in (holder_client, client)]
                for view, source in zip(views, ("book", "ledger"), strict=True):
                    assert view["source"] == source, view
                    assert view["entry_spend"] == {
                        "factor": spend.factor,
                        "fixed_sol": spend.fixed_sol,
                    }
                    [reserved] = view["reservations"]
                    assert (reserved["order_id"], reserved["mint"]) == (in_flight.order_id, other)
                    most = spend.most(in_flight.sol_amount)
                    assert reserved["most_sol"] == pytest.approx(most, rel=1e-12)
                    [exceeded] = view["exceeded"]
                    assert (exceeded["limit"], exceeded["mint"]) == ("token_exposure", mint)
                    assert exceeded["value"] == pytest.approx(exposure, rel=1e-12)
                    assert exceeded["cap"] == pytest.approx(cap)
                    assert exceeded["excess"] == pytest.approx(exposure - cap, rel=1e-9)
                    assert f"the exposure of {mint}" in exceeded["text"]
                assert views[0]["exceeded"] == views[1]["exceeded"]


class AwayForCommits(PostgresLedger):
    """A ledger that stores no change while ``away`` (Postgres away for the commits of
    the replica it is given to)."""

    away = False

    async def commit(self, change: LedgerChange):
        if self.away and change:
            raise ConnectionError("the ledger is away")
        return await super().commit(change)


async def test_a_halt_the_holder_reads_from_the_ledger_refuses_its_waiting_entries_first(
    clock, market, pg_pool, shared_lease, caplog
):
    """What the holder decided waits for the ledger (the commit failed) as a halt given
    to the stand-by is stored. The holder's round applies the halt as one given to it,
    before it stores and sends what waited: a waiting entry is refused, never sent (the
    same line, count and announcement as a halt given to it), a waiting sale is sent."""
    away = AwayForCommits(pg_pool)
    holder, standby = trading(away), trading(PostgresLedger(pg_pool))
    tick = holder.settings.trading_tick_s
    async with running(clock, holder) as (bus, watch, _):
        async with running(clock, standby) as (_, _, client):
            assert (holder.role, standby.role) == ("active", "standby")

            def sent(side: str) -> list[str]:
                return [r.order_id for r in watch.payloads("order.requested") if r.side == side]

            held = await ready(bus, market)
            await publish(bus, market.prediction(held))
            await clock.advance(tick)
            await eventually(lambda: watch.count("position.opened") == 1,
                             what="the position opened")  # fmt: skip
            [opened] = watch.payloads("position.opened")

            # a sale waits for the ledger as the stand-by's halt is stored
            sale = ExitOrder(
                order_id=f"{opened.position_id}:exit:1",
                mint=held,
                position_id=opened.position_id,
                token_amount=opened.token_amount,
            )
            away.away = True
            with pytest.raises(ConnectionError):
                await holder.on_events([make_event(sale, source="exit/t", time=clock.now())])
            answer = await client.post("/halt", json={"reason": "first halt"})
            assert answer.status_code == 200 and answer.json()["stored"] is True, answer.text
            away.away = False
            await clock.advance(tick)
            await eventually(lambda: halted(holder, "first halt") and sent("sell") != [],
                             what="the holder halted on its round")  # fmt: skip
            assert sent("sell") == [sale.order_id]

            # resumed, an entry waits for the ledger as the stand-by's next halt is stored
            await holder.resume("resumed")
            entered = await ready(bus, market)
            [entry] = sent("buy")
            away.away = True
            with pytest.raises(ConnectionError):
                await holder.on_events([market.prediction(entered)])
            assert len(holder.risk.reservations) == 1
            answer = await client.post("/halt", json={"reason": "second halt"})
            assert answer.status_code == 200 and answer.json()["stored"] is True, answer.text
            away.away = False
            refused_before = holder.metrics.orders("buy", "rejected")
            caplog.clear()
            await clock.advance(tick)

            async def stored_refused() -> bool:
                orders = await away.orders(limit=10)
                return any(o["mint"] == entered and o["state"] != "pending" for o in orders)

            await eventually(stored_refused, what="the waiting entry stored")
            [order] = [o for o in await away.orders(limit=10) if o["mint"] == entered]
            assert order["state"] == "rejected", order
            assert order["outcome"] == "halted before it was sent: second halt", order
            assert halted(holder, "second halt")
            assert sent("buy") == [entry]
            assert holder.risk.reservations == {}
            assert holder.executor.due(clock.now() + 3600.0) == []
            assert holder.metrics.orders("buy", "rejected") == refused_before + 1
            said = [r.getMessage() for r in caplog.records]
            assert "trading: 1 entries decided before the halt and not sent yet are refused" in said
            assert [(s.state, s.reason) for s in watch.payloads("trading.state")] == [
                ("halted", "first halt"),
                ("active", "resumed"),
                ("halted", "second halt"),
            ]
            assert tracebacks(caplog) == []


async def test_a_halt_given_to_the_replica_taken_over_from_reaches_the_new_holder(
    clock, market, pg_pool, shared_lease, caplog
):
    """The replica trading loses it to another (its lease ran out, say) before its
    renewal could tell it; the halt given to it meets the take-over: applied there
    (of no use now), it is stored for the new holder, which halts on its next round."""
    ledger = PostgresLedger(pg_pool)
    # campaigned for every second
    first, second = (trading(ledger, trading_lease_ttl_s=3.0) for _ in range(2))
    async with running(clock, first) as (_, _, client):
        async with running(clock, second) as (bus, watch, _):
            assert (first.role, second.role) == ("active", "standby")
            shared_lease.unaware.add(first.leader.holder.encode())
            await shared_lease.delete_many([LEASE_PREFIX + LEASE_NAME])  # it ran out
            await eventually(lambda: second.role == "active", 10.0, what="the take-over")
            assert first.role == "active"  # not told yet
            mint = await ready(bus, market)
            caplog.clear()
            answer = await client.post("/halt", json={"reason": "to the old holder"})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["stored"] is True, body
            named = f"the replica trading ({second.leader.holder}) applies it on its next round"
            assert named in body["detail"], body
            await eventually(lambda: first.role == "standby", 10.0, what="standing by")
            assert len(halts_stored(caplog)) == 1 and tracebacks(caplog) == []

            await clock.advance(second.settings.trading_tick_s)
            await eventually(lambda: halted(second, "to the old holder"),
                             what="the new holder halted on its round")  # fmt: skip
            await publish(bus, market.prediction(mint))
            assert watch.count("order.requested") == 0


class AwayForControl(PostgresLedger):
    """A ledger that takes no operator's state while ``away`` (Postgres away for the
    replica it is given to)."""

    away = True

    async def set_control(self, state, reason, **stored) -> None:
        if self.away:
            raise ConnectionError("the ledger is away")
        await super().set_control(state, reason, **stored)


async def test_a_halt_given_to_a_stand_by_cut_off_from_postgres_says_it_is_not_stored(
    clock, market, pg_pool, shared_lease
):
    """No false reassurance: the stand-by cannot store the halt, so the answer says it
    is not stored and that the replica trading (named) does not know of it; it is
    retried, and once stored the holder halts on its next round."""
    away = AwayForControl(pg_pool)
    holder, standby = trading(PostgresLedger(pg_pool)), trading(away, **QUICK_ANSWER)
    async with running(clock, holder):
        async with running(clock, standby) as (_, _, client):
            assert (holder.role, standby.role) == ("active", "standby")
            answer = await client.post("/halt", json={"reason": "cut off"})
            assert answer.status_code == 202, answer.text
            body = answer.json()
            assert body["role"] == "standby" and body["stored"] is False, body
            detail = body["detail"]
            assert detail.startswith("not applied here: this replica stands by; NOT stored yet")
            named = f"until then the replica trading ({holder.leader.holder}) does not know of it"
            assert named in detail, detail
            assert "halt it there" in detail, detail
            assert standby.state_view()["operator_state_stored"] is False
            await clock.advance(holder.settings.trading_tick_s)
            assert holder.risk.operator_state is TradingState.ACTIVE

            away.away = False
            await eventually(lambda: standby.state_view()["operator_state_stored"],
                             what="the halt stored once the ledger is back")  # fmt: skip
            await clock.advance(holder.settings.trading_tick_s)
            await eventually(lambda: halted(holder, "cut off"), what="the holder halted")


class GatedLedger(MemoryLedger):
    """The in-memory ledger, holding the calls named in :meth:`hold` until released:
    ``control`` and ``load`` once they have read, ``set_control`` before it writes (a
    read served before a write it overtook, the write's answer late)."""

    def __init__(self) -> None:
        super().__init__()
        self._gates: dict[str, tuple[asyncio.Event, asyncio.Event]] = {}

    def hold(self, name: str) -> None:
        self._gates[name] = (asyncio.Event(), asyncio.Event())

    async def reached(self, name: str) -> None:
        await asyncio.wait_for(self._gates[name][0].wait(), 10.0)

    def release(self, name: str) -> None:
        self._gates.pop(name)[1].set()

    async def _gate(self, name: str) -> None:
        gate = self._gates.get(name)
        if gate is not None:
            gate[0].set()
            await gate[1].wait()

    async def control(self):
        read = await super().control()
        await self._gate("control")
        return read

    async def load(self, **kwargs):
        snapshot = await super().load(**kwargs)
        await self._gate("load")
        return snapshot

    async def predecessor(self):
        await self._gate("predecessor")
        return await super().predecessor()

    async def set_control(self, state, reason, **stored) -> None:
        await self._gate("set_control")
        await super().set_control(state, reason, **stored)


async def test_a_round_reading_the_ledger_before_the_halt_was_stored_does_not_undo_it(
    clock, market
):
    """The halt given to the replica trading applies at once; its store is under way as
    a timed round reads the ledger's state (active, from before the halt), and is done
    before the round applies what it read. That read is older than the halt: the round
    must not resume trading, not even until the next round."""
    ledger = GatedLedger()
    service = trading(ledger)
    async with running(clock, service) as (bus, watch, _):
        await service.resume("resumed")
        assert await ledger.control() == (TradingState.ACTIVE, "resumed")
        ledger.hold("set_control")
        halting = asyncio.create_task(service.halt("operator"))
        await ledger.reached("set_control")
        assert halted(service, "operator")

        ledger.hold("control")
        ticking = asyncio.create_task(clock.advance(service.settings.trading_tick_s))
        await ledger.reached("control")  # read: active, the halt not stored yet
        ledger.release("set_control")
        await eventually(lambda: service.state_view()["operator_state_stored"],
                         what="the halt stored")  # fmt: skip
        ledger.release("control")
        await asyncio.wait_for(ticking, 10.0)
        await asyncio.wait_for(halting, 10.0)

        assert halted(service, "operator")
        assert [s.state for s in watch.payloads("trading.state")] == ["halted"]
        mint = await ready(bus, market)
        await publish(bus, market.prediction(mint))
        assert watch.count("order.requested") == 0


async def test_a_halt_stored_while_the_take_over_reads_the_ledger_applies_as_it_starts(
    clock, market
):
    """The halt is given to a replica taking over (elected, not trading yet) before it
    reads the ledger; its store is under way as the ledger is read (active, from before
    the halt), and done before the take-over applies what it read. The replica must
    start halted, as the answer said, not trade until its next round."""
    ledger = GatedLedger()
    await ledger.set_control(TradingState.ACTIVE, "resumed")
    service = trading(ledger)
    for name in ("predecessor", "load", "set_control"):
        ledger.hold(name)
    started, done = asyncio.Event(), asyncio.Event()

    async def run() -> None:
        async with running(clock, service) as (bus, watch, _):
            started.set()
            await done.wait()
            mint = await ready(bus, market)
            await publish(bus, market.prediction(mint))
            assert watch.count("order.requested") == 0

    runs = asyncio.create_task(run())
    try:
        await ledger.reached("predecessor")  # taking over
        halting = asyncio.create_task(service.halt("operator"))
        await ledger.reached("set_control")
        ledger.release("predecessor")
        await ledger.reached("load")  # read: active, the halt not stored yet
        ledger.release("set_control")
        await eventually(lambda: service.state_view()["operator_state_stored"],
                         what="the halt stored")  # fmt: skip
        ledger.release("load")
        await asyncio.wait_for(started.wait(), 10.0)
        await asyncio.wait_for(halting, 10.0)
        assert service.role == "active"
        assert halted(service, "operator")
    finally:
        done.set()
    await asyncio.wait_for(runs, 10.0)


class GatedUnbooked(GatedLedger):
    """The gated ledger, holding its read of the unbooked trades too: the take-over's
    last read, after it has applied the operator's state it read."""

    async def unbooked(self, **kwargs):
        await self._gate("unbooked")
        return await super().unbooked(**kwargs)


async def test_a_halt_given_after_the_take_over_read_the_ledger_applies_as_it_starts(clock, market):
    """The halt is given to a replica taking over once it has read the ledger and applied
    the operator's state there (active), while it reads the rest. The answer says the
    take-over applies it as it starts: the replica must start halted, not trade until its
    next round."""
    ledger = GatedUnbooked()
    await ledger.set_control(TradingState.ACTIVE, "resumed")
    service = trading(ledger)
    ledger.hold("unbooked")
    started, done = asyncio.Event(), asyncio.Event()

    async def run() -> None:
        async with running(clock, service) as (bus, watch, _):
            started.set()
            await done.wait()
            mint = await ready(bus, market)
            await publish(bus, market.prediction(mint))
            assert watch.count("order.requested") == 0

    runs = asyncio.create_task(run())
    try:
        await ledger.reached("unbooked")  # the operator's state read and applied
        view = await service.halt("operator")
        assert view["stored"] is True, view
        assert "applies it as it starts" in view["detail"], view
        assert await ledger.control() == (TradingState.HALTED, "operator")
        ledger.release("unbooked")
        await asyncio.wait_for(started.wait(), 10.0)
        assert service.role == "active"
        assert halted(service, "operator")
    finally:
        done.set()
    await asyncio.wait_for(runs, 10.0)
