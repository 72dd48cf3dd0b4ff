"""One contract for every StateStore: in-process (ReplayClock TTLs) and Redis (real TTLs)."""

from __future__ import annotations

import asyncio
import enum
import math
import re
from dataclasses import dataclass

import numpy as np
import pytest

from pumpflow.common.clock import ReplayClock, WallClock
from pumpflow.common.lease import Lease
from pumpflow.common.state.abc import StateStore, WriteBatch, WrongKind
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.state.redis import RedisStateStore

#: a TTL that must run out during the test, and one that must not
SHORT_TTL = 0.05
LONG_TTL = 600.0


@dataclass
class Harness:
    store: StateStore
    clock: ReplayClock | None = None

    async def let_short_ttls_expire(self) -> None:
        """Move past SHORT_TTL: by the replay clock, or for Redis by real time."""
        if self.clock is not None:
            await self.clock.advance(SHORT_TTL + 0.001)
        else:
            await asyncio.sleep(SHORT_TTL + 0.1)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def harness(request, namespace, redis_url):
    if request.param == "memory":
        clock = ReplayClock(start=1_700_000_000.0)
        yield Harness(store=MemoryStateStore(clock), clock=clock)
        return
    store = RedisStateStore(url=redis_url, namespace=namespace)
    try:
        yield Harness(store=store)
    finally:
        keys = await store.scan_keys("")
        await store.delete_many(keys)
        await store.close()


async def test_get_many_keeps_order_and_gives_none_for_missing(harness):
    store = harness.store
    await store.set_many({"a": b"1", "b": b"\x00\xff"})
    assert await store.get_many(["b", "missing", "a"]) == [b"\x00\xff", None, b"1"]
    assert await store.get("a") == b"1"
    await store.set("a", b"2")
    assert await store.get("a") == b"2"


async def test_get_of_a_hash_key_is_none(harness):
    store = harness.store
    await store.hset_many({"h": {"f": 1}})
    assert await store.get_many(["h"]) == [None]


async def test_empty_batches_are_no_ops(harness):
    store = harness.store
    assert await store.get_many([]) == []
    await store.set_many({})
    await store.hset_many({})
    await store.hset_many({"h": {}})
    await store.delete_many([])
    await store.expire_many([], 1.0)
    assert await store.scan_keys("") == []


async def test_a_write_with_a_hash_of_no_fields_stores_the_rest(harness):
    """An hset of no fields in a batch is a no-op (like an empty HSET: no key), the rest
    of the batch stored."""
    store = harness.store
    batch = WriteBatch()
    batch.set("v", b"1", 60.0)
    batch.hset("h", {})
    batch.hset("g", {"f": 1})
    await store.write(batch)
    assert await store.get_many(["v"]) == [b"1"]
    assert await store.hgetall("h") == {}
    assert await store.hgetall("g") == {"f": b"1"}


async def test_hash_fields_come_back_as_bytes_in_their_str_spelling(harness):
    store = harness.store
    await store.hset_many(
        {
            "h1": {"i": 42, "f": 0.1, "big": 1e20, "s": "tokén", "b": b"\x01\x02", "t": True},
            "h2": {"x": -7},
        }
    )
    assert await store.hgetall("h1") == {
        "i": b"42",
        "f": b"0.1",
        "big": b"1e+20",
        "s": "tokén".encode(),
        "b": b"\x01\x02",
        "t": b"True",
    }
    assert await store.hgetall("h2") == {"x": b"-7"}
    assert await store.hgetall("missing") == {}


