"""Durable stores in Postgres."""

from pumpflow.common.storage.token_events import (
    DAY_S,
    MIN_KEEP_DAYS,
    REPLAY_FETCH_TIMEOUT_S,
    Pruned,
    RedriveWrite,
    StoredEvent,
    Superseded,
    TokenEventStore,
    Writer,
    WriteResult,
    is_token_event,
)

__all__ = [
    "DAY_S",
    "MIN_KEEP_DAYS",
    "REPLAY_FETCH_TIMEOUT_S",
    "Pruned",
    "RedriveWrite",
    "StoredEvent",
    "Superseded",
    "TokenEventStore",
    "WriteResult",
    "Writer",
    "is_token_event",
]
