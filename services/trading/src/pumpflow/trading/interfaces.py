"""The requirements' TradeExecutor and PositionManager, exactly, over trading's real classes.

Thin adapters, as :mod:`pumpflow.common.interfaces` is for the library's names (they
live here, above the library, because the ledger is this service's). ``token_id`` is
the token's mint; methods that publish or store are coroutines; extra parameters are
keyword-only; the clock is injected (default: the wall's).

- ``TradeExecutor(event_bus, trading_db)``: :class:`TradeExecutor`. It executes on
  paper, through the service's :class:`~pumpflow.trading.executor.PaperExecutor` and
  its :class:`~pumpflow.common.trading.PaperBroker`, and keeps every order, outcome,
  fill and position change in ``trading_db``, a :class:`~pumpflow.trading.ledger.Ledger`
  (:class:`~pumpflow.trading.ledger.PostgresLedger` or
  :class:`~pumpflow.trading.ledger.MemoryLedger`). Live execution is the service's
  own (:mod:`pumpflow.trading.live`, ``trading_executor = live``): its confirmation
  by the wallet's trades, reconciliation and take-overs are no adapter's business.
- ``PositionManager(event_bus, trade_executor)``: :class:`PositionManager`, over the
  executor's :class:`~pumpflow.common.trading.PositionBook`.

``TradingEngine(event_bus, position_manager, risk_manager)`` and
``RiskManager(capital, max_risk_per_trade, max_concurrent_positions)`` are the real
classes of :mod:`pumpflow.common.trading` themselves; the engine's position manager is
the book (``PositionManager.book``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from pumpflow.common.bus.abc import EventBus as Transport
from pumpflow.common.bus.abc import Subscription
from pumpflow.common.clock import Clock, TimerHandle, WallClock
from pumpflow.common.curve import CurveState, at_price
from pumpflow.common.events import (
    Event,
    OrderFilled,
    OrderRejected,
    OrderRequested,
    Payload,
    PositionUpdated,
    TokenCreated,
    TokenLifecycle,
    TokenMigrated,
    TokenTrade,
    make_event,
)
from pumpflow.common.interfaces import EventBus
from pumpflow.common.trading import (
    PaperExecution,
    Position,
    PositionBook,
    admit_seq,
    derived_id,
    order_id_for,
    rejected,
)
from pumpflow.common.trading.positions import REALIZATIONS_KEPT_S
from pumpflow.trading.executor import Outcome, PaperExecutor
from pumpflow.trading.ledger import (
    UNRESOLVED,
    FillRecord,
    KeyedEvent,
    Ledger,
    LedgerChange,
    OrderRecord,
    PositionRecord,
    numbered,
)

log = logging.getLogger("pumpflow.trading.interfaces")

#: ``source`` of the events these adapters publish
SOURCE = "trading/interfaces"
#: what the executor follows the market from, and the lifecycle that retires a token
TOKEN_EVENTS = ("token.created", "token.trade", "token.migrated")
_CONSUMES = (*TOKEN_EVENTS, "token.lifecycle")
_MARKET = TokenTrade | TokenCreated | TokenMigrated
_RETIRED = frozenset({"inactive", "graduated"})
#: seconds past an order's latency a quiet token's order waits for a trade of its token
#: before it fills on the token's last state: the service's timed check
#: (``trading_tick_s``) fills such an order within a second of its latency too
QUIET_S = 1.0
#: outcomes of this executor's orders remembered in memory, for a call again with the
#: same cause (older ones are read from the ledger)
_REMEMBERED = 10_000


class OrderRefused(RuntimeError):
    """An order the executor or the market refused: the stored refusal is ``rejection``."""

    def __init__(self, rejection: OrderRejected):
        super().__init__(
            f"{rejection.side or 'order'} {rejection.order_id} of {rejection.mint} "
            f"refused: {rejection.reason}"
        )
        self.rejection = rejection


class OrderInFlight(RuntimeError):
    """The ledger holds the order without an outcome, and it is not this executor's to
    wait for (another executor, or another process, sent it)."""


def _transport(event_bus: EventBus | Transport) -> Transport:
    return event_bus.bus if isinstance(event_bus, EventBus) else event_bus


def _stored_outcome(record: OrderRecord, fill: FillRecord | None) -> Outcome | None:
    """The outcome the ledger keeps of ``record`` (None while it has none)."""
    if fill is not None:
        return fill.payload()
    if record.state == "rejected":
        return rejected(record, record.outcome)
    return None


class TradeExecutor:
    """Executes orders on paper, every order and outcome in the trading ledger first.

    It follows each token's market from ``event_bus`` (the token events, one consumer
    group ``group`` in order per token, every partition; a redelivery, known by its
    publisher's seq as the service's engine knows one, changes nothing) once started
    (:meth:`start`, or ``async with``). A paper order fills as the trading service's:
    on the token's state once ``execution.latency_s`` has passed by the token's own
    stream (the state before the first trade stamped after it), or, the token quiet, on
    its last state ``quiet_s`` after that, by ``clock``.

    An order's id derives from its cause (``cause_id``, default: the token and the
    clock's time), so a call again with the same cause is the same order: it is stored
    once, sent once, and the call gets its outcome. The order is stored before it is
    sent; its outcome, its fill and the position change the fill makes in the book
    (:attr:`book`, in the same transaction, as the service stores them) before they are
    published: ``order.requested``, then ``order.filled`` or ``order.rejected``, and
    ``position.opened|updated|closed``, numbered per token by the ledger. A fill is
    booked whether or not its caller still waits for it.

    On start the book is rebuilt from the ledger (the fills of the positions open or
    closed within :data:`~pumpflow.common.trading.positions.REALIZATIONS_KEPT_S`, every
    position's totals), the events stored and maybe not published go out, and the paper
    orders left without an outcome are queued again (they fill where they would have).
    A token's market is forgotten once ``token.lifecycle`` retires it and nothing of it
    is held or pending.

    ``trading_db`` is the executor's own ledger, and ``group`` its own: the service's
    ledger is the service's alone (it publishes what the outbox holds on a take-over).
    """

    def __init__(
        self,
        event_bus: EventBus | Transport,
        trading_db: Ledger,
        *,
        execution: PaperExecution | None = None,
        clock: Clock | None = None,
        group: str = "trading-interfaces",
        source: str = SOURCE,
        quiet_s: float = QUIET_S,
    ):
        self.bus = _transport(event_bus)
        self.ledger = trading_db
        self.paper = PaperExecutor(execution)
        self.execution = self.paper.broker.execution
        #: the positions this executor's fills hold
        self.book = PositionBook(execution=self.execution)
        self.clock = clock or WallClock()
        self.group = group
        self.source = source
        self.quiet_s = quiet_s
        self._subscription: Subscription | None = None
        self._lock = asyncio.Lock()
        #: order id -> its outcome, while it is out
        self._pending: dict[str, asyncio.Future[Outcome]] = {}
        self._outcomes: OrderedDict[str, Outcome] = OrderedDict()
        #: order id -> why it was sent (the close reason of the position a sale closes)
        self._reasons: dict[str, str] = {}
        #: outcomes booked and not stored yet (their ledger change, events, outcome)
        self._unsettled: list[tuple[LedgerChange, list[Event], Outcome]] = []
        self._unpublished: list[Event] = []
        self._timers: set[TimerHandle] = set()
        #: mint -> publisher service -> the last seq of its token events taken, as the
        #: service's engine keeps them: a redelivery changes nothing
        self._seqs: dict[str, dict[str, int]] = {}
        self._retired: set[str] = set()
        self._writer = uuid.uuid4().hex
        self._attempts = itertools.count(1)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Rebuild the book from the ledger, resume what was out, follow the market."""
        if self._subscription is not None:
            return
        now = self.clock.now()
        snapshot = await self.ledger.load(remembered=1, closed_since=now - REALIZATIONS_KEPT_S)
        for fill in snapshot.fills:
            self.book.apply_fill(fill.payload(), time=fill.filled_at, reason=fill.reason)
        totals = snapshot.totals
        self.book.restore_totals(
            realized_pnl_sol=totals.realized_pnl_sol,
            closed_count=totals.closed_positions,
            closed_fees_sol=totals.closed_fees_sol,
        )
        self._unpublished = list(snapshot.outbox)
        async with self._lock:
            await self._publish()
        for order in snapshot.unresolved:
            await self._resume(order)
        self._subscription = Subscription(
            service=self.group,
            patterns=_CONSUMES,
            handler=self._on_event,
            # every partition: one executor follows every token
            partitions=tuple(range(self.bus.partitions)),
        )
        await self.bus.subscribe(self._subscription)

    async def stop(self) -> None:
        """Stop following the market; orders still out stay in the ledger, to resume."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await self.bus.unsubscribe(subscription)
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for order_id, future in self._pending.items():
            if not future.done():
                future.set_exception(
                    RuntimeError(f"the executor stopped: order {order_id} resumes on its start")
                )
                future.exception()  # retrieved: nobody may be waiting
        self._pending.clear()

    async def __aenter__(self) -> TradeExecutor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- the interface

    async def execute_entry(
        self,
        token_id: str,
        size: float,
        price: float | None,
        *,
        cause_id: str | None = None,
        slippage_pct: float | None = None,
        reason: str = "",
    ) -> Outcome:
        """Buy ``token_id`` spending ``size`` SOL in all (every fee included), decided at
        ``price`` (SOL a token; None: the market now), within ``slippage_pct`` of it
        (default: the execution's); wait for and return the fill or the refusal.
        """
        order_id = order_id_for(self._cause(token_id, cause_id), "entry")
        known = self._known(order_id)
        if known is not None:
            return await known
        request = OrderRequested(
            order_id=order_id,
            mint=token_id,
            side="buy",
            sol_amount=float(size),
            slippage_pct=self._slippage(slippage_pct),
            reason=reason,
        )
        return await self._execute(request, price, cause_id)

    async def execute_exit(
        self,
        token_id: str,
        price: float | None,
        reason: str = "",
        *,
        token_amount: float | None = None,
        cause_id: str | None = None,
        slippage_pct: float | None = None,
    ) -> Outcome:
        """Sell the tokens of ``token_id`` the book holds (or ``token_amount`` of them),
        decided at ``price`` (None: the market now), for ``reason``; wait for and return
        the fill or the refusal.

        Never more than the position holds less what its sales out ask for; with nothing
        left the sale is stored refused, never sent.
        """
        order_id = order_id_for(self._cause(token_id, cause_id), "exit")
        known = self._known(order_id)
        if known is not None:
            return await known
        position = self.book.position(token_id)
        position_id = None if position is None else position.position_id
        wanted = math.inf if token_amount is None else float(token_amount)
        reserved = self.book.reserve_sale(order_id, token_id, wanted, position_id=position_id)
        request = OrderRequested(
            order_id=order_id,
            mint=token_id,
            side="sell",
            token_amount=reserved.tokens if reserved else token_amount,
            slippage_pct=self._slippage(slippage_pct),
            reason=reason,
            position_id=position_id,
        )
        return await self._execute(request, price, cause_id, refusal=reserved.reason)

    def market(self, token_id: str) -> tuple[str, CurveState | None]:
        """Where ``token_id`` trades and its state there, as the executor saw it last."""
        return self.paper.expected(token_id)

    async def store(
        self, change: LedgerChange, events: Sequence[Event], *, bus: Transport | None = None
    ) -> None:
        """Store ``change`` with ``events`` numbered, then publish them (on ``bus``)."""
        change.events = [KeyedEvent(event=e) for e in events]
        async with self._lock:
            committed = await self.ledger.commit(change)
            self._queue(events, committed.seqs)
            await self._publish(bus)

    # ---------------------------------------------------------------- orders

    def _cause(self, token_id: str, cause_id: str | None) -> str:
        return cause_id if cause_id is not None else f"{token_id}@{self.clock.now()!r}"

    def _slippage(self, slippage_pct: float | None) -> float:
        return self.execution.slippage_pct if slippage_pct is None else slippage_pct

    def _known(self, order_id: str) -> asyncio.Future | None:
        """The outcome of ``order_id`` if this executor has it out or knows it."""
        pending = self._pending.get(order_id)
        if pending is not None:
            return asyncio.shield(pending)
        outcome = self._outcomes.get(order_id)
        if outcome is None:
            return None
        done = asyncio.get_running_loop().create_future()
        done.set_result(outcome)
        return done

    async def _execute(
        self,
        request: OrderRequested,
        price: float | None,
        cause_id: str | None,
        *,
        refusal: str = "",
    ) -> Outcome:
        order_id = request.order_id
        # a concurrent call with the same cause waits for this one's outcome
        future = self._pending[order_id] = asyncio.get_running_loop().create_future()
        try:
            venue, state = self.market(request.mint)
            expected = state if state is None or price is None else at_price(state, price)
            now = self.clock.now()
            record = OrderRecord.of(
                request,
                cause_id=cause_id,
                executor=self.paper.name,
                state="rejected" if refusal else "sent",
                requested_at=now,
                venue=venue,
                expected=expected,
                outcome=refusal,
                attempt=f"{self._writer}:{next(self._attempts)}",
            )
            events = [self._event(request, now, event_id=derived_id("event", order_id))]
            refused = rejected(request, refusal) if refusal else None
            if refused is not None:
                events.append(self._event(refused, now))
            change = LedgerChange(
                orders=[record], events=[KeyedEvent(event=e, order_id=order_id) for e in events]
            )
            self._reasons[order_id] = request.reason
            immediate = None
            async with self._lock:
                committed = await self.ledger.commit(change)
                inserted = order_id in committed.inserted
                if inserted and refused is None:
                    # sent before it is told, as the service sends: a trade published
                    # once the request is seen finds the order queued
                    immediate = self.paper.broker.submit(request, time=now, expected=expected)
                    if immediate is None:
                        self._wake_at(now + self.execution.latency_s)
                if inserted:
                    self._queue(events, committed.seqs)
                await self._publish()
        except BaseException as exc:
            self._abandon(order_id, exc)
            raise
        if not inserted:
            return await self._stored(record)
        if refused is not None:
            self._reasons.pop(order_id, None)
            self._resolve(refused)
            return refused
        if immediate is not None:
            await self._settle([immediate.result], None)
        return await asyncio.shield(future)

    def _abandon(self, order_id: str, exc: BaseException) -> None:
        self._reasons.pop(order_id, None)
        self.book.release_sale(order_id)
        future = self._pending.pop(order_id, None)
        if future is not None and not future.done():
            future.set_exception(exc)
            future.exception()  # retrieved: a concurrent caller may not be waiting

    async def _stored(self, record: OrderRecord) -> Outcome:
        """The outcome of an order whose id the ledger had already: stored, or still out
        (one of this executor's whose commit answered too late for its call, queued now;
        another's: :class:`OrderInFlight`)."""
        order_id = record.order_id
        found = await self.ledger.order(order_id)
        outcome = None if found is None else _stored_outcome(*found)
        if outcome is not None:
            self._reasons.pop(order_id, None)
            self.book.release_sale(order_id)
            self._resolve(outcome)
            return outcome
        mine = found is not None and (found[0].attempt or "").rpartition(":")[0] == self._writer
        if mine and found[0].executor == self.paper.name:
            self.book.release_sale(order_id)
            future = self._pending[order_id]
            await self._resume(found[0])
            return await asyncio.shield(future)
        error = OrderInFlight(f"order {order_id} is in the ledger without an outcome, sent by "
                              f"another executor: not sent again")  # fmt: skip
        self._abandon(order_id, error)
        raise error

    async def _resume(self, order: OrderRecord) -> None:
        """Queue again a paper order the ledger holds without an outcome (the restart of
        its executor), where it fills as it would have; another executor's is left."""
        if order.state not in UNRESOLVED:
            return
        if order.executor != self.paper.name:
            log.warning("trading interfaces: order %s is the %s executor's: left alone",
                        order.order_id, order.executor)  # fmt: skip
            return
        self._pending.setdefault(order.order_id, asyncio.get_running_loop().create_future())
        self._reasons[order.order_id] = order.reason
        if order.side == "sell" and (unheld := self.book.not_held(order.mint, order.position_id)):
            outcome: Outcome | None = rejected(order, f"nothing to sell after a restart: {unheld}")
        else:
            outcome = self.paper.reconcile(order)
        if outcome is None:
            if order.side == "sell":
                self.book.resume_sale(order.order_id, order.mint, order.token_amount or 0.0)
            self._wake_at(order.requested_at + self.execution.latency_s)
            return
        await self._settle([outcome], None)

    # ---------------------------------------------------------------- outcomes

    def _wake_at(self, due: float) -> None:
        timer = self.clock.call_at(due + self.quiet_s, lambda: self._due(timer))
        self._timers.add(timer)

    async def _due(self, timer: TimerHandle) -> None:
        self._timers.discard(timer)
        try:
            await self._settle(self.paper.due(self.clock.now()), None)
        except Exception:
            # booked already: stored by the next settle, this timer's again at the latest
            log.exception("trading interfaces: storing the orders due failed")
            if self._subscription is not None:
                self._wake_at(self.clock.now())

    async def _on_event(self, event: Event) -> None:
        data = event.data
        if isinstance(data, TokenLifecycle):
            if not admit_seq(self._seqs.setdefault(data.mint, {}), event):
                return  # an older state again: it would retire a token that lives on
            if data.state in _RETIRED:
                self._retired.add(data.mint)
                self._forget(data.mint)
            else:
                self._retired.discard(data.mint)
            return
        outcomes: list[Outcome] = []
        if isinstance(data, _MARKET) and admit_seq(self._seqs.setdefault(data.mint, {}), event):
            outcomes = self.paper.observe(data, time=event.time)
        # what an earlier delivery booked and failed to store goes first
        await self._settle(outcomes, event)

    def _forget(self, mint: str) -> None:
        if mint in self._retired and not self.book.holds(mint):
            self.paper.forget(mint)
            if self.paper.broker.market(mint) is None:
                self._seqs.pop(mint, None)
                self._retired.discard(mint)

    async def _settle(self, outcomes: list[Outcome], cause: Event | None) -> None:
        """Book ``outcomes`` now, in order, then store and publish each, its caller told."""
        for outcome in outcomes:
            self._unsettled.append((*self._booking(outcome, cause), outcome))
        if not self._unsettled:
            return
        async with self._lock:
            while self._unsettled:
                change, events, outcome = self._unsettled[0]
                committed = await self.ledger.commit(change)
                self._unsettled.pop(0)
                self._queue(events, committed.seqs)
                self._resolve(outcome)
                if not self.book.holds(outcome.mint):
                    self._forget(outcome.mint)
            await self._publish()

    def _booking(self, outcome: Outcome, cause: Event | None) -> tuple[LedgerChange, list[Event]]:
        """``outcome`` booked in the book: what to store and to publish of it."""
        now = self.clock.now()
        order_id = outcome.order_id
        reason = self._reasons.pop(order_id, "")
        events = [self._event(outcome, now, cause=cause)]
        change = LedgerChange()
        position = None
        if isinstance(outcome, OrderFilled):
            moved = self.book.apply_fill(outcome, time=now, reason=reason)
            if moved is not None:
                position = self.position(outcome.mint)
                events.append(self._event(moved, now, cause=cause))
        else:
            self.book.release_sale(order_id)
        change.record_outcome(outcome, time=now, reason=reason, position=position)
        change.events = [KeyedEvent(event=e) for e in events]
        return change, events

    def position(self, token_id: str) -> Position | None:
        """``token_id``'s open position, else its last closed one kept in the book."""
        position = self.book.position(token_id)
        if position is not None:
            return position
        return next((p for p in reversed(self.book.closed_positions) if p.mint == token_id), None)

    def _resolve(self, outcome: Outcome) -> None:
        order_id = outcome.order_id
        self._outcomes[order_id] = outcome
        while len(self._outcomes) > _REMEMBERED:
            self._outcomes.popitem(last=False)
        future = self._pending.pop(order_id, None)
        if future is not None and not future.done():
            future.set_result(outcome)

    # ---------------------------------------------------------------- events

    def _event(
        self, payload: Payload, now: float, *, cause: Event | None = None, event_id: Any = None
    ) -> Event:
        if event_id is None and isinstance(payload, OrderFilled | OrderRejected):
            event_id = derived_id("outcome", payload.order_id)
        return make_event(payload, source=self.source, time=now, cause=cause, event_id=event_id)

    def _queue(self, events: Sequence[Event], seqs: dict[str, int]) -> None:
        self._unpublished += [numbered(e, seqs.get(e.id)) for e in events]

    async def _publish(self, bus: Transport | None = None) -> None:
        """Publish what was stored, in order (the lock held), then take it out of the
        ledger's outbox. What fails to go out waits for the next publication here, or
        for the next start (the outbox keeps it): the orders it tells of are out."""
        bus = bus or self.bus
        published = []
        try:
            while self._unpublished:
                await bus.publish(self._unpublished[0])
                published.append(self._unpublished.pop(0).id)
        except Exception:
            log.warning("trading interfaces: %d events kept, to publish with the next ones",
                        len(self._unpublished), exc_info=True)  # fmt: skip
        if published:
            try:
                await self.ledger.published(published)
            except Exception:
                log.warning("trading interfaces: the outbox keeps %d events published: "
                            "published again on the next start", len(published),
                            exc_info=True)  # fmt: skip


class PositionManager:
    """Positions opened and closed through a :class:`TradeExecutor`, in its book.

    The book is the real :class:`~pumpflow.common.trading.PositionBook` the executor
    books its fills to (cost basis and realised PnL after every fee); the executor
    stores and publishes each fill's position change with the fill, whoever waits for
    it. A mark values the tokens held at what selling them all at once would bring
    after every fee, on the token's latest state the executor saw
    (:meth:`PositionBook.mark`). A refused order raises :class:`OrderRefused`, with the
    stored refusal; the book is left as it was.
    """

    def __init__(
        self,
        event_bus: EventBus | Transport,
        trade_executor: TradeExecutor,
        *,
        clock: Clock | None = None,
    ):
        self.bus = _transport(event_bus)
        self.executor = trade_executor
        self.book = trade_executor.book
        self.clock = clock or trade_executor.clock

    async def open_position(
        self, token_id: str, size: float, entry_price: float | None, **options: Any
    ) -> Position:
        """Buy ``size`` SOL of ``token_id`` at ``entry_price`` (a keyword of
        :meth:`TradeExecutor.execute_entry` may follow); the position once filled
        (added to if the token is held already)."""
        outcome = await self.executor.execute_entry(token_id, size, entry_price, **options)
        if isinstance(outcome, OrderRejected):
            raise OrderRefused(outcome)
        return self.executor.position(token_id)

    async def close_position(
        self, token_id: str, exit_price: float | None, reason: str, **options: Any
    ) -> Position:
        """Sell all of ``token_id`` held, at ``exit_price``, for ``reason``; the position
        once sold (closed: ``realized_pnl_sol`` is its PnL after every fee)."""
        outcome = await self.executor.execute_exit(token_id, exit_price, reason, **options)
        if isinstance(outcome, OrderRejected):
            raise OrderRefused(outcome)
        return self.executor.position(token_id)

    async def update_positions(self) -> list[Position]:
        """Mark every open position on its token's latest state; store and publish
        ``position.updated`` for each whose mark moved. Return the open positions."""
        now = self.clock.now()
        moved = []
        for mint, position in list(self.book.open_positions.items()):
            venue, state = self.executor.market(mint)
            if state is None or (state == position.mark_state and venue == position.mark_venue):
                continue
            self.book.mark(mint, state, time=now, venue=venue)
            moved.append(position)
        if moved:
            events = [
                make_event(
                    PositionUpdated(**p.payload_fields()),
                    source=self.executor.source,
                    time=now,
                )
                for p in moved
            ]
            change = LedgerChange(positions=[PositionRecord.of(p) for p in moved])
            await self.executor.store(change, events, bus=self.bus)
        return list(self.book.open_positions.values())

    def get_position(self, token_id: str) -> Position | None:
        """The open position of ``token_id``, if any."""
        return self.book.position(token_id)
