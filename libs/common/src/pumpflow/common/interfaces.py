"""The requirements' interfaces, exactly, over the real classes.

One place for code written against the requirements' names and signatures. Each name
is a thin adapter doing its work through the class the services use (kept as an
attribute, for anything more); ``token_id`` is always the token's mint. Methods that
publish or touch a store are coroutines; extra parameters are keyword-only.

- ``Event(event_type, data)``: :func:`Event` returns the real envelope,
  :class:`pumpflow.common.events.Event`, whose ``type`` is the event type and ``time``
  the timestamp.
- ``EventBus.subscribe/unsubscribe/publish``: :class:`EventBus`, over either transport
  (:class:`pumpflow.common.bus.abc.EventBus`); ``EventPublisher(event_bus).publish_event``
  and ``EventSubscriber.on_event``: :class:`EventPublisher`, :class:`EventSubscriber`.
- ``FeatureManager(event_bus)``: :class:`FeatureManager`, over
  :class:`pumpflow.common.features.FeatureManager` and a FeatureCache.
- ``FeatureCache(max_size=1000)``: :class:`FeatureCache`, over
  :class:`pumpflow.common.state.feature_cache.FeatureCache`.
- ``TokenMonitorThreadPool(max_threads=10)``: :class:`TokenMonitorThreadPool`, over
  :class:`pumpflow.common.workers.TokenMonitorThreadPool`.
- ``ActivityAnalyzer(event_bus)``: :class:`ActivityAnalyzer`, over
  :class:`pumpflow.common.activity.ActivityAnalyzer`.
- ``EventHistoryManager``: :class:`EventHistoryManager`, over
  :class:`pumpflow.common.features.EventHistoryManager`.
- ``DataFeedInterface`` and ``DataFeedManager`` are the feed service's own classes,
  ``pumpflow.feed.interface.DataFeedInterface`` and
  ``pumpflow.feed.manager.DataFeedManager`` (a service sits above this layer).
- ``TradeExecutor(event_bus, trading_db)`` and ``PositionManager(event_bus,
  trade_executor)`` are the trading service's adapters, ``pumpflow.trading.interfaces``
  (over its ledger); ``TradingEngine`` and ``RiskManager`` are the real classes of
  :mod:`pumpflow.common.trading`, with the requirements' signatures.

Token data may be a typed payload (:class:`~pumpflow.common.events.TokenTrade`, ...),
an :class:`~pumpflow.common.events.Event` envelope, or a PumpPortal frame (a mapping,
or its JSON), validated on the way in.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry

from pumpflow.common import activity, events, workers
from pumpflow.common import features as feature_domain
from pumpflow.common.activity.metrics import ActivityMetricsReader
from pumpflow.common.bus.abc import EventBus as Transport
from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.idempotency import Sequencer
from pumpflow.common.clock import Clock, WallClock
from pumpflow.common.features import FeatureVector, TradeInput
from pumpflow.common.pumpportal import decode_token_frame
from pumpflow.common.state import feature_cache
from pumpflow.common.state.abc import StateStore

#: ``source`` of the events these adapters publish
SOURCE = "interfaces"

TokenData = events.Payload | events.Event | TradeInput | Mapping[str, Any] | bytes | str
MonitorFunction = Callable[[str], Any]

_WALL = WallClock()
#: consumer groups of EventBus subscribers, unique in the process
_GROUPS = itertools.count()


def _transport(event_bus: EventBus | Transport) -> Transport:
    return event_bus.bus if isinstance(event_bus, EventBus) else event_bus


def _payload(event_type: str, data: events.Payload | Mapping[str, Any]) -> events.Payload:
    if isinstance(data, events.Payload):
        if data.TYPE != event_type:
            raise events.EventValidationError(f"a {data.TYPE} payload", event_type=event_type)
        return data
    try:
        return msgspec.convert(data, events.schema_for(event_type, 1))
    except msgspec.ValidationError as exc:
        raise events.validation_error(exc, prefix="", event_type=event_type) from None


def _token_payload(data: Mapping[str, Any] | bytes | str) -> events.Payload:
    """A PumpPortal frame as its typed payload."""
    raw = data if isinstance(data, bytes | str) else msgspec.json.encode(data)
    return decode_token_frame(raw)


def _check_mint(token_id: str, mint: str | None) -> None:
    if mint is not None and mint != token_id:
        raise ValueError(f"data of token {mint!r} given for token {token_id!r}")


# --------------------------------------------------------------------------------------
# Events and the bus.


def Event(
    event_type: str,
    data: events.Payload | Mapping[str, Any],
    *,
    timestamp: float | None = None,
    source: str = SOURCE,
    seq: int | None = None,
    causation_id: str | None = None,
) -> events.Event:
    """Wrap ``data`` (a payload, or its fields) as a validated event of ``event_type``.

    The envelope's ``type`` is the event type and ``time`` the timestamp (default: now).
    """
    when = _WALL.now() if timestamp is None else timestamp
    return events.make_event(
        _payload(event_type, data), source=source, time=when, seq=seq, causation_id=causation_id
    )


class EventSubscriber(ABC):
    """Receives the events it is subscribed to through :meth:`EventBus.subscribe`."""

    @abstractmethod
    def on_event(self, event: events.Event) -> Awaitable[None] | None:
        """Handle one event; may be a coroutine. Raising makes the bus retry it."""


class EventBus:
    """Subscribe objects to event types on a real transport (in-memory or RabbitMQ).

    Each subscriber consumes through a consumer group of its own (``<group_prefix>-<n>``),
    so every subscriber gets every event of its type; ``event_type`` may be a pattern
    (``token.*``). Delivery follows the transport's contract
    (:mod:`pumpflow.common.bus.abc`): per-token order, retries, dead letters.

    A group's queues outlive its consumer (the transport keeps them for the next one),
    so an unsubscribed subscriber's group is handed a consumer that drops what arrives,
    and the next subscriber of the same type takes that group over: the groups stay as
    many as the most subscribers a type had at once. On RabbitMQ they are durable
    queues: give each process its own ``group_prefix``.
    """

    def __init__(self, bus: Transport, *, group_prefix: str = SOURCE):
        self.bus = bus
        self._prefix = group_prefix
        self._subscriptions: dict[tuple[str, int], Subscription] = {}
        #: event type -> consumers that drop what arrives for groups nobody uses now
        self._idle: dict[str, list[Subscription]] = {}

    async def subscribe(self, event_type: str, subscriber: EventSubscriber) -> None:
        """Deliver events of ``event_type`` to ``subscriber.on_event``; again is a no-op."""
        ident = (event_type, id(subscriber))
        if ident in self._subscriptions:
            return

        async def handler(event: events.Event) -> None:
            result = subscriber.on_event(event)
            if inspect.isawaitable(result):
                await result

        idle = self._idle.get(event_type)
        if idle:
            dropping = idle.pop()
            await self.bus.unsubscribe(dropping)
            group = dropping.service
        else:
            group = f"{self._prefix}-{next(_GROUPS)}"
        subscription = Subscription(service=group, patterns=(event_type,), handler=handler)
        self._subscriptions[ident] = subscription
        await self.bus.subscribe(subscription)

    async def unsubscribe(self, event_type: str, subscriber: EventSubscriber) -> None:
        """Stop delivering ``event_type`` to ``subscriber`` (after its handlers in flight)."""
        subscription = self._subscriptions.pop((event_type, id(subscriber)), None)
        if subscription is None:
            return
        await self.bus.unsubscribe(subscription)
        dropping = Subscription(
            service=subscription.service, patterns=subscription.patterns, handler=_drop
        )
        await self.bus.subscribe(dropping)
        self._idle.setdefault(event_type, []).append(dropping)

    async def publish(self, event: events.Event) -> None:
        """Publish ``event``; returns once the transport holds it."""
        await self.bus.publish(event)


async def _drop(event: events.Event) -> None:
    pass


class EventPublisher:
    """Publishes events built from a type and data (see :func:`Event`)."""

    def __init__(self, event_bus: EventBus | Transport, *, source: str = SOURCE):
        self.bus = _transport(event_bus)
        self.source = source

    async def publish_event(
        self, event_type: str, data: events.Payload | Mapping[str, Any]
    ) -> events.Event:
        """Publish ``data`` as an event of ``event_type`` stamped now; return the event."""
        event = Event(event_type, data, source=self.source)
        await self.bus.publish(event)
        return event


# --------------------------------------------------------------------------------------
# Features.


def _vector(
    token_id: str, timestamp: float, features: FeatureVector | Mapping[str, float], version: str
) -> FeatureVector:
    if isinstance(features, FeatureVector):
        _check_mint(token_id, features.mint)
        return msgspec.structs.replace(features, time=float(timestamp))
    return FeatureVector(
        mint=token_id,
        version=version,
        seq=0,
        time=float(timestamp),
        names=tuple(features),
        values=tuple(float(v) for v in features.values()),
    )


class FeatureCache:
    """Each token's latest features: a bounded LRU, in front of a StateStore if given.

    It keeps the latest vector per token, not a series: ``get(token_id, timestamp)``
    answers the features as of ``timestamp`` while the latest vector is no later than
    that, and None when only an older one (no longer kept) would answer.
    """

    def __init__(
        self,
        max_size: int = 1000,
        *,
        store: StateStore | None = None,
        prefix: str = "features:",
        version: str = "",
    ):
        self.cache = feature_cache.FeatureCache(store, max_entries=max_size, prefix=prefix)
        #: feature-set version given to vectors added as plain mappings
        self.version = version

    async def add(
        self, token_id: str, timestamp: float, features: FeatureVector | Mapping[str, float]
    ) -> FeatureVector:
        """Cache ``features`` (a vector or name -> value) as ``token_id``'s at ``timestamp``."""
        vector = _vector(token_id, timestamp, features, self.version)
        await self.cache.add(vector)
        return vector

    async def get(self, token_id: str, timestamp: float | None = None) -> FeatureVector | None:
        """The latest vector (as of ``timestamp``, when given); None if not cached."""
        vector = await self.cache.get(token_id)
        if vector is None or (timestamp is not None and vector.time > timestamp):
            return None
        return vector

    async def clear(self, token_id: str | None = None) -> None:
        """Forget one token (in the store too) or everything in memory."""
        await self.cache.clear(token_id, from_store=token_id is not None)


