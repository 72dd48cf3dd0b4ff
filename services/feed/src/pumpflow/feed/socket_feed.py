"""The live feed: ONE WebSocket to PumpPortal (or anything speaking its protocol).

- Subscribes to token creations and migrations, and to the trades of every new mint
  (batched: at most 5,000 keys per message, at most 200 messages in any second).
- Keeps the set of mints it should stream; after a reconnect (jittered exponential
  backoff) it subscribes every one of them again.
- Streams the trades of the wallets it is given (``subscribe_accounts``: the live
  trading wallet, whose trades confirm its orders) on PumpPortal's account-trade
  subscription, whether or not their mints are streamed, and subscribes them again on
  every connection. Such a trade is expected (published) whatever its mint; the frame
  is the one the token's stream sends, so a trade on both streams is one signature,
  which the manager's duplicate check drops the second time.
- Validates every frame; a bad one is counted, logged (within a budget) and
  dead-lettered with the reason, and the stream goes on; so is a frame over the read
  limit (MAX_READ_BYTES), refused by its size and dead-lettered as a prefix (its size and
  the limit in the reason). Any error while handling one
  frame is that frame's error: it never ends the session. Dead letters go through a
  bounded queue sent by a task of its own (``dead_letters.py``), off the reader's path.
- Control frames (acks, notices, errors) are logged and kept as a bounded prefix: a
  server may send megabytes in one, and neither the log nor memory may grow with it.
- Knows whether PumpPortal takes its trade subscriptions (``trade_stream``): refused
  while it answers them with its notice (a key not funded with 0.02 SOL), accepted once
  it acknowledges one or a trade streams; unknown until then. Each change is logged,
  set on the gauge and handed to ``on_trade_stream`` (the service announces it). The
  mints and wallets refused on the connection are not subscribed on the server, so an
  acknowledgement on the same connection (the key funded meanwhile) subscribes them all
  again; a new connection subscribes everything anyway.
- Re-tests a refused stream: a key funded while the connection is calm (no subscription
  sent after it) would go unheard until a reconnect came by chance, and trading stays
  halted meanwhile. So while refused, the connection is closed every
  ``refused_retest_s`` (counted from the connection's start, or from the refusal on it)
  and the connection loop reconnects as after any lost connection: backoff, every mint
  and wallet subscribed again, the manager's seqs and recorder untouched. Logged and
  counted (``pumpflow_feed_refused_retests_total``); never while the stream is accepted
  or not known; 0 turns it off.
- Stamps each frame with its arrival time from the injected Clock (frames carry none).
- Flags a trade of a mint it never subscribed to (nor asked to unsubscribe from within
  ``unsubscribe_grace_s``, while such trades are still in flight): the manager stores
  it and keeps it out of the pipeline.
- Tracks the subscribed mints in the LookBack, which answers ``get_historical_data``
  for recent windows; older ones come from the TokenEventStore.
- Connection timing (backoff, pings, the rate limit, the re-tests: ``retest_clock``, a
  test's own) runs on real time, never on the injected clock, which may be a faster
  market clock: PumpPortal counts connections in real time. The grace runs on the
  injected clock, the one that stamps the frames' arrivals: in a replay a trade is in
  flight or not by market time, however fast the machine replays it.
- The API key goes into the URL only; every URL and error that is logged is redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from pumpflow.common.clock import Clock, TimerHandle, WallClock
from pumpflow.common.events import Event, EventValidationError
from pumpflow.common.pumpportal import (
    ACK_KEYS,
    KIND_OF_TX_TYPE,
    MAX_FRAME_BYTES,
    MAX_KEYS_PER_MESSAGE,
    MAX_MESSAGES_PER_SECOND,
    SUBSCRIBE_ACCOUNT_TRADE,
    SUBSCRIBE_MIGRATION,
    SUBSCRIBE_NEW_TOKEN,
    SUBSCRIBE_TOKEN_TRADE,
    UNSUBSCRIBE_ACCOUNT_TRADE,
    UNSUBSCRIBE_TOKEN_TRADE,
    ControlFrame,
    FrameKind,
    decode_frame,
    method_message,
    redact,
    with_api_key,
)
from pumpflow.feed.dead_letters import DeadLetterQueue, LogBudget
from pumpflow.feed.interface import (
    DataFeedInterface,
    FeedError,
    FeedRecord,
    as_mints,
    expire_before,
)
from pumpflow.feed.lookback import LookBack
from pumpflow.feed.metrics import FeedMetrics
from pumpflow.feed.ratelimit import SlidingWindowLimiter

if TYPE_CHECKING:
    from pumpflow.common.bus.abc import EventBus
    from pumpflow.common.storage import TokenEventStore

log = logging.getLogger(__name__)

#: a session that lasted this long, or carried market data, resets the reconnect backoff
_STABLE_SESSION_S = 10.0
#: the largest frame handled as one: a frame over the protocol's limit (MAX_FRAME_BYTES)
#: but within this is decoded, refused and dead-lettered whole; a larger one is refused
#: by its size alone and dead-lettered as its first OVERSIZE_PREFIX_BYTES
MAX_READ_BYTES = 16 * MAX_FRAME_BYTES
#: bytes of a frame over MAX_READ_BYTES kept in its dead letter (enough to tell what it was)
OVERSIZE_PREFIX_BYTES = 16 * 1024
#: the socket library's own limit, over which it closes the connection (1009) before it
#: reads the frame. Why a limit above MAX_READ_BYTES, and not streaming: the library
#: (websockets 17) reads every frame whole before it hands over any of it; streaming
#: (``recv_streaming`` with a ``(None, fragment)`` limit) bounds only the fragments of a
#: fragmented message, and PumpPortal sends each message as one frame, so a frame over
#: the fragment limit would close the connection just the same, and every frame would
#: pay an async iterator on the reader's path. A library limit twice the read limit
#: lets a frame over the read limit reach the feed, which refuses it and keeps the
#: connection. Memory stays bounded: the library holds at most its queue (16 frames)
#: and the frame being read, each within this limit (136 MiB at worst, a flood of such
#: frames faster than the reader drops them), and the dead letter keeps a prefix only.
#: A frame over this limit still ends the connection: counted, logged, reconnected.
MAX_TRANSPORT_BYTES = 2 * MAX_READ_BYTES
#: characters of a control frame kept and logged
NOTICE_PREFIX_CHARS = 512
#: close code of a connection closed because a frame exceeded MAX_TRANSPORT_BYTES
_MESSAGE_TOO_BIG = 1009
#: doublings of the reconnect backoff counted at most (far past any ceiling)
_MAX_DOUBLINGS = 1000
#: what says a trade subscription is taken when no acknowledgement said it first
TRADE_STREAMED = "a trade streamed"


@dataclass(frozen=True, slots=True, kw_only=True)
class TradeStream:
    """Whether PumpPortal takes the connection's trade subscriptions: ``refused`` or not,
    what it said (``reason``), and since when (the clock's time)."""

    refused: bool
    reason: str
    since: float


def bounded_text(text: str, size: int, limit: int = NOTICE_PREFIX_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how large the whole (``size`` bytes) was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({size:,} bytes)"


class _RedactingLogger(logging.LoggerAdapter):
    """The websockets library logs the request line (with the key) at DEBUG: redact it."""

    def __init__(self, logger: logging.Logger, secret: str | None):
        super().__init__(logger, {})
        self._secret = secret

    def log(self, level, msg, *args, **kwargs):
        if self.isEnabledFor(level):
            text = str(msg) % args if args else str(msg)
            self.logger.log(level, "%s", redact(text, self._secret), **kwargs)


@dataclass(frozen=True, slots=True, kw_only=True)
class SocketFeedConfig:
    """Where to connect, what to subscribe, and the connection's timing and limits."""

    url: str
    #: never in a repr or a log: it goes into the URL only, and every logged URL is redacted
    api_key: str | None = field(default=None, repr=False)
    #: dead letters go under this service's name
    service: str = "feed"
    subscribe_new_tokens: bool = True
    subscribe_migrations: bool = True
    #: subscribe to the trades of every new token
    auto_subscribe_trades: bool = True
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 10.0
    open_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_keys_per_message: int = MAX_KEYS_PER_MESSAGE
    max_messages_per_second: int = MAX_MESSAGES_PER_SECOND
    #: trades of a mint still arrive this long after its unsubscribe was sent (in flight)
    unsubscribe_grace_s: float = 10.0
    #: on disconnect, wait this long for the broker to confirm queued dead letters
    dead_letter_flush_s: float = 10.0
    #: while the trade stream is refused, reconnect this often (real seconds) to re-test
    #: the key (0: never)
    refused_retest_s: float = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_keys_per_message <= MAX_KEYS_PER_MESSAGE:
            raise ValueError(f"max_keys_per_message must be 1..{MAX_KEYS_PER_MESSAGE}")
        if not 1 <= self.max_messages_per_second <= MAX_MESSAGES_PER_SECOND:
            raise ValueError(f"max_messages_per_second must be 1..{MAX_MESSAGES_PER_SECOND}")
        timings = (self.ping_interval_s, self.ping_timeout_s, self.open_timeout_s,
                   self.backoff_initial_s, self.backoff_max_s)  # fmt: skip
        waits = (self.unsubscribe_grace_s, self.dead_letter_flush_s, self.refused_retest_s)
        if min(timings) <= 0 or min(waits) < 0:
            raise ValueError("socket feed timings must be positive")


class SocketDataFeed(DataFeedInterface):
    """PumpPortal's real-time WebSocket as a data feed.

    ``get_historical_data`` answers from the look-back (recent events in memory) when it
    covers the window, else from the TokenEventStore.

    Dead letters go to ``dead_letters`` (a queue its owner starts and closes) or, given
    only a ``bus``, to a queue of the feed's own, started by ``connect`` and flushed by
    ``disconnect``.

    ``on_trade_stream`` is told each change of :attr:`trade_stream`, on the reader's
    path: it must return at once.

    ``retest_clock`` times the re-tests of a refused trade stream: real time (a
    WallClock) unless given, never the injected ``clock`` (a market clock may run faster
    than the connections PumpPortal counts); a test gives a ReplayClock and moves it.
    """

    name = "pumpportal"

    def __init__(
        self,
        config: SocketFeedConfig,
        *,
        clock: Clock,
        metrics: FeedMetrics | None = None,
        bus: EventBus | None = None,
        store: TokenEventStore | None = None,
        lookback: LookBack | None = None,
        rng: random.Random | None = None,
        dead_letters: DeadLetterQueue | None = None,
        on_trade_stream: Callable[[TradeStream], None] | None = None,
        retest_clock: Clock | None = None,
    ):
        super().__init__()
        self.config = config
        self._url = with_api_key(config.url, config.api_key)
        self._api_key = config.api_key
        self.redacted_url = redact(self._url, config.api_key)
        self._ws_logger = _RedactingLogger(logging.getLogger("websockets.client"), config.api_key)
        self._clock = clock
        self.metrics = metrics or FeedMetrics(None)
        self._owns_dead_letters = dead_letters is None and bus is not None
        if self._owns_dead_letters:
            dead_letters = DeadLetterQueue(bus, service=config.service, metrics=self.metrics)
        self.dead_letters = dead_letters
        self._auto_subscribe = config.auto_subscribe_trades
        self._max_keys = config.max_keys_per_message
        self._limiter = SlidingWindowLimiter(config.max_messages_per_second)
        self._store = store
        self.lookback = lookback
        self._rng = rng or random.Random()

        #: mints whose trades we want (insertion-ordered set)
        self._active: dict[str, None] = {}
        #: mints subscribed on the current connection
        self._on_server: set[str] = set()
        self._to_subscribe: dict[str, None] = {}
        #: mints to unsubscribe -> when asked (the clock's monotonic()), oldest first
        self._to_unsubscribe: dict[str, float] = {}
        #: mints unsubscribed on this connection -> when asked, oldest first
        self._ended: dict[str, float] = {}
        #: wallets whose trades we want, and those still to (un)subscribe on this connection
        self._accounts: dict[str, None] = {}
        self._accounts_on_server: set[str] = set()
        self._accounts_to_subscribe: dict[str, None] = {}
        self._accounts_to_unsubscribe: dict[str, None] = {}
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._stopping = False
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task | None = None
        self.sessions = 0
        #: market frames (creations, trades, migrations) decoded
        self.data_frames = 0
        self.invalid_frames = 0
        #: frames whose handling failed unexpectedly (counted in invalid_frames too)
        self.frame_errors = 0
        #: the last control frames, each a bounded prefix (bounded in bytes too)
        self.notices: deque[str] = deque(maxlen=32)
        self._invalid_log = LogBudget()
        self._control_log = LogBudget()
        #: whether PumpPortal takes the trade subscriptions (None: not known yet)
        self.trade_stream: TradeStream | None = None
        #: the trade stream is refused (read per trade frame)
        self._refused = False
        self._on_trade_stream = on_trade_stream
        #: a trade subscription was refused on this connection
        self._refused_here = False
        self._retest_clock = retest_clock or WallClock()
        #: the re-test due on this connection while the stream is refused
        self._retest: TimerHandle | None = None
        #: connections closed to re-test a refused stream
        self.retests = 0
        #: the session ending was closed by a re-test
        self._retesting = False

    # ---------------------------------------------------------------- interface

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def active_mints(self) -> frozenset[str]:
        return frozenset(self._active)

    @property
    def accounts(self) -> frozenset[str]:
        """Wallets whose trades this feed streams (account-trade subscriptions)."""
        return frozenset(self._accounts)

    @property
    def pending_messages(self) -> int:
        """Subscription changes not yet sent."""
        return (
            len(self._to_subscribe)
            + len(self._to_unsubscribe)
            + len(self._accounts_to_subscribe)
            + len(self._accounts_to_unsubscribe)
        )

    async def connect(self) -> None:
        """Start the connection loop; it retries for ever (``wait_connected`` waits for it)."""
        if self._task is None or self._task.done():
            self._stopping = False
            # a connection of its own: what another one was told is no longer known
            self._forget_trade_stream()
            if self.lookback is not None:
                self.lookback.activate(self._clock.now())
            if self._owns_dead_letters:
                self.dead_letters.start()
            self._task = asyncio.create_task(self._run(), name="pumpportal-feed")

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def disconnect(self) -> None:
        self._stopping = True
        self._wake.set()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.lookback is not None:
            self.lookback.deactivate()
        self._forget_trade_stream()
        if self._owns_dead_letters:
            await self.dead_letters.close(self.config.dead_letter_flush_s)

    async def subscribe(self, token_id: str | Iterable[str]) -> None:
        mints = as_mints(token_id)
        for mint in mints:
            self._want(mint)
        if self.lookback is not None:
            self.lookback.track(mints, self._clock.now())
        self._changed()

    async def unsubscribe(self, token_id: str | Iterable[str]) -> None:
        mints = as_mints(token_id)
        # the grace starts when asked, not when sent: when the sender runs is up to the
        # event loop and the rate limit, which a replay must not hang on
        asked = self._clock.monotonic()
        for mint in mints:
            if mint not in self._active:
                continue
            del self._active[mint]
            if mint in self._to_subscribe:
                del self._to_subscribe[mint]  # never sent: nothing to undo on the server
            elif mint in self._on_server:
                self._to_unsubscribe[mint] = asked
        if self.lookback is not None:
            self.lookback.untrack(mints)
        self._changed()

    async def subscribe_accounts(self, wallets: str | Iterable[str]) -> None:
        for wallet in as_mints(wallets):
            if wallet in self._accounts:
                continue
            self._accounts[wallet] = None
            if wallet in self._accounts_to_unsubscribe:
                del self._accounts_to_unsubscribe[wallet]  # still subscribed on the server
            elif wallet not in self._accounts_on_server:
                self._accounts_to_subscribe[wallet] = None
        self._changed()

    async def unsubscribe_accounts(self, wallets: str | Iterable[str]) -> None:
        for wallet in as_mints(wallets):
            if wallet not in self._accounts:
                continue
            del self._accounts[wallet]
            if wallet in self._accounts_to_subscribe:
                del self._accounts_to_subscribe[wallet]
            elif wallet in self._accounts_on_server:
                self._accounts_to_unsubscribe[wallet] = None
        self._changed()

    async def get_historical_data(
        self, token_id: str, start_time: float | None, end_time: float | None
    ) -> list[Event]:
        lookback = self.lookback
        if lookback is not None and lookback.covers(token_id, start_time):
            return lookback.events(token_id, start_time, end_time)
        if self._store is None:
            raise FeedError(
                "PumpPortal keeps no history: the window is older than the look-back in "
                "memory, and the feed has no TokenEventStore"
            )
        return [
            event
            async for event in self._store.stream(start=start_time, end=end_time, mints=[token_id])
            if event.seq is not None  # stored but never published: not part of the stream
        ]

    # ---------------------------------------------------------------- subscriptions

    def _want(self, mint: str) -> None:
        if mint in self._active:
            return
        self._active[mint] = None
        if mint in self._to_unsubscribe:
            del self._to_unsubscribe[mint]  # still subscribed on the server
        elif mint not in self._on_server:
            self._to_subscribe[mint] = None

    def _changed(self) -> None:
        self._export_subscriptions()
        if self.pending_messages:
            self._wake.set()

    def _export_subscriptions(self) -> None:
        # a replica without the connection subscribes nothing, whatever mints it keeps
        # wanted (a hot standby keeps them from the commands): dashboards sum the replicas
        self.metrics.active_subscriptions.set(len(self._active) if self._ws is not None else 0)

    async def _send_pending(self, ws: ClientConnection) -> None:
        """Send queued (un)subscriptions in batches, within the rate limit, until none are left."""
        while self.pending_messages:
            # wait for the limiter before choosing keys, so a change made meanwhile counts
            await self._limiter.acquire()
            # the wallets first: their trades confirm orders of real money
            if self._accounts_to_subscribe or self._accounts_to_unsubscribe:
                await self._send_accounts(ws)
                continue
            if self._to_unsubscribe:
                method, pending = UNSUBSCRIBE_TOKEN_TRADE, self._to_unsubscribe
            elif self._to_subscribe:
                method, pending = SUBSCRIBE_TOKEN_TRADE, self._to_subscribe
            else:
                break
            keys = list(itertools.islice(pending, self._max_keys))
            if method == SUBSCRIBE_TOKEN_TRADE:
                for key in keys:
                    del pending[key]
                self._on_server.update(keys)
            else:
                self._on_server.difference_update(keys)
                self._end({key: pending.pop(key) for key in keys})
            await ws.send(method_message(method, keys).decode())
            self.metrics.subscribe_messages.labels(method).inc()
            log.debug("%s: %d keys", method, len(keys))

    async def _send_accounts(self, ws: ClientConnection) -> None:
        """Send one batch of account (un)subscriptions (the caller acquired the limiter)."""
        if self._accounts_to_subscribe:
            method, pending = SUBSCRIBE_ACCOUNT_TRADE, self._accounts_to_subscribe
        else:
            method, pending = UNSUBSCRIBE_ACCOUNT_TRADE, self._accounts_to_unsubscribe
        keys = list(itertools.islice(pending, self._max_keys))
        for key in keys:
            del pending[key]
        if method == SUBSCRIBE_ACCOUNT_TRADE:
            self._accounts_on_server.update(keys)
        else:
            self._accounts_on_server.difference_update(keys)
        await ws.send(method_message(method, keys).decode())
        self.metrics.subscribe_messages.labels(method).inc()
        log.info("%s: %d wallets", method, len(keys))

    def _end(self, asked: dict[str, float]) -> None:
        """Remember when the unsubscribe of each mint was asked: its trades in flight count."""
        ended = self._ended
        for mint, at in asked.items():
            ended.pop(mint, None)
            ended[mint] = at
        self._forget_ended(self._clock.monotonic())

    def _forget_ended(self, now: float) -> None:
        expire_before(self._ended, now - self.config.unsubscribe_grace_s)

    def _expects_trades(self, mint: str) -> bool:
        """True if trades of ``mint`` belong on this connection: wanted, or still in flight
        (within the grace from when its unsubscribe was asked, sent yet or not)."""
        if mint in self._active:
            return True
        asked = self._to_unsubscribe.get(mint)
        if asked is not None:
            return self._clock.monotonic() - asked < self.config.unsubscribe_grace_s
        if mint in self._ended:
            self._forget_ended(self._clock.monotonic())
            return mint in self._ended
        return False

    async def _sender(self, ws: ClientConnection) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._send_pending(ws)

    async def _send_method(self, ws: ClientConnection, method: str) -> None:
        await self._limiter.acquire()
        await ws.send(method_message(method).decode())
        self.metrics.subscribe_messages.labels(method).inc()

    # ---------------------------------------------------------------- connection loop

    def _backoff(self, attempt: int) -> float:
        config = self.config
        # 2 ** 1024 has no float: unbounded, the exponent would end the connection loop
        # after 1,024 failed attempts (hours of an outage at the cap)
        doublings = min(max(0, attempt - 1), _MAX_DOUBLINGS)
        ceiling = min(config.backoff_max_s, config.backoff_initial_s * 2.0**doublings)
        # "equal jitter": at least half the ceiling, so retries never hammer the server
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    async def _run(self) -> None:
        config = self.config
        attempt = 0
        while not self._stopping:
            try:
                ws = await connect(
                    self._url,
                    ping_interval=config.ping_interval_s,
                    ping_timeout=config.ping_timeout_s,
                    open_timeout=config.open_timeout_s,
                    close_timeout=2.0,
                    max_size=MAX_TRANSPORT_BYTES,
                    logger=self._ws_logger,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                delay = self._backoff(attempt)
                log.warning(
                    "connect to %s failed: %s; retry %d in %.2f s",
                    self.redacted_url,
                    redact(f"{type(exc).__name__}: {exc}", self._api_key),
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            started = time.monotonic()
            data_before = self.data_frames
            try:
                await self._session(ws)
            except ConnectionClosed as exc:
                if exc.sent is not None and exc.sent.code == _MESSAGE_TOO_BIG:
                    # the library refuses it before we see a byte of it: only its size is known
                    self.invalid_frames += 1
                    self.metrics.invalid_frames.inc()
                    log.error("a frame over %d bytes closed the connection to %s (the frame is "
                              "lost; the frames before it were handled); reconnecting",
                              MAX_TRANSPORT_BYTES, self.redacted_url)  # fmt: skip
                elif not self._stopping:
                    log.warning("connection to %s lost: %s", self.redacted_url, redact(str(exc)))
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await ws.close()
                raise
            except Exception:
                log.exception("feed session on %s failed", self.redacted_url)
                with contextlib.suppress(Exception):
                    await ws.close()
            if self._stopping:
                break
            # a server that drops working connections every few seconds must not push
            # the backoff to its ceiling: the market goes unheard while the feed waits;
            # nor may a re-test, which closed a working connection on purpose
            stable = time.monotonic() - started >= _STABLE_SESSION_S
            if self.data_frames > data_before or stable or self._retesting:
                attempt = 0
            attempt += 1
            delay = self._backoff(attempt)
            log.info("reconnecting to %s in %.2f s", self.redacted_url, delay)
            await asyncio.sleep(delay)

    async def _session(self, ws: ClientConnection) -> None:
        self.sessions += 1
        if self.sessions > 1:
            self.metrics.reconnects.inc()
        log.info(
            "connected to %s (session %d, %d mints and %d wallets to resubscribe)",
            self.redacted_url,
            self.sessions,
            len(self._active),
            len(self._accounts),
        )
        # a new connection has no subscriptions: everything active is sent again
        self._on_server.clear()
        self._ended.clear()
        self._to_unsubscribe.clear()
        self._to_subscribe = dict.fromkeys(self._active)
        self._accounts_on_server.clear()
        self._accounts_to_unsubscribe.clear()
        self._accounts_to_subscribe = dict.fromkeys(self._accounts)
        self._refused_here = False
        self._retesting = False
        self._ws = ws
        if self._refused:
            # still refused as far as known: this connection re-tests the key in its turn
            self._arm_retest()
        self.metrics.connected.set(1)
        self._export_subscriptions()
        sender: asyncio.Task | None = None
        try:
            if self.config.subscribe_new_tokens:
                await self._send_method(ws, SUBSCRIBE_NEW_TOKEN)
            if self.config.subscribe_migrations:
                await self._send_method(ws, SUBSCRIBE_MIGRATION)
            self._wake.set()
            sender = asyncio.create_task(self._sender(ws), name="pumpportal-subscriber")
            self._connected.set()
            # raw bytes: no UTF-8 decode and re-encode per frame, and a frame that is not
            # UTF-8 is dead-lettered like any malformed one instead of closing the socket
            recv = ws.recv
            while True:
                try:
                    message = await recv(decode=False)
                except ConnectionClosedOK:
                    if not self._stopping and not self._retesting:
                        log.info("server closed the connection: %s",
                                 ws.close_reason or ws.close_code)  # fmt: skip
                    return
                await self._on_frame(message)
                if sender.done():
                    sender.result()  # a failed send ends the session with its error
        finally:
            self._disarm_retest()
            self._connected.clear()
            self.metrics.connected.set(0)
            self._ws = None
            self._export_subscriptions()
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await sender

    # ---------------------------------------------------------------- frames

    async def _on_frame(self, message: bytes | str) -> None:
        """Handle one frame; whatever goes wrong with it is its own error, never the session's."""
        data = message.encode() if isinstance(message, str) else bytes(message)
        try:
            await self._handle(data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # also what no decoder foresaw (RecursionError, ...)
            self._fail(data, exc)

    async def _handle(self, data: bytes) -> None:
        arrival = self._clock.now()
        metrics = self.metrics
        size = len(data)
        metrics.bytes_received.inc(size)
        if size > MAX_READ_BYTES:
            self._reject(data[:OVERSIZE_PREFIX_BYTES], size=size, reason=(
                f"frame of {size:,} bytes over the read limit of {MAX_READ_BYTES:,} "
                f"(its first {OVERSIZE_PREFIX_BYTES:,} bytes kept)"))  # fmt: skip
            return
        try:
            payload = decode_frame(data)
        except EventValidationError as exc:
            self._reject(data, str(exc))
            return
        if type(payload) is ControlFrame:
            metrics.frames_by_kind[payload.kind].inc()
            self._on_control(payload, len(data))
            return
        kind = KIND_OF_TX_TYPE[payload.txType]
        metrics.frames_by_kind[kind].inc()
        self.data_frames += 1
        subscribed = True
        if kind is FrameKind.CREATE:
            if self._auto_subscribe:
                self._want(payload.mint)
                if self.lookback is not None:
                    self.lookback.track((payload.mint,), arrival)
                self._changed()
        elif kind is not FrameKind.MIGRATE:
            subscribed = (
                self._expects_trades(payload.mint) or payload.traderPublicKey in self._accounts
            )
            if self._refused:
                self._trade_stream_accepted(TRADE_STREAMED)
        try:
            await self._emit(FeedRecord(payload, data, arrival, subscribed=subscribed))
        except Exception as exc:
            log.exception("feed callback failed on %s %.100s", payload.txType, payload.signature)
            self._dead_letter(data, f"callback failed: {type(exc).__name__}: {exc}")

    def _reject(self, data: bytes, reason: str, *, size: int | None = None) -> None:
        """Count, log (within the budget) and dead-letter ``data`` (of a ``size``-byte frame)."""
        self.invalid_frames += 1
        self.metrics.invalid_frames.inc()
        budget = self._invalid_log
        if budget.allow():
            log.warning("invalid frame dead-lettered: %.300s: %.200r (%d bytes; %d more not "
                        "logged before it)", reason, data, len(data) if size is None else size,
                        budget.take_suppressed())  # fmt: skip
        self._dead_letter(data, reason)

    def _fail(self, data: bytes, exc: Exception) -> None:
        self.frame_errors += 1
        self.metrics.frame_errors.inc()
        reason = f"frame handling failed: {type(exc).__name__}: {exc}"
        if self._invalid_log.allow():
            log.error("%.300s; frame %.200r (%d bytes) dead-lettered, the session goes on",
                      reason, data, len(data), exc_info=exc)  # fmt: skip
        self.invalid_frames += 1
        self.metrics.invalid_frames.inc()
        self._dead_letter(data, reason)

    def _dead_letter(self, data: bytes, reason: str) -> None:
        if self.dead_letters is not None:
            self.dead_letters.offer(data, reason)

    def _on_control(self, frame: ControlFrame, size: int) -> None:
        text = bounded_text(redact(frame.text, self._api_key), size)
        self.notices.append(text)
        if frame.is_ack:
            log.debug("PumpPortal: %s", text)
            if frame.message == ACK_KEYS:
                self._trade_stream_accepted(text)
        elif frame.needs_api_key:
            self._trade_stream_refused(text)
        elif self._control_log.allow():
            held_back = self._control_log.take_suppressed()
            more = f" ({held_back} more control frames not logged before it)" if held_back else ""
            if frame.errors is not None:
                log.warning("PumpPortal error: %s%s", text, more)
            else:
                log.info("PumpPortal: %s%s", text, more)

    # ---------------------------------------------------------------- the trade stream

    def _trade_stream_refused(self, reason: str) -> None:
        self._refused_here = True
        self._arm_retest()
        if self.trade_stream is not None and self.trade_stream.refused:
            return  # said already: PumpPortal refuses each trade subscription alike
        log.warning("PumpPortal refuses the feed's trade subscriptions: %s No token or wallet "
                    "trade streams (trading halts its entries) until one is accepted: give "
                    "the feed an API key whose wallet holds at least 0.02 SOL "
                    "(PUMPPORTAL_API_KEY)%s", reason, self._retest_said())  # fmt: skip
        self._set_trade_stream(TradeStream(refused=True, reason=reason, since=self._clock.now()))

    def _trade_stream_accepted(self, reason: str) -> None:
        if self._refused_here:
            # what was refused on this connection is not subscribed on the server
            self._refused_here = False
            self._to_subscribe.update(dict.fromkeys(self._active))
            self._accounts_to_subscribe.update(dict.fromkeys(self._accounts))
            self._changed()
            log.info("PumpPortal: %d mints and %d wallets refused on this connection are "
                     "subscribed again", len(self._active), len(self._accounts))  # fmt: skip
        stream = self.trade_stream
        if stream is not None and not stream.refused:
            return  # said already
        if stream is not None:
            log.warning("PumpPortal accepts the feed's trade subscriptions again (%s): the "
                        "trades stream", reason)  # fmt: skip
        self._set_trade_stream(TradeStream(refused=False, reason=reason, since=self._clock.now()))

    def _set_trade_stream(self, stream: TradeStream) -> None:
        self.trade_stream = stream
        self._refused = stream.refused
        if not stream.refused:
            self._disarm_retest()
        self.metrics.trade_stream_refused.set(1 if stream.refused else 0)
        if self._on_trade_stream is not None:
            self._on_trade_stream(stream)

    def _forget_trade_stream(self) -> None:
        self.trade_stream = None
        self._refused = False
        self._refused_here = False
        self._disarm_retest()
        self.metrics.trade_stream_refused.set(0)

    # ---------------------------------------------------------------- re-tests

    def _retest_said(self) -> str:
        period = self.config.refused_retest_s
        if not period:
            return "; never re-tested (PUMPFLOW_FEED_REFUSED_RETEST_S 0): a reconnect tells"
        return (f"; re-tested on a new connection every {period:g} s while refused "
                "(PUMPFLOW_FEED_REFUSED_RETEST_S)")  # fmt: skip

    def _arm_retest(self) -> None:
        """Re-test the refused stream in ``refused_retest_s`` on this connection, unless due."""
        period = self.config.refused_retest_s
        ws = self._ws
        if not period or ws is None or self._retest is not None:
            return
        self._retest = self._retest_clock.call_later(
            period, functools.partial(self._retest_key, ws)
        )

    def _disarm_retest(self) -> None:
        handle, self._retest = self._retest, None
        if handle is not None:
            handle.cancel()

    async def _retest_key(self, ws: ClientConnection) -> None:
        """Close the connection ``ws`` while the stream is refused: the connection loop
        connects again, and the new connection's subscriptions tell whether the key is
        funded by now."""
        if ws is not self._ws:
            return  # that connection ended (its re-test with it): the next has its own
        self._retest = None
        if self._stopping or not self._refused:
            return
        self.retests += 1
        self.metrics.refused_retests.inc()
        stream = self.trade_stream
        log.warning(
            "PumpPortal has refused the feed's trade subscriptions for %.0f s: reconnecting "
            "to re-test the key, funded by now or not (re-test %d; the next %g s into the new "
            "connection while still refused). It said: %s",
            self._clock.now() - stream.since,
            self.retests,
            self.config.refused_retest_s,
            stream.reason,
        )
        self._retesting = True
        with contextlib.suppress(Exception):
            await ws.close()
