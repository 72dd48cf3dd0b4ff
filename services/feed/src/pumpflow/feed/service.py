"""The feed service: PumpPortal socket -> validated events -> Postgres -> bus.

Wiring only. The DataFeedManager owns the SocketDataFeed and the Recorder: it
sequences frames per mint and stores, then publishes them (``recorder.py``).
``feed.subscription`` commands from the bus subscribe or unsubscribe mints, and
wallets (``accounts``).

Wallets: live trading confirms an order only by the wallet's own trade on the stream,
and the activity service unsubscribes a token's trades when it goes quiet, which is
when the exit service sells what is left of a position. So trading announces its wallet
(``feed.subscription`` with ``accounts``) when it takes over and every
``trading_live_announce_s``, and the feed streams that wallet's trades on PumpPortal's
account-trade subscription whatever mints it streams. Why a command and not a feed
setting: the wallet is trading's setting, and a second copy in the feed's environment
can differ from it or be forgotten, and a forgotten one fails silently, with sales
ending "unconfirmed"; over the bus there is one source of it. What a command cannot
reach (the feed's per-replica command queue does not exist before the replica) is
covered twice: the lease holder keeps the wallets in the store beside the mints, for
the replica that takes over or restarts, and trading announces again within its
period. A wallet not announced for ``feed_account_ttl_s`` (replaced, or trading gone
for good) is unsubscribed (``unsubscribeAccountTrade``), checked as the lease is taken
and at each renewal; the TTL is many of trading's periods, so a trading restart or
failover announces again long before and the sales of a restart still confirm. The
holder writes the mints and wallets it keeps for a successor, those changed since its
last write, at each renewal of its lease (every third of a TTL) and as it resigns.

A holder that crashes between two such writes has subscribed the tokens created since
the last one (each on its creation), and those are the tokens downstream knows least
of. So it keeps with the mints the last row of ``token_events`` its recorder had
stored by then (``MINTS_UP_TO_KEY``): every creation it took later is stored in a later
row, before it is published. The successor streams the kept mints and the tokens whose
creation is stored, numbered, after that row, less those a command unsubscribed
(``_unsubscribed``). Why the store rather than a write at every creation: such a write
would cost a store round trip per token and still lose the creations between a token's
subscription and its write, while the stored creations are exactly those downstream
can know of (an event goes out only once stored, and a stored one is published again
by the successor). What a crash still loses: the creations it had not stored, which
nobody downstream saw either (lost with the frames, docs/reliability.md); and, with
recording off (``PUMPFLOW_FEED_RECORD``), the tokens created since its last write.

PumpPortal allows one connection per key, so replicas campaign for a LeaderLease
(``feed:pumpportal``): the leader continues where the last one stopped (seq, stored
events not yet published, the wanted mints) and connects; the others stand by, ready,
and keep the wanted mints from the commands. A lost lease disconnects at once; a
frame taken past the lease's deadline by the holder's own clock (a process that
stalled, waking before a renewal tells it) is dropped, neither numbered nor published
(``pumpflow_feed_unled_frames_total``): the next holder numbers that mint by then. The
events a holder numbered in time and had not stored when the next one took over are
stored without their seqs and not published (``recorder.py``,
``pumpflow_feed_superseded_events_total``): the next holder gives those seqs again.

PumpPortal refuses the trade subscriptions of a key not funded with 0.02 SOL (one
notice an attempt, then no token or wallet trade: a live order could never be confirmed,
and an entry would be decided on creations alone). The holder says whether it takes
them (``feed.trade_stream``, critical, keyless) as its connection learns it, and again
when trading announces its wallet; trading's feed breaker halts entries while they are
refused. Why an event and not a state trading reads (the store, the feed's HTTP): the
bus is how the services tell each other, and what is said while no trading replica
trades waits in trading's queues (it takes its keyless events on queues its replicas
share, declared with the group) for the one taking over, which keeps the breaker as
last announced until then. Said again at the wallet's announcement, a live trading
replica hears it as it starts whatever its queues held (declared after the word, or
purged). A publication that fails is tried again until it goes out (``wait_out``).
The state is the connection's: a replica taking the connection over says what its own
is answered, not what another's was (nothing is kept for it in the store).
``/subscriptions`` and ``/readyz``'s status show it, and
``pumpflow_feed_trade_stream_refused``; the feed stays ready (a restart changes nothing:
the key must be funded). A key funded while the connection is calm
(nothing subscribed after it) gets no answer that tells: while refused, the holder
re-tests the key on a new connection every ``feed_refused_retest_s`` (real time; 300 s,
0 turns it off: ``socket_feed.py``), counted in ``pumpflow_feed_refused_retests_total``,
and announces the acceptance as at any change, so trading resumes within a period of
the funding. Why a timer and no operator's request: the feed has no control endpoint
nor ``pumpflow feed`` command, and a reconnect every five minutes, one connection at a
time, is fewer than the disconnects a busy connection sees anyway.

Recent events of the subscribed mints stay in memory (the LookBack), served at
``GET /tokens/{mint}/events``; the full raw history is in Postgres (``token_events``).

Malformed frames and events the store refuses go to one dead-letter queue, sent off
the reader's path. Readiness is false while the recorder's backlog is near the point
where the reader waits or its oldest event is too old (the reason says which). A stop
that cannot store everything within ``feed_stop_flush_s`` logs what it lost and fails,
so the process exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, ClassVar

import msgspec
from prometheus_client import REGISTRY, CollectorRegistry

from pumpflow.common.bus.abc import EventPublisher, Subscription
from pumpflow.common.clock import Clock
from pumpflow.common.dependencies import wait_out
from pumpflow.common.events import Event, FeedSubscription, FeedTradeStream, make_event
from pumpflow.common.lease import LeaderLease
from pumpflow.common.runtime.leases import lease_stores
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.storage import TokenEventStore
from pumpflow.feed.dead_letters import DeadLetterQueue
from pumpflow.feed.interface import TOKEN_EVENT_TYPES, expire_before
from pumpflow.feed.lookback import LookBack
from pumpflow.feed.manager import DataFeedManager
from pumpflow.feed.metrics import FeedMetrics
from pumpflow.feed.recorder import Recorder
from pumpflow.feed.retention import Retention
from pumpflow.feed.settings import FeedSettings
from pumpflow.feed.socket_feed import SocketDataFeed, TradeStream

log = logging.getLogger(__name__)

#: the feed's commands: keyless, so on per-replica queues this service declares itself
CONSUMES = (FeedSubscription.TYPE,)
#: PumpPortal allows one connection per key (more get the key banned for an hour)
LEASE_NAME = "feed:pumpportal"
#: the wanted mints of the lease holder, for the replica that takes over
MINTS_KEY = "feed:pumpportal:mints"
#: the wallets whose trades the lease holder streams, for the replica that takes over
ACCOUNTS_KEY = "feed:pumpportal:accounts"
#: the last row of token_events stored when the mints were kept: the tokens created in
#: later rows came after (empty: not known, as without recording)
MINTS_UP_TO_KEY = "feed:pumpportal:mints-up-to"
#: lease TTLs an unsubscribe is remembered: the holder saves the mints every third of a
#: TTL, and a successor takes over within a TTL (the lease running out), a campaign
#: interval and a TTL of settling
UNSUBSCRIBED_HELD_TTLS = 4


class FeedService(Service):
    """Hold the PumpPortal connection; store every token event, then publish it."""

    name: ClassVar[str] = "feed"
    settings_class: ClassVar[type[FeedSettings]] = FeedSettings
    #: the runtime connects Postgres for the class; an instance without recording
    #: reports (and checks) no database
    needs_db: ClassVar[bool] = True
    #: the lease that allows one connection among replicas lives in the shared store
    needs_store: ClassVar[bool] = True

    def __init__(
        self,
        settings: FeedSettings,
        *,
        registry: CollectorRegistry | None = None,
        retest_clock: Clock | None = None,
    ):
        """``retest_clock``: the socket's timer of the re-tests of a refused trade stream
        (None: real time; a test gives a ReplayClock)."""
        super().__init__(settings)
        self._retest_clock = retest_clock
        self.settings: FeedSettings = settings
        # a key file refused (open to other users, empty) is a setting refused: before
        # anything connects
        settings.api_key()
        self.needs_db = settings.feed_record  # type: ignore[misc]
        self.metrics = FeedMetrics.for_registry(registry or REGISTRY)
        self.manager: DataFeedManager | None = None
        self.socket: SocketDataFeed | None = None
        self.lookback: LookBack | None = None
        self.store: TokenEventStore | None = None
        self.leader: LeaderLease | None = None
        #: deletes the stored events past the keep while this replica holds the lease
        self.retention: Retention | None = None
        self.dead_letters: DeadLetterQueue | None = None
        self._stopped = False
        #: time.monotonic() by which a stop has flushed what it can (one bound for every step)
        self._stop_deadline: float | None = None
        self._clock: Clock | None = None
        #: wallets announced -> when last (the clock's monotonic()), oldest first
        self._announced: dict[str, float] = {}
        #: what the store holds under each key this holder keeps for a successor, as it
        #: last wrote or read it: a renewal writes only what changed. None until the
        #: take-over read what the last holder kept (a renewal must not overwrite it)
        self._saved: dict[str, bytes] | None = None
        #: mints a command unsubscribed -> when (time.monotonic()), oldest first: the
        #: holder may have kept them for a successor before it heard the command (and a
        #: standby never knew the mints subscribed on their creation)
        self._unsubscribed: dict[str, float] = {}
        self._bus: EventPublisher | None = None
        #: set when the trade stream is to be announced now (a change, trading's wallet)
        self._say_trade_stream = asyncio.Event()
        #: the holder's announcements of the trade stream, while it holds the lease
        self._trade_stream_task: asyncio.Task | None = None

    @property
    def role(self) -> str:
        """The role: active (holds the lease), standby (waits for it) or stopped."""
        if self._stopped:
            return "stopped"
        return "active" if self.leader is not None and self.leader.is_leader else "standby"

    @property
    def recorder(self) -> Recorder | None:
        return self.manager.recorder if self.manager is not None else None

    @property
    def republished(self) -> int:
        return self.manager.republished if self.manager is not None else 0

    async def start(self, ctx: ServiceContext) -> None:
        settings = self.settings
        recorder = None
        self._clock = ctx.clock
        self._bus = ctx.bus
        self.dead_letters = DeadLetterQueue(ctx.bus, service=settings.service, metrics=self.metrics)
        self.dead_letters.start()
        if settings.feed_record:
            if ctx.db is None:
                raise RuntimeError("feed recording is on (PUMPFLOW_FEED_RECORD) but no database")
            self.store = TokenEventStore(ctx.db)
            recorder = Recorder(
                self.store,
                publisher=ctx.bus,
                config=settings.recorder_config(),
                metrics=self.metrics,
                dead_letters=self.dead_letters,
            )
        self.lookback = LookBack(
            settings.history_config(),
            clock=ctx.clock,
            prune_every_s=settings.feed_history_prune_interval_s,
        )
        self.socket = SocketDataFeed(
            settings.socket_config(),
            clock=ctx.clock,
            metrics=self.metrics,
            bus=ctx.bus,
            store=self.store,
            lookback=self.lookback,
            dead_letters=self.dead_letters,
            on_trade_stream=self._trade_stream_changed,
            retest_clock=self._retest_clock,
        )
        holder = f"{settings.replica}:{uuid.uuid4().hex[:12]}"
        self.manager = DataFeedManager(
            ctx.bus,
            config=settings.manager_config(),
            recorder=recorder,
            clock=ctx.clock,
            metrics=self.metrics,
            numbering=self._holds_lease,
            writer=holder,
        )
        self.manager.add_data_feed(self.socket)
        self.leader = LeaderLease(
            lease_stores(ctx),
            settings.lease_config(name=LEASE_NAME, holder=holder),
            on_elected=self._take_over,
            on_lost=self._stand_by,
            on_renewed=self._save_mints,
            on_resign=self._resign,
        )
        # standbys take commands too (the queue is shared): they keep the wanted mints
        await ctx.bus.subscribe(
            Subscription(
                service=settings.service,
                patterns=CONSUMES,
                handler=self.on_command,
            )
        )
        self.lookback.start()
        retention = settings.retention_config()
        if retention is None and self.store is not None:
            log.warning(
                "feed: stored token events are kept for ever (PUMPFLOW_FEED_RECORD_KEEP_DAYS "
                "0): at the market's 25-60 trade events/s they take 4.3-10.4 GB a day, and a "
                "Postgres whose disk is full stops everything; 7 keeps a week"
            )
        if retention is not None and self.store is not None:
            self.retention = Retention(
                self.store,
                retention,
                clock=ctx.clock,
                holds=self._holds_lease,
                metrics=self.metrics,
            )
        # the socket connects in the background once the lease is ours: PumpPortal
        # being down or another replica holding the connection must not stop the start
        await self.leader.start()
        if self.retention is not None:
            self.retention.start()

    def _holds_lease(self) -> bool:
        return self.leader is not None and self.leader.holds

    async def _take_over(self) -> None:
        """Continue where the last holder stopped: subscriptions, seq, unconfirmed events."""
        store = self.leader.store
        # a key missing holds nothing, as an empty one does
        keys = (MINTS_KEY, ACCOUNTS_KEY, MINTS_UP_TO_KEY)
        kept = {key: await store.get(key) or b"" for key in keys}
        await self._subscribe_kept(kept[MINTS_KEY].decode().split())
        wallets = kept[ACCOUNTS_KEY].decode().split()
        if wallets:
            now = self._clock.monotonic()
            for wallet in wallets:
                # a standby hears the announcements too: it knows when each came last
                self._announced.setdefault(wallet, now)
            await self.manager.subscribe_to_accounts(wallets)
        # a standby kept the wallets of the commands: those no longer announced go first
        await self._expire_accounts()
        log.info("feed: %s holds the PumpPortal lease: connecting", self.leader.holder)
        await self.manager.start()
        # and the tokens it subscribed as they were created since it kept its mints, read
        # once the store's writes are this holder's (manager.start): a creation the last
        # holder stores later is not published (recorder.py), so none published is missed
        await self._subscribe_kept(await self._created_after(kept[MINTS_UP_TO_KEY]))
        # from here on a renewal keeps what this holder streams for the next
        self._saved = kept
        self._trade_stream_task = asyncio.create_task(
            self._announce_trade_stream(), name="feed-trade-stream"
        )

    async def _subscribe_kept(self, mints: list[str]) -> None:
        """Subscribe the mints the last holder streamed, less those unsubscribed since."""
        if mints:
            self._forget_unsubscribed()
            await self.manager.subscribe_to_token(
                [mint for mint in mints if mint not in self._unsubscribed]
            )

    async def _created_after(self, up_to: bytes | None) -> list[str]:
        """The tokens whose creation the last holder stored after it kept its mints (it
        subscribed each as it was created)."""
        if not up_to or self.store is None or not self.settings.feed_auto_subscribe_trades:
            return []
        try:
            row = int(up_to)
        except ValueError:
            log.error("feed: %s holds %.40r, not a row of token_events: the tokens created "
                      "since the last holder kept its mints are not streamed", MINTS_UP_TO_KEY,
                      up_to)  # fmt: skip
            return []
        mints = await self.store.created_after(row)
        if mints:
            log.info("feed: %d tokens created since the last holder kept its mints are "
                     "streamed too", len(mints))  # fmt: skip
        return mints

    async def _stand_by(self) -> None:
        # another replica may hold the lease already: never two connections on one key
        self._saved = None
        await self._stop_announcing()
        log.info("feed: %s disconnects from PumpPortal and stands by", self.leader.holder)
        await self.manager.disconnect()

    async def _resign(self) -> None:
        """Disconnect and flush before the lease goes: the next holder finds it all stored."""
        await self._stop_announcing()
        await self.manager.stop(self._flush_time_left())
        await self._save_mints()

    def _trade_stream_changed(self, stream: TradeStream) -> None:
        self._say_trade_stream.set()

    async def _announce_trade_stream(self) -> None:
        """Say whether PumpPortal takes the trade subscriptions, once known: at each change
        and when trading announces its wallet."""
        asked = self._say_trade_stream
        while True:
            await asked.wait()
            asked.clear()
            stream = self.socket.trade_stream
            if stream is None:
                continue  # nothing answered on this holder's connection yet
            said = FeedTradeStream(refused=stream.refused, reason=stream.reason, since=stream.since)
            event = make_event(said, source=self.settings.source, time=self._clock.now())
            # said once, and trading keeps the last word heard: it must go out, whatever
            # failed (a change meanwhile is said after it)
            await wait_out(
                lambda event=event: self._bus.publish(event),
                waiter="feed",
                what="announcing the trade stream",
                retry_failures=True,
            )

    async def _stop_announcing(self) -> None:
        task, self._trade_stream_task = self._trade_stream_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def trade_stream_view(self) -> dict[str, Any] | None:
        """Whether PumpPortal takes this replica's trade subscriptions (None: not known)."""
        stream = self.socket.trade_stream if self.socket is not None else None
        if stream is None:
            return None
        return {
            "state": "refused" if stream.refused else "accepted",
            "reason": stream.reason,
            "since": stream.since,
        }

    def _flush_time_left(self) -> float:
        if self._stop_deadline is None:
            return self.settings.feed_stop_flush_s
        return max(0.0, self._stop_deadline - time.monotonic())

    async def _save_mints(self) -> None:
        """Keep the wanted mints and wallets in the store, for a replica that takes over
        (those changed since last written); the wallets no longer announced go first."""
        if self._saved is None:
            return
        await self._expire_accounts()
        recorder = self.recorder
        last_row = recorder.last_row if recorder is not None else None
        # in this order: a crash between the two writes leaves the new mints with an
        # older row, and a successor looks further back than it needs, never less far
        wanted = {
            MINTS_KEY: "\n".join(self.socket.active_mints).encode(),
            ACCOUNTS_KEY: "\n".join(self.socket.accounts).encode(),
            MINTS_UP_TO_KEY: b"" if last_row is None else str(last_row).encode(),
        }
        for key, value in wanted.items():
            if self._saved.get(key) != value:
                await self.leader.store.set(key, value)
                self._saved[key] = value

    async def _expire_accounts(self) -> None:
        """Unsubscribe the wallets not announced for ``feed_account_ttl_s``."""
        horizon = self._clock.monotonic() - self.settings.feed_account_ttl_s
        expired = expire_before(self._announced, horizon)
        if expired:
            log.info("feed: %d wallets not announced for %gs: unsubscribed", len(expired),
                     self.settings.feed_account_ttl_s)  # fmt: skip
            await self.manager.unsubscribe_from_accounts(expired)

    def _forget_unsubscribed(self) -> None:
        """Let go of the unsubscribes any holder has saved, or any successor heard, by now."""
        horizon = UNSUBSCRIBED_HELD_TTLS * self.settings.feed_lease_ttl_s
        expire_before(self._unsubscribed, time.monotonic() - horizon)

    async def on_command(self, event: Event) -> None:
        command: FeedSubscription = event.data
        if self.manager is None:
            return
        if command.action == "unsubscribe":
            now = time.monotonic()
            for mint in command.mints:
                self._unsubscribed.pop(mint, None)  # asked again: the newest
                self._unsubscribed[mint] = now
            self._forget_unsubscribed()
            await self.manager.unsubscribe_from_token(command.mints)
            if command.accounts:
                for wallet in command.accounts:
                    self._announced.pop(wallet, None)
                await self.manager.unsubscribe_from_accounts(command.accounts)
        else:
            for mint in command.mints:
                self._unsubscribed.pop(mint, None)
            await self.manager.subscribe_to_token(command.mints)
            if command.accounts:
                now = self._clock.monotonic()
                for wallet in command.accounts:
                    self._announced.pop(wallet, None)  # announced again: the newest
                    self._announced[wallet] = now
                await self.manager.subscribe_to_accounts(command.accounts)
                # trading: one that just took over hears whether its orders can confirm
                self._say_trade_stream.set()
        log.debug("%s %d mints, %d wallets (%s)", command.action, len(command.mints),
                  len(command.accounts), command.reason)  # fmt: skip

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop_deadline = time.monotonic() + self.settings.feed_stop_flush_s
        if self.manager is None:
            return
        if self.retention is not None:
            await self.retention.close()
        await self._stop_announcing()
        # first, so that nothing reconnects while the rest stops
        await self.manager.disconnect()
        if self.leader is not None:
            # a leader flushes and saves the mints (on_resign) before it releases the lease
            await self.leader.stop()
        # a standby may still hold events it received while it led
        await self.manager.stop(self._flush_time_left())
        self.lookback.close()
        # refused events were sent before the recorder finished; what is left is bad frames
        unsent = await self.dead_letters.close(max(1.0, self._flush_time_left()))
        recorder = self.recorder
        unstored = recorder.unstored if recorder is not None else 0
        if unstored or unsent:
            raise RuntimeError(
                f"feed stopped without storing {unstored} events and sending {unsent} dead "
                f"letters within {self.settings.feed_stop_flush_s:g} s (see the log above)"
            )

    def subscriptions(self) -> dict[str, Any]:
        socket = self.socket
        active = sorted(socket.active_mints) if socket is not None else []
        return {
            "connected": bool(socket and socket.is_connected),
            "count": len(active),
            "pending_messages": socket.pending_messages if socket is not None else 0,
            "accounts": sorted(socket.accounts) if socket is not None else [],
            "trade_stream": self.trade_stream_view(),
            "mints": active,
        }

    def token_events(
        self, mint: str, *, limit: int, types: tuple[str, ...] | None = None
    ) -> dict[str, Any] | None:
        """The last ``limit`` events of ``mint`` held in memory, oldest first; None if none are."""
        lookback = self.lookback
        if lookback is None or not lookback.holds(mint):
            return None
        events = lookback.events(mint, limit=limit, types=types)
        return {
            "mint": mint,
            "covered_from": lookback.covered_from(mint),
            "count": len(events),
            "events": msgspec.to_builtins(events),
        }

    def router(self):
        from fastapi import APIRouter, HTTPException, Query

        router = APIRouter()

        @router.get("/subscriptions")
        async def subscriptions() -> dict[str, Any]:
            return self.subscriptions()

        @router.get("/tokens/{mint}/events")
        async def token_events(
            mint: str,
            limit: int = Query(100, ge=1, le=self.settings.feed_history_max_events),
            event_type: str | None = Query(
                None, alias="type", description="only this event type, e.g. token.trade"
            ),
        ) -> dict[str, Any]:
            if event_type is not None and event_type not in TOKEN_EVENT_TYPES:
                raise HTTPException(
                    422, f"type must be one of {', '.join(TOKEN_EVENT_TYPES)}, not {event_type!r}"
                )
            types = None if event_type is None else (event_type,)
            body = self.token_events(mint, limit=limit, types=types)
            if body is None:
                # older events, and those of other mints, are in Postgres (token_events)
                raise HTTPException(404, f"no recent events of {mint} held by this replica")
            return body

        return router

    async def status(self) -> dict[str, Any]:
        socket = self.socket
        connected = bool(socket and socket.is_connected)
        role = self.role
        if role != "active":
            # a hot standby is healthy and ready: it must not be restarted, and it takes
            # the connection over when the active replica's lease ends
            return {
                "ready": role == "standby",
                "role": role,
                "connected": connected,
                "reason": (
                    "standby: another replica holds the PumpPortal lease"
                    if role == "standby"
                    else "stopped"
                ),
            }
        recorder = self.recorder
        problem = recorder.problem() if recorder is not None else None
        letters = self.dead_letters
        body = {
            "ready": connected and problem is None,
            "role": role,
            "connected": connected,
            "sessions": socket.sessions if socket is not None else 0,
            "active_subscriptions": len(socket.active_mints) if socket is not None else 0,
            "record_pending": recorder.pending if recorder is not None else 0,
            "record_oldest_s": round(recorder.oldest_age(), 3) if recorder is not None else 0,
            "record_rejected": recorder.rejected if recorder is not None else 0,
            "dead_letters_pending": letters.pending if letters is not None else 0,
            "dead_letters_dropped": letters.dropped if letters is not None else 0,
            "republished_on_start": self.republished,
            # not a reason to be unready: a restart changes nothing, the key must be funded
            "trade_stream": self.trade_stream_view(),
        }
        if not connected:
            body["reason"] = "not connected to PumpPortal"
        elif problem is not None:
            body["reason"] = f"recorder: {problem}"
        return body
