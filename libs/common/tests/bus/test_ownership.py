"""Partition ownership: rendezvous assignment, heartbeats, balanced replicas.

Pure assignment and the registry run in memory; moving partitions runs on both
transports; replicas sharing partitions run on the memory bus with a ReplayClock (the
clock drives heartbeats and TTLs) and on the real broker and Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from statistics import mean

import pytest
from prometheus_client import REGISTRY

from pumpflow.common.bus import InMemoryBus, Sequencer, Subscription, partition_of
from pumpflow.common.bus.ownership import (
    BalancedBus,
    OwnershipConfig,
    ReplicaIdInUse,
    ReplicaRegistry,
    assign_partitions,
    balanced,
    owned_partitions,
    partition_weight,
)
from pumpflow.common.clock import ReplayClock, WallClock
from pumpflow.common.events import Event, FeedSubscription, make_event
from pumpflow.common.state.abc import StateStore
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.testing import eventually

from .test_contract import Recorder, shutdown_event, trade, trade_event

# ---------------------------------------------------------------------- assignment


def test_weights_are_stable_across_processes():
    # fixed values: a change of hash (or Python's salted hash()) would move every partition
    assert partition_weight("features-a", 0) == 0x5224C738F57CEF3F
    assert partition_weight("features-a", 7) == 0x0183824A8DA13FB8
    assert assign_partitions(16, ["features-a", "features-b"]) == {
        "features-a": (1, 6, 7, 10, 11, 12, 13, 14),
        "features-b": (0, 2, 3, 4, 5, 8, 9, 15),
    }


def test_assignment_is_disjoint_covering_and_balanced():
    for partitions, count in itertools.product((1, 4, 16, 17, 64), (1, 2, 3, 5, 16, 20)):
        replicas = [f"host{i}-{count}" for i in range(count)]
        owned = assign_partitions(partitions, replicas)
        assert set(owned) == set(replicas)
        every = [p for ps in owned.values() for p in ps]
        assert sorted(every) == list(range(partitions))  # disjoint and covering
        sizes = [len(ps) for ps in owned.values()]
        assert max(sizes) - min(sizes) <= 1
        assert all(list(ps) == sorted(ps) for ps in owned.values())


def test_assignment_depends_only_on_the_set_of_replicas():
    replicas = ["a", "b", "c", "d"]
    expected = assign_partitions(16, replicas)
    for order in itertools.permutations(replicas):
        assert assign_partitions(16, [*order, order[0]]) == expected
    assert owned_partitions(16, ["b", "c", "d"], "a") == expected["a"]
    assert assign_partitions(16, []) == {}


@pytest.mark.parametrize("before", [1, 2, 3, 4])
def test_a_joining_replica_moves_about_its_share(before):
    partitions, trials = 64, 200
    moved, to_newcomer = [], []
    for trial in range(trials):
        replicas = [f"svc-{trial}-{i}" for i in range(before)]
        old = assign_partitions(partitions, replicas)
        new = assign_partitions(partitions, [*replicas, f"svc-{trial}-new"])
        owner_old = {p: r for r, ps in old.items() for p in ps}
        owner_new = {p: r for r, ps in new.items() for p in ps}
        changed = [p for p in range(partitions) if owner_old[p] != owner_new[p]]
        moved.append(len(changed) / partitions)
        to_newcomer.append(sum(owner_new[p] == f"svc-{trial}-new" for p in changed) / len(changed))
    share = 1 / (before + 1)
    # the newcomer's share must move; balancing the load costs a little more at most
    assert share <= mean(moved) <= share * 1.25
    # nearly every partition that moves goes to the newcomer
    assert mean(to_newcomer) >= 0.8


def test_a_leaving_replica_hands_over_about_its_share_only():
    partitions = 64
    moved = []
    for trial in range(200):
        replicas = [f"svc-{trial}-{i}" for i in range(4)]
        old = assign_partitions(partitions, replicas)
        new = assign_partitions(partitions, replicas[1:])
        survivors_kept = sum(len(set(old[r]) & set(new[r])) for r in replicas[1:])
        survivors_had = sum(len(old[r]) for r in replicas[1:])
        moved.append(1 - survivors_kept / survivors_had)
    # survivors keep (nearly) all they had and only take the leaver's partitions on
    assert mean(moved) <= 0.08


# ---------------------------------------------------------------------- config


def test_the_ownership_config_is_checked():
    assert OwnershipConfig() == OwnershipConfig(heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0)
    with pytest.raises(ValueError, match="heartbeat_ttl_s"):
        OwnershipConfig(heartbeat_interval_s=1.0, heartbeat_ttl_s=0.5)
    with pytest.raises(ValueError, match="heartbeat_interval_s"):
        OwnershipConfig(heartbeat_interval_s=0.0)


def test_only_keyed_subscriptions_without_partitions_are_balanced():
    async def handler(event: Event) -> None:
        pass

    assert balanced(Subscription(service="s", patterns=("token.*",), handler=handler))
    assert not balanced(
        Subscription(service="s", patterns=("token.*",), handler=handler, partitions=(1,))
    )
    assert not balanced(
        Subscription(service="s", patterns=(FeedSubscription.TYPE,), handler=handler)
    )
    assert not balanced(Subscription(service="s", patterns=("system.*",), handler=handler))


async def test_balanced_bus_passes_dead_letter_peeks_through():
    inner = InMemoryBus(partitions=2, source="test/memory")
    bus = BalancedBus(inner, store=MemoryStateStore(), clock=ReplayClock(), replica="a")
    await bus.start()
    await bus.dead_letter(b"frame", service="s", reason="bad")
    assert [d.body for d in await bus.dead_letters("s", remove=False)] == [b"frame"]
    assert [d.body for d in await bus.dead_letters("s")] == [b"frame"]
    assert await bus.dead_letters("s") == []
    await bus.close()


async def test_balanced_bus_describes_the_transport_and_its_ownership():
    inner = InMemoryBus(partitions=4, source="test/memory")
    clock = ReplayClock(start=100.0)
    bus = BalancedBus(inner, store=MemoryStateStore(clock), clock=clock, replica="a")
    await bus.start()
    await bus.subscribe(Subscription(service="svc", patterns=("token.*",), handler=Recorder()))
    described = bus.describe()
    assert described["transport"] == "memory" and described["healthy"] is True
    assert described["ownership"]["svc"]["owned"] == [0, 1, 2, 3]
    assert described["ownership"]["svc"]["healthy"] is True
    assert not hasattr(bus, "synchronous")  # transport specifics are reached via inner
    await bus.close()


async def test_the_heartbeat_failures_and_rebalances_are_counted_from_0():
    """A counter child made at its first increment appears at 1, which increase() does
    not count: the first failed heartbeat would read 0 on the dashboard."""
    inner = InMemoryBus(partitions=2, source="test/memory")
    bus = BalancedBus(inner, store=MemoryStateStore(), clock=ReplayClock(), replica="from-0")
    bus.balancer("svc-counted-from-0")
    labels = {"service": "svc-counted-from-0", "replica": "from-0"}
    for name in (
        "pumpflow_partition_heartbeat_failures_total",
        "pumpflow_partition_rebalances_total",
    ):
        assert REGISTRY.get_sample_value(name, labels) == 0, name


# ---------------------------------------------------------------------- registry


async def test_registry_lists_live_replicas_until_their_heartbeat_expires():
    clock = ReplayClock(start=1000.0)
    store = MemoryStateStore(clock)
    a = ReplicaRegistry(store, clock, service="svc", replica="a", ttl_s=3.0)
    b = ReplicaRegistry(store, clock, service="svc", replica="b", ttl_s=3.0)
    other = ReplicaRegistry(store, clock, service="svc2", replica="z", ttl_s=3.0)
    for registry in (a, b, other):
        await registry.heartbeat()
    assert await a.live() == ["a", "b"]
    assert await other.live() == ["z"]  # "svc2" is not "svc"
    assert await store.get("replicas:svc:a") is not None
    await clock.advance_to(1002.0)
    await a.heartbeat()
    await clock.advance_to(1003.5)  # b is silent for 3.5 s > TTL
    assert await a.live() == ["a"]
    await b.heartbeat()  # back
    assert await a.live() == ["a", "b"]
    await b.leave()
    assert await a.live() == ["a"]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def wall_store(request, namespace, redis_url):
    """A store whose TTLs run on the wall clock: memory, or the real Redis."""
    if request.param == "memory":
        yield MemoryStateStore(WallClock())
        return
    from pumpflow.common.state.redis import RedisStateStore

    store = RedisStateStore(url=redis_url, namespace=namespace)
    try:
        yield store
    finally:
        await store.delete_many(await store.scan_keys(""))
        await store.close()


SAME_ID_TTL_S = 0.6


def same_id(store: StateStore) -> ReplicaRegistry:
    """A process's registry of replica "a" of "svc" (each call: another process)."""
    return ReplicaRegistry(store, WallClock(), service="svc", replica="a", ttl_s=SAME_ID_TTL_S)


