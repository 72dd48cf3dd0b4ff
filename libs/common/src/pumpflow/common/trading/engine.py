"""TradingEngine: events in, orders and reports out, decided by one policy.

:meth:`TradingEngine.process` is the transport-free core: it takes a consumed event
and returns the events to publish, in order (breaker and state reports, entry
orders, position changes). :meth:`TradingEngine.on_feature_event` is the same with
the results handed to the injected ``event_bus`` (anything with an async
``publish(event)``); the service puts it on the bus, paper and live alike.

Consumed: ``token.created`` (name, symbol, creator), ``token.trade`` (the curve, the
marks), ``token.migrated``, ``features.updated`` (the latest vector),
``token.lifecycle`` (state and priority), ``model.prediction`` (the trigger: each
prediction is one chance to enter), the executor's ``order.filled`` and
``order.rejected``, and the feed's ``feed.trade_stream`` (the feed breaker: no entries
while PumpPortal refuses its trade subscriptions). A token's view folds each token
event, features vector and lifecycle in once: it keeps the last seq of each
publisher's events it took, and one that comes again (a redelivery) changes nothing,
so a trade on the pool moves the pool's state once and counts once toward the risk
manager's breakers.

An entry's order id is derived from the prediction event's id
(:func:`~.decisions.order_id_for`), and so is its envelope's id: a redelivered
prediction gives the same order, which the engine (and, across restarts, the
service's ledger) refuses to send twice. An entry a replica standing by withdrew
unsent (:attr:`TradingEngine.withdrawn`) was never sent: decided again, it is ordered
under an id derived from the withdrawn one (:func:`~.decisions.retaken_id`), as its id
is taken. An entry reserves the most its order can spend with the risk manager
(:class:`~.risk.EntrySpend`) until its fill or rejection, so a burst of predictions
cannot pass a limit, however dear their fills; a
sale reserves its tokens with the position book the same way (the caller reserves
them, see :meth:`~.positions.PositionBook.reserve_sale`), its fill or rejection here
releases them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pumpflow.common.clock import Clock, WallClock
from pumpflow.common.events import (
    Event,
    FeaturesUpdated,
    ModelPrediction,
    OrderFilled,
    OrderRejected,
    OrderRequested,
    Payload,
    TokenCreated,
    TokenLifecycle,
    TokenMigrated,
    TokenTrade,
    make_event,
)
from pumpflow.common.pool import is_pool
from pumpflow.common.trading.decisions import (
    DecisionPolicy,
    EntryDecision,
    TokenView,
    admit_seq,
    derived_id,
    order_id_for,
    retaken_id,
)
from pumpflow.common.trading.positions import PositionBook
from pumpflow.common.trading.reasons import Reason
from pumpflow.common.trading.risk import LimitBreach, RiskManager, exceeds

CONSUMES = (
    "token.created",
    "token.trade",
    "token.migrated",
    "features.updated",
    "token.lifecycle",
    "model.prediction",
    "order.filled",
    "order.rejected",
    "feed.trade_stream",
)

#: what the trading service takes from the bus: the engine's inputs less the executor's
#: outcomes (the service hands its own executor's to the engine), and the exit
#: service's sales, which it executes
SERVICE_CONSUMES = (
    *(t for t in CONSUMES if not t.startswith("order.")),
    "exit.order",
    # a graceful exit begins: no new entries from then on (exits go on)
    "system.shutdown",
)

#: what a token's view folds in once per event, by its publisher's seq; a prediction
#: is not: each delivery is decided again (the order it causes is refused a second time
#: by its id), and is its token's latest
_FOLDED = (TokenTrade, TokenCreated, TokenMigrated, FeaturesUpdated, TokenLifecycle)
#: isinstance with a union made once, not at every event
_TOKEN_EVENTS = TokenTrade | TokenCreated | TokenMigrated

#: lifecycle states after which a token not held is forgotten
_RETIRED_STATES = frozenset({"inactive", "graduated"})

#: order ids remembered in memory against a second send (the ledger keeps them all)
_REMEMBERED_ORDERS = 100_000
#: tokens retired with nothing held remembered against a view made again by their late
#: events: over 3 hours of launches at the record rate (71,735 a day), where activity
#: keeps its retired tokens an hour
_REMEMBERED_RETIRED = 10_000


class Publisher(Protocol):
    async def publish(self, event: Event) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What :meth:`TradingEngine.make_decision` concluded for a token."""

    entry: EntryDecision
    #: SOL of the entry order (0 when there is none); it may spend up to the risk
    #: manager's :class:`~.risk.EntrySpend` of it
    size_sol: float = 0.0
    order: OrderRequested | None = None
    #: why there is no order (empty when there is)
    reasons: tuple[Reason, ...] = ()

    @property
    def enter(self) -> bool:
        return self.order is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class FillOverLimit:
    """A buy booked past its limit check that left limits exceeded: the late fill of an
    order given up as unconfirmed (its reservation released then), or one dearer than
    its order reserved."""

    fill: OrderFilled
    #: what its order reserved; None when nothing was reserved any more
    reserved: float | None
    breaches: tuple[LimitBreach, ...]