class FeatureManager:
    """Features per token from raw token data, cached and published as ``features.updated``."""

    def __init__(
        self,
        event_bus: EventBus | Transport,
        *,
        definitions: Iterable[feature_domain.FeatureDef] | None = None,
        cache: FeatureCache | feature_cache.FeatureCache | None = None,
        clock: Clock | None = None,
        source: str = SOURCE,
    ):
        self.bus = _transport(event_bus)
        self.manager = feature_domain.FeatureManager(
            None if definitions is None else tuple(definitions)
        )
        if isinstance(cache, FeatureCache):
            cache = cache.cache
        self.cache = cache if cache is not None else feature_cache.FeatureCache()
        self._clock = clock or _WALL
        self.source = source
        self._sequencer = Sequencer()

    def register_features(self, definitions: Iterable[feature_domain.FeatureDef]) -> str:
        """Replace the feature set; return its version (see the real FeatureManager)."""
        return self.manager.register_features(definitions)

    async def generate_features(
        self, token_id: str, raw_data: TokenData | None
    ) -> FeatureVector | None:
        """Fold ``raw_data`` in (None: nothing new), then cache and publish the features.

        Returns the token's vector, or None while nothing of it is known.
        """
        if raw_data is not None:
            self.update_feature_history(token_id, None, raw_data)
        cause = raw_data if isinstance(raw_data, events.Event) else None
        vector = self.manager.generate_features(token_id)
        if vector is None:
            return None
        seq = self._sequencer.next(token_id)
        vector = msgspec.structs.replace(vector, out_seq=seq, updated_at=self._clock.now())
        payload = events.FeaturesUpdated(
            mint=token_id,
            feature_set_version=vector.version,
            source_seq=vector.seq,
            names=vector.names,
            values=vector.values,
        )
        await self.bus.publish(
            events.make_event(payload, source=self.source, time=vector.time, seq=seq, cause=cause)
        )
        await self.cache.add(vector)
        return vector

    async def get_cached_features(self, token_id: str) -> FeatureVector | None:
        """The cached vector of ``token_id`` for the current feature-set version."""
        return await self.cache.get(token_id, version=self.manager.version)

    async def clear_cache(self, token_id: str | None = None) -> None:
        """Forget one token's cached vector (in the store too) or every one in memory."""
        await self.cache.clear(token_id, from_store=token_id is not None)

    def update_feature_history(
        self, token_id: str, timestamp: float | None, features: TokenData
    ) -> feature_domain.TokenState | None:
        """Fold one token event at ``timestamp`` into the token's feature history.

        ``features`` is the token's data (a creation or trade); the timestamp defaults
        to an envelope's time, else now. Returns the token's state, or None for data
        that is not a trade or creation.
        """
        item = features
        seq = None
        if isinstance(item, events.Event):
            timestamp = item.time if timestamp is None else timestamp
            seq = item.seq
            item = item.data
        elif isinstance(item, Mapping | bytes | str):
            item = _token_payload(item)
        when = self._clock.now() if timestamp is None else timestamp
        if isinstance(item, TradeInput):
            return self.manager.update_feature_history(item, mint=token_id, time=when, seq=seq)
        _check_mint(token_id, getattr(item, "mint", None))
        return self.manager.update_feature_history(item, time=when, seq=seq)


