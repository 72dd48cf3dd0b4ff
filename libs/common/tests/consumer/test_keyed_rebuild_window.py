"""A key waiting for its rebuild holds none of its partition's window.

A key without a record whose first event is past its publisher's seq 1 is rebuilt from
the publisher's stored events (the feed's, in Postgres) first. While that read waits
(Postgres holds a lock, or is down), the key's events are taken off the bus and kept
with its record, so the other keys of its partition go on over the transport's limits
(the consumer's window, RabbitMQ's prefetch: acks go in delivery order, and an unacked
delivery at the head holds every later one of its queue), and the key's state, once
rebuilt, has every event once, in order.

The history is the feed's real store over a Postgres schema of the test's own; what
makes it wait is Postgres itself: a lock held on the table, or a Postgres of the
test's own stopped.
"""

from __future__ import annotations

import asyncio

import asyncpg
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.abc import EventBus
from pumpflow.common.bus.routing import partition_of
from pumpflow.common.clock import WallClock
from pumpflow.common.consumer import (
    ConsumerMetrics,
    KeyedConsumerConfig,
    KeyedStatefulConsumer,
    Record,
)
from pumpflow.common.db.pool import create_pool
from pumpflow.common.dependencies import POSTGRES, WAITS
from pumpflow.common.events import Event, TokenTrade, make_event
from pumpflow.common.state.abc import StateStore
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.state.redis import RedisStateStore
from pumpflow.common.storage.token_events import TokenEventStore, feed_history
from pumpflow.common.testing import BusHarness, EventCollector, eventually
from pumpflow.common.testing.factories import base58_key

from .test_keyed_contract import Applied, RecordingProcessor

PARTITIONS = 4
#: deliveries a partition's consumer runs at once, and RabbitMQ's unacked limit
WINDOW = 4
PREFETCH = 8
#: the waiting key's events stored in Postgres (seqs 1..STORED), then live ones
STORED = 4
#: other keys of the waiting key's partition, and rounds of one event each: their
#: messages are several times the prefetch, and the waiting key's own live events
#: more than the window
OTHERS = 6
ROUNDS = 6
START = 1_700_000_000.0
SERVICE = "keyed"


def trade(mint: str, seq: int) -> Event:
    payload = TokenTrade(
        signature=base58_key(f"sig-{mint}-{seq}", 88),
        mint=mint,
        traderPublicKey=base58_key(f"wallet{seq % 7}"),
        txType="buy",
        tokenAmount=1000.0,
        newTokenBalance=1000.0,
        bondingCurveKey=base58_key("curve"),
        vTokensInBondingCurve=1_073_000_000.0,
        vSolInBondingCurve=30.0,
        marketCapSol=30.0 / 1.073,  # the reserves' price times a 1B supply
        solAmount=0.01,
    )
    return make_event(payload, source="feed/test", time=START + seq, seq=seq)


def one_partition(count: int) -> list[str]:
    """``count`` mints of one partition (the first is the one that waits)."""
    mints = (base58_key(f"mint{i}") for i in range(10_000))
    first = next(mints)
    partition = partition_of(first, PARTITIONS)
    return [first, *[m for m in mints if partition_of(m, PARTITIONS) == partition][: count - 1]]


TRANSPORTS = [
    pytest.param("memory", id="memory"),
    pytest.param("rabbitmq", id="rabbitmq+redis", marks=[pytest.mark.rabbitmq, pytest.mark.redis]),
]


class Setup:
    """A bus of ``transport`` with the limits above, a store, and the consumer."""

    def __init__(self, transport: str, namespace: str, amqp_url: str, redis_url: str):
        self.transport = transport
        self.namespace = namespace
        self.registry = CollectorRegistry()
        self.harness = BusHarness(
            transport,
            namespace=namespace,
            amqp_url=amqp_url,
            partitions=PARTITIONS,
            prefetch=PREFETCH,
        )
        self.store: StateStore = (
            MemoryStateStore(WallClock())
            if transport == "memory"
            else RedisStateStore(url=redis_url, namespace=namespace)
        )
        self.consumer: KeyedStatefulConsumer | None = None

    async def start(self, history) -> tuple[EventBus, EventCollector]:
        bus = await self.harness.bus("feed/test")
        announced = await EventCollector("watcher").attach(
            await self.harness.bus("watcher/test"), "features.updated"
        )
        self.consumer = KeyedStatefulConsumer(
            RecordingProcessor(),
            KeyedConsumerConfig(
                service=SERVICE,
                patterns=("token.trade",),
                window=WINDOW,
                # a wait for a dependency restarts the deadline; a lock held on the table
                # is no failure, and a slower replica than the rest is no hung one here
                task_deadline_s=120.0,
            ),
            bus=await self.harness.bus("keyed/test"),
            store=self.store,
            clock=WallClock(),
            source="keyed/test",
            history=history,
            metrics=ConsumerMetrics(SERVICE, registry=self.registry),
        )
        await self.consumer.start()
        return bus, announced

    async def applied(self, mint: str) -> list[int]:
        raw = await self.store.get(f"{SERVICE}:key:{mint}")
        if raw is None:
            return []
        record = msgspec.msgpack.decode(raw, type=Record)
        return msgspec.msgpack.decode(record.state, type=Applied).seqs

    async def teardown(self) -> None:
        if self.consumer is not None:
            try:
                await asyncio.wait_for(self.consumer.stop(), 20)
            except TimeoutError:
                await self.consumer.abandon()
        await self.harness.teardown()
        if self.transport != "memory":
            await self.store.delete_many(await self.store.scan_keys(""))
        await self.store.close()


