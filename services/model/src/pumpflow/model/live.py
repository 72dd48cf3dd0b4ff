"""The live figures' outcomes, shared by the replicas through the state store.

Each replica scores and labels the tokens of its own partitions; the rolling figures
(:class:`~pumpflow.common.model.performance.RollingPerformance`) are the deployment's
when every replica adds the outcomes it counted to one bounded list per model and arm
here and computes from those lists. A replica adds its new outcomes once per round of
its monitor (``model_monitor_s``: their lists named, then appended to) and reads every
list back in two: nothing on the scoring path. The lists are named in an index hash,
so a read asks for them by name (no scan of the store's keys); each list outlives its
last write by ``ttl`` (1 day), then goes with its name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from pumpflow.common.model.performance import Outcome
from pumpflow.common.state.abc import StateStore, WriteBatch

#: the hash naming the lists, and the lists' prefix
INDEX_KEY = "model:live"
LIST_PREFIX = "model:live:"
#: a model and arm no replica labelled for this long loses its window
TTL_S = 86_400.0

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Outcome).decode
_encode_name = msgspec.json.Encoder().encode
_decode_name = msgspec.json.Decoder(tuple[str, str]).decode


class StoreOutcomes:
    """:class:`~pumpflow.common.model.performance.SharedOutcomes` in a state store
    (Redis when distributed, the in-process one when embedded)."""

    def __init__(self, store: StateStore, *, ttl: float = TTL_S):
        self.store = store
        self.ttl = ttl

    async def append(
        self, outcomes: Mapping[tuple[str, str], Sequence[Outcome]], keep: int
    ) -> None:
        names = {_encode_name(key).decode(): found for key, found in outcomes.items() if found}
        if not names:
            return
        # named at every write: a store restarted empty lost the index with the lists.
        # Named first: an append is tried again whole when this fails, and would be
        # there twice had it gone through beside it
        await self.store.hset_many({INDEX_KEY: dict.fromkeys(names, b"")})
        await self.store.append_bounded(
            {LIST_PREFIX + name: [_encode(o) for o in found] for name, found in names.items()},
            keep,
            self.ttl,
        )

    async def clear(self) -> None:
        """Drop every list and their index."""
        names = await self.store.hgetall(INDEX_KEY)
        await self.store.delete_many([INDEX_KEY, *(LIST_PREFIX + name for name in names)])

    async def read(self) -> dict[tuple[str, str], list[Outcome]]:
        names = sorted(await self.store.hgetall(INDEX_KEY))
        lists = await self.store.lists([LIST_PREFIX + name for name in names])
        found: dict[tuple[str, str], list[Outcome]] = {}
        gone = []
        for name, raw in zip(names, lists, strict=True):
            if raw:
                found[_decode_name(name)] = [_decode(r) for r in raw]
            else:
                gone.append(name)  # expired: named again by its next write
        if gone:
            await self.store.write(WriteBatch(unset={INDEX_KEY: set(gone)}))
        return found


__all__ = ["INDEX_KEY", "LIST_PREFIX", "StoreOutcomes"]
