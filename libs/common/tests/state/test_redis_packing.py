"""The Redis store's connections pack commands with hiredis, byte for byte as redis-py's
own Python packing would. No server needed."""

from __future__ import annotations

import enum

import numpy as np
import pytest
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import DataError

from pumpflow.common.state import redis as redis_store
from pumpflow.common.state.abc import plain_field
from pumpflow.common.state.redis import RedisStateStore

COMMANDS = [
    ("SET", "ns:key:a", bytes(range(256)) * 8, "PX", 600_000),
    ("HSET", "ns:view:a", "price", 1.0000000000000002, "n", 3, "name", "é", "raw", b"\x00"),
    ("EVALSHA", "a" * 40, 2, "ns:k1", "ns:k2", "SET", 1, b"x", "PEXPIRE", 1, 2**62),
    ("CONFIG GET", "maxmemory"),
    ("HSET", "ns:view:b", "small", 1e-320, "neg", -0.0, "big", 10**20),
]


async def test_the_stores_connections_pack_with_hiredis(monkeypatch):
    """A group commit with a view of 30 fields a key cost the client three times the CPU
    packed by redis-py's asyncio Python code."""
    packed = []
    pack = redis_store.hiredis.pack_command
    monkeypatch.setattr(
        redis_store.hiredis, "pack_command", lambda args: packed.append(args) or pack(args)
    )
    store = RedisStateStore(url="redis://127.0.0.1:6379/0", namespace="unused")
    try:
        connection = store._client.connection_pool.make_connection()
        python = Connection()
        for command in COMMANDS:
            assert b"".join(connection.pack_command(*command)) == b"".join(
                python.pack_command(*command)
            )
        assert len(packed) == len(COMMANDS)
        for refused in (True, None, object()):
            with pytest.raises(DataError):
                connection.pack_command("SET", "k", refused)
        assert connection.pack_command("SET", "k", bytearray(b"v")) == python.pack_command(
            "SET", "k", b"v"
        )
    finally:
        await store.close()


async def test_a_tls_url_keeps_its_connection_kind():
    store = RedisStateStore(url="rediss://127.0.0.1:6379/0", namespace="unused")
    try:
        pool = store._client.connection_pool
        assert issubclass(pool.connection_class, SSLConnection)
        assert issubclass(pool.connection_class, redis_store._HiredisPacking)
    finally:
        await store.close()


@pytest.mark.parametrize(
    "fields",
    [
        {f"f{i}": i * 0.5 for i in range(30)},
        {f"f{i}": i for i in range(600)},
        {"a": 1.5, "b": True, "c": b"x", "d": "s"},
        {f"f{i}": i % 3 == 0 for i in range(300)},
        {"a": np.float64(0.25), "b": 2, "c": np.int32(-1)},
        {},
    ],
)
def test_a_hashs_fields_flatten_as_one_call_a_field_would(fields):
    slow = [
        [part for k, v in chunk for part in (k, plain_field(v))]
        for chunk in redis_store._chunks(list(fields.items()))
    ]
    assert redis_store._field_pairs(fields) == slow


async def test_an_int_or_float_of_a_subclass_packs_as_redis_py_packs_it():
    """hiredis refuses an int's subclass (an IntEnum's member, say) that redis-py packs
    by its repr: such a value is packed as redis-py packs it, not refused."""

    class Count(int):
        pass

    class Level(enum.IntEnum):
        HIGH = 3

    class Price(float):
        pass

    store = RedisStateStore(url="redis://127.0.0.1:6379/0", namespace="unused")
    try:
        connection = store._client.connection_pool.make_connection()
        python = Connection()
        for value in (Count(7), Level.HIGH, Price(2.5), bytearray(b"v"), memoryview(b"m")):
            command = ("HSET", "ns:view:a", "f", value, "g", 1)
            assert b"".join(map(bytes, connection.pack_command(*command))) == b"".join(
                map(bytes, python.pack_command(*command))
            )
        for refused in (True, None, object(), 1j):
            with pytest.raises(DataError) as hiredis_packing:
                connection.pack_command("SET", "k", refused)
            with pytest.raises(DataError) as python_packing:
                python.pack_command("SET", "k", refused)
            assert str(hiredis_packing.value) == str(python_packing.value)
    finally:
        await store.close()


@pytest.mark.parametrize("query", ["encoding=latin-1", "encoding_errors=replace"])
async def test_a_url_setting_another_encoding_keeps_redis_pys_packing(query):
    """hiredis spells a str in UTF-8, strictly: a client set to encode otherwise packs as
    redis-py does, in the encoding it was given."""
    store = RedisStateStore(url=f"redis://127.0.0.1:6379/0?{query}", namespace="unused")
    try:
        connection = store._client.connection_pool.make_connection()
        python = Connection(**store._client.connection_pool.connection_kwargs)

        def packed(connection, value):
            try:
                return connection.pack_command("SET", "k", value)
            except UnicodeEncodeError as exc:
                return str(exc)

        for value in ("é", "\ud800"):
            assert packed(connection, value) == packed(python, value)
    finally:
        await store.close()


async def test_a_client_given_keeps_its_connection_kind():
    """The store packs with hiredis on the connections it opens itself; a caller's client
    goes on packing as its caller set it up."""
    import redis.asyncio as redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    store = RedisStateStore(url="redis://unused", namespace="unused", client=client)
    try:
        assert client.connection_pool.connection_class is Connection
    finally:
        await store.close()
        await client.aclose()
