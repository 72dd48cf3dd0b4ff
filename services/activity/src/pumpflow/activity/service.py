"""The activity service: token lifecycles, priorities and what the feed streams.

The :class:`~pumpflow.common.activity.ActivityProcessor` (every lifecycle rule) on the
library's :class:`~pumpflow.common.consumer.KeyedStatefulConsumer` (per-mint order,
dedup, group commit, outbox, timers on the partition owner, restore on assignment):

- Consumes ``features.updated`` (the features service's vector of each token event)
  and ``token.migrated``; publishes ``token.lifecycle`` on every transition and every
  priority recommendation, keyed by mint, sequenced per mint.
- A token that turns inactive (or a graduate after its linger time) retires: it
  leaves memory, its record stays in the store ``tombstone_ttl_s``, and its mint is
  queued for a batched ``feed.subscription`` unsubscribe (trade streams cost money
  per message). A retired token that comes back is resubscribed the same way. An
  opposite request not yet sent cancels out; commands go out every
  ``activity_subscription_batch_s`` of the injected clock (a replay sends them at the
  same market times however fast it runs), when a batch is full, and on stop.
- HTTP: ``GET /tokens/{mint}`` and ``GET /tokens?state=active&limit=100`` from the
  tokens this replica holds (a retired token from its stored record).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

import msgspec
from prometheus_client import CollectorRegistry

from pumpflow.activity.metrics import ActivityServiceMetrics
from pumpflow.activity.settings import ActivitySettings
from pumpflow.common.activity import ActivityProcessor, ActivityState, FeedAction
from pumpflow.common.activity.lifecycle import STATES
from pumpflow.common.activity.processor import counted
from pumpflow.common.bus.routing import partition_of
from pumpflow.common.clock import TimerHandle
from pumpflow.common.consumer import ConsumerMetrics, KeyedStatefulConsumer, Record
from pumpflow.common.events import Event, FeedSubscription, make_event
from pumpflow.common.runtime.service import Service, ServiceContext

log = logging.getLogger("pumpflow.activity")

#: where the keyed consumer stores each token's record
KEY_PREFIX = "activity:key:"
_decode_record = msgspec.msgpack.Decoder(Record).decode


class ActivityService(Service):
    """Track each token's lifecycle; publish changes and feed subscription commands."""

    name: ClassVar[str] = "activity"
    settings_class: ClassVar[type[ActivitySettings]] = ActivitySettings
    needs_store: ClassVar[bool] = True

    settings: ActivitySettings

    def __init__(self, settings: ActivitySettings, *, registry: CollectorRegistry | None = None):
        super().__init__(settings)
        self.metrics = ActivityServiceMetrics(registry=registry)
        self.consumer_metrics = ConsumerMetrics(self.name, registry=registry)
        self.processor = ActivityProcessor(
            on_feed_request=self._request,
            thresholds=settings.thresholds(),
            on_counted=self._counted,
        )
        #: mint -> lifecycle state of the live tokens held here, kept as applies change
        #: them and dropped as tokens leave memory; read again from every token of the
        #: partitions owned when those change (keys restored come without an apply)
        self._states: dict[str, str] = {}
        self._by_state: Counter[str] = Counter()
        self._counted_over: tuple[frozenset[int], frozenset[int]] | None = None
        self.consumer: KeyedStatefulConsumer[ActivityState] | None = None
        self._ctx: ServiceContext | None = None
        #: mints waiting for a feed command, by action (insertion ordered)
        self._pending: dict[str, dict[str, None]] = {"subscribe": {}, "unsubscribe": {}}
        self._flushing_feed = asyncio.Lock()
        self._batch_timer: TimerHandle | None = None
        self._stopped = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._stopped = False
        self.consumer = ctx.keyed_consumer(
            self.processor,
            self.settings.consumer_config(self.name),
            on_published=self._count,
            metrics=self.consumer_metrics,
            on_forgotten=self._forgotten,
        )
        self._schedule_batch()
        await self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
        self._stopped = True
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        # what the last steps asked for still goes out
        if self._ctx is not None:
            await self.flush_subscriptions()

    def _count(self, published: Sequence[Event]) -> None:
        for event in published:
            lifecycle = event.data
            if lifecycle.state != lifecycle.previous_state:
                self.metrics.transition(lifecycle.state)
            else:
                self.metrics.recommendations.inc()

    # ---------------------------------------------------------------- feed commands

    def _request(self, action: FeedAction, mint: str) -> None:
        other = self._pending["subscribe" if action == "unsubscribe" else "unsubscribe"]
        if mint in other:
            del other[mint]  # the opposite command was not sent yet: both cancel out
            return
        pending = self._pending[action]
        pending[mint] = None
        if len(pending) >= self.settings.activity_subscription_batch_max:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(self.flush_subscriptions())

    async def flush_subscriptions(self) -> int:
        """Publish the pending (un)subscribe requests in batches; return mints sent."""
        ctx = self._ctx
        assert ctx is not None
        size = self.settings.activity_subscription_batch_max
        sent = 0
        async with self._flushing_feed:
            for action in ("unsubscribe", "subscribe"):
                pending = self._pending[action]
                while pending:
                    mints = tuple(list(pending)[:size])
                    reason = "inactive" if action == "unsubscribe" else "active again"
                    command = FeedSubscription(action=action, mints=mints, reason=reason)
                    # out of the queue while on their way: an opposite request meanwhile
                    # cannot cancel a command already going out, it follows it
                    for mint in mints:
                        del pending[mint]
                    try:
                        await ctx.bus.publish(
                            make_event(command, source=ctx.source, time=ctx.clock.now())
                        )
                    except BaseException:
                        # not sent: queued again for the next round, or cancelled out by
                        # the opposite request that came meanwhile
                        other = self._pending[
                            "subscribe" if action == "unsubscribe" else "unsubscribe"
                        ]
                        for mint in mints:
                            if mint in other:
                                del other[mint]
                            else:
                                pending[mint] = None
                        raise
                    self.metrics.feed_command(action, len(mints))
                    sent += len(mints)
        return sent

    def _schedule_batch(self) -> None:
        if not self._stopped:
            self._batch_timer = self._ctx.clock.call_later(
                self.settings.activity_subscription_batch_s, self._on_batch
            )

    async def _on_batch(self) -> None:
        try:
            await self.flush_subscriptions()
            self.metrics.tokens(self.counts())
        except Exception:
            log.exception("activity: publishing feed commands failed; retrying")
        finally:
            self._schedule_batch()

    # ---------------------------------------------------------------- reads

    def _view(self, token: ActivityState, now: float) -> dict[str, Any]:
        processor = self.processor
        return {
            "mint": token.mint,
            "state": token.state,
            "since": token.since,
            "created_at": token.created_at,
            "last_activity": token.last_activity,
            "retired": token.retired,
            "retired_at": token.retired_at if token.retired else None,
            "priority": int(processor.recommended_priority(token, now)),
            "activity_level": processor.activity_level(token, now),
            "metrics": msgspec.to_builtins(token.metrics) if token.metrics else None,
        }

    def tokens(self) -> list[ActivityState]:
        """The tokens held here (owned partitions) that have a lifecycle state."""
        consumer = self.consumer
        if consumer is None:
            return []
        found = []
        # a partition revoked leaves its keys a moment later, once handed over
        owned, partitions = consumer.owned, consumer.bus.partitions
        for key in list(consumer.keys()):
            if partition_of(key, partitions) not in owned:
                continue
            state = consumer.state(key)
            if state is not None and state.state is not None:
                found.append(state)
        return found

    def _counted(self, mint: str, state: str | None) -> None:
        by_state = self._by_state
        before = self._states.pop(mint, None)
        if before is not None:
            by_state[before] -= 1
        if state is not None:
            self._states[mint] = state
            by_state[state] += 1

    def _forgotten(self, mint: str) -> None:
        # retired or handed over: a fire that ran while its partition was revoked may
        # have counted it after the recount of the partitions left
        self._counted(mint, None)

    def counts(self) -> dict[str, int]:
        """Live tokens held here (of the partitions owned, not retired), by lifecycle state."""
        consumer = self.consumer
        if consumer is not None:
            held = (frozenset(consumer.owned), frozenset(consumer.restored))
            if held != self._counted_over:
                self._counted_over = held
                self._states = {t.mint: t.state for t in self.tokens() if counted(t) is not None}
                self._by_state = Counter(self._states.values())
        by_state = self._by_state
        return {state: by_state.get(state, 0) for state in STATES}

    def recount(self) -> dict[str, int]:
        """:meth:`counts` read from every token held here (decoding those held compact)."""
        by_state = Counter(counted(t) for t in self.tokens())
        return {state: by_state.get(state, 0) for state in STATES}

    async def token(self, mint: str) -> dict[str, Any] | None:
        """The view of ``mint``: held here, or its stored record (a retired token)."""
        consumer = self.consumer
        if consumer is None:
            return None
        now = consumer.time_of(mint)  # the time its rules judge it at
        state = consumer.state(mint)
        if state is None:
            raw = await consumer.store.get(KEY_PREFIX + mint)
            if raw is None:
                return None
            try:
                state = self.processor.decode(_decode_record(raw).state)
            except (msgspec.DecodeError, ValueError):
                return None
        if state.state is None:
            return None
        return self._view(state, now)

    def list_tokens(self, state: str | None = None) -> list[dict[str, Any]]:
        """Views of the tokens held here, most important first."""
        if self.consumer is None:
            return []
        time_of = self.consumer.time_of  # each token's partition's, the time its rules judge it at
        views = [
            self._view(t, time_of(t.mint))
            for t in self.tokens()
            if state is None or t.state == state
        ]
        views.sort(key=lambda v: (-v["priority"], -v["activity_level"], v["mint"]))
        return views

    def router(self):
        from fastapi import APIRouter, HTTPException, Query

        api = APIRouter()

        @api.get("/tokens/{mint}")
        async def get_token(mint: str) -> dict[str, Any]:
            view = await self.token(mint)
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
            views = self.list_tokens(state)
            return {"count": len(views), "tokens": views[:limit]}

        return api

    async def status(self) -> dict[str, Any]:
        consumer = {} if self.consumer is None else self.consumer.describe()
        counts = self.counts()
        self.metrics.tokens(counts)
        return {
            **consumer,
            "tokens": counts,
            "pending_feed": {action: len(m) for action, m in self._pending.items()},
        }
