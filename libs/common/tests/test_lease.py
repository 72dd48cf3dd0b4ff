"""LeaderLease on both state stores: election, renewal, loss, take-over, on real time."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import textwrap
import time
import warnings

import pytest

from pumpflow.common.clock import WallClock
from pumpflow.common.db.leases import PostgresLeaseStore
from pumpflow.common.db.pool import create_pool
from pumpflow.common.lease import LeaderLease, LeaderLeaseConfig, Lease
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.state.redis import RedisStateStore
from pumpflow.common.testing import POSTGRES_DSN, drop_schema, eventually

#: short, but several event-loop hiccups of a busy machine long
TTL = 0.6
NAME = "writer"


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
async def store(request, namespace, redis_url):
    if request.param == "memory":
        # leases time out on the wall clock: so must the store's TTLs
        yield MemoryStateStore(WallClock())
        return
    if request.param == "postgres":
        pool = await create_pool(POSTGRES_DSN, namespace)
        try:
            yield PostgresLeaseStore(pool)
        finally:
            await pool.close()
            await drop_schema(POSTGRES_DSN, namespace)
        return
    redis_store = RedisStateStore(url=redis_url, namespace=namespace)
    try:
        yield redis_store
    finally:
        await redis_store.delete_many(await redis_store.scan_keys(""))
        await redis_store.close()


class Candidate:
    """A single writer that records what the lease tells it, in order."""

    def __init__(self, store, holder: str, *, fail_election: bool = False, ttl: float = TTL):
        self.calls: list[str] = []
        self.fail_election = fail_election
        #: who held the lease in the store when on_resign ran
        self.holder_at_resign: str | None = None
        self.lease = LeaderLease(
            store,
            LeaderLeaseConfig(name=NAME, holder=holder, ttl_s=ttl),
            on_elected=self.elected,
            on_lost=self.lost,
            on_renewed=self.renewed,
            on_resign=self.resign,
        )

    async def elected(self) -> None:
        self.calls.append("elected")
        if self.fail_election:
            raise RuntimeError("cannot start the guarded work")

    async def lost(self) -> None:
        self.calls.append("lost")

    async def renewed(self) -> None:
        if self.calls[-1] != "renewed":
            self.calls.append("renewed")

    async def resign(self) -> None:
        self.calls.append("resign")
        self.holder_at_resign = await self.lease.current_holder()


async def leading(candidate: Candidate) -> None:
    """Start ``candidate``, alone in the campaign, and wait until it leads: its first
    try is True only if the store answered within the TTL (0.6 s here), which a loaded
    machine may not give it; its campaign then takes the free lease."""
    if not await candidate.lease.start():
        await eventually(lambda: candidate.lease.is_leader and "elected" in candidate.calls)


async def test_one_candidate_is_elected_renews_and_the_other_stands_by(store):
    one, two = Candidate(store, "one"), Candidate(store, "two")
    try:
        if await one.lease.start():
            assert one.calls == ["elected"]  # on_elected has returned when start does
        await eventually(lambda: one.lease.is_leader and one.calls[:1] == ["elected"])
        assert await two.lease.start() is False
        assert two.lease.role == "standby"
        # two TTLs of renewals: the lease never lapses and the standby never gets it
        await eventually(lambda: one.lease.renewals >= 6)
        assert one.lease.is_leader and one.lease.losses == 0
        assert one.calls == ["elected", "renewed"]
        assert two.calls == [] and two.lease.elections == 0
        assert await two.lease.current_holder() == "one"
    finally:
        await one.lease.stop()
        await two.lease.stop()


async def test_the_standby_takes_over_at_once_when_the_leader_stops(store):
    one, two = Candidate(store, "one"), Candidate(store, "two")
    try:
        await leading(one)
        await two.lease.start()
        await one.lease.stop()
        # resigned while still holding it, then released (not left to run out), not lost
        assert one.calls[-1] == "resign" and one.holder_at_resign == "one"
        assert await one.lease.current_holder() in (None, "two")
        assert "lost" not in one.calls and one.lease.role == "stopped"
        await eventually(lambda: two.calls == ["elected"])
        assert await two.lease.current_holder() == "two"
    finally:
        await one.lease.stop()
        await two.lease.stop()


async def test_a_leader_stalled_past_its_ttl_loses_the_lease_and_calls_on_lost(store):
    one, two = Candidate(store, "one"), Candidate(store, "two")
    try:
        await leading(one)
        await two.lease.start()
        await eventually(lambda: one.lease.renewals >= 1)
        # the whole process stalls (a long GC pause, a blocked event loop): the lease
        # runs out in the store meanwhile, and the leader must not act on it any more
        assert one.lease.holds
        time.sleep(TTL * 1.5)  # noqa: ASYNC251 - the stall is the fault under test
        # awake, before a renewal has told it: it leads still, and no longer holds it
        assert one.lease.is_leader and not one.lease.holds
        await eventually(lambda: "lost" in one.calls)
        assert one.lease.losses == 1
        # someone leads again, and only one of them
        await eventually(lambda: one.lease.is_leader or two.lease.is_leader)
        leaders = [c for c in (one, two) if c.lease.is_leader]
        assert len(leaders) == 1
        assert await one.lease.current_holder() == leaders[0].lease.holder
    finally:
        await one.lease.stop()
        await two.lease.stop()


async def test_a_claim_tells_a_holder_that_renews_from_one_that_stopped_without_resigning(
    store,
):
    """A stand-by's look at the lease: who holds it, when it runs out unless renewed, and
    whether the holder is late with its renewal (dead: it stops renewing, never resigns)."""
    ttl = 3.0  # renewed every second: late once 1.5 s pass without
    cut = Cuttable(store)
    one, two = Candidate(cut, "one", ttl=ttl), Candidate(store, "two", ttl=ttl)
    try:
        await leading(one)
        await two.lease.start()
        await eventually(lambda: one.lease.renewals >= 2)
        claim = await two.lease.claim()
        assert claim.holder == "one" and not claim.late, claim
        assert ttl / 2 < claim.runs_out_in_s <= ttl, claim
        cut.cut = True

        async def late():
            claim = await two.lease.claim()
            return claim if claim.late else None

        claim = await eventually(late, ttl, what="the holder late")
        assert claim.holder == "one", claim
        assert claim.renewed_s_ago > 1.5 and claim.runs_out_in_s < ttl - 1.5, claim
        assert claim.renewed_s_ago + claim.runs_out_in_s == pytest.approx(ttl, abs=0.2)
        await eventually(lambda: two.lease.is_leader, 3 * ttl, what="the take-over")
        assert (await two.lease.claim()).holder == "two"
    finally:
        await one.lease.stop()
        await two.lease.stop()


async def test_a_leader_whose_lease_another_holds_steps_down_and_campaigns_again(store):
    one = Candidate(store, "one")
    try:
        await leading(one)
        # the key is taken from under it (as after a pause the holder did not notice)
        await store.delete_if_equal("lease:" + NAME, b"one")
        thief = Lease(store, NAME, "thief", 60.0)
        assert await thief.acquire()
        await eventually(lambda: one.calls[-1:] == ["lost"])
        assert one.lease.role == "standby"
        await thief.release()
        await eventually(lambda: one.calls[-1:] == ["elected"])
        assert [c for c in one.calls if c != "renewed"] == ["elected", "lost", "elected"]
        assert one.lease.is_leader
        assert one.lease.elections == 2 and one.lease.losses == 1
    finally:
        await one.lease.stop()


async def test_a_leader_told_another_took_over_steps_down_at_once_and_campaigns_on(store):
    one = Candidate(store, "one")
    try:
        await leading(one)
        # the guarded work learnt it before any renewal could
        await one.lease.step_down("another took over the guarded work")
        assert [c for c in one.calls if c != "renewed"] == ["elected", "lost"]
        assert one.lease.role == "standby" and one.lease.losses == 1
        # nobody else holds the key: the campaign takes it again
        await eventually(lambda: one.calls[-1:] == ["elected"])
        assert one.lease.is_leader and one.lease.elections == 2
    finally:
        await one.lease.stop()


async def test_a_failed_election_is_undone_and_the_lease_left_to_another(store):
    broken, healthy = Candidate(store, "broken", fail_election=True), Candidate(store, "healthy")
    try:
        assert await broken.lease.start() is False
        assert broken.calls == ["elected", "lost"]  # on_lost undoes the half-started work
        assert await healthy.lease.start() is True  # released: no TTL to wait out
    finally:
        await broken.lease.stop()
        await healthy.lease.stop()


_DYING_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from pumpflow.common.lease import LeaderLease, LeaderLeaseConfig
    from pumpflow.common.state.redis import RedisStateStore

    async def main(url, namespace, ttl):
        store = RedisStateStore(url=url, namespace=namespace)

        async def say(what):
            print(what, flush=True)

        lease = LeaderLease(
            store,
            LeaderLeaseConfig(name="writer", holder="doomed", ttl_s=ttl),
            on_elected=lambda: say("elected"),
            on_lost=lambda: say("lost"),
            on_renewed=lambda: say("renewed"),
        )
        await lease.start()
        await asyncio.Event().wait()

    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
    """
)


