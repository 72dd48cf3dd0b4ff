"""Logic both transports share: publish validation and lane planning, and the consume
side of a lane (retries, waits for dependencies, metrics, event log, dead-letter decision)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from time import perf_counter

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.eventlog import EventLog
from pumpflow.common.bus.metrics import Series, series
from pumpflow.common.bus.routing import partition_of, resolve_types
from pumpflow.common.dependencies import WAITS, Backoff, transient_dependency
from pumpflow.common.events import (
    Event,
    EventValidationError,
    Payload,
    registered,
)

log = logging.getLogger(__name__)

PARTITION = "partition"
CRITICAL = "critical"
BROADCAST = "broadcast"
#: input dead-lettered by a service itself (a malformed frame, say)
INPUT = "input"

_schemas: dict[tuple[str, int], type[Payload]] = {}


def check_publishable(event: Event) -> type[Payload]:
    """Return the payload schema of ``event``; raise EventValidationError if it does not fit.

    The in-memory bus hands the object itself to handlers, so this is what keeps it
    as strict as the wire: only the registered payload type of (type, version) passes.
    """
    ident = (event.type, event.version)
    schema = _schemas.get(ident)
    if schema is None:
        schema = registered().get(ident)
        if schema is None:
            raise EventValidationError(
                f"unknown event type/version {event.type} v{event.version}", field="type"
            )
        _schemas[ident] = schema
    if type(event.data) is not schema:
        raise EventValidationError(
            f"payload is {type(event.data).__name__}, expected {schema.__name__}",
            field="data",
            event_type=event.type,
        )
    return schema


@dataclass(frozen=True, slots=True, kw_only=True)
class Bindings:
    """What a subscription's queues are bound to, by lane.

    ``partition``: ordinary types, keyed on one queue per partition, keyless on a
    broadcast queue; ``critical``: critical types, keyed on one queue per service,
    keyless on a critical broadcast queue. Keyed ones are on queues shared by the
    group's replicas; keyless ones on a pair of queues of each replica's own (every
    replica gets them), or, ``shared_keyless``, on the group's (the critical queue, and
    one broadcast queue), which keep them while no replica consumes.
    """

    partition: tuple[str, ...]
    critical: tuple[str, ...]
    version: int
    shared_keyless: bool = False

    @classmethod
    def of(cls, subscription: Subscription) -> Bindings:
        return cls.of_patterns(
            subscription.patterns,
            subscription.version,
            shared_keyless=subscription.shared_keyless,
        )

    @classmethod
    def of_patterns(
        cls, patterns: tuple[str, ...], version: int, *, shared_keyless: bool = False
    ) -> Bindings:
        schemas = resolve_types(patterns, version)
        return cls(
            partition=tuple(s.TYPE for s in schemas if not s.CRITICAL),
            critical=tuple(s.TYPE for s in schemas if s.CRITICAL),
            version=version,
            shared_keyless=shared_keyless,
        )


def check_declared(service: str, declared: Bindings | None, subscribed: Bindings) -> None:
    """Raise unless a subscription takes every type its service's queues were declared for,
    and its keyless events where they were declared to go.

    The queues are the group's, not the replica's: a type bound to them that the handler
    does not take would reach it anyway; a replica taking keyless events on its own
    queues would miss those of the group's shared ones, and the reverse get them twice.
    """
    if declared is None:
        return
    if declared.shared_keyless != subscribed.shared_keyless:
        where = {True: "the group's shared queues", False: "each replica's own queues"}
        raise ValueError(
            f"{service} subscribes to take its keyless events on "
            f"{where[subscribed.shared_keyless]} but its queues were declared for them on "
            f"{where[declared.shared_keyless]} (shared_keyless): declare and subscribe alike "
            "(pumpflow.common.runtime.topology)"
        )
    extra = sorted(
        {*declared.partition, *declared.critical} - {*subscribed.partition, *subscribed.critical}
    )
    if extra or declared.version != subscribed.version:
        raise ValueError(
            f"{service} subscribes to v{subscribed.version} of "
            f"{sorted({*subscribed.partition, *subscribed.critical})} but its queues were "
            f"declared for v{declared.version} of {extra or 'other types'}: declare what it "
            "consumes (pumpflow.common.runtime.topology)"
        )


def publish_lane(schema: type[Payload], *, keyless: bool) -> str:
    """Lane an event travels on: critical types on the critical lane, keyless ones broadcast."""
    if schema.CRITICAL:
        return CRITICAL
    return BROADCAST if keyless else PARTITION


def redelivery_lane(event: Event, partitions: int) -> tuple[str, int | None]:
    """The lane of a group's shared queues ``event`` goes back to alone
    (:meth:`~pumpflow.common.bus.abc.EventBus.redeliver`), with its key's partition on
    the partition lane: the lane it was published on, a keyless one's the group's own."""
    key = event.key
    lane = publish_lane(check_publishable(event), keyless=key is None)
    return lane, partition_of(key, partitions) if lane == PARTITION and key is not None else None


class HandedBack(asyncio.CancelledError):
    """The lane stopped while its handler waited for a dependency: the delivery goes back.

    A cancellation as far as the transports go: the message is returned to its queue
    unacked (RabbitMQ nack with requeue, the in-memory lane's front), for whichever
    consumer comes next.
    """


#: consumer group -> released when set: deliveries to a held group wait (lock-step replays)
HELD: dict[str, asyncio.Event] = {}


def hold(service: str) -> None:
    """Hold the deliveries to ``service``'s handlers in this process until :func:`release`.

    A lock-step replay holds a group to order its deliveries after what the other
    groups do with the same step (a prediction after the lifecycle of its features,
    say). Deliveries already taken wait in the dispatcher, in order; nothing is lost.
    """
    HELD.setdefault(service, asyncio.Event())


def release(service: str) -> None:
    """Let ``service``'s held deliveries go on, in the order they came."""
    gate = HELD.pop(service, None)
    if gate is not None:
        gate.set()


async def _unheld(service: str) -> None:
    gate = HELD.get(service)
    if gate is not None:
        await gate.wait()


def _by_type(events: Sequence[Event]) -> Iterable[tuple[str, Sequence[Event]]]:
    """The batch's events by type (one group, the batch itself, when all share one)."""
    if len(events) <= 1:
        # most deliveries of a replay: a partition's one or two events of a market second
        return [(events[0].type, events)] if events else []
    types = [event.type for event in events]
    first = types[0]
    if types.count(first) == len(types):
        return [(first, events)]
    groups: dict[str, list[Event]] = {}
    for kind, event in zip(types, events, strict=True):
        group = groups.get(kind)
        if group is None:
            groups[kind] = [event]
        else:
            group.append(event)
    return groups.items()


class Dispatcher:
    """The consume side of one lane of one service.

    Runs the handler with retries, records metrics and the event log, and decides
    when a message is dead-lettered: :meth:`dispatch` returns the reason, the
    transport stores the message (and counts it, as every letter it stores, once
    stored). Either way the message is done and may be acked.
    Duplicates are the consumer's to drop (it stores the last applied seq with its
    state); the bus delivers at least once.

    A handler that fails because a dependency fails for a while
    (:func:`~pumpflow.common.dependencies.transient_dependency`) is not failing on its
    event: it is retried with ``dependency_backoff`` until the dependency answers, and
    the lane stalls meanwhile (later deliveries wait their turn, as the window allows).
    Such waits do not count against ``Subscription.max_attempts``. :meth:`halt` (the
    transport stops the lane) ends them at once: the delivery is handed back.
    """

    __slots__ = (
        "_event_log",
        "_halted",
        "_series",
        "dependency_backoff",
        "lane",
        "retry_backoff",
        "service",
    )

    def __init__(
        self,
        *,
        service: str,
        lane: str,
        event_log: EventLog,
        retry_backoff: float = 0.05,
        dependency_backoff: Backoff | None = None,
    ):
        self.service = service
        self.lane = lane
        self.retry_backoff = retry_backoff
        self.dependency_backoff = dependency_backoff or Backoff()
        self._event_log = event_log
        self._series: dict[str, Series] = {}
        #: set while the lane is stopping: waits for a dependency hand their delivery back
        self._halted: asyncio.Event | None = None

    def series(self, event_type: str) -> Series:
        found = self._series.get(event_type)
        if found is None:
            found = self._series[event_type] = series(self.service, event_type, self.lane)
        return found

    def halt(self) -> None:
        """Hand back the deliveries waiting for a dependency, now and until :meth:`resume`."""
        if self._halted is None:
            self._halted = asyncio.Event()
        self._halted.set()

    def resume(self) -> None:
        """Wait for dependencies again (the lane consumes again)."""
        if self._halted is not None and self._halted.is_set():
            self._halted = asyncio.Event()

    async def dispatch(
        self, event: Event, subscription: Subscription, *, observed: bool = False
    ) -> str | None:
        """Deliver ``event`` to the subscription's handler; return a dead-letter reason or None.

        ``observed``: its age and receipt age are counted already (by the batch it came
        in, handled alone after the batch's call failed): one delivery, one observation.
        """
        if HELD:
            await _unheld(self.service)
        stats = self._series.get(event.type) or self.series(event.type)
        event_log = self._event_log
        if not observed:
            now = time.time()
            stats.age.observe(now - event.time)
            if event.received_at is not None:
                stats.receipt.observe(now - event.received_at)
        attempts = subscription.max_attempts if subscription.max_attempts > 1 else 1
        attempt = 0
        with ExitStack() as waiting:
            pauses: Iterator[float] | None = None
            while True:
                started = perf_counter()
                try:
                    await subscription.handler(event)
                except Exception as exc:
                    dependency = transient_dependency(exc)
                    if dependency is not None:
                        if pauses is None:
                            pauses = self.dependency_backoff.pauses()
                            waiting.enter_context(WAITS.waiting(dependency))
                            log.warning(
                                "%s handler waits for %s on %s id=%s: %r",
                                self.service, dependency, event.type, event.id, exc,
                            )  # fmt: skip
                        WAITS.waited(dependency, self.service, exc)
                        await self._pause(next(pauses), event)
                        continue
                    attempt += 1
                    failure = exc
                    log.warning(
                        "%s handler failed on %s id=%s (attempt %d/%d): %r",
                        self.service, event.type, event.id, attempt, attempts, exc,
                    )  # fmt: skip
                    if attempt >= attempts:
                        break
                    if self.retry_backoff:
                        await asyncio.sleep(self.retry_backoff * attempt)
                    continue
                stats.handler.observe(perf_counter() - started)
                stats.consumed += 1
                if event_log.enabled:
                    event_log.consumed(
                        event, service=self.service, lane=self.lane, outcome="handled"
                    )
                return None
        reason = f"handler failed {attempts} times: {type(failure).__name__}: {failure}"
        event_log.consumed(event, service=self.service, lane=self.lane, outcome="dead-lettered")
        log.error("%s dead-lettered %s id=%s: %s", self.service, event.type, event.id, reason)
        return reason

    async def dispatch_batch(
        self, events: Sequence[Event], subscription: Subscription
    ) -> list[tuple[Event, str]]:
        """Deliver ``events`` to the subscription's batch handler in one call.

        Return the dead-lettered ones with their reasons: none when the call returns; when
        it raises, each event is dispatched alone, in delivery order (see :meth:`dispatch`).
        """
        handler = subscription.batch_handler
        assert handler is not None
        if HELD:
            await _unheld(self.service)
        now = time.time()
        found = self._series
        # per type: its series and how many of its events the batch holds
        counted: list[tuple[Series, int]] = []
        for kind, group in _by_type(events):
            stats = found.get(kind) or self.series(kind)
            stats.age.observe_many([now - event.time for event in group])
            receipts = [now - at for event in group if (at := event.received_at) is not None]
            if receipts:
                stats.receipt.observe_many(receipts)
            counted.append((stats, len(group)))
        started = perf_counter()
        try:
            await handler(events)
        except Exception as exc:
            log.warning(
                "%s batch handler failed on %d events, handling each alone: %r",
                self.service,
                len(events),
                exc,
            )
            dead = []
            for event in events:
                reason = await self.dispatch(event, subscription, observed=True)
                if reason is not None:
                    dead.append((event, reason))
            return dead
        # each event's share of the call, so the histogram stays per event
        share = (perf_counter() - started) / len(events)
        for stats, count in counted:
            stats.handler.observe(share, count)
            stats.consumed += count
        event_log = self._event_log
        if event_log.enabled:
            for event in events:
                event_log.consumed(event, service=self.service, lane=self.lane, outcome="handled")
        return []

    async def halted_within(self, seconds: float) -> bool:
        """Sleep ``seconds``, less if the lane halts; True if it halted (before or meanwhile)."""
        if self._halted is None:
            self._halted = asyncio.Event()
        halted = self._halted
        if not halted.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await halted.wait()
        return halted.is_set()

    async def _pause(self, seconds: float, event: Event) -> None:
        """Sleep ``seconds``; raise :class:`HandedBack` if the lane halts meanwhile."""
        if await self.halted_within(seconds):
            log.info(
                "%s: %s id=%s handed back while waiting for a dependency",
                self.service, event.type, event.id,
            )  # fmt: skip
            raise HandedBack()

    def malformed(self, error: EventValidationError, event_type: str | None) -> str:
        """Log a message that does not decode; return the dead-letter reason."""
        reason = f"malformed: {error}"
        log.error("%s dead-lettered a malformed %s message: %s", self.service, event_type, reason)
        return reason