# --------------------------------------------------------------------------------------
# Token monitors.


class TokenMonitorThreadPool:
    """Runs each token's monitor function every ``interval_s`` on the real worker pool.

    A monitor is called with the token id; a coroutine function is awaited, any other
    function runs in a thread. The pool keeps a token's runs in order and never
    concurrent, serves the highest ``priority`` first when behind, and replaces workers
    whose monitor raised or hung (``monitor_threads`` checks at once; the pool's
    supervisor also does every ``health_interval_s``). A monitor that raised runs again
    at its next interval.
    """

    def __init__(
        self,
        max_threads: int = 10,
        *,
        interval_s: float = 1.0,
        name: str = "monitors",
        task_deadline_s: float = 30.0,
        registry: CollectorRegistry | None = None,
    ):
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        config = workers.WorkerPoolConfig(
            name=name, workers=max_threads, task_deadline_s=task_deadline_s
        )
        self.pool = workers.TokenMonitorThreadPool(config, registry=registry)
        self.interval_s = interval_s
        self._monitors: dict[str, tuple[MonitorFunction, int]] = {}
        self._drivers: dict[str, asyncio.Task] = {}
        self._started = False

    def add_token(
        self, token_id: str, monitor_function: MonitorFunction, *, priority: int = 0
    ) -> None:
        """Monitor ``token_id`` with ``monitor_function`` (replacing its previous one)."""
        self.remove_token(token_id)
        self._monitors[token_id] = (monitor_function, priority)
        if self._started:
            self._drive(token_id)

    def remove_token(self, token_id: str) -> bool:
        """Stop monitoring ``token_id`` (a run in progress finishes); False if unknown."""
        driver = self._drivers.pop(token_id, None)
        if driver is not None:
            driver.cancel()
        return self._monitors.pop(token_id, None) is not None

    async def start_all(self) -> None:
        """Start the workers and every token's monitor."""
        await self.pool.start()
        self._started = True
        for token_id in self._monitors:
            if token_id not in self._drivers:
                self._drive(token_id)

    async def stop_all(self, *, drain_s: float = 10.0) -> None:
        """Stop every monitor, let runs in progress finish (up to ``drain_s``), stop."""
        self._started = False
        drivers = list(self._drivers.values())
        self._drivers.clear()
        for driver in drivers:
            driver.cancel()
        await asyncio.gather(*drivers, return_exceptions=True)
        await self.pool.stop(drain=True, drain_s=drain_s)

    def monitor_threads(self) -> workers.PoolHealth:
        """Replace dead or hung workers and stopped monitors now; return the pool's health."""
        self.pool.check_health()
        if self._started:
            for token_id, driver in list(self._drivers.items()):
                if driver.done():
                    self._drive(token_id)
        return self.pool.health()

    @property
    def tokens(self) -> list[str]:
        return list(self._monitors)

    def _drive(self, token_id: str) -> None:
        self._drivers[token_id] = asyncio.get_running_loop().create_task(
            self._run(token_id), name=f"monitor:{token_id}"
        )

    async def _run(self, token_id: str) -> None:
        function, priority = self._monitors[token_id]

        async def once() -> None:
            if inspect.iscoroutinefunction(function):
                await function(token_id)
                return
            result = await asyncio.to_thread(function, token_id)
            if inspect.isawaitable(result):
                await result

        while True:
            try:
                future = self.pool.submit(token_id, once, priority=priority)
                # a removed token's run in progress still finishes on its worker
                await asyncio.shield(future)
            except workers.PoolClosed:
                return
            except Exception:
                pass  # the pool logged and counted it; the monitor runs again
            await asyncio.sleep(self.interval_s)