@pytest.mark.redis
async def test_the_standby_takes_over_when_the_leader_process_dies(namespace, redis_url):
    store = RedisStateStore(url=redis_url, namespace=namespace)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DYING_HOLDER, redis_url, namespace, str(TTL),
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    standby = Candidate(store, "standby")
    try:
        assert await asyncio.wait_for(child.stdout.readline(), 30) == b"elected\n"
        assert await standby.lease.start() is False
        for _ in range(6):  # two TTLs of renewals by the holder: the standby waits
            assert await asyncio.wait_for(child.stdout.readline(), 5) == b"renewed\n"
        assert standby.calls == []
        killed = time.monotonic()
        child.send_signal(signal.SIGKILL)  # no release: the lease has to run out
        await child.wait()
        await eventually(lambda: standby.calls == ["elected"], within=10 * TTL)
        # not before the dead holder's last renewal (a third of a TTL ago at most) ran out
        assert time.monotonic() - killed > TTL / 2
        assert standby.lease.is_leader
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await standby.lease.stop()
        await store.delete_many(await store.scan_keys(""))
        await store.close()


# ---------------------------------------------------------------- a store that goes away

#: long enough for a Redis restart inside it
OUTAGE_TTL = 5.0


class Connection:
    """The guarded work: a connection the lease holder opens and closes, on a timeline."""

    def __init__(self, holder: str, timeline: list[tuple[float, str, bool]]):
        self.holder = holder
        self.timeline = timeline
        self.open = False

    async def connect(self) -> None:
        self.open = True
        self.timeline.append((time.monotonic(), self.holder, True))

    async def disconnect(self) -> None:
        if self.open:
            self.open = False
            self.timeline.append((time.monotonic(), self.holder, False))


