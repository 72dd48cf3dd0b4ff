"""Shared key-value state: Redis when distributed, in-process when embedded.

Keys are plain strings; implementations prefix them with the run's namespace.
Values are bytes (hash fields: bytes, str or numbers in, bytes out).
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

HashValue = bytes | str | int | float

#: the types a hash field's value is stored as it comes (every other is made one first)
PLAIN_FIELD_TYPES = frozenset({bytes, str, int, float})

#: the key :meth:`StateStore.epoch` keeps: when the store's current contents began
EPOCH_MARKER = "store:epoch"

#: what :class:`WrongKind` says a key holds instead of a hash
WRONG_KINDS = ("value", "set", "list", "zset", "stream", "unknown")


def plain_field(value: HashValue) -> HashValue:
    """The value of a plain type a hash field stands for: itself if plain, a bool its
    ``str()`` spelling, a number of a subclass or of numpy's scalars (an IntEnum's
    member, ``numpy.float64``) the int or float it equals, so every store keeps its
    digits and not its ``repr`` (``np.float64(0.1)``). Raise TypeError naming a type of
    none."""
    if type(value) in PLAIN_FIELD_TYPES:
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a hash field's value is bytes, str, int or float, not {type(value).__name__}")


class WrongKind(TypeError):
    """A write sets or removes hash fields, list items or set members of a key that holds
    another kind (a plain value, a set), or hash fields of one it sets as a value too:
    nothing of it is stored.

    ``key`` is that key (as the caller names it; None when the store could not tell) and
    ``kind`` what it holds: one of :data:`WRONG_KINDS` (``value``, ``set``, ``list``,
    ``zset``, ``stream``, or ``unknown``), ``hash`` where the write was of another kind,
    or a type of a Redis module.
    """

    def __init__(self, message: str, *, key: str | None = None, kind: str = "unknown"):
        super().__init__(message)
        self.key = key
        self.kind = kind


@dataclass(slots=True)
class WriteBatch:
    """Values, hash fields and expiries that :meth:`StateStore.write` stores all or none of.

    Hash fields to remove (``unset``) go before the fields set; expiries apply after the
    values and hashes; ``None`` removes a key's TTL. A batch whose hash fields go to a key
    holding no hash, or to one it sets as a value, is refused whole (:class:`WrongKind`).
    """

    #: key -> (value, TTL or None)
    values: dict[str, tuple[bytes, float | None]] = field(default_factory=dict)
    hashes: dict[str, dict[str, HashValue]] = field(default_factory=dict)
    expiries: dict[str, float | None] = field(default_factory=dict)
    #: hash key -> fields to remove
    unset: dict[str, set[str]] = field(default_factory=dict)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self.values[key] = (value, ttl)

    def hset(self, key: str, fields: Mapping[str, HashValue]) -> None:
        self.hashes.setdefault(key, {}).update(fields)

    def expire(self, key: str, ttl: float | None) -> None:
        self.expiries[key] = ttl

    def hdel(self, key: str, fields: Iterable[str]) -> None:
        self.unset.setdefault(key, set()).update(fields)

    def __bool__(self) -> bool:
        return bool(self.values or self.hashes or self.expiries or self.unset)

    @classmethod
    def of_hashes(
        cls, items: Mapping[str, Mapping[str, HashValue]], ttl: float | None = None
    ) -> WriteBatch:
        """The batch :meth:`StateStore.hset_many` stores: refused whole like any other."""
        batch = cls()
        for key, fields in items.items():
            if not fields:
                continue  # like Redis: an empty HSET creates no key
            batch.hset(key, fields)
            if ttl is not None:
                batch.expire(key, ttl)
        return batch


class StateStore(ABC):
    """Batched get/set of values and hashes with optional TTLs (seconds)."""

    @abstractmethod
    async def get_many(self, keys: Iterable[str]) -> list[bytes | None]:
        """Return the values of ``keys`` in order; None where missing or expired."""

    @abstractmethod
    async def set_many(self, items: Mapping[str, bytes], ttl: float | None = None) -> None:
        """Set values in one round trip; a TTL applies to every key set."""

    @abstractmethod
    async def delete_many(self, keys: Iterable[str]) -> None:
        """Delete keys (values or hashes)."""

    @abstractmethod
    async def hset_many(
        self, items: Mapping[str, Mapping[str, HashValue]], ttl: float | None = None
    ) -> None:
        """Set fields of several hashes in one round trip; TTL None keeps the key's TTL.

        A key holding no hash refuses the whole call (:class:`WrongKind`), as :meth:`write`
        does."""

    @abstractmethod
    async def write(self, batch: WriteBatch) -> None:
        """Store ``batch`` atomically, in one round trip: a reader sees all of it or none."""

    @abstractmethod
    async def append_bounded(
        self, items: Mapping[str, Sequence[bytes]], keep: int, ttl: float | None = None
    ) -> None:
        """Append values to the lists at ``items``' keys (empty when missing), each list
        then keeping its newest ``keep``, atomically and in one round trip; a TTL applies
        to every list appended to (None keeps its TTL). A key holding something else is
        refused (:class:`WrongKind`). Values appended again after a lost reply are there
        twice."""

    @abstractmethod
    async def lists(self, keys: Iterable[str]) -> list[list[bytes]]:
        """The lists at ``keys`` in order, each oldest first, in one round trip ([] where
        missing or expired)."""

    @abstractmethod
    async def hgetall(self, key: str) -> dict[str, bytes]:
        """Return a hash's fields ({} when missing)."""

    @abstractmethod
    async def expire_many(self, keys: Iterable[str], ttl: float | None) -> None:
        """Set (or with None, remove) the TTL of existing keys."""

    @abstractmethod
    async def scan_keys(self, prefix: str) -> list[str]:
        """Return every live key that starts with ``prefix`` (unprefixed by namespace)."""

    @abstractmethod
    async def set_if_absent(self, key: str, value: bytes, ttl: float) -> bool:
        """Atomically set ``key`` with a TTL unless it exists; True when set."""

    @abstractmethod
    async def add_member(self, key: str, member: str, ttl: float) -> int:
        """Atomically add ``member`` to the set at ``key`` (empty when missing) and give
        it ``ttl``; return how many members it holds.

        A member the set holds already changes nothing but the TTL, so a call made again
        after its reply was lost (done by the store, never answered) counts once. A key
        holding no set is refused (:class:`WrongKind`), its TTL kept.
        """

    @abstractmethod
    async def extend_if_equal(self, key: str, value: bytes, ttl: float) -> bool:
        """Atomically reset the TTL of ``key`` if it still holds ``value``; True when done.

        A key holding no value (a hash, a set) holds no ``value``: False."""

    @abstractmethod
    async def expires_in(self, key: str) -> float | None:
        """Seconds until ``key``'s TTL runs out (inf: it has none); None when missing."""

    @abstractmethod
    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        """Atomically delete ``key`` if it still holds ``value``; True when deleted (never a
        key holding no value)."""

    @abstractmethod
    async def epoch(self, marker: str = EPOCH_MARKER) -> tuple[bytes, float]:
        """The identity and age (seconds, by the store's clock) of what the store holds.

        ``marker`` is a key without TTL holding when it was written, written now if
        missing (age 0). A store that lost its contents (a restart without persistence,
        a flush, a failover to an empty replica) lost the marker with them: a new
        identity says so, and the age bounds how long the store has held what it holds.
        The marker belongs to the server, not to a namespace: a server loses its
        contents as a whole.
        """

    @property
    def connections(self) -> int:
        """Connections to the server opened so far. A client that reconnects and retries
        by itself hides a restart from its callers, and a server that restarted may have
        come back empty: a holder of the :meth:`epoch` reads it again when this changes.
        A store without connections answers 0."""
        return 0

    @abstractmethod
    async def ping(self) -> bool:
        """True when the store answers."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release connections."""

    async def get(self, key: str) -> bytes | None:
        return (await self.get_many([key]))[0]

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        await self.set_many({key: value}, ttl)
