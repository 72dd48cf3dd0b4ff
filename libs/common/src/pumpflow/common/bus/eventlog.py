"""Switchable audit log of events on the bus, for debugging and auditing.

``none`` logs nothing, ``all`` logs every publish and consume, ``sampled`` logs a
share of the events chosen by a hash of the event id. The choice depends on the id
only, so the publish and every consume of one event are logged together, even when
they happen in different processes (Python's ``hash`` is salted per process; crc32
is not).
"""

from __future__ import annotations

import logging
import zlib
from typing import Literal

from pumpflow.common.events import Event

EventLogMode = Literal["none", "sampled", "all"]
_MODES = ("none", "sampled", "all")


class EventLog:
    """Logs publishes and consumes of the selected events at INFO."""

    __slots__ = ("_threshold", "enabled", "logger", "mode", "sample_rate")

    def __init__(
        self,
        mode: EventLogMode = "none",
        sample_rate: float = 0.01,
        logger: logging.Logger | None = None,
    ):
        if mode not in _MODES:
            raise ValueError(f"event log mode must be one of {_MODES}, not {mode!r}")
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"event log sample rate must be within [0, 1], not {sample_rate}")
        self.mode = mode
        self.sample_rate = sample_rate
        self.logger = logger or logging.getLogger("pumpflow.events")
        #: checked on the hot path before anything else
        self.enabled = mode == "all" or (mode == "sampled" and sample_rate > 0.0)
        self._threshold = int(sample_rate * 2**32) if mode == "sampled" else 2**32

    def selected(self, event: Event) -> bool:
        """True when this event is logged (the same answer for every process)."""
        if not self.enabled:
            return False
        if self._threshold >= 2**32:
            return True
        return zlib.crc32(event.id.encode()) < self._threshold

    def published(self, event: Event, *, routing_key: str) -> None:
        if self.enabled and self.selected(event):
            self._log("published", event, routing_key=routing_key)

    def consumed(self, event: Event, *, service: str, lane: str, outcome: str) -> None:
        """Log one delivery; ``outcome``: handled, dead-lettered."""
        if self.enabled and self.selected(event):
            self._log("consumed", event, service=service, lane=lane, outcome=outcome)

    def _log(self, action: str, event: Event, **context: str) -> None:
        details = " ".join(f"{name}={value}" for name, value in context.items())
        self.logger.info(
            "event %s id=%s type=%s v%d key=%s seq=%s source=%s %s",
            action,
            event.id,
            event.type,
            event.version,
            event.key,
            event.seq,
            event.source,
            details,
            extra={
                "event_action": action,
                "event_id": event.id,
                "event_type": event.type,
                "event_version": event.version,
                "event_key": event.key,
                "event_seq": event.seq,
                "event_source": event.source,
                "event_causation_id": event.causation_id,
                **{f"event_{name}": value for name, value in context.items()},
            },
        )
