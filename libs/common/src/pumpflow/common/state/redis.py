"""Redis StateStore for distributed runs: one pipeline (one round trip) per batch call.

Every socket operation of the store's client is bounded (``socket_timeout``, connecting
included): a Redis that never answers (a frozen host, a network lost without a reset)
fails the call that meets it with redis-py's TimeoutError, Redis's transient failure,
which the work waits out as Redis away; redis-py drops the connection that timed out,
so none is handed out again with a reply still owed on it. No command of the store
blocks on the server (no BLPOP, no XREAD BLOCK): each answers at once, so one bound
fits all.
"""

from __future__ import annotations

import asyncio
import codecs
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain

import hiredis
import redis.asyncio as redis

from pumpflow.common.state.abc import (
    EPOCH_MARKER,
    PLAIN_FIELD_TYPES,
    HashValue,
    StateStore,
    WriteBatch,
    WrongKind,
    plain_field,
)
from pumpflow.common.timeouts import REDIS_SOCKET_TIMEOUT_S

_GLOB_SPECIALS = re.compile(r"([\\*?\[\]])")

#: the longest TTL given to Redis (146 million years): it refuses an expiry whose time
#: (now + TTL, in ms) is past a signed 64-bit number, as the in-process store never does
_MAX_TTL_MS = 2**62


def _ttl_ms(ttl: float) -> int:
    # Redis rejects a zero expiry; a TTL below a millisecond still has to expire the key.
    ms = ttl * 1000
    return _MAX_TTL_MS if ms >= _MAX_TTL_MS else max(1, round(ms))


# compare-and-act scripts: Redis runs a script atomically, so no other client can take
# the key between the comparison and the action. A key holding no value (a hash, a set)
# matches nothing: GET's WRONGTYPE, caught, is no value
_EXTEND_IF_EQUAL = """
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_DELETE_IF_EQUAL = """
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
# a member added to a set, refused (the key's TTL kept) when the key holds no set: a
# transaction's SADD would fail alone, its PEXPIRE applied to the other kind's key.
# ARGV: the member, the TTL in ms
_ADD_MEMBER = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'set' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. kind .. ' ' .. KEYS[1])
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('SCARD', KEYS[1])
"""

# the marker holds the server's time (ms) when written; TIME inside a script is fine
# since Redis 5 (scripts replicate their effects, not themselves)
_EPOCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local written = redis.call('GET', KEYS[1])
if not written then
    written = string.format('%d', now)
    redis.call('SET', KEYS[1], written)
end
return {written, now - tonumber(written)}
"""

# a write batch of several commands: a script runs atomically, as MULTI/EXEC would, but
# is one command and one reply; redis-py's transaction pipeline took two to three times
# the client's CPU of this (a command and a parsed reply each, MULTI, EXEC, the
# pipeline's set-up). ARGV holds each command as its name, its argument count and its
# arguments after the key; KEYS holds the keys, one a command, in order.
# A script that fails midway keeps what it wrote (Redis rolls nothing back), so what
# could fail a command is refused before the first: a hash command on a key holding no
# hash, or on one the batch sets as a value (WRONGTYPE). Out of memory fails a script
# only at its first write; expiries are bounded (_MAX_TTL_MS); the other commands take
# any key.
_WRITE = """
local at = 1
local kinds = {}
for k = 1, #KEYS do
    local name, key = ARGV[at], KEYS[k]
    if name == 'SET' then
        kinds[key] = 'string'
    elseif name == 'HSET' or name == 'HDEL' then
        local kind = kinds[key]
        if not kind then
            kind = redis.call('TYPE', key)['ok']
            kinds[key] = kind
        end
        if kind ~= 'hash' and kind ~= 'none' then
            return redis.error_reply('WRONGTYPE ' .. kind .. ' ' .. key)
        end
    end
    at = at + 2 + tonumber(ARGV[at + 1])
end
at = 1
for k = 1, #KEYS do
    local count = tonumber(ARGV[at + 1])
    redis.call(ARGV[at], KEYS[k], unpack(ARGV, at + 2, at + 1 + count))
    at = at + 2 + count
end
return #KEYS
"""
#: hash fields a command of a write carries at most (Lua's unpack takes a few thousand)
_FIELDS_PER_COMMAND = 256
# an append to bounded lists, refused whole (before its first write, as _WRITE) when a
# key holds no list: a transaction's RPUSH would fail alone, the other lists appended to.
# ARGV: how many of each list to keep, the TTL in ms (0: kept as it is), then each key's
# count of values and its values, in the order of KEYS
_APPEND = """
for k = 1, #KEYS do
    local kind = redis.call('TYPE', KEYS[k])['ok']
    if kind ~= 'list' and kind ~= 'none' then
        return redis.error_reply('WRONGTYPE ' .. kind .. ' ' .. KEYS[k])
    end
end
local keep, ttl, at = tonumber(ARGV[1]), tonumber(ARGV[2]), 3
for k = 1, #KEYS do
    local last = at + tonumber(ARGV[at])
    for first = at + 1, last, 256 do
        redis.call('RPUSH', KEYS[k], unpack(ARGV, first, math.min(first + 255, last)))
    end
    redis.call('LTRIM', KEYS[k], -keep, -1)
    if ttl > 0 then
        redis.call('PEXPIRE', KEYS[k], ttl)
    end
    at = last + 1
end
return #KEYS
"""


