"""Two activity replicas share one store and one bus; the balancer moves partitions.

Over the in-memory bus with a ReplayClock (heartbeats, TTLs and lifecycle timers all
run on it), so every hand-over happens at a known time: the timers of a token run on
its owner only, each lifecycle transition and each unsubscribe is published once, and
a token's lifecycle seq runs on across the move.
"""

from __future__ import annotations

from collections import Counter

import pytest

from pumpflow.activity.service import INDEX_PREFIX, ActivityService
from pumpflow.activity.settings import ActivitySettings
from pumpflow.common.bus import Subscription, partition_of
from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.bus.ownership import BalancedBus, OwnershipConfig
from pumpflow.common.events import Event
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state.memory import MemoryStateStore

START = 1_700_000_000.0
PARTITIONS = 4
BEAT = OwnershipConfig(heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0)
MINTS = [f"mint{i}" for i in range(12)]


class Cluster:
    def __init__(self, clock, tokens, namespace):
        self.clock = clock
        self.tokens = tokens
        self.namespace = namespace
        self.bus = InMemoryBus(partitions=PARTITIONS, synchronous=True, source="test")
        self.store = MemoryStateStore(clock)
        self.replicas: dict[str, tuple[ActivityService, BalancedBus]] = {}
        self.lifecycle: list[Event] = []
        self.commands: list[Event] = []

    async def start(self) -> None:
        await self.bus.start()

        async def collect(event: Event) -> None:
            (self.lifecycle if event.type == "token.lifecycle" else self.commands).append(event)

        await self.bus.subscribe(
            Subscription(
                service="probe", patterns=("token.lifecycle", "feed.subscription"),
                handler=collect,
            )
        )  # fmt: skip

    async def replica(self, name: str) -> ActivityService:
        settings = ActivitySettings.load(
            transport="memory", partitions=PARTITIONS, namespace=self.namespace, replica=name,
            activity_subscription_batch_s=3600, activity_checkpoint_interval_s=3600,
        )  # fmt: skip
        bus = BalancedBus(self.bus, store=self.store, clock=self.clock, replica=name, config=BEAT)
        svc = ActivityService(settings)
        ctx = ServiceContext(settings=settings, bus=bus, clock=self.clock, store=self.store)
        await svc.start(ctx)
        self.replicas[name] = (svc, bus)
        return svc

    async def leave(self, name: str) -> None:
        """A clean stop: hand every partition back, then go."""
        svc, bus = self.replicas.pop(name)
        await bus.balancer("activity").stop(leave=True)
        await self.bus.unsubscribe(bus._balanced[0][1])
        await svc.stop()

    def owned(self, name: str) -> set[int]:
        return set(self.replicas[name][1].balancer("activity").owned)

    async def at(self, offset: float) -> None:
        await self.clock.advance_to(START + offset)
        for svc, _ in self.replicas.values():
            await svc.pool.join(5)

    async def flush_commands(self) -> None:
        for svc, _ in self.replicas.values():
            await svc.flush_subscriptions()

    def transitions(self, mint: str) -> list[tuple[str, str]]:
        return [
            (e.data.state, e.source) for e in self.lifecycle
            if e.key == mint and e.data.state != e.data.previous_state
        ]  # fmt: skip

    def assert_once_and_in_seq(self) -> None:
        for mint in MINTS:
            # a transition published twice would break the chain of states
            moves = [
                (e.data.previous_state, e.data.state) for e in self.lifecycle
                if e.key == mint and e.data.state != e.data.previous_state
            ]  # fmt: skip
            assert [p for p, _ in moves] == [None, *(s for _, s in moves[:-1])], (mint, moves)
            seqs = [e.seq for e in self.lifecycle if e.key == mint]
            assert seqs == list(range(1, len(seqs) + 1)), (mint, seqs)
        unsubscribed = Counter(
            m for c in self.commands if c.data.action == "unsubscribe" for m in c.data.mints
        )
        assert [m for m, n in unsubscribed.items() if n > 1] == []


@pytest.fixture
async def cluster(clock, tokens, namespace):
    c = Cluster(clock, tokens, namespace)
    await c.start()
    yield c
    for name in list(c.replicas):
        await c.leave(name)
    await c.bus.close()


async def trade_all(c: Cluster, start: float, end: float, mints) -> None:
    t, i = start, 0
    while t <= end:
        await c.at(t)
        for mint in mints:
            await c.bus.publish(c.tokens.trade(mint, f"w{i % 30}", buy=i % 4 != 3))
        t += 2.0
        i += 1


