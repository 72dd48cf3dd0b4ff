"""FeatureCache: each token's latest feature vector, in memory and in a StateStore.

The store holds a vector as the hash ``<prefix><mint>`` (``features:<mint>`` in the
services): one field per feature plus
:data:`~pumpflow.common.features.manager.META_FIELDS` (version, seq, out_seq, time,
updated_at), written by :meth:`FeatureVector.fields
<pumpflow.common.features.manager.FeatureVector.fields>` and read back by
:func:`decode_vector`. Infrastructure, not the features domain: the cache does the I/O,
the domain computes the vectors.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping

from pumpflow.common.features.manager import META_FIELDS, FeatureVector
from pumpflow.common.state.abc import HashValue, StateStore

Write = Callable[[Mapping[str, Mapping[str, HashValue]]], Awaitable[None]]


class FeatureCache:
    """Bounded in-process LRU of feature vectors in front of a StateStore (optional).

    In the store a vector is the hash ``<prefix><mint>``: one field per feature plus
    :data:`META_FIELDS` (version, seq, out_seq, time, updated_at). ``add`` writes it
    through, in one ``hset_many`` with any other hashes given (a checkpoint); ``write``
    replaces the store's ``hset_many`` (a group commit coalescing concurrent adds).
    ``get`` reads the LRU first, then the store, and checks the feature-set version.

    ``keep_reads=False`` keeps only what this process added in memory: a replica
    serving reads for tokens another replica updates (or whose keys expire) must not
    answer from a copy of the store it took earlier.
    """

    def __init__(
        self,
        store: StateStore | None = None,
        *,
        max_entries: int = 10_000,
        prefix: str = "features:",
        ttl: float | None = None,
        write: Write | None = None,
        keep_reads: bool = True,
    ):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._store = store
        self._max = max_entries
        self._prefix = prefix
        self._ttl = ttl
        self._write = write
        self._keep_reads = keep_reads
        self._lru: OrderedDict[str, FeatureVector] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, mint: str) -> bool:
        return mint in self._lru

    def key(self, mint: str) -> str:
        """The store key of ``mint``'s hash."""
        return self._prefix + mint

    def _remember(self, vector: FeatureVector) -> None:
        lru = self._lru
        lru[vector.mint] = vector
        lru.move_to_end(vector.mint)
        if len(lru) > self._max:
            lru.popitem(last=False)

    async def add(
        self,
        vector: FeatureVector,
        *,
        write_through: bool = True,
        extra: Mapping[str, Mapping[str, HashValue]] | None = None,
    ) -> None:
        """Cache ``vector``; write it (and the ``extra`` hashes) to the store in one call."""
        self._remember(vector)
        if not write_through or self._store is None:
            return
        items: dict[str, Mapping[str, HashValue]] = {self._prefix + vector.mint: vector.fields()}
        if extra:
            items.update(extra)
        if self._write is not None:
            await self._write(items)
        else:
            await self._store.hset_many(items, self._ttl)

    async def get(self, mint: str, *, version: str | None = None) -> FeatureVector | None:
        """The cached vector of ``mint``; None if missing or of another version."""
        vector = self._lru.get(mint)
        if vector is not None:
            self._lru.move_to_end(mint)
        elif self._store is not None:
            vector = decode_vector(mint, await self._store.hgetall(self._prefix + mint))
            if vector is not None and self._keep_reads:
                self._remember(vector)
        if vector is not None and version is not None and vector.version != version:
            return None
        return vector

    async def expire(self, mint: str, ttl: float | None, *, also: Iterable[str] = ()) -> None:
        """Set (None: remove) the TTL of ``mint``'s hash and of the keys ``also``.

        With a TTL the vector leaves memory, so reads follow the store's expiry.
        """
        if ttl is not None:
            self._lru.pop(mint, None)
        if self._store is not None:
            await self._store.expire_many([self._prefix + mint, *also], ttl)

    async def clear(self, mint: str | None = None, *, from_store: bool = False) -> None:
        """Forget one mint (or everything in memory); optionally delete from the store."""
        if mint is None:
            self._lru.clear()
            return
        self._lru.pop(mint, None)
        if from_store and self._store is not None:
            await self._store.delete_many([self._prefix + mint])


def decode_vector(mint: str, stored: Mapping[str, bytes]) -> FeatureVector | None:
    """The vector of ``mint`` from its store hash; None for an empty hash."""
    if not stored:
        return None
    names = tuple(name for name in stored if name not in META_FIELDS)
    return FeatureVector(
        mint=mint,
        version=stored.get("version", b"").decode(),
        seq=int(stored.get("seq", b"0")),
        time=float(stored.get("time", b"0")),
        names=names,
        values=tuple(float(stored[name]) for name in names),
        out_seq=int(stored.get("out_seq", b"0")),
        updated_at=float(stored.get("updated_at", b"0")),
    )
