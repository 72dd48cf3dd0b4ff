"""What trading knows of each token, kept in the state store for the next replica that trades.

The engine decides from its views of the tokens
(:class:`~pumpflow.common.trading.TokenView`: name, symbol and creator, the market,
the lifecycle, the latest features and prediction), folded from events many of which
do not come again: a token's creation comes once, its lifecycle on a change of state,
its features with its trades. A replica taking over the lease would otherwise know a
token only from the events published after it subscribed (and its stale breaker would
not know which tokens are active to watch their silence: see
:meth:`~pumpflow.common.trading.TradingEngine.restore`).

So the replica that trades stores each view an event changed (``trading:view:<mint>``,
msgpack, with a TTL renewed by every change) before it acknowledges the event (the
changes of events handled meanwhile on the bus's other lanes share the write), and
deletes it when the engine forgets the token; a replica taking over loads them all
before it subscribes. An event redelivered after the take-over (its holder died
before acknowledging it) may be in a stored view already: each view keeps the last
seq of each publisher's events it folded in (``TokenView.applied``, as the keyed
consumer's tracking record does), and the engine passes over one not above it, so a
trade on the pool after the migration, followed trade by trade, moves the pool's
state in the view (and the executor's market) once. A paper fill on the pool, which
moves the pool too and which no event brings again, is stored in the ledger before the
view it moved: the view keeps the ids of the fills it folded in
(``TokenView.pool_fills``), and a replica taking over moves the pool by each of the
ledger's fills its view lacks (its holder died between the two writes). Only where
the lease is shared with other replicas: a one-process run on a market clock, which
nobody can take over, keeps none.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager

import msgspec

from pumpflow.common.state.abc import StateStore, WriteBatch
from pumpflow.common.state.commit import GroupCommit
from pumpflow.common.trading import TokenView

log = logging.getLogger("pumpflow.trading.context")

VIEW_PREFIX = "trading:view:"
_LOAD_CHUNK = 500


class TokenContext:
    """The engine's token views in the state store: stored as they change, loaded on a take-over.

    Stores are group commits (:class:`~pumpflow.common.state.commit.GroupCommit`): every
    change made before :meth:`save` was called is stored by the time it returns, and the
    handlers waiting meanwhile (the bus's other lanes) share one write.
    """

    def __init__(
        self,
        store: StateStore,
        *,
        ttl_s: float,
        settled: Callable[[], AbstractAsyncContextManager[None]] | None = None,
    ):
        self.store = store
        self.ttl_s = ttl_s
        #: held while a write reads the views: every change they fold in is stored
        #: elsewhere first (the ledger), so no view is stored ahead of it
        self._settled = settled or contextlib.nullcontext
        #: mints whose views changed since the last write began
        self.changed: set[str] = set()
        self._commits = GroupCommit(self._write)
        self._views: Mapping[str, TokenView] = {}
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(TokenView)

    def change(self, mint: str) -> None:
        """``mint``'s view changed (or the engine forgot it): store it with the next write."""
        self.changed.add(mint)
        self._commits.change()

    def clear(self) -> None:
        """Forget the changes not stored (a take-over loads what the store holds)."""
        self.changed.clear()
        self._commits.settle()

    async def save(self, views: Mapping[str, TokenView]) -> None:
        """Return once every change made so far is stored as ``views`` holds it (a view it
        no longer has is deleted); raises what the store raised."""
        self._views = views
        await self._commits.until_stored(self._commits.changed)

    async def _write(self, upto: int) -> None:
        mints: set[str] = set()
        try:
            async with self._settled():
                mints, self.changed = self.changed, set()
                views = self._views
                batch = WriteBatch()
                gone = []
                for mint in mints:
                    view = views.get(mint)
                    if view is None:
                        gone.append(VIEW_PREFIX + mint)
                    else:
                        batch.set(VIEW_PREFIX + mint, self._encoder.encode(view), self.ttl_s)
            if batch:
                await self.store.write(batch)
            if gone:
                await self.store.delete_many(gone)
        except BaseException:
            self.changed |= mints
            raise

    async def load(self) -> dict[str, TokenView]:
        """Every stored view, by mint (one that cannot be read is skipped and logged)."""
        keys = await self.store.scan_keys(VIEW_PREFIX)
        views: dict[str, TokenView] = {}
        for start in range(0, len(keys), _LOAD_CHUNK):
            chunk = keys[start : start + _LOAD_CHUNK]
            for key, raw in zip(chunk, await self.store.get_many(chunk), strict=True):
                if raw is None:
                    continue  # expired since the scan
                try:
                    view = self._decoder.decode(raw)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    log.warning("trading: the stored view %s cannot be read, skipped: %s", key, exc)
                    continue
                views[view.mint] = view
        return views