async def test_a_number_of_another_type_comes_back_as_the_plain_numbers_digits(harness):
    """numpy's scalars, an IntEnum's member, a float's subclass: stored as the int or
    float they equal, never as their repr (``np.float64(0.1)``, ``<Level.HIGH: 3>``)."""

    class Level(enum.IntEnum):
        HIGH = 3

    class Price(float):
        pass

    store = harness.store
    await store.hset_many(
        {
            "h": {
                "f64": np.float64(0.1),
                "f32": np.float32(0.5),
                "i64": np.int64(-3),
                "u8": np.uint8(200),
                "level": Level.HIGH,
                "price": Price(2.5),
                "plain": 1.5,
                "text": bytearray(b"ab"),
            }
        }
    )
    assert await store.hgetall("h") == {
        "f64": b"0.1",
        "f32": b"0.5",
        "i64": b"-3",
        "u8": b"200",
        "level": b"3",
        "price": b"2.5",
        "plain": b"1.5",
        "text": b"ab",
    }


async def test_hset_many_merges_fields_into_existing_hashes(harness):
    store = harness.store
    await store.hset_many({"h": {"a": 1, "b": 2}})
    await store.hset_many({"h": {"b": 3, "c": 4}})
    assert await store.hgetall("h") == {"a": b"1", "b": b"3", "c": b"4"}


async def test_hgetall_of_a_plain_value_is_empty(harness):
    store = harness.store
    await store.set("v", b"x")
    assert await store.hgetall("v") == {}


async def test_delete_many_removes_values_and_hashes(harness):
    store = harness.store
    await store.set_many({"a": b"1", "b": b"2"})
    await store.hset_many({"h": {"f": 1}})
    await store.delete_many(["a", "h", "never-existed"])
    assert await store.get_many(["a", "b"]) == [None, b"2"]
    assert await store.hgetall("h") == {}
    assert await store.scan_keys("") == ["b"]


async def test_scan_keys_matches_a_literal_prefix(harness):
    store = harness.store
    await store.set_many({"tok:1": b"", "tok:2": b"", "token": b"", "a*b": b"", "axb": b""})
    await store.hset_many({"tok:h": {"f": 1}})
    assert await store.scan_keys("tok:") == ["tok:1", "tok:2", "tok:h"]
    assert await store.scan_keys("tok") == ["tok:1", "tok:2", "tok:h", "token"]
    # glob characters in the prefix are literal, not patterns
    assert await store.scan_keys("a*") == ["a*b"]
    assert await store.scan_keys("nothing") == []


async def test_short_ttl_expires_and_others_stay(harness):
    store = harness.store
    await store.set_many({"short1": b"1", "short2": b"2"}, ttl=SHORT_TTL)
    await store.set_many({"long": b"3"}, ttl=LONG_TTL)
    await store.set("forever", b"4")
    await harness.let_short_ttls_expire()
    assert await store.get_many(["short1", "short2", "long", "forever"]) == [
        None,
        None,
        b"3",
        b"4",
    ]
    assert await store.scan_keys("") == ["forever", "long"]


async def test_set_without_ttl_clears_an_earlier_ttl(harness):
    store = harness.store
    await store.set("k", b"1", ttl=SHORT_TTL)
    await store.set("k", b"2")
    await harness.let_short_ttls_expire()
    assert await store.get("k") == b"2"


async def test_hset_ttl_none_keeps_the_existing_ttl(harness):
    store = harness.store
    await store.hset_many({"h": {"a": 1}}, ttl=SHORT_TTL)
    await store.hset_many({"h": {"b": 2}})
    await harness.let_short_ttls_expire()
    assert await store.hgetall("h") == {}
    assert await store.scan_keys("") == []


async def test_hset_with_ttl_refreshes_it(harness):
    store = harness.store
    await store.hset_many({"h": {"a": 1}, "g": {"a": 1}}, ttl=SHORT_TTL)
    await store.hset_many({"h": {"b": 2}}, ttl=LONG_TTL)
    await harness.let_short_ttls_expire()
    assert await store.hgetall("h") == {"a": b"1", "b": b"2"}
    assert await store.hgetall("g") == {}