async def beating(registry: ReplicaRegistry) -> None:
    """Heartbeat as a live replica does, well inside the TTL."""
    while True:
        await registry.heartbeat()
        await asyncio.sleep(SAME_ID_TTL_S / 4)


async def test_a_second_live_process_with_the_same_replica_id_is_refused(wall_store):
    first, second = same_id(wall_store), same_id(wall_store)
    await first.claim()
    alive = asyncio.create_task(beating(first))
    try:
        with pytest.raises(ReplicaIdInUse) as refused:
            await second.claim()
        said = str(refused.value)
        assert "\n" not in said
        assert "'a'" in said and "svc" in said and "another live process" in said, said
        assert "PUMPFLOW_REPLICA" in said, said
        # the refused one neither took the id nor, leaving, removed the holder's heartbeat
        await second.leave()
        await first.heartbeat()
        assert await first.live() == ["a"]
    finally:
        alive.cancel()
        await asyncio.gather(alive, return_exceptions=True)


async def test_a_restart_after_a_crash_takes_its_replica_id_back_once_the_heartbeat_expired(
    wall_store,
):
    crashed = same_id(wall_store)
    await crashed.claim()
    await crashed.heartbeat()  # then nothing: no more heartbeats, no leave
    restarted = same_id(wall_store)
    started = time.monotonic()
    await restarted.claim()  # within the TTL: it waits the old heartbeat out
    assert time.monotonic() - started <= SAME_ID_TTL_S * 2
    await restarted.heartbeat()
    assert await restarted.live() == ["a"]
    # the crashed process, were it only stalled, finds the id taken
    with pytest.raises(ReplicaIdInUse):
        await crashed.heartbeat()
    await crashed.leave()
    assert await restarted.live() == ["a"]
    # a restart after a clean stop takes it at once
    await restarted.leave()
    again = same_id(wall_store)
    started = time.monotonic()
    await again.claim()
    assert time.monotonic() - started < SAME_ID_TTL_S / 2


