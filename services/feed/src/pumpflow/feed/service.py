"""The feed service: PumpPortal socket -> validated events -> Postgres -> bus.

Wiring only: SocketDataFeed delivers validated frames to the DataFeedManager,
which sequences them per mint and hands them to the Recorder (store, then publish;
see ``recorder.py``). ``feed.subscription`` commands from the bus subscribe or
unsubscribe mints. On start the Sequencer is restored from Postgres and stored
events the last run had not confirmed on the bus are published again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any, ClassVar

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.idempotency import Sequencer
from pumpflow.common.clock import Clock
from pumpflow.common.events import Event, FeedSubscription
from pumpflow.common.lease import Lease
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.state.memory import MemoryStateStore
from pumpflow.common.storage import TokenEventStore
from pumpflow.feed.manager import DataFeedManager
from pumpflow.feed.metrics import default_metrics
from pumpflow.feed.recorder import Recorder
from pumpflow.feed.settings import FeedSettings
from pumpflow.feed.socket_feed import SocketDataFeed

log = logging.getLogger(__name__)

#: PumpPortal allows one connection per key (more get the key banned for an hour)
LEASE_NAME = "feed:pumpportal"
#: the wanted mints of the lease holder, for the replica that takes over
MINTS_KEY = "feed:pumpportal:mints"


async def _sleep(clock: Clock, delay: float) -> None:
    """Wait ``delay`` seconds of the clock (a ReplayClock's only when it is advanced)."""
    done = asyncio.get_running_loop().create_future()
    timer = clock.call_later(delay, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        timer.cancel()


class FeedService(Service):
    """Hold the PumpPortal connection; store every token event, then publish it."""

    name: ClassVar[str] = "feed"
    settings_class: ClassVar[type[FeedSettings]] = FeedSettings
    #: the runtime connects Postgres for the class; an instance without recording
    #: reports (and checks) no database
    needs_db: ClassVar[bool] = True
    #: the lease that allows one connection among replicas lives in the shared store
    needs_store: ClassVar[bool] = True

    def __init__(self, settings: FeedSettings):
        super().__init__(settings)
        self.settings: FeedSettings = settings
        self.needs_db = settings.feed_record  # type: ignore[misc]
        self.manager: DataFeedManager | None = None
        self.socket: SocketDataFeed | None = None
        self.recorder: Recorder | None = None
        self.store: TokenEventStore | None = None
        self.republished = 0
        self.sequencer: Sequencer | None = None
        self.lease: Lease | None = None
        #: "standby" (waiting for the lease), "active" (holds it) or "stopped"
        self.role = "standby"
        self._ctx: ServiceContext | None = None
        self._lease_task: asyncio.Task | None = None
        self._recorder_started = False

    async def start(self, ctx: ServiceContext) -> None:
        settings = self.settings
        metrics = default_metrics()
        self._ctx = ctx
        self.sequencer = Sequencer()
        if settings.feed_record:
            if ctx.db is None:
                raise RuntimeError("feed recording is on (PUMPFLOW_FEED_RECORD) but no database")
            self.store = TokenEventStore(ctx.db)
            self.recorder = Recorder(
                self.store,
                publisher=ctx.bus,
                outbox=settings.service,
                batch_size=settings.feed_record_batch_size,
                max_delay=settings.feed_record_max_delay_s,
                max_pending=settings.feed_record_max_pending,
                metrics=metrics,
            )
        self.manager = DataFeedManager(
            source=ctx.source,
            publisher=ctx.bus,
            recorder=self.recorder,
            sequencer=self.sequencer,
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
        if ctx.store is None:
            # no shared store (a bare test context): nobody else can hold the lease here
            log.warning("feed without a state store: the connection lease is not shared")
        self.lease = Lease(
            ctx.store if ctx.store is not None else MemoryStateStore(ctx.clock),
            LEASE_NAME,
            holder=f"{settings.replica}:{uuid.uuid4().hex[:12]}",
            ttl_s=settings.feed_lease_ttl_s,
            clock=ctx.clock,
        )
        # standbys take commands too (the queue is shared): they keep the wanted mints
        await ctx.bus.subscribe(
            Subscription(
                service=settings.service,
                patterns=(FeedSubscription.TYPE,),
                handler=self.on_command,
            )
        )
        # the socket connects in the background once the lease is ours: PumpPortal
        # being down or another replica holding the connection must not stop the start
        if await self._acquire():
            await self._take_over()
        self._lease_task = asyncio.create_task(self._hold_lease(), name="feed-lease")

    async def _acquire(self) -> bool:
        try:
            acquired = await self.lease.acquire()
        except Exception:
            log.exception("feed lease: acquire failed")
            acquired = False
        if acquired and self.role != "active":
            log.info("feed lease acquired by %s: connecting", self.lease.holder)
        return acquired

    async def _hold_lease(self) -> None:
        """Standby until the lease is ours; connect; renew; on a lost lease, disconnect."""
        lease = self.lease
        interval = lease.ttl_s / 3
        while True:
            while self.role != "active":
                await _sleep(self._ctx.clock, interval)
                if await self._acquire():
                    try:
                        await self._take_over()
                    except Exception:
                        log.exception("feed take-over failed: releasing the lease")
                        await self.socket.disconnect()
                        with contextlib.suppress(Exception):
                            await self.lease.release()
            await _sleep(self._ctx.clock, interval)
            try:
                await self._save_mints()
                renewed = await lease.renew()
            except Exception:
                log.exception("feed lease: renew failed")
                renewed = False
            if not renewed:
                # another replica may hold it already: never two connections on one key
                log.warning("feed lease lost by %s: disconnecting, back to standby", lease.holder)
                self.role = "standby"
                await self.socket.disconnect()

    async def _take_over(self) -> None:
        """Continue where the last holder stopped: seq, unconfirmed events, subscriptions."""
        settings = self.settings
        if self.recorder is not None:
            since = (
                None
                if settings.feed_seq_restore_window_s is None
                else self._ctx.clock.now() - settings.feed_seq_restore_window_s
            )
            self.sequencer.restore(await self.store.last_seq_by_mint(since=since))
            if not self._recorder_started:
                self.republished = await self.recorder.recover()
                await self.recorder.start()
                self._recorder_started = True
        saved = await self.lease.store.get(MINTS_KEY)
        if saved:
            await self.socket.subscribe(saved.decode().split())
        await self.socket.connect(wait=False)
        self.role = "active"

    async def _save_mints(self) -> None:
        """Keep the wanted mints in the store, for a replica that takes over."""
        mints = "\n".join(self.socket.active_mints).encode()
        await self.lease.store.set(MINTS_KEY, mints)

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
        if self.role == "stopped":
            return
        task, self._lease_task = self._lease_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        active = self.role == "active"
        self.role = "stopped"
        if self.manager is not None:
            # disconnect and flush before releasing: the next holder restores seq from
            # what is stored and finds nothing of ours left to publish
            if active or self.recorder is None or self._recorder_started:
                await self.manager.stop()
            else:
                await self.socket.disconnect()
        if self.lease is not None and active:
            try:
                await self._save_mints()
                await self.lease.release()
            except Exception:
                log.exception("feed lease: release failed (a standby takes over within its TTL)")

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
        if self.role != "active":
            # a hot standby is healthy and ready: it must not be restarted, and it takes
            # the connection over when the active replica's lease ends
            return {
                "ready": True,
                "role": self.role,
                "connected": connected,
                "reason": "standby: another replica holds the PumpPortal lease",
            }
        return {
            "ready": connected,
            "role": self.role,
            "connected": connected,
            "sessions": socket.sessions if socket is not None else 0,
            "active_subscriptions": len(socket.active_mints) if socket is not None else 0,
            "record_pending": self.recorder.pending if self.recorder is not None else 0,
            "republished_on_start": self.republished,
        }