async def test_moved_partitions_fire_timers_on_their_owner_only(cluster):
    c = cluster
    a = await c.replica("a")
    assert c.owned("a") == set(range(PARTITIONS)) and a.owned == c.owned("a")
    for mint in MINTS:
        await c.bus.publish(c.tokens.created(mint))
    active = MINTS[:8]
    await trade_all(c, 1, 30, active)
    assert all(a.analyzer.get_token_lifecycle_state(m) == "active" for m in active)

    # b joins: a hands half the partitions over at its next heartbeat, b claims them
    b = await c.replica("b")
    assert c.owned("b") == set()  # a still holds every partition
    await c.at(33)
    assert c.owned("a") | c.owned("b") == set(range(PARTITIONS))
    assert c.owned("a") and c.owned("b") and not c.owned("a") & c.owned("b")
    moved = [m for m in MINTS if partition_of(m, PARTITIONS) in c.owned("b")]
    kept = [m for m in MINTS if m not in moved]
    assert moved and kept
    # the moved tokens live on b only, state and seq included
    assert all(a.analyzer.get_token_lifecycle_state(m) is None for m in moved)
    assert all(a.activity_metrics.last_seq(m) == 0 for m in moved)
    for m in moved:
        assert b.analyzer.get_token_lifecycle_state(m) == (
            "active" if m in active else "new"
        )
        assert b.sequencer.last(m) == len([e for e in c.lifecycle if e.key == m])
    assert {m for m in kept if a.analyzer.is_live(m)} == set(kept)

    # the market goes quiet: declines and retirements, each from the token's owner
    mark = len(c.lifecycle)
    await trade_all(c, 34, 40, active)
    for t in range(45, 400, 5):
        await c.at(t)
    for mint in MINTS:
        owner = "b" if mint in moved else "a"
        expected = ["new", "active", "declining", "inactive"] if mint in active else [
            "new", "inactive"
        ]
        assert [s for s, _ in c.transitions(mint)] == expected, mint
        late = [e.source for e in c.lifecycle[mark:] if e.key == mint]
        assert late and set(late) == {f"activity/{owner}"}, (mint, late)
    await c.flush_commands()
    c.assert_once_and_in_seq()
    assert {m for cmd in c.commands for m in cmd.data.mints} == set(MINTS)


async def test_a_leaving_replica_hands_its_tokens_over_mid_lifecycle(cluster):
    c = cluster
    a = await c.replica("a")
    b = await c.replica("b")
    await c.at(2)
    assert c.owned("a") and c.owned("b")
    for mint in MINTS:
        await c.bus.publish(c.tokens.created(mint))
    active = MINTS[::2]
    await trade_all(c, 3, 40, active)
    await c.at(110)  # the active ones decline (60 s quiet), on their owners
    assert all(c.transitions(m)[-1][0] == "declining" for m in active)
    from_a = [m for m in MINTS if partition_of(m, PARTITIONS) in c.owned("a")]
    assert from_a

    await c.leave("a")  # checkpoints with the lifecycle seq, then its heartbeat goes
    assert a.analyzer.live_count == 0 and a.activity_metrics.tracked == 0
    stored = await c.store.hgetall(f"{INDEX_PREFIX}{partition_of(from_a[0], PARTITIONS)}")
    assert from_a[0] in stored
    await c.at(112)  # b's next heartbeat sees a gone and claims its partitions at once
    assert c.owned("b") == set(range(PARTITIONS))
    assert all(b.analyzer.get_token_lifecycle_state(m) is not None for m in MINTS)

    # a trade on a taken-over token: b goes on from a's seq; then everything retires
    revived = next(m for m in from_a if m in active)
    await trade_all(c, 113, 130, [revived])
    for t in range(135, 500, 5):
        await c.at(t)
    for mint in MINTS:
        states = [s for s, _ in c.transitions(mint)]
        assert states[-1] == "inactive", (mint, states)
        if mint in from_a:
            after = {src for s, src in c.transitions(mint) if s == "inactive"}
            assert after == {"activity/b"}
    assert [s for s, _ in c.transitions(revived)] == [
        "new", "active", "declining", "active", "declining", "inactive"
    ]
    await c.flush_commands()
    c.assert_once_and_in_seq()
    assert {m for cmd in c.commands for m in cmd.data.mints} == set(MINTS)