# --------------------------------------------------------------------------------------
# Activity.


class ActivityAnalyzer:
    """Token lifecycles from token events; each transition published as ``token.lifecycle``.

    ``update_activity_metrics`` takes a token event (token.created, token.trade,
    token.migrated), a ``features.updated`` event, or ready
    :class:`~pumpflow.common.activity.ActivityMetrics`. Trades are folded into a
    FeatureManager (the features service's feature definitions) and read as activity
    metrics; the rules, thresholds and timers are the real ActivityAnalyzer's, on
    ``clock``. Transitions its timers make (a token going quiet) are published as they
    happen; ``flush()`` waits for them.
    """

    def __init__(
        self,
        event_bus: EventBus | Transport,
        *,
        clock: Clock | None = None,
        thresholds: activity.LifecycleThresholds | None = None,
        source: str = SOURCE,
    ):
        self.bus = _transport(event_bus)
        self.source = source
        self.analyzer = activity.ActivityAnalyzer(
            clock=clock or _WALL,
            thresholds=thresholds,
            on_transition=self._on_transition,
            on_retire=self._on_retire,
        )
        self.features = feature_domain.FeatureManager()
        self._reader = ActivityMetricsReader()
        self._sequencer = Sequencer()
        self._outbox: deque[tuple[activity.Transition, events.Event | None]] = deque()
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task | None = None
        self._causation: events.Event | None = None

    async def update_activity_metrics(
        self, token_id: str, event: events.Event | activity.ActivityMetrics
    ) -> activity.Transition | None:
        """Take one event of the token; return the transition (or recommendation) made."""
        analyzer = self.analyzer
        if isinstance(event, activity.ActivityMetrics):
            transition = analyzer.update_activity_metrics(token_id, event)
            await self.flush()
            return transition
        _check_mint(token_id, event.key)
        self._causation = event
        try:
            if event.type == "token.migrated":
                transition = analyzer.token_migrated(token_id)
            elif event.type == "features.updated":
                data = event.data
                metrics = self._reader.read(data.names, data.values, time=event.time)
                transition = analyzer.update_activity_metrics(token_id, metrics)
            elif event.type in ("token.created", "token.trade"):
                created = None
                if event.type == "token.created":
                    created = analyzer.token_created(token_id)
                transition = self._fold(token_id, event) or created
            else:
                raise ValueError(f"activity does not take {event.type} events")
        finally:
            self._causation = None
        await self.flush()
        return transition

    def get_activity_level(self, token_id: str) -> float:
        """Activity 0..1 against graduates' pace, fading with the time since the last trade."""
        return self.analyzer.get_activity_level(token_id)

    def detect_activity_change(self, token_id: str) -> activity.ActivityChange | None:
        """A surge or drop of the activity level against its recent baseline, or None."""
        return self.analyzer.detect_activity_change(token_id)

    def get_token_lifecycle_state(self, token_id: str) -> events.LifecycleState | None:
        """new, active, declining, inactive or graduated; None for an unknown token."""
        return self.analyzer.get_token_lifecycle_state(token_id)

    async def flush(self) -> None:
        """Publish every transition made so far, in order."""
        async with self._lock:
            while self._outbox:
                t, cause = self._outbox[0]
                payload = events.TokenLifecycle(
                    mint=t.mint,
                    state=t.state,
                    previous_state=t.previous_state,
                    reason=t.reason,
                    priority=t.priority,
                    activity_level=round(t.activity_level, 6),
                )
                seq, renumbered = self._sequencer.number(t.mint)
                await self.bus.publish(
                    events.make_event(
                        payload,
                        source=self.source,
                        time=t.time,
                        seq=seq,
                        cause=cause,
                        renumbered=renumbered,
                    )
                )
                self._outbox.popleft()

    def _fold(self, token_id: str, event: events.Event) -> activity.Transition | None:
        if self.features.update_feature_history(event) is None:
            return None
        vector = self.features.generate_features(token_id)
        if vector is None:
            return None
        metrics = self._reader.read(vector.names, vector.values, time=vector.time)
        return self.analyzer.update_activity_metrics(token_id, metrics)

    def _on_transition(self, transition: activity.Transition) -> None:
        self._outbox.append((transition, self._causation))
        if self._causation is None and (self._flusher is None or self._flusher.done()):
            # made by a timer: nobody awaits a flush, so start one
            try:
                self._flusher = asyncio.get_running_loop().create_task(self.flush())
            except RuntimeError:
                pass  # no loop: the next update or flush() publishes it

    def _on_retire(self, mint: str, state: events.LifecycleState) -> None:
        self.features.drop_token(mint)
        # its next transition, if any, is numbered above every seq given (no reuse)
        self._sequencer.forget(mint)


