"""Durable stores in Postgres."""

from pumpflow.common.storage.token_events import (
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