def most_open_at_once(timeline: list[tuple[float, str, bool]]) -> int:
    open_now: set[str] = set()
    most = 0
    for _, holder, opened in sorted(timeline):
        (open_now.add if opened else open_now.discard)(holder)
        most = max(most, len(open_now))
    return most


class Cuttable:
    """A holder's way to the store, which the test can cut (a network partition)."""

    def __init__(self, store: RedisStateStore):
        self._store = store
        self.cut = False

    def __getattr__(self, name: str):
        method = getattr(self._store, name)

        async def call(*args, **kwargs):
            if self.cut:
                raise ConnectionRefusedError(111, "Connection refused")
            return await method(*args, **kwargs)

        return call


def guarded_lease(store, connection: Connection) -> LeaderLease:
    return LeaderLease(
        store,
        LeaderLeaseConfig(name=NAME, holder=connection.holder, ttl_s=OUTAGE_TTL),
        on_elected=connection.connect,
        on_lost=connection.disconnect,
    )


async def test_a_holder_keeps_its_connection_through_a_redis_restart(own_redis, namespace):
    store = RedisStateStore(url=own_redis.url, namespace=namespace)
    timeline: list[tuple[float, str, bool]] = []
    connection = Connection("one", timeline)
    leader = guarded_lease(store, connection)
    try:
        await leader.start()
        await eventually(lambda: connection.open, what="connected")
        await asyncio.to_thread(own_redis.stop)
        stopped = time.monotonic()
        await eventually(lambda: time.monotonic() - stopped > leader.config.interval_s)
        # a Redis without persistence comes back empty: the lease's key is gone
        await asyncio.to_thread(own_redis.start)
        await eventually(lambda: leader.lease.retaken, what="the key created again")
        renewals = leader.renewals
        await eventually(lambda: leader.renewals > renewals, what="renewed since")
        assert leader.lease.retaken == 1
        assert leader.losses == 0 and leader.is_leader and connection.open
        assert timeline == [timeline[0]]  # connected once, never dropped
        assert await leader.current_holder() == "one"
    finally:
        await leader.stop()
        await store.close()


