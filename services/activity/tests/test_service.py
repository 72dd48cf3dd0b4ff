"""ActivityService over the in-memory bus: lifecycle events, feed commands, checkpoints, HTTP."""

from __future__ import annotations

import httpx
import msgspec
import pytest

from pumpflow.activity.service import KEY_PREFIX, ActivityService, Checkpoint
from pumpflow.activity.settings import ActivitySettings
from pumpflow.common.bus import Subscription
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.events import Event
from pumpflow.common.runtime.http import create_app
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state.memory import MemoryStateStore

START = 1_700_000_000.0  # the clock fixture's start


class System:
    def __init__(self, clock, tokens, namespace):
        self.clock = clock
        self.tokens = tokens
        self.bus = InMemoryBus(partitions=4, synchronous=True, source="test")
        self.store = MemoryStateStore(clock)
        self.namespace = namespace
        self.lifecycle: list[Event] = []
        self.commands: list[Event] = []

    async def start(self) -> None:
        await self.bus.start()

        async def collect(event: Event) -> None:
            (self.lifecycle if event.type == "token.lifecycle" else self.commands).append(event)

        await self.bus.subscribe(
            Subscription(
                service="probe", patterns=("token.lifecycle", "feed.subscription"), handler=collect
            )
        )

    async def service(self) -> ActivityService:
        settings = ActivitySettings.load(
            transport="memory", partitions=4, namespace=self.namespace,
            # flushed by the tests, so the outcome does not depend on wall time
            activity_subscription_batch_s=3600, activity_checkpoint_interval_s=3600,
        )
        svc = ActivityService(settings)
        ctx = ServiceContext(settings=settings, bus=self.bus, clock=self.clock, store=self.store)
        await svc.start(ctx)
        self.ctx = ctx
        return svc

    async def at(self, svc: ActivityService, offset: float) -> None:
        await self.clock.advance_to(START + offset)
        await svc.pool.join(5)

    async def send(self, event: Event) -> None:
        await self.bus.publish(event)

    def states(self, mint: str) -> list[str]:
        return [
            e.data.state for e in self.lifecycle
            if e.key == mint and e.data.state != e.data.previous_state
        ]


@pytest.fixture
async def system(clock, tokens, namespace):
    s = System(clock, tokens, namespace)
    await s.start()
    yield s
    await s.bus.close()


async def pump(s: System, svc, mint: str, start: float, end: float, step: float = 2.0):
    t, i = start, 0
    while t <= end:
        await s.at(svc, t)
        await s.send(s.tokens.trade(mint, f"w{i % 30}", buy=i % 4 != 3))
        t += step
        i += 1


async def test_lifecycle_events_and_batched_unsubscribes(system):
    s, tk = system, system.tokens
    svc = await s.service()
    for mint in ("A", "B", "C"):
        await s.send(tk.created(mint))
    await pump(s, svc, "A", 1, 90)
    for i in range(40):
        await s.at(svc, 1 + i)
        await s.send(tk.trade("C", f"g{i}", sol=1.0))
    await s.at(svc, 61)
    await s.send(tk.migrated("C"))
    for t in range(70, 400, 10):
        await s.at(svc, t)

    assert s.states("A") == ["new", "active", "declining", "inactive"]
    assert s.states("B") == ["new", "inactive"]
    assert s.states("C") == ["new", "active", "graduated"]
    by_state = {(e.key, e.data.state): e for e in s.lifecycle}
    assert by_state[("A", "declining")].time == pytest.approx(START + 89 + 60)
    assert by_state[("A", "inactive")].time == pytest.approx(START + 89 + 180)
    assert by_state[("B", "inactive")].time == pytest.approx(START + 180)
    assert by_state[("A", "active")].data.priority >= 3
    assert by_state[("A", "active")].data.activity_level > 0
    for mint in "ABC":
        seqs = [e.seq for e in s.lifecycle if e.key == mint]
        assert seqs == list(range(1, len(seqs) + 1))
        assert all(e.source.startswith("activity/") for e in s.lifecycle)
    # retired: state dropped, one batched command for the three of them
    assert svc.analyzer.live_count == 0 and svc.activity_metrics.tracked == 0
    assert s.commands == []
    assert await svc.flush_subscriptions() == 3
    assert [(c.data.action, c.data.mints) for c in s.commands] == [
        ("unsubscribe", ("B", "C", "A"))
    ]
    await svc.checkpoint()
    stored = await s.store.get_many([KEY_PREFIX + m for m in "ABC"])
    states = [msgspec.msgpack.decode(raw, type=Checkpoint).token for raw in stored]
    assert [(t.state, t.retired) for t in states] == [
        ("inactive", True), ("inactive", True), ("graduated", True)
    ]
    await svc.stop()


async def test_quiet_tokens_shed_their_window_state_and_thaw_unchanged(system):
    s, tk = system, system.tokens
    svc = await s.service()
    await s.send(tk.created("A"))
    await pump(s, svc, "A", 1, 40)
    assert svc.shed_idle() == 0  # trading: nothing to shed
    await s.at(svc, 110)  # quiet past the 60 s window, declining, not yet inactive
    assert s.states("A")[-1] == "declining"
    assert svc.shed_idle() == 1
    assert svc.activity_metrics.manager.frozen == 1
    await pump(s, svc, "A", 111, 160)
    assert svc.activity_metrics.manager.frozen == 0
    assert s.states("A") == ["new", "active", "declining", "active"]
    await svc.stop()