async def test_expire_many_sets_and_removes_ttls_of_existing_keys_only(harness):
    store = harness.store
    await store.set_many({"keep": b"1", "drop": b"2"}, ttl=SHORT_TTL)
    await store.hset_many({"hdrop": {"f": 1}})
    await store.expire_many(["keep"], None)
    await store.expire_many(["hdrop", "absent"], SHORT_TTL)
    await harness.let_short_ttls_expire()
    assert await store.get_many(["keep", "drop", "absent"]) == [b"1", None, None]
    assert await store.hgetall("hdrop") == {}
    assert await store.scan_keys("") == ["keep"]


async def test_set_if_absent_sets_once_until_the_ttl_runs_out(harness):
    store = harness.store
    assert await store.set_if_absent("k", b"a", SHORT_TTL)
    assert not await store.set_if_absent("k", b"b", LONG_TTL)
    assert await store.get("k") == b"a"
    await harness.let_short_ttls_expire()
    assert await store.set_if_absent("k", b"b", LONG_TTL)
    assert await store.get("k") == b"b"


async def test_add_member_counts_each_member_once_until_the_ttl_runs_out(harness):
    store = harness.store
    counts = await asyncio.gather(*(store.add_member("s", f"m{i}", SHORT_TTL) for i in range(5)))
    assert sorted(counts) == [1, 2, 3, 4, 5]
    assert await store.add_member("s", "m0", SHORT_TTL) == 5  # made again: counted once
    assert await store.get("s") is None  # a set is no value
    await harness.let_short_ttls_expire()
    assert await store.add_member("s", "m0", LONG_TTL) == 1
    await store.delete_many(["s"])
    assert await store.scan_keys("s") == []


async def test_extend_if_equal_extends_only_the_matching_value(harness):
    store = harness.store
    await store.set("k", b"mine", ttl=SHORT_TTL)
    await store.set("other", b"theirs", ttl=SHORT_TTL)
    assert not await store.extend_if_equal("other", b"mine", LONG_TTL)
    assert not await store.extend_if_equal("missing", b"mine", LONG_TTL)
    assert await store.extend_if_equal("k", b"mine", LONG_TTL)
    await harness.let_short_ttls_expire()
    assert await store.get_many(["k", "other", "missing"]) == [b"mine", None, None]
    assert not await store.extend_if_equal("other", b"theirs", LONG_TTL)  # expired


async def test_expires_in_says_when_a_key_runs_out(harness):
    store = harness.store
    await store.set("k", b"v", ttl=LONG_TTL)
    await store.set("forever", b"v")
    await store.set("short", b"v", ttl=SHORT_TTL)
    assert LONG_TTL - 5 < await store.expires_in("k") <= LONG_TTL
    assert await store.expires_in("forever") == math.inf
    assert await store.expires_in("missing") is None
    await harness.let_short_ttls_expire()
    assert await store.expires_in("short") is None


async def test_delete_if_equal_deletes_only_the_matching_value(harness):
    store = harness.store
    await store.set_many({"k": b"mine", "other": b"theirs"})
    assert not await store.delete_if_equal("other", b"mine")
    assert not await store.delete_if_equal("missing", b"mine")
    assert await store.delete_if_equal("k", b"mine")
    assert await store.get_many(["k", "other"]) == [None, b"theirs"]
    assert not await store.delete_if_equal("k", b"mine")


async def test_lease_is_exclusive_renewed_and_released_only_by_its_holder(harness):
    clock = harness.clock or WallClock()
    one = Lease(harness.store, "feed", "one", SHORT_TTL, clock)
    two = Lease(harness.store, "feed", "two", SHORT_TTL, clock)
    assert await one.acquire()
    assert one.held
    assert not await two.acquire()
    assert not await two.renew()
    assert not await two.release()
    assert await one.current_holder() == "one"
    assert await one.renew()
    assert await one.acquire()  # the holder acquiring again keeps it
    assert await one.release()
    assert not one.held
    assert await two.acquire()
    assert not await one.renew()
    assert await two.current_holder() == "two"


