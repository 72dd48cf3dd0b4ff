"""The exit service: each position's exit rules, and the graceful exit of them all.

- **Rules.** :class:`~pumpflow.common.exit.ExitProcessor` (every rule of a position,
  per mint; why per mint is in its module) on the library's
  :class:`~pumpflow.common.consumer.KeyedStatefulConsumer`: it consumes
  :data:`~pumpflow.common.exit.CONSUMES` (trading's position and order events, the
  token's trades, migration and lifecycle) and publishes ``exit.order`` on the
  critical lane, order id ``<position_id>:rule:<n>``; trading executes it. Each
  settled sale is reported (``exit.report``) and stored before the state that applied
  its outcome is written, as a tranche's outcome is (the consumer's ``before_write``):
  its delivery is acked only once it is stored.
- **Graceful exit.** ``system.shutdown`` (``pumpflow stop``, SIGTERM of the embedded
  run, ``POST /shutdown`` with the API token) comes on the group ``<service>-control``
  (a keyless command, apart from the keyed consumer's queues). The replica that takes
  it stores the graceful exit (one at a time); every replica finds it within
  ``exit_run_poll_s`` and sells the positions of the partitions it owns with
  :class:`~pumpflow.common.exit.GracefulExitManager`: the rules stop, each tranche is
  stored, then published as an ``exit.order``, then awaited as trading's
  ``order.filled``/``order.rejected``. A rule's sale under way holds its tokens back
  until it settles; refused, the graceful exit sells them too. A position trading
  closes by other means (``position.closed``: a hand sale, a rule's sale that raced)
  gets no tranche more; its report says it was closed, and why, and the close is
  stored with the run's records before the state that applied it is written, as a
  tranche's outcome is. A close trading made before the run began (the event's time),
  applied late by a consumer behind, was never the run's: with nothing sold by the
  run, its position is withdrawn from it, with no line. Reports per position go out as
  ``exit.report`` and into the records.
- **The end of a graceful exit** is the whole run's, not a replica's: each replica
  lists in the records the partitions it has loaded and the positions it queued, and
  closes each position as it is sold out (or as the deadline leaves it); the change
  that leaves every partition listed and no position open finishes the run, in the
  same transaction, and that replica publishes the summary of every position
  (``exit.report``, ``graceful``). A replica done with its share keeps watching: the
  partitions of a replica that died come to it with their positions, and it sells them.
  An entry of trading still in flight (ordered before trading halted) is listed too,
  as a placeholder of its mint that keeps the run open: refused, it is withdrawn;
  filled, the position it opened comes here late, is listed in its place and sold,
  with a line of its own even on a mint whose earlier position the run sold or saw
  closed.
  Every change of the run lists what is still to come here with it (entries in
  flight, positions not queued yet), so no sale finishes the run before them. Past
  the deadline the placeholders are withdrawn: the run ends on time. Once it has ended
  the rules order again (trading stays halted until the operator resumes it, and
  what it buys then needs them), and the next shutdown begins a run of its own.
- **A shutdown's request id.** ``POST /shutdown`` publishes ``system.shutdown`` under
  the operator's ``request_id`` (a new one if none is given; ``pumpflow stop`` gives
  one per invocation, or ``--request-id``), as its event id too. The run that applies
  it stores the id with it (begun or joined, in one transaction): the same id asked
  again, of any replica, is answered with that run and its progress (its report once
  over) and not published, and a copy that reaches the bus all the same begins no run.
  A request is remembered ``shutdown_requests_kept_s`` after its run is over; one
  requested longer ago than that begins no run (applied and forgotten, or not).
  Another id while a run is under way joins it; once it is over, it begins the next.
- **Trading's barrier.** This consumer may lag behind trading (a backlog on a
  partition): an entry trading sent may not have come here when everything else is
  sold. So trading, as it halts entries on ``system.shutdown``, publishes
  ``trading.barrier`` on the critical lane: the entry orders it has in flight and the
  positions it holds, under the shutdown's ``request_id``. Every replica gets it
  (``<service>-control``) and lists each as a placeholder of the run (beginning the run
  if the shutdown has not come yet, as the request's); the owner of the mint withdraws
  it once its consumer has seen the entry refused, or filled and its position here
  (then sold), or the position here (then sold) or closed. A barrier of a request a run
  that is over applied (the shutdown seen again by trading: redelivered, or after its
  restart) is dropped, as one from before the last run ended is. The run waits for the
  barrier itself ``exit_barrier_wait_s`` at most (trading down, or its leader changing
  in the middle of the shutdown, never answers): past that it ends on what this
  service has seen, as without a barrier. Past the deadline every placeholder goes, and
  a position the barrier listed that no replica saw is reported left (nothing sold).
- **An operator's sale.** ``POST /positions/{mint}/sell`` (``pumpflow sell``, the API
  token) publishes ``exit.sale_requested``: the replica that owns the mint's partition
  orders the sale as one of the position's rules (``requested``: a share of what the
  rules have not ordered sold, all of it by default), its ``exit.order`` stored and
  published as theirs. The replica that took the request answers with the order, or why
  none (no such position, a graceful exit selling it, all of it ordered already), when
  it owns the partition and applies it within ``wait_s`` of the body (5 s); otherwise
  it answers that the request is published (202), its outcome in the owner's log and
  ``pumpflow_exit_sale_requests_total``. A ``request_id`` given again sells nothing more.
- **An operator's request while the broker takes no publication** (short of memory or
  disk it blocks every publisher; or it does not answer): ``POST /shutdown`` and a
  sale's request wait ``exit_publish_wait_s`` at most for the broker to take them, then
  answer that the request is accepted and not published yet, and why (202,
  ``published: false``); its publication goes on and it goes out once the broker takes
  it, once: a shutdown or a sale asked again under its ``request_id`` meanwhile is not
  published again. A replica stopped before then says in its log that the request may be lost.
- **A partition moving** (a replica joining, or leaving by ``stop``) takes its
  positions out of the old owner's share, which sends none of their tranches any more
  (checked before each is stored and again before it is published) and gives up the
  one it awaits; the new owner sells them like a restarted replica: numbering on from
  the tranches stored by the time it takes the partition up (in the middle of its own
  share too: the old owner may have sent more since that share began), with the fills
  so far in its report of the position, the tranche in flight's tokens held back until
  its outcome. A share is of the partitions whose keys are loaded: one still loading
  is taken up once it has loaded (its stored exits are not this share's to close,
  unsold, before).
- **A replica stopping** (SIGTERM, a scale-down; not a graceful exit) logs how many
  positions of its share are open: their rules do not run until a replica takes their
  partitions (their events wait in the queues). With every replica stopped, Prometheus'
  ``ExitDownWithPositionsOpen`` fires while trading holds positions.
- **Restart.** A graceful exit under way at start (a kill -9, say) is resumed: after
  the outcomes of the tranches sent have come in (``exit_resume_wait_s`` at most), the
  stored tranches give each position's next tranche number and the fills so far, and
  the closes the positions trading closed; what is still held is sold under the same
  deadline. A close is the run's from the start on, whether a share sells the
  position yet or not (the replica waiting to sell, the position's partition just
  come): stored, and the position's exit ends closed by trading when it is taken up.
  A tranche stored and still without an outcome is published again under its order
  id (stored just before a crash, it may never have been sent), at most once per
  ``exit_order_timeout_s`` from a replica: trading refuses an order id it has seen,
  so nothing is sold twice, and drops the copies.
- HTTP: ``GET /progress`` (the graceful exit now), ``GET /summary`` (the last one's),
  ``GET /orders``, ``GET /positions``; ``POST /shutdown`` needs the API token.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, ClassVar, NamedTuple

import msgspec
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.bus.ownership import assign_partitions
from pumpflow.common.bus.routing import partition_of
from pumpflow.common.consumer import ConsumerMetrics, KeyedStatefulConsumer
from pumpflow.common.curve import CurveState
from pumpflow.common.dependencies import wait_out
from pumpflow.common.events import (
    Event,
    ExitOrder,
    ExitReport,
    LifecycleState,
    OrderFilled,
    OrderRejected,
    SaleRequested,
    ShutdownBarrier,
    SystemShutdown,
    make_event,
)
from pumpflow.common.exit import (
    CONTROL_CONSUMES,
    REQUESTED,
    ExitProcessor,
    ExitProgress,
    ExitRecord,
    ExitState,
    GracefulExitManager,
    GracefulExitSummary,
    HeldView,
    PendingSale,
    PlannedTranche,
    held_view,
)
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.trading import derived_id
from pumpflow.exit.metrics import ExitMetrics
from pumpflow.exit.records import (
    BARRIER,
    ExitOrderRecord,
    ExitStore,
    MemoryExitStore,
    PostgresExitStore,
    RunRecord,
    TradingClose,
    entry_position_id,
    held_position_id,
    resume_state,
)
from pumpflow.exit.settings import ExitSettings

log = logging.getLogger("pumpflow.exit")

#: operators' sale requests whose answers a replica keeps (a request id asked again)
_ANSWERS_KEPT = 1024
#: longest id (a position's, a request's) an operator's request may give, and longest
#: the API waits for its answer
_ID_MAX_CHARS = 128
_REQUEST_WAIT_MAX_S = 60.0


def control_group(service: str) -> str:
    """The consumer group of the exit service's keyless commands (``system.shutdown``)."""
    return f"{service}-control"