async def test_a_returning_token_is_resubscribed_but_a_straggler_is_not(system):
    s, tk = system, system.tokens
    svc = await s.service()
    await s.send(tk.created("A"))
    await s.send(tk.created("B"))
    await s.at(svc, 200)
    assert s.states("A") == ["new", "inactive"] and s.states("B") == ["new", "inactive"]
    await svc.flush_subscriptions()
    assert s.commands[-1].data.mints == ("A", "B")
    # A's trades keep coming through another path, at the active pace
    await pump(s, svc, "A", 210, 240)
    assert s.states("A") == ["new", "inactive", "active"]
    revived = [e for e in s.lifecycle if e.key == "A"][-1]
    assert revived.data.previous_state == "inactive" and "revived" in revived.data.reason
    # one straggler for B: no lifecycle event, retired again after the revive window
    n = len(s.lifecycle)
    await s.send(tk.trade("B", "x"))
    await s.at(svc, 320)
    assert len([e for e in s.lifecycle[n:] if e.key == "B"]) == 0
    assert svc.analyzer.get_token_lifecycle_state("B") == "inactive"
    assert not svc.analyzer.is_live("B")
    await svc.flush_subscriptions()
    assert [(c.data.action, c.data.mints) for c in s.commands[1:]] == [
        ("unsubscribe", ("B",)),
        ("subscribe", ("A",)),
    ]
    await svc.stop()


async def test_a_replacement_replica_carries_on_from_the_checkpoint(system):
    s, tk = system, system.tokens
    first = await s.service()
    await s.send(tk.created("A"))
    await pump(s, first, "A", 1, 40)
    assert s.states("A") == ["new", "active"]
    last_seq = s.lifecycle[-1].seq
    await s.bus.unsubscribe(first._subscription)
    await first.stop()

    second = await s.service()
    assert second.analyzer.get_token_lifecycle_state("A") == "active"
    assert second.activity_metrics.tracked == 1  # the rolling windows came along
    # trading goes on in the new replica, then the token goes quiet
    await pump(s, second, "A", 42, 50)
    assert second.analyzer.get_token_lifecycle_state("A") == "active"
    await s.at(second, 50 + 60)
    assert s.states("A") == ["new", "active", "declining"]
    declining = s.lifecycle[-1]
    assert declining.seq > last_seq and declining.data.previous_state == "active"
    seqs = [e.seq for e in s.lifecycle if e.key == "A"]
    assert seqs == sorted(set(seqs))  # no seq reused across the hand-over
    await second.stop()


async def test_http_routes(system):
    s, tk = system, system.tokens
    svc = await s.service()
    await s.send(tk.created("A"))
    await s.send(tk.created("B"))
    await pump(s, svc, "A", 1, 30)
    app = create_app(svc, s.ctx)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        a = (await client.get("/tokens/A")).json()
        assert a["state"] == "active" and a["priority"] >= 3 and a["metrics"]["unique_traders"] > 3
        assert (await client.get("/tokens/nope")).status_code == 404
        listing = (await client.get("/tokens", params={"state": "active"})).json()
        assert [t["mint"] for t in listing["tokens"]] == ["A"]
        both = (await client.get("/tokens")).json()
        assert [t["mint"] for t in both["tokens"]] == ["A", "B"]  # by priority
        assert (await client.get("/tokens", params={"state": "bogus"})).status_code == 422
        await s.at(svc, 400)
        gone = (await client.get("/tokens", params={"state": "inactive"})).json()
        assert sorted(t["mint"] for t in gone["tokens"]) == ["A", "B"]
        assert all(t["retired"] for t in gone["tokens"])
    status = await svc.status()
    assert status["ready"] and status["retired"] == 2 and status["pool"]["workers"] == 2
    await svc.stop()


async def test_state_is_stored_before_the_ack_and_a_redelivery_is_not_applied_twice(system):
    s, tk = system, system.tokens
    svc = await s.service()
    await s.send(tk.created("A"))
    trade = tk.trade("A", "w1")
    await s.send(trade)  # synchronous bus: returns once the handler (the ack) returned
    raw = await s.store.get(KEY_PREFIX + "A")
    stored = msgspec.msgpack.decode(raw, type=Checkpoint)
    assert stored.features_seq == trade.seq == 2 and stored.features is not None
    before = svc.activity_metrics.metrics("A")
    assert before.trades_total == 2
    await svc._handle(trade)  # the broker redelivers it (say, the ack was lost)
    assert svc.activity_metrics.metrics("A") == before
    await svc.stop()


async def test_runs_embedded_from_its_settings(clock, tokens):
    from pumpflow.common.runtime.embedded import run_embedded

    seen: list[Event] = []

    async def collect(event: Event) -> None:
        seen.append(event)

    async with run_embedded([ActivityService], clock=clock, synchronous=True) as system:
        await system.bus.subscribe(
            Subscription(service="probe", patterns=("token.lifecycle",), handler=collect)
        )
        await system.bus.publish(tokens.created("A"))
        await clock.advance(181)
        await system["activity"].pool.join(5)
        assert [e.data.state for e in seen] == ["new", "inactive"]