class _HiredisPacking:
    """A connection that packs its commands with hiredis (C), as redis-py's synchronous
    client does; its asyncio one packs them in Python, an ``Encoder.encode`` and a bytes
    join an argument: a key of a group commit with a view of 30 fields cost the client
    three times the CPU (``benchmarks/state_store.py``, ``--python-packing`` for the
    Python packing). The bytes on the wire are the same; what hiredis does not take
    is encoded by redis-py's encoder, as before (a bool or None refused by it)."""

    def pack_command(self, *args):
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            # what hiredis does not take (a bytearray, an int's or a float's subclass such
            # as an IntEnum's member) is encoded as redis-py encodes it, which refuses what
            # it refuses (DataError, its message)
            encoded = map(self.encoder.encode, args)
            return [
                hiredis.pack_command(
                    tuple(bytes(a) if isinstance(a, bytearray) else a for a in encoded)
                )
            ]


_PACKING: dict[type, type] = {}


def _packing_with_hiredis(pool: redis.ConnectionPool) -> None:
    """Make the connections ``pool`` opens from now on pack with hiredis, unless they
    encode a str otherwise than hiredis does (UTF-8, strictly)."""
    base = pool.connection_class
    settings = pool.connection_kwargs
    if (
        issubclass(base, _HiredisPacking)
        or codecs.lookup(settings.get("encoding", "utf-8")).name != "utf-8"
        or settings.get("encoding_errors", "strict") != "strict"
    ):
        return
    packing = _PACKING.get(base)
    if packing is None:
        packing = _PACKING[base] = type(base.__name__, (_HiredisPacking, base), {})
    pool.connection_class = packing


def _field_pairs(fields: Mapping[str, HashValue]) -> list[list]:
    """The fields' names and values in turn, a list a command (_FIELDS_PER_COMMAND fields
    each at most). The flattening is left to C unless a value is of another type than
    the plain ones (redis-py refuses bools and spells a number of a subclass by its
    repr): a view's 30 fields went through a Python call each, about a quarter of a
    commit's client CPU."""
    if not PLAIN_FIELD_TYPES.issuperset(map(type, fields.values())):
        return [
            [part for k, v in chunk for part in (k, plain_field(v))]
            for chunk in _chunks(list(fields.items()))
        ]
    if 0 < len(fields) <= _FIELDS_PER_COMMAND:  # none: no command, as HSET takes one
        return [list(chain.from_iterable(fields.items()))]
    return [list(chain.from_iterable(chunk)) for chunk in _chunks(list(fields.items()))]


def _chunks(items: list) -> list[list]:
    return [items[i : i + _FIELDS_PER_COMMAND] for i in range(0, len(items), _FIELDS_PER_COMMAND)]


