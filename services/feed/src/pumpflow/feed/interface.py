"""What every data feed offers the DataFeedManager."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import msgspec

from pumpflow.common.events import Event, TokenCreated, TokenMigrated, TokenTrade
from pumpflow.common.pumpportal import TokenPayload

if TYPE_CHECKING:
    from pumpflow.feed.lookback import LookBack

#: the event types a feed delivers; ``register_callback`` also takes ``"*"`` for all
TOKEN_EVENT_TYPES = (TokenCreated.TYPE, TokenTrade.TYPE, TokenMigrated.TYPE)
ALL_EVENTS = "*"


class FeedRecord(msgspec.Struct, frozen=True, gc=False):
    """One validated token event from a feed.

    One is built per frame: a struct takes a twentieth of a frozen dataclass's time to
    build, and holding no cycle it is left out of the cycle collector.

    ``frame`` is the exact bytes received (what the recorder stores). ``event`` is
    set when the feed replays an already-enveloped event (from the database); the
    manager then passes it on unchanged instead of wrapping the payload anew.
    ``subscribed`` is False for a trade of a mint the feed is not subscribed to (one
    it unsubscribed longer ago than the grace, which a replay of a recorded market
    hands in where a live server would have stopped sending it; live, a server bug or
    another subscription's traffic): stored, never published.
    """

    payload: TokenPayload
    frame: bytes
    time: float
    event: Event | None = None
    subscribed: bool = True


FeedCallback = Callable[[FeedRecord], Awaitable[None]]


class FeedError(RuntimeError):
    """A feed cannot do what was asked (no history on a live socket, say)."""


def as_mints(token_id: str | Iterable[str]) -> tuple[str, ...]:
    """One mint or several, as a tuple."""
    return (token_id,) if isinstance(token_id, str) else tuple(token_id)


def expire_before(since: dict[str, float], horizon: float) -> list[str]:
    """Drop from ``since`` (key -> when last asked for, oldest first: a key asked for
    again is put last) the keys asked for at or before ``horizon``; those dropped."""
    expired = []
    while since:
        key, at = next(iter(since.items()))
        if at > horizon:
            break
        del since[key]
        expired.append(key)
    return expired


class DataFeedInterface(ABC):
    """A source of token events: the live socket or a database replay."""

    name: str = "feed"
    #: recent events of the mints this feed streams, filled by the manager (None: none)
    lookback: LookBack | None = None

    def __init__(self) -> None:
        self._registered: list[tuple[str, FeedCallback]] = []
        #: callbacks of each event type, those registered for "*" included (hot path)
        self._targets: dict[str, tuple[FeedCallback, ...]] = dict.fromkeys(TOKEN_EVENT_TYPES, ())

    def register_callback(self, event_type: str, callback: FeedCallback) -> None:
        """Deliver every validated event of ``event_type`` ("*": all) to ``callback``, in order."""
        if event_type != ALL_EVENTS and event_type not in TOKEN_EVENT_TYPES:
            raise ValueError(
                f"unknown event type {event_type!r}: one of {', '.join(TOKEN_EVENT_TYPES)} or *"
            )
        self._registered.append((event_type, callback))
        for name in TOKEN_EVENT_TYPES:
            self._targets[name] = tuple(
                c for t, c in self._registered if t == name or t == ALL_EVENTS
            )

    async def _emit(self, record: FeedRecord) -> None:
        for callback in self._targets[record.payload.TYPE]:
            await callback(record)

    @abstractmethod
    async def connect(self) -> None:
        """Start delivering events (in the background)."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Stop delivering; idempotent."""

    @abstractmethod
    async def subscribe(self, token_id: str | Iterable[str]) -> None:
        """Start receiving trades of one mint, or of several."""

    @abstractmethod
    async def unsubscribe(self, token_id: str | Iterable[str]) -> None:
        """Stop receiving trades of one mint, or of several."""

    @abstractmethod
    async def get_historical_data(
        self, token_id: str, start_time: float | None, end_time: float | None
    ) -> list[Event]:
        """Events of ``token_id`` with ``start_time <= time < end_time``, in time order.

        None leaves that end open.
        """

    async def subscribe_accounts(self, wallets: str | Iterable[str]) -> None:
        """Start receiving every trade of one wallet, or of several, whatever its mint.

        A feed without such a subscription (a replay holds every trade already) ignores it.
        """
        return None

    async def unsubscribe_accounts(self, wallets: str | Iterable[str]) -> None:
        """Stop receiving the trades of one wallet, or of several."""
        return None

    @property
    def accounts(self) -> frozenset[str]:
        """Wallets whose trades this feed delivers whatever their mints."""
        return frozenset()

    @property
    def active_mints(self) -> frozenset[str]:
        """Mints whose trades this feed delivers now."""
        return frozenset()

    @property
    def is_connected(self) -> bool:
        return False