async def test_a_replica_whose_id_another_process_heartbeats_is_not_ready_and_says_so(caplog):
    clock = ReplayClock(start=1000.0)
    store = MemoryStateStore(clock)
    bus = BalancedBus(InMemoryBus(partitions=4), store=store, clock=clock, replica="a")
    await bus.start()
    await bus.subscribe(Subscription(service="svc", patterns=("token.*",), handler=Recorder()))
    assert bus.ownership()["svc"]["healthy"] is True
    # another process took "a" (ours stalled past the TTL, say) and heartbeats it
    await clock.advance_to(1001.5)
    other = ReplicaRegistry(store, clock, service="svc", replica="a", ttl_s=3.0)
    await store.delete_many(["replicas:svc:a"])
    await other.claim()
    await clock.advance_to(1002.5)
    described = bus.ownership()["svc"]
    assert described["healthy"] is False
    assert "another live process" in described["error"], described
    assert any(
        r.levelname == "ERROR" and "another live process" in r.getMessage() for r in caplog.records
    ), caplog.text
    await bus.close()
    assert await store.get("replicas:svc:a") is not None  # closing left the other's heartbeat


# ---------------------------------------------------------------------- moving partitions


async def test_partitions_move_between_subscriptions_in_order(harness, service):
    """release waits for the handler in flight; the rest goes to the next consumer."""
    bus = await harness.bus(partitions=2)
    first, second = Recorder(delay=0.005), Recorder()
    sub1 = Subscription(service=service, patterns=("token.*",), handler=first, partitions=())
    sub2 = Subscription(service=service, patterns=("token.*",), handler=second, partitions=())
    other = await harness.bus(partitions=2)
    await bus.subscribe(sub1)
    await other.subscribe(sub2)
    # a service of its own that consumes every partition: it sees what was routed
    witness = await harness.collector(
        "token.*", name=f"{service}_witness", bus=await harness.bus(partitions=2)
    )
    keys = [k for k in (f"mint{i}" for i in range(50)) if partition_of(k, 2) == 0][:4]
    sent = [trade_event(k, seq) for seq in range(1, 41) for k in keys]
    await bus.publish_many(sent)
    # the barrier: every event reached a consumer of partition 0, the witness
    await witness.wait_for(len(sent), "token.trade")
    assert not first.events and not second.events  # nobody consumes partition 0 yet
    await bus.consume_partitions(sub1, [0])
    await eventually(lambda: len(first.events) >= 20)
    await bus.release_partitions(sub1, [0])
    handled = len(first.events)
    assert handled < len(sent)
    await other.consume_partitions(sub2, [0])
    # the barrier: the next consumer has taken all that was left of partition 0
    await eventually(lambda: len(first.events) + len(second.events) == len(sent), within=20)
    await other.drain(timeout=2)
    assert len(first.events) == handled  # nothing after the release returned
    assert sorted(first.ids + second.ids) == sorted(e.id for e in sent)
    for key in keys:
        seqs = [e.seq for e in first.events + second.events if e.key == key]
        assert seqs == list(range(1, 41))