async def test_an_expired_lease_goes_to_another_and_the_old_holder_cannot_renew(harness):
    clock = harness.clock or WallClock()
    one = Lease(harness.store, "feed", "one", SHORT_TTL, clock)
    two = Lease(harness.store, "feed", "two", LONG_TTL, clock)
    assert await one.acquire()
    await harness.let_short_ttls_expire()
    assert not one.held
    assert await two.acquire()
    assert not await one.renew()
    assert not await one.release()
    assert await two.current_holder() == "two"


async def test_ping(harness):
    assert await harness.store.ping() is True


async def test_memory_ttl_follows_the_injected_clock_exactly():
    clock = ReplayClock(start=100.0)
    store = MemoryStateStore(clock)
    await store.set("k", b"v", ttl=10.0)
    await clock.advance_to(109.999)
    assert await store.get("k") == b"v"
    await clock.advance_to(110.0)
    assert await store.get("k") is None


async def test_memory_store_forgets_expired_keys_nobody_reads():
    """A long embedded run sets TTLs on keys it never reads again: memory stays bounded."""
    clock = ReplayClock(start=0.0)
    store = MemoryStateStore(clock)
    for n in range(5_000):
        await store.set(f"gone:{n}", b"v", ttl=1.0)
        await store.hset_many({f"hash:{n}": {"f": 1}}, ttl=1.0)
    for _ in range(5_000):
        await store.set("refreshed", b"v", ttl=100.0)
    await clock.advance_to(2.0)
    await store.set("kept", b"v")
    assert len(store._values) == 2  # "refreshed" and "kept"
    assert len(store._deadlines) <= 2 * len(store._expiry) + 1024
    assert await store.get("refreshed") == b"v"
    await clock.advance_to(100.0)
    await store.set("kept", b"v")
    assert len(store._values) == 1


@pytest.mark.redis
async def test_redis_namespaces_are_isolated_and_prefix_real_keys(
    redis_url, namespace, redis_client
):
    one = RedisStateStore(url=redis_url, namespace=namespace)
    other = RedisStateStore(url=redis_url, namespace=f"{namespace}x")
    try:
        await one.set("k", b"mine")
        await other.set("k", b"theirs")
        await one.hset_many({"h": {"f": 1}}, ttl=LONG_TTL)
        assert await one.get("k") == b"mine"
        assert await one.scan_keys("") == ["h", "k"]
        assert await redis_client.get(f"{namespace}:k") == b"mine"
        ttl_ms = await redis_client.pttl(f"{namespace}:h")
        assert 0 < ttl_ms <= LONG_TTL * 1000
        assert await redis_client.pttl(f"{namespace}:k") == -1
    finally:
        await one.delete_many(await one.scan_keys(""))
        await other.delete_many(await other.scan_keys(""))
        await one.close()
        await other.close()


@pytest.mark.redis
async def test_redis_batch_calls_take_one_round_trip(redis_url, namespace):
    store = RedisStateStore(url=redis_url, namespace=namespace)
    sent: list[int] = []
    try:
        await store.ping()
        # a script is loaded into Redis by its first call
        await store.append_bounded({"warm": [b"a"]}, 1)
        await store.hset_many({"warm:h": {"a": 1}}, ttl=LONG_TTL)
        connection_class = store._client.connection_pool.connection_class
        original = connection_class.send_packed_command

        async def counting(self, command, check_health=True):
            sent.append(1)
            return await original(self, command, check_health)

        connection_class_patch = pytest.MonkeyPatch()
        connection_class_patch.setattr(connection_class, "send_packed_command", counting)
        try:
            await store.set_many({f"k{i}": b"v" for i in range(50)}, ttl=LONG_TTL)
            await store.hset_many({f"h{i}": {"a": i} for i in range(50)}, ttl=LONG_TTL)
            await store.expire_many([f"k{i}" for i in range(50)], None)
            await store.get_many([f"k{i}" for i in range(50)])
            await store.append_bounded({f"l{i}": [b"a", b"b"] for i in range(50)}, 10, LONG_TTL)
            await store.lists([f"l{i}" for i in range(50)])
        finally:
            connection_class_patch.undo()
        assert len(sent) == 6
    finally:
        await store.delete_many(await store.scan_keys(""))
        await store.close()