# --------------------------------------------------------------------------------------
# Event history.


class EventHistoryManager:
    """Recent events per token with time-range queries, bounded and pruned by age."""

    def __init__(
        self,
        *,
        config: feature_domain.HistoryConfig | None = None,
        clock: Clock | None = None,
        source: str = SOURCE,
    ):
        self._clock = clock or _WALL
        self.history = feature_domain.EventHistoryManager(config, clock=self._clock)
        self.source = source

    def add_event(
        self, token_id: str, event_type: str, event_data: events.Event | events.Payload | Mapping
    ) -> events.Event:
        """Record an event of the token (an envelope keeps its time; else stamped now)."""
        if isinstance(event_data, events.Event):
            if event_data.type != event_type:
                raise ValueError(f"a {event_data.type} event given as {event_type}")
            event = event_data
        else:
            event = Event(event_type, event_data, timestamp=self._clock.now(), source=self.source)
        _check_mint(token_id, event.key)
        self.history.add_event(token_id, event)
        return event

    def get_events(
        self,
        token_id: str,
        event_type: str | None = None,
        start: float | None = None,
        end: float | None = None,
    ) -> list[events.Event]:
        """The token's events of ``event_type`` (None: all) with start <= time <= end."""
        found = self.history.get_events(token_id, start, end)
        if event_type is None:
            return found
        return [e for e in found if e.type == event_type]

    def get_latest_events(self, count: int = 10) -> list[events.Event]:
        """The ``count`` latest events of all tokens, oldest first (reads every token)."""
        if count <= 0:
            return []
        candidates = (
            e for mint in self.history.mints() for e in self.history.get_latest_events(mint, count)
        )
        return heapq.nlargest(count, candidates, key=lambda e: e.time)[::-1]

    def prune_old_events(self, max_age: float = 3600) -> int:
        """Drop events older than ``max_age`` seconds; return how many were dropped."""
        return self.history.prune_old_events(max_age_s=max_age)

    def clear_token_history(self, token_id: str) -> None:
        self.history.clear_token_history(token_id)