async def test_a_partition_claimed_while_another_consumer_holds_it_waits_for_its_release(
    harness, service
):
    """The consumer of a partition keeps it until it releases it, whoever claims it."""
    bus = await harness.bus(partitions=2)
    claimer, holder = Recorder(), Recorder()
    claiming = Subscription(service=service, patterns=("token.*",), handler=claimer, partitions=())
    holding = Subscription(service=service, patterns=("token.*",), handler=holder, partitions=())
    other = await harness.bus(partitions=2)
    await bus.subscribe(claiming)  # the claimer came first, and consumes nothing yet
    await other.subscribe(holding)
    await other.consume_partitions(holding, [0])
    # a replica whose heartbeat failed keeps its partitions: another one claims them
    await bus.consume_partitions(claiming, [0])
    key = next(k for k in (f"mint{i}" for i in range(50)) if partition_of(k, 2) == 0)
    for seq in (1, 2, 3):
        await bus.publish(trade_event(key, seq))
    await eventually(lambda: len(claimer.events) + len(holder.events) == 3)
    assert [e.seq for e in holder.events] == [1, 2, 3]
    assert not claimer.events
    await other.release_partitions(holding, [0])
    await bus.publish(trade_event(key, 4))
    await eventually(lambda: len(claimer.events) == 1)
    assert [e.seq for e in claimer.events] == [4]
    assert [e.seq for e in holder.events] == [1, 2, 3]


# ---------------------------------------------------------------------- replicas in memory

FAST = OwnershipConfig(heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0)


