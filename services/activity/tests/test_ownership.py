"""Two activity replicas share one store and one bus; the balancer moves partitions.

Over the in-memory bus with a ReplayClock (heartbeats, TTLs and lifecycle timers all
run on it), so every hand-over happens at a known time: the timers of a token run on
its owner only, each lifecycle transition and each unsubscribe is published once, and
a token's lifecycle seq runs on across the move.
"""

from __future__ import annotations

from collections import Counter

import pytest
from prometheus_client import CollectorRegistry

from pumpflow.activity.service import ActivityService
from pumpflow.common.bus import partition_of
from pumpflow.common.bus.ownership import BalancedBus, OwnershipConfig

START = 1_700_000_000.0
PARTITIONS = 4
BEAT = OwnershipConfig(heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0)
MINTS = [f"mint{i}" for i in range(12)]


class Cluster:
    """Activity replicas, each on its own BalancedBus over the stack's bus and store."""

    def __init__(self, stack):
        self.s = stack
        self.replicas: dict[str, tuple[ActivityService, BalancedBus]] = {}

    async def replica(self, name: str) -> ActivityService:
        s = self.s
        bus = BalancedBus(s.bus, store=s.store, clock=s.clock, replica=name, config=BEAT)
        svc = await s.activity(bus=bus, registry=CollectorRegistry(), replica=name)
        self.replicas[name] = (svc, bus)
        return svc

    async def leave(self, name: str) -> None:
        """A clean stop: hand every partition back, then go."""
        svc, bus = self.replicas.pop(name)
        await bus.balancer("activity").stop(leave=True)
        await svc.stop()

    def owned(self, name: str) -> set[int]:
        return set(self.replicas[name][1].balancer("activity").owned)

    async def flush_commands(self) -> None:
        for svc, _ in self.replicas.values():
            await svc.flush_subscriptions()

    def transitions(self, mint: str) -> list[tuple[str, str]]:
        return [
            (e.data.state, e.source) for e in self.s.lifecycle
            if e.key == mint and e.data.state != e.data.previous_state
        ]  # fmt: skip

    def assert_once_and_in_seq(self) -> None:
        for mint in MINTS:
            # a transition published twice would break the chain of states
            moves = [
                (e.data.previous_state, e.data.state) for e in self.s.lifecycle
                if e.key == mint and e.data.state != e.data.previous_state
            ]  # fmt: skip
            assert [p for p, _ in moves] == [None, *(s for _, s in moves[:-1])], (mint, moves)
            seqs = self.s.seqs(mint)
            assert seqs == list(range(1, len(seqs) + 1)), (mint, seqs)
        unsubscribed = Counter(
            m for c in self.s.commands if c.data.action == "unsubscribe" for m in c.data.mints
        )
        assert [m for m, n in unsubscribed.items() if n > 1] == []


@pytest.fixture
async def cluster(stack):
    c = Cluster(stack)
    yield c
    for name in list(c.replicas):
        await c.leave(name)


def state_of(svc: ActivityService, mint: str) -> str | None:
    token = svc.consumer.state(mint)
    return None if token is None else token.state


async def trade_all(c: Cluster, start: float, end: float, mints) -> None:
    await c.s.pump(mints, start, end)


