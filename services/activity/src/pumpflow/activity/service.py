"""The activity service: token lifecycles, priorities and what the feed streams.

Wiring only; the logic is :class:`~pumpflow.common.activity.ActivityAnalyzer` (states,
thresholds, timers) and :class:`~pumpflow.common.activity.metrics.FeatureActivityMetrics`
(metrics from the FeatureManager).

- Consumes token.created / token.trade / token.migrated per partition. Each event's
  work runs on the TokenMonitorThreadPool under its mint, at the token's recommended
  priority: when partitions back up, urgent tokens are processed first, and a token's
  work (events and timer-driven transitions) stays in order. The handler awaits the
  work, so a message is acked only after its lifecycle events are published and, for a
  transition, its checkpoint is written.
- Publishes token.lifecycle on every transition and on every priority recommendation
  (same state, reason ``priority``), with priority and activity level; keyed by mint,
  sequenced per mint (the sequence survives restarts through the checkpoint).
- Adaptive resource allocation: a token that becomes inactive (or a graduate after
  its linger time) is retired: its feature state is dropped and its mint is queued
  for a batched ``feed.subscription`` unsubscribe (at most one command per
  ``activity_subscription_batch_s``; trade streams cost money per message). A retired
  token that comes back (trades reach us through another path and meet the active
  criteria) is resubscribed the same way.
- Checkpoints each token (lifecycle, lifecycle seq, feature state with the feed seq it
  includes) to the StateStore under ``activity:token:<mint>``: right after it published
  lifecycle events, and before its event is acked (group commit: one batched write
  for all tokens changed meanwhile). Each checkpointed mint is also listed in its
  partition's index hash ``activity:partition:<p>``, so the tokens of a partition are
  found without scanning the keyspace. A redelivered event whose feed seq the
  features already include is not applied twice.
- Acts only on the partitions it owns (the bus's ownership hook, see
  :mod:`pumpflow.common.bus.abc`): ``on_assigned`` restores the checkpointed tokens
  of those partitions (retired ones are kept ``tombstone_ttl_s``) and arms their
  timers; ``on_revoked`` cancels their timers, lets their queued work finish,
  checkpoints them (with the lifecycle seq, so the next owner numbers on), sends the
  pending feed commands and drops them from memory. So with several replicas each
  token's timers run on one replica, and every lifecycle event and unsubscribe is
  published once. Embedded, or unbalanced, the service owns every partition (or the
  ones it was built with) from the start. The HTTP views show the owned tokens.
- HTTP: ``GET /tokens/{mint}``, ``GET /tokens?state=active&limit=100``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, ClassVar

import msgspec
from fastapi import APIRouter, HTTPException, Query
from prometheus_client import Counter, Gauge

from pumpflow.activity.settings import ActivitySettings
from pumpflow.common.activity import (
    ACTIVE,
    INACTIVE,
    ActivityAnalyzer,
    TokenSnapshot,
    Transition,
)
from pumpflow.common.activity.lifecycle import STATES
from pumpflow.common.activity.metrics import FeatureActivityMetrics
from pumpflow.common.bus import Sequencer, Subscription, partition_of
from pumpflow.common.events import (
    Event,
    FeedSubscription,
    LifecycleState,
    TokenLifecycle,
    make_event,
)
from pumpflow.common.priority import Priority
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.workers import TokenMonitorThreadPool, WorkerPoolConfig

log = logging.getLogger("pumpflow.activity")

KEY_PREFIX = "activity:token:"
#: per partition, a hash whose fields are the mints checkpointed under KEY_PREFIX
INDEX_PREFIX = "activity:partition:"
#: set once the index lists every checkpoint (those written before it existed too)
INDEX_MARKER = "activity:partition-index"
CONSUMES = ("token.created", "token.trade", "token.migrated")

TRANSITIONS = Counter(
    "pumpflow_activity_transitions", "Lifecycle transitions, by new state", ["state"]
)
RECOMMENDATIONS = Counter(
    "pumpflow_activity_priority_recommendations", "Priority changes published without a transition"
)
FEED_COMMANDS = Counter(
    "pumpflow_activity_feed_commands", "feed.subscription commands published", ["action"]
)
FEED_MINTS = Counter(
    "pumpflow_activity_feed_command_mints", "Mints in feed.subscription commands", ["action"]
)
TOKENS = Gauge("pumpflow_activity_tokens", "Tokens tracked, by state", ["state"])


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """What the store keeps per token."""

    token: TokenSnapshot
    #: last token.lifecycle seq published for the mint
    seq: int = 0
    #: FeatureManager state (the rolling windows), for live tokens
    features: bytes | None = None
    #: feed seq of the last token event in ``features``
    features_seq: int = 0


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Checkpoint).decode


class ActivityService(Service):
    """Track each token's lifecycle; publish changes and feed subscription commands."""

    name: ClassVar[str] = "activity"
    settings_class: ClassVar[type[ActivitySettings]] = ActivitySettings
    needs_store: ClassVar[bool] = True

    settings: ActivitySettings

    def __init__(self, settings: ActivitySettings, *, partitions: tuple[int, ...] | None = None):
        super().__init__(settings)
        #: partitions this replica consumes (None: all)
        self.partitions = partitions
        self._ctx: ServiceContext | None = None
        self._outbox: dict[str, list[Transition]] = {}
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        #: group commit: changes made (generation) and changes stored
        self._changed_gen = 0
        self._stored_gen = 0
        self._flushing: asyncio.Future | None = None
        self._pending: dict[str, dict[str, None]] = {"subscribe": {}, "unsubscribe": {}}
        self._tasks: list[asyncio.Task] = []
        self._subscription: Subscription | None = None
        self.published_lifecycle = 0
        #: partitions whose tokens this replica acts on (restored, timers running)
        self.owned: set[int] = set()
        #: mints listed in their partition's index already
        self._indexed: set[str] = set()
        self._stopped = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self, ctx: ServiceContext) -> None:
        if ctx.store is None:
            raise RuntimeError("the activity service needs a state store")
        self._ctx = ctx
        self.activity_metrics = FeatureActivityMetrics()
        self.analyzer = ActivityAnalyzer(
            clock=ctx.clock,
            thresholds=self.settings.thresholds(),
            on_transition=self._on_transition,
            on_retire=self._on_retire,
        )
        self.sequencer = Sequencer()
        self.pool = TokenMonitorThreadPool(
            WorkerPoolConfig(
                name=self.name,
                workers=self.settings.activity_workers,
                task_deadline_s=self.settings.activity_task_deadline_s,
            )
        )
        await self.pool.start()
        self._stopped = False
        self._tasks = [
            asyncio.create_task(self._checkpoint_loop(), name="activity-checkpoint"),
            asyncio.create_task(self._subscription_loop(), name="activity-subscriptions"),
        ]
        self._subscription = Subscription(
            service=self.name,
            patterns=CONSUMES,
            handler=self._handle,
            partitions=self.partitions,
            on_assigned=self.assign_partitions,
            on_revoked=self.revoke_partitions,
        )
        # the bus tells the partitions owned (restoring their tokens) before consuming
        await ctx.bus.subscribe(self._subscription)

    async def stop(self) -> None:
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.pool.stop(drain=True)
        self.analyzer.close()  # no await since the pool stopped: no timer slips in
        # what the drained pool left in the outboxes (timer transitions) still goes out
        for mint in list(self._outbox):
            await self._flush_token(mint)
        await self.flush_subscriptions()
        self._dirty.update(self.analyzer.watched())
        await self.checkpoint()

    # ---------------------------------------------------------------- events

    async def _handle(self, event: Event) -> None:
        mint = event.key or getattr(event.data, "mint", None)
        if not mint:
            raise ValueError(f"{event.type} without a mint")
        known = self.analyzer.get_token_lifecycle_state(mint) is not None
        priority = self.analyzer.recommend_priority(mint) if known else Priority.NORMAL
        await self.pool.submit(mint, lambda: self._process(mint, event), priority=priority)
        # ack only once the token's state is stored (group commit, off the workers)
        await self._stored(self._changed_gen)

    async def _process(self, mint: str, event: Event) -> None:
        self._processing.add(mint)
        try:
            if event.type == "token.migrated":
                self.analyzer.token_migrated(mint)
            elif event.seq is not None and event.seq <= self.activity_metrics.last_seq(mint):
                pass  # a redelivery of an applied event: its outcome only needs publishing
            else:
                if event.type == "token.created":
                    self.analyzer.token_created(mint)
                metrics = self.activity_metrics.update(event)
                if metrics is not None:
                    self.analyzer.update_activity_metrics(mint, metrics)
                if not self.analyzer.is_live(mint):
                    # a retired graduate's AMM trades: nothing to keep
                    self.activity_metrics.drop(mint)
            self._changed(mint)
        finally:
            self._processing.discard(mint)
        await self._flush_token(mint, causation_id=event.id)

    def _on_transition(self, transition: Transition) -> None:
        mint = transition.mint
        outbox = self._outbox.setdefault(mint, [])
        outbox.append(transition)
        if transition.is_transition:
            TRANSITIONS.labels(transition.state).inc()
            if transition.previous_state == INACTIVE and transition.state == ACTIVE:
                self._request("subscribe", mint)
        else:
            RECOMMENDATIONS.inc()
        self.pool.set_priority(mint, transition.priority)
        if mint not in self._processing and len(outbox) == 1:
            # timer-driven: publish in the token's order, through the pool
            with contextlib.suppress(RuntimeError):
                self.pool.submit(mint, lambda: self._flush_token(mint), priority=Priority.HIGH)

    def _on_retire(self, mint: str, state: LifecycleState) -> None:
        self.activity_metrics.drop(mint)
        self._changed(mint)
        self._request("unsubscribe", mint)

    def _request(self, action: str, mint: str) -> None:
        other = self._pending["subscribe" if action == "unsubscribe" else "unsubscribe"]
        if mint in other:
            del other[mint]  # the opposite command was not sent yet: both cancel out
            return
        pending = self._pending[action]
        pending[mint] = None
        if len(pending) >= self.settings.activity_subscription_batch_max:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(self.flush_subscriptions())

    async def _flush_token(self, mint: str, causation_id: str | None = None) -> None:
        """Publish the token's pending lifecycle events; checkpoint it on a transition."""
        transitions = self._outbox.pop(mint, None)
        if not transitions or self.analyzer.get_token_lifecycle_state(mint) is None:
            return  # nothing, or handed over to another replica
        ctx = self._ctx
        assert ctx is not None
        events = [
            make_event(
                TokenLifecycle(
                    mint=mint,
                    state=t.state,
                    previous_state=t.previous_state,
                    reason=t.reason,
                    priority=t.priority,
                    activity_level=round(t.activity_level, 6),
                ),
                source=ctx.source,
                time=t.time,
                seq=self.sequencer.next(mint),
                causation_id=causation_id,
            )
            for t in transitions
        ]
        # publish, then checkpoint the new seq: after a crash in between, the event is
        # redone with the same seq and consumers drop the copy (never a reused seq)
        await ctx.bus.publish_many(events)
        self.published_lifecycle += len(events)
        await self._write([mint])

    # ---------------------------------------------------------------- feed commands

    async def flush_subscriptions(self) -> int:
        """Publish the pending (un)subscribe commands in batches; return mints sent."""
        ctx = self._ctx
        assert ctx is not None
        size = self.settings.activity_subscription_batch_max
        sent = 0
        for action in ("unsubscribe", "subscribe"):
            pending = self._pending[action]
            while pending:
                mints = tuple(list(pending)[:size])
                for mint in mints:
                    del pending[mint]
                reason = "inactive" if action == "unsubscribe" else "active again"
                payload = FeedSubscription(action=action, mints=mints, reason=reason)
                await ctx.bus.publish(make_event(payload, source=ctx.source, time=ctx.clock.now()))
                FEED_COMMANDS.labels(action).inc()
                FEED_MINTS.labels(action).inc(len(mints))
                sent += len(mints)
        return sent

    async def _subscription_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.activity_subscription_batch_s)
            try:
                await self.flush_subscriptions()
            except Exception:
                log.exception("activity: publishing feed commands failed; retrying")

    # ---------------------------------------------------------------- checkpoints

    def _checkpoint_of(self, mint: str) -> Checkpoint | None:
        snapshot = self.analyzer.snapshot(mint)
        if snapshot is None:
            return None
        features = None if snapshot.retired else self.activity_metrics.snapshot(mint)
        return Checkpoint(
            token=snapshot,
            seq=self.sequencer.last(mint),
            features=features,
            features_seq=self.activity_metrics.last_seq(mint) if features else 0,
        )

    async def _write(self, mints) -> None:
        store = self._ctx.store
        live: dict[str, bytes] = {}
        retired: dict[str, bytes] = {}
        gone: list[str] = []
        unindexed: dict[str, dict[str, bytes]] = {}
        for mint in mints:
            self._dirty.discard(mint)
            checkpoint = self._checkpoint_of(mint)
            if checkpoint is None:
                gone.append(KEY_PREFIX + mint)
                continue
            if checkpoint.token.retired:
                retired[KEY_PREFIX + mint] = _encode(checkpoint)
            else:
                live[KEY_PREFIX + mint] = _encode(checkpoint)
            if mint not in self._indexed:
                unindexed.setdefault(self._index_key(mint), {})[mint] = b"1"
        if unindexed:
            # index first: an entry without its checkpoint is skipped, never the reverse
            await store.hset_many(unindexed)
            self._indexed.update(m for fields in unindexed.values() for m in fields)
        if live:
            await store.set_many(live, ttl=self.settings.activity_state_ttl_s)
        if retired:
            await store.set_many(retired, ttl=self.analyzer.thresholds.tombstone_ttl_s)
        if gone:
            await store.delete_many(gone)

    def _changed(self, mint: str) -> None:
        self._dirty.add(mint)
        self._changed_gen += 1

    async def _stored(self, generation: int) -> None:
        """Wait until the changes up to ``generation`` are in the store.

        One write of every changed token at a time; changes made while it runs go in
        the next one, so under load many events share a round trip.
        """
        while self._stored_gen < generation:
            if self._flushing is None:
                self._flushing = asyncio.ensure_future(self._flush_changes())
            await asyncio.shield(self._flushing)

    async def _flush_changes(self) -> None:
        try:
            generation = self._changed_gen
            await self.checkpoint()
            self._stored_gen = max(self._stored_gen, generation)
        finally:
            self._flushing = None

    async def checkpoint(self) -> int:
        """Write every changed token to the store now; return how many."""
        dirty = list(self._dirty)
        if dirty:
            await self._write(dirty)
        return len(dirty)

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.activity_checkpoint_interval_s)
            try:
                await self.checkpoint()
                self.shed_idle()
                for mint in self.analyzer.prune_tombstones():
                    self.sequencer.forget(mint)
                for state, count in self.analyzer.counts().items():
                    TOKENS.labels(state).set(count)
                TOKENS.labels("retired").set(self.analyzer.tombstone_count)
            except Exception:
                log.exception("activity: checkpoint failed; retrying")

    def shed_idle(self) -> int:
        """Freeze the window state of tokens quiet past every window; return how many.

        A quiet token (declining, not yet inactive) then costs a few hundred bytes
        instead of its buffers, and thaws unchanged on its next trade.
        """
        return self.activity_metrics.manager.shed_idle(self._ctx.clock.now())

    # ---------------------------------------------------------------- ownership

    def _index_key(self, mint: str) -> str:
        return f"{INDEX_PREFIX}{partition_of(mint, self._ctx.bus.partitions)}"

    async def assign_partitions(self, partitions: tuple[int, ...]) -> None:
        """Take the tokens of ``partitions`` over: restore them, arm their timers."""
        if self._stopped:
            return
        restored = await self._restore(partitions)
        self.owned.update(partitions)
        log.info("activity: partitions %s assigned, %d tokens restored", partitions, restored)

    async def revoke_partitions(self, partitions: tuple[int, ...]) -> None:
        """Hand the tokens of ``partitions`` over: finish, checkpoint and drop them.

        Their events stopped (the bus released the partitions first); here their
        timers stop too, the work queued for them (timer-driven lifecycle events)
        runs in order, and their checkpoints carry the lifecycle seq to the next owner.
        """
        self.owned.difference_update(partitions)
        if self._stopped:
            return
        lost = set(partitions)
        count = self._ctx.bus.partitions
        mints = [m for m in self.analyzer.mints() if partition_of(m, count) in lost]
        for mint in mints:
            self.analyzer.suspend(mint)
        # lifecycle events already decided go out under this replica's seq
        work = [
            self.pool.submit(mint, lambda m=mint: self._flush_token(m), priority=Priority.HIGH)
            for mint in mints
            if self.analyzer.is_live(mint) or mint in self._outbox
        ]
        for outcome in await asyncio.gather(*work, return_exceptions=True):
            if isinstance(outcome, BaseException):
                log.error("activity: flushing a revoked token failed: %r", outcome)
        await self._write([m for m in mints if self.analyzer.is_live(m) or m in self._dirty])
        # unsubscribes of tokens retired here: the next owner will not send them
        await self.flush_subscriptions()
        for mint in mints:
            self.analyzer.forget(mint)
            self.activity_metrics.drop(mint)
            self.sequencer.forget(mint)
            self._dirty.discard(mint)
            self._indexed.discard(mint)
            self._outbox.pop(mint, None)
        log.info("activity: partitions %s revoked, %d tokens handed over", partitions, len(mints))

    async def _ensure_index(self) -> None:
        """List checkpoints written before the index existed (once per store)."""
        store = self._ctx.store
        if await store.get(INDEX_MARKER) is not None:
            return
        index: dict[str, dict[str, bytes]] = {}
        for key in await store.scan_keys(KEY_PREFIX):
            mint = key[len(KEY_PREFIX) :]
            index.setdefault(self._index_key(mint), {})[mint] = b"1"
        if index:
            await store.hset_many(index)
        await store.set(INDEX_MARKER, b"1")

    async def _restore(self, partitions: tuple[int, ...]) -> int:
        """Load the checkpointed tokens of ``partitions``; return how many."""
        store = self._ctx.store
        await self._ensure_index()
        restored = 0
        for partition in partitions:
            index_key = f"{INDEX_PREFIX}{partition}"
            mints = [
                m.decode() if isinstance(m, bytes) else m for m in await store.hgetall(index_key)
            ]
            live: list[str] = []
            for start in range(0, len(mints), 500):
                chunk = mints[start : start + 500]
                raws = await store.get_many([KEY_PREFIX + m for m in chunk])
                for mint, raw in zip(chunk, raws, strict=True):
                    if raw is None:
                        continue  # expired
                    try:
                        checkpoint = _decode(raw)
                    except msgspec.DecodeError as exc:
                        log.error("activity: unreadable checkpoint of %s dropped: %s", mint, exc)
                        continue
                    live.append(mint)
                    self._restore_token(checkpoint)
                    restored += 1
            self._indexed.update(live)
            if len(live) < len(mints):
                # the owner alone writes a partition's index: drop the expired entries
                await store.delete_many([index_key])
                if live:
                    await store.hset_many({index_key: dict.fromkeys(live, b"1")})
        return restored

    def _restore_token(self, checkpoint: Checkpoint) -> None:
        mint = checkpoint.token.mint
        # what memory still holds of it (an earlier ownership) is older than the store
        self.analyzer.forget(mint)
        self.activity_metrics.drop(mint)
        self.sequencer.forget(mint)
        if checkpoint.features is not None:
            self.activity_metrics.restore(mint, checkpoint.features, seq=checkpoint.features_seq)
        self.analyzer.restore(checkpoint.token, warm_up=checkpoint.features is None)
        self.sequencer.restore({mint: checkpoint.seq})

    # ---------------------------------------------------------------- HTTP

    def view(self, mint: str) -> dict[str, Any] | None:
        token = self.analyzer.token(mint)
        return None if token is None else msgspec.to_builtins(token)

    def router(self) -> APIRouter:
        api = APIRouter()

        @api.get("/tokens/{mint}")
        async def get_token(mint: str) -> dict[str, Any]:
            view = self.view(mint)
            if view is None:
                raise HTTPException(status_code=404, detail=f"unknown token {mint}")
            return view

        @api.get("/tokens")
        async def list_tokens(
            state: str | None = Query(None, description=f"one of {', '.join(STATES)}"),
            limit: int = Query(1000, ge=1, le=100_000),
        ) -> dict[str, Any]:
            if state is not None and state not in STATES:
                raise HTTPException(status_code=422, detail=f"state must be one of {STATES}")
            tokens = self.analyzer.tokens(state)  # type: ignore[arg-type]
            tokens.sort(key=lambda t: (-t.priority, -t.activity_level, t.mint))
            return {
                "count": len(tokens),
                "tokens": [msgspec.to_builtins(t) for t in tokens[:limit]],
            }

        return api

    async def status(self) -> dict[str, Any]:
        health = self.pool.health()
        return {
            "ready": health.alive > 0,
            "partitions": sorted(self.owned),
            "tokens": self.analyzer.counts(),
            "retired": self.analyzer.tombstone_count,
            "watched": sum(1 for _ in self.analyzer.watched()),
            "pool": {
                "workers": health.workers,
                "alive": health.alive,
                "busy": health.busy,
                "queue_depth": health.queue_depth,
                "hung_tokens": list(health.hung_tokens),
                "restarts": health.restarts,
            },
        }