class MemoryReplica:
    """A replica sharing one in-memory bus, store and replay clock with the others."""

    def __init__(self, name: str, bus: InMemoryBus, store: StateStore, clock: ReplayClock):
        self.name = name
        self.got = Recorder()
        self.bus = BalancedBus(bus, store=store, clock=clock, replica=name, config=FAST)
        self.subscription = Subscription(
            service="svc", patterns=("token.*", "system.shutdown"), handler=self.got
        )

    async def start(self) -> None:
        await self.bus.subscribe(self.subscription)

    @property
    def owned(self) -> set[int]:
        return set(self.bus.balancers["svc"].owned)

    async def leave(self) -> None:
        # the shared bus stands for the broker: a replica leaves by unsubscribing
        await self.bus.balancers["svc"].stop(leave=True)
        await self.bus.unsubscribe(self.subscription)


async def test_memory_replicas_share_partitions_and_take_over():
    clock = ReplayClock(start=100.0)
    store = MemoryStateStore(clock)
    bus = InMemoryBus(partitions=8)
    await bus.start()
    a = MemoryReplica("a", bus, store, clock)
    b = MemoryReplica("b", bus, store, clock)
    await a.start()
    assert a.owned == set(range(8))  # alone: everything
    await b.start()
    await clock.advance_to(101.0)  # a's next heartbeat sees b
    expected = assign_partitions(8, ["a", "b"])
    assert a.owned == set(expected["a"]) and b.owned == set(expected["b"])
    assert a.owned and b.owned

    keys = [f"mint{i}" for i in range(40)]
    sequencer = Sequencer()
    await bus.publish_many(make_event(trade(k), source="feed/1", time=0.0,
                                      seq=sequencer.next(k)) for k in keys)  # fmt: skip
    await bus.publish(shutdown_event())
    await bus.drain(timeout=5)
    for replica in (a, b):
        tokens = replica.got.of_type("token.trade")
        assert {partition_of(e.key, 8) for e in tokens} <= replica.owned
        assert len(replica.got.of_type("system.shutdown")) == 1  # broadcast: both
    assert len(a.got.of_type("token.trade")) + len(b.got.of_type("token.trade")) == len(keys)

    # a clean leave hands over at the next heartbeat
    await b.leave()
    await clock.advance_to(102.0)
    assert a.owned == set(range(8))
    rebalances = a.bus.balancers["svc"].rebalances
    assert rebalances == 3  # all, its share, all again

    # a crash (no leave) is noticed once the heartbeat expires
    c = MemoryReplica("c", bus, store, clock)
    await c.start()
    await clock.advance_to(103.0)
    assert a.owned == set(assign_partitions(8, ["a", "c"])["a"])
    await c.bus.halt()
    await clock.advance_to(105.0)  # c's last heartbeat (103.0) lives until 106.0
    assert a.owned != set(range(8))
    await clock.advance_to(107.0)
    assert a.owned == set(range(8))
    await bus.close()


async def test_the_hook_revokes_before_another_replica_is_assigned():
    clock = ReplayClock(start=100.0)
    store = MemoryStateStore(clock)
    bus = InMemoryBus(partitions=8, synchronous=True)
    await bus.start()
    journal: list[tuple[str, str, tuple[int, ...]]] = []
    balanced_buses: dict[str, BalancedBus] = {}

    async def replica(name: str) -> None:
        async def assigned(partitions: tuple[int, ...]) -> None:
            journal.append(("assigned", name, partitions))

        async def revoked(partitions: tuple[int, ...]) -> None:
            journal.append(("revoked", name, partitions))

        async def handler(event: Event) -> None:
            pass

        config = OwnershipConfig(heartbeat_interval_s=1.0, heartbeat_ttl_s=3.0)
        balanced_buses[name] = BalancedBus(bus, store=store, clock=clock, replica=name,
                                           config=config)  # fmt: skip
        await balanced_buses[name].subscribe(
            Subscription(service="svc", patterns=("token.*",), handler=handler,
                         on_assigned=assigned, on_revoked=revoked)
        )  # fmt: skip

    await replica("a")
    assert journal == [("assigned", "a", tuple(range(8)))]
    await replica("b")
    assert journal[1:] == []  # a holds every partition until it hands some over
    await clock.advance_to(101.0)
    expected = assign_partitions(8, ["a", "b"])
    assert journal[1:] == [("revoked", "a", expected["b"]), ("assigned", "b", expected["b"])]
    # a clean stop revokes what it holds before its heartbeat goes
    await balanced_buses["a"].balancer("svc").stop(leave=True)
    assert journal[-1] == ("revoked", "a", expected["a"])
    await clock.advance_to(102.0)
    assert journal[-1] == ("assigned", "b", expected["a"])

    # unbalanced: the transport tells the fixed partitions at subscribe
    told: list[tuple[int, ...]] = []

    async def tell(partitions: tuple[int, ...]) -> None:
        told.append(partitions)

    async def ignore(event: Event) -> None:
        pass

    await bus.subscribe(Subscription(service="all", patterns=("token.*",), handler=ignore,
                                     on_assigned=tell))  # fmt: skip
    await bus.subscribe(Subscription(service="some", patterns=("token.*",), handler=ignore,
                                     partitions=(5, 1), on_assigned=tell))  # fmt: skip
    assert told == [tuple(range(8)), (1, 5)]
    await bus.close()


