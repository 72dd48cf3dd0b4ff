"""The feed service: PumpPortal socket -> validated events -> Postgres -> bus.

Wiring only: SocketDataFeed delivers validated frames to the DataFeedManager,
which sequences them per mint and hands them to the Recorder (store, then publish;
see ``recorder.py``). ``feed.subscription`` commands from the bus subscribe or
unsubscribe mints. On start the Sequencer is restored from Postgres and stored
events the last run had not confirmed on the bus are published again.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.idempotency import Sequencer
from pumpflow.common.events import Event, FeedSubscription
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.storage import TokenEventStore
from pumpflow.feed.manager import DataFeedManager
from pumpflow.feed.metrics import default_metrics
from pumpflow.feed.recorder import Recorder
from pumpflow.feed.settings import FeedSettings
from pumpflow.feed.socket_feed import SocketDataFeed

log = logging.getLogger(__name__)


class FeedService(Service):
    """Hold the PumpPortal connection; store every token event, then publish it."""

    name: ClassVar[str] = "feed"
    settings_class: ClassVar[type[FeedSettings]] = FeedSettings
    #: the runtime connects Postgres for the class; an instance without recording
    #: reports (and checks) no database
    needs_db: ClassVar[bool] = True

    def __init__(self, settings: FeedSettings):
        super().__init__(settings)
        self.settings: FeedSettings = settings
        self.needs_db = settings.feed_record  # type: ignore[misc]
        self.manager: DataFeedManager | None = None
        self.socket: SocketDataFeed | None = None
        self.recorder: Recorder | None = None
        self.store: TokenEventStore | None = None
        self.republished = 0

    async def start(self, ctx: ServiceContext) -> None:
        settings = self.settings
        metrics = default_metrics()
        sequencer = Sequencer()
        if settings.feed_record:
            if ctx.db is None:
                raise RuntimeError("feed recording is on (PUMPFLOW_FEED_RECORD) but no database")
            self.store = TokenEventStore(ctx.db)
            since = (
                None
                if settings.feed_seq_restore_window_s is None
                else ctx.clock.now() - settings.feed_seq_restore_window_s
            )
            sequencer.restore(await self.store.last_seq_by_mint(since=since))
            self.recorder = Recorder(
                self.store,
                publisher=ctx.bus,
                outbox=settings.service,
                batch_size=settings.feed_record_batch_size,
                max_delay=settings.feed_record_max_delay_s,
                max_pending=settings.feed_record_max_pending,
                metrics=metrics,
            )
            self.republished = await self.recorder.recover()
        self.manager = DataFeedManager(
            source=ctx.source,
            publisher=ctx.bus,
            recorder=self.recorder,
            sequencer=sequencer,
            dedup_capacity=settings.feed_dedup_capacity,
            metrics=metrics,
        )
        self.socket = SocketDataFeed(
            url=settings.pumpportal_ws_url,
            api_key=settings.api_key(),
            clock=ctx.clock,
            bus=ctx.bus,
            service=settings.service,
            metrics=metrics,
            subscribe_new_tokens=settings.feed_subscribe_new_tokens,
            subscribe_migrations=settings.feed_subscribe_migrations,
            auto_subscribe_trades=settings.feed_auto_subscribe_trades,
            ping_interval=settings.feed_ping_interval_s,
            ping_timeout=settings.feed_ping_timeout_s,
            open_timeout=settings.feed_open_timeout_s,
            backoff_initial=settings.feed_backoff_initial_s,
            backoff_max=settings.feed_backoff_max_s,
            max_keys_per_message=settings.feed_max_keys_per_message,
            max_messages_per_second=settings.feed_max_messages_per_second,
            history=self.store,
        )
        self.manager.add_data_feed(self.socket)
        await ctx.bus.subscribe(
            Subscription(
                service=settings.service,
                patterns=(FeedSubscription.TYPE,),
                handler=self.on_command,
            )
        )
        if self.recorder is not None:
            await self.recorder.start()
        # the socket connects in the background: PumpPortal being down must not stop
        # the service from starting (readiness reports it instead)
        await self.socket.connect(wait=False)

    async def on_command(self, event: Event) -> None:
        command: FeedSubscription = event.data
        if self.manager is None:
            return
        if command.action == "unsubscribe":
            await self.manager.unsubscribe_from_token(command.mints)
        else:
            await self.manager.subscribe_to_token(command.mints)
        log.debug("%s %d mints (%s)", command.action, len(command.mints), command.reason)

    async def stop(self) -> None:
        if self.manager is not None:
            await self.manager.stop()

    def subscriptions(self) -> dict[str, Any]:
        socket = self.socket
        active = sorted(socket.active_mints) if socket is not None else []
        return {
            "connected": bool(socket and socket.is_connected),
            "count": len(active),
            "pending_messages": socket.pending_messages if socket is not None else 0,
            "mints": active,
        }

    def router(self):
        from fastapi import APIRouter

        router = APIRouter()

        @router.get("/subscriptions")
        async def subscriptions() -> dict[str, Any]:
            return self.subscriptions()

        return router

    async def status(self) -> dict[str, Any]:
        socket = self.socket
        connected = bool(socket and socket.is_connected)
        return {
            "ready": connected,
            "connected": connected,
            "sessions": socket.sessions if socket is not None else 0,
            "active_subscriptions": len(socket.active_mints) if socket is not None else 0,
            "record_pending": self.recorder.pending if self.recorder is not None else 0,
            "republished_on_start": self.republished,
        }