class TradingEngine:
    """Decides entries from predictions, lifecycle and features; books fills."""

    def __init__(
        self,
        event_bus: Publisher | None,
        position_manager: PositionBook,
        risk_manager: RiskManager,
        *,
        policy: DecisionPolicy | None = None,
        clock: Clock | None = None,
        source: str = "trading",
        slippage_pct: float = 5.0,
    ):
        self.event_bus = event_bus
        self.positions = position_manager
        self.risk = risk_manager
        self.policy = policy or DecisionPolicy()
        self.clock = clock or WallClock()
        self.source = source
        self.slippage_pct = slippage_pct
        self.views: dict[str, TokenView] = {}
        self.sent_orders: OrderedDict[str, None] = OrderedDict()
        #: ids of entries withdrawn unsent (the caller's ledger says which): taken, and
        #: never sent, so their decisions are taken again under ids of their own
        self.withdrawn: set[str] = set()
        #: what the last (live) prediction was decided, with its reasons
        self.last_decision: Decision | None = None
        #: clock seconds from the feed's receipt of the frame the last (live) prediction
        #: follows from to its decision (None: its events carry no receipt time)
        self.last_latency_s: float | None = None
        #: order id -> why it was sent, for the position a sale closes (the executor's
        #: caller sets it for orders it did not decide here, an exit's say)
        self.order_reasons: dict[str, str] = {}
        #: tokens whose views went with their retirement, nothing held: a late event of
        #: theirs (a straggler's trade, its vector and score; activity retires such a
        #: token again without a lifecycle event) is decided on a view not kept, until a
        #: lifecycle event revives the token (a copy of one counts again toward the rate
        #: breaker, as any event of a token without a view does)
        self.retired: OrderedDict[str, None] = OrderedDict()
        #: buys booked past their limit check that left limits exceeded, for the caller
        self._over_limit: list[FillOverLimit] = []

    # ---------------------------------------------------------------- the interface

    async def on_feature_event(self, event: Event) -> list[Event]:
        """Process a consumed event and publish what follows; return it."""
        out = self.process(event)
        if self.event_bus is not None:
            for produced in out:
                await self.event_bus.publish(produced)
        return out

    def analyze_token(self, token_id: str, features: Mapping[str, float]) -> EntryDecision:
        """The policy's verdict on ``token_id`` with ``features``, without sizing."""
        return self.policy.decide(self._view(token_id), features)

    def make_decision(
        self, token_id: str, features: Mapping[str, float], *, cause_id: str | None = None
    ) -> Decision:
        """The entry ``token_id`` calls for now, sized and within the limits, or why not.

        ``cause_id`` is the triggering event's id (default: the token's latest
        prediction's model and features time), from which the order id is derived.
        """
        view = self._view(token_id)
        entry = self.policy.decide(view, features)
        if not entry.enter:
            return Decision(entry=entry, reasons=entry.reasons)
        if not self.risk.entries_allowed:
            return Decision(entry=entry, reasons=(self.risk.state_refusal(),))
        curve = view.curve
        assert curve is not None  # the policy enters only tokens with a curve
        price = curve.price
        stop = price * (1.0 - self.risk.limits.assumed_stop_loss)
        size = self.risk.calculate_position_size(
            token_id,
            price,
            stop,
            confidence=entry.confidence,
            priority=entry.priority,
            curve=curve,
        )
        check = self.risk.check_risk_limits(token_id, size)
        if not check:
            return Decision(entry=entry, size_sol=size, reasons=(check.reason,))
        if cause_id is None:
            cause_id = f"{token_id}@{view.features_time}"
        order_id = order_id_for(cause_id)
        while order_id in self.withdrawn:
            order_id = retaken_id(order_id)
        if order_id in self.sent_orders:
            sent = Reason(f"order {order_id} sent already", "order <id> sent already")
            return Decision(entry=entry, size_sol=size, reasons=(sent,))
        order = OrderRequested(
            order_id=order_id,
            mint=token_id,
            side="buy",
            sol_amount=size,
            slippage_pct=self.slippage_pct,
            reason=f"score {entry.score:.3f}, priority {entry.priority}",
        )
        return Decision(entry=entry, size_sol=size, order=order)

    # ---------------------------------------------------------------- the core

    def process(
        self, event: Event, *, admitted: bool = False, executed: bool = True
    ) -> list[Event]:
        """Apply a consumed event; return the events to publish, in order.

        ``admitted``: the caller had :meth:`admit` take ``event`` in already.
        ``executed``: false for an order's refusal the service gave itself (reconciling
        it after a restart), which is no failure of the executor or the venue and counts
        toward no breaker.
        """
        if not admitted and not self.admit(event):
            return []
        now = self.clock.now()
        self.risk.observe(event, now=now)
        produced: list[Payload] = []
        data = event.data
        if isinstance(data, _TOKEN_EVENTS):
            self._on_token_event(data, event.time)
        elif isinstance(data, FeaturesUpdated):
            view = self._view(data.mint)
            view.features = dict(zip(data.names, data.values, strict=True))
            view.features_time = event.time
        elif isinstance(data, TokenLifecycle):
            if data.state not in _RETIRED_STATES:
                self.retired.pop(data.mint, None)
            self._view(data.mint).lifecycle = data
            if data.state in _RETIRED_STATES and not self.positions.holds(data.mint):
                self._forget(data.mint)
        elif isinstance(data, ModelPrediction):
            if data.shadow:
                # a shadow arm is measured, never traded on
                self.last_decision = self.last_latency_s = None
                return [self._wrap(p, event, now) for p in self.risk.take_reports()]
            view = self._view(data.mint)
            view.prediction = data
            decision = self.last_decision = self.make_decision(
                data.mint, view.features, cause_id=event.id
            )
            received = event.received_at
            self.last_latency_s = None if received is None else now - received
            if decision.order is not None:
                self._remember(decision.order.order_id)
                self.risk.reserve(decision.order.order_id, data.mint, decision.size_sol)
                produced.append(decision.order)
        elif isinstance(data, OrderFilled):
            reserved = self.risk.release(data.order_id)
            self.risk.record_execution(True, now=now)
            reason = self.order_reasons.pop(data.order_id, "")
            # the pool the sale left values the position its change reports
            self.follow_fill(data, event.time)
            change = self.positions.apply_fill(data, time=event.time, reason=reason)
            if change is not None:
                produced.append(change)
                if data.side == "buy":
                    self._check_fill(data, reserved)
        elif isinstance(data, OrderRejected):
            self.order_reasons.pop(data.order_id, None)
            self.risk.release(data.order_id)
            self.positions.release_sale(data.order_id)
            if executed:
                self.risk.record_execution(
                    False, reason=data.reason, side=data.side, cause=data.cause, now=now
                )
        reports = self.risk.take_reports()
        if not reports and not produced:
            return []  # most events
        return [self._wrap(p, event, now) for p in (*reports, *produced)]

    def take_fills_over_limit(self) -> list[FillOverLimit]:
        """The buys booked past their limit check that left limits exceeded, since the
        last call (then forgotten): see :mod:`pumpflow.common.trading.risk` for why they
        are booked and not sold."""
        found, self._over_limit = self._over_limit, []
        return found

    def tick(self) -> list[Event]:
        """The time-driven checks (silence, recoveries, the trading day), from a timer."""
        now = self.clock.now()
        self.risk.check(now)
        return [self._wrap(p, None, now) for p in self.risk.take_reports()]

    def admit(self, event: Event) -> bool:
        """Take ``event``'s seq into its token's view; False for a redelivery (the view has
        it already, say after a take-over of views stored before their events were
        acknowledged), which must change nothing: a pool trade would move the pool again,
        and any event would count once more toward the rate breaker's window.

        Asked once an event: :meth:`process` asks it unless told it was asked already.
        """
        seq, data = event.seq, event.data
        if seq is None or not isinstance(data, _FOLDED):
            return True
        view = self.views.get(data.mint)
        if view is None:
            if self._graduate_unheld(data):
                return True
            view = self._view(data.mint)
        return admit_seq(view.applied, event)

    def restore(self, views: Mapping[str, TokenView]) -> None:
        """Take up ``views``, stored by the replica that traded before (a take-over): the
        risk manager watches the tokens active in them for silence from now on."""
        self.views.update(views)
        # activity tells a token's lifecycle only as it changes, so the views are all that
        # says which tokens are active. They keep no time of a token's last event, so each
        # counts as heard at the take-over, the latest it can have been: its silence is
        # never overstated (the predecessor may have heard it just before it went), and a
        # token silent since before is found so at most the silence limit after it.
        now = self.clock.now()
        for view in views.values():
            if view.lifecycle is not None:
                self.risk.follow_lifecycle(view.lifecycle, now=now)

    def forget_retired(self, mint: str) -> bool:
        """Forget ``mint``'s view if its token retired (inactive, graduated) and no position
        is held in it: the retirement's own event forgets it unless a position is held,
        so a position closed later is the last of it. True if forgotten."""
        view = self.views.get(mint)
        if (
            view is None
            or view.lifecycle is None
            or view.lifecycle.state not in _RETIRED_STATES
            or self.positions.holds(mint)
        ):
            return False
        self._forget(mint)
        return True

    # ---------------------------------------------------------------- internals

    def _view(self, mint: str) -> TokenView:
        view = self.views.get(mint)
        if view is None:
            view = TokenView(mint=mint)
            if mint not in self.retired or self.positions.holds(mint):
                self.views[mint] = view
        return view

    def _forget(self, mint: str) -> None:
        self.views.pop(mint, None)
        self.retired[mint] = None
        self.retired.move_to_end(mint)
        while len(self.retired) > _REMEMBERED_RETIRED:
            self.retired.popitem(last=False)

    def _on_token_event(self, data: TokenTrade | TokenCreated | TokenMigrated, time: float) -> None:
        view = self.views.get(data.mint)
        if view is None:
            if self._graduate_unheld(data):
                return
            view = self._view(data.mint)
        if isinstance(data, TokenCreated):
            view.name = data.name
            view.symbol = data.symbol
            view.creator = data.traderPublicKey
            view.created_at = time
        view.market.apply(data)
        market = view.market
        if is_pool(market.venue):
            view.migrated = True
            view.curve = None
        else:
            view.curve = market.state
        self._mark(view, time)

    def follow_fill(self, fill: OrderFilled, time: float) -> bool:
        """Move ``fill``'s token's pool by it as the paper executor's moved (a paper sale
        on the pool, :meth:`~pumpflow.common.trading.paper.Market.follow_fill`), once,
        valuing the position held there on it; whether it moved.

        Also for the ledger's fills on a take-over: the views are stored after the
        ledger, so one its holder died between the two writes lacks the move.
        """
        view = self.views.get(fill.mint)
        if view is None or fill.order_id in view.pool_fills:
            return False
        if not view.market.follow_fill(fill):
            return False
        view.pool_fills.append(fill.order_id)
        self._mark(view, time)
        return True

    def _mark(self, view: TokenView, time: float) -> None:
        market = view.market
        if market.state is not None:
            self.positions.mark(view.mint, market.state, time=time, venue=market.venue)

    def _graduate_unheld(self, data: object) -> bool:
        """Whether ``data`` is a graduate's trade on its pool (or its migration) with
        nothing held: its view went with its graduation and no entry is taken there,
        while its pool trades go on streaming (a view made again from them would stay for
        ever; a redelivered one counts again toward the rate breaker, as any event of a
        token without a view does)."""
        if isinstance(data, TokenTrade):
            on_pool = is_pool(data.pool)
        else:
            on_pool = isinstance(data, TokenMigrated)
        return on_pool and not self.positions.holds(data.mint)

    def _check_fill(self, fill: OrderFilled, reserved: float | None) -> None:
        """Check against the limits a buy just booked that its entry's check did not cover
        (nothing reserved any more, or dearer than its reservation)."""
        if reserved is not None and not exceeds(fill.sol_amount, reserved):
            return  # checked, at the most it could cost
        breaches = self.risk.breaches(fill.mint, spent=fill.sol_amount)
        if breaches:
            self._over_limit.append(
                FillOverLimit(fill=fill, reserved=reserved, breaches=tuple(breaches))
            )

    def _remember(self, order_id: str) -> None:
        self.sent_orders[order_id] = None
        while len(self.sent_orders) > _REMEMBERED_ORDERS:
            self.sent_orders.popitem(last=False)

    def _wrap(self, payload: Payload, cause: Event | None, now: float) -> Event:
        event_id: Any = None
        if isinstance(payload, OrderRequested):
            event_id = derived_id("event", payload.order_id)
        return make_event(
            payload,
            source=self.source,
            time=now,
            cause=cause,
            event_id=event_id,
        )
