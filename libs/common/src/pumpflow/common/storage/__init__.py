"""Durable stores in Postgres."""

from pumpflow.common.storage.token_events import (
    RedriveWrite,
    StoredEvent,
    TokenEventStore,
    WriteResult,
    is_token_event,
)

__all__ = ["RedriveWrite", "StoredEvent", "TokenEventStore", "WriteResult", "is_token_event"]
