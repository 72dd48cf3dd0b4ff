"""Logic both transports share: publish validation and lane planning, and the consume
side of a lane (dedup, retries, metrics, event log, dead-letter decision)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from time import perf_counter

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.eventlog import EventLog
from pumpflow.common.bus.idempotency import SeqTracker, Verdict
from pumpflow.common.bus.metrics import Series, record_dead_letter, series
from pumpflow.common.bus.routing import resolve_types
from pumpflow.common.events import (
    Event,
    EventValidationError,
    Payload,
    registered,
    source_service,
)

log = logging.getLogger(__name__)

PARTITION = "partition"
CRITICAL = "critical"
BROADCAST = "broadcast"
#: input dead-lettered by a service itself (a malformed frame, say)
INPUT = "input"

_schemas: dict[tuple[str, int], type[Payload]] = {}
#: event source -> publisher service, the scope of seq numbers
_publishers: dict[str, str] = {}


def _scope(event: Event, subscription: Subscription) -> tuple[str, str] | None:
    """The dedup scope of an event (publishing service, key), or None when not tracked."""
    if not subscription.deduplicate or event.seq is None or event.key is None:
        return None
    publisher = _publishers.get(event.source)
    if publisher is None:
        publisher = _publishers[event.source] = source_service(event.source)
    return (publisher, event.key)


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

    ``partition``: keyed, ordinary types (one queue per partition, shared by replicas);
    ``critical``: keyed critical types (one queue per service, shared by replicas);
    ``broadcast`` / ``critical_broadcast``: keyless deliveries of ordinary / critical
    types (one queue per replica each, so every replica gets them).
    """

    partition: tuple[str, ...]
    critical: tuple[str, ...]
    version: int

    @classmethod
    def of(cls, subscription: Subscription) -> Bindings:
        schemas = resolve_types(subscription.patterns, subscription.version)
        return cls(
            partition=tuple(s.TYPE for s in schemas if not s.CRITICAL),
            critical=tuple(s.TYPE for s in schemas if s.CRITICAL),
            version=subscription.version,
        )


def publish_lane(schema: type[Payload], *, keyless: bool) -> str:
    """Lane an event travels on: critical types on the critical lane, keyless ones broadcast."""
    if schema.CRITICAL:
        return CRITICAL
    return BROADCAST if keyless else PARTITION


class Dispatcher:
    """The consume side of one lane of one service.

    Drops duplicates and counts gaps (a :class:`SeqTracker` per lane), runs the
    handler with retries, records metrics and the event log, and decides when a
    message is dead-lettered: :meth:`dispatch` returns the reason, the transport
    stores the message. Either way the message is done and may be acked.
    """

    __slots__ = ("_event_log", "_series", "lane", "retry_backoff", "service", "tracker")

    def __init__(
        self, *, service: str, lane: str, event_log: EventLog, retry_backoff: float = 0.05
    ):
        self.service = service
        self.lane = lane
        self.retry_backoff = retry_backoff
        self.tracker = SeqTracker()
        self._event_log = event_log
        self._series: dict[str, Series] = {}

    def series(self, event_type: str) -> Series:
        found = self._series.get(event_type)
        if found is None:
            found = self._series[event_type] = series(self.service, event_type, self.lane)
        return found

    async def dispatch(self, event: Event, subscription: Subscription) -> str | None:
        """Deliver ``event`` to the subscription's handler; return a dead-letter reason or None."""
        stats = self._series.get(event.type) or self.series(event.type)
        event_log = self._event_log
        outcome = "handled"
        scope = _scope(event, subscription)
        if scope is not None:
            verdict = self.tracker.check_at(scope, event.seq)
            if verdict is not Verdict.NEW:
                if verdict is Verdict.DUPLICATE:
                    stats.duplicates += 1
                    if event_log.enabled:
                        event_log.consumed(
                            event, service=self.service, lane=self.lane, outcome="duplicate"
                        )
                    return None
                stats.gaps += 1
                outcome = "gap"
                log.warning(
                    "seq gap: %s got %s key=%s seq=%s from %s, last applied %s",
                    self.service,
                    event.type,
                    event.key,
                    event.seq,
                    event.source,
                    self.tracker.last(*scope),
                )
        stats.age.observe(time.time() - event.time)
        attempts = subscription.max_attempts if subscription.max_attempts > 1 else 1
        for attempt in range(1, attempts + 1):
            started = perf_counter()
            try:
                await subscription.handler(event)
            except Exception as exc:
                failure = exc
                log.warning(
                    "%s handler failed on %s id=%s (attempt %d/%d): %r",
                    self.service,
                    event.type,
                    event.id,
                    attempt,
                    attempts,
                    exc,
                )
                if attempt < attempts and self.retry_backoff:
                    await asyncio.sleep(self.retry_backoff * attempt)
                continue
            stats.handler.observe(perf_counter() - started)
            stats.consumed += 1
            if scope is not None:
                self.tracker.commit_at(scope, event.seq)
            if event_log.enabled:
                event_log.consumed(event, service=self.service, lane=self.lane, outcome=outcome)
            return None
        # not committed yet: the transport calls settled() once the dead letter is
        # stored, so a redelivery after a lost write is dead-lettered, not dropped
        reason = f"handler failed {attempts} times: {type(failure).__name__}: {failure}"
        record_dead_letter(self.service, event.type, self.lane)
        event_log.consumed(event, service=self.service, lane=self.lane, outcome="dead-lettered")
        log.error("%s dead-lettered %s id=%s: %s", self.service, event.type, event.id, reason)
        return reason

    def settled(self, event: Event, subscription: Subscription) -> None:
        """Record a dead-lettered event as done, once its dead letter is stored.

        A redelivery of it is then a duplicate; before, it is dead-lettered again.
        """
        scope = _scope(event, subscription)
        if scope is not None:
            self.tracker.commit_at(scope, event.seq)

    def malformed(self, error: EventValidationError, event_type: str | None) -> str:
        """Account for a message that does not decode; return the dead-letter reason."""
        reason = f"malformed: {error}"
        record_dead_letter(self.service, event_type, self.lane)
        log.error("%s dead-lettered a malformed %s message: %s", self.service, event_type, reason)
        return reason