class RedisStateStore(StateStore):
    """Keys live under ``<namespace>:``; TTLs are kept to the millisecond.

    The store's own client bounds each socket operation by ``socket_timeout`` seconds
    (redis-py's default changed between its versions, from none to 5 s); a ``client``
    given is used as its caller set it up.
    """

    def __init__(
        self,
        *,
        url: str,
        namespace: str,
        client: redis.Redis | None = None,
        socket_timeout: float = REDIS_SOCKET_TIMEOUT_S,
    ):
        self.namespace = namespace
        self._prefix = f"{namespace}:"
        self._client = (
            client
            if client is not None
            else redis.Redis.from_url(
                url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
            )
        )
        self._owns_client = client is None
        if self._owns_client:
            # a caller's client packs as its caller set it up: its own commands are its
            # own business (the store only counts the connections the client opens)
            _packing_with_hiredis(self._client.connection_pool)
        self._extend_if_equal = self._client.register_script(_EXTEND_IF_EQUAL)
        self._delete_if_equal = self._client.register_script(_DELETE_IF_EQUAL)
        self._epoch = self._client.register_script(_EPOCH)
        self._write = self._client.register_script(_WRITE)
        self._append = self._client.register_script(_APPEND)
        self._add_member = self._client.register_script(_ADD_MEMBER)
        self._connections = 0
        self._count_connections()

    def _count_connections(self) -> None:
        # redis-py reconnects and retries a command by itself: the count is how a caller
        # learns that a connection was opened again, maybe to a server restarted empty
        kwargs = self._client.connection_pool.connection_kwargs
        given = kwargs.get("redis_connect_func")

        async def connected(connection) -> None:
            if given is None:
                await connection.on_connect()
            elif asyncio.iscoroutinefunction(given):
                await given(connection)
            else:
                given(connection)
            self._connections += 1

        kwargs["redis_connect_func"] = connected

    @property
    def connections(self) -> int:
        return self._connections

    def _key(self, key: str) -> str:
        return self._prefix + key

    async def get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        full = [self._key(k) for k in keys]
        if not full:
            return []
        # MGET answers nil for keys holding a hash, as the contract wants
        return list(await self._client.mget(full))

    async def set_many(self, items: Mapping[str, bytes], ttl: float | None = None) -> None:
        if not items:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for key, value in items.items():
                if ttl is None:
                    pipe.set(self._key(key), bytes(value))
                else:
                    pipe.set(self._key(key), bytes(value), px=_ttl_ms(ttl))
            await pipe.execute()

    async def delete_many(self, keys: Iterable[str]) -> None:
        full = [self._key(k) for k in keys]
        if full:
            await self._client.delete(*full)

    async def hset_many(
        self, items: Mapping[str, Mapping[str, HashValue]], ttl: float | None = None
    ) -> None:
        # as a write: a pipeline's HSET on a key holding no hash would fail alone, the
        # other hashes of the call set
        await self._run(self._commands(WriteBatch.of_hashes(items, ttl)))

    async def write(self, batch: WriteBatch) -> None:
        await self._run(self._commands(batch))

    async def _run(self, commands: list[tuple]) -> None:
        """Run the commands of a write atomically, refused whole by a key of a wrong kind."""
        try:
            if len(commands) == 1:
                # one command is atomic by itself (about half the client's CPU of a
                # one-key write, the common checkpoint, against the script)
                await self._client.execute_command(*commands[0])
            elif commands:
                keys = []
                args: list = []
                for name, key, *rest in commands:
                    keys.append(key)
                    args += (name, len(rest), *rest)
                await self._write(keys=keys, args=args)
        except redis.ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                raise await self._write_refusal(str(exc), commands) from exc
            raise

    async def _write_refusal(self, reply: str, commands: list[tuple]) -> WrongKind:
        """The refusal of a write, naming the key that holds no hash and what it holds: the
        script's reply says (``WRONGTYPE <type> <key>``); a lone command's, Redis' own,
        does not, so the key's type is asked for."""
        words = reply.split(" ", 2)
        if len(commands) > 1 and len(words) == 3:
            kind, key = words[1], words[2]
        else:
            key = commands[0][1]
            try:
                kind = (await self._client.type(key)).decode()
            except (redis.RedisError, OSError):
                kind = "unknown"
        return self._wrong_kind(key, kind, wanted="hash", what="write")

    def _wrong_kind(self, key: str, kind: str, *, wanted: str, what: str) -> WrongKind:
        """A refusal of the ``what`` because the (full) ``key`` holds a ``kind`` of Redis."""
        # a string is what the store calls a value
        kind = "value" if kind == "string" else kind
        return WrongKind(
            f"{key} holds a {kind}, not a {wanted}: nothing of the {what} is stored",
            key=key.removeprefix(self._prefix),
            kind=kind,
        )

    def _script_refusal(
        self, exc: redis.ResponseError, *, wanted: str, what: str
    ) -> WrongKind | None:
        """The refusal of a script that replied ``WRONGTYPE <type> <key>``; None for
        another error."""
        words = str(exc).split(" ", 2)
        if words[0] == "WRONGTYPE" and len(words) == 3:
            return self._wrong_kind(words[2], words[1], wanted=wanted, what=what)
        return None

    def _commands(self, batch: WriteBatch) -> list[tuple]:
        """The Redis commands of ``batch``, in the order the contract applies them."""
        commands: list[tuple] = []
        for key, (value, ttl) in batch.values.items():
            if ttl is None:
                commands.append(("SET", self._key(key), bytes(value)))
            else:
                commands.append(("SET", self._key(key), bytes(value), "PX", _ttl_ms(ttl)))
        for key, names in batch.unset.items():
            for chunk in _chunks(list(names)):
                commands.append(("HDEL", self._key(key), *chunk))
        for key, fields in batch.hashes.items():
            commands.extend(("HSET", self._key(key), *pairs) for pairs in _field_pairs(fields))
        for key, ttl in batch.expiries.items():
            if ttl is None:
                commands.append(("PERSIST", self._key(key)))
            else:
                commands.append(("PEXPIRE", self._key(key), _ttl_ms(ttl)))
        return commands

    async def append_bounded(
        self, items: Mapping[str, Sequence[bytes]], keep: int, ttl: float | None = None
    ) -> None:
        items = {key: appended for key, appended in items.items() if appended}
        if not items:
            return
        args: list = [keep, 0 if ttl is None else _ttl_ms(ttl)]
        for appended in items.values():
            args += (len(appended), *(bytes(value) for value in appended))
        try:
            await self._append(keys=[self._key(key) for key in items], args=args)
        except redis.ResponseError as exc:
            refusal = self._script_refusal(exc, wanted="list", what="append")
            if refusal is None:
                raise
            raise refusal from exc

    async def lists(self, keys: Iterable[str]) -> list[list[bytes]]:
        full = [self._key(k) for k in keys]
        if not full:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for key in full:
                pipe.lrange(key, 0, -1)
            found = await pipe.execute(raise_on_error=False)
        # a key holding no list reads as none, like a hash read as a value
        return [list(f) if isinstance(f, list) else [] for f in found]

    async def hgetall(self, key: str) -> dict[str, bytes]:
        try:
            raw = await self._client.hgetall(self._key(key))
        except redis.ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                return {}
            raise
        return {name.decode(): value for name, value in raw.items()}

    async def expire_many(self, keys: Iterable[str], ttl: float | None) -> None:
        full = [self._key(k) for k in keys]
        if not full:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for key in full:
                if ttl is None:
                    pipe.persist(key)
                else:
                    pipe.pexpire(key, _ttl_ms(ttl))
            await pipe.execute()

    async def scan_keys(self, prefix: str) -> list[str]:
        pattern = _GLOB_SPECIALS.sub(r"\\\1", self._prefix + prefix) + "*"
        cut = len(self._prefix)
        found = {
            key.decode()[cut:] async for key in self._client.scan_iter(match=pattern, count=1000)
        }
        return sorted(found)

    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        return bool(await self._client.set(self._key(key), bytes(value), nx=True, px=_ttl_ms(ttl)))

    async def add_member(self, key: str, member: str, ttl: float) -> int:
        try:
            count = await self._add_member(keys=[self._key(key)], args=[member, _ttl_ms(ttl)])
        except redis.ResponseError as exc:
            refusal = self._script_refusal(exc, wanted="set", what="addition")
            if refusal is None:
                raise
            raise refusal from exc
        return int(count)

    async def extend_if_equal(self, key: str, value: bytes, ttl: float) -> bool:
        done = await self._extend_if_equal(keys=[self._key(key)], args=[bytes(value), _ttl_ms(ttl)])
        return bool(done)

    async def expires_in(self, key: str) -> float | None:
        left_ms = await self._client.pttl(self._key(key))
        if left_ms == -2:  # missing
            return None
        return math.inf if left_ms == -1 else left_ms / 1000

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        return bool(await self._delete_if_equal(keys=[self._key(key)], args=[bytes(value)]))

    async def epoch(self, marker: str = EPOCH_MARKER) -> tuple[bytes, float]:
        # outside the namespace: the server's contents are lost as a whole
        written, age_ms = await self._epoch(keys=[marker])
        return bytes(written), max(0, int(age_ms)) / 1000

    async def ping(self) -> bool:
        try:
            await self.reach()
        except (redis.RedisError, OSError):
            return False
        return True

    async def reach(self) -> None:
        """Ping Redis; raise its error (refused, a password wanted, ...) if it does not
        answer."""
        await self._client.ping()

    async def eviction_policy(self) -> str | None:
        """Redis's ``maxmemory-policy`` if it evicts keys (a ``maxmemory`` set and a
        policy other than ``noeviction``); None if it never evicts, or will not say (a
        managed server may refuse CONFIG)."""
        try:
            config = await self._client.config_get("maxmemory*")
        except redis.ResponseError:
            return None
        policy = config.get("maxmemory-policy", "noeviction")
        if int(config.get("maxmemory", 0) or 0) == 0 or policy == "noeviction":
            return None
        return policy

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()
