"""Shared state stores: Redis (distributed) and in-process (embedded)."""

from pumpflow.common.state.abc import StateStore, WriteBatch
from pumpflow.common.state.memory import MemoryStateStore

__all__ = ["MemoryStateStore", "StateStore", "WriteBatch"]
