"""The trading service: predictions in, orders out, every change in the ledger first.

Wiring of trading's domain (:mod:`pumpflow.common.trading`): the
:class:`~pumpflow.common.trading.TradingEngine` decides, the executor (paper by
default, :mod:`pumpflow.trading.executor`) fills, the ledger
(:mod:`pumpflow.trading.ledger`, Postgres when the service has a database) keeps
every order, fill and position.

- Consumes :data:`~pumpflow.common.trading.SERVICE_CONSUMES`: the token events (the
  curve, marks and paper fills), ``features.updated``, ``token.lifecycle``,
  ``model.prediction`` (each one chance to enter), the exit service's ``exit.order``
  and the feed's ``feed.trade_stream`` (the feed breaker: no entries while PumpPortal
  refuses its trade subscriptions). Publishes ``order.requested|filled|rejected``,
  ``position.opened|updated|closed``, ``trading.state`` and ``trading.breaker``.
- Live, the holder announces its wallet to the feed (``feed.subscription`` with
  ``accounts``) as it takes over and every ``trading_live_announce_s``: the feed then
  streams the wallet's trades, which confirm the orders, even of a token whose trades
  the activity service unsubscribed (a quiet token, exactly when the exit service sells
  the rest of a position). Repeated, so a feed that restarted or took over without the
  store's copy learns it within the period.
- ``system.shutdown`` halts entries, then publishes ``trading.barrier`` (critical): the
  entry orders in flight and the positions held at that instant, which the exit
  service's graceful exit waits to have seen, however far behind its consumer is. It
  carries the shutdown's ``request_id``, which the ledger keeps with the halt, in its
  write (when stored fenced, the barrier being this replica's): a shutdown seen again
  under it (redelivered after a restart, a copy published again) halts nothing again,
  an operator's resume since standing, and publishes no second barrier. The ledger
  keeps too whether the barrier is out: a replica killed between the halt's write and
  the barrier's publication leaves it unpublished, and the replica trading next
  publishes it as it takes over (what it holds then), so the exit service's graceful
  exit does not wait ``exit_barrier_wait_s`` for it; killed after the publication and
  before saying so, the barrier goes out twice, which the exit service takes as one. A
  shutdown without a request id seen again halts again and publishes a barrier again
  (unless resumed since, below), which the exit service drops once the graceful exit is
  over. The ledger forgets a request ``shutdown_requests_kept_s`` after its halt, its
  barrier out; a shutdown requested longer ago than that is not applied, applied before
  or not (a copy of one forgotten would halt and bar again). Keyless, the shutdown and
  the feed's ``feed.trade_stream`` wait in trading's own queues (the group's, shared by
  its replicas: ``Subscription.shared_keyless``) while no replica trades or while the
  holder's broker connection is down, for the replica trading next, which applies them
  once it has reloaded the book, as if it had had them, and before it decides anything
  that queued on its partitions meanwhile: it consumes them only once it has caught up
  with those queues (``EventBus.catch_up``; the broker away, that waits for it), so a
  prediction queued behind a stop meets trading halted. A resume given since a shutdown
  was requested (stored after its time) stands: the shutdown is not applied.
- A lane's ready events in order: what they changed is written to the ledger in one
  transaction up to and including the first event that orders, then its orders go to
  the executor before the next event is decided on; the events are published once
  stored, the token views they changed are stored, and only then are the events
  acknowledged. An order whose id the ledger has already (derived from a redelivered
  event) is dropped, never sent.
- The keyed events (``order.*``, ``position.*``) carry a seq per mint, given by the
  ledger in the transaction that stores what they announce (see
  :mod:`pumpflow.trading.ledger`): the keyed consumer of the exit service drops a copy
  or a stale one by it, across restarts and take-overs, and an event published again
  (its commit retried, a withdrawn order told again) has the seq it had.
- ``trading.breaker`` and ``trading.state`` go through the ledger's outbox too, with what
  each last said: a replica taking over starts with every breaker clear (but the feed's,
  as last announced: only the feed's word recovers it) and its state computed afresh,
  and announces exactly where that differs from what was last announced
  (:meth:`TradingService._announce_start`), nothing where it does not. With Postgres
  away, those that store nothing else are told at once, stored once it is back
  (:meth:`TradingService._tell_unstored`).
- An exit's sale sells no more than its position holds less what the position's sales
  in flight ask for (:meth:`~pumpflow.common.trading.PositionBook.reserve_sale`), the
  sales a take-over finds in flight included; with nothing left, or ordered for a
  position that closed since (its token entered again), it is stored refused, never
  sent. A sale only ever sells the position it was ordered for: a take-over refuses one
  in flight for a position no longer held, and a fill of one (a trade showing late) is
  booked to no position, logged, counted (``pumpflow_trading_unbooked_trades``) and
  listed with the unbooked wallet trades (below), naming its order.
- Trading is stateful across tokens (capital, limits), so it is not partitioned:
  replicas campaign for the lease ``trading:decide`` (the state store's and
  Postgres's); the holder reloads the book from the ledger (once its predecessor stood
  by, or a while: :meth:`TradingService._await_predecessor`; from then on the ledger
  refuses the predecessor's commits): the fills of the positions open or closed within
  the daily loss limit's window, and every position's totals, so neither the book nor
  the reload grows with the weeks traded; it reconciles every order
  whose outcome is unknown, loads the token views its predecessor stored
  (:mod:`pumpflow.trading.context`), and only then consumes. The others stand by, ready,
  unsubscribed; one takes over within the lease's TTL of the holder's death. What a
  replica standing by could not store (Postgres away) it stores as it takes over again,
  before it reads the ledger, unless another replica read the ledger meanwhile: then it
  is that one's, as after a crash.
  Scaling further would shard the capital: N traders, each with its own lease, its
  1/N of the capital and limits, and the tokens split between them by mint hash.
- Timers on the injected clock (every ``trading_tick_s``, one loop a leadership
  term): orders due without a later trade, the breakers' silence and recoveries,
  the trading day, and the operator's state as the ledger holds it (a halt given to
  a stand-by, or to a replica taken over from, or stored by a predecessor).
- The kill switch: any replica takes a halt. Given to the replica that trades, it
  applies before the next event, Postgres or not, and is stored (fenced) for the other
  replicas and restarts, as soon as Postgres takes it; given to a stand-by, or meeting
  a take-over, it is stored unfenced, as the operator's state, and the replica trading
  applies it on its next tick. A resume is the holder's alone, stored first, and refused
  while Postgres is away. An unfenced halt stored late, after a newer resume, halts
  trading again: the safe failure, accepted (see :meth:`halt`). Neither answer waits for
  the broker past ``trading_halt_store_wait_s``: the state's announcement (and a resume
  behind a round that publishes) goes on as a task of its own, in order with what the
  replica publishes, and the answer says it is not published yet (``announced``).
- Live, a trade of the wallet that matches no order (made by hand, or a buy of ours
  that landed past its slippage after its answer never came: see
  :mod:`pumpflow.common.trading.live`) is not booked: it is logged, counted
  (``pumpflow_trading_unbooked_trades``), stored in the ledger with the change of the
  event that showed it and listed in ``unbooked_wallet_trades`` of ``/orders`` and
  ``/positions`` on every replica, as the wallet and the book differ by it, for a day
  or until the operator acknowledges it (``POST /unbooked/acknowledge``). A trade of
  the wallet that shows before the answer naming its order waits for the answers: it is
  stored with the change of the event that showed it (its delivery acknowledged then),
  so the replica trading next judges it as it takes over, should this one go first.
- Live, a buy booked past its limit check (the late fill of an order given up as
  unconfirmed, whose reservation was released then; or a fill dearer than its order
  reserved) that leaves a limit exceeded is logged as a warning naming the order, each
  limit and the excess, and counted by limit (``pumpflow_trading_fills_over_limit``).
  It is booked and not sold, and the limits refuse every entry that would add to the
  excess (argued in :mod:`pumpflow.common.trading.risk`); ``/limits`` lists each limit
  exceeded now, with its value and excess. No event is added for it: its
  ``order.filled`` and ``position.opened`` (or ``updated``) go out as any fill's, and
  they are what the exit service acts on; ``trading.state`` is not changed by it (only
  the entries adding to the excess are refused, not every entry) and ``trading.breaker``
  would halt every entry for the breaker's recovery time rather than until the
  exposure is back under the limit.
- HTTP: ``GET /positions``, ``/orders``, ``/pnl``, ``/state``, ``/limits``; a replica
  not trading answers ``/positions``, ``/pnl`` and ``/limits`` from the ledger
  (``source: ledger``; ``/orders`` is the ledger's everywhere), its own book being
  another's or an old term's;
  ``POST /halt``, ``/resume`` (the kill switch), ``/unbooked/acknowledge`` and ``PUT``,
  ``DELETE /limits`` (the operator's risk limits over the settings', stored in the
  ledger; a delete puts back the settings' all, or those named by ``?limit=NAME``)
  need the API token. Every replica takes a halt (above); only the replica that
  trades takes a resume, an acknowledgement or a change of the limits, its writes fenced
  in the ledger as its commits are (``trading_holder``): a stand-by, or a replica
  another took over from, refuses them (409, naming the holder when known), as a late
  one would undo what the holder was given since (a resume, a successor's halt).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Any, ClassVar

import msgspec
from prometheus_client import CollectorRegistry

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.clock import TimerHandle
from pumpflow.common.dependencies import wait_out
from pumpflow.common.events import (
    BarrierEntry,
    BarrierPosition,
    CircuitBreakerChanged,
    Event,
    ExitOrder,
    FeaturesUpdated,
    FeedSubscription,
    ModelPrediction,
    OrderFilled,
    OrderRejected,
    OrderRequested,
    ShutdownBarrier,
    SystemShutdown,
    TokenCreated,
    TokenLifecycle,
    TokenMigrated,
    TokenTrade,
    TradingStateChanged,
    make_event,
)
from pumpflow.common.lease import Claim, LeaderLease
from pumpflow.common.runtime.leases import lease_stores
from pumpflow.common.runtime.service import Service, ServiceContext
from pumpflow.common.runtime.settings import SettingsError
from pumpflow.common.text import counted
from pumpflow.common.trading import (
    SERVICE_CONSUMES,
    DecisionPolicy,
    EntrySpend,
    FillOverLimit,
    Holdings,
    Position,
    PositionBook,
    Reason,
    RiskLimits,
    RiskManager,
    TradingEngine,
    TradingState,
    UnbookedTrade,
    derived_id,
    live_entry_spend,
)
from pumpflow.common.trading.live import REMEMBERED_UNBOOKED
from pumpflow.common.trading.orders import rejected
from pumpflow.common.trading.paper import sell_order
from pumpflow.common.trading.positions import REALIZATIONS_KEPT_S
from pumpflow.trading.context import TokenContext
from pumpflow.trading.executor import Outcome, PaperExecutor, TradeExecutor
from pumpflow.trading.ledger import (
    UNBOOKED_KEPT_S,
    WITHDRAWN,
    Announced,
    Committed,
    KeyedEvent,
    Ledger,
    LedgerChange,
    LedgerTotals,
    MemoryLedger,
    OperatorLimit,
    OrderOutcome,
    OrderRecord,
    OrderState,
    PostgresLedger,
    Superseded,
)
from pumpflow.trading.live import LiveExecutor, TradeApi
from pumpflow.trading.metrics import TradingMetrics
from pumpflow.trading.settings import (
    OPERATOR_LIMITS,
    LimitValue,
    TradingSettings,
    limit_text,
    operator_limit_names,
    operator_limits,
)

log = logging.getLogger("pumpflow.trading")

#: one replica trades at a time
LEASE_NAME = "trading:decide"
_RETIRED = frozenset({"inactive", "graduated"})
#: isinstance with a union made once, not at every event
_TOKEN_EVENTS = TokenTrade | TokenCreated | TokenMigrated
_MARKET_EVENTS = TokenTrade | TokenMigrated
#: trading's announcements of its breakers and its state: keyless, kept in the outbox
_ANNOUNCEMENTS = CircuitBreakerChanged | TradingStateChanged
#: the events the engine folds into its view of a token
_CONTEXT = (
    TokenTrade,
    TokenCreated,
    TokenMigrated,
    FeaturesUpdated,
    TokenLifecycle,
    ModelPrediction,
)
#: why a prediction without a reason ordered nothing
_NO_ORDER = Reason.fixed("no order")
#: wall seconds between attempts to store a halt while Postgres is away (first, most)
_CONTROL_RETRY_S = (0.1, 2.0)
#: wall seconds between a take-over's reads of whether its predecessor stood by (first, most)
_PREDECESSOR_POLL_S = (0.02, 0.25)
#: how far back a take-over remembers the orders given up as unconfirmed, for a trade of
#: theirs the stream delivers late: a feed's backlog is minutes, not a day
_GIVEN_UP_KEPT_S = 86_400.0


def _exposure(totals: LedgerTotals, spend: EntrySpend) -> float:
    """The SOL at risk by the ledger: the open positions' cost and the most the entries
    in flight can spend (as :attr:`RiskManager.total_exposure` counts the book's)."""
    in_flight = spend.most(totals.entries_in_flight_sol, orders=totals.entries_in_flight)
    return totals.open_cost_sol + in_flight


def _measured(risk: RiskManager) -> dict[str, Any]:
    """What ``/limits`` says of ``risk``'s limits and what they measure now: the capital,
    the limits, the most an entry order of x SOL spends (x * ``factor`` + ``fixed_sol``),
    which its checks and its reservation read, the exposure and positions with the
    reservations in flight at that most, and each limit exceeded now (a late fill)."""
    reservations = [
        {"order_id": order_id, "mint": mint, "most_sol": most}
        for order_id, (mint, most) in risk.reservations.items()
    ]
    return {
        "capital_sol": risk.capital,
        "limits": asdict(risk.limits),
        "breakers": asdict(risk.breaker_settings),
        "entry_spend": asdict(risk.entry_spend),
        "exposure_sol": risk.total_exposure,
        "open_positions": risk.open_positions(),
        "orders_in_flight": len(reservations),
        "reservations": reservations,
        "exceeded": [
            {
                "limit": breach.limit,
                "mint": breach.mint,
                "value": breach.value,
                "cap": breach.cap,
                "excess": breach.excess,
                "text": str(breach),
            }
            for breach in risk.exceeded()
        ],
    }


def _utc(at: float) -> str:
    return f"{datetime.fromtimestamp(at, UTC):%Y-%m-%dT%H:%M:%SZ}"


def _outboxed(event: Event) -> bool:
    """Whether ``event`` is kept in the ledger's outbox until it is published: a keyed
    one, or an announcement of the breakers or the state."""
    return event.key is not None or isinstance(event.data, _ANNOUNCEMENTS)


def _order_event(event: Event, ids: set[str] | frozenset[str]) -> bool:
    """Whether ``event`` is the request or the refusal of one of the orders ``ids``."""
    data = event.data
    return isinstance(data, OrderRequested | OrderRejected) and data.order_id in ids


def _lapsing(claim: Claim | None) -> bool:
    """Whether no replica renews the lease ``claim``: nobody's, or its holder is late
    renewing it (killed, say), so trading passes to a stand-by once it runs out."""
    return claim is not None and (claim.holder is None or claim.late)


def _lease_passes(claim: Claim, campaign_s: float) -> str:
    """When trading passes to a stand-by, the lease ``claim`` being :func:`_lapsing`;
    stand-bys campaign every ``campaign_s`` (a third of the TTL: said in tenths, the
    latest in whole seconds up)."""
    every = f"{campaign_s:.1f}".removesuffix(".0")
    if not claim.late or claim.runs_out_in_s is None or claim.renewed_s_ago is None:
        return f"no replica holds its lease now, a stand-by takes it within {every} s"
    left = math.ceil(claim.runs_out_in_s)
    return (
        f"its lease's holder ({claim.holder}) has not renewed it for "
        f"{claim.renewed_s_ago:.0f} s (due every {every} s); unless it does, the lease "
        f"runs out in {left} s and a stand-by takes trading over within {every} s "
        f"after ({math.ceil(left + campaign_s)} s at the latest)"
    )


def _halted_unsent(reason: str) -> str:
    """Why an entry the operator's halt (for ``reason``) caught before it was sent is
    refused."""
    return f"halted before it was sent: {reason}"


class ControlNotStored(RuntimeError):
    """The operator's state could not be stored in the ledger, so it is not applied."""


class NotHolder(RuntimeError):
    """A resume or an acknowledgement of unbooked trades given to a replica that does not
    hold trading: it stands by, or another took over (:class:`Superseded`). Nothing of it
    is stored: give it to the holder. (A halt is taken anywhere: see
    :meth:`TradingService.halt`.)

    Waited out and handed back as :class:`Superseded` is, when a shutdown comes to a
    replica that does not hold trading, or whose halt met a take-over (the replica stands
    by at once): back in trading's queue, it goes to the holder."""

    transient_dependency = "lease"


class _Step:
    """What one event or timer round changed: the ledger's part, the orders to send, the
    events to publish once stored."""

    __slots__ = ("_change", "events", "refused", "requests", "starting")

    def __init__(self, *, starting: bool = False) -> None:
        #: made when first asked for: most events change nothing in the ledger
        self._change: LedgerChange | None = None
        self.events: list[Event] = []
        self.requests: dict[str, OrderRequested | ExitOrder] = {}
        #: sales refused before they were sent (nothing left to sell): stored refused
        self.refused: set[str] = set()
        #: the take-over's: the changes of its breakers and state are a fresh manager's,
        #: not the consumers' (see :meth:`TradingService._take_over`), and are not told
        self.starting = starting

    @property
    def change(self) -> LedgerChange:
        change = self._change
        if change is None:
            change = self._change = LedgerChange()
        return change

    def __bool__(self) -> bool:
        return bool(self.requests or self.refused or self.events or self._change)

    def guarded(self) -> set[str]:
        """The orders whose request and refusal are published only if the ledger inserts
        them (or holds them, withdrawn): one it has already is a redelivery's."""
        ids = {
            o.order_id
            for o in self.change.orders
            if o.order_id in self.requests or o.order_id in self.refused
        }
        ids.update(o.order_id for o in self.change.withdrawn)
        return ids

    def keyed(self) -> list[KeyedEvent]:
        """Its events kept in the outbox, for the ledger to number as it stores the step."""
        guarded = self.guarded()
        return [
            KeyedEvent(event=e, order_id=e.data.order_id if _order_event(e, guarded) else None)
            for e in self.events
            if _outboxed(e)
        ]

    def announced(self) -> list[CircuitBreakerChanged | TradingStateChanged]:
        """What its announcements of the breakers and the state say, in order."""
        return [e.data for e in self.events if isinstance(e.data, _ANNOUNCEMENTS)]


class TradingService(Service):
    """Decide entries, execute orders, keep the book and the ledger; one replica at a time."""

    name: ClassVar[str] = "trading"
    settings_class: ClassVar[type[TradingSettings]] = TradingSettings
    needs_store: ClassVar[bool] = True
    needs_db: ClassVar[bool] = True

    settings: TradingSettings

    def __init__(
        self,
        settings: TradingSettings,
        *,
        registry: CollectorRegistry | None = None,
        ledger: Ledger | None = None,
    ):
        super().__init__(settings)
        refusal = settings.live_refusal()
        if refusal is not None:
            raise SettingsError(refusal)
        self.metrics = TradingMetrics(registry=registry)
        self.metrics.executor(settings.trading_executor)
        self.ledger: Ledger | None = ledger
        self.leader: LeaderLease | None = None
        self._ctx: ServiceContext | None = None
        self._lock = asyncio.Lock()
        self._backlog: list[_Step] = []
        self._unpublished: list[Event] = []
        #: ids of keyed events published (or taken back unpublished) whose copies the
        #: ledger's outbox still holds: they go with its next change
        self._gone: list[str] = []
        #: announcements of the breakers and the state told while the ledger was away,
        #: unstored: what they said goes with its next change
        self._told_unstored: list[CircuitBreakerChanged | TradingStateChanged] = []
        #: events a call that failed left undecided: the next call decides them first
        self._undecided: list[Event] = []
        #: orders withdrawn unsent on standing by (since the last election)
        self._withdrawn = 0
        #: the ledger was told this replica holds it (since the last stand-by)
        self._holding = False
        #: shutdowns whose barrier is out (or queued to go)
        self._barriers: set[str] = set()
        #: each order's decision, unique to it (the ledger's ``attempt``)
        self._writer = uuid.uuid4().hex
        self._attempts = itertools.count(1)
        #: the stand-by a commit refused as superseded started (see :meth:`_superseded`)
        self._stepping_down: asyncio.Future | None = None
        self._subscription: Subscription | None = None
        self._subscribed = False
        self._leading = False
        self._stopped = False
        #: the leadership term: each stand-by ends one, and a tick of an earlier term
        #: neither acts nor schedules the next
        self._term = 0
        self._tick: TimerHandle | None = None
        #: the clock's monotonic() when the wallet was last announced to the feed
        self._announced_at: float | None = None
        #: the last operator's state given here, when (the clock's), and whether the
        #: ledger holds it yet
        self._control: tuple[TradingState, str] | None = None
        self._control_given_at = 0.0
        self._control_unstored = False
        #: why the last attempt to store it failed
        self._control_error = ""
        #: the halt given here is stored fenced (given while this replica traded: a
        #: replica taken over from is refused), else as the operator's, unfenced
        self._control_fenced = False
        #: the ledger refused the fenced write: another replica took over, and the halt
        #: is stored unfenced instead, for it
        self._control_refused: Superseded | None = None
        #: the shutdowns the halt given here applies (request id -> reason), stored with
        #: it when it is stored fenced (the barrier is this replica's)
        self._shutdowns_unstored: dict[str, str] = {}
        #: operator's states given here so far: a read of the ledger's from before the
        #: last one is not applied
        self._control_changes = 0
        #: one write of the operator's state at a time, in the order they were given
        self._control_lock = asyncio.Lock()
        self._control_writer: asyncio.Task | None = None
        #: the risk limits the operator set over the settings' (the ledger's, as read at
        #: the take-over and written since), by name
        self._operator_limits: dict[str, OperatorLimit] = {}
        #: one change of the limits at a time, stored then applied in the order given
        self._limits_lock = asyncio.Lock()
        #: the operator's states (applied, or to apply) and their announcements still
        #: waiting for the lock or the bus after their answers
        self._announcing: set[asyncio.Task] = set()
        #: an event is being published, not confirmed yet (what an announcement waits for)
        self._publishing = False
        #: steps at the front of the backlog in a commit under way
        self._storing = 0
        #: orders given back to the executor or settled on the last take-over
        self.reconciled: dict[str, str] = {}
        #: why predictions ordered nothing: their reasons, numbers left out
        self.skipped: Counter[str] = Counter()
        #: mints whose position closed since the next event or tick began: a retired
        #: token's view and market go then (not at the fill: the trade that filled the
        #: sale is folded in after it)
        self._closed: set[str] = set()
        self.book = PositionBook()
        self.risk: RiskManager | None = None
        self.engine: TradingEngine | None = None
        self.executor: TradeExecutor | None = None
        self.context: TokenContext | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def role(self) -> str:
        if self._stopped:
            return "stopped"
        return "active" if self._leading else "standby"

    async def start(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        log.log(*self.settings.executor_line())
        if self.ledger is None:
            if ctx.db is None:
                log.info("trading without a database: the ledger is in memory")
                self.ledger = MemoryLedger()
            else:
                self.ledger = PostgresLedger(
                    ctx.db, shutdowns_kept_s=self.settings.shutdown_requests_kept_s
                )
        stores = lease_stores(ctx)
        keep_views = self.settings.trading_keep_token_views
        if keep_views is None:
            # another replica can take over only where the lease is shared with it
            keep_views = any(store is ctx.store for store in stores)
        if keep_views and ctx.store is not None:
            self.context = TokenContext(
                ctx.store, ttl_s=self.settings.trading_context_ttl_s, settled=self._settled
            )
        self._build()
        self._subscription = Subscription(
            service=self.settings.service,
            patterns=SERVICE_CONSUMES,
            handler=self.on_event,
            batch_handler=self.on_events,
            window=self.settings.trading_window,
            # none as it subscribes: what waited in the shared queues goes first (see
            # _take_over); then every partition, trading being one decider, never
            # balanced between replicas
            partitions=(),
            # system.shutdown and feed.trade_stream wait in the group's queues while no
            # replica trades, for the one taking over (as declared: runtime.topology)
            shared_keyless=True,
        )
        self.leader = LeaderLease(
            stores,
            self.settings.lease_config(
                name=LEASE_NAME, holder=f"{self.settings.replica}:{uuid.uuid4().hex[:12]}"
            ),
            on_elected=self._take_over,
            on_lost=self._stand_by,
            on_resign=self._stand_by,
        )
        await self.leader.start()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._say_left_holding()
        if self.leader is not None:
            await self.leader.stop()
        if self._stepping_down is not None:
            await self._stepping_down
        await self._stand_by()
        self._stopped = True
        writer = self._control_writer
        if writer is not None and not writer.done():
            # one last chance, as long as a halt's answer waits
            await asyncio.wait({writer}, timeout=self.settings.trading_halt_store_wait_s)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        for announcing in list(self._announcing):
            # stood by above: what it would have published is the next holder's
            announcing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await announcing
        if self._control_unstored:
            log.error("trading: stopped with the operator's %s (%s) not stored: %s",
                      *self._control, self._control_error)  # fmt: skip
        if self._backlog or self._unpublished or self._control_unstored or self._told_unstored:
            raise RuntimeError(
                f"trading stopped with {len(self._backlog)} changes unstored, "
                f"{len(self._unpublished)} events unpublished"
                + (", the operator's state unstored" if self._control_unstored else "")
                + (
                    f", what {len(self._told_unstored)} announcements said unstored"
                    if self._told_unstored
                    else ""
                )
            )

    def _say_left_holding(self) -> None:
        """Warn, as the replica trading stops holding positions, that nothing of theirs
        executes until a replica trades again: on a bus that keeps no events past this
        process (an embedded run) none comes, and the run's own report says what is held."""
        ctx = self._ctx
        held = self.book.open_count
        if not self._leading or not held or ctx is None or not ctx.bus.durable:
            return
        log.warning("trading: stopping while it trades, holding %s (%.4f SOL): no order of "
                    "theirs executes, the exit's sales included, until a replica trades "
                    "again (a stand-by at once, else the next to start; their events wait in "
                    "the queues)",
                    counted(held, "position"), self.risk.total_exposure)  # fmt: skip

    def _build(self) -> None:
        """A fresh book, risk manager, engine and executor (the ledger refills them)."""
        ctx, s = self._ctx, self.settings
        assert ctx is not None
        live = s.trading_executor == "live"
        self.book = PositionBook(
            execution=s.execution(),
            sale_fee_sol=s.trading_live_priority_fee_sol if live else 0.0,
        )
        self.risk = RiskManager(
            s.trading_capital_sol,
            s.trading_max_risk_per_trade,
            s.trading_max_concurrent_positions,
            limits=s.limits(),
            breakers=s.breakers(),
            positions=self.book,
            entry_spend=self._entry_spend(),
            clock=ctx.clock,
        )
        self._apply_limits()
        self.engine = TradingEngine(
            None,
            self.book,
            self.risk,
            policy=DecisionPolicy(s.filters()),
            clock=ctx.clock,
            source=ctx.source,
            slippage_pct=s.trading_slippage_pct,
        )
        if live:
            self.executor = LiveExecutor(
                s.live_execution(),
                TradeApi(
                    s.trading_live_url, s.api_key() or "", timeout_s=s.trading_live_answer_timeout_s
                ),
                clock=ctx.clock,
                slippage_pct=s.trading_slippage_pct,
            )
        else:
            self.executor = PaperExecutor(s.execution())

    def _entry_spend(self) -> EntrySpend:
        """The most an entry order can spend, by the executor's rules (see
        :mod:`pumpflow.common.trading.risk`)."""
        s = self.settings
        if s.trading_executor == "live":
            return live_entry_spend(s.live_execution(), s.trading_slippage_pct)
        return EntrySpend()

    async def _take_over(self) -> None:
        """Reload the book, reconcile what is unknown, announce where the breakers and the
        state differ from what was last announced, then trade: first what waited in
        trading's shared queues (a stop, the feed's word), then the partitions.

        A failure of the ledger (Postgres away) fails it whole, not waited out: the lease
        is given up and campaigned for again. Nothing is held yet that a stand-by would
        lose, and a replica cut off from Postgres alone, waiting with the lease renewed
        in Redis, would keep every other from trading meanwhile. The catch-up with the
        shared queues is waited out while the broker is away (every replica would meet
        it so), never skipped: no partition is consumed before it.
        """
        ctx = self._ctx
        assert ctx is not None and self.ledger is not None
        async with self._lock:
            if self._backlog or self._gone or self._holding or self._told_unstored:
                # the last stand-by failed to store them: stored before the ledger is
                # read, an entry its lost commit stored reads withdrawn, not in flight
                await self._store_last_changes()
            self._build()
            self._undecided = []
            self._withdrawn = 0
            if self.context is not None:
                self.context.clear()
                self.engine.restore(await self.context.load())
            await self._await_predecessor()
            changes = self._control_changes
            # a store under way as the ledger is read may land after the read
            unstored = self._control_unstored
            snapshot = await self.ledger.load(
                remembered=self.settings.trading_remembered_orders,
                given_up_since=ctx.clock.now() - _GIVEN_UP_KEPT_S,
                # the positions closed earlier add nothing but to the totals
                closed_since=ctx.clock.now() - REALIZATIONS_KEPT_S,
                holder=self._writer,
            )
            self._holding = True
            self._operator_limits = await self.ledger.limits()
            self._apply_limits()
            if self._operator_limits:
                log.warning("trading: the operator's limits stored hold over the settings: %s",
                            self._limits_said())  # fmt: skip
            for fill in snapshot.fills:
                payload = fill.payload()
                self.book.apply_fill(payload, time=fill.filled_at, reason=fill.reason)
                self.executor.booked(fill)
                if self.engine.follow_fill(payload, fill.filled_at) and self.context is not None:
                    self.context.change(fill.mint)
            for mint, view in self.engine.views.items():
                self.executor.restore_market(mint, view.market)
            totals = snapshot.totals
            self.book.restore_totals(
                realized_pnl_sol=totals.realized_pnl_sol,
                closed_count=totals.closed_positions,
                closed_fees_sol=totals.closed_fees_sol,
            )
            for mint in list(self.book.open_positions):
                view = self.engine.views.get(mint)
                if view is not None and view.market.state is not None:
                    # as the predecessor valued it: a quiet token may never trade again
                    self.book.mark(
                        mint, view.market.state, time=ctx.clock.now(), venue=view.market.venue
                    )
            self._update_capital()
            for order_id in snapshot.order_ids:
                self.engine.sent_orders[order_id] = None
            self.engine.withdrawn.update(snapshot.withdrawn)
            control = snapshot.control
            if self._control is not None and (unstored or changes != self._control_changes):
                # given here and not stored before the ledger was read, or after it
                control = self._control
            if control is not None:
                # the state it starts in (nothing waits to be stored or sent yet): told
                # below, where it differs from what was last announced
                self.risk.set_state(*control)
            changes = self._control_changes
            step = _Step(starting=True)
            self.reconciled = {}
            for order in snapshot.unresolved:
                self._reconcile(order, step)
            for order in snapshot.given_up:
                self.executor.given_up(order)
            self.executor.restore_unbooked(
                await self.ledger.unbooked(since=self._unbooked_since(), limit=REMEMBERED_UNBOOKED)
            )
            for outcome in self.executor.restore_early(snapshot.early):
                self._book(outcome, None, step)
                self.reconciled[outcome.order_id] = "filled"
            self._keep_early(step)
            self._note_unbooked(step)
            # what the predecessor stored and may not have published goes out first, as
            # numbered (a copy of what it did publish is dropped by its seq)
            stored = {e.id for e in snapshot.outbox}
            # what this replica published in a term before and did not take out of the
            # outbox is in it still, read again: told gone now, an id of it would drop
            # what another holder stored under it since, before it is published
            self._gone = []
            self._unpublished = [
                *snapshot.outbox,
                *(e for e in self._unpublished if e.id not in stored),
            ]
            self._backlog.append(step)
            self._backlog.append(self._announce_start(snapshot.announced))
            # the barriers of shutdowns a predecessor halted on and died before publishing:
            # the exit service's graceful exit waits for them
            unpublished = await self.ledger.unpublished_barriers()
            for request_id, reason in unpublished:
                log.warning("trading: the barrier of system.shutdown %s (%s) is not out: "
                            "published as this replica takes over", request_id,
                            reason)  # fmt: skip
                self._backlog.append(self._barrier_step(reason, request_id, None))
            await self._flush()
            for request_id, _reason in unpublished:
                await self._barrier_out(request_id)
            if changes != self._control_changes:
                # given while the rest was read and stored: this replica starts halted, as
                # the answer said (announced with the next store)
                self._apply_control(*self._control)
            self._leading = True
            self.metrics.leading(True)
            self.metrics.book(self.book, self.risk)
            log.info(
                "trading: %s trades: %d open positions, %d orders reconciled, %d token views, "
                "state %s", self.leader.holder if self.leader else "?", self.book.open_count,
                len(self.reconciled), len(self.engine.views), self.risk.state,
            )  # fmt: skip
            self._schedule_tick()
        await ctx.bus.subscribe(self._subscription)
        self._subscribed = True
        # a stop, or the feed's refusal, that waited for this replica applies before
        # anything queued behind it on the partitions is decided
        began = time.monotonic()
        await wait_out(
            lambda: ctx.bus.catch_up(self._subscription),
            waiter=self.settings.service,
            what="applying what waited in trading's queues (system.shutdown, feed.trade_stream)",
        )
        # the operator's sign that what waited was applied, and in which state the
        # partitions' backlog is decided
        log.info(
            "trading: caught up with trading's shared queues (system.shutdown, "
            "feed.trade_stream) in %.1fs, state %s: consuming the partitions",
            time.monotonic() - began, self.risk.state,
        )  # fmt: skip
        await ctx.bus.consume_partitions(self._subscription, range(ctx.bus.partitions))
        self._announced_at = None
        await self._announce_wallet()

    def _announce_start(self, announced: Announced) -> _Step:
        """Tell what the breakers and the state in force (the daily loss limit's
        included) differ by from what was last announced (``announced``, the ledger's),
        and nothing where they do not: this replica starts with every breaker clear and
        its state computed afresh (its manager's changes so far, a fresh one's, are not
        the consumers'), while they heard the predecessor's last."""
        self.risk.check()
        self.risk.take_reports()
        step = _Step()
        holder = self.leader.holder if self.leader is not None else self.settings.replica
        reports = self.risk.announce_start(
            announced.state, announced.tripped, f"taken over by {holder}"
        )
        self._report(step, reports, cause=None)
        return step

    async def _await_predecessor(self) -> None:
        """Wait ``trading_predecessor_wait_s`` at most for the replica that traded before
        to stand by, when the ledger holds orders of its that may be unsent.

        Such an order may be an entry a commit stored while its reply was lost: never
        sent, and withdrawn as its replica stands by (then decided again here, under an
        id of its own). Read before that, it would look in flight: on paper it would fill,
        never sent; live, it would wait for its trade and end unconfirmed. A predecessor
        that does not stand by in time (dead, or cut off from Postgres) is fenced off by
        the load that follows: what it stored is taken as sent, as after a crash, and
        it can store nothing more, so it withdraws nothing behind this replica's back.
        """
        wait = self.settings.trading_predecessor_wait_s
        deadline = time.monotonic() + wait
        delay, most = _PREDECESSOR_POLL_S
        while True:
            found = await self.ledger.predecessor()
            if found is None or found.holder == self._writer or found.stood_by or not found.unsent:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "trading: the replica that traded before has not stood by within %gs: "
                    "the orders it stored are taken as sent, and it can store nothing more",
                    wait,
                )  # fmt: skip
                return
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, most)

    def _reconcile(self, order: OrderRecord, step: _Step) -> None:
        name = self.executor.name
        if order.executor != name:
            # paper would fill a live order at a price the chain never paid, and live
            # would take a wallet trade for a paper order's fill
            outcome: Outcome | None = rejected(
                order,
                f"recorded by the {order.executor} executor: the {name} one neither sends "
                "it nor learns its outcome",
            )
            if order.executor == "live":
                # the chain's: nothing here ever books its trade
                signature = order.signature or "not answered"
                log.warning(
                    "trading: live order %s (%s of %s, signature %s) was in flight when "
                    "live trading stopped; the %s executor rejects it: the live wallet may "
                    "hold its trade; check the wallet and settle it by hand", order.order_id,
                    order.side, order.mint, signature, name,
                )  # fmt: skip
        elif order.side == "sell" and (unheld := self.book.not_held(order.mint, order.position_id)):
            outcome = rejected(order, f"nothing to sell after the restart: {unheld}")
        else:
            outcome = self.executor.reconcile(order)
        if outcome is None:
            if order.side == "buy" and order.sol_amount:
                self.risk.reserve(order.order_id, order.mint, order.sol_amount)
            elif order.side == "sell":
                # its tokens are not for the next sale until its outcome
                self.book.resume_sale(order.order_id, order.mint, order.token_amount or 0.0)
            self.engine.order_reasons[order.order_id] = order.reason
            if order.state == "pending":
                step.change.outcomes.append(OrderOutcome(order_id=order.order_id, state="sent"))
            self.reconciled[order.order_id] = "resubmitted"
            return
        self.reconciled[order.order_id] = (
            "filled" if isinstance(outcome, OrderFilled) else ("rejected")
        )
        self._book(outcome, None, step, executed=False)
        if isinstance(outcome, OrderRejected):
            # refused here, yet it may have been sent, with its signature: should its
            # trade show, it is this order's late fill, as a given-up order's is
            self.executor.given_up(order)

    async def _stand_by(self) -> None:
        """Stop trading (the lease is lost, or the service stops): what was decided is
        stored and published first; the next holder reloads from the ledger."""
        leading, self._leading = self._leading, False
        self._term += 1
        self.metrics.leading(False)
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._subscribed and self._ctx is not None:
            self._subscribed = False
            await self._ctx.bus.unsubscribe(self._subscription)
        async with self._lock:
            withdrawn = self._withdraw_unsent()
            self._withdrawn += withdrawn
            if withdrawn:
                log.warning(
                    "trading: %d orders decided while the ledger failed are not sent: "
                    "their events were not acknowledged, and the next holder decides them "
                    "(those the ledger stored all the same are told refused, and an entry of "
                    "them ordered again there is under an id of its own)",
                    withdrawn,
                )
            try:
                if self.executor is not None:
                    await self.executor.close()
                    step = _Step()
                    step.change.outcomes += self.executor.progress()
                    if leading:
                        # fills the answers settled since the last round: their trades'
                        # deliveries are acknowledged, so the next holder never sees them
                        for outcome in self.executor.due(self._ctx.clock.now()):
                            self._book(outcome, None, step)
                        self._note_unbooked(step)
                    self._backlog.append(step)
                await self._store_last_changes()
            except Exception:
                log.exception(
                    "trading: storing the last changes failed; this replica stores them as "
                    "it takes over again, unless another has read the ledger meanwhile"
                )

    async def _store_last_changes(self) -> None:
        """Store what standing by leaves (the waiting steps, the events published, the
        stand-by itself), fenced as every write of this replica. Refused because another
        replica read the ledger since, it is left to that one: it decides the
        unacknowledged events again and publishes the outbox."""
        try:
            if self._told_unstored and not self._backlog:
                # what was told with the ledger away goes with a change of its own
                self._backlog.append(_Step())
            await self._flush()
            if self._gone:
                # the next holder would publish them again: copies, but needless
                await self.ledger.published(self._gone, holder=self._writer)
                self._gone = []
            if self._holding:
                # the next holder reads the ledger once it knows the withdrawals are in it
                await self.ledger.stood_by(self._writer)
                self._holding = False
        except Superseded:
            log.warning(
                "trading: another replica took over before the last %d changes were "
                "stored: they are left to it", len(self._backlog),
            )  # fmt: skip
            self._backlog = []
            self._unpublished = []
            self._told_unstored = []
            self._holding = False

    def _withdraw_unsent(self) -> int:
        """Take the orders out of the steps waiting to be stored (none of them sent: a
        holder stores an order before it sends it); how many. A replica that stands by
        sends nothing: the next holder, which may hold the lease already and has read the
        ledger, would never know of an order sent now. A failed commit may have stored
        them all the same (its reply lost): those rows are settled refused, and their
        requests and refusals published, since the next holder takes an order the ledger
        holds for a copy (the exit, told nothing, would wait for its sale's outcome for
        ever); an order the ledger does not hold is neither inserted nor told of, its
        event decided again there. An entry settled withdrawn is decided again there too
        (the ledger's load names it), under an id derived from its own, which is taken."""
        withdrawn: list[OrderRecord] = []
        told: list[Event] = []
        for step in self._backlog:
            if not step.requests and not step.refused:
                continue
            ids = step.requests.keys() | step.refused
            for order in step.change.orders:
                if order.order_id in step.refused:
                    withdrawn.append(order)  # stored refused already, its refusal with it
                elif order.order_id in ids:
                    withdrawn.append(replace(order, state="rejected", outcome=WITHDRAWN))
            told += [e for e in step.events if _order_event(e, ids)]
            step.change.orders = [o for o in step.change.orders if o.order_id not in ids]
            step.events = [e for e in step.events if not _order_event(e, ids)]
            step.requests = {}
            step.refused = set()
        if withdrawn:
            step = _Step()
            step.change.withdrawn = withdrawn
            now = self._ctx.clock.now()
            for order in withdrawn:
                said = [e for e in told if e.data.order_id == order.order_id]
                step.events += said
                if not any(isinstance(e.data, OrderRejected) for e in said):
                    step.events.append(
                        make_event(
                            rejected(order, WITHDRAWN),
                            source=self._ctx.source,
                            time=now,
                            cause=said[0] if said else None,
                            event_id=derived_id("outcome", order.order_id),
                        )
                    )
            self._backlog.append(step)
        return len(withdrawn)

    # ---------------------------------------------------------------- events

    async def on_event(self, event: Event) -> None:
        """Apply one consumed event; acknowledged once its changes are stored and published."""
        await self.on_events((event,))

    async def on_events(self, events: Sequence[Event]) -> None:
        """Apply a lane's ready events in delivery order; acknowledged once all their changes
        are stored and published, the token views they changed in one write.

        The lock is held across the run of events between shutdowns, so a later batch of
        the same lane (the bus starts it while this one waits for the views' write) applies
        after every event of this one.
        """
        run: list[Event] = []
        for event in events:
            if isinstance(event.data, SystemShutdown):
                await self._apply_run(run)
                run = []
                if event.id in self._barriers:
                    # handed back after its barrier, as a later event of its batch or the
                    # barrier's store failed: acknowledged once the barrier is out
                    if self._leading:
                        async with self._lock:
                            await self._flush()
                        await self._barrier_out(event.data.request_id)
                    continue
                if not self._leading:
                    raise NotHolder(f"shutdown {event.id}: this replica does not hold "
                                    "trading; handed back for the holder")  # fmt: skip
                request_id = event.data.request_id
                if request_id is not None and await self._shutdown_applied(request_id):
                    # an operator's resume since stands, and the barrier is out already
                    log.info("trading: system.shutdown %s (%s): its halt is stored already; "
                             "not halted again, no second barrier", request_id,
                             event.data.reason)  # fmt: skip
                    continue
                now = self._ctx.clock.now()
                if self.settings.shutdown_too_old(event.time, now):
                    log.warning("trading: system.shutdown %s (%s) was requested %.0f s ago, "
                                "longer ago than a request is kept (shutdown_requests_kept_s):"
                                " not applied", request_id, event.data.reason,
                                now - event.time)  # fmt: skip
                    continue
                if await self._resumed_since(event):
                    log.warning("trading: system.shutdown %s (%s) was requested before the "
                                "operator's last resume: the resume stands, not applied",
                                request_id, event.data.reason)  # fmt: skip
                    continue
                # the exit service sells what is held; nothing new may be bought meanwhile
                await self.halt(f"shutdown: {event.data.reason}", shutdown=event.data)
                if self._control_refused is not None:
                    # no barrier from a book no longer the ledger's: the halt is stored
                    # for the holder, which takes the shutdown handed back, and bars
                    raise NotHolder(f"shutdown {event.id}: another replica took trading "
                                    "over; handed back for the holder")  # fmt: skip
                await self._barrier(event)
            else:
                run.append(event)
        await self._apply_run(run)
        if self.context is not None and events:
            # outside the lock: the events handled meanwhile share the write
            await self.context.save(self.engine.views)

    async def _shutdown_applied(self, request_id: str) -> bool:
        """Whether the shutdown request ``request_id`` was applied: halted on here, or its
        halt stored (by this replica or one before it). Not known within
        ``trading_halt_store_wait_s`` (Postgres away): False, as halting again is safe."""
        if request_id in self._shutdowns_unstored:
            return True
        try:
            async with asyncio.timeout(self.settings.trading_halt_store_wait_s):
                return await self.ledger.shutdown_applied(request_id)
        except Exception as exc:
            log.warning("trading: whether system.shutdown %s was applied is not known (%s: "
                        "%s); halting on it", request_id, type(exc).__name__, exc)  # fmt: skip
            return False

    async def _resumed_since(self, shutdown: Event) -> bool:
        """Whether the operator's resume stored was given after ``shutdown`` was requested
        (it waited in trading's queue meanwhile: published while no replica traded, or
        behind a take-over's start): the resume stands. Not known within
        ``trading_halt_store_wait_s`` (Postgres away): False, as halting is safe."""
        try:
            async with asyncio.timeout(self.settings.trading_halt_store_wait_s):
                return await self.ledger.resumed_after(shutdown.time)
        except Exception as exc:
            log.warning("trading: whether a resume was given since system.shutdown %s is not "
                        "known (%s: %s); halting on it", shutdown.data.request_id,
                        type(exc).__name__, exc)  # fmt: skip
            return False

    async def _apply_run(self, events: list[Event]) -> None:
        """Decide on each event in order, storing their changes in one transaction up to
        and including the first event that orders, then sending its orders before the
        next event is decided on.

        An order is sent only once it is stored, so a kill -9 leaves no order sent that
        the ledger does not hold (the next holder reconciles it) and a redelivered event's
        order, already held, is never sent again. The changes of events that order
        nothing wait for the next store: nothing leaves the process before they are
        stored, and none is acknowledged before the run's end. An order must be in the
        executor's hands before the next event is decided on: the executor finds the
        order's outcome in the token's next trade (the paper fill after its latency, the
        wallet's trade for a live order), and an outcome known at once (a refusal) releases
        the order's reservation and counts toward the execution breaker, which the next
        decision's risk checks read. So a store ends each event that orders.

        The events a call that raised left undecided are decided first by the next call:
        the bus hands them back one at a time, and a later batch of their lane may run
        before that, whose later events of a token would have its view refuse them (by
        their seq) as redeliveries.
        """
        if not events:
            return
        async with self._lock:
            if self._undecided:
                # delivered before these
                held = {e.id for e in self._undecided}
                events = [*self._undecided, *(e for e in events if e.id not in held)]
                self._undecided = []
            taken = 0
            try:
                # what an earlier attempt could not store goes first, its orders sent
                await self._flush()
                for event in events:
                    # one whose decision raised is not taken up again: alone, it costs itself
                    taken += 1
                    step = self._decide(event)
                    # most events change nothing to store, send or publish
                    if step:
                        self._backlog.append(step)
                    if step.requests:
                        await self._flush()
                await self._flush()
            except Exception:
                self._undecided = events[taken:]
                raise

    @contextlib.asynccontextmanager
    async def _settled(self) -> AsyncIterator[None]:
        """Hold the decisions while the token views are read for the state store, what
        they changed stored in the ledger first: a view stored ahead of the ledger has
        the next holder refuse the event as a redelivery, its change (a fill) lost."""
        async with self._lock:
            if self._leading:
                await self._flush()
            elif self._backlog or self._withdrawn:
                # stood by with changes the ledger lacks (unstored, or orders withdrawn):
                # nothing is sent from here any more, the next holder decides them again
                raise RuntimeError("trading stood by with changes unstored: views not stored")
            yield

    def _decide(self, event: Event) -> _Step:
        """Apply one event to the engine and executor: what it changed, what to send."""
        step = _Step()
        self._forget_closed()
        progressed = self.executor.progress()
        if progressed:
            step.change.outcomes += progressed
        data = event.data
        if isinstance(data, ExitOrder):
            self._exit(event, step)
            return step
        if not self.engine.admit(event):
            # a redelivery: the executor's market, the views and the breakers have it
            return step
        if isinstance(data, _TOKEN_EVENTS):
            for outcome in self.executor.observe(data, time=event.time):
                self._book(outcome, event, step)
            self._keep_early(step)
            self._note_unbooked(step)
        produced = self.engine.process(event, admitted=True)
        if isinstance(data, _MARKET_EVENTS) and data.mint not in self.engine.views:
            # a graduate's pool trade the engine keeps no view for: nor its market here
            self.executor.forget(data.mint)
        elif self.context is not None and isinstance(data, _CONTEXT):
            if not (isinstance(data, ModelPrediction) and data.shadow):
                self.context.change(data.mint)
        ordered = False
        for out in produced:
            if isinstance(out.data, OrderRequested):
                self._request(out.data, event, step)
                ordered = True
        if isinstance(data, ModelPrediction):
            self.metrics.prediction(ordered)
            if self.engine.last_latency_s is not None:
                self.metrics.receipt_to_decision(self.engine.last_latency_s)
            if not ordered:
                self._note_skip()
        self._report(step, (), cause=event, produced=produced)
        if isinstance(data, TokenLifecycle) and data.state in _RETIRED:
            if not self.book.holds(data.mint):
                self.executor.forget(data.mint)
        return step

    def _forget_closed(self) -> None:
        """The views and markets of retired tokens whose positions closed since the last
        call go (the store's copy with the next write of the views)."""
        if not self._closed:
            return  # every event asks: most find nothing closed
        closed, self._closed = self._closed, set()
        for mint in closed:
            if self.engine.forget_retired(mint):
                self.executor.forget(mint)
                if self.context is not None:
                    self.context.change(mint)

    async def _barrier(self, shutdown: Event) -> None:
        """Tell the exit service, past any backlog, what the halt leaves it to wait for:
        the entries in flight and the positions held (published after their events)."""
        async with self._lock:
            self._backlog.append(
                self._barrier_step(shutdown.data.reason, shutdown.data.request_id, shutdown)
            )
            # out with this flush or the next: the shutdown coming again sends no second one
            self._barriers.add(shutdown.id)
            await self._flush()
        await self._barrier_out(shutdown.data.request_id)

    def _barrier_step(self, reason: str, request_id: str | None, cause: Event | None) -> _Step:
        """The step publishing the barrier of a shutdown: the entries in flight and the
        positions held now."""
        barrier = ShutdownBarrier(
            reason=reason,
            entries=tuple(
                BarrierEntry(order_id=order_id, mint=mint)
                for order_id, (mint, _size) in self.risk.reservations.items()
            ),
            positions=tuple(
                BarrierPosition(position_id=p.position_id, mint=p.mint)
                for p in self.book.open_positions.values()
            ),
            request_id=request_id,
        )
        step = _Step()
        now = self._ctx.clock.now()
        step.events.append(make_event(barrier, source=self._ctx.source, time=now, cause=cause))
        # what the exit service's graceful exit waits for: the operator follows it here
        log.info("trading: the barrier of system.shutdown %s (%s) goes out: %d entries in "
                 "flight, %d positions held", request_id, reason, len(barrier.entries),
                 len(barrier.positions))  # fmt: skip
        return step

    async def _barrier_out(self, request_id: str | None) -> None:
        """Tell the ledger the barrier of shutdown request ``request_id`` is out; failing
        that, the next take-over publishes it again, a copy the exit service takes as one."""
        if request_id is None:
            return
        try:
            await self.ledger.barrier_published(request_id)
        except Exception as exc:
            log.warning("trading: the barrier of system.shutdown %s is out, and the ledger "
                        "could not store so (%s: %s): the next replica to take over "
                        "publishes it again", request_id, type(exc).__name__, exc)  # fmt: skip

    def _keep_early(self, step: _Step) -> None:
        """Keep in the ledger the trades of the live wallet that began to wait for their
        orders' answers: their deliveries are acknowledged with the step, and the answer
        may never reach this replica (killed, or taken over from)."""
        early = self.executor.early()
        if early:
            step.change.early += early

    def _note_unbooked(self, step: _Step) -> None:
        """Say so of each trade of the live wallet found to match no order, and keep it
        in the ledger: the wallet and the book differ by it, and only the operator can
        tell whose it was."""
        for trade in self.executor.unbooked():
            step.change.unbooked.append(trade)
            self.metrics.unbooked("wallet_trade")
            if trade.candidates:
                whose = (
                    f"it may be order {', '.join(trade.candidates)}, whose answer never came, "
                    "landed at a price past its slippage, or a trade made by hand"
                )
            else:
                whose = "no order of its token and side awaits its trade: made by hand?"
            log.error(
                "trading: the live wallet's %s %s of %g tokens of %s (%g SOL before fees) "
                "matches no order: the wallet and the book differ by it; %s",
                trade.side, trade.signature, trade.tokens, trade.mint, trade.sol, whose,
            )  # fmt: skip

    def _unbooked_since(self) -> float:
        return self._ctx.clock.now() - UNBOOKED_KEPT_S

    async def unbooked_view(self, mint: str | None = None) -> list[dict[str, Any]]:
        """The latest trades of the live wallet that matched no order and are not
        acknowledged (of ``mint``, if given), newest first, as the ledger keeps them."""
        found = await self.ledger.unbooked(since=self._unbooked_since(), limit=REMEMBERED_UNBOOKED)
        return [
            {**asdict(trade), "candidates": list(trade.candidates)}
            for trade in reversed(found)
            if mint is None or trade.mint == mint
        ]

    async def acknowledge_unbooked(self, signatures: Sequence[str] | None) -> dict[str, Any]:
        """Forget the unbooked trades ``signatures`` (all when None): the operator has
        seen to them (booked by hand, or known to be hand trades). Only the replica that
        trades takes it, fenced as a commit is (:class:`NotHolder` elsewhere)."""
        if not self._leading:
            raise await self._not_holder("acknowledge")
        try:
            acknowledged = await self.ledger.acknowledge_unbooked(signatures, holder=self._writer)
        except Superseded as exc:
            self._superseded()
            raise await self._not_holder("acknowledge", exc) from exc
        which = "" if signatures is None else f": {', '.join(signatures)}"
        log.warning("trading: %d unbooked trades of the live wallet acknowledged%s",
                    acknowledged, which)  # fmt: skip
        return {"acknowledged": acknowledged, "unbooked_wallet_trades": await self.unbooked_view()}

    def _note_skip(self) -> None:
        """Count why a prediction ordered nothing, each reason by its kind."""
        decision = self.engine.last_decision
        if decision is None:
            return  # a shadow arm's
        for reason in decision.reasons or (_NO_ORDER,):
            self.skipped[reason.kind] += 1

    def _exit(self, event: Event, step: _Step) -> None:
        """A sale the exit service ordered: stored, then executed (never twice), for no
        more than the position holds less what its sales in flight ask for."""
        order: ExitOrder = event.data
        if order.order_id in self.engine.sent_orders:
            self.metrics.order("sell", "duplicate")
            return
        self.engine.sent_orders[order.order_id] = None
        # the exit's sales overlap (a rule's and a tranche, a tranche retried): the venue
        # sells whatever it is asked, held or not
        reserved = self.book.reserve_sale(
            order.order_id, order.mint, order.token_amount, position_id=order.position_id
        )
        if reserved and reserved.tokens != order.token_amount:
            order = msgspec.structs.replace(order, token_amount=reserved.tokens)
        request = sell_order(order)
        step.events.append(
            make_event(
                request,
                source=self._ctx.source,
                time=self._ctx.clock.now(),
                cause=event,
                event_id=derived_id("outcome", f"request:{order.order_id}"),
            )
        )
        if not reserved:
            self._refuse(request, reserved.reason, event, step)
            return
        self.engine.order_reasons[order.order_id] = order.reason
        self._request(request, event, step, original=order)

    def _refuse(self, request: OrderRequested, reason: str, cause: Event, step: _Step) -> None:
        """Refuse a sale before it is sent: stored refused, never reconciled nor sent; its
        request and refusal are published once stored, unless the ledger had its id."""
        step.events.append(
            make_event(
                rejected(request, reason),
                source=self._ctx.source,
                time=self._ctx.clock.now(),
                cause=cause,
                event_id=derived_id("outcome", request.order_id),
            )
        )
        step.refused.add(request.order_id)
        self._record(request, cause, step, state="rejected", outcome=reason)

    def _request(
        self,
        request: OrderRequested,
        cause: Event,
        step: _Step,
        *,
        original: OrderRequested | ExitOrder | None = None,
    ) -> None:
        step.requests[request.order_id] = original or request
        self._record(request, cause, step)

    def _record(
        self,
        request: OrderRequested,
        cause: Event,
        step: _Step,
        *,
        state: OrderState = "sent",
        outcome: str = "",
    ) -> None:
        venue, market = self.executor.expected(request.mint)
        step.change.orders.append(
            OrderRecord.of(
                request,
                cause_id=cause.id,
                executor=self.executor.name,
                state=state,
                requested_at=self._ctx.clock.now(),
                venue=venue,
                expected=market,
                outcome=outcome,
                attempt=f"{self._writer}:{next(self._attempts)}",
            )
        )

    def _book(
        self, outcome: Outcome, cause: Event | None, step: _Step, *, executed: bool = True
    ) -> None:
        """An order's outcome: to the engine (book, limits, breakers) and the ledger
        (``executed``: see :meth:`TradingEngine.process`)."""
        ctx = self._ctx
        now = ctx.clock.now()
        event = make_event(
            outcome,
            source=ctx.source,
            time=now,
            cause=cause,
            event_id=derived_id("outcome", outcome.order_id),
        )
        reason = self.engine.order_reasons.get(outcome.order_id, "")
        unheld = (
            isinstance(outcome, OrderFilled)
            and outcome.side == "sell"
            and outcome.order_id not in self.book.applied_orders
            and self.book.not_held(outcome.mint, outcome.position_id)
        )
        produced = self.engine.process(event, executed=executed)
        step.events.append(event)
        self._report(step, (), cause=cause, produced=produced)
        for over in self.engine.take_fills_over_limit():
            self._note_over_limit(over)
        side = outcome.side or "buy"
        if isinstance(outcome, OrderFilled):
            if self.context is not None:
                # a paper fill moved its token's market in the view
                self.context.change(outcome.mint)
            step.change.record_outcome(
                outcome,
                time=now,
                reason=reason,
                position=None if unheld else self._position(outcome.mint),
            )
            if unheld:
                self.metrics.unbooked("sale_of_closed_position")
                if outcome.signature is not None:
                    # listed with the wallet's unbooked trades: the wallet sold tokens the
                    # book does not hold
                    step.change.unbooked.append(
                        UnbookedTrade(
                            signature=outcome.signature,
                            mint=outcome.mint,
                            side="sell",
                            tokens=outcome.token_amount,
                            sol=outcome.sol_amount + outcome.fee_sol,
                            time=now,
                            order_id=outcome.order_id,
                        )
                    )
                log.error(
                    "trading: sale %s of position %s filled (%g tokens, signature %s) with "
                    "nothing of its position left to sell: %s; booked to no position",
                    outcome.order_id, outcome.position_id, outcome.token_amount,
                    outcome.signature, unheld,
                )  # fmt: skip
            if not self.book.holds(outcome.mint):
                self._closed.add(outcome.mint)
            self.metrics.order(side, "filled")
            self.metrics.fill(side, outcome.sol_amount, outcome.fee_sol)
            self._update_capital()
        else:
            step.change.record_outcome(outcome, time=now)
            self.metrics.order(side, "rejected")
            log.info("trading: order %s rejected: %s", outcome.order_id, outcome.reason)

    def _note_over_limit(self, over: FillOverLimit) -> None:
        """Say so of a buy booked past its limit check that left limits exceeded: counted
        by limit, logged naming its order, each limit and the excess. Booked, not sold
        (argued in :mod:`pumpflow.common.trading.risk`); the limits refuse every entry
        that would add to it."""
        fill = over.fill
        for breach in over.breaches:
            self.metrics.over_limit(breach.limit)
        if over.reserved is None:
            why = "its order was given up, its reservation released: booked past its limit check"
        else:
            why = f"its order reserved {over.reserved:.4f} SOL"
        log.warning(
            "trading: the fill of order %s (%g tokens of %s for %.4f SOL, signature %s; %s) "
            "leaves %s; the wallet holds the tokens, so it is booked, no entry is admitted "
            "while over the limit, and the exit's rules sell the position as any other",
            fill.order_id, fill.token_amount, fill.mint, fill.sol_amount, fill.signature, why,
            "; ".join(str(b) for b in over.breaches),
        )  # fmt: skip

    def _report(
        self, step: _Step, reports, *, cause: Event | None, produced: list[Event] | None = None
    ) -> None:
        """Add produced events (and bare reports, wrapped) to the step; log and count them."""
        if not reports and not produced:
            return
        events = list(produced or ())
        now = self._ctx.clock.now()
        for payload in reports:
            events.append(
                make_event(
                    payload,
                    source=self._ctx.source,
                    time=now,
                    cause=cause,
                )
            )
        for event in events:
            data = event.data
            if step.starting and isinstance(data, _ANNOUNCEMENTS):
                continue
            if isinstance(data, CircuitBreakerChanged):
                self.metrics.breaker(data.breaker, data.tripped)
                log.warning(
                    "trading: breaker %s %s: %s",
                    data.breaker, "tripped" if data.tripped else "recovered", data.reason,
                )  # fmt: skip
            elif isinstance(data, TradingStateChanged):
                self.metrics.state(data.state)
                log.warning(
                    "trading: state %s -> %s: %s", data.previous_state, data.state, data.reason
                )
            step.events.append(event)

    def _position(self, mint: str) -> Position | None:
        position = self.book.position(mint)
        if position is not None:
            return position
        for closed in reversed(self.book.closed_positions):
            if closed.mint == mint:
                return closed
        return None

    def _update_capital(self) -> None:
        self.risk.update_capital(self._capital(self.book.realized_pnl_sol))

    def _capital(self, realized_pnl_sol: float) -> float:
        """The capital the limits are fractions of, after ``realized_pnl_sol``."""
        return max(0.0, self.settings.trading_capital_sol + realized_pnl_sol)

    # ---------------------------------------------------------------- storing and sending

    async def _flush(self) -> None:
        """Store the waiting steps in one transaction, then send each one's new orders and
        queue its events, in order; store what sending learnt the same way; publish."""
        while self._backlog:
            steps = list(self._backlog)
            self._storing = len(steps)
            for step in steps:
                # as the step stands now: a halt or a stand-by may have taken events out
                step.change.events = step.keyed()
                step.change.announced = step.announced()
            gone = list(self._gone)
            joined = LedgerChange.joined([s.change for s in steps])
            change = replace(
                joined,
                gone=gone,
                announced=[*self._told_unstored, *joined.announced],
                holder=self._writer,
            )
            try:
                committed = await self.ledger.commit(change)
            except Exception as exc:
                self._storing = 0
                if isinstance(exc, Superseded):
                    self._superseded()
                if self.risk.operator_state is TradingState.HALTED:
                    # a halt given during this commit left its entries to it: unstored,
                    # they are refused as any entry waiting for the ledger then (stored
                    # all the same, its reply lost, the retry settles their rows refused)
                    refused = self._refuse_unsent_entries(self.risk.operator_reason)
                    if refused:
                        log.warning("trading: %d entries whose store failed after the halt "
                                    "are refused", refused)  # fmt: skip
                if isinstance(exc, Superseded) or not (self._leading and change.announces_only):
                    raise
                await self._tell_unstored(steps, change, exc)
                break
            finally:
                self._storing = 0
            if change:
                del self._gone[: len(gone)]
                self._told_unstored = []
            del self._backlog[: len(steps)]
            for step in steps:
                await self._send(step, committed)
        await self._publish()

    async def _tell_unstored(
        self, steps: list[_Step], change: LedgerChange, exc: Exception
    ) -> None:
        """Tell the announcements of ``steps``, which store nothing else, though the ledger
        failed to store them (``exc``: Postgres away): the state in force applies at once
        (a halt, whatever Postgres does), and so is it told, as are the breakers. What they
        said (``change``'s) goes with the next change; a replica that takes over before
        that compares what it starts with to what was stored before them."""
        del self._backlog[: len(steps)]
        self._told_unstored = list(change.announced)
        told = 0
        for step in steps:
            told += len(step.announced())
            await self._send(step, Committed())
        if told:
            log.warning("trading: %d announcements of the breakers or the state told unstored, "
                        "the ledger failing (%s: %s); stored with its next change",
                        told, type(exc).__name__, exc)  # fmt: skip

    def _superseded(self) -> None:
        """Stand by at once: another replica took over the ledger, which stores nothing
        of this one any more, while the lease's loss may show only a TTL later (its
        events would wait that long, each timed round refused meanwhile)."""
        if not self._leading or self.leader is None:
            return
        if self._stepping_down is not None and not self._stepping_down.done():
            return
        # not awaited: standing by takes the lock the refused commit's caller holds
        self._stepping_down = asyncio.ensure_future(
            self.leader.step_down("another replica took over the ledger")
        )

    async def _send(self, step: _Step, committed: Committed) -> None:
        # a withdrawn order is told of only where the ledger holds it (see _withdraw_unsent)
        dropped = step.guarded() - committed.inserted
        follow: _Step | None = None
        for order in step.change.orders:
            request = step.requests.get(order.order_id)
            refused = order.order_id in step.refused
            if request is None and not refused:
                continue  # refused unsent by a halt: stored as such
            side = order.side
            if order.order_id in dropped:
                # the ledger has it already: an event that came again, never sent twice
                self.risk.release(order.order_id)
                self.book.release_sale(order.order_id)
                self.metrics.order(side, "duplicate")
                log.info("trading: order %s is in the ledger already: not sent", order.order_id)
                continue
            if refused:
                self.metrics.order(side, "rejected")
                self.metrics.sale_refused()
                log.info("trading: order %s refused: %s", order.order_id, order.outcome)
                continue
            if isinstance(request, OrderRequested) and (
                self.risk.operator_state is TradingState.HALTED
            ):
                # a halt came while its store was under way: stored as sent, never sent
                if follow is None:
                    follow = _Step()
                self._refuse_stored_entry(request, follow)
                continue
            self.metrics.order(side, "sent")
            if isinstance(request, ExitOrder):
                outcome = await self.executor.start_exit(request, time=order.requested_at)
            else:
                outcome = await self.executor.start_entry(request, time=order.requested_at)
            if outcome is not None:
                if follow is None:
                    follow = _Step()
                self._book(outcome, None, follow)
        seqs = committed.seqs
        self._unpublished += [
            e if e.key is None else msgspec.structs.replace(e, seq=seqs.get(e.id))
            for e in step.events
            if not _order_event(e, dropped)
        ]
        if follow is not None and (follow.change or follow.events):
            self._backlog.append(follow)

    def _refuse_stored_entry(self, request: OrderRequested, step: _Step) -> None:
        """Refuse an entry the ledger stored as sent after the operator's halt came, before
        it reached the executor: its capital released, its refusal stored and told (the
        halt, not the executor, refused it: no failed execution)."""
        reason = _halted_unsent(self.risk.operator_reason)
        self.risk.release(request.order_id)
        step.change.outcomes.append(
            OrderOutcome(order_id=request.order_id, state="rejected", outcome=reason)
        )
        step.events.append(
            make_event(
                rejected(request, reason),
                source=self._ctx.source,
                time=self._ctx.clock.now(),
                event_id=derived_id("outcome", request.order_id),
            )
        )
        self.metrics.order(request.side, "rejected")
        log.warning("trading: entry %s stored as the halt came is refused, not sent: %s",
                    request.order_id, reason)  # fmt: skip

    async def _publish(self) -> None:
        bus = self._ctx.bus
        while self._unpublished:
            event = self._unpublished[0]
            self._publishing = True
            try:
                await bus.publish(event)
            finally:
                self._publishing = False
            self._unpublished.pop(0)
            if _outboxed(event):
                self._gone.append(event.id)

    # ---------------------------------------------------------------- timers

    def _schedule_tick(self) -> None:
        if self._leading and not self._stopped:
            self._tick = self._ctx.clock.call_later(
                self.settings.trading_tick_s, functools.partial(self._on_tick, self._term)
            )

    async def _on_tick(self, term: int) -> None:
        """One timed round of the term ``term``; the next one scheduled while it lasts.

        A round that was waiting (for Postgres, for the lock) while the lease went and
        came back belongs to the term before: the new term's take-over scheduled its own
        round, so this one does nothing and schedules nothing (two loops would run every
        check twice, at once).
        """
        if term != self._term:
            return
        try:
            changes = self._control_changes
            # a store under way as the ledger is read may land after the read
            unstored = self._control_unstored
            control = await self.ledger.control()
            async with self._lock:
                if term != self._term:
                    return
                # the ledger's is older than one given here meanwhile, or than one not
                # stored before it was read
                current = changes == self._control_changes and not unstored
                if (
                    current
                    and control is not None
                    and (
                        control[0] is not self.risk.operator_state
                        or control[1] != self.risk.operator_reason
                    )
                ):
                    # given to another replica: applied as if given here, before what
                    # waits for the ledger is stored and sent (a halt refuses its entries)
                    self._apply_control(*control)
                await self._flush()
                step = _Step()
                step.change.outcomes += self.executor.progress()
                self._forget_closed()
                for outcome in self.executor.due(self._ctx.clock.now()):
                    self._book(outcome, None, step)
                self._note_unbooked(step)
                self._report(step, (), cause=None, produced=self.engine.tick())
                self._backlog.append(step)
                await self._flush()
                self.metrics.book(self.book, self.risk)
            if self.context is not None and self.context.changed:
                # the views the fills due moved (outside the lock, as an event's)
                await self.context.save(self.engine.views)
        except Superseded:
            pass  # standing by already, the lease's loss logged with why
        except Exception:
            log.exception("trading: the timed checks failed; next round in %gs",
                          self.settings.trading_tick_s)  # fmt: skip
        finally:
            if term == self._term:
                await self._announce_wallet()
                self._schedule_tick()

    async def _announce_wallet(self) -> None:
        """Ask the feed for the live wallet's trades, if live and due; a failure waits for
        the next round (the feed keeps a wallet it was given once)."""
        ctx, settings = self._ctx, self.settings
        if settings.trading_executor != "live" or not self._leading or ctx is None:
            return
        now = ctx.clock.monotonic()
        due = self._announced_at is None or (
            now - self._announced_at >= settings.trading_live_announce_s
        )
        if not due:
            return
        command = FeedSubscription(
            action="subscribe",
            mints=(),
            accounts=(settings.trading_live_wallet,),
            reason="live wallet",
        )
        try:
            await ctx.bus.publish(make_event(command, source=ctx.source, time=ctx.clock.now()))
        except Exception:
            log.exception("trading: announcing the live wallet to the feed failed; next round")
            return
        self._announced_at = now

    # ---------------------------------------------------------------- the kill switch

    async def halt(
        self, reason: str = "kill switch", *, shutdown: SystemShutdown | None = None
    ) -> dict[str, Any]:
        """Halt entries (exits go on): at once here, then stored for the others
        (``shutdown``: the shutdown it applies, whose request id is stored with it when
        stored fenced, so the shutdown seen again halts nothing again).

        The kill switch must work when things break, Postgres included. When this
        replica trades, the halt applies before its next decision, without waiting for
        the ledger or for a decision under way, and the entries decided but not sent yet
        (waiting for the ledger) are refused: stored as such, never sent. Then it is
        stored, so that another replica taking over and a restart keep it; with
        Postgres away it is retried until it is back, never dropped, and meanwhile
        neither a tick nor a take-over here puts the ledger's older state back.

        Any replica takes it: an operator in an emergency cannot be asked to find the
        holder first. Given to the replica trading, it is stored fenced, as a commit is;
        if another took over meanwhile (the ledger refuses it as superseded), it is
        stored unfenced instead, in one line of the log, so the new holder halts too.
        Given to a stand-by, it applies nothing there and is stored unfenced, as the
        operator's state, not a replica's book: the replica trading reads it from the
        ledger on its next tick (every ``trading_tick_s``) and halts as if given there,
        before that round stores and sends what waits for the ledger (its entries are
        refused, its sales sent). A halt is the safe direction, so its one risk is
        accepted: stored late (retried while Postgres was away), after a newer resume, it
        halts trading again.

        The answer waits ``trading_halt_store_wait_s`` at most for the store, and as long
        again for the halt's announcement (a broker blocking publishers holds it; it goes
        out once the broker takes it): ``stored`` says whether the ledger holds the halt,
        ``announced`` (where this replica announces it) whether it is published,
        ``detail`` what that means and which replica applies it (the holder named when
        the lease store says; when its holder is late renewing it, or none holds it, that
        whichever replica holds trading next starts halted, and by when at the latest).
        """
        state = TradingState.HALTED
        leading = self._leading
        self._given(state, reason, fenced=leading)
        if leading and shutdown is not None and shutdown.request_id is not None:
            self._shutdowns_unstored[shutdown.request_id] = shutdown.reason
        if leading:
            self._apply_control(state, reason)
        writer = self._control_writer
        if writer is None or writer.done():
            writer = self._control_writer = asyncio.create_task(
                self._store_control(), name="trading:control"
            )
        await asyncio.wait({writer}, timeout=self.settings.trading_halt_store_wait_s)
        stored = not self._control_unstored
        announcing = None
        if stored and self._leading and self._control_refused is None:
            begun = asyncio.get_running_loop().create_future()
            announcing = self._announce(self._announce_control(begun))
            # the announcement waits for the bus (a broker blocking publishers, short of
            # memory or disk), the answer no longer than for the ledger: the halt is in
            # force and stored
            await asyncio.wait({announcing}, timeout=self.settings.trading_halt_store_wait_s)
        detail = await self._halt_detail(stored, leading)
        body = {**self.state_view(), "stored": stored, "detail": detail}
        if announcing is not None:
            body["announced"], said = self._announcement(announcing, begun)
            body["detail"] = f"{detail}; {said}"
        return body

    def _announce(self, work: Coroutine[Any, Any, str | None]) -> asyncio.Task:
        """Run ``work`` (the operator's state announced) as a task of its own: an answer
        waits for it no longer than its bound, and it goes on after the answer."""
        announcing = asyncio.create_task(work, name="trading:announce")
        self._announcing.add(announcing)
        announcing.add_done_callback(self._announcing.discard)
        return announcing

    async def _announce_control(self, begun: asyncio.Future) -> str | None:
        """Store and publish what waits, the operator's state announced with it, in the
        order of every round (under the lock, ``begun`` once held); None once it is out,
        else why not."""
        async with self._lock:
            begun.set_result(True)
            return await self._flush_control()

    async def _flush_control(self) -> str | None:
        """:meth:`_flush`, the lock held, for the operator's state: None once it is out,
        else why not (the next round publishes what is left)."""
        try:
            await self._flush()
        except Superseded:
            # standing by already: what is left is the next holder's
            log.warning("trading: the operator's %s is stored; this replica no longer holds "
                        "trading, so its announcement is left to the holder",
                        self._control[0])  # fmt: skip
            return "this replica no longer holds trading: the replica taking over announces it"
        except Exception as exc:
            log.exception("trading: publishing the operator's %s failed; the next round does",
                          self._control[0])  # fmt: skip
            return f"it failed ({type(exc).__name__}: {exc}): the next round publishes it"
        finally:
            self.metrics.book(self.book, self.risk)
        return None

    def _announcement(self, announcing: asyncio.Task, begun: asyncio.Future) -> tuple[bool, str]:
        """Whether the operator's state is announced (``announcing`` is its announcement,
        ``begun`` done once it holds the lock), and what the answer says of it."""
        said = "its announcement (trading.state)"
        if not announcing.done():
            why, then = self._unannounced(begun)
            return False, f"{said} is not published yet: {why}; {then}"
        failed = announcing.result()
        if failed is not None:
            return False, f"{said} is not published: {failed}"
        return True, f"{said} is published"

    def _unannounced(self, begun: asyncio.Future) -> tuple[str, str]:
        """Why the operator's state is not announced yet (``begun``: its announcement
        holds the lock, else a round under way does), and when it is, in words."""
        wait = self.settings.trading_halt_store_wait_s
        if self._publishing:
            # the lock's holder publishes: the broker has not confirmed it
            why, then = self._ctx.bus.why_unconfirmed(), "it goes out once the broker takes it"
        elif begun.done():
            why = f"its store in the ledger has not ended within {wait:g} s"
            then = "it goes out once it has"
        else:
            why = f"it has not ended within {wait:g} s (it stores, or sends, first)"
            then = "it goes out right after"
        if not begun.done():
            why = f"the round under way comes first, and {why}"
        return why, then

    async def resume(self, reason: str = "resumed") -> dict[str, Any]:
        """Resume entries: stored first, then applied here; refused (:class:`NotHolder`)
        unless this replica trades, as a halt is.

        Refused (:class:`ControlNotStored`) while Postgres is away, and while a halt
        given here is not stored yet: resumed here alone, this replica would trade while
        the ledger says halted (or is about to), which a replica taking over, a restart
        and this one's next tick would undo. Trading stays halted until Postgres is back.

        Once stored, it applies here as the round under way ends (under the lock, so a
        halt given meanwhile stands), and is announced in order with what that round
        publishes. The answer waits ``trading_halt_store_wait_s`` at most for both (a
        broker blocking publishers holds the announcement, and the round before it; they
        go out once the broker takes them): ``announced`` says whether it is published,
        ``detail`` whether it applies here yet and what it waits for.
        """
        state = TradingState.ACTIVE
        if not self._leading:
            raise await self._not_holder("resume")
        if self._control_unstored:
            raise ControlNotStored(
                f"not resumed: the halt given here ({self._control[1]}) is not stored yet, "
                "as the ledger (Postgres) is unavailable "
                f"({self._control_error or 'no answer yet'}); trading "
                "stays halted: resume once Postgres is back and the halt is stored"
            )
        before = self._control_changes
        try:
            async with self._control_lock:
                await self.ledger.set_control(
                    state, reason, holder=self._writer, now=self._ctx.clock.now()
                )
        except Superseded as exc:
            self._superseded()
            raise await self._not_holder("resume", exc) from exc
        except Exception as exc:
            raise ControlNotStored(
                "not resumed: the ledger (Postgres) is unavailable "
                f"({type(exc).__name__}: {exc}); trading stays as it is: resume once "
                "Postgres is back"
            ) from exc
        standing = "resume stored; a halt given since stands"
        if before != self._control_changes:
            # a halt given meanwhile is stored after this, and stands
            return {**self.state_view(), "detail": standing}
        self._control_changes += 1
        mine = self._control_changes
        self._control = (state, reason)
        stood_by = (
            "resume stored; this replica has stood by since (its lease lost): the replica "
            "taking over applies it"
        )
        if not self._leading:
            return {**self.state_view(), "detail": stood_by}
        applied = asyncio.get_running_loop().create_future()
        announcing = self._announce(self._resume_here(mine, applied))
        # the resume is stored: the answer waits for it to apply and be announced no
        # longer than a halt's (a round under way, or the broker, may hold them)
        await asyncio.wait({announcing}, timeout=self.settings.trading_halt_store_wait_s)
        if not applied.done():
            why, _ = self._unannounced(applied)
            return {
                **self.state_view(),
                "announced": False,
                "detail": f"resume stored; not applied in this replica yet: {why}; it "
                "applies and is announced right after",
            }
        if not applied.result():
            return {**self.state_view(), "detail": standing if self._leading else stood_by}
        announced, said = self._announcement(announcing, applied)
        detail = f"resumed in this replica at once and stored; {said}"
        return {**self.state_view(), "announced": announced, "detail": detail}

    async def _resume_here(self, mine: int, applied: asyncio.Future) -> str | None:
        """Apply the resume stored as the ``mine``-th operator's state, unless a later one
        stands, then announce it (``applied`` says which, once the lock is held); as
        :meth:`_announce_control`."""
        async with self._lock:
            if mine != self._control_changes or not self._leading:
                # a halt given while this waited for the round under way stands; or this
                # replica stood by meanwhile, and the next holder reads it in the ledger
                applied.set_result(False)
                return None
            self._apply_control(*self._control)
            applied.set_result(True)
            return await self._flush_control()

    def _limits_over(self, stored: Mapping[str, OperatorLimit]) -> RiskLimits:
        """The settings' limits with the operator's ``stored`` over them."""
        return replace(
            self.settings.risk_limits(), **{name: given.value for name, given in stored.items()}
        )

    def _apply_limits(self) -> None:
        """Decide by the settings' limits with the operator's over them, from the next
        decision on; export them."""
        limits = self._limits_over(self._operator_limits)
        self.risk.set_limits(limits)
        self.metrics.limits(limits, OPERATOR_LIMITS)

    def _limits_said(self) -> str:
        """The operator's limits in words: each value, its setting's, why and when."""
        settings = self.settings.risk_limits()
        return "; ".join(
            f"{name}={limit_text(stored.value)} (settings "
            f"{limit_text(getattr(settings, name))}; {stored.reason}, at "
            f"{_utc(stored.changed_at)})"
            for name, stored in sorted(self._operator_limits.items())
        )

    async def change_limits(
        self, values: Mapping[str, LimitValue | None] | None, reason: str
    ) -> None:
        """Set the risk limits ``values`` (checked: :func:`operator_limits`) over the
        settings' (a value None: that limit back to its setting; None: back to the
        settings' all): stored first, fenced as a commit is, then applied here for the next
        decision. Refused (:class:`NotHolder`) unless this replica trades,
        (:class:`ControlNotStored`) while Postgres is away: a change applied here alone
        would be undone by a restart or a take-over."""
        reset = values is None or all(value is None for value in values.values())
        what = "limits reset" if reset else "limits change"
        if not self._leading:
            raise await self._not_holder(what)
        async with self._limits_lock:
            now = self._ctx.clock.now()
            try:
                await self.ledger.set_limits(values, reason, holder=self._writer, now=now)
            except Superseded as exc:
                self._superseded()
                raise await self._not_holder(what, exc) from exc
            except Exception as exc:
                raise ControlNotStored(
                    f"{what} not stored: the ledger (Postgres) is unavailable "
                    f"({type(exc).__name__}: {exc}); the limits stay as they are"
                ) from exc
            before = self.risk.limits
            if values is None:
                self._operator_limits = {}
            else:
                for name, value in values.items():
                    if value is None:
                        self._operator_limits.pop(name, None)
                    else:
                        self._operator_limits[name] = OperatorLimit(
                            value=value, reason=reason, changed_at=now
                        )
            async with self._lock:
                # between two decisions, as an event's round ends
                self._apply_limits()
            changed = ", ".join(
                f"{name} {limit_text(getattr(before, name))} -> "
                f"{limit_text(getattr(self.risk.limits, name))}"
                for name in OPERATOR_LIMITS
                if getattr(before, name) != getattr(self.risk.limits, name)
            )
            self.metrics.limit_change("reset" if reset else "set")
            log.warning("trading: %s by the operator (%s): %s", what, reason,
                        changed or "no value changed")  # fmt: skip

    def _sources(self, limits: RiskLimits, stored: Mapping[str, OperatorLimit]) -> dict:
        """Where each limit an operator may change comes from: the settings, or the
        operator (why, when)."""
        settings = self.settings.risk_limits()
        sources = {}
        for name in OPERATOR_LIMITS:
            given = stored.get(name)
            sources[name] = {
                "value": getattr(limits, name),
                "source": "settings" if given is None else "operator",
                "settings": getattr(settings, name),
                "reason": None if given is None else given.reason,
                "changed_at": None if given is None else given.changed_at,
            }
        return sources

    async def _claim_now(self) -> Claim | None:
        """The lease as its stores have it, when known within a second."""
        leader = self.leader
        if leader is None:
            return None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                return await leader.claim()
        return None

    async def _holder_now(self, claim: Claim | None = None) -> str | None:
        """The replica holding trading by the lease store (``claim``, else read now), when
        another than this one and known."""
        claim = claim or await self._claim_now()
        if claim is None or self.leader is None:
            return None
        # this one: the ledger has another, whose lease is not seen yet
        return None if claim.holder == self.leader.holder else claim.holder

    async def _not_holder(self, what: str, refused: Superseded | None = None) -> NotHolder:
        """The refusal of ``what`` on a replica that does not hold trading (``refused``:
        the ledger's, another having taken over), naming the holder when known; when
        none renews the lease (its holder killed, say), when trading passes to a
        stand-by, to be given there then."""
        leader = self.leader
        claim = await self._claim_now()
        current = await self._holder_now(claim)
        me = leader.holder if leader is not None else self.settings.replica
        if refused is None and leader is not None and leader.is_leader:
            return NotHolder(
                f"{what} not recorded: this replica ({me}) is taking trading over and does "
                "not trade yet: give it again in a moment"
            )
        why = "another replica took over" if refused is not None else "it stands by"
        if leader is not None and _lapsing(claim):
            # stored here, it would apply late, over what a holder that comes back was
            # given since: the replica trading next takes it
            return NotHolder(
                f"{what} not recorded: this replica ({me}) does not hold trading ({why}); "
                f"{_lease_passes(claim, leader.config.interval_s)}: give it to the replica "
                "that holds trading then (`pumpflow trading state` names it)"
            )
        held = f"{current} holds it" if current else "the holder is not known here"
        return NotHolder(
            f"{what} not recorded: this replica ({me}) does not hold trading ({why}); "
            f"{held}: give it there"
        )

    def _given(self, state: TradingState, reason: str, *, fenced: bool) -> None:
        self._control = (state, reason)
        self._control_given_at = self._ctx.clock.now()
        self._control_unstored = True
        self._control_fenced = fenced
        self._control_refused = None
        self._control_changes += 1
        self.metrics.operator_state(False)

    async def _store_control(self) -> None:
        """Store the operator's halt given here until the ledger takes it (retried while
        Postgres is away): the replica trading, another taking over and a restart read it
        there. Fenced when given while this replica traded; refused so (another took
        over), it is stored unfenced at once, for the new holder to apply."""
        delay, most = _CONTROL_RETRY_S
        failed = False
        while self._control_unstored:
            control, given_at = self._control, self._control_given_at
            holder = self._writer if self._control_fenced else None
            shutdowns = dict(self._shutdowns_unstored if self._control_fenced else {})
            try:
                async with self._control_lock:
                    await self.ledger.set_control(
                        *control, holder=holder, shutdowns=shutdowns, now=given_at
                    )
            except Superseded as exc:
                self._control_refused = exc
                self._control_fenced = False
                # the holder applies its own copies, and publishes their barriers
                self._shutdowns_unstored.clear()
                self._superseded()
                log.warning(
                    "trading: the operator's %s (%s) met a take-over (this replica no longer "
                    "holds trading): stored unfenced for the holder, which applies it on its "
                    "next round", *control,
                )  # fmt: skip
                continue
            except Exception as exc:
                self._control_error = f"{type(exc).__name__}: {exc}"
                if not failed:
                    log.warning("trading: the operator's %s (%s) is not stored: %s; retrying",
                                *control, self._control_error)  # fmt: skip
                failed = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, most)
                continue
            for request_id in shutdowns:
                self._shutdowns_unstored.pop(request_id, None)
            if self._control is control:
                # a later one given meanwhile is stored next
                self._control_unstored = False
                self._control_error = ""
                self.metrics.operator_state(True)
        if failed:
            log.warning("trading: the operator's %s (%s) is stored", *self._control)

    def _apply_control(self, state: TradingState | str, reason: str) -> None:
        """Apply the operator's state in this replica, trading: its announcement queued,
        and a halt refuses the entries decided before it and not sent yet (sales go on).
        One way whether it was given here or read from the ledger (given to another
        replica), and before anything waiting for the ledger is stored and sent."""
        self.risk.set_state(state, reason)
        step = _Step()
        self._report(step, self.risk.take_reports(), cause=None)
        self._backlog.append(step)
        if self.risk.operator_state is TradingState.HALTED:
            refused = self._refuse_unsent_entries(reason)
            if refused:
                log.warning("trading: %d entries decided before the halt and not sent yet "
                            "are refused", refused)  # fmt: skip

    def _refuse_unsent_entries(self, reason: str) -> int:
        """Refuse the entries waiting for the ledger (decided, neither stored nor sent):
        stored refused, their capital released; how many. The steps of a commit under
        way are left alone: if it stores them as sent, :meth:`_send` refuses them before
        the executor has them; if it fails, :meth:`_flush` refuses them then."""
        refused = 0
        for step in self._backlog[self._storing :]:
            ids = {i for i, r in step.requests.items() if isinstance(r, OrderRequested)}
            if not ids:
                continue
            for order_id in ids:
                del step.requests[order_id]
                self.risk.release(order_id)
                self.metrics.order("buy", "rejected")
            step.change.orders = [
                replace(o, state="rejected", outcome=_halted_unsent(reason))
                if o.order_id in ids
                else o
                for o in step.change.orders
            ]
            kept = []
            for e in step.events:
                if isinstance(e.data, OrderRequested) and e.data.order_id in ids:
                    # a commit whose reply was lost may have stored it: never published now
                    self._gone.append(e.id)
                else:
                    kept.append(e)
            step.events = kept
            refused += len(ids)
        return refused

    async def _halt_detail(self, stored: bool, leading: bool) -> str:
        """What the halt's answer means: where it applies, whether the ledger holds it
        (``leading``: this replica traded when it was given)."""
        if leading and self._control_refused is None:
            if self._leading:
                done = "halted in this replica at once"
            else:
                # taken while it traded: its lease went while the halt was stored
                done = "halted in this replica, which has stood by since (its lease lost)"
            if stored:
                after = "" if self._leading else "; the replica taking over applies it"
                return f"{done}; stored, so other replicas and a restart keep it{after}"
            return (
                f"{done}; NOT stored yet: the ledger (Postgres) is unavailable "
                f"({self._control_error or 'no answer yet'}); stored as soon as it is back "
                "(retried meanwhile), until then a replica taking over or a restart does not "
                "know of it" + ("" if self._leading else ": halt the replica trading now")
            )
        if not leading and self.leader is not None and self.leader.is_leader:
            # elected, and not trading yet: the take-over applies it (given after its
            # read of the ledger, or unstored)
            done = "not applied here yet: this replica is taking trading over and applies it "
            done += "as it starts"
            if stored:
                return f"{done}; stored, so other replicas and a restart keep it"
            return (
                f"{done}; NOT stored yet: the ledger (Postgres) is unavailable "
                f"({self._control_error or 'no answer yet'}); stored as soon as it is back "
                "(retried meanwhile)"
            )
        # the replica trading applies it from the ledger
        claim = await self._claim_now()
        holder = await self._holder_now(claim)
        trading = f"the replica trading ({holder})" if holder else "the replica trading"
        if leading:
            done = ("halted in this replica at once, but another replica took trading over "
                    "meanwhile")  # fmt: skip
        else:
            done = "not applied here: this replica stands by"
        if stored and _lapsing(claim):
            return (
                f"{done}; stored, so whichever replica holds trading next starts halted, and "
                f"a restart keeps it: {_lease_passes(claim, self.leader.config.interval_s)}"
            )
        if stored:
            return (
                f"{done}; stored, so {trading} applies it on its next round (within "
                f"{self.settings.trading_tick_s:g} s), and a restart keeps it"
            )
        return (
            f"{done}; NOT stored yet: the ledger (Postgres) is unavailable "
            f"({self._control_error or 'no answer yet'}); stored as soon as it is back "
            f"(retried meanwhile), until then {trading} does not know of it: halt it there"
        )

    # ---------------------------------------------------------------- reads

    def state_view(self) -> dict[str, Any]:
        """The trading state, as this replica's risk manager holds it."""
        risk = self.risk
        return {
            "role": self.role,
            "source": "book",
            "executor": self.settings.trading_executor,
            "state": risk.state.value,
            "reason": risk.state_reason(),
            "operator_state": risk.operator_state.value,
            "operator_reason": risk.operator_reason,
            # False while the operator's state given here waits for Postgres
            "operator_state_stored": not self._control_unstored,
            "daily_loss_limit_hit": risk.daily_loss_hit,
            "breakers": {
                name: {"tripped": b.tripped, "reason": b.reason, "last_fault": b.last_fault}
                for name, b in risk.breakers.items()
            },
        }

    async def trading_state_view(self) -> dict[str, Any]:
        """``/state``: the risk manager's on the replica trading (:meth:`state_view`);
        elsewhere the operator's state as the ledger holds it (the holder applies it by
        its next round), its own being no one's in force. The state in force and what
        else sets it, the breakers and the daily loss limit, are the holder's alone:
        unknown here (None)."""
        if self._leading:
            return self.state_view()
        control = await self.ledger.control()
        # none stored: no operator has given one, and every replica starts active
        operator_state, operator_reason = control or (TradingState.ACTIVE, "")
        return {
            **await self._standing_by(),
            "executor": self.settings.trading_executor,
            "state": None,
            "reason": None,
            "operator_state": TradingState(operator_state).value,
            "operator_reason": operator_reason,
            # False while a halt given here waits for Postgres: the ledger's is older
            "operator_state_stored": not self._control_unstored,
            "daily_loss_limit_hit": None,
            "breakers": None,
        }

    def pnl(self) -> dict[str, Any]:
        """The book's PnL, as the replica trading holds it."""
        book = self.book
        realized, unrealized = book.realized_pnl_sol, book.unrealized_pnl_sol
        return {
            "role": self.role,
            "source": "book",
            "capital_sol": self.risk.capital,
            "starting_capital_sol": self.settings.trading_capital_sol,
            "realized_pnl_sol": realized,
            "unrealized_pnl_sol": unrealized,
            "pnl_sol": realized + unrealized,
            "fees_sol": book.fees_sol,
            "open_positions": book.open_count,
            "closed_positions": book.closed_count,
            "exposure_sol": self.risk.total_exposure,
            "no_order_reasons": dict(self.skipped.most_common(8)),
        }

    def limits(self) -> dict[str, Any]:
        """The limits and what they are measured on, as the replica trading holds them."""
        return {
            "role": self.role,
            "source": "book",
            **_measured(self.risk),
            "sources": self._sources(self.risk.limits, self._operator_limits),
            "sales_in_flight": len(self.book.sales),
        }

    async def pnl_view(self) -> dict[str, Any]:
        """``/pnl``: the book's on the replica trading (:meth:`pnl`); elsewhere what the
        ledger adds up to, its book being another's, or an old term's. The ledger keeps
        no marks: the unrealised PnL of open positions is the holder's alone (none open,
        none to mark), and the reasons predictions ordered nothing are counted where
        they are decided."""
        if self._leading:
            return self.pnl()
        totals = await self.ledger.totals()
        realized = totals.realized_pnl_sol
        unrealized = None if totals.open_positions else 0.0
        return {
            **await self._standing_by(),
            "capital_sol": self._capital(realized),
            "starting_capital_sol": self.settings.trading_capital_sol,
            "realized_pnl_sol": realized,
            "unrealized_pnl_sol": unrealized,
            "pnl_sol": None if unrealized is None else realized,
            "fees_sol": totals.open_fees_sol + totals.closed_fees_sol,
            "open_positions": totals.open_positions,
            "closed_positions": totals.closed_positions,
            "exposure_sol": _exposure(totals, self.risk.entry_spend),
        }

    async def limits_view(self) -> dict[str, Any]:
        """``/limits``: the book's on the replica trading (:meth:`limits`); elsewhere
        measured on what the ledger holds (entries and sales in flight: its orders whose
        outcome is not known yet), by a risk manager of the settings' limits (the same
        in every replica) holding its open positions and reserving its entries in flight
        as the holder does."""
        if self._leading:
            return self.limits()
        totals = await self.ledger.totals()
        exposure = await self.ledger.exposure()
        stored = await self.ledger.limits()
        limits = self._limits_over(stored)
        risk = RiskManager(
            self._capital(totals.realized_pnl_sol),
            limits.max_risk_per_trade,
            limits.max_concurrent_positions,
            limits=limits,
            breakers=self.risk.breaker_settings,
            positions=Holdings(exposure.open_cost_sol),
            entry_spend=self.risk.entry_spend,
            clock=self._ctx.clock,
        )
        for entry in exposure.entries_in_flight:
            if entry.sol_amount:  # as a take-over reserves them
                risk.reserve(entry.order_id, entry.mint, entry.sol_amount)
        return {
            **await self._standing_by(),
            **_measured(risk),
            "sources": self._sources(limits, stored),
            "sales_in_flight": totals.sales_in_flight,
        }

    async def _standing_by(self) -> dict[str, Any]:
        """What a view of a replica not trading says of itself: read from the ledger, and
        the replica trading (named when the lease store says)."""
        return {"role": self.role, "source": "ledger", "holder": await self._holder_now()}

    @staticmethod
    def position_view(position: Position) -> dict[str, Any]:
        return {
            **position.payload_fields(),
            "opened_at": position.opened_at,
            "closed_at": position.closed_at,
            "close_reason": position.close_reason,
            "fees_sol": position.fees_sol,
            "mark_value_sol": position.mark_value_sol,
            "marked_at": position.marked_at,
            "pnl_sol": position.pnl_sol,
        }

    @staticmethod
    def closed_view(row: dict[str, Any]) -> dict[str, Any]:
        """A closed position's ledger row as :meth:`position_view` shows it (it holds
        nothing: nothing unrealised, and worth nothing; when it was marked last the
        ledger does not keep)."""
        return {
            **row,
            "unrealized_pnl_sol": 0.0,
            "mark_value_sol": 0.0,
            "marked_at": None,
            "pnl_sol": row["realized_pnl_sol"],
        }

    async def positions(self, *, open_only: bool = True, limit: int = 1000) -> dict[str, Any]:
        """Positions: the book with its marks on the trading replica (the closed ones
        before the latest it keeps from the ledger), the ledger elsewhere."""
        unbooked = await self.unbooked_view()
        if not self._leading:
            rows = await self.ledger.positions(open_only=open_only, limit=limit)
            return {
                "role": self.role,
                "source": "ledger",
                "count": len(rows),
                "positions": rows,
                "unbooked_wallet_trades": unbooked,
            }
        book = self.book
        found = list(book.open_positions.values())
        if not open_only:
            found += book.closed_positions
        views = [self.position_view(p) for p in found]
        if not open_only:
            # the book's are the newer: the ledger may lack their last change yet
            known = {p.position_id for p in found}
            rows = await self.ledger.positions(open_only=False, limit=limit)
            views += [
                self.closed_view(row)
                for row in rows
                if row["closed_at"] is not None and row["position_id"] not in known
            ]
        views.sort(key=lambda v: v["opened_at"], reverse=True)
        del views[limit:]
        return {
            "role": self.role,
            "source": "book",
            "count": len(views),
            "positions": views,
            "unbooked_wallet_trades": unbooked,
        }

    def router(self):
        from fastapi import APIRouter, Body, Depends, HTTPException, Query
        from fastapi.encoders import jsonable_encoder
        from fastapi.responses import JSONResponse

        from pumpflow.common.runtime.http import listed, reason_of, require_token

        api = APIRouter()
        guarded = [Depends(require_token)]

        @api.get("/positions")
        async def positions(
            open_only: bool = Query(True, alias="open"),
            limit: int = Query(1000, ge=1, le=100_000),
        ) -> dict[str, Any]:
            return await self.positions(open_only=open_only, limit=limit)

        @api.get("/orders")
        async def orders(
            state: OrderState | None = Query(None),
            mint: str | None = None,
            limit: int = Query(100, ge=1, le=10_000),
        ) -> dict[str, Any]:
            # one past the limit: whether the ledger holds more than is listed
            rows = await self.ledger.orders(limit=limit + 1, state=state, mint=mint)
            unbooked = await self.unbooked_view(mint)
            return {**listed(rows, limit), "unbooked_wallet_trades": unbooked}

        @api.post("/unbooked/acknowledge", dependencies=guarded)
        async def acknowledge(body: dict[str, Any] | None = Body(None)) -> dict[str, Any]:
            signatures = (body or {}).get("signatures")
            if signatures is not None and (
                not isinstance(signatures, list) or not all(isinstance(s, str) for s in signatures)
            ):
                raise HTTPException(422, "signatures: a list of the trades' signatures")
            try:
                return await self.acknowledge_unbooked(signatures)
            except NotHolder as exc:
                raise HTTPException(409, str(exc)) from exc

        @api.get("/pnl")
        async def pnl() -> dict[str, Any]:
            return await self.pnl_view()

        @api.get("/state")
        async def state() -> dict[str, Any]:
            return await self.trading_state_view()

        @api.get("/limits")
        async def limits() -> dict[str, Any]:
            return await self.limits_view()

        async def change(values: dict[str, Any] | None, reason: str) -> dict[str, Any]:
            if self.risk is None:
                raise HTTPException(503, "not started")
            try:
                await self.change_limits(values, reason)
            except ControlNotStored as exc:
                raise HTTPException(503, str(exc)) from exc
            except NotHolder as exc:
                raise HTTPException(409, str(exc)) from exc
            return await self.limits_view()

        @api.put("/limits", dependencies=guarded)
        async def set_limits(body: dict[str, Any] | None = Body(None)) -> dict[str, Any]:
            reason = reason_of(body, "limits changed (HTTP)")
            given = {k: v for k, v in (body or {}).items() if k != "reason"}
            try:
                values = operator_limits(given)
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from exc
            return await change(values, reason)

        @api.delete("/limits", dependencies=guarded)
        async def reset_limits(
            reason: str | None = Query(None, max_length=500),
            limit: list[str] | None = Query(None),
        ) -> dict[str, Any]:
            values = None
            if limit is not None:
                try:
                    values = dict.fromkeys(operator_limit_names(limit))
                except ValueError as exc:
                    raise HTTPException(422, str(exc)) from exc
            return await change(values, reason_of({"reason": reason} if reason else None,
                                                  "limits reset (HTTP)"))  # fmt: skip

        @api.post("/halt", dependencies=guarded)
        async def halt(body: dict[str, Any] | None = Body(None)) -> JSONResponse:
            if self.risk is None:
                raise HTTPException(503, "not started")
            view = await self.halt(reason_of(body, "kill switch (HTTP)"))
            # 202: taken, and not stored or not announced yet (the detail says what holds
            # meanwhile)
            done = view["stored"] and view.get("announced") is not False
            return JSONResponse(jsonable_encoder(view), status_code=200 if done else 202)

        @api.post("/resume", dependencies=guarded)
        async def resume(body: dict[str, Any] | None = Body(None)) -> JSONResponse:
            if self.risk is None:
                raise HTTPException(503, "not started")
            try:
                view = await self.resume(reason_of(body, "resumed (HTTP)"))
            except ControlNotStored as exc:
                raise HTTPException(503, str(exc)) from exc
            except NotHolder as exc:
                raise HTTPException(409, str(exc)) from exc
            # 202: stored, and not applied or not announced yet (the detail says why)
            done = view.get("announced") is not False
            return JSONResponse(jsonable_encoder(view), status_code=200 if done else 202)

        return api

    async def status(self) -> dict[str, Any]:
        role = self.role
        body: dict[str, Any] = {
            "ready": role in ("active", "standby"),
            "role": role,
            "executor": self.settings.trading_executor,
        }
        if role == "active":
            body.update(
                state=self.risk.state.value,
                open_positions=self.book.open_count,
                orders_in_flight=len(self.risk.reservations),
                unstored=len(self._backlog),
                unpublished=len(self._unpublished),
            )
        return body
