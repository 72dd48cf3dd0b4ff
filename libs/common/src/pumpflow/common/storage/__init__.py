"""Durable stores in Postgres."""

from pumpflow.common.storage.token_events import (
    StoredEvent,
    TokenEventStore,
    WriteResult,
    is_token_event,
)

__all__ = ["StoredEvent", "TokenEventStore", "WriteResult", "is_token_event"]
