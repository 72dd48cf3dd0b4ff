"""What every data feed offers the DataFeedManager."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

from pumpflow.common.events import Event
from pumpflow.common.pumpportal import TokenPayload

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FeedRecord:
    """One validated token event from a feed.

    ``frame`` is the exact bytes received (what the recorder stores). ``event`` is
    set when the feed replays an already-enveloped event (from the database); the
    manager then passes it on unchanged instead of wrapping the payload anew.
    """

    payload: TokenPayload
    frame: bytes
    time: float
    event: Event | None = None


FeedCallback = Callable[[FeedRecord], Awaitable[None]]


class FeedError(RuntimeError):
    """A feed cannot do what was asked (no history on a live socket, say)."""


class DataFeedInterface(ABC):
    """A source of token events: the live socket or a database replay."""

    name: str = "feed"

    def __init__(self) -> None:
        self._callbacks: list[FeedCallback] = []

    def register_callback(self, callback: FeedCallback) -> None:
        """Deliver every validated token event to ``callback``, in order."""
        self._callbacks.append(callback)

    async def _emit(self, record: FeedRecord) -> None:
        for callback in self._callbacks:
            await callback(record)

    @abstractmethod
    async def connect(self) -> None:
        """Start delivering events."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Stop delivering; idempotent."""

    @abstractmethod
    async def subscribe(self, mints: Iterable[str]) -> None:
        """Start receiving trades of ``mints``."""

    @abstractmethod
    async def unsubscribe(self, mints: Iterable[str]) -> None:
        """Stop receiving trades of ``mints``."""

    @abstractmethod
    def get_historical_data(
        self,
        *,
        start: float | None = None,
        end: float | None = None,
        mints: Iterable[str] | None = None,
    ) -> AsyncIterator[Event]:
        """Stored events with ``start <= time < end`` in time order."""

    @property
    def active_mints(self) -> frozenset[str]:
        """Mints whose trades this feed delivers now."""
        return frozenset()

    @property
    def is_connected(self) -> bool:
        return False