@pytest.mark.redis
async def test_redis_ping_is_false_when_the_server_is_unreachable(namespace):
    store = RedisStateStore(url="redis://127.0.0.1:1/0", namespace=namespace)
    try:
        assert await store.ping() is False
    finally:
        await store.close()


async def test_write_stores_values_hashes_and_expiries_together(harness):
    store = harness.store
    await store.set_many({"retiring": b"x"})
    await store.hset_many({"kept": {"a": 1}}, ttl=SHORT_TTL)
    batch = WriteBatch()
    batch.set("v", b"1")
    batch.set("short", b"2", ttl=SHORT_TTL)
    batch.hset("h", {"f": 1.5, "g": b"\x00"})
    batch.hset("kept", {"b": "2"})
    batch.expire("retiring", SHORT_TTL)
    batch.expire("kept", None)
    batch.expire("missing", SHORT_TTL)
    assert batch
    await store.write(batch)
    assert await store.get_many(["v", "short", "retiring"]) == [b"1", b"2", b"x"]
    assert await store.hgetall("h") == {"f": b"1.5", "g": b"\x00"}
    assert await store.hgetall("kept") == {"a": b"1", "b": b"2"}
    await harness.let_short_ttls_expire()
    assert await store.get_many(["v", "short", "retiring", "missing"]) == [b"1", None, None, None]
    assert await store.hgetall("kept") == {"a": b"1", "b": b"2"}
    await store.write(WriteBatch())  # empty: nothing to do


async def test_a_write_stores_hashes_of_many_fields_and_removes_many(harness):
    store = harness.store
    fields = {f"f{i}": i for i in range(5000)}
    batch = WriteBatch()
    batch.set("v", b"1")
    batch.hset("h", fields)
    await store.write(batch)
    assert await store.hgetall("h") == {k: str(v).encode() for k, v in fields.items()}
    batch = WriteBatch()
    batch.set("v", b"2")
    batch.hdel("h", [f"f{i}" for i in range(1, 5000)])
    await store.write(batch)
    assert await store.hgetall("h") == {"f0": b"0"}


@pytest.mark.parametrize("kind", ["set", "set with TTL", "hset", "hdel", "expire", "persist"])
async def test_a_write_of_one_change_stores_it(harness, kind):
    store = harness.store
    await store.hset_many({"h": {"a": 1, "b": 2}}, ttl=SHORT_TTL)
    batch = WriteBatch()
    if kind == "set":
        batch.set("v", b"1")
    elif kind == "set with TTL":
        batch.set("v", b"1", ttl=SHORT_TTL)
    elif kind == "hset":
        batch.hset("h", {"c": True})
    elif kind == "hdel":
        batch.hdel("h", ("a",))
    elif kind == "expire":
        batch.expire("h", LONG_TTL)
    else:
        batch.expire("h", None)
    await store.write(batch)
    expected_h = {
        "hset": {"a": b"1", "b": b"2", "c": b"True"},
        "hdel": {"b": b"2"},
    }.get(kind, {"a": b"1", "b": b"2"})
    assert await store.hgetall("h") == expected_h
    if kind.startswith("set"):
        assert await store.get("v") == b"1"
    await harness.let_short_ttls_expire()
    assert await store.get("v") == (b"1" if kind == "set" else None)
    kept = kind in ("expire", "persist")
    assert await store.hgetall("h") == (expected_h if kept else {})