async def test_moved_partitions_fire_timers_on_their_owner_only(cluster):
    c, s = cluster, cluster.s
    a = await c.replica("a")
    assert c.owned("a") == set(range(PARTITIONS)) == a.consumer.owned
    for mint in MINTS:
        await s.send(s.tokens.created(mint))
    active = MINTS[:8]
    await trade_all(c, 1, 30, active)
    assert all(state_of(a, m) == "active" for m in active)

    # b joins: a hands half the partitions over at its next heartbeat, b claims them
    b = await c.replica("b")
    assert c.owned("b") == set()  # a still holds every partition
    await s.at(33)
    assert c.owned("a") | c.owned("b") == set(range(PARTITIONS))
    assert c.owned("a") and c.owned("b") and not c.owned("a") & c.owned("b")
    moved = [m for m in MINTS if partition_of(m, PARTITIONS) in c.owned("b")]
    kept = [m for m in MINTS if m not in moved]
    assert moved and kept
    # the moved tokens live on b only
    assert all(state_of(a, m) is None for m in moved)
    for m in moved:
        assert state_of(b, m) == ("active" if m in active else "new")
    assert all(state_of(a, m) is not None for m in kept)

    # the market goes quiet: declines and retirements, each from the token's owner
    mark = len(s.lifecycle)
    await trade_all(c, 34, 40, active)
    for t in range(45, 400, 5):
        await s.at(t)
    for mint in MINTS:
        owner = "b" if mint in moved else "a"
        expected = ["new", "active", "declining", "inactive"] if mint in active else [
            "new", "inactive"
        ]  # fmt: skip
        assert [st for st, _ in c.transitions(mint)] == expected, mint
        late = [e.source for e in s.lifecycle[mark:] if e.key == mint]
        assert late and set(late) == {f"activity/{owner}"}, (mint, late)
    await c.flush_commands()
    c.assert_once_and_in_seq()
    assert {m for cmd in s.commands for m in cmd.data.mints} == set(MINTS)


async def test_a_leaving_replica_hands_its_tokens_over_mid_lifecycle(cluster):
    c, s = cluster, cluster.s
    await c.replica("a")
    b = await c.replica("b")
    await s.at(2)
    assert c.owned("a") and c.owned("b")
    for mint in MINTS:
        await s.send(s.tokens.created(mint))
    active = MINTS[::2]
    await trade_all(c, 3, 40, active)
    await s.at(110)  # the active ones decline (60 s quiet), on their owners
    assert all(c.transitions(m)[-1][0] == "declining" for m in active)
    from_a = [m for m in MINTS if partition_of(m, PARTITIONS) in c.owned("a")]
    assert from_a

    await c.leave("a")  # stores what it holds, then its heartbeat goes
    await s.at(112)  # b's next heartbeat sees a gone and claims its partitions at once
    assert c.owned("b") == set(range(PARTITIONS))
    assert all(state_of(b, m) is not None for m in MINTS)

    # a trade on a taken-over token: b goes on from a's seq; then everything retires
    revived = next(m for m in from_a if m in active)
    await trade_all(c, 113, 130, [revived])
    for t in range(135, 500, 5):
        await s.at(t)
    for mint in MINTS:
        states = [st for st, _ in c.transitions(mint)]
        assert states[-1] == "inactive", (mint, states)
        if mint in from_a:
            after = {src for st, src in c.transitions(mint) if st == "inactive"}
            assert after == {"activity/b"}
    assert [st for st, _ in c.transitions(revived)] == [
        "new", "active", "declining", "active", "declining", "inactive"
    ]  # fmt: skip
    await c.flush_commands()
    c.assert_once_and_in_seq()
    assert {m for cmd in s.commands for m in cmd.data.mints} == set(MINTS)


async def test_the_counts_by_state_hold_only_the_tokens_of_the_partitions_owned(cluster):
    """The gauge's count taken while partitions are being handed over (revoked, their
    tokens still in memory until stored) leaves them out, and stays right after."""
    c, s = cluster, cluster.s
    a = await c.replica("a")
    for mint in MINTS:
        await s.send(s.tokens.created(mint))
    await trade_all(c, 1, 30, MINTS[:8])
    assert sum(a.counts().values()) == len(MINTS)

    handing_over = a.consumer._hand_over
    during: list[dict[str, int]] = []

    async def hand_over(entries):
        if entries:
            # the batch timer's count, taken while the revoked keys are still held
            during.append(a.counts())
            # a fire queued before the revoke runs meanwhile and counts its token
            a._counted(entries[0].key, "declining")
        await handing_over(entries)

    a.consumer._hand_over = hand_over
    await c.replica("b")
    await s.at(33)
    assert c.owned("a") and c.owned("b")
    kept = [m for m in MINTS if partition_of(m, PARTITIONS) in c.owned("a")]
    assert during and sum(during[0].values()) == len(kept)
    assert a.counts() == a.recount()
    assert sum(a.counts().values()) == len(kept)
