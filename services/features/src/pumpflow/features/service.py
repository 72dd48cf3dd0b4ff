"""The features service: token events in, features.updated out, features in the store.

Each token event's work runs on the TokenMonitorThreadPool under its mint, at the
priority the token's last ``token.lifecycle`` event recommended (NORMAL until one
came): when partitions back up, important tokens are processed first, and a token's
work stays in order. The handler awaits the work, so a message is acked only after
its features and checkpoint are stored. The work (in the token's order): fold the
event into the token's state, publish ``features.updated`` (per-mint seq from a
Sequencer, causation = the token event), then hand the vector to the
:class:`~pumpflow.common.features.FeatureCache` (memory, and the store hash
``features:<mint>``: values, version, seq, out_seq, time, updated_at) together with
the checkpoint ``features-state:<mint>`` (incremental state, last applied token seq,
last published seq): one pipelined ``hset_many``, shared by the workers writing
meanwhile (group commit). ``GET /features/{mint}`` reads the cache (memory, then the
store) for the current feature-set version.

A replica that takes a partition over, or restarts, loads a token's checkpoint the
first time it sees the token (or when a seq gap says its memory is stale): the
token's stream carries on with no event lost or applied twice, and re-published
updates keep their seq so consumers drop them as duplicates. When a partition is
revoked (the bus's ownership hook) its tokens leave memory: a token that comes back
later is loaded from the store again, so nothing of another replica's time with it
(a retirement's TTL on its keys, say) is missed. A token retired (inactive,
graduated, migrated) leaves memory and its keys get ``features_inactive_ttl_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, ClassVar

from pydantic import Field

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.idempotency import Sequencer
from pumpflow.common.bus.routing import partition_of
from pumpflow.common.events import Event, FeaturesUpdated, encode_event, make_event
from pumpflow.common.features import FeatureManager, FeatureVector, event_input
from pumpflow.common.priority import Priority
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.runtime.settings import CommonSettings
from pumpflow.common.state.abc import HashValue, StateStore
from pumpflow.common.state.feature_cache import FeatureCache
from pumpflow.common.workers import TokenMonitorThreadPool, WorkerPoolConfig

log = logging.getLogger("pumpflow.features")

FEATURES_KEY = "features:"
STATE_KEY = "features-state:"
#: lifecycle states that retire a token here
RETIRING = ("inactive", "graduated")


class FeaturesSettings(CommonSettings):
    """Settings of the features service (``PUMPFLOW_<NAME>``)."""

    features_inactive_ttl_s: float = Field(
        3600.0, gt=0, description="TTL of an inactive token's features and checkpoint"
    )
    features_shed_interval_s: float = Field(
        60.0, gt=0, description="how often idle tokens are frozen into compact bytes"
    )
    features_workers: int = Field(
        8, ge=1, le=256, description="token monitor workers (also the group-commit width)"
    )
    features_task_deadline_s: float = Field(
        10.0, gt=0, description="a token task running longer is hung"
    )
    features_cache_entries: int = Field(
        10_000, ge=1, description="feature vectors kept in memory (LRU) for reads"
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
    """Compute per-token features from token events; cache them and publish updates."""

    name: ClassVar[str] = "features"
    settings_class: ClassVar[type[CommonSettings]] = FeaturesSettings
    needs_store: ClassVar[bool] = True

    def __init__(self, settings: CommonSettings, *, manager: FeatureManager | None = None):
        super().__init__(settings)
        self.manager = manager or FeatureManager()
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
        #: priority recommended by each tracked token's last token.lifecycle event
        self._priority: dict[str, int] = {}
        self._shed_timer = None
        self.cache: FeatureCache | None = None
        self.pool: TokenMonitorThreadPool | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, ctx: ServiceContext) -> None:
        if ctx.store is None:
            raise RuntimeError("the features service needs a state store")
        self._ctx = ctx
        self._store = ctx.store
        self._writer = _GroupWriter(ctx.store)
        # what GET serves: vectors this replica wrote, else the store (keep_reads=False,
        # since a token read here may be updated or expired by another replica)
        self.cache = self.manager.cache = FeatureCache(
            ctx.store,
            prefix=FEATURES_KEY,
            max_entries=self.settings.features_cache_entries,
            write=self._writer.write,
            keep_reads=False,
        )
        self.pool = TokenMonitorThreadPool(
            WorkerPoolConfig(
                name=self.name,
                workers=self.settings.features_workers,
                task_deadline_s=self.settings.features_task_deadline_s,
            )
        )
        await self.pool.start()
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
        if self.pool is not None:
            await self.pool.stop(drain=True)

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
            self._priority.pop(mint, None)
            await self.cache.clear(mint)  # the next owner writes it from now on
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
            "cached_vectors": len(self.cache) if self.cache is not None else 0,
            "pool": None if self.pool is None else dataclasses.asdict(self.pool.health()),
            **self.counters,
        }

    # ------------------------------------------------------------------ handling

    async def handle(self, event: Event) -> None:
        """Run the event's work on the pool under its mint; return once it is stored."""
        mint = event.key or event.data.mint
        if event.type == "token.lifecycle":
            lifecycle = event.data
            if lifecycle.state in RETIRING:
                work = self._retire
            else:
                self._priority[mint] = lifecycle.priority
                self.pool.set_priority(mint, lifecycle.priority)
                return
        elif event.type == "token.migrated":
            work = self._retire
        else:
            work = self._apply
        priority = self._priority.get(mint, Priority.NORMAL)
        await self.pool.submit(mint, lambda: work(mint, event), priority=priority)

    async def _retire(self, mint: str, event: Event) -> None:
        """Drop the token's memory state; let its stored features expire."""
        self.manager.drop_token(mint)
        self.sequencer.forget(mint)
        self._priority.pop(mint, None)
        self._dormant.add(mint)
        self.counters["dropped"] += 1
        await self.cache.expire(
            mint, self.settings.features_inactive_ttl_s, also=[STATE_KEY + mint]
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

    async def _apply(self, mint: str, event: Event) -> None:
        ctx = self._ctx
        manager = self.manager
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
        vector = FeatureVector(
            mint=mint,
            version=manager.version,
            seq=source_seq,
            time=state.last_time,
            names=names,
            values=values,
            out_seq=out_seq,
            updated_at=ctx.clock.now(),
        )
        checkpoint: dict[str, HashValue] = {
            "state": manager.snapshot(mint),
            "seq": source_seq,
            "out_seq": out_seq,
            "version": manager.version,
        }
        # the vector and the checkpoint: one hset_many, shared with concurrent workers
        await self.cache.add(vector, extra={STATE_KEY + mint: checkpoint})
        if mint in self._dormant:
            self._dormant.discard(mint)
            await self.cache.expire(mint, None, also=[STATE_KEY + mint])
        self.counters["updates"] += 1

    # ------------------------------------------------------------------ reads

    async def read_features(self, mint: str) -> dict[str, Any] | None:
        """The cached features of ``mint`` (any replica's) of this feature set, or None."""
        vector = await self.cache.get(mint, version=self.manager.version)
        if vector is None:
            return None
        return {
            "mint": mint,
            "version": vector.version,
            "seq": vector.seq,
            "out_seq": vector.out_seq,
            "time": vector.time,
            "updated_at": vector.updated_at,
            "features": vector.as_dict(),
        }

    def router(self):
        from fastapi import APIRouter, HTTPException

        router = APIRouter()

        @router.get("/features/{mint}")
        async def get_features(mint: str) -> dict[str, Any]:
            found = await self.read_features(mint)
            if found is None:
                raise HTTPException(
                    status_code=404,
                    detail=f"no features of version {self.manager.version} for {mint}",
                )
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
