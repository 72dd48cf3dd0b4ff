"""Feed replicas share one PumpPortal connection through a lease: the others stand by."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from pumpflow.common.bus.memory import InMemoryBus
from pumpflow.common.clock import WallClock
from pumpflow.common.db.leases import PostgresLeaseStore
from pumpflow.common.events import FeedSubscription, TokenCreated, make_event
from pumpflow.common.lease import Lease
from pumpflow.common.pumpportal import decode_frame
from pumpflow.common.runtime.service import ServiceContext
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.state.redis import RedisStateStore
from pumpflow.common.storage import TokenEventStore
from pumpflow.common.testing import EventCollector, eventually
from pumpflow.feed import reference_frames as ref
from pumpflow.feed.service import ACCOUNTS_KEY, LEASE_NAME, MINTS_KEY, FeedService
from pumpflow.feed.settings import FeedSettings
from pumpflow.simulator import server as simulator
from pumpflow.simulator.market import Market, MarketConfig

#: long enough that a loaded machine's event-loop stalls do not outlast it
TTL = 1.0


async def start_replica(
    server, bus, store, replica: str, db=None, registry=None, **settings
) -> FeedService:
    settings = FeedSettings(
        pumpportal_ws_url=server.url,
        feed_record=db is not None,
        feed_backoff_initial_s=0.05,
        feed_lease_ttl_s=TTL,
        transport="memory",
        replica=replica,
        **settings,
    )
    service = FeedService(settings, registry=registry)
    ctx = ServiceContext(settings=settings, bus=bus, clock=WallClock(), store=store, db=db)
    await service.start(ctx)
    return service


async def two_replicas(db=None):
    server = simulator.SimulatorServer(
        market=Market(MarketConfig(seed=11, launches_per_minute=120.0)), speed=40.0
    )
    await server.start()
    bus = InMemoryBus(partitions=4, synchronous=True, source="feed/test")
    await bus.start()
    events = (await EventCollector("probe").attach(bus, "token.*")).events
    store = MemoryStateStore(WallClock())
    first = await start_replica(server, bus, store, "one", db)
    second = await start_replica(server, bus, store, "two", db)
    return server, bus, store, events, first, second


async def test_one_replica_connects_and_the_standby_takes_over_when_it_stops():
    server, bus, _store, events, first, second = await two_replicas()
    try:
        assert first.role == "active" and second.role == "standby"
        await asyncio.wait_for(first.socket.wait_connected(), 5)
        await eventually(lambda: sum(1 for e in events if e.type == "token.trade") >= 20)
        # several renewals later the standby still has not connected: time passing is what
        # is tested (the lease outlives its TTL twice over only by being renewed), so wait
        # for the renewals that span it, during which the standby campaigns as often
        renewed = first.leader.renewals
        await eventually(
            lambda: first.leader.renewals >= renewed + 6, what="six renewals (two TTLs)"
        )
        assert server.connections == 1 and server.counters["connections"] == 1
        assert second.socket.sessions == 0
        standby_status = await second.status()
        assert standby_status["ready"] is True and standby_status["role"] == "standby"
        assert (await first.status())["role"] == "active"
        wanted = set(first.socket.active_mints)
        assert wanted

        await first.stop()  # releases the lease: no TTL to wait out
        await asyncio.wait_for(second.socket.wait_connected(), TTL * 2)
        assert second.role == "active"
        assert server.counters["connections"] == 2
        await eventually(lambda: server.connections == 1)
        # it carries on with the mints the first one had subscribed
        assert wanted <= second.socket.active_mints
        await eventually(lambda: second.socket.pending_messages == 0)
        mark = len(events)
        await eventually(
            lambda: any(e.key in wanted and e.type == "token.trade" for e in events[mark:])
        )
    finally:
        await first.stop()
        await second.stop()
        await server.stop()
        await bus.close()


async def test_a_holder_that_loses_its_lease_disconnects_at_once():
    server, bus, store, _events, first, second = await two_replicas()
    try:
        await asyncio.wait_for(first.socket.wait_connected(), 5)
        # someone else takes the lease (as after a long pause of the holder)
        await store.delete_if_equal("lease:" + LEASE_NAME, first.leader.holder.encode())
        thief = Lease(store, LEASE_NAME, "thief", 60.0)
        assert await thief.acquire()
        await eventually(lambda: first.role == "standby" and not first.socket.is_connected)
        await eventually(lambda: server.connections == 0)
        assert second.role == "standby" and second.socket.sessions == 0
        await thief.release()
        await eventually(lambda: server.connections == 1)
        assert server.counters["connections"] == 2
    finally:
        await first.stop()
        await second.stop()
        await server.stop()
        await bus.close()


async def test_only_the_connected_replica_reports_subscriptions():
    """pumpflow_feed_active_subscriptions is summed over the replicas: a standby keeps
    the wanted mints from the commands, and one that lost the lease keeps them too, but
    neither subscribes anything on PumpPortal."""
    server = simulator.SimulatorServer(
        market=Market(MarketConfig(seed=11, launches_per_minute=120.0)), speed=40.0
    )
    await server.start()
    bus = InMemoryBus(partitions=4, synchronous=True, source="feed/test")
    await bus.start()
    store = MemoryStateStore(WallClock())
    registries = {"one": CollectorRegistry(), "two": CollectorRegistry()}
    first = await start_replica(server, bus, store, "one", registry=registries["one"])
    second = await start_replica(server, bus, store, "two", registry=registries["two"])

    def subscribed(name: str) -> float:
        return registries[name].get_sample_value("pumpflow_feed_active_subscriptions")

    try:
        await asyncio.wait_for(first.socket.wait_connected(), 5)
        command = FeedSubscription(action="subscribe", mints=("wantedA", "wantedB"), reason="t")
        await bus.publish(make_event(command, source="activity/test", time=1.0))
        await eventually(lambda: {"wantedA", "wantedB"} <= second.socket.active_mints)
        await eventually(lambda: {"wantedA", "wantedB"} <= first.socket.active_mints)
        assert subscribed("one") == len(first.socket.active_mints) >= 2
        assert subscribed("two") == 0
        # someone else takes the lease: the first disconnects, its wanted mints kept
        await store.delete_if_equal("lease:" + LEASE_NAME, first.leader.holder.encode())
        thief = Lease(store, LEASE_NAME, "thief", 60.0)
        assert await thief.acquire()
        await eventually(lambda: first.role == "standby" and not first.socket.is_connected)
        assert first.socket.active_mints
        assert subscribed("one") == 0
        await thief.release()
        await eventually(lambda: first.socket.is_connected or second.socket.is_connected)
        holder = "one" if first.socket.is_connected else "two"
        socket = (first if holder == "one" else second).socket
        await eventually(lambda: subscribed(holder) == len(socket.active_mints) > 0)
        assert subscribed("two" if holder == "one" else "one") == 0
    finally:
        await first.stop()
        await second.stop()
        await server.stop()
        await bus.close()


async def test_the_replica_taking_the_connection_over_announces_its_own_trade_stream():
    """The holder's connection is refused trade subscriptions (no funded key) and it says
    so; the standby, unconnected, says nothing (asked by trading's wallet either) and its
    gauge stays 0; taking over, it says what its own connection is answered, and the one
    that stood by says nothing more."""
    server = simulator.SimulatorServer(
        market=Market(MarketConfig(seed=11, launches_per_minute=120.0)),
        speed=40.0,
        require_api_key=True,
    )
    await server.start()
    bus = InMemoryBus(partitions=4, synchronous=True, source="feed/test")
    await bus.start()
    said = (await EventCollector("said").attach(bus, "feed.trade_stream")).events
    store = MemoryStateStore(WallClock())
    registries = {"one": CollectorRegistry(), "two": CollectorRegistry()}
    first = await start_replica(server, bus, store, "one", registry=registries["one"])
    second = await start_replica(server, bus, store, "two", registry=registries["two"])
    wallet = FeedSubscription(
        action="subscribe", mints=(), accounts=("walletW",), reason="live wallet"
    )

    def refused(name: str) -> float:
        return registries[name].get_sample_value("pumpflow_feed_trade_stream_refused")

    try:
        await eventually(lambda: said, what="the holder's refusal")
        await bus.publish(make_event(wallet, source="trading/test", time=1.0))
        await eventually(lambda: len(said) == 2, what="the holder's refusal, asked again")
        assert {e.source for e in said} == {"feed/one"} and all(e.data.refused for e in said)
        assert refused("one") == 1 and refused("two") == 0
        assert "trade_stream" not in await second.status()

        await first.stop()
        await eventually(lambda: any(e.source == "feed/two" for e in said), what="its own word")
        taken = next(i for i, e in enumerate(said) if e.source == "feed/two")
        assert said[taken].data.refused and said[taken].data.reason == simulator.API_KEY_REQUIRED
        mark = len(said)
        await bus.publish(make_event(wallet, source="trading/test", time=2.0))
        await eventually(lambda: len(said) > mark, what="the new holder asked again")
        assert {e.source for e in said[taken:]} == {"feed/two"}
        assert refused("one") == 0 and refused("two") == 1
    finally:
        await first.stop()
        await second.stop()
        await server.stop()
        await bus.close()


async def test_a_standby_taking_over_lets_go_of_a_wallet_it_heard_announced_too_long_ago():
    """The holder keeps trading's wallet for a successor, and trading stops announcing
    it. The standby heard the announcements too: taking over, it lets the wallet go
    when its last announcement is older than feed_account_ttl_s, as if it had held the
    lease all along, not as if the wallet had been announced at the take-over."""
    server = simulator.SimulatorServer(
        market=Market(MarketConfig(seed=11, launches_per_minute=120.0)), speed=40.0
    )
    await server.start()
    bus = InMemoryBus(partitions=4, synchronous=True, source="feed/test")
    await bus.start()
    store = MemoryStateStore(WallClock())
    ttl = 0.5
    first = await start_replica(server, bus, store, "one", feed_account_ttl_s=300.0)
    second = await start_replica(server, bus, store, "two", feed_account_ttl_s=ttl)
    try:
        await asyncio.wait_for(first.socket.wait_connected(), 5)
        command = FeedSubscription(
            action="subscribe", mints=(), accounts=("walletW",), reason="live wallet"
        )
        await bus.publish(make_event(command, source="trading/test", time=1.0))
        announced = time.monotonic()
        await eventually(lambda: "walletW" in second.socket.accounts)

        async def kept() -> bool:
            return await store.get(ACCOUNTS_KEY) == b"walletW"

        await eventually(kept, what="the wallet kept for a successor")
        await eventually(lambda: time.monotonic() > announced + ttl, what="the standby's TTL")
        await first.stop()
        await asyncio.wait_for(second.socket.wait_connected(), TTL * 2)
        assert second.subscriptions()["accounts"] == []
        await eventually(lambda: second.socket.pending_messages == 0)
        assert not any("walletW" in client.accounts for client in server._clients)
    finally:
        await first.stop()
        await second.stop()
        await server.stop()
        await bus.close()


async def test_a_mint_unsubscribed_while_no_replica_held_the_lease_stays_unsubscribed():
    """The holder kept a mint it subscribed on its creation for a successor, then lost
    the lease (as a crashed one does) before it could save again; the mint's unsubscribe
    came meanwhile, and the standby, which never knew the mint, is the one taking over:
    it must not subscribe the mint again from what the holder kept."""
    server, bus, store, _events, first, second = await two_replicas()
    try:
        await asyncio.wait_for(first.socket.wait_connected(), 5)

        async def kept_by_the_holder_only() -> str | None:
            saved = await store.get(MINTS_KEY)
            mints = set(saved.decode().split()) if saved else set()
            return next(iter(sorted(mints - second.socket.active_mints)), None)

        mint = await eventually(kept_by_the_holder_only, what="a mint kept for a successor")
        await store.delete_if_equal("lease:" + LEASE_NAME, first.leader.holder.encode())
        thief = Lease(store, LEASE_NAME, "thief", 60.0)
        assert await thief.acquire()
        await eventually(lambda: first.role == "standby" and not first.socket.is_connected)
        command = FeedSubscription(action="unsubscribe", mints=(mint,), reason="inactive")
        await bus.publish(make_event(command, source="activity/test", time=1.0))
        await eventually(lambda: mint not in first.socket.active_mints)
        await first.stop()
        await thief.release()
        await asyncio.wait_for(second.socket.wait_connected(), TTL * 4)
        assert second.role == "active"
        assert mint not in second.socket.active_mints
        await eventually(lambda: second.socket.pending_messages == 0)
        assert not any(mint in client.mints for client in server._clients)
    finally:
        await first.stop()
        await second.stop()
        await server.stop()
        await bus.close()


@pytest.mark.postgres
async def test_take_over_continues_every_mints_seq_without_publishing_twice(pg_pool):
    server, bus, _store, events, first, second = await two_replicas(db=pg_pool)
    try:
        await asyncio.wait_for(first.socket.wait_connected(), 5)
        await eventually(lambda: sum(1 for e in events if e.type == "token.trade") >= 50)
        await first.stop()
        mark = len(events)
        await asyncio.wait_for(second.socket.wait_connected(), TTL * 2)
        await eventually(lambda: len(events) >= mark + 100)
    finally:
        await first.stop()
        await second.stop()
        await server.stop()
        await bus.close()
    assert server.counters["connections"] == 2
    by_mint: dict[str, list[int]] = {}
    for event in events:
        by_mint.setdefault(event.key, []).append(event.seq)
    assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in by_mint.values())
    signatures = [(e.type, e.data.signature, e.data.txType) for e in events]
    assert len(signatures) == len(set(signatures))


async def take_the_lease_from(holder: FeedService, store, pg_pool) -> list[Lease]:
    """Another takes the holder's lease in every store it lives in (as once a crashed or
    frozen holder's claims ran out): the holder stands by, and campaigns no more."""
    thieves = []
    for where in (store, PostgresLeaseStore(pg_pool)):
        await where.delete_if_equal("lease:" + LEASE_NAME, holder.leader.holder.encode())
        thief = Lease(where, LEASE_NAME, "thief", 60.0)
        assert await thief.acquire()
        thieves.append(thief)
    await eventually(lambda: holder.role == "standby" and not holder.socket.is_connected)
    await holder.leader.stop()  # a standby: nothing resigned, nothing saved
    return thieves


@pytest.mark.postgres
async def test_a_successor_streams_the_tokens_created_since_a_crashed_holders_last_save(
    pg_pool,
):
    """The holder subscribes each token as it is created and keeps the wanted mints for
    a successor as its lease renews. It crashes (no resign, no last save): the tokens
    created since its last save, stored as their creation came, are streamed by the
    successor too, but for one unsubscribed while no replica held the lease."""
    server, bus, store, events, first, second = await two_replicas(db=pg_pool)
    try:
        await asyncio.wait_for(first.socket.wait_connected(), 5)
        await eventually(lambda: first.leader.renewals >= 2, what="mints kept at a renewal")
        thieves = await take_the_lease_from(first, store, pg_pool)
        saved = await store.get(MINTS_KEY)
        assert saved, "the holder kept its mints at a renewal"
        # a renewal comes every third of a TTL: the market (80 creations a second) created
        # tokens after the last one, and the standby never knew them. Those whose creation
        # came past the lease's deadline were dropped unpublished, unknown downstream
        created = {e.key for e in events if e.type == TokenCreated.TYPE}
        unsaved = (first.socket.active_mints & created) - set(saved.decode().split())
        assert len(unsaved) >= 2 and not unsaved & second.socket.active_mints
        dropped = min(unsaved)
        command = FeedSubscription(action="unsubscribe", mints=(dropped,), reason="inactive")
        await bus.publish(make_event(command, source="activity/test", time=1.0))
        await eventually(lambda: dropped not in first.socket.active_mints)
        await first.stop()  # what it read is stored; kill -9 loses what it had not stored
        for thief in thieves:
            await thief.release()
        await asyncio.wait_for(second.socket.wait_connected(), TTL * 4)
        # the creations stored are read once the writes are its own, as it connects
        await eventually(
            lambda: unsaved - {dropped} <= second.socket.active_mints,
            what="the tokens created since the last save streamed",
        )
        assert dropped not in second.socket.active_mints
        await eventually(lambda: second.socket.pending_messages == 0)

        def on_server() -> set[str]:
            return set().union(*(client.mints for client in server._clients))

        # sent is not yet read: the server takes the subscriptions in a moment of its own
        await eventually(
            lambda: unsaved - {dropped} <= on_server(), what="the server streaming them"
        )
        assert dropped not in on_server()
    finally:
        await first.stop()
        await second.stop()
        await server.stop()
        await bus.close()


@pytest.mark.postgres
async def test_a_holders_backlog_stored_after_a_successor_took_over_takes_none_of_its_seqs(
    pg_pool, postgres_dsn, namespace
):
    """The holder numbers events its store has not taken yet (a slow store, or a process
    frozen with its batch in flight) when it loses the lease. The successor numbers each
    mint on from what is stored, so it gives seqs the holder gave already; the holder's
    backlog, stored once the store takes writes again, must not go out with them
    (consumers would drop one of the two, and the store would hold both). It is kept,
    stored without seqs and never published, as a trade of a mint not subscribed is."""
    server, bus, store, events, first, second = await two_replicas(db=pg_pool)
    blocker = await asyncpg.connect(postgres_dsn, server_settings={"search_path": namespace})
    blocking = blocker.transaction()
    try:
        await asyncio.wait_for(first.socket.wait_connected(), 5)
        await eventually(lambda: sum(1 for e in events if e.type == "token.trade") >= 50)
        await blocking.start()
        await blocker.execute("LOCK TABLE token_events IN EXCLUSIVE MODE")  # reads go on
        last_row = await blocker.fetchval("SELECT coalesce(max(id), 0) FROM token_events")
        # the mints kept for the successor at a renewal include some of the backlog's
        renewals = first.leader.renewals
        await eventually(lambda: first.leader.renewals >= renewals + 2, what="two renewals")
        assert first.recorder.pending
        thieves = await take_the_lease_from(first, store, pg_pool)
        numbered = first.manager.sequencer.snapshot()  # numbering stopped with the lease
        for thief in thieves:
            await thief.release()
        await asyncio.wait_for(second.socket.wait_connected(), TTL * 4)
        stored = await TokenEventStore(pg_pool).last_seq_by_mint()

        def given_twice() -> list[str]:
            again = second.manager.sequencer.snapshot()
            return [
                mint
                for mint, seq in numbered.items()
                if stored.get(mint, 0) < min(seq, again.get(mint, 0))
            ]

        mints = await eventually(given_twice, what="a mint numbered past its stored seq by both")
        await blocking.rollback()
        await eventually(lambda: first.recorder.pending == 0, what="the backlog stored")
        await second.stop()  # stores and publishes what it numbered, while the market goes on
        await bus.drain()
        twice = await pg_pool.fetch(
            "SELECT mint, seq FROM token_events WHERE seq IS NOT NULL"
            " GROUP BY mint, seq HAVING count(*) > 1"
        )
        assert twice == []
        ids_by_seq: dict[tuple[str, int], set[str]] = {}
        for event in events:
            ids_by_seq.setdefault((event.key, event.seq), set()).add(event.id)
        assert all(len(ids) == 1 for ids in ids_by_seq.values())
        for mint in mints:
            kept = await pg_pool.fetchrow(
                "SELECT count(*) AS events, count(seq) AS numbered FROM token_events"
                " WHERE mint = $1 AND source = $2 AND id > $3",
                mint, first.settings.source, last_row,
            )  # fmt: skip
            assert kept["events"] == numbered[mint] - stored.get(mint, 0)
            assert kept["numbered"] == 0
    finally:
        if not blocker.is_closed():
            with contextlib.suppress(asyncpg.InterfaceError):
                await blocking.rollback()
            await blocker.close()
        await first.stop()
        await second.stop()
        await server.stop()
        await bus.close()


async def test_the_connection_and_the_market_outlive_a_redis_restart(own_redis, namespace):
    """The lease lives in a Redis of the test's own, without persistence; it restarts
    empty while the feed streams: the feed keeps its connection and every frame."""
    server = simulator.SimulatorServer(
        market=Market(MarketConfig(seed=5, launches_per_minute=120.0)), speed=40.0
    )
    await server.start()
    bus = InMemoryBus(partitions=4, synchronous=True, source="feed/test")
    await bus.start()
    events = (await EventCollector("probe").attach(bus, "token.*")).events
    store = RedisStateStore(url=own_redis.url, namespace=namespace)
    settings = FeedSettings(
        pumpportal_ws_url=server.url,
        feed_record=False,
        feed_lease_ttl_s=8.0,  # a restart takes well under it, on a busy machine too
        transport="memory",
        replica="one",
    )
    feed = FeedService(settings)
    try:
        await feed.start(ServiceContext(settings=settings, bus=bus, clock=WallClock(), store=store))
        # a Redis started moments ago may have lost a lease: the holder waits it out first
        await asyncio.wait_for(feed.socket.wait_connected(), 20)
        await eventually(lambda: sum(1 for e in events if e.type == "token.trade") >= 20)

        await asyncio.to_thread(own_redis.restart)

        async def holder() -> str | None:
            try:
                return await feed.leader.current_holder()
            except RedisConnectionError:  # the test's client meets the restart too
                return None

        await eventually(holder, what="the lease's key back")
        seen = len(events)
        await eventually(lambda: len(events) >= seen + 20, what="the stream going on")

        assert feed.leader.losses == 0 and feed.role == "active"
        assert server.counters["connections"] == 1 and feed.socket.sessions == 1
        sent = server.counters["create"] + server.counters["buy"] + server.counters["sell"]
        await eventually(lambda: len(events) >= sent, what="every frame sent published")
    finally:
        await feed.stop()
        await server.stop()
        await bus.close()
        await store.close()


@pytest.mark.postgres
async def test_a_feed_that_keeps_its_history_for_ever_says_so_as_it_starts(pg_pool, caplog):
    """Nothing is deleted unless asked, and a disk fills: the start says which setting
    bounds it."""
    server = simulator.SimulatorServer(market=Market(MarketConfig(seed=11)), speed=1.0)
    await server.start()
    bus = InMemoryBus(partitions=4, synchronous=True, source="feed/test")
    await bus.start()
    caplog.set_level(logging.WARNING, logger="pumpflow.feed.service")
    feed = await start_replica(server, bus, MemoryStateStore(WallClock()), "one", pg_pool)
    try:
        [said] = [r.getMessage() for r in caplog.records if "kept for ever" in r.getMessage()]
        assert "PUMPFLOW_FEED_RECORD_KEEP_DAYS" in said and "GB a day" in said, said
    finally:
        await feed.stop()
        await server.stop()
        await bus.close()


@pytest.mark.postgres
async def test_only_the_lease_holder_prunes_the_events_past_the_keep(pg_pool):
    """Events older than the keep go, counted by the holder; the standby deletes none."""
    store = TokenEventStore(pg_pool)
    month_ago = time.time() - 30 * 86_400
    old = [
        make_event(decode_frame(frame), source="feed/old", time=month_ago + i, seq=None,
                   received_at=month_ago + i)
        for i, frame in enumerate((ref.SELL, ref.OLD_BUY, ref.MIGRATE))
    ]  # fmt: skip
    await store.write(old, [ref.SELL, ref.OLD_BUY, ref.MIGRATE])
    server = simulator.SimulatorServer(
        market=Market(MarketConfig(seed=11, launches_per_minute=120.0)), speed=40.0
    )
    await server.start()
    bus = InMemoryBus(partitions=4, synchronous=True, source="feed/test")
    await bus.start()
    leases = MemoryStateStore(WallClock())
    registries = [CollectorRegistry(), CollectorRegistry()]
    replicas = [
        await start_replica(server, bus, leases, name, pg_pool, registry=registry,
                            feed_record_keep_days=7, feed_record_prune_interval_s=0.05)
        for name, registry in zip(("one", "two"), registries, strict=True)
    ]  # fmt: skip
    try:
        holder, standby = replicas
        assert holder.role == "active" and standby.role == "standby"
        await eventually(
            lambda: registries[0].get_sample_value(
                "pumpflow_feed_pruned_total", {"table": "token_events"}
            ) == 3,
            what="the holder's prune of the three old events",
        )  # fmt: skip
        await eventually(lambda: holder.recorder.stored >= 20)
        left = [e.time async for e in store.stream()]
        assert left and min(left) > time.time() - 86_400
        pruned = registries[1].get_sample_value(
            "pumpflow_feed_pruned_total", {"table": "token_events"}
        )
        assert pruned == 0
    finally:
        for replica in replicas:
            await replica.stop()
        await server.stop()
        await bus.close()