async def test_the_heartbeat_goes_on_while_a_hand_over_waits_for_a_slow_handler():
    clock = WallClock()
    store = MemoryStateStore(clock)
    bus = InMemoryBus(partitions=4)
    await bus.start()
    quick = OwnershipConfig(heartbeat_interval_s=0.05, heartbeat_ttl_s=0.15)
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(event: Event) -> None:
        started.set()
        await release.wait()

    replicas = {}
    for name in ("a", "b"):
        replicas[name] = BalancedBus(bus, store=store, clock=clock, replica=name, config=quick)
    await replicas["a"].subscribe(Subscription(service="svc", patterns=("token.*",), handler=slow))
    # a partition that a will lose to b once b joins
    lost = assign_partitions(4, ["a", "b"])["b"][0]
    key = next(k for k in (f"mint{i}" for i in range(100)) if partition_of(k, 4) == lost)
    await bus.publish(trade_event(key, 1))
    await asyncio.wait_for(started.wait(), 5)
    await replicas["b"].subscribe(
        Subscription(service="svc", patterns=("token.*",), handler=Recorder())
    )
    balancer = replicas["a"].balancers["svc"]
    # a's hand-over of ``lost`` waits for the handler; its heartbeat must not lapse
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        assert await store.get("replicas:svc:a") is not None
        await asyncio.sleep(0.02)
    assert lost in balancer.owned  # still waiting for the handler
    release.set()
    await eventually(lambda: lost not in balancer.owned, within=5)
    assert balancer.replicas == ("a", "b")
    for replica in replicas.values():
        await replica.halt()
    await bus.close()


# ---------------------------------------------------------------------- broker and Redis

SERVICE = "scaled"
PARTITIONS = 8
#: short enough for quick take-overs; a TTL of 1.6 s outlasts the event-loop stalls of a
#: loaded 2-core machine, which would move a live replica's partitions without a hand-over
QUICK = OwnershipConfig(heartbeat_interval_s=0.25, heartbeat_ttl_s=1.6)