def _report_of(run: RunRecord) -> dict[str, Any]:
    """A finished ``run``'s summary (its ``exit.report``) and the text of it."""
    report = msgspec.convert(run.summary, type=ExitReport)
    return {"summary": run.summary, "text": GracefulExitSummary.from_report(report).text()}


class _OwnedPositions:
    """The positions this replica holds, as the graceful exit reads them: of the
    partitions it owns whose keys are loaded (a partition revoked leaves its keys a
    moment later; one assigned holds only some of them until all are)."""

    def __init__(self, consumer: KeyedStatefulConsumer[ExitState]):
        self.consumer = consumer

    @property
    def open_positions(self) -> Mapping[str, HeldView]:
        held = {}
        restored, partitions = self.consumer.restored, self.consumer.bus.partitions
        for key in list(self.consumer.keys()):
            if partition_of(key, partitions) not in restored:
                continue
            state = self.consumer.state(key)
            view = held_view(state) if state is not None else None
            if view is not None:
                held[key] = view
        return held


class _Closed(NamedTuple):
    """Trading closed a position (the close's reason and time)."""

    position_id: str
    reason: str
    time: float


_Handed = OrderFilled | OrderRejected | _Closed


def _moved(order_id: str, mint: str) -> OrderRejected:
    """The answer to a tranche of a position whose partition moved to another replica."""
    return OrderRejected(
        order_id=order_id,
        mint=mint,
        reason="its partition moved to another replica",
        side="sell",
        position_id=order_id.split(":exit:")[0],
    )