@pytest.mark.parametrize("conflict", ["a value", "a set", "a value of the write"])
@pytest.mark.parametrize("command", ["hset", "hdel"])
async def test_a_write_whose_hash_command_meets_no_hash_stores_nothing(harness, conflict, command):
    """Redis runs the write's hash command on such a key with WRONGTYPE, keeping what the
    write's commands before it stored (a record without its views); it is refused whole."""
    store = harness.store
    await store.set_many({"record": b"old"})
    if conflict == "a value":
        await store.set_many({"view": b"plain"})
    elif conflict == "a set":
        await store.add_member("view", "member", LONG_TTL)
    for fields in ({"f": 1}, {"g": 2}):
        batch = WriteBatch()
        batch.set("record", b"new")
        batch.set("other", b"new", ttl=LONG_TTL)
        batch.hset("index", fields)
        if conflict == "a value of the write":
            batch.set("view", b"plain")
        if command == "hset":
            batch.hset("view", {"f": 1})
        else:
            batch.hdel("view", ("f",))
        batch.expire("index", LONG_TTL)
        with pytest.raises(WrongKind) as refused:
            await store.write(batch)
        assert await store.get_many(["record", "other"]) == [b"old", None]
        assert await store.hgetall("index") == {}
        # which key, and what it holds: an operator is told what to remove
        assert refused.value.key == "view"
        assert refused.value.kind == ("set" if conflict == "a set" else "value")
        assert re.search(r"\bview holds a (set|value), not a hash", str(refused.value))
    expected = {"a value": b"plain", "a set": None, "a value of the write": None}[conflict]
    assert await store.get("view") == expected


@pytest.mark.parametrize("command", ["hset", "hdel"])
async def test_a_lone_hash_command_on_no_hash_names_its_key_and_what_it_holds(harness, command):
    """A write of one command goes to Redis alone, whose refusal names neither."""
    store = harness.store
    await store.add_member("members", "m", LONG_TTL)
    batch = WriteBatch()
    if command == "hset":
        batch.hset("members", {"f": 1})
    else:
        batch.hdel("members", ("f",))
    with pytest.raises(WrongKind) as refused:
        await store.write(batch)
    assert (refused.value.key, refused.value.kind) == ("members", "set")
    assert "members holds a set, not a hash" in str(refused.value)


async def test_a_write_with_a_ttl_past_any_clock_stores_it_all(harness):
    """Redis refuses an expiry past a signed 64-bit count of ms: the command after others
    of the write would fail, keeping theirs."""
    store = harness.store
    for ttl in (1e17, float("inf")):
        batch = WriteBatch()
        batch.set("first", b"1")
        batch.set("lasting", b"2", ttl=ttl)
        batch.hset("h", {"f": 1})
        batch.expire("h", ttl)
        await store.write(batch)
        assert await store.get_many(["first", "lasting"]) == [b"1", b"2"]
        assert await store.hgetall("h") == {"f": b"1"}
        await store.delete_many(["first", "lasting", "h"])
    await harness.let_short_ttls_expire()