async def test_no_two_holders_are_connected_when_redis_loses_the_lease(own_redis, namespace):
    """The holder cannot reach Redis; Redis restarts empty; the standby takes the key.

    The standby must not connect before the old holder's own expiry has passed, which
    it can only bound by the age of what Redis holds.
    """
    timeline: list[tuple[float, str, bool]] = []
    one_store = RedisStateStore(url=own_redis.url, namespace=namespace)
    two_store = RedisStateStore(url=own_redis.url, namespace=namespace)
    way = Cuttable(one_store)
    one, two = Connection("one", timeline), Connection("two", timeline)
    first, second = guarded_lease(way, one), guarded_lease(two_store, two)
    try:
        await first.start()
        await eventually(lambda: one.open, what="the first holder connected")
        await second.start()
        assert second.role == "standby"

        way.cut = True
        await asyncio.to_thread(own_redis.restart)
        await eventually(lambda: two.open, what="the standby connected", within=4 * OUTAGE_TTL)
        assert not one.open and first.losses == 1
        assert most_open_at_once(timeline) == 1, timeline
        way.cut = False
        await eventually(lambda: first.role == "standby")
        assert await second.current_holder() == "two"
    finally:
        await first.stop()
        await second.stop()
        await one_store.close()
        await two_store.close()


# ---------------------------------------------------------------- a lease in two stores

#: the lease in Redis and in Postgres: a TTL a Redis outage outlasts (and a loaded
#: machine's event-loop stalls do not)
DUAL_TTL = 2.5


async def held_in_redis_by(lease: LeaderLease, holder: str) -> bool:
    """Whether ``holder`` holds the lease in the first store (Redis) now; False if it
    cannot be read (a standby may take the key there for a moment, and give it back)."""
    try:
        return await lease.lease.current_holder() == holder
    except ConnectionError:
        return False


def dual_lease(stores, connection: Connection) -> LeaderLease:
    return LeaderLease(
        stores,
        LeaderLeaseConfig(name=NAME, holder=connection.holder, ttl_s=DUAL_TTL),
        on_elected=connection.connect,
        on_lost=connection.disconnect,
    )


@pytest.mark.postgres
async def test_a_holder_keeps_its_connection_through_a_redis_outage_longer_than_its_ttl(
    own_redis, namespace, pg_pool
):
    timeline: list[tuple[float, str, bool]] = []
    redis_one = RedisStateStore(url=own_redis.url, namespace=namespace)
    redis_two = RedisStateStore(url=own_redis.url, namespace=namespace)
    postgres = PostgresLeaseStore(pg_pool)
    one, two = Connection("one", timeline), Connection("two", timeline)
    first, second = dual_lease([redis_one, postgres], one), dual_lease([redis_two, postgres], two)
    try:
        await first.start()
        # a fresh Redis: the holder waits out its settling time first
        await eventually(lambda: one.open, what="connected")
        await second.start()
        assert second.role == "standby"
        await asyncio.to_thread(own_redis.stop)
        stopped = time.monotonic()
        # three TTLs without Redis: renewed in Postgres all along
        renewals = first.renewals
        await eventually(lambda: time.monotonic() - stopped > 3 * DUAL_TTL, within=30)
        assert first.renewals >= renewals + 5
        await asyncio.to_thread(own_redis.start)
        # back in Redis too (it came back empty)
        await eventually(
            lambda: held_in_redis_by(first, "one"), within=10, what="held in Redis again"
        )
        assert first.losses == 0 and first.is_leader and one.open
        assert not two.open and second.elections == 0
        assert timeline == [timeline[0]]  # connected once, never dropped
    finally:
        await first.stop()
        await second.stop()
        await redis_one.close()
        await redis_two.close()