class ExitService(Service):
    """Exit rules per position, and the graceful exit of every position on shutdown."""

    name: ClassVar[str] = "exit"
    settings_class: ClassVar[type[ExitSettings]] = ExitSettings
    needs_store: ClassVar[bool] = True
    needs_db: ClassVar[bool] = True

    settings: ExitSettings

    def __init__(
        self,
        settings: ExitSettings,
        *,
        registry: CollectorRegistry | None = None,
        records: ExitStore | None = None,
    ):
        super().__init__(settings)
        self.metrics = ExitMetrics(registry=registry)
        self.consumer_metrics = ConsumerMetrics(self.name, registry=registry)
        self.records: ExitStore | None = records
        self.processor: ExitProcessor | None = None
        self.consumer: KeyedStatefulConsumer[ExitState] | None = None
        self.manager: GracefulExitManager | None = None
        #: the last graceful exit's progress as it ended (its manager is dropped then)
        self.last_progress: ExitProgress | None = None
        self.run: RunRecord | None = None
        #: the whole run's summary, once every replica's positions are exited
        self.summary: GracefulExitSummary | None = None
        self._ended: RunRecord | None = None
        #: a change of the run raised: its reply lost, it may have ended the run
        self._unanswered = False
        #: resolved (and dropped) when a position comes here or the run ends during a
        #: graceful exit: the looks that wait ``exit_run_poll_s`` for either look at once
        self._stirred: asyncio.Future[None] | None = None
        #: set when this replica's graceful exit has begun, and when it has ended
        self.began = asyncio.Event()
        self.finished = asyncio.Event()
        self._ctx: ServiceContext | None = None
        self._control: Subscription | None = None
        #: exit orders' outcomes and positions closed, applied and not stored or acted on
        #: yet, in the order they applied: (mint, what, sale, time, the tokens the
        #: position's rule sales held back after it)
        self._outcomes: list[tuple[str, _Handed, PendingSale | None, float, float]] = []
        #: order ids of those whose rule sale's report went out
        self._reported: set[str] = set()
        #: tranches sent and awaited: order id -> (mint, its outcome)
        self._waiting: dict[str, tuple[str, asyncio.Future]] = {}
        #: tranches of the run published from here: order id -> when (loop time)
        self._asked: dict[str, float] = {}
        #: positions trading closed during the run, as applied here (stored or not yet)
        self._closes: dict[str, TradingClose] = {}
        #: outcomes of the run's tranches as applied here (stored or not yet): order id
        #: -> (outcome, time)
        self._applied: dict[str, tuple[OrderFilled | OrderRejected, float]] = {}
        #: a close stored of a position this share has not taken up: the next look does
        self._untaken_closes = False
        self._taking = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._graceful: asyncio.Task | None = None
        self._poll: asyncio.Task | None = None
        #: operators' sale requests applied here, the latest: request id -> the answer
        self._answers: OrderedDict[str, dict[str, Any]] = OrderedDict()
        #: requests taken through this replica's API, awaiting their answer
        self._asking: dict[str, asyncio.Future] = {}
        #: operators' requests (a shutdown, a sale) being published, by event id: each
        #: publication goes on until it settles, whether its answer waited for it or not
        self._publishing: dict[str, asyncio.Task] = {}

    # ---------------------------------------------------------------- lifecycle

    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        s = self.settings
        if self.records is None:
            kept = self.settings.shutdown_requests_kept_s
            self.records = (
                PostgresExitStore(ctx.db, requests_kept_s=kept)
                if ctx.db is not None
                else MemoryExitStore(requests_kept_s=kept)
            )
        self.processor = ExitProcessor(
            s.rules(),
            clock=ctx.clock,
            slippage_pct=s.exit_slippage_pct,
            on_outcome=self._on_outcome,
            on_market=self._on_market,
            on_lifecycle=self._on_lifecycle,
            on_closed=self._on_closed,
            on_request=self._on_request,
            on_held=self._on_held,
            retire_ttl_s=s.exit_state_ttl_s,
        )
        under_way = await self.records.active_run()
        # the rules must not sell what a graceful exit under way is selling
        self.processor.halted = under_way is not None
        self.consumer = ctx.keyed_consumer(
            self.processor,
            s.consumer_config(s.service),
            on_published=self._published,
            metrics=self.consumer_metrics,
            on_forgotten=self.processor.forget,
            before_write=self._before_write,
        )
        if under_way is not None:
            log.warning("exit: resuming the graceful exit %s begun at %.3f", under_way.run_id,
                        under_way.started_at)  # fmt: skip
            # before the consumer applies anything: a close it applies is the run's
            self._begin(under_way)
        await self.consumer.start()
        self._control = Subscription(
            service=control_group(s.service), patterns=CONTROL_CONSUMES, handler=self._on_control
        )
        await ctx.bus.subscribe(self._control)
        self._poll = asyncio.create_task(self._poll_runs(), name="exit-runs")

    def stopping(self) -> None:
        # the runtime hands the partitions over next, their positions with them
        self._say_unwatched()

    async def stop(self) -> None:
        for task in (self._poll, self._graceful):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._control is not None and self._ctx is not None:
            await self._ctx.bus.unsubscribe(self._control)
        if self.consumer is not None:
            await self.consumer.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._publishing:
            # one last chance, as long as their answers waited: the bus closes next
            await asyncio.wait(
                set(self._publishing.values()), timeout=self.settings.exit_publish_wait_s
            )
            for publishing in list(self._publishing.values()):
                publishing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publishing

    def _say_unwatched(self) -> None:
        """Say how many positions of this replica's share are left to no exit rule as it
        stops: with no replica left running, nothing sells them until one comes. On a
        bus that keeps no events past this process (an embedded run, a backtest) their
        rules end with it, which its report shows: a line of the log only."""
        if self.consumer is None:
            return
        held = len(_OwnedPositions(self.consumer).open_positions)
        if not held:
            return
        positions = f"{held} position{'s' if held != 1 else ''} of this replica's share"
        if not self.consumer.bus.durable:
            log.info("exit: stopping with %s open: the bus keeps no events past this "
                     "process, so their exit rules end with it", positions)  # fmt: skip
            return
        if self.run is not None:
            log.warning("exit: stopping in the middle of the graceful exit %s with %s open: "
                        "the replica that takes their partitions sells them (their events "
                        "wait in the queues)", self.run.run_id, positions)  # fmt: skip
            return
        log.warning("exit: stopping with %s open: their exit rules (stop-loss, take-profit, "
                    "timeouts) do not run until a replica takes their partitions, and run "
                    "again then (their events wait in the queues)", positions)  # fmt: skip

    # ---------------------------------------------------------------- the graceful exit

    async def shutdown(
        self, reason: str, deadline: float | None = None, *, request_id: str | None = None
    ) -> RunRecord:
        """Begin the graceful exit (or join the one under way); its record. A
        ``request_id`` a graceful exit applied before is that one's, over or not: no
        second one begins."""
        now = self._ctx.clock.now()
        if deadline is None:
            deadline = now + self.settings.exit_deadline_s
        run = await self.records.begin_run(
            RunRecord.new(reason, now, deadline, partitions=self.consumer.bus.partitions),
            request_id=request_id,
        )
        if run.finished_at is None:
            self._begin(run)
        return run

    async def _on_control(self, event: Event) -> None:
        data = event.data
        if isinstance(data, SystemShutdown):
            applied = None
            if data.request_id is not None:
                applied = await self.records.run_of_request(data.request_id)
            now = self._ctx.clock.now()
            if applied is None and self.settings.shutdown_too_old(event.time, now):
                log.warning("exit: system.shutdown (%s, request %s) was requested %.0f s ago, "
                            "longer ago than a request is kept (shutdown_requests_kept_s): "
                            "no graceful exit", data.reason, data.request_id,
                            now - event.time)  # fmt: skip
                return
            if applied is None:
                log.info("exit: system.shutdown (%s, request %s): graceful exit", data.reason,
                         data.request_id)  # fmt: skip
            else:
                log.info("exit: system.shutdown (%s): a repeat of request %s, applied by the "
                         "graceful exit %s (%s): not a second one", data.reason,
                         data.request_id, applied.run_id,
                         "under way" if applied.finished_at is None else "over")  # fmt: skip
            await self.shutdown(data.reason, data.deadline, request_id=data.request_id)
        elif isinstance(data, ShutdownBarrier):
            await self._take_barrier(data, event.time)

    async def _take_barrier(self, barrier: ShutdownBarrier, time: float) -> None:
        """List what trading had in flight and held as it halted entries (the run begun
        first if the shutdown is still on its way here)."""
        if self._ended is not None:
            log.warning("exit: trading's barrier came after the run %s ended", self.run.run_id)
            return
        if barrier.request_id is not None:
            # told again for a shutdown trading saw again (redelivered, or after its
            # restart): the request's run, over, is not begun again nor joined by another
            applied = await self.records.run_of_request(barrier.request_id)
            if applied is not None and applied.finished_at is not None:
                self._barrier_of_a_run_over(barrier, applied)
                return
        if self.run is None:
            latest = await self.records.latest_run()
            # a barrier from before the last run ended is that run's, late: no new run
            if latest is not None and (latest.finished_at or 0.0) >= time:
                self._barrier_of_a_run_over(barrier, latest)
                return
            run = await self.shutdown(barrier.reason, request_id=barrier.request_id)
            if run.finished_at is not None:
                # the request's run ended between the look above and this one
                self._barrier_of_a_run_over(barrier, run)
                return
        log.info("exit: trading's barrier: %d entries in flight, %d positions held",
                 len(barrier.entries), len(barrier.positions))  # fmt: skip
        placeholders = [(entry_position_id(e.order_id), e.mint) for e in barrier.entries]
        placeholders += [(held_position_id(p.position_id), p.mint) for p in barrier.positions]
        await self._update_run(positions=placeholders, withdraw=[BARRIER])

    @staticmethod
    def _barrier_of_a_run_over(barrier: ShutdownBarrier, run: RunRecord) -> None:
        log.warning("exit: trading's barrier (request %s) came after the run %s ended: %d "
                    "entries, %d positions not waited for, no graceful exit begun",
                    barrier.request_id, run.run_id, len(barrier.entries),
                    len(barrier.positions))  # fmt: skip

    def _begin(self, run: RunRecord) -> None:
        if self.run is not None:
            return
        self.run = run
        # the last run's report is not this one's
        self.summary, self.last_progress = None, None
        self.processor.halted = True
        self.finished.clear()
        self.began.set()
        self._graceful = asyncio.create_task(self._run_graceful(run), name="exit-graceful")

    def _stir(self) -> None:
        """Wake the looks waiting for a position to come or the run to end."""
        if self._stirred is not None and not self._stirred.done():
            self._stirred.set_result(None)
        self._stirred = None

    def _next_stir(self) -> asyncio.Future[None]:
        """What the next :meth:`_stir` resolves: taken before a look, so what comes
        during the look wakes the wait after it."""
        if self._stirred is None:
            self._stirred = asyncio.get_running_loop().create_future()
        return self._stirred

    def _on_held(self, mint: str, position_id: str) -> None:
        if self.run is not None:
            # a late entry's position (or one a dead replica's partition brought): sold
            # as it comes, not a poll later, as the market moves on meanwhile
            self._stir()

    async def _poll_runs(self) -> None:
        """Find a graceful exit another replica began; take in positions opened late."""
        stirred = self._next_stir()
        while True:
            await asyncio.wait({stirred}, timeout=self.settings.exit_run_poll_s)
            stirred = self._next_stir()
            try:
                if self.run is None:
                    run = await self.records.active_run()
                    if run is not None:
                        self._begin(run)
                elif self.manager is not None and self.manager.summary is None:
                    self._hand_over_moved()
                    if self._untaken_closes or self.manager.untaken():
                        await self._take_up(self.manager, self.run)
                    else:
                        self.manager.begin_graceful_exit(self.run.reason)
                    self.metrics.progress(self.manager.monitor_exit_progress())
                    await self._list_share(self.manager)
            except Exception:
                log.exception("exit: looking for a graceful exit failed; next round")

    async def _run_graceful(self, run: RunRecord) -> None:
        """Sell this replica's share, then whatever comes to it, until the run is over."""
        try:
            ended = None
            while ended is None:
                ended = await self._sell_share(run)
                if ended is None:
                    ended = await self._until_more(run)
            report = msgspec.convert(ended.summary, type=ExitReport)
            self.summary = GracefulExitSummary.from_report(report)
            self.metrics.margin(self.summary.deadline_margin_s)
            log.info("exit: %s", self.summary.text())
            # over: the rules sell again what trading buys once resumed, and the next
            # shutdown begins a run of its own; its progress stays as it ended (its
            # elapsed time and deadline margin would go on counting)
            self.last_progress = self.exit_progress()
            self.run, self._ended, self.manager = None, None, None
            self._asked, self._closes, self._applied = {}, {}, {}
            self._untaken_closes = False
            self.processor.halted = False
        finally:
            self.finished.set()

    async def _sell_share(self, run: RunRecord) -> RunRecord | None:
        """Sell what the partitions held here hold; the run if it is over."""
        ctx = self._ctx
        await self._settled_before(run)
        manager = GracefulExitManager(
            ctx.bus,
            _OwnedPositions(self.consumer),
            self,
            clock=ctx.clock,
            config=self.settings.graceful(),
            source=ctx.source,
            publish_summary=False,
            on_exited=self._exited,
            on_withdrawn=self._withdrawn,
        )
        for key in list(self.consumer.keys()):
            state = self.consumer.state(key)
            if state is not None and state.position is not None and state.lifecycle:
                manager.on_lifecycle(key, state.lifecycle, state.activity_level)
        self.manager = manager
        await self._take_up(manager, run)
        share = await manager.run()
        self.metrics.progress(manager.monitor_exit_progress())
        log.info("exit: this replica's share of %s: %s", run.run_id, share.text())
        lines = [r.line() for r in manager.all_records()]
        withdraw = [r.position_id for r in manager.withdrawn]
        while True:
            try:
                await self._update_run(lines=lines, withdraw=withdraw)
                break
            except Exception:
                log.exception("exit: closing this replica's share failed; again")
                await asyncio.sleep(self.settings.exit_run_poll_s)
        return self._ended

    async def _take_up(self, manager: GracefulExitManager, run: RunRecord) -> None:
        """Queue what the partitions loaded here hold and ``manager`` does not sell yet,
        as a restarted replica does: numbering on from the tranches stored by now (another
        replica may have sent some since this share began), with their outcomes (their
        fills in the report) and trading's closes, stored or applied here and not stored
        yet; the exits over before (sold out, or closed by trading) closed with the
        listing, those of positions closed before the run began with nothing sold
        withdrawn from it, and the tranches still without an outcome asked again."""
        async with self._taking:
            self._untaken_closes = False
            stored = await self._waited(
                lambda: self.records.run_orders(run.run_id), "reading the run's tranches"
            )
            closes = {
                **await self._waited(
                    lambda: self.records.run_closes(run.run_id), "reading the run's closes"
                ),
                **self._closes,
            }
            # what applied here and is not stored yet counts too, read with the positions
            # (no wait between): they are as it left them (a fill counted twice, or a
            # close missed, would end the position unsold)
            orders = [
                o.settled(*self._applied[o.order_id])
                if o.state == "sent" and o.order_id in self._applied
                else o
                for o in stored
            ]
            records, sent = resume_state(orders, closes)
            # other replicas' exits are theirs to report; those of a partition still
            # loading are the next take-up's: this one would close them unsold, their
            # positions not queued
            records = [
                r
                for r in records
                if self._restored(r.mint) and not manager.took_up(r.mint, r.position_id)
            ]
            # a close applied late may be from before the run: that position was never
            # the run's, unless the run sold some of it
            early = [
                r.position_id
                for r in records
                if r.closed is not None
                and not r.fills
                and closes[r.position_id].time < run.started_at
            ]
            records = [r for r in records if r.position_id not in early]
            manager.resume_graceful_exit(
                run.reason,
                started_at=run.started_at,
                deadline=run.deadline,
                records=records,
                sent=sent,
            )
            self.metrics.progress(manager.monitor_exit_progress())
            # queued: from here a failure would leave them unlisted and not asked again
            lines = [r.line() for r in records if r.completed]
            await self._waited(
                lambda: self._list_share(manager, lines, withdraw=early), "listing the share"
            )
            await self._send_again(run, records, orders)

    async def _waited(self, action: Callable[[], Awaitable[Any]], what: str) -> Any:
        """``action``'s result, the records' database waited out while it is away: a
        share whose take-up failed would sell nothing, the run never ending."""
        return await wait_out(action, waiter=self.settings.service, what=what)

    async def _send_again(
        self, run: RunRecord, records: list[ExitRecord], orders: list[ExitOrderRecord]
    ) -> None:
        """Publish again the tranches of ``records`` stored and still without an outcome:
        one stored just before a crash may never have been published, and its tokens
        would stay unconfirmed to the deadline. Trading sells an order id once, so one it
        has is not sold again; its outcome comes as it would have (a late outcome). One
        asked from here within ``exit_order_timeout_s`` is not asked again: its outcome
        may still come, and trading drops the copy."""
        ctx = self._ctx
        config = self.settings.graceful()
        unconfirmed = {order_id for record in records for order_id in record.unconfirmed}
        now = asyncio.get_running_loop().time()
        for order in orders:
            if order.order_id not in unconfirmed:
                continue
            asked = self._asked.get(order.order_id)
            if asked is not None and now < asked + self.settings.exit_order_timeout_s:
                continue
            tranche = PlannedTranche(
                mint=order.mint,
                position_id=order.position_id,
                order_id=order.order_id,
                number=order.number,
                token_amount=order.token_amount,
                rule=order.rule,
                price_before=None,
                expected_price=None,
                expected_sol=None,
                price_impact=None,
                score=0.0,
                deadline=run.deadline,
                slippage_pct=config.slippage_of(order.rule),
            )
            log.info("exit: %s still without an outcome: asked again", order.order_id)
            self._asked[order.order_id] = now
            await ctx.bus.publish(make_event(tranche.order(), source=ctx.source,
                                             time=ctx.clock.now()))  # fmt: skip

    async def _until_more(self, run: RunRecord) -> RunRecord | None:
        """Wait for the run to end, listing the partitions that come here; None when a
        position comes here to sell (a dead replica's partitions, a late position)."""
        stirred = self._next_stir()
        while self._ended is None:
            await asyncio.wait({stirred}, timeout=self.settings.exit_run_poll_s)
            stirred = self._next_stir()
            try:
                stored = await self.records.get_run(run.run_id)
                if stored is not None and stored.finished_at is not None:
                    return stored
                queued = {q.position_id for q in self.manager.planner.exits.values()}
                held = _OwnedPositions(self.consumer).open_positions.values()
                if self._untaken_closes or any(view.position_id not in queued for view in held):
                    return None
                await self._update_run(partitions=sorted(self.consumer.restored))
            except Exception:
                log.exception("exit: watching the graceful exit %s failed; next round", run.run_id)
        return self._ended

    async def _list_share(self, manager: GracefulExitManager, lines=(), withdraw=()) -> None:
        """List the partitions loaded here and the positions queued from them."""
        # read together, with no wait between: a partition listed has its positions queued
        partitions = sorted(self.consumer.restored)
        positions = [(q.position_id, q.mint) for q in manager.planner.exits.values()]
        await self._update_run(
            partitions=partitions, positions=positions, lines=lines, withdraw=withdraw
        )

    async def _store_ended(self) -> None:
        """Store the ids ended at the tokens retired since the last commit: a token leaves
        memory and the partition's index only once they are stored (a restarted replica
        reads them in :meth:`_to_come`)."""
        handed = self.processor.retired_ended
        if not handed:
            return
        ended = dict(handed)
        await self.records.record_ended(
            ended, time=self._ctx.clock.now(), keep_s=self.settings.exit_state_ttl_s
        )
        for mint, ids in ended.items():
            if handed.get(mint) == ids:
                del handed[mint]

    async def _to_come(self) -> dict[str, Any]:
        """The run's changes that say what it still waits for here, besides the positions
        queued: positions held and not queued yet (a late entry's; the next share sells
        them), each mint's entry orders in flight, and the placeholders seen to (ended at a
        token here or stored as ended at a retired one, or here: listed with them). Past
        the deadline every placeholder goes: the run ends on time."""
        now = self._ctx.clock.now()
        queued = set()
        if self.manager is not None:
            queued = {q.position_id for q in self.manager.planner.exits.values()}
        late, entries, seen = [], {}, []
        for key in list(self.consumer.keys()):
            state = self.consumer.state(key)
            if state is None:
                continue
            view = held_view(state)
            if view is not None and view.position_id not in queued:
                late.append((view.position_id, key))
            if state.entries:
                entries[key] = sorted(state.entries)
            seen += state.ended
            if state.position is not None:
                seen.append(state.position.position_id)
        # read after the keys: a token leaves memory only once its ended ids are stored
        seen += await self.records.ended_ids()
        withdraw = [p for i in seen for p in (entry_position_id(i), held_position_id(i))]
        if now >= self.run.started_at + self.settings.exit_barrier_wait_s:
            withdraw.append(BARRIER)
        return {
            "positions": late,
            "entries": entries,
            "withdraw": withdraw,
            "overdue": now >= self.run.deadline,
        }

    async def _exited(self, record: ExitRecord) -> None:
        try:
            await self._update_run(lines=[record.line()])
        except Exception:
            # the selling goes on; the share's end closes the position again
            log.exception("exit: closing %s's exit in the run failed", record.position_id)

    async def _withdrawn(self, record: ExitRecord) -> None:
        try:
            await self._update_run(withdraw=[record.position_id])
        except Exception:
            # the share's end withdraws it again
            log.exception("exit: withdrawing %s from the run failed", record.position_id)

    async def _update_run(self, **changes: Any) -> None:
        """Change the run's records; if that ended the run, publish its summary."""
        if self.run is None:
            return  # over: its records are closed
        ctx = self._ctx
        now = ctx.clock.now()
        # every change may be the last: it says what is still to come, read with it
        to_come = await self._to_come()
        for name in ("positions", "withdraw"):
            to_come[name] = [*changes.pop(name, ()), *to_come[name]]
        run_id = self.run.run_id
        try:
            ended = await self.records.update_run(run_id, time=now, **to_come, **changes)
        except Exception:
            self._unanswered = True
            raise
        if ended is None and self._unanswered and self._ended is None:
            # the change whose reply was lost may have ended the run, and nothing else
            # would tell it (if another replica's change ended it, that one told it too:
            # the same event, by its id)
            stored = await self.records.get_run(run_id)
            if stored is not None and stored.finished_at is not None:
                ended = stored
        self._unanswered = False
        if ended is not None:
            self._ended = ended
            self._stir()
            report = msgspec.convert(ended.summary, type=ExitReport)
            event_id = derived_id("exit-report", run_id)
            await ctx.bus.publish(make_event(report, source=ctx.source, time=now,
                                             event_id=event_id))  # fmt: skip

    async def _settled_before(self, run: RunRecord) -> None:
        """Wait (a while) for this replica's partitions, their keys loaded, and for the
        outcomes of tranches sent before a restart: what is held is what those
        partitions hold after them.

        A replica that resumes before the bus assigns it partitions holds no position,
        and a graceful exit of none is over at once, stranding what the partitions hold.
        """
        loop = asyncio.get_running_loop()
        until = loop.time() + self.settings.exit_resume_wait_s
        while loop.time() < until:
            if self.consumer.owned and self.consumer.owned <= self.consumer.restored:
                orders = await self._waited(
                    lambda: self.records.run_orders(run.run_id), "reading the run's tranches"
                )
                # other replicas' tranches in flight are theirs to wait for
                if all(o.state != "sent" or not self._owns(o.mint) for o in orders):
                    return
            await asyncio.sleep(0.05)
        log.warning("exit: %s resumes with partitions %s (%s loaded), tranches still without "
                    "an outcome", run.run_id, sorted(self.consumer.owned),
                    sorted(self.consumer.restored))  # fmt: skip

    def _owns(self, mint: str) -> bool:
        return partition_of(mint, self.consumer.bus.partitions) in self.consumer.owned

    def _restored(self, mint: str) -> bool:
        """Whether ``mint``'s partition is owned here with its keys loaded."""
        return partition_of(mint, self.consumer.bus.partitions) in self.consumer.restored

    def _hand_over_moved(self) -> None:
        """Positions whose partitions moved to another replica leave this share: their
        new owner sells them, numbering on from the stored tranches (it waits for the
        outcome of the one in flight here, which comes to it)."""
        if self.manager is not None:
            for mint in [m for m in self.manager.planner.exits if not self._owns(m)]:
                self.manager.hand_over(mint)
                log.info("exit: %s's partition moved: its new owner sells it", mint)
        for order_id, (mint, waiting) in list(self._waiting.items()):
            if not self._owns(mint) and not waiting.done():
                waiting.set_result(_moved(order_id, mint))

    async def execute_exit(self, order: ExitOrder) -> OrderFilled | OrderRejected | None:
        """Send one tranche of the graceful exit: stored, published, its outcome awaited
        (None if it does not come within ``exit_order_timeout_s``); none once its
        partition has moved (the new owner sells the position)."""
        ctx = self._ctx
        now = ctx.clock.now()
        if not self._owns(order.mint):
            self._hand_over_moved()
            return _moved(order.order_id, order.mint)
        record = self.manager.records[order.mint]
        stored = ExitOrderRecord(
            order_id=order.order_id,
            mint=order.mint,
            position_id=order.position_id,
            rule=order.reason,
            number=int(order.order_id.rsplit(":", 1)[1]),
            token_amount=order.token_amount,
            sent_at=now,
            tokens_at_start=record.tokens_at_start,
            started_at=record.started_at,
            mark_price=record.mark_price,
            run_id=self.run.run_id,
        )
        # the records' database waited out: a failure here would end the share's selling
        await self._waited(lambda: self.records.record_order(stored), "storing a tranche")
        if not self._owns(order.mint):
            # moved while it was stored: settled here, so the new owner need not wait for it
            refused = _moved(order.order_id, order.mint)
            await self.records.settle(order.order_id, refused, now)
            self._hand_over_moved()
            return refused
        loop = asyncio.get_running_loop()
        outcome = loop.create_future()
        self._waiting[order.order_id] = (order.mint, outcome)
        self._asked[order.order_id] = loop.time()
        try:
            await ctx.bus.publish(make_event(order, source=ctx.source, time=now))
            self.metrics.ordered(order.reason)
            async with asyncio.timeout(self.settings.exit_order_timeout_s):
                return await outcome
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(order.order_id, None)

    # ---------------------------------------------------------------- processor hooks

    def _on_market(self, mint: str, state: CurveState, follows_sales: bool) -> None:
        if self.manager is not None:
            self.manager.on_market(mint, state, follows_sales=follows_sales)

    def _on_lifecycle(self, mint: str, state: LifecycleState, level: float) -> None:
        if self.manager is not None:
            self.manager.on_lifecycle(mint, state, level)

    def _on_closed(self, mint: str, position_id: str, reason: str, time: float) -> None:
        if self.run is not None:
            # a take-up before it is stored reads it here: the position is held no more
            self._closes[position_id] = TradingClose(mint=mint, reason=reason, time=time)
        # acted on after the outcomes applied before it: the sale that closed the
        # position may be the exit's own
        self._outcomes.append((mint, _Closed(position_id, reason, time), None, time, 0.0))

    def _on_request(self, mint: str, event: Event, order: ExitOrder | None, why: str) -> None:
        request: SaleRequested = event.data
        said = f"{request.reason!r}, " if request.reason else ""
        if order is not None:
            self.metrics.requested("ordered")
            log.warning("exit: a sale of %s asked (%sshare %g, %s): %s ordered, %g tokens",
                        mint, said, request.fraction, event.id, order.order_id,
                        order.token_amount)  # fmt: skip
        else:
            self.metrics.requested("refused")
            log.warning("exit: a sale of %s asked (%sshare %g, %s) is not ordered: %s",
                        mint, said, request.fraction, event.id, why)  # fmt: skip
        answer: dict[str, Any] = {"request_id": event.id, "mint": mint}
        answer["ordered"] = order is not None
        if order is not None:
            answer.update(
                order_id=order.order_id,
                position_id=order.position_id,
                token_amount=order.token_amount,
            )
        else:
            answer["detail"] = why
        self._answers[event.id] = answer
        while len(self._answers) > _ANSWERS_KEPT:
            self._answers.popitem(last=False)
        waiting = self._asking.pop(event.id, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(answer)

    async def request_sale(
        self, request: SaleRequested, *, request_id: str | None = None, wait_s: float = 5.0
    ) -> tuple[bool, dict[str, Any]]:
        """Publish an operator's ``request`` as ``exit.sale_requested``; whether it was
        answered within ``wait_s``, and the answer (the order, or why none) or what
        became of the request. A ``request_id`` this replica has answered is answered
        again, not published: a request sells once."""
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError("the exit service is not started")
        if request_id is not None and request_id in self._answers:
            return True, self._answers[request_id]
        event = make_event(request, source=ctx.source, time=ctx.clock.now(), event_id=request_id)
        answered = asyncio.get_running_loop().create_future()
        self._asking[event.id] = answered
        try:
            unpublished = await self._publish_request(event)
            if unpublished is not None:
                return False, {
                    "request_id": event.id,
                    "mint": request.mint,
                    "published": False,
                    "detail": f"the sale request accepted, {unpublished}, and the replica that "
                    "owns the token's partition orders the sale then (its log and "
                    "pumpflow_exit_sale_requests_total tell)",
                }
            async with asyncio.timeout(wait_s):
                return True, await answered
        except TimeoutError:
            return False, {
                "request_id": event.id,
                "mint": request.mint,
                "published": True,
                "detail": f"published; not applied here within the wait: "
                f"{self._owner_of(request.mint)} orders the sale, unless a request of this "
                "id was applied before (its log and pumpflow_exit_sale_requests_total tell)",
            }
        finally:
            self._asking.pop(event.id, None)

    def _owner_of(self, mint: str) -> str:
        """Who orders a sale of ``mint``: the replica the partitions' assignment gives its
        partition, named when the replicas share them; with several, the operator learns
        whose log tells what became of the request."""
        ctx = self._ctx
        partitions = ctx.bus.partitions if ctx is not None else 0
        ownership = getattr(ctx.bus, "ownership", None) if ctx is not None else None
        described = ownership().get(self.settings.service) if ownership is not None else None
        if not partitions or not described or not described.get("replicas"):
            return "the replica that owns the token's partition"
        partition = partition_of(mint, partitions)
        assigned = assign_partitions(partitions, described["replicas"])
        owner = next((r for r, owned in assigned.items() if partition in owned), None)
        if owner is None:
            return "the replica that owns the token's partition"
        return f"{owner}, which owns the token's partition {partition},"

    async def _publish_request(self, event: Event) -> str | None:
        """Publish an operator's ``event``: None once published, else (the broker has not
        taken it within ``exit_publish_wait_s``) what the answer says, the publication
        going on until the broker takes it. An event whose publication is under way (its
        request asked again) is not published twice."""
        publishing = self._publishing.get(event.id)
        if publishing is None:
            publishing = asyncio.create_task(
                self._ctx.bus.publish(event), name=f"exit:publish:{event.type}"
            )
            self._publishing[event.id] = publishing
            asked = asyncio.get_running_loop().time()
            publishing.add_done_callback(functools.partial(self._request_settled, event, asked))
        await asyncio.wait({publishing}, timeout=self.settings.exit_publish_wait_s)
        if not publishing.done():
            why = self._ctx.bus.why_unconfirmed()
            return f"not published yet: {why}; it goes out once the broker takes it"
        publishing.result()  # its failure, the call's
        return None

    def _request_settled(self, event: Event, asked: float, publishing: asyncio.Task) -> None:
        """Say what became of an operator's request whose answer did not wait for it."""
        if self._publishing.get(event.id) is publishing:
            del self._publishing[event.id]
        took = asyncio.get_running_loop().time() - asked
        if took < self.settings.exit_publish_wait_s:
            return  # answered with its outcome
        if publishing.cancelled():
            log.error("exit: stopped before the broker confirmed the operator's %s (%s): it "
                      "may be lost; see whether it took effect before asking again",
                      event.type, event.id)  # fmt: skip
        elif publishing.exception() is not None:
            log.error("exit: the operator's %s (%s) failed to publish: %r; it is not "
                      "published: ask again", event.type, event.id,
                      publishing.exception())  # fmt: skip
        else:
            log.warning("exit: the operator's %s (%s) is published, %.1f s after it was "
                        "asked (the broker took no publication meanwhile)", event.type,
                        event.id, took)  # fmt: skip

    def _on_outcome(
        self,
        mint: str,
        outcome: OrderFilled | OrderRejected,
        sale: PendingSale | None,
        time: float,
        held_back: float,
    ) -> None:
        if self.run is not None and ":exit:" in outcome.order_id:
            self._applied[outcome.order_id] = (outcome, time)
        # stored by the commit's before_write: the delivery is acked only once it is
        self._outcomes.append((mint, outcome, sale, time, held_back))

    async def _before_write(self) -> None:
        """What the commit's keys hand out, stored before their states are written (the
        keyed consumer's ``before_write``): a crash leaves it stored, or its events
        unacked and applied again, never applied and not stored."""
        await self._store_ended()
        await self._store_outcomes()

    async def _store_outcomes(self) -> None:
        """Store each exit order's outcome and each close of a position this graceful
        exit sells applied since the last commit, then act on them, in the order they
        applied.

        The outcome comes once (acked as its state is written): stored here, a crash
        before the write has it applied and stored again (a no-op), one after has it
        stored. Its rule sale's report goes out with it under an id of its own, so a
        second one after a crash is the same event.
        """
        while self._outcomes:
            mint, outcome, sale, time, held_back = self._outcomes[0]
            await self._store(mint, outcome, sale, time)
            del self._outcomes[0]
            settled = self._settled(mint, outcome, sale, held_back)
            task = asyncio.get_running_loop().create_task(settled)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _store(
        self, mint: str, outcome: _Handed, sale: PendingSale | None, time: float
    ) -> bool:
        """Store ``outcome``; whether it was new (a position closed is never an
        outcome's first store)."""
        if isinstance(outcome, _Closed):
            await self._store_close(mint, outcome)
            return False
        if ":exit:" in outcome.order_id:
            return await self.records.settle(outcome.order_id, outcome, time)
        if sale is None:
            return False
        first = await self._settle_rule(mint, outcome, sale, time)
        self._reported.discard(outcome.order_id)
        return first

    async def _store_close(self, mint: str, closed: _Closed) -> None:
        """Store trading's close of a position of the graceful exit with the run's
        records: the line that says so may not reach them before a crash, and a resumed
        replica holds the position no more, so only the records tell it why. A close of a
        position no share here has taken up yet (the share waits to begin, or its
        partition came here since) is taken up, closed, by the next look."""
        close = self._closes.get(closed.position_id)
        manager = self.manager
        if self.run is None or self._ended is not None or close is None:
            return
        selling = manager is not None and manager.selling(mint, closed.position_id)
        if manager is not None and not selling and manager.took_up(mint, closed.position_id):
            return  # its exit is over here: its line says how
        await self.records.record_close(self.run.run_id, closed.position_id, close)
        if not selling:
            self._untaken_closes = True

    async def _settled(
        self, mint: str, outcome: _Handed, sale: PendingSale | None, held_back: float
    ) -> None:
        """An outcome stored: to the tranche awaiting it, or to the graceful exit; a
        position closed: to the graceful exit."""
        try:
            if isinstance(outcome, _Closed):
                if self.manager is not None:
                    await self.manager.on_closed(
                        mint, outcome.position_id, outcome.reason, outcome.time
                    )
            elif ":exit:" in outcome.order_id:
                _mint, waiting = self._waiting.get(outcome.order_id, (mint, None))
                if waiting is not None and not waiting.done():
                    waiting.set_result(outcome)
                elif self.manager is not None:
                    # given up for lost (exit_order_timeout_s): its tokens were held back.
                    # Whether this store was the first or not: a retry whose lost reply
                    # stored it finds it settled, and the manager takes a tranche's once
                    await self.manager.on_late_outcome(outcome)
            elif sale is not None and self.manager is not None:
                await self.manager.on_rule_outcome(
                    mint, outcome, sale.token_amount, held_back=held_back, rule=sale.rule
                )
        except Exception:
            log.exception("exit: the graceful exit took %r badly", outcome)

    async def _settle_rule(
        self, mint: str, outcome: OrderFilled | OrderRejected, sale: PendingSale, time: float
    ) -> bool:
        """A rule's sale settled: reported if filled, then stored and counted; whether it
        was new."""
        record = ExitRecord(
            mint=mint,
            position_id=outcome.position_id or "",
            rule=sale.rule,
            tokens_at_start=sale.token_amount,
            mark_price=sale.mark_price,
            started_at=sale.decided_at,
        )
        stored = ExitOrderRecord(
            order_id=outcome.order_id,
            mint=mint,
            position_id=record.position_id,
            rule=sale.rule,
            number=int(outcome.order_id.rsplit(":", 1)[1]),
            token_amount=sale.token_amount,
            sent_at=sale.decided_at,
            tokens_at_start=sale.token_amount,
            started_at=sale.decided_at,
            mark_price=sale.mark_price,
        ).settled(outcome, time)
        if isinstance(outcome, OrderFilled):
            record.add_fill(outcome, time)
            record.finish(time)
        if isinstance(outcome, OrderFilled) and outcome.order_id not in self._reported:
            ctx = self._ctx
            # before the record: a crash between the two reports it again, the same event
            report = make_event(record.report(), source=ctx.source, time=time,
                                event_id=derived_id("exit-report", outcome.order_id))  # fmt: skip
            await ctx.bus.publish(report)
            # an outage of the records retries the store, not the report
            self._reported.add(outcome.order_id)
        if not await self.records.record_order(stored):
            return False  # settled before (applied again after a crash)
        if isinstance(outcome, OrderFilled):
            self.metrics.settled(sale.rule, "filled", record.slippage)
        else:
            self.metrics.settled(sale.rule, "rejected")
            if sale.rule == REQUESTED:
                # its tokens go back to the rules, and no rule is the operator's: told
                # "sale ordered", they would take the position for sold
                log.warning("exit: the operator's sale %s of %s refused, not ordered again "
                            "(its tokens are the exit rules' again; pumpflow sell to ask "
                            "again): %s", outcome.order_id, mint, outcome.reason)  # fmt: skip
            else:
                log.info("exit: %s's sale %s refused: %s", sale.rule, outcome.order_id,
                         outcome.reason)  # fmt: skip
        return True

    def _published(self, events: Sequence[Event]) -> None:
        for event in events:
            if isinstance(event.data, ExitOrder):
                self.metrics.ordered(event.data.reason)

    # ---------------------------------------------------------------- reads

    def positions(self) -> list[dict[str, Any]]:
        views = _OwnedPositions(self.consumer).open_positions.values() if self.consumer else ()
        # the market the plan reads, not what an operator asks of a position
        plan_only = ("mark_state", "mark_follows_sales")
        return [
            {key: value for key, value in asdict(view).items() if key not in plan_only}
            for view in views
        ]

    def exit_progress(self) -> ExitProgress | None:
        """The graceful exit's progress now, or the last one's as it ended."""
        if self.manager is not None:
            return self.manager.monitor_exit_progress()
        return self.last_progress

    def progress(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "run": None if self.run is None else asdict(self.run),
            "accepting_entries": self.run is None,
        }
        progress = self.exit_progress()
        if progress is not None:
            body["progress"] = asdict(progress)
        if self.summary is not None:
            body["summary"] = msgspec.to_builtins(self.summary.report())
            body["text"] = self.summary.text()
        return body

    async def last_summary(self) -> dict[str, Any] | None:
        run = await self.records.latest_run()
        if run is None or run.summary is None:
            return None
        return {"run": asdict(run), **_report_of(run)}

    async def request_shutdown(self, reason: str, request_id: str) -> tuple[bool, dict[str, Any]]:
        """Publish an operator's ``system.shutdown`` under ``request_id``; whether the
        broker took it within ``exit_publish_wait_s``, and the answer. A ``request_id`` a
        graceful exit applied is answered with that one (its report, once over), not
        published: a request is applied once. One whose publication is under way here is
        not published twice."""
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError("the exit service is not started")
        applied = await self.records.run_of_request(request_id)
        if applied is not None:
            over = applied.finished_at is not None
            answer = {
                "published": True,
                "applied": True,
                "reason": applied.reason,
                "request_id": request_id,
                "run": asdict(applied),
                "detail": f"system.shutdown ({applied.reason}) of request {request_id} applied "
                f"already: graceful exit {applied.run_id}, {'over' if over else 'under way'}",
            }
            if over:
                answer.update(_report_of(applied))
            return True, answer
        # /progress follows this exit from now on, not the last one's
        self.summary, self.last_progress = None, None
        # on the bus, so every service that stops on it hears it; the request id is the
        # event id too, as a sale's: a copy is known as one by trading and by _publishing
        shutdown = SystemShutdown(reason=reason, request_id=request_id)
        unpublished = await self._publish_request(
            make_event(shutdown, source=ctx.source, time=ctx.clock.now(), event_id=request_id)
        )
        said = f"system.shutdown ({reason})"
        answer = {"published": unpublished is None, "reason": reason, "request_id": request_id}
        if unpublished is None:
            return True, {**answer, "detail": f"{said} published"}
        return False, {**answer, "detail": f"{said} accepted, {unpublished}"}

    def router(self):
        from fastapi import APIRouter, Body, Depends, HTTPException, Query
        from fastapi.responses import JSONResponse

        from pumpflow.common.runtime.http import listed, reason_of, require_token, text_of

        api = APIRouter()

        def number(
            body: dict[str, Any],
            name: str,
            default: float,
            *,
            above: float | None = None,
            at_least: float = 0.0,
            at_most: float,
        ) -> float:
            value = body.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise HTTPException(422, f"'{name}' must be a number, got {value!r:.80}")
            low = f"over {above:g}" if above is not None else f"at least {at_least:g}"
            if not (value > above if above is not None else value >= at_least) or not (
                value <= at_most
            ):
                raise HTTPException(
                    422, f"'{name}' must be {low} and at most {at_most:g}, got {value}"
                )
            return float(value)

        @api.get("/progress")
        async def progress() -> dict[str, Any]:
            return self.progress()

        @api.get("/summary")
        async def summary() -> dict[str, Any]:
            found = await self.last_summary()
            if found is None:
                raise HTTPException(404, "no graceful exit has finished")
            return found

        @api.get("/orders")
        async def orders(limit: int = Query(100, ge=1, le=10_000)) -> dict[str, Any]:
            # one past the limit: whether more are stored than are listed
            rows = await self.records.orders(limit=limit + 1)
            return listed(rows, limit)

        @api.get("/positions")
        async def positions() -> dict[str, Any]:
            held = self.positions()
            return {"count": len(held), "positions": held}

        @api.post("/positions/{mint}/sell", dependencies=[Depends(require_token)])
        async def sell(mint: str, body: dict[str, Any] | None = Body(None)) -> JSONResponse:
            if self._ctx is None:
                raise HTTPException(503, "not started")
            body = body or {}
            request = SaleRequested(
                mint=mint,
                fraction=number(body, "fraction", 1.0, above=0.0, at_most=1.0),
                position_id=text_of(body, "position_id", None, max_chars=_ID_MAX_CHARS),
                reason=reason_of(body, ""),
            )
            answered, answer = await self.request_sale(
                request,
                request_id=text_of(body, "request_id", None, max_chars=_ID_MAX_CHARS),
                wait_s=number(body, "wait_s", 5.0, at_most=_REQUEST_WAIT_MAX_S),
            )
            return JSONResponse(answer, status_code=200 if answered else 202)

        @api.post("/shutdown", dependencies=[Depends(require_token)])
        async def shutdown(body: dict[str, Any] | None = Body(None)) -> JSONResponse:
            reason = reason_of(body, "shutdown (HTTP)")
            request_id = text_of(body, "request_id", None, max_chars=_ID_MAX_CHARS)
            if self._ctx is None:
                raise HTTPException(503, "not started")
            published, answer = await self.request_shutdown(reason, request_id or uuid.uuid4().hex)
            return JSONResponse(answer, status_code=200 if published else 202)

        return api

    async def status(self) -> dict[str, Any]:
        consumer = {} if self.consumer is None else self.consumer.describe()
        body = {**consumer, "graceful": self.run is not None}
        progress = self.exit_progress()
        if progress is not None:
            self.metrics.progress(progress)
            body["progress"] = asdict(progress)
        return body
