"""The features service: token events in, features.updated out, features in the store.

Per token event (in partition order): fold it into the token's state, publish
``features.updated`` (per-mint seq from a Sequencer, causation = the token event),
then write the feature hash ``features:<mint>`` and the checkpoint
``features-state:<mint>`` (incremental state, last applied token seq, last published
seq) in one pipelined store write, before the handler returns (= acks). Concurrent
partitions share one write (group commit).

A replica that takes a partition over, or restarts, loads a token's checkpoint the
first time it sees the token (or when a seq gap says its memory is stale): the
token's stream carries on with no event lost or applied twice, and re-published
updates keep their seq so consumers drop them as duplicates. When a partition is
revoked (the bus's ownership hook) its tokens leave memory: a token that comes back
later is loaded from the store again, so nothing of another replica's time with it
(a retirement's TTL on its keys, say) is missed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from pydantic import Field

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.idempotency import Sequencer
from pumpflow.common.bus.routing import partition_of
from pumpflow.common.events import Event, FeaturesUpdated, encode_event, make_event
from pumpflow.common.features import FeatureManager, event_input
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.runtime.settings import CommonSettings
from pumpflow.common.state.abc import HashValue, StateStore

log = logging.getLogger("pumpflow.features")

FEATURES_KEY = "features:"
STATE_KEY = "features-state:"
#: meta fields of the features hash; feature names must not take them
META_FIELDS = ("version", "seq", "out_seq", "time", "updated_at")


class FeaturesSettings(CommonSettings):
    """Settings of the features service (``PUMPFLOW_<NAME>``)."""

    features_inactive_ttl_s: float = Field(
        3600.0, gt=0, description="TTL of an inactive token's features and checkpoint"
    )
    features_shed_interval_s: float = Field(
        60.0, gt=0, description="how often idle tokens are frozen into compact bytes"
    )


class _GroupWriter:
    """Coalesces concurrent hset_many calls into one round trip; each caller awaits it."""

    def __init__(self, store: StateStore):
        self._store = store
        self._pending: dict[str, dict[str, HashValue]] = {}
        self._done: asyncio.Future | None = None
        self.flushes = 0

    async def write(self, items: dict[str, dict[str, HashValue]]) -> None:
        for key, fields in items.items():
            self._pending.setdefault(key, {}).update(fields)
        if self._done is None:
            self._done = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(self._start_flush)
        done = self._done
        await asyncio.shield(done)

    def _start_flush(self) -> None:
        pending, done = self._pending, self._done
        self._pending, self._done = {}, None
        task = asyncio.ensure_future(self._store.hset_many(pending))
        self.flushes += 1

        def settle(t: asyncio.Task) -> None:
            if t.cancelled():
                done.cancel()
            elif t.exception() is not None:
                done.set_exception(t.exception())
            else:
                done.set_result(None)

        task.add_done_callback(settle)


class FeaturesService(Service):
    name: ClassVar[str] = "features"
    settings_class: ClassVar[type[CommonSettings]] = FeaturesSettings
    needs_store: ClassVar[bool] = True

    def __init__(self, settings: CommonSettings, *, manager: FeatureManager | None = None):
        super().__init__(settings)
        self.manager = manager or FeatureManager()
        clash = set(self.manager.names) & set(META_FIELDS)
        if clash:
            raise ValueError(f"feature names clash with meta fields: {sorted(clash)}")
        self.sequencer = Sequencer()
        self.counters = {
            "events": 0,
            "updates": 0,
            "duplicates": 0,
            "gaps": 0,
            "invalid": 0,
            "restored": 0,
            "dropped": 0,
        }
        self._ctx: ServiceContext | None = None
        self._store: StateStore | None = None
        self._writer: _GroupWriter | None = None
        self._subscription: Subscription | None = None
        self._dormant: set[str] = set()
        self._shed_timer = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, ctx: ServiceContext) -> None:
        if ctx.store is None:
            raise RuntimeError("the features service needs a state store")
        self._ctx = ctx
        self._store = ctx.store
        self._writer = _GroupWriter(ctx.store)
        self._subscription = Subscription(
            service=self.name,
            patterns=("token.created", "token.trade", "token.migrated", "token.lifecycle"),
            handler=self.handle,
            on_revoked=self.revoke_partitions,
        )
        await ctx.bus.subscribe(self._subscription)
        self._schedule_shed()

    async def stop(self) -> None:
        # Every handled event was checkpointed before its ack: nothing left to write.
        if self._shed_timer is not None:
            self._shed_timer.cancel()
            self._shed_timer = None
        if self._ctx is not None and self._subscription is not None:
            unsubscribe = getattr(self._ctx.bus, "unsubscribe", None)
            if unsubscribe is not None:
                await unsubscribe(self._subscription)

    async def revoke_partitions(self, partitions: tuple[int, ...]) -> None:
        """Forget the tokens of partitions another replica takes over (stored already)."""
        lost = set(partitions)
        count = self._ctx.bus.partitions
        mints = {*self.manager.mints(), *self.sequencer.snapshot(), *self._dormant}
        dropped = [m for m in mints if partition_of(m, count) in lost]
        for mint in dropped:
            self.manager.drop_token(mint)
            self.sequencer.forget(mint)
            self._dormant.discard(mint)
        log.info("features: partitions %s revoked, %d tokens dropped", partitions, len(dropped))

    def _schedule_shed(self) -> None:
        ctx = self._ctx
        interval = self.settings.features_shed_interval_s

        def shed() -> None:
            self.manager.shed_idle(ctx.clock.now())
            self._schedule_shed()

        try:
            self._shed_timer = ctx.clock.call_later(interval, shed)
        except RuntimeError:  # no running loop (a WallClock outside asyncio)
            self._shed_timer = None

    async def status(self) -> dict[str, Any]:
        return {
            "tracked_tokens": self.manager.tracked,
            "frozen_tokens": self.manager.frozen,
            "feature_set_version": self.manager.version,
            **self.counters,
        }

    # ------------------------------------------------------------------ handling

    async def handle(self, event: Event) -> None:
        if event.type == "token.lifecycle":
            if event.data.state in ("inactive", "graduated"):
                await self._retire(event.data.mint)
            return
        if event.type == "token.migrated":
            await self._retire(event.data.mint)
            return
        await self._apply(event)

    async def _retire(self, mint: str) -> None:
        """Drop the token's memory state; let its stored features expire."""
        self.manager.drop_token(mint)
        self.sequencer.forget(mint)
        self._dormant.add(mint)
        self.counters["dropped"] += 1
        await self._store.expire_many(
            [FEATURES_KEY + mint, STATE_KEY + mint], self.settings.features_inactive_ttl_s
        )

    async def _load(self, mint: str) -> None:
        """Adopt the token's checkpoint (if any) as its in-memory state."""
        stored = await self._store.hgetall(STATE_KEY + mint)
        self.manager.drop_token(mint)
        self.sequencer.forget(mint)
        if not stored:
            return
        out_seq = int(stored.get("out_seq", b"0"))
        self.sequencer.restore({mint: out_seq})
        if stored.get("version", b"").decode() == self.manager.version and "state" in stored:
            self.manager.restore(mint, stored["state"], seq=int(stored.get("seq", b"0")))
            self.counters["restored"] += 1
        self._dormant.add(mint)  # its keys may carry an inactivity TTL

    async def _apply(self, event: Event) -> None:
        ctx = self._ctx
        manager = self.manager
        mint = event.key or event.data.mint
        self.counters["events"] += 1
        seq = event.seq
        known = manager.token(mint)
        last = None if known is None else known.seq
        if last is None or (seq is not None and seq > last + 1):
            # Unknown here, or a gap: another replica may have moved it on.
            await self._load(mint)
            last = manager.last_seq(mint)
        if seq is not None and seq <= last:
            self.counters["duplicates"] += 1
            return
        if seq is not None and last and seq > last + 1:
            self.counters["gaps"] += 1
            log.warning("seq gap for %s: %d after %d", mint, seq, last)
        trade = event_input(event)
        reason = _invalid(trade)
        if reason is not None:
            self.counters["invalid"] += 1
            log.warning("invalid %s for %s: %s", event.type, mint, reason)
            await ctx.bus.dead_letter(
                encode_event(event), service=self.name, reason=reason, event_type=event.type
            )
            # Its seq is used up: the token's next event is not a gap (nor a reload).
            state = manager.token(mint)
            if state is not None and seq is not None:
                state.seq = seq
            return
        state = manager.apply(mint, trade, seq)
        # The values straight from the state (one generated reader, no FeatureVector).
        values = tuple(manager.values(state))
        names = manager.names
        out_seq = self.sequencer.next(mint)
        source_seq = seq or 0
        await ctx.bus.publish(
            make_event(
                FeaturesUpdated(
                    mint=mint,
                    feature_set_version=manager.version,
                    source_seq=source_seq,
                    names=names,
                    values=values,
                ),
                source=ctx.source,
                time=event.time,
                seq=out_seq,
                causation_id=event.id,
            )
        )
        features: dict[str, HashValue] = dict(zip(names, values, strict=True))
        features["version"] = manager.version
        features["seq"] = source_seq
        features["out_seq"] = out_seq
        features["time"] = state.last_time
        features["updated_at"] = ctx.clock.now()
        checkpoint: dict[str, HashValue] = {
            "state": manager.snapshot(mint),
            "seq": source_seq,
            "out_seq": out_seq,
            "version": manager.version,
        }
        await self._writer.write({FEATURES_KEY + mint: features, STATE_KEY + mint: checkpoint})
        if mint in self._dormant:
            self._dormant.discard(mint)
            await self._store.expire_many([FEATURES_KEY + mint, STATE_KEY + mint], None)
        self.counters["updates"] += 1

    # ------------------------------------------------------------------ reads

    async def read_features(self, mint: str) -> dict[str, Any] | None:
        """The stored features of ``mint`` (any replica's), or None."""
        stored = await self._store.hgetall(FEATURES_KEY + mint)
        if not stored:
            return None
        values = {name: float(raw) for name, raw in stored.items() if name not in META_FIELDS}
        return {
            "mint": mint,
            "version": stored.get("version", b"").decode(),
            "seq": int(stored.get("seq", b"0")),
            "out_seq": int(stored.get("out_seq", b"0")),
            "time": float(stored.get("time", b"0")),
            "updated_at": float(stored.get("updated_at", b"0")),
            "features": values,
        }

    def router(self):
        from fastapi import APIRouter, HTTPException

        router = APIRouter()

        @router.get("/features/{mint}")
        async def get_features(mint: str) -> dict[str, Any]:
            found = await self.read_features(mint)
            if found is None:
                raise HTTPException(status_code=404, detail=f"no features for {mint}")
            return found

        return router


def _invalid(trade) -> str | None:
    if trade is None:
        return "not a trade or creation"
    if not (trade.v_sol > 0.0 and trade.v_tokens > 0.0):
        return f"non-positive reserves (vSol={trade.v_sol}, vTokens={trade.v_tokens})"
    if trade.lamports < 0 or trade.tokens < 0:
        return "negative amount"
    return None
