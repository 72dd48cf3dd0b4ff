"""Durable stores in Postgres."""

from pumpflow.common.storage.token_events import (
    RedriveWrite,
    StoredEvent,
    Superseded,
    TokenEventStore,
    Writer,
    WriteResult,
    is_token_event,
)

__all__ = [
    "RedriveWrite",
    "StoredEvent",
    "Superseded",
    "TokenEventStore",
    "WriteResult",
    "Writer",
    "is_token_event",
]