@pytest.mark.postgres
async def test_a_holder_cut_off_from_redis_leads_on_and_no_second_one_connects(
    own_redis, namespace, pg_pool
):
    """Only the holder loses Redis: the standby takes the Redis key once the holder's
    claim there ran out, cannot take Postgres, and gives Redis back."""
    timeline: list[tuple[float, str, bool]] = []
    redis_one = RedisStateStore(url=own_redis.url, namespace=namespace)
    redis_two = RedisStateStore(url=own_redis.url, namespace=namespace)
    way = Cuttable(redis_one)
    postgres = PostgresLeaseStore(pg_pool)
    one, two = Connection("one", timeline), Connection("two", timeline)
    first, second = dual_lease([way, postgres], one), dual_lease([redis_two, postgres], two)
    try:
        await first.start()
        await eventually(lambda: one.open, what="connected")
        await second.start()
        way.cut = True
        cut = time.monotonic()
        await eventually(lambda: time.monotonic() - cut > 3 * DUAL_TTL, within=30)
        assert first.is_leader and one.open and first.losses == 0
        assert not two.open and second.elections == 0
        way.cut = False
        await eventually(
            lambda: held_in_redis_by(first, "one"), within=10, what="held in Redis again"
        )
        assert first.losses == 0 and first.is_leader and one.open
        assert most_open_at_once(timeline) == 1 and timeline == [timeline[0]]
    finally:
        await first.stop()
        await second.stop()
        await redis_one.close()
        await redis_two.close()


@pytest.mark.postgres
async def test_a_holder_cut_off_from_both_stores_is_replaced_after_it_let_go(
    own_redis, namespace, pg_pool
):
    timeline: list[tuple[float, str, bool]] = []
    redis_one = RedisStateStore(url=own_redis.url, namespace=namespace)
    redis_two = RedisStateStore(url=own_redis.url, namespace=namespace)
    to_redis, to_postgres = Cuttable(redis_one), Cuttable(PostgresLeaseStore(pg_pool))
    one, two = Connection("one", timeline), Connection("two", timeline)
    first = dual_lease([to_redis, to_postgres], one)
    second = dual_lease([redis_two, PostgresLeaseStore(pg_pool)], two)
    try:
        await first.start()
        await eventually(lambda: one.open, what="connected")
        await second.start()
        to_redis.cut = to_postgres.cut = True
        await eventually(lambda: two.open, within=10 * DUAL_TTL, what="the standby connected")
        assert not one.open and first.losses == 1
        assert most_open_at_once(timeline) == 1, timeline
    finally:
        await first.stop()
        await second.stop()
        await redis_one.close()
        await redis_two.close()


async def test_a_renewal_cancelled_before_it_starts_leaves_no_coroutine_unawaited():
    """A renewer stopped while its renewals are gathered and not started yet (a stop, a
    step-down) must leave nothing behind: a coroutine never awaited is a warning in a
    clean run's output."""
    candidate = Candidate(MemoryStateStore(WallClock()), "alone")
    await leading(candidate)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            before = asyncio.all_tasks()
            renewing = asyncio.create_task(candidate.lease._renew_once())
            await asyncio.sleep(0)  # gathered: its renewals scheduled, none started
            renewals = asyncio.all_tasks() - before - {renewing}
            assert renewals and not any(r.done() for r in renewals)
            renewing.cancel()
            await asyncio.gather(renewing, *renewals, return_exceptions=True)
            del renewing, renewals  # what they ran goes with them
            await asyncio.sleep(0)  # the loop lets go of their last steps on its next turn
            gc.collect()
        assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    finally:
        await candidate.lease.stop()


class Gated:
    """A store whose takes wait, once ``gate`` is set, until the test opens it."""

    def __init__(self, store):
        self._store = store
        self.gate: asyncio.Future | None = None
        self.waiting = False

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        if self.gate is not None:
            self.waiting = True
            await self.gate
        return await self._store.set_if_absent(key, value, ttl)


async def test_a_stop_that_meets_a_take_as_it_answers_stops_the_campaign():
    """The campaign is cancelled in the loop turn its take answers: the stop must still
    end it (a wait that hands back the answer and drops the cancellation leaves the
    campaign running, and the stop awaiting it for ever)."""
    store = MemoryStateStore(WallClock())
    other = Lease(store, NAME, "other", ttl_s=60)
    assert await other.acquire()
    gated = Gated(store)
    candidate = Candidate(gated, "late")
    assert await candidate.lease.start() is False
    gated.gate = asyncio.get_running_loop().create_future()
    await other.release()
    await eventually(lambda: gated.waiting, what="the campaign's take under way")
    gated.gate.set_result(None)
    stopping = asyncio.create_task(candidate.lease.stop())
    done, _ = await asyncio.wait({stopping}, timeout=5)
    assert done, "the stop did not end: the campaign ran on after its cancellation"
    assert candidate.lease.role == "stopped"
    assert candidate.calls in ([], ["elected", "resign"])
