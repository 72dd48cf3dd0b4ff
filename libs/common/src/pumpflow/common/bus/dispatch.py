"""Logic both transports share: publish validation and lane planning, and the consume
side of a lane (retries, metrics, event log, dead-letter decision)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from time import perf_counter

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.eventlog import EventLog
from pumpflow.common.bus.metrics import Series, record_dead_letter, series
from pumpflow.common.bus.routing import resolve_types
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

    Runs the handler with retries, records metrics and the event log, and decides
    when a message is dead-lettered: :meth:`dispatch` returns the reason, the
    transport stores the message. Either way the message is done and may be acked.
    Duplicates are the consumer's to drop (it stores the last applied seq with its
    state); the bus delivers at least once.
    """

    __slots__ = ("_event_log", "_series", "lane", "retry_backoff", "service")

    def __init__(
        self, *, service: str, lane: str, event_log: EventLog, retry_backoff: float = 0.05
    ):
        self.service = service
        self.lane = lane
        self.retry_backoff = retry_backoff
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
            if event_log.enabled:
                event_log.consumed(event, service=self.service, lane=self.lane, outcome="handled")
            return None
        reason = f"handler failed {attempts} times: {type(failure).__name__}: {failure}"
        record_dead_letter(self.service, event.type, self.lane)
        event_log.consumed(event, service=self.service, lane=self.lane, outcome="dead-lettered")
        log.error("%s dead-lettered %s id=%s: %s", self.service, event.type, event.id, reason)
        return reason

    def malformed(self, error: EventValidationError, event_type: str | None) -> str:
        """Account for a message that does not decode; return the dead-letter reason."""
        reason = f"malformed: {error}"
        record_dead_letter(self.service, event_type, self.lane)
        log.error("%s dead-lettered a malformed %s message: %s", self.service, event_type, reason)
        return reason