class Replica:
    """A replica of a small service over RabbitMQ and Redis.

    Its handler applies each token's events in seq order and checkpoints the last
    applied seq to the store before it returns (= acks); a token it meets first, or
    after a gap, is loaded from the store, so a partition taken over carries on.
    Applications go to a journal shared by every replica of the test.
    """

    def __init__(self, name: str, *, amqp_url: str, namespace: str, store: StateStore,
                 journal: list[tuple[str, int, str]], delay: float = 0.0):  # fmt: skip
        from pumpflow.common.bus.rabbitmq import RabbitMQBus

        self.name = name
        self.store = store
        self.journal = journal
        self.delay = delay
        self.memory: dict[str, int] = {}
        self.duplicates = 0
        inner = RabbitMQBus(
            url=amqp_url,
            namespace=namespace,
            partitions=PARTITIONS,
            prefetch=16,
            source=f"{SERVICE}/{name}",
            connect_attempts=3,
        )
        self.bus = BalancedBus(inner, store=store, clock=WallClock(), replica=name, config=QUICK)
        self.subscription = Subscription(
            service=SERVICE, patterns=("token.*",), handler=self.handle
        )

    async def start(self) -> Replica:
        await self.bus.start()
        await self.bus.subscribe(self.subscription)
        return self

    async def handle(self, event: Event) -> None:
        key, seq = event.key, event.seq
        last = self.memory.get(key)
        if last is None or seq > last + 1:
            raw = await self.store.get(f"ckpt:{key}")
            last = int(raw) if raw else 0
        if seq <= last:
            self.duplicates += 1
            return
        self.journal.append((key, seq, self.name))
        if self.delay:
            await asyncio.sleep(self.delay)
        await self.store.set(f"ckpt:{key}", str(seq).encode())
        self.memory[key] = seq

    @property
    def owned(self) -> set[int]:
        balancer = self.bus.balancers.get(SERVICE)
        return set(balancer.owned) if balancer else set()

    async def stop(self) -> None:
        """SIGTERM's path: leave, stop consuming, drain, close."""
        await self.bus.stop_consuming()
        await self.bus.drain(5)
        await self.bus.close()


@pytest.fixture
async def cluster(namespace, amqp_url, redis_url, redis_client):
    """Builds replicas; deletes the topology and closes everything after the test."""
    from pumpflow.common.bus.rabbitmq import RabbitMQBus
    from pumpflow.common.state.redis import RedisStateStore

    store = RedisStateStore(url=redis_url, namespace=namespace)
    journal: list[tuple[str, int, str]] = []
    replicas: list[Replica] = []
    publisher = RabbitMQBus(
        url=amqp_url, namespace=namespace, partitions=PARTITIONS, source="feed/pub"
    )
    await publisher.start()

    async def replica(name: str, delay: float = 0.0) -> Replica:
        made = Replica(name, amqp_url=amqp_url, namespace=namespace, store=store,
                       journal=journal, delay=delay)  # fmt: skip
        replicas.append(made)
        return await made.start()

    try:
        yield replica, publisher, journal, store
    finally:
        for made in replicas:
            await made.bus.close()
        await publisher.delete_topology(services=[SERVICE])
        await publisher.close()
        await store.close()


def assert_exactly_once_in_order(journal, keys, per_key):
    applied = Counter((key, seq) for key, seq, _ in journal)
    assert [kv for kv, n in applied.items() if n > 1] == []
    for key in keys:
        assert [seq for k, seq, _ in journal if k == key] == list(range(1, per_key + 1)), key


def disjoint_cover(*replicas: Replica) -> bool:
    owned = [r.owned for r in replicas]
    return sum(len(o) for o in owned) == PARTITIONS and set().union(*owned) == set(
        range(PARTITIONS)
    )