@pytest.mark.redis
async def test_redis_out_of_memory_refuses_a_write_whole(own_redis):
    """Over maxmemory (noeviction) Redis refuses a script's first write and lets the rest
    through once one ran: a write is stored whole or refused whole, whatever comes first."""
    import redis.asyncio as aioredis
    from redis.exceptions import OutOfMemoryError

    client = aioredis.Redis.from_url(own_redis.url)
    store = RedisStateStore(url=own_redis.url, namespace="oom", client=client)
    try:
        await client.mset({f"filler{i}": b"x" * 10_000 for i in range(200)})
        used = (await client.info("memory"))["used_memory"]
        await client.config_set("maxmemory-policy", "noeviction")
        await client.config_set("maxmemory", used // 2)
        with pytest.raises(OutOfMemoryError):
            await client.set("probe", b"1")
        # the first write refused: nothing stored
        batch = WriteBatch()
        batch.set("record", b"new")
        batch.hset("view", {"f": 1})
        batch.expire("view", LONG_TTL)
        with pytest.raises(OutOfMemoryError):
            await store.write(batch)
        assert await store.get("record") is None
        assert await store.hgetall("view") == {}
        # a first write that may run out of memory (removing fields) lets the rest through
        batch = WriteBatch()
        batch.hdel("index", ("gone",))
        batch.hset("view", {"f": 1})
        batch.expire("view", LONG_TTL)
        await store.write(batch)
        assert await store.hgetall("view") == {"f": b"1"}
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_redis_writes_one_change_as_its_command_and_more_in_a_script(
    redis_url, namespace, redis_client
):
    name = f"{namespace}-writer"
    store = RedisStateStore(url=f"{redis_url}?client_name={name}", namespace=namespace)

    async def last_command() -> str:
        clients = await redis_client.client_list()
        return next(c["cmd"] for c in clients if c["name"] == name)

    try:
        one = WriteBatch()
        one.set("v", b"1", ttl=LONG_TTL)
        await store.write(one)
        assert await last_command() == "set"
        two = WriteBatch()
        two.set("v", b"2", ttl=LONG_TTL)
        two.hset("h", {"f": 1})
        await store.write(two)
        assert await last_command() == "evalsha"
    finally:
        await store.delete_many(await store.scan_keys(""))
        await store.close()


async def test_epoch_keeps_its_identity_and_ages(harness, namespace):
    store = harness.store
    marker = f"{namespace}:epoch"  # the marker is the server's: one of this test's own
    try:
        first, age = await store.epoch(marker)
        assert age < SHORT_TTL
        await harness.let_short_ttls_expire()
        same, older = await store.epoch(marker)
        assert same == first
        assert older >= SHORT_TTL
    finally:
        if isinstance(store, RedisStateStore):
            await store._client.delete(marker)


async def test_an_in_process_store_is_as_old_as_anything_that_uses_it():
    _, age = await MemoryStateStore(WallClock()).epoch()
    assert age == float("inf")


async def test_append_bounded_keeps_the_newest_of_each_list_until_the_ttl_runs_out(harness):
    store = harness.store
    await store.append_bounded({"a": [b"1", b"2"], "b": [b"x"], "c": []}, keep=3, ttl=SHORT_TTL)
    await store.append_bounded({"a": [b"3", b"4"]}, keep=3)
    assert await store.lists(["a", "b", "c", "missing"]) == [[b"2", b"3", b"4"], [b"x"], [], []]
    await store.append_bounded({"b": [b"y"]}, keep=3, ttl=LONG_TTL)
    await store.set("v", b"value")
    with pytest.raises(WrongKind):
        await store.append_bounded({"v": [b"1"]}, keep=3)
    assert await store.lists(["v"]) == [[]]  # a value is no list
    assert await store.get("a") is None  # a list is no value
    await harness.let_short_ttls_expire()
    assert await store.lists(["a", "b"]) == [[], [b"x", b"y"]]


async def test_an_append_to_a_key_holding_no_list_stores_nothing_of_it(harness):
    """A key of the append holding something else (a value, a set, a hash) refuses the
    whole append, naming the key and what it holds: a list before it in the append gets
    nothing (tried again, its values would be there twice)."""
    store = harness.store
    await store.append_bounded({"kept": [b"0"]}, keep=3)
    await store.add_member("members", "m", LONG_TTL)
    await store.hset_many({"fields": {"f": 1}})
    for taken, kind in (("members", "set"), ("fields", "hash")):
        with pytest.raises(WrongKind) as refused:
            await store.append_bounded(
                {"kept": [b"1"], "fresh": [b"1"], taken: [b"1"]}, keep=3, ttl=LONG_TTL
            )
        assert (refused.value.key, refused.value.kind) == (taken, kind)
        assert f"{taken} holds a {kind}, not a list" in str(refused.value)
    assert await store.lists(["kept", "fresh"]) == [[b"0"], []]


#: what a key can hold, and the write that makes it hold that
KINDS = ("value", "set", "list", "hash")


async def _fill(store: StateStore, key: str, kind: str) -> None:
    """Make ``key`` hold a ``kind``, expiring after LONG_TTL."""
    if kind == "value":
        await store.set(key, b"plain", ttl=LONG_TTL)
    elif kind == "set":
        await store.add_member(key, "member", LONG_TTL)
    elif kind == "list":
        await store.append_bounded({key: [b"item"]}, keep=3, ttl=LONG_TTL)
    else:
        await store.hset_many({key: {"field": b"kept"}}, ttl=LONG_TTL)


async def _holds(store: StateStore, key: str) -> object:
    """What ``key`` holds, read by each kind's read (a set by counting it again)."""
    value = await store.get(key)
    if value is not None:
        return value
    fields = await store.hgetall(key)
    if fields:
        return fields
    items = await store.lists([key])
    if items[0]:
        return items[0]
    return "set" if key in await store.scan_keys(key) else None


FILLED = {"value": b"plain", "set": "set", "list": [b"item"], "hash": {"field": b"kept"}}


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "hash"])
async def test_hset_many_to_a_key_holding_no_hash_stores_nothing_of_it(harness, kind):
    """Redis refuses a hash command on a key holding anything else (WRONGTYPE): no store
    overwrites it, nor sets fields of the other hashes of the call (tried again, the
    call would be refused again)."""
    store = harness.store
    await _fill(store, "taken", kind)
    for ttl in (None, SHORT_TTL):
        with pytest.raises(WrongKind) as refused:
            await store.hset_many({"fresh": {"f": 1}, "taken": {"f": 1}}, ttl=ttl)
        assert (refused.value.key, refused.value.kind) == ("taken", kind)
        assert f"taken holds a {kind}, not a hash" in str(refused.value)
        assert await store.hgetall("fresh") == {}
    await harness.let_short_ttls_expire()
    assert await _holds(store, "taken") == FILLED[kind]


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "set"])
async def test_add_member_to_a_key_holding_no_set_changes_nothing(harness, kind):
    store = harness.store
    await _fill(store, "taken", kind)
    with pytest.raises(WrongKind) as refused:
        await store.add_member("taken", "m", SHORT_TTL)
    assert (refused.value.key, refused.value.kind) == ("taken", kind)
    assert f"taken holds a {kind}, not a set" in str(refused.value)
    await harness.let_short_ttls_expire()
    assert await _holds(store, "taken") == FILLED[kind]


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "value"])
async def test_a_key_holding_no_value_is_neither_extended_nor_deleted_as_one(harness, kind):
    """A lease's key holding something else holds no holder: no compare-and-act matches."""
    store = harness.store
    await _fill(store, "taken", kind)
    assert not await store.extend_if_equal("taken", b"plain", SHORT_TTL)
    assert not await store.delete_if_equal("taken", b"plain")
    await harness.let_short_ttls_expire()
    assert await _holds(store, "taken") == FILLED[kind]


@pytest.mark.parametrize("kind", KINDS)
async def test_writes_of_any_kind_take_a_key_of_any_kind(harness, kind):
    """Setting a value replaces whatever a key holds, setting it if absent keeps it,
    deleting and expiring take it as it is: in Redis as in the process."""
    store = harness.store
    for key in ("set", "write", "absent", "deleted", "expired", "persisted"):
        await _fill(store, key, kind)
    await store.set_many({"set": b"new"})
    batch = WriteBatch()
    batch.set("write", b"new")
    await store.write(batch)
    assert not await store.set_if_absent("absent", b"new", LONG_TTL)
    await store.delete_many(["deleted"])
    await store.expire_many(["expired"], SHORT_TTL)
    await store.expire_many(["persisted"], None)
    batch = WriteBatch()
    batch.expire("persisted", SHORT_TTL)
    batch.expire("persisted", None)
    await store.write(batch)
    await harness.let_short_ttls_expire()
    assert await store.get_many(["set", "write"]) == [b"new", b"new"]
    assert await _holds(store, "absent") == FILLED[kind]
    assert await _holds(store, "deleted") is None
    assert await _holds(store, "expired") is None
    assert await _holds(store, "persisted") == FILLED[kind]