@pytest.fixture(params=TRANSPORTS)
async def setup(request, namespace, amqp_url, redis_url):
    made = Setup(request.param, namespace, amqp_url, redis_url)
    try:
        yield made
    finally:
        await made.teardown()


async def publish_while_waiting(bus: EventBus, waiting: str, others: list[str]) -> None:
    """The waiting key's first event past its stored ones, then rounds of every other
    key's next event and the waiting key's next, each a message of its own."""
    await bus.publish(trade(waiting, STORED + 1))
    for round_ in range(1, ROUNDS + 1):
        for mint in others:
            await bus.publish(trade(mint, round_))
        await bus.publish(trade(waiting, STORED + 1 + round_))


async def others_go_on(setup: Setup, others: list[str]) -> None:
    async def all_applied() -> bool:
        return all([await setup.applied(m) == list(range(1, ROUNDS + 1)) for m in others])

    async def details() -> str:
        return str({m: await setup.applied(m) for m in others})

    shown: list[str] = []

    async def applied_or_shown() -> bool:
        done = await all_applied()
        if not done:
            shown[:] = [await details()]
        return done

    try:
        await eventually(applied_or_shown, 30, what="the other keys of the partition applied")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {shown[-1] if shown else ''}") from None


async def waiting_key_ends_right(setup: Setup, announced: EventCollector, waiting: str) -> None:
    last = STORED + 1 + ROUNDS
    await announced.wait_until(
        lambda c: any(e.data.source_seq == last for e in c.of(key=waiting)),
        what="the waiting key's last event announced",
    )
    assert await setup.applied(waiting) == list(range(1, last + 1))
    # the stored events announced nothing (they did when they first came); each live
    # one is announced once, in order
    assert [e.data.source_seq for e in announced.of(key=waiting)] == list(
        range(STORED + 1, last + 1)
    )
    assert setup.consumer.metrics.counts()["rebuilt"] == 1
    assert await setup.harness.buses[0].dead_letters(SERVICE) == []
    assert rebuilding_keys(setup) == 0


def rebuilding_keys(setup: Setup) -> float | None:
    return setup.registry.get_sample_value(
        "pumpflow_consumer_rebuilding_keys", {"service": SERVICE}
    )


async def test_a_key_whose_history_waits_for_a_lock_holds_none_of_its_partitions_window(
    setup, pg_pool, postgres_dsn, namespace
):
    waiting, *others = one_partition(1 + OTHERS)
    await TokenEventStore(pg_pool).write([trade(waiting, s) for s in range(1, STORED + 1)])
    bus, announced = await setup.start(feed_history(pg_pool))
    # a migration's lock, say: the history's read waits for it, failing nothing
    locker = await asyncpg.connect(postgres_dsn, server_settings={"search_path": namespace})
    watcher = await asyncpg.connect(postgres_dsn)
    locked = locker.transaction()
    await locked.start()
    await locker.execute("LOCK TABLE token_events IN ACCESS EXCLUSIVE MODE")
    try:
        await publish_while_waiting(bus, waiting, others)

        async def read_waits() -> bool:
            # out of a transaction: each look reads the activity afresh; blocked by the
            # locker, as another run's waits on the server are not
            return bool(
                await watcher.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%token_events%' AND $1 = ANY(pg_blocking_pids(pid))",
                    locker.get_server_pid(),
                )
            )

        await eventually(read_waits, 30, what="the rebuild's read waiting for the lock")
        await others_go_on(setup, others)
        # the waiting key is still waiting: nothing of it is applied or announced, and
        # the scrape shows it
        assert await read_waits()
        assert await setup.applied(waiting) == []
        assert not announced.of(key=waiting)
        assert rebuilding_keys(setup) == 1
    finally:
        await locked.rollback()
        await locker.close()
        await watcher.close()
    await waiting_key_ends_right(setup, announced, waiting)


@pytest.mark.slow
async def test_a_key_whose_history_waits_for_postgres_down_holds_none_of_its_partitions_window(
    setup, own_postgres, namespace
):
    waiting, *others = one_partition(1 + OTHERS)
    pool = await create_pool(own_postgres.dsn, namespace, min_size=1, max_size=2)
    try:
        await TokenEventStore(pool).write([trade(waiting, s) for s in range(1, STORED + 1)])
        bus, announced = await setup.start(feed_history(pool))
        await asyncio.to_thread(own_postgres.stop)
        await publish_while_waiting(bus, waiting, others)
        await eventually(lambda: POSTGRES in WAITS.describe(), what="a wait for Postgres")
        await others_go_on(setup, others)
        assert await setup.applied(waiting) == []
        assert not announced.of(key=waiting)
        # waited out, not failed: nothing is dead-lettered
        assert await setup.harness.buses[0].dead_letters(SERVICE) == []
        await asyncio.to_thread(own_postgres.start)
        await waiting_key_ends_right(setup, announced, waiting)
    finally:
        await pool.close()