@pytest.mark.rabbitmq
@pytest.mark.redis
async def test_two_replicas_split_the_partitions(cluster, redis_client, namespace):
    replica, publisher, journal, _ = cluster
    a = await replica("ra")
    b = await replica("rb")
    await eventually(lambda: disjoint_cover(a, b) and a.owned and b.owned, within=10)
    expected = assign_partitions(PARTITIONS, ["ra", "rb"])
    assert (a.owned, b.owned) == (set(expected["ra"]), set(expected["rb"]))
    assert sorted(await redis_client.keys(f"{namespace}:replicas:{SERVICE}:*")) == [
        f"{namespace}:replicas:{SERVICE}:ra".encode(),
        f"{namespace}:replicas:{SERVICE}:rb".encode(),
    ]
    owned = REGISTRY.get_sample_value(
        "pumpflow_partitions_owned", {"service": SERVICE, "replica": "ra"}
    )
    assert owned == len(a.owned)

    keys = [f"mint{i}" for i in range(64)]
    await publisher.publish_many(trade_event(k, 1) for k in keys)
    await eventually(lambda: len(journal) == len(keys), within=15)
    for key, _, name in journal:
        assert partition_of(key, PARTITIONS) in (a if name == "ra" else b).owned
    assert {name for _, _, name in journal} == {"ra", "rb"}


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.slow
async def test_a_replica_joins_and_one_leaves_mid_stream_nothing_lost(cluster):
    replica, publisher, journal, _ = cluster
    keys, per_key = [f"mint{i}" for i in range(24)], 60
    a = await replica("ra", delay=0.001)
    b = await replica("rb", delay=0.001)
    await eventually(lambda: disjoint_cover(a, b) and a.owned and b.owned, within=10)

    async def publish() -> None:
        for seq in range(1, per_key + 1):
            await publisher.publish_many(trade_event(k, seq) for k in keys)
            await asyncio.sleep(0.02)

    feeding = asyncio.create_task(publish())
    await eventually(lambda: len(journal) >= len(keys) * per_key // 4, within=20)
    c = await replica("rc", delay=0.001)
    await eventually(lambda: disjoint_cover(a, b, c) and c.owned, within=10)
    await eventually(lambda: len(journal) >= len(keys) * per_key // 2, within=20)
    await b.stop()  # a clean stop: it leaves, its partitions go to a and c
    await eventually(lambda: disjoint_cover(a, c), within=10)
    await feeding
    await eventually(lambda: len(journal) >= len(keys) * per_key, within=30)
    # the barrier: one more event per key; once each was handled, whatever was queued
    # before it on its partition (a redelivery, a copy) was handled too
    await publisher.publish_many(trade_event(k, per_key + 1) for k in keys)
    markers = {(k, per_key + 1) for k in keys}
    await eventually(lambda: markers <= {(k, seq) for k, seq, _ in journal}, within=15)
    assert_exactly_once_in_order(journal, keys, per_key + 1)
    # a clean hand-over redelivers nothing that was handled: no duplicate even reached us
    assert [r.duplicates for r in (a, b, c)] == [0, 0, 0]
    # every replica did part of the work
    assert {name for _, _, name in journal} == {"ra", "rb", "rc"}
    assert a.bus.balancers[SERVICE].rebalances >= 3


@pytest.mark.rabbitmq
@pytest.mark.redis
async def test_a_dead_replicas_partitions_are_taken_over_after_the_ttl(cluster):
    replica, publisher, journal, _ = cluster
    a = await replica("ra")
    b = await replica("rb")
    await eventually(lambda: disjoint_cover(a, b) and a.owned and b.owned, within=10)
    lost = set(b.owned)
    # b dies: no more heartbeats, no leave; its connection goes
    await b.bus.halt()
    await b.bus.inner.close()
    died = time.monotonic()
    keys = [f"mint{i}" for i in range(40)]
    await publisher.publish_many(trade_event(k, 1) for k in keys)
    await eventually(lambda: a.owned == set(range(PARTITIONS)), within=10)
    waited = time.monotonic() - died
    # not before b's heartbeat expired (the TTL after its last beat)
    assert waited >= QUICK.heartbeat_ttl_s - QUICK.heartbeat_interval_s - 0.05
    await eventually(lambda: len(journal) == len(keys), within=15)
    assert {partition_of(k, PARTITIONS) for k, _, _ in journal} & lost
    assert {name for _, _, name in journal} == {"ra"}


@pytest.mark.rabbitmq
@pytest.mark.redis
async def test_a_second_process_with_a_live_replicas_id_refuses_to_start(cluster):
    replica, _, _, _ = cluster
    a = await replica("ra")
    await eventually(lambda: a.owned == set(range(PARTITIONS)), within=10)
    with pytest.raises(ReplicaIdInUse, match=r"'ra'.*another live process"):
        await replica("ra")
    await a.bus.balancers[SERVICE].rebalance()
    assert a.owned == set(range(PARTITIONS)) and a.bus.balancers[SERVICE].healthy
