"""Trading's ledger: every order and its state, every fill, every position, the kill switch.

A :class:`LedgerChange` is what one consumed event (or one timer round) changed; the
ledger writes it in one transaction, before the events it caused are published and
before the consumed event is acknowledged (the service joins the changes of a lane's
events decided together, see ``TradingService._apply_run``). Orders are inserted only
if their id is new: the ids of the orders inserted come back, and an order whose id
was there already (derived from a redelivered or replayed event) is never sent. Each
order carries its decision's ``attempt``: a commit that raised may have been stored
all the same (its reply lost), and its retry, the same decision, gets back the orders
stored under its attempt as inserted, so they are sent once rather than never. A retry
may store an order of its attempt refused instead (a halt refuses the entries whose
store failed): nothing sent it, as an order is sent only once its commit answered, so
the row stored ``sent`` is settled refused, rather than left for a take-over to
reconcile as an order of unknown outcome, its capital reserved meanwhile. So are the
rows of orders a replica standing by withdrew unsent (``withdrawn``), which the ledger
may hold the same way; none of those is inserted, and the ids of those it holds come
back: the next holder takes their events, handed back to it, for copies, so the
replica standing by publishes their refusals. One the ledger does not hold is decided
again there; so is an entry it holds withdrawn, whose id is taken (:meth:`Ledger.load`
tells which, ``withdrawn``): ordered again, it is under an id derived from the old one.

The same transaction numbers the keyed events the change causes (``order.*`` and
``position.*``), per mint, 1, 2, ... (:attr:`LedgerChange.events`, in publication
order), so the keyed consumer (the exit's) drops a copy or a stale one by its seq.
Only events that will be published are numbered: an order's request or refusal that
goes out only if its order is inserted (see :class:`KeyedEvent`) takes no number
otherwise, a change rolled back takes its numbers back, and an event numbered
before (its id: the retry of a commit whose reply was lost, the events of a
withdrawn order told again) gets the seq it was given then. A replica taking over
numbers on from where the ledger's count stands.

The numbered events stay in the ledger's outbox until the service has published them
(:attr:`LedgerChange.gone`, with its next change): a replica taking over publishes what
its predecessor stored and may not have published (:attr:`LedgerSnapshot.outbox`)
before anything of its own, with the seqs they were given, so a kill between a commit
and its publication loses no event and leaves consumers no gap; what had gone out is
a copy they drop by its seq.

Trading's announcements of its breakers and its state (``trading.breaker``,
``trading.state``: keyless) go through the outbox too, in one sequence of their own
(:data:`KEYLESS`, never published as a seq), and the same transaction keeps what each
last said (:attr:`LedgerChange.announced`, migration 0024): a replica taking over starts
with every breaker clear and its state computed afresh, and announces exactly where that
differs from what was last announced (:attr:`LedgerSnapshot.announced`), after what its
predecessor stored and may not have published.

The trades of the live wallet that match no order (:attr:`LedgerChange.unbooked`) are
kept with the change that found them, until an operator acknowledges them
(:meth:`Ledger.acknowledge_unbooked`) or for a day: every replica shows what the one
trading saw, before and after a take-over (:meth:`Ledger.unbooked`). The trades of the
live wallet that wait for their orders' answers (:attr:`LedgerChange.early`) are kept
with the change of the event that showed them, until the change that stores their fill
or their unbooking (a fill or an unbooked trade of their signature): the stream shows a
trade once, its delivery acknowledged, so a replica taking over judges those left
(:attr:`LedgerSnapshot.early`).

The ledger knows which replica trades (:meth:`Ledger.load` with ``holder`` writes it,
before it reads): a commit of another (:attr:`LedgerChange.holder`) is refused
(:class:`Superseded`), and so is its telling events published, so a replica that lost
the lease stores nothing its successor has not read, nor drops its successor's events;
so are its writes of the operator's (:meth:`Ledger.set_control`,
:meth:`Ledger.acknowledge_unbooked`, :meth:`Ledger.set_limits` with ``holder``), so it
undoes nothing its successor was given since (an operator's halt is stored without: any
replica takes it). A replica standing by says so once its last changes are stored
(:meth:`Ledger.stood_by`); its successor waits for that a while
(:meth:`Ledger.predecessor`) before it reads: an entry the predecessor withdrew unsent
then reads withdrawn, not in flight (see ``TradingService._take_over``).

:class:`PostgresLedger` is the ledger of a deployment (migrations 0005, 0013, 0017, 0018,
0021, 0022, 0024, 0028, 0029, 0031); :class:`MemoryLedger` keeps the same in memory for the
embedded run and tests, where a restart starts from nothing anyway.

On start the service rebuilds its position book from :meth:`Ledger.load`: the fills, in
the order they were stored, of the positions open or closed lately (``closed_since``:
what the daily loss limit reads) and the totals of every position
(:class:`LedgerTotals`), so neither its memory nor its reading grows with the weeks
traded; the orders whose outcome is not known yet (to reconcile before trading again),
the recent order ids and the operator's state. A replica standing by answers what the
book adds up to from the same totals (:meth:`Ledger.totals`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

import msgspec

from pumpflow.common.curve import CurveState
from pumpflow.common.db.transactions import holding_transaction
from pumpflow.common.events import (
    Event,
    OrderFilled,
    OrderRejected,
    OrderRequested,
    Side,
    TokenTrade,
    TradingStateChanged,
    decode_event,
    decode_payload,
    encode_event,
    encode_payload,
)
from pumpflow.common.runtime.settings import SHUTDOWN_REQUESTS_KEPT_S
from pumpflow.common.trading import EarlyTrade, Position, TradingState, UnbookedTrade
from pumpflow.common.trading.risk import Report
from pumpflow.trading.settings import OPERATOR_LIMITS, LimitValue, stored_limit

log = logging.getLogger("pumpflow.trading")

OrderState = Literal["pending", "sent", "unknown", "filled", "rejected"]
#: orders whose outcome is not known yet
UNRESOLVED: tuple[OrderState, ...] = ("pending", "sent", "unknown")
#: the row of trading_control that holds the operator's state
CONTROL = "operator"
#: the row of trading_holder that names the replica trading
HOLDER = "decide"
#: what an order stored by an attempt whose reply was lost is left in, unsent
_UNSENT: tuple[OrderState, ...] = ("pending", "sent")
#: the outcome of an order a replica standing by withdrew unsent
WITHDRAWN = "withdrawn unsent: its replica stood by"
#: wall seconds between deletions of the outbox's events of a day ago (none is left
#: there so long unless the service failed to tell it published), and of the unbooked
#: and the early trades of a day ago
_OUTBOX_PRUNE_S = 3600.0
#: how long an unbooked trade is kept unless acknowledged: the alert on it lasts an hour
UNBOOKED_KEPT_S = 86_400.0
#: what the outbox numbers the keyless events under (no mint is empty): one sequence that
#: keeps them in order there, never published as their seq
KEYLESS = ""
#: the subject of trading_announced's row of the trading state, and the prefix of a
#: breaker's; what a breaker's row says
_STATE_SUBJECT = "state"
_BREAKER_SUBJECT = "breaker:"
_TRIPPED, _CLEAR = "tripped", "clear"


class Superseded(RuntimeError):
    """A commit of a replica another took over from: nothing of it is stored.

    Waited out as a dependency's failure (:mod:`pumpflow.common.dependencies`), not
    counted against the event that met it: failed, the bus would dead-letter it after a
    few attempts, and the next holder would never decide it. It waits, unacknowledged,
    until its replica stands by, which the refusal starts at once (the lease's loss may
    show only a renewal later), and hands it back.

    The operator's writes (the trading state, the acknowledgement of unbooked trades)
    are refused the same way: the replica that took over decides them now.
    """

    transient_dependency = "lease"

    def __init__(self, message: str, *, current: str | None = None):
        super().__init__(message)
        #: the ledger's holder now (its writer id), when known
        self.current = current


@dataclass(frozen=True, slots=True, kw_only=True)
class Predecessor:
    """The replica that traded last, as the ledger knows it."""

    holder: str
    #: it stood by with its changes stored
    stood_by: bool
    #: the ledger holds orders it stored that may be unsent (``pending``, ``sent``)
    unsent: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderRecord:
    """An order as the ledger keeps it."""

    order_id: str
    mint: str
    side: Side
    sol_amount: float | None
    token_amount: float | None
    slippage_pct: float
    reason: str
    position_id: str | None
    cause_id: str | None
    executor: str
    state: OrderState
    requested_at: float
    venue: str
    expected_v_sol: float | None = None
    expected_v_tokens: float | None = None
    signature: str | None = None
    outcome: str = ""
    #: the decision that stored it (unique to it): a retry of its commit takes the order
    #: as its own
    attempt: str | None = None

    @classmethod
    def of(
        cls,
        request: OrderRequested,
        *,
        cause_id: str | None,
        executor: str,
        state: OrderState,
        requested_at: float,
        venue: str,
        expected: CurveState | None,
        outcome: str = "",
        attempt: str | None = None,
    ) -> OrderRecord:
        """``request`` as stored, sent by ``executor`` on the market it ``expected``."""
        return cls(
            order_id=request.order_id,
            mint=request.mint,
            side=request.side,
            sol_amount=request.sol_amount,
            token_amount=request.token_amount,
            slippage_pct=request.slippage_pct,
            reason=request.reason,
            position_id=request.position_id,
            cause_id=cause_id,
            executor=executor,
            state=state,
            requested_at=requested_at,
            venue=venue,
            expected_v_sol=None if expected is None else expected.v_sol,
            expected_v_tokens=None if expected is None else expected.v_tokens,
            outcome=outcome,
            attempt=attempt,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FillRecord:
    """A fill as the ledger keeps it (with its order's reason, for a closing sale)."""

    order_id: str
    mint: str
    side: Side
    token_amount: float
    sol_amount: float
    price: float
    fee_sol: float
    filled_at: float
    signature: str | None = None
    position_id: str | None = None
    reason: str = ""
    #: where it filled (None if stored before the ledger kept it)
    venue: str | None = None

    @classmethod
    def of(cls, fill: OrderFilled, *, time: float, reason: str = "") -> FillRecord:
        return cls(
            order_id=fill.order_id,
            mint=fill.mint,
            side=fill.side,
            token_amount=fill.token_amount,
            sol_amount=fill.sol_amount,
            price=fill.price,
            fee_sol=fill.fee_sol,
            filled_at=time,
            signature=fill.signature,
            position_id=fill.position_id,
            reason=reason,
            venue=fill.venue,
        )

    def payload(self) -> OrderFilled:
        return OrderFilled(
            order_id=self.order_id,
            mint=self.mint,
            side=self.side,
            token_amount=self.token_amount,
            sol_amount=self.sol_amount,
            price=self.price,
            fee_sol=self.fee_sol,
            signature=self.signature,
            position_id=self.position_id,
            venue=self.venue,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderOutcome:
    """A known outcome of an order (or ``unknown``: the executor could not say)."""

    order_id: str
    state: OrderState
    outcome: str = ""
    signature: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PositionRecord:
    """A position as the ledger keeps it (the book's, as of its last fill)."""

    position_id: str
    mint: str
    opened_at: float
    closed_at: float | None
    close_reason: str
    token_amount: float
    cost_sol: float
    entry_price: float
    realized_pnl_sol: float
    fees_sol: float
    mark_price: float | None

    @classmethod
    def of(cls, position: Position) -> PositionRecord:
        return cls(
            position_id=position.position_id,
            mint=position.mint,
            opened_at=position.opened_at,
            closed_at=position.closed_at,
            close_reason=position.close_reason,
            token_amount=position.tokens,
            cost_sol=position.cost_sol,
            entry_price=position.entry_price,
            realized_pnl_sol=position.realized_pnl_sol,
            fees_sol=position.fees_sol,
            mark_price=position.mark_price,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyedEvent:
    """An event that a change causes, to be numbered and kept with it: of a mint, or a
    keyless announcement of trading's (numbered under :data:`KEYLESS`)."""

    event: Event
    #: the order whose request or refusal this is, where it is published only if the
    #: ledger inserts the order (or holds it, withdrawn): numbered only then
    order_id: str | None = None

    @property
    def event_id(self) -> str:
        return self.event.id

    @property
    def mint(self) -> str:
        """What numbers it: its mint, or :data:`KEYLESS`."""
        return self.event.key or KEYLESS


@dataclass(frozen=True, slots=True, kw_only=True)
class Announced:
    """What trading's announcements last said, as the ledger keeps them."""

    #: the trading state (None: none announced yet)
    state: TradingState | None = None
    #: the breakers last announced tripped
    tripped: frozenset[str] = frozenset()


def _announced_rows(reports: Sequence[Report]) -> dict[str, str]:
    """trading_announced's rows (subject -> what it says) that ``reports`` leave, the
    last of each subject winning."""
    rows: dict[str, str] = {}
    for report in reports:
        if isinstance(report, TradingStateChanged):
            rows[_STATE_SUBJECT] = report.state
        else:
            rows[_BREAKER_SUBJECT + report.breaker] = _TRIPPED if report.tripped else _CLEAR
    return rows


def _announced_of(rows: dict[str, str]) -> Announced:
    state = rows.get(_STATE_SUBJECT)
    return Announced(
        state=None if state is None else TradingState(state),
        tripped=frozenset(
            subject.removeprefix(_BREAKER_SUBJECT)
            for subject, said in rows.items()
            if subject.startswith(_BREAKER_SUBJECT) and said == _TRIPPED
        ),
    )


@dataclass(frozen=True, slots=True)
class Committed:
    """What a commit stored: the ids of the orders inserted (and of the ``withdrawn``
    ones it holds), and the seq of each of its events numbered (event id -> seq)."""

    inserted: set[str] = field(default_factory=set)
    seqs: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class LedgerChange:
    """What one event or timer round changed (or several, :meth:`joined`), written in one
    transaction."""

    orders: list[OrderRecord] = field(default_factory=list)
    outcomes: list[OrderOutcome] = field(default_factory=list)
    fills: list[FillRecord] = field(default_factory=list)
    positions: list[PositionRecord] = field(default_factory=list)
    #: orders withdrawn unsent, refused: a row a commit of their attempt stored (its reply
    #: lost) is settled so, and its id comes back; none is inserted
    withdrawn: list[OrderRecord] = field(default_factory=list)
    #: the keyed events it causes, in the order they are published
    events: list[KeyedEvent] = field(default_factory=list)
    #: ids of events out of the outbox: published, or taken back unpublished (a halt's
    #: refusal of an entry a lost commit stored); written only with a change
    gone: list[str] = field(default_factory=list)
    #: trades of the live wallet found to match no order, and sales booked to no position
    unbooked: list[UnbookedTrade] = field(default_factory=list)
    #: trades of the live wallet that wait for their orders' answers
    early: list[EarlyTrade] = field(default_factory=list)
    #: the breakers' and the state's announcements it stores (or that went out while
    #: the ledger was away), in order: what each subject last said is kept
    announced: list[Report] = field(default_factory=list)
    #: the replica that stores it: refused (:class:`Superseded`) once another took over
    holder: str | None = None

    def __bool__(self) -> bool:
        return bool(self.announced or self.events) or self._books()

    def record_outcome(
        self,
        outcome: OrderFilled | OrderRejected,
        *,
        time: float,
        reason: str = "",
        position: Position | None = None,
    ) -> None:
        """Store an order's ``outcome``: a fill (at ``time``, for ``reason``) with the
        ``position`` it left, or a refusal."""
        if isinstance(outcome, OrderFilled):
            self.outcomes.append(
                OrderOutcome(order_id=outcome.order_id, state="filled", signature=outcome.signature)
            )
            self.fills.append(FillRecord.of(outcome, time=time, reason=reason))
            if position is not None:
                self.positions.append(PositionRecord.of(position))
        else:
            self.outcomes.append(
                OrderOutcome(order_id=outcome.order_id, state="rejected", outcome=outcome.reason)
            )

    def _books(self) -> bool:
        """Whether it stores anything of the book, the orders or their events."""
        return bool(
            self.orders
            or self.outcomes
            or self.fills
            or self.positions
            or self.withdrawn
            or any(e.event.key is not None for e in self.events)
            or self.unbooked
            or self.early
        )

    @property
    def announces_only(self) -> bool:
        """Whether it stores trading's announcements alone (their events, what they
        said): nothing of the book or the orders."""
        return bool(self.announced) and not self._books()

    @classmethod
    def joined(cls, changes: Sequence[LedgerChange]) -> LedgerChange:
        """``changes`` as one, each part in their order (a later position's row wins)."""
        if len(changes) == 1:
            return changes[0]
        return cls(
            orders=[o for c in changes for o in c.orders],
            outcomes=[o for c in changes for o in c.outcomes],
            fills=[f for c in changes for f in c.fills],
            positions=[p for c in changes for p in c.positions],
            withdrawn=[o for c in changes for o in c.withdrawn],
            events=[e for c in changes for e in c.events],
            gone=[i for c in changes for i in c.gone],
            unbooked=[u for c in changes for u in c.unbooked],
            early=[e for c in changes for e in c.early],
            announced=[a for c in changes for a in c.announced],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerTotals:
    """What the stored positions and the orders in flight add up to."""

    #: realised PnL of every position, the open ones' sales included
    realized_pnl_sol: float = 0.0
    open_positions: int = 0
    closed_positions: int = 0
    open_fees_sol: float = 0.0
    closed_fees_sol: float = 0.0
    #: cost basis of the open positions
    open_cost_sol: float = 0.0
    #: entries and sales whose outcome is not known yet, and the SOL the entries spend
    entries_in_flight: int = 0
    entries_in_flight_sol: float = 0.0
    sales_in_flight: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class EntryInFlight:
    """An entry order whose outcome is not known yet, and the SOL it was sent for."""

    order_id: str
    mint: str
    sol_amount: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerExposure:
    """What the limits are measured on, as the ledger holds it (one read): the open
    positions' cost basis by token, and the entries in flight, oldest first."""

    open_cost_sol: dict[str, float] = field(default_factory=dict)
    entries_in_flight: list[EntryInFlight] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class OperatorLimit:
    """A risk limit the operator set over its setting: its value (in the setting's type),
    why, and when (epoch seconds)."""

    value: LimitValue
    reason: str
    changed_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerSnapshot:
    """What a replica needs to trade on where the last one stopped."""

    fills: list[FillRecord]
    unresolved: list[OrderRecord]
    order_ids: list[str]
    control: tuple[TradingState, str] | None
    #: orders rejected with a signature (given up as unconfirmed) since the load's
    #: ``given_up_since``, oldest first: a late trade of theirs is still theirs
    given_up: list[OrderRecord] = field(default_factory=list)
    #: entries among ``order_ids`` a replica standing by withdrew unsent: their ids are
    #: taken, and their decisions are not
    withdrawn: list[str] = field(default_factory=list)
    #: events numbered and not known to be published, each mint's in seq order
    outbox: list[Event] = field(default_factory=list)
    #: trades of the live wallet that waited for answers, neither booked nor unbooked,
    #: oldest first
    early: list[EarlyTrade] = field(default_factory=list)
    #: every position's totals, as of the same read as ``fills``
    totals: LedgerTotals = field(default_factory=LedgerTotals)
    #: what the breakers' and the state's announcements last said
    announced: Announced = field(default_factory=Announced)


class Ledger(Protocol):
    async def commit(self, change: LedgerChange) -> Committed:
        """Write ``change`` in one transaction and number its events; return the ids of
        the orders inserted, and of the ``withdrawn`` ones it holds (settled refused),
        and the seqs of its events that will be published."""
        ...

    async def load(
        self,
        *,
        remembered: int,
        given_up_since: float | None = None,
        closed_since: float | None = None,
        holder: str | None = None,
    ) -> LedgerSnapshot:
        """What a replica taking over needs; with ``holder``, it is the ledger's holder
        first, and a commit of any other is refused from then on. With ``closed_since``,
        the fills of the positions open or closed at or after it only (of each such
        position's token, every fill from its opening buy on: what rebuilds it), else
        every fill."""
        ...

    async def totals(self) -> LedgerTotals:
        """What the stored positions and the orders in flight add up to now."""
        ...

    async def exposure(self) -> LedgerExposure:
        """The open positions' cost by token and the entries in flight, now."""
        ...

    async def predecessor(self) -> Predecessor | None:
        """The replica that traded last (None: none yet)."""
        ...

    async def stood_by(self, holder: str) -> None:
        """``holder`` stood by with its changes stored (if it still is the holder)."""
        ...

    async def published(self, event_ids: Sequence[str], *, holder: str | None = None) -> None:
        """Take the events ``event_ids`` out of the outbox (published), without a change;
        refused (:class:`Superseded`) once another than ``holder`` took over, as a
        commit is: its successor may have stored an event of the same id since."""
        ...

    async def set_control(
        self,
        state: TradingState,
        reason: str,
        *,
        holder: str | None = None,
        shutdowns: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> None:
        """Store the operator's state; refused (:class:`Superseded`) once another than
        ``holder`` took over, as a commit is: a replica that lost the ledger must not undo
        what its successor was given since. Without ``holder``, stored unfenced: an
        operator's halt given to any replica (the holder reads it on its next tick).
        ``shutdowns``: the shutdowns this halt applies (request id -> the shutdown's
        reason), kept with it (:meth:`shutdown_applied`), their barriers unpublished
        (:meth:`unpublished_barriers`). ``now``: when it was given, by the service's
        clock, which events are stamped by (:meth:`resumed_after`); the ledger's own
        clock's now when None."""
        ...

    async def control(self) -> tuple[TradingState, str] | None: ...

    async def set_limits(
        self,
        values: Mapping[str, LimitValue | None] | None,
        reason: str,
        *,
        holder: str,
        now: float,
    ) -> None:
        """Store the risk limits ``values`` (name -> value, in its setting's type) the
        operator set at ``now``, over the settings' (a value None: that limit back to the
        settings; None for all); refused (:class:`Superseded`) once another than
        ``holder`` took over, as a commit is."""
        ...

    async def limits(self) -> dict[str, OperatorLimit]:
        """The risk limits the operator set, by name, each in its setting's type (none:
        the settings' hold)."""
        ...

    async def shutdown_applied(self, request_id: str) -> bool:
        """Whether a halt stored applied the shutdown request ``request_id`` (forgotten
        once it is older than a request is kept and its barrier is out, in Postgres)."""
        ...

    async def unpublished_barriers(self) -> list[tuple[str, str]]:
        """The shutdowns whose halt is stored and whose barrier no replica has said is
        out (:meth:`barrier_published`), oldest first: (request id, reason)."""
        ...

    async def barrier_published(self, request_id: str) -> None:
        """The barrier of shutdown request ``request_id`` is out (a request whose halt
        is not stored is left as it is)."""
        ...

    async def resumed_after(self, at: float) -> bool:
        """Whether the operator's state stored is not halted and was given after ``at``
        (by the service's clock, see :meth:`set_control`): a resume given since then,
        which a shutdown requested at ``at`` and applied only now does not undo."""
        ...

    async def unbooked(self, *, since: float, limit: int) -> list[UnbookedTrade]:
        """The latest ``limit`` unbooked trades stamped at or after ``since`` and not
        acknowledged, oldest first."""
        ...

    async def acknowledge_unbooked(
        self, signatures: Sequence[str] | None, *, holder: str | None = None
    ) -> int:
        """Forget the unbooked trades ``signatures`` (all when None): the operator has
        seen to them; how many there were. Refused (:class:`Superseded`) once another than
        ``holder`` took over, as a commit is."""
        ...

    async def orders(
        self, *, limit: int, state: str | None = None, mint: str | None = None
    ) -> list[dict[str, Any]]:
        """The latest orders, newest first."""
        ...

    async def positions(self, *, open_only: bool, limit: int) -> list[dict[str, Any]]: ...

    async def order(self, order_id: str) -> tuple[OrderRecord, FillRecord | None] | None:
        """The order ``order_id`` and its fill, if filled; None if the ledger lacks it."""
        ...


def _settles_unsent(stored: OrderRecord, order: OrderRecord) -> bool:
    """Whether ``order``, of the attempt that stored ``stored``, refuses it unsent."""
    return (
        order.attempt is not None
        and stored.attempt == order.attempt
        and order.state == "rejected"
        and stored.state in _UNSENT
    )


def _holds_withdrawn(stored: OrderRecord, order: OrderRecord) -> bool:
    """Whether ``stored`` is the row a lost commit of ``order``'s attempt stored, nothing
    having taken it further: unsent, or refused as ``order`` was (a sale with nothing
    left to sell)."""
    return (
        order.attempt is not None
        and stored.attempt == order.attempt
        and (
            stored.state in _UNSENT
            or (stored.state == "rejected" and stored.outcome == order.outcome)
        )
    )


def _opened_by(fill: FillRecord) -> str:
    """The id of the position ``fill`` opens, if it is a buy of a token not held (as
    :meth:`~pumpflow.common.trading.PositionBook.apply_fill` names it)."""
    return fill.position_id or fill.order_id


def _withdrawn_entry(order: OrderRecord) -> bool:
    return order.side == "buy" and order.state == "rejected" and order.outcome == WITHDRAWN


def _check_holder(current: str | None, holder: str | None) -> None:
    """Refuse a commit of ``holder`` when ``current`` took over from it."""
    if holder is not None and current is not None and current != holder:
        raise Superseded(
            f"the ledger is {current}'s now: {holder}'s change is not stored", current=current
        )


def _attempt_of(attempt: str | None) -> str | None:
    """The replica whose decision an order's ``attempt`` is (``writer:n``)."""
    return None if attempt is None else attempt.rpartition(":")[0]


def numbered(event: Event, seq: int | None) -> Event:
    """``event`` with its seq."""
    return msgspec.structs.replace(event, seq=seq)


def _outboxed(event: Event, seq: int) -> Event:
    """``event`` as the outbox gives it back to publish: with its seq, but a keyless one
    (its seq only ordered it there)."""
    return numbered(event, None if event.key is None else seq)


def _published(change: LedgerChange, inserted: set[str]) -> list[KeyedEvent]:
    """The events of ``change`` that will be published, once each."""
    found: dict[str, KeyedEvent] = {}
    for event in change.events:
        if event.order_id is None or event.order_id in inserted:
            found.setdefault(event.event_id, event)
    return list(found.values())


def _judged(change: LedgerChange) -> list[str]:
    """The signatures of the wallet's trades ``change`` books as fills or unbooks."""
    signatures = [f.signature for f in change.fills if f.signature is not None]
    return signatures + [t.signature for t in change.unbooked]


def _apply_outcome(order: OrderRecord, outcome: OrderOutcome) -> OrderRecord:
    values = asdict(order)
    values.update(state=outcome.state, outcome=outcome.outcome)
    if outcome.signature is not None:
        values["signature"] = outcome.signature
    return OrderRecord(**values)


class MemoryLedger:
    """The ledger in memory (the embedded run, tests)."""

    def __init__(self) -> None:
        self._orders: dict[str, OrderRecord] = {}
        self._fills: dict[str, FillRecord] = {}
        self._positions: dict[str, PositionRecord] = {}
        self._control: tuple[TradingState, str] | None = None
        #: when the operator's state was given (see :meth:`set_control`)
        self._control_at = -math.inf
        #: name -> a risk limit the operator set
        self._limits: dict[str, OperatorLimit] = {}
        #: request id -> (the shutdown's reason, its barrier is out)
        self._shutdowns: dict[str, tuple[str, bool]] = {}
        #: mint -> the last seq given
        self._seqs: dict[str, int] = {}
        #: event id -> the event numbered, until it is gone
        self._outbox: dict[str, Event] = {}
        #: signature -> a trade of the wallet that matched no order
        self._unbooked: dict[str, UnbookedTrade] = {}
        #: signature -> a trade of the wallet waiting for answers
        self._early: dict[str, EarlyTrade] = {}
        #: the replica trading, and whether it stood by
        self._holder: tuple[str, bool] | None = None
        #: subject -> what trading's announcements last said of it
        self._announced: dict[str, str] = {}

    async def commit(self, change: LedgerChange) -> Committed:
        inserted = set()
        if not change:
            return Committed()
        self._fence(change.holder)
        self._announced.update(_announced_rows(change.announced))
        for event_id in change.gone:
            self._outbox.pop(event_id, None)
        for order in change.orders:
            stored = self._orders.get(order.order_id)
            if stored is None:
                self._orders[order.order_id] = order
                inserted.add(order.order_id)
            elif order.attempt is not None and stored.attempt == order.attempt:
                inserted.add(order.order_id)
        for order in change.orders:
            stored = self._orders.get(order.order_id)
            if stored is not None and _settles_unsent(stored, order):
                self._orders[order.order_id] = replace(
                    stored, state=order.state, outcome=order.outcome
                )
        for order in change.withdrawn:
            stored = self._orders.get(order.order_id)
            if stored is not None and _holds_withdrawn(stored, order):
                self._orders[order.order_id] = replace(
                    stored, state="rejected", outcome=order.outcome
                )
                inserted.add(order.order_id)
        for outcome in change.outcomes:
            found = self._orders.get(outcome.order_id)
            if found is not None:
                self._orders[outcome.order_id] = _apply_outcome(found, outcome)
        for fill in change.fills:
            if fill.order_id in self._orders:
                self._fills.setdefault(fill.order_id, fill)
        for position in change.positions:
            self._positions[position.position_id] = position
        for trade in change.unbooked:
            self._unbooked.setdefault(trade.signature, trade)
            kept_from = trade.time - UNBOOKED_KEPT_S
            for old in [s for s, t in self._unbooked.items() if t.time < kept_from]:
                del self._unbooked[old]  # kept a day, as in Postgres
        for early in change.early:
            self._early.setdefault(early.trade.signature, early)
        for signature in _judged(change):
            self._early.pop(signature, None)
        return Committed(inserted, self._number(_published(change, inserted)))

    def _number(self, events: list[KeyedEvent]) -> dict[str, int]:
        seqs = {}
        for keyed in events:
            stored = self._outbox.get(keyed.event_id)
            if stored is None:
                seq = self._seqs[keyed.mint] = self._seqs.get(keyed.mint, 0) + 1
                stored = self._outbox[keyed.event_id] = numbered(keyed.event, seq)
            seqs[keyed.event_id] = stored.seq
        return seqs

    def _fence(self, holder: str | None) -> None:
        _check_holder(self._holder and self._holder[0], holder)

    async def published(self, event_ids: Sequence[str], *, holder: str | None = None) -> None:
        self._fence(holder)
        for event_id in event_ids:
            self._outbox.pop(event_id, None)

    async def load(
        self,
        *,
        remembered: int,
        given_up_since: float | None = None,
        closed_since: float | None = None,
        holder: str | None = None,
    ) -> LedgerSnapshot:
        if holder is not None:
            self._holder = (holder, False)
        orders = sorted(self._orders.values(), key=lambda o: o.requested_at)
        recent = orders[-remembered:]
        fills = list(self._fills.values())
        if closed_since is not None:
            fills = self._fills_since(fills, closed_since)
        return LedgerSnapshot(
            fills=fills,
            unresolved=[o for o in orders if o.state in UNRESOLVED],
            order_ids=[o.order_id for o in recent],
            withdrawn=[o.order_id for o in recent if _withdrawn_entry(o)],
            control=self._control,
            given_up=[
                o
                for o in orders
                if given_up_since is not None
                and o.requested_at >= given_up_since
                and o.state == "rejected"
                and o.signature is not None
            ],
            outbox=[
                _outboxed(e, e.seq)
                for e in sorted(self._outbox.values(), key=lambda e: (e.key or KEYLESS, e.seq))
            ],
            early=sorted(self._early.values(), key=lambda e: e.time),
            totals=await self.totals(),
            announced=_announced_of(self._announced),
        )

    def _fills_since(self, fills: list[FillRecord], closed_since: float) -> list[FillRecord]:
        """Of ``fills`` (in the order stored), each token's from the opening buy of its
        first position open or closed at or after ``closed_since``."""
        kept = {
            p.position_id
            for p in self._positions.values()
            if p.closed_at is None or p.closed_at >= closed_since
        }
        starts: dict[str, int] = {}
        for n, fill in enumerate(fills):
            if fill.side == "buy" and _opened_by(fill) in kept:
                starts.setdefault(fill.mint, n)
        return [f for n, f in enumerate(fills) if n >= starts.get(f.mint, len(fills))]

    async def totals(self) -> LedgerTotals:
        positions = self._positions.values()
        held = [p for p in positions if p.closed_at is None]
        closed = [p for p in positions if p.closed_at is not None]
        flying = [o for o in self._orders.values() if o.state in UNRESOLVED]
        entries = [o for o in flying if o.side == "buy"]
        return LedgerTotals(
            realized_pnl_sol=sum((p.realized_pnl_sol for p in positions), 0.0),
            open_positions=len(held),
            closed_positions=len(closed),
            open_fees_sol=sum((p.fees_sol for p in held), 0.0),
            closed_fees_sol=sum((p.fees_sol for p in closed), 0.0),
            open_cost_sol=sum((p.cost_sol for p in held), 0.0),
            entries_in_flight=len(entries),
            entries_in_flight_sol=sum((o.sol_amount or 0.0 for o in entries), 0.0),
            sales_in_flight=len(flying) - len(entries),
        )

    async def exposure(self) -> LedgerExposure:
        costs: dict[str, float] = {}
        for p in self._positions.values():
            if p.closed_at is None:
                costs[p.mint] = costs.get(p.mint, 0.0) + p.cost_sol
        entries = sorted(
            (o for o in self._orders.values() if o.side == "buy" and o.state in UNRESOLVED),
            key=lambda o: (o.requested_at, o.order_id),
        )
        return LedgerExposure(
            open_cost_sol=costs,
            entries_in_flight=[
                EntryInFlight(order_id=o.order_id, mint=o.mint, sol_amount=o.sol_amount or 0.0)
                for o in entries
            ],
        )

    async def predecessor(self) -> Predecessor | None:
        if self._holder is None:
            return None
        holder, stood_by = self._holder
        unsent = any(
            o.state in _UNSENT and _attempt_of(o.attempt) == holder for o in self._orders.values()
        )
        return Predecessor(holder=holder, stood_by=stood_by, unsent=unsent)

    async def stood_by(self, holder: str) -> None:
        if self._holder is not None and self._holder[0] == holder:
            self._holder = (holder, True)

    async def set_control(
        self,
        state: TradingState,
        reason: str,
        *,
        holder: str | None = None,
        shutdowns: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> None:
        self._fence(holder)
        self._control = (TradingState(state), reason)
        self._control_at = time.time() if now is None else now
        for request_id, said in (shutdowns or {}).items():
            self._shutdowns.setdefault(request_id, (said, False))

    async def control(self) -> tuple[TradingState, str] | None:
        return self._control

    async def set_limits(
        self,
        values: Mapping[str, LimitValue | None] | None,
        reason: str,
        *,
        holder: str,
        now: float,
    ) -> None:
        self._fence(holder)
        if values is None:
            self._limits.clear()
            return
        for name, value in values.items():
            if value is None:
                self._limits.pop(name, None)
            else:
                self._limits[name] = OperatorLimit(value=value, reason=reason, changed_at=now)

    async def limits(self) -> dict[str, OperatorLimit]:
        return dict(self._limits)

    async def shutdown_applied(self, request_id: str) -> bool:
        return request_id in self._shutdowns

    async def unpublished_barriers(self) -> list[tuple[str, str]]:
        return [(r, said) for r, (said, out) in self._shutdowns.items() if not out]

    async def barrier_published(self, request_id: str) -> None:
        if request_id in self._shutdowns:
            self._shutdowns[request_id] = (self._shutdowns[request_id][0], True)

    async def resumed_after(self, at: float) -> bool:
        control = self._control
        return (
            control is not None
            and control[0] is not TradingState.HALTED
            and (self._control_at > at)
        )

    async def unbooked(self, *, since: float, limit: int) -> list[UnbookedTrade]:
        found = [t for t in self._unbooked.values() if t.time >= since]
        return sorted(found, key=lambda t: t.time)[-limit:]

    async def acknowledge_unbooked(
        self, signatures: Sequence[str] | None, *, holder: str | None = None
    ) -> int:
        self._fence(holder)
        found = list(self._unbooked) if signatures is None else signatures
        return sum(self._unbooked.pop(s, None) is not None for s in found)

    async def orders(
        self, *, limit: int, state: str | None = None, mint: str | None = None
    ) -> list[dict[str, Any]]:
        found = [
            asdict(o)
            for o in self._orders.values()
            if (state is None or o.state == state) and (mint is None or o.mint == mint)
        ]
        found.sort(key=lambda o: o["requested_at"], reverse=True)
        return found[:limit]

    async def positions(self, *, open_only: bool, limit: int) -> list[dict[str, Any]]:
        found = [
            asdict(p) for p in self._positions.values() if not open_only or p.closed_at is None
        ]
        found.sort(key=lambda p: p["opened_at"], reverse=True)
        return found[:limit]

    async def order(self, order_id: str) -> tuple[OrderRecord, FillRecord | None] | None:
        found = self._orders.get(order_id)
        return None if found is None else (found, self._fills.get(order_id))


_UNSENT_STATES = ", ".join(f"'{state}'" for state in _UNSENT)
#: a retry of the order's attempt stores it refused, and nothing took it further
_SETTLES_UNSENT = f"EXCLUDED.state = 'rejected' AND orders.state IN ({_UNSENT_STATES})"
_INSERT_ORDER = f"""
INSERT INTO orders (order_id, mint, side, sol_amount, token_amount, slippage_pct, reason,
    position_id, cause_id, executor, state, requested_at, venue, expected_v_sol,
    expected_v_tokens, signature, outcome, attempt)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::float8[],
    $6::float8[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::float8[],
    $13::text[], $14::float8[], $15::float8[], $16::text[], $17::text[], $18::text[])
ON CONFLICT (order_id) DO UPDATE SET attempt = orders.attempt,
    state = CASE WHEN {_SETTLES_UNSENT} THEN EXCLUDED.state ELSE orders.state END,
    outcome = CASE WHEN {_SETTLES_UNSENT} THEN EXCLUDED.outcome ELSE orders.outcome END,
    updated_at = CASE WHEN {_SETTLES_UNSENT} THEN now() ELSE orders.updated_at END
    WHERE orders.attempt = EXCLUDED.attempt
RETURNING order_id
"""
_SETTLE_WITHDRAWN = f"""
UPDATE orders SET state = 'rejected', outcome = w.outcome, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[]) AS w(order_id, attempt, outcome)
WHERE orders.order_id = w.order_id AND orders.attempt = w.attempt
    AND (orders.state IN ({_UNSENT_STATES})
        OR (orders.state = 'rejected' AND orders.outcome = w.outcome))
RETURNING orders.order_id
"""
_UPDATE_ORDER = """
UPDATE orders SET state = $2, outcome = $3, signature = coalesce($4, signature),
    updated_at = now()
WHERE order_id = $1
"""
_INSERT_FILL = """
INSERT INTO fills (order_id, mint, side, token_amount, sol_amount, price, fee_sol, signature,
    position_id, filled_at, venue)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (order_id) DO NOTHING
"""
_UPSERT_POSITION = """
INSERT INTO positions (position_id, mint, opened_at, closed_at, close_reason, token_amount,
    cost_sol, entry_price, realized_pnl_sol, fees_sol, mark_price)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (position_id) DO UPDATE SET closed_at = EXCLUDED.closed_at,
    close_reason = EXCLUDED.close_reason, token_amount = EXCLUDED.token_amount,
    cost_sol = EXCLUDED.cost_sol, entry_price = EXCLUDED.entry_price,
    realized_pnl_sol = EXCLUDED.realized_pnl_sol, fees_sol = EXCLUDED.fees_sol,
    mark_price = EXCLUDED.mark_price, updated_at = now()
"""
#: one round trip: the gone events ($4) leave the outbox; of the events given ($1-$3, in
#: publication order), those in the outbox and not gone keep their seqs, the others move
#: their mints' counts on (locked in mint order) and enter it numbered in order; every
#: given event's seq comes back. The statement's parts share its snapshot, before its
#: deletion and its insert: an event gone and given again (an order's outcome has the
#: order's id, its refusal as unconfirmed and the fill of its trade showing late alike)
#: is a new one, numbered, and replaces the row the snapshot still holds
_NUMBER = """
WITH gone AS (
    DELETE FROM trading_outbox WHERE event_id = ANY($4::text[])
), given AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) WITH ORDINALITY
        AS g(event_id, mint, event, n)
), kept AS (
    SELECT o.event_id, o.seq FROM trading_outbox o JOIN given USING (event_id)
    WHERE o.event_id <> ALL($4::text[])
), fresh AS (
    SELECT * FROM given WHERE event_id NOT IN (SELECT event_id FROM kept)
), counts AS (
    SELECT mint, count(*) AS taken FROM fresh GROUP BY mint
), moved AS (
    INSERT INTO trading_seqs AS t (mint, seq)
    SELECT mint, taken FROM counts ORDER BY mint
    ON CONFLICT (mint) DO UPDATE SET seq = t.seq + EXCLUDED.seq
    RETURNING mint, seq
), numbered AS (
    INSERT INTO trading_outbox (event_id, mint, seq, event)
    SELECT f.event_id, f.mint,
        m.seq - c.taken + row_number() OVER (PARTITION BY f.mint ORDER BY f.n), f.event
    FROM fresh f JOIN moved m USING (mint) JOIN counts c USING (mint)
    ON CONFLICT (event_id) DO UPDATE SET mint = EXCLUDED.mint, seq = EXCLUDED.seq,
        event = EXCLUDED.event, stored_at = now()
    RETURNING event_id, seq
)
SELECT event_id, seq FROM numbered
UNION ALL
SELECT event_id, seq FROM kept
"""
_GONE = "DELETE FROM trading_outbox WHERE event_id = ANY($1::text[])"
_ANNOUNCED = """
INSERT INTO trading_announced (subject, said) SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT (subject) DO UPDATE SET said = EXCLUDED.said, changed_at = now()
"""
_PRUNE_OUTBOX = "DELETE FROM trading_outbox WHERE stored_at < now() - interval '1 day'"
_INSERT_UNBOOKED = """
INSERT INTO trading_unbooked (signature, mint, side, tokens, sol, time, candidates, order_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (signature) DO NOTHING
"""
_PRUNE_UNBOOKED = "DELETE FROM trading_unbooked WHERE stored_at < now() - interval '1 day'"
_INSERT_EARLY = """
INSERT INTO trading_early_trades (signature, trade, sol, time) VALUES ($1, $2, $3, $4)
ON CONFLICT (signature) DO NOTHING
"""
_JUDGED_EARLY = "DELETE FROM trading_early_trades WHERE signature = ANY($1::text[])"
_PRUNE_EARLY = "DELETE FROM trading_early_trades WHERE stored_at < now() - interval '1 day'"
#: the shutdown requests applied longer ago than $1 seconds, their barriers out: a copy
#: of one is refused for its age (:meth:`CommonSettings.shutdown_too_old`)
_FORGET_SHUTDOWNS = """
DELETE FROM trading_shutdown_requests
WHERE applied_at < now() - make_interval(secs => $1) AND barrier_published_at IS NOT NULL
"""
_UNBOOKED_COLUMNS = (
    "signature", "mint", "side", "tokens", "sol", "time", "candidates", "order_id",
)  # fmt: skip
_HOLDER = "SELECT holder FROM trading_holder WHERE name = $1 FOR SHARE"
_TAKE_OVER = """
INSERT INTO trading_holder (name, holder, stood_by) VALUES ($1, $2, false)
ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, stood_by = false, changed_at = now()
"""
_PREDECESSOR = f"""
SELECT holder, stood_by, EXISTS (
    SELECT 1 FROM orders WHERE state IN ({_UNSENT_STATES}) AND attempt LIKE holder || ':%'
) AS unsent
FROM trading_holder WHERE name = $1
"""
_ORDER_COLUMNS = (
    "order_id", "mint", "side", "sol_amount", "token_amount", "slippage_pct", "reason",
    "position_id", "cause_id", "executor", "state", "requested_at", "venue", "expected_v_sol",
    "expected_v_tokens", "signature", "outcome", "attempt",
)  # fmt: skip
_SELECT_ORDERS = f"SELECT {', '.join(_ORDER_COLUMNS)} FROM orders"
_FILL_COLUMNS = (
    "f.order_id", "f.mint", "f.side", "f.token_amount", "f.sol_amount", "f.price", "f.fee_sol",
    "f.filled_at", "f.signature", "f.position_id", "o.reason", "f.venue",
)  # fmt: skip
_SELECT_FILLS = f"SELECT {', '.join(_FILL_COLUMNS)} FROM fills f JOIN orders o USING (order_id)"
#: the fills that rebuild the positions open or closed at or after $1: each one's token's
#: from its first such position's opening buy (a buy of a token not held opens the
#: position named by its position id, else its order id). Each position's opening is
#: looked up in migration 0022's index, a subquery a position: joined, the planner
#: scans every fill
_FILLS_SINCE = f"""
WITH since AS (
    SELECT p.mint, min((
        SELECT min(f.seq) FROM fills f
        WHERE f.side = 'buy' AND coalesce(f.position_id, f.order_id) = p.position_id
    )) AS seq
    FROM positions p WHERE p.closed_at IS NULL OR p.closed_at >= $1
    GROUP BY p.mint
)
{_SELECT_FILLS} JOIN since s ON s.mint = f.mint AND f.seq >= s.seq ORDER BY f.seq
"""
_TOTALS = """
SELECT held.*, flying.*
FROM (
    SELECT coalesce(sum(realized_pnl_sol), 0) AS realized_pnl_sol,
        count(*) FILTER (WHERE closed_at IS NULL) AS open_positions,
        count(*) FILTER (WHERE closed_at IS NOT NULL) AS closed_positions,
        coalesce(sum(fees_sol) FILTER (WHERE closed_at IS NULL), 0) AS open_fees_sol,
        coalesce(sum(fees_sol) FILTER (WHERE closed_at IS NOT NULL), 0) AS closed_fees_sol,
        coalesce(sum(cost_sol) FILTER (WHERE closed_at IS NULL), 0) AS open_cost_sol
    FROM positions
) held, (
    SELECT count(*) FILTER (WHERE side = 'buy') AS entries_in_flight,
        coalesce(sum(sol_amount) FILTER (WHERE side = 'buy'), 0) AS entries_in_flight_sol,
        count(*) FILTER (WHERE side = 'sell') AS sales_in_flight
    FROM orders WHERE state = ANY($1::text[])
) flying
"""


#: one statement, so the positions and the entries are of one snapshot
_EXPOSURE = """
SELECT mint, NULL AS order_id, cost_sol AS sol, NULL AS requested_at
FROM positions WHERE closed_at IS NULL
UNION ALL
SELECT mint, order_id, coalesce(sol_amount, 0), requested_at
FROM orders WHERE side = 'buy' AND state = ANY($1::text[])
ORDER BY requested_at NULLS FIRST, order_id
"""


async def _fence(conn: Any, holder: str | None) -> None:
    """Refuse (:class:`Superseded`) a write of ``holder``, in ``conn``'s transaction, once
    another took over. The row is read shared: a take-over's write of the holder waits for
    the transaction to end, and a write after it sees the new holder."""
    if holder is not None:
        _check_holder(await conn.fetchval(_HOLDER, HOLDER), holder)


def _record(row: Any) -> OrderRecord:
    return OrderRecord(**{name: row[name] for name in _ORDER_COLUMNS})


class PostgresLedger:
    """The ledger in Postgres (migrations 0005, 0013, 0017, 0018, 0021, 0022, 0024,
    0028, 0031), in the pool's schema."""

    def __init__(self, pool: Any, *, shutdowns_kept_s: float = SHUTDOWN_REQUESTS_KEPT_S):
        self.pool = pool
        #: time.monotonic() of the last deletion of the outbox's old events
        self._pruned_at: float | None = None
        #: seconds a shutdown request is kept once its barrier is out
        self.shutdowns_kept_s = shutdowns_kept_s

    async def commit(self, change: LedgerChange) -> Committed:
        if not change:
            return Committed()
        async with self.pool.acquire() as conn, holding_transaction(conn):
            await _fence(conn, change.holder)
            inserted: set[str] = set()
            if change.orders:
                columns = [[getattr(o, name) for o in change.orders] for name in _ORDER_COLUMNS]
                rows = await conn.fetch(_INSERT_ORDER, *columns)
                inserted = {row["order_id"] for row in rows}
            if change.withdrawn:
                rows = await conn.fetch(
                    _SETTLE_WITHDRAWN,
                    [o.order_id for o in change.withdrawn],
                    [o.attempt for o in change.withdrawn],
                    [o.outcome for o in change.withdrawn],
                )
                inserted |= {row["order_id"] for row in rows}
            if change.outcomes:
                await conn.executemany(
                    _UPDATE_ORDER,
                    [(o.order_id, o.state, o.outcome, o.signature) for o in change.outcomes],
                )
            if change.fills:
                await conn.executemany(
                    _INSERT_FILL,
                    [
                        (f.order_id, f.mint, f.side, f.token_amount, f.sol_amount, f.price,
                         f.fee_sol, f.signature, f.position_id, f.filled_at, f.venue)
                        for f in change.fills
                    ],
                )  # fmt: skip
            if change.positions:
                await conn.executemany(
                    _UPSERT_POSITION,
                    [
                        (p.position_id, p.mint, p.opened_at, p.closed_at, p.close_reason,
                         p.token_amount, p.cost_sol, p.entry_price, p.realized_pnl_sol,
                         p.fees_sol, p.mark_price)
                        for p in change.positions
                    ],
                )  # fmt: skip
            if change.unbooked:
                # rare: a trade of the wallet that matches no order
                await conn.executemany(
                    _INSERT_UNBOOKED,
                    [
                        (t.signature, t.mint, t.side, t.tokens, t.sol, t.time,
                         list(t.candidates), t.order_id)
                        for t in change.unbooked
                    ],
                )  # fmt: skip
            if change.early:
                await conn.executemany(
                    _INSERT_EARLY,
                    [
                        (e.trade.signature, encode_payload(e.trade), e.sol, e.time)
                        for e in change.early
                    ],
                )
            judged = _judged(change)
            if judged:
                await conn.execute(_JUDGED_EARLY, judged)
            if change.announced:
                rows = _announced_rows(change.announced)
                await conn.execute(_ANNOUNCED, list(rows), list(rows.values()))
            seqs = await self._number(conn, _published(change, inserted), change.gone)
            return Committed(inserted, seqs)

    async def _number(self, conn: Any, events: list[KeyedEvent], gone: list[str]) -> dict[str, int]:
        """Number ``events`` into the outbox in the commit's transaction, ``gone`` out of
        it: an event numbered before keeps its seq, the others take the next ones of
        their mints (stored without it: the outbox's column holds it)."""
        seqs: dict[str, int] = {}
        if events or gone:
            rows = await conn.fetch(
                _NUMBER,
                [e.event_id for e in events],
                [e.mint for e in events],
                [encode_event(e.event) for e in events],
                gone,
            )
            seqs = {row["event_id"]: row["seq"] for row in rows}
        now = time.monotonic()
        if self._pruned_at is None or now - self._pruned_at >= _OUTBOX_PRUNE_S:
            self._pruned_at = now
            await conn.execute(_PRUNE_OUTBOX)
            await conn.execute(_PRUNE_UNBOOKED)
            await conn.execute(_PRUNE_EARLY)
        return seqs

    async def published(self, event_ids: Sequence[str], *, holder: str | None = None) -> None:
        async with self.pool.acquire() as conn, holding_transaction(conn):
            await _fence(conn, holder)
            await conn.execute(_GONE, list(event_ids))

    async def load(
        self,
        *,
        remembered: int,
        given_up_since: float | None = None,
        closed_since: float | None = None,
        holder: str | None = None,
    ) -> LedgerSnapshot:
        if holder is not None:
            # committed before the read's snapshot: what the predecessor stored by then is
            # read, and nothing it commits later is stored
            await self.pool.execute(_TAKE_OVER, HOLDER, holder)
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            if closed_since is None:
                fills = await conn.fetch(f"{_SELECT_FILLS} ORDER BY f.seq")
            else:
                fills = await conn.fetch(_FILLS_SINCE, closed_since)
            totals = await self._totals(conn)
            unresolved = await conn.fetch(
                f"{_SELECT_ORDERS} WHERE state = ANY($1::text[]) ORDER BY requested_at, order_id",
                list(UNRESOLVED),
            )
            ids = await conn.fetch(
                "SELECT order_id, side = 'buy' AND state = 'rejected' AND outcome = $2 "
                "AS withdrawn FROM orders ORDER BY requested_at DESC LIMIT $1",
                remembered,
                WITHDRAWN,
            )
            control = await conn.fetchrow(
                "SELECT state, reason FROM trading_control WHERE name = $1", CONTROL
            )
            outbox = await conn.fetch("SELECT event, seq FROM trading_outbox ORDER BY mint, seq")
            announced = await conn.fetch("SELECT subject, said FROM trading_announced")
            given_up = []
            if given_up_since is not None:
                given_up = await conn.fetch(
                    f"{_SELECT_ORDERS} WHERE requested_at >= $1 AND state = 'rejected' "
                    "AND signature IS NOT NULL ORDER BY requested_at, order_id",
                    given_up_since,
                )
            early = await conn.fetch(
                "SELECT trade, sol, time FROM trading_early_trades ORDER BY time, signature"
            )
        return LedgerSnapshot(
            fills=[FillRecord(**dict(row)) for row in fills],
            unresolved=[_record(row) for row in unresolved],
            order_ids=[row["order_id"] for row in reversed(ids)],
            control=None if control is None else (TradingState(control[0]), control[1]),
            given_up=[_record(row) for row in given_up],
            withdrawn=[row["order_id"] for row in reversed(ids) if row["withdrawn"]],
            outbox=[_outboxed(decode_event(row["event"]), row["seq"]) for row in outbox],
            early=[
                EarlyTrade(
                    trade=decode_payload(TokenTrade.TYPE, TokenTrade.VERSION, row["trade"]),
                    sol=row["sol"],
                    time=row["time"],
                )
                for row in early
            ],
            totals=totals,
            announced=_announced_of({row["subject"]: row["said"] for row in announced}),
        )

    async def totals(self) -> LedgerTotals:
        async with self.pool.acquire() as conn:
            return await self._totals(conn)

    @staticmethod
    async def _totals(conn: Any) -> LedgerTotals:
        return LedgerTotals(**dict(await conn.fetchrow(_TOTALS, list(UNRESOLVED))))

    async def exposure(self) -> LedgerExposure:
        costs: dict[str, float] = {}
        entries = []
        for row in await self.pool.fetch(_EXPOSURE, list(UNRESOLVED)):
            mint, sol = row["mint"], row["sol"]
            if row["order_id"] is None:
                costs[mint] = costs.get(mint, 0.0) + sol
            else:
                entries.append(EntryInFlight(order_id=row["order_id"], mint=mint, sol_amount=sol))
        return LedgerExposure(open_cost_sol=costs, entries_in_flight=entries)

    async def predecessor(self) -> Predecessor | None:
        row = await self.pool.fetchrow(_PREDECESSOR, HOLDER)
        return None if row is None else Predecessor(**dict(row))

    async def stood_by(self, holder: str) -> None:
        await self.pool.execute(
            "UPDATE trading_holder SET stood_by = true, changed_at = now() "
            "WHERE name = $1 AND holder = $2",
            HOLDER,
            holder,
        )

    async def set_control(
        self,
        state: TradingState,
        reason: str,
        *,
        holder: str | None = None,
        shutdowns: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> None:
        async with self.pool.acquire() as conn, holding_transaction(conn):
            await _fence(conn, holder)
            await conn.execute(
                "INSERT INTO trading_control (name, state, reason, changed_at) "
                "VALUES ($1, $2, $3, coalesce(to_timestamp($4), now())) "
                "ON CONFLICT (name) DO UPDATE SET state = EXCLUDED.state, "
                "reason = EXCLUDED.reason, changed_at = EXCLUDED.changed_at",
                CONTROL,
                TradingState(state).value,
                reason,
                now,
            )
            if shutdowns:
                await conn.execute(
                    "INSERT INTO trading_shutdown_requests (request_id, reason) "
                    "SELECT * FROM unnest($1::text[], $2::text[]) "
                    "ON CONFLICT (request_id) DO NOTHING",
                    list(shutdowns),
                    list(shutdowns.values()),
                )
                # the table grows here alone: a few rows a week, read whole
                await conn.execute(_FORGET_SHUTDOWNS, self.shutdowns_kept_s)

    async def control(self) -> tuple[TradingState, str] | None:
        row = await self.pool.fetchrow(
            "SELECT state, reason FROM trading_control WHERE name = $1", CONTROL
        )
        return None if row is None else (TradingState(row[0]), row[1])

    async def set_limits(
        self,
        values: Mapping[str, LimitValue | None] | None,
        reason: str,
        *,
        holder: str,
        now: float,
    ) -> None:
        async with self.pool.acquire() as conn, holding_transaction(conn):
            await _fence(conn, holder)
            if values is None:
                await conn.execute("DELETE FROM trading_limits")
                return
            given = {name: value for name, value in values.items() if value is not None}
            reset = [name for name, value in values.items() if value is None]
            if reset:
                await conn.execute("DELETE FROM trading_limits WHERE name = ANY($1::text[])", reset)
            if given:
                await conn.execute(
                    "INSERT INTO trading_limits (name, value, reason, changed_at) "
                    "SELECT name, value, $3, to_timestamp($4) "
                    "FROM unnest($1::text[], $2::float8[]) AS given (name, value) "
                    "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, "
                    "reason = EXCLUDED.reason, changed_at = EXCLUDED.changed_at",
                    list(given),
                    # one number column: a switch is 1 or 0, read back by its setting's type
                    [float(v) for v in given.values()],
                    reason,
                    now,
                )

    async def limits(self) -> dict[str, OperatorLimit]:
        rows = await self.pool.fetch(
            "SELECT name, value, reason, extract(epoch FROM changed_at) FROM trading_limits"
        )
        unknown = sorted(row[0] for row in rows if row[0] not in OPERATOR_LIMITS)
        if unknown:
            # a newer version's, left behind by a rollback: trading goes on by the rest
            log.warning("trading: stored limits this version does not know are ignored: %s",
                        ", ".join(unknown))  # fmt: skip
        return {
            row[0]: OperatorLimit(
                value=stored_limit(row[0], row[1]), reason=row[2], changed_at=float(row[3])
            )
            for row in rows
            if row[0] in OPERATOR_LIMITS
        }

    async def shutdown_applied(self, request_id: str) -> bool:
        return await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM trading_shutdown_requests WHERE request_id = $1)",
            request_id,
        )

    async def unpublished_barriers(self) -> list[tuple[str, str]]:
        rows = await self.pool.fetch(
            "SELECT request_id, reason FROM trading_shutdown_requests "
            "WHERE barrier_published_at IS NULL ORDER BY applied_at, request_id"
        )
        return [(row["request_id"], row["reason"]) for row in rows]

    async def barrier_published(self, request_id: str) -> None:
        await self.pool.execute(
            "UPDATE trading_shutdown_requests SET barrier_published_at = now() "
            "WHERE request_id = $1 AND barrier_published_at IS NULL",
            request_id,
        )

    async def resumed_after(self, at: float) -> bool:
        return bool(
            await self.pool.fetchval(
                "SELECT state <> $2 AND changed_at > to_timestamp($3) FROM trading_control "
                "WHERE name = $1",
                CONTROL,
                TradingState.HALTED.value,
                at,
            )
        )

    async def unbooked(self, *, since: float, limit: int) -> list[UnbookedTrade]:
        rows = await self.pool.fetch(
            f"SELECT {', '.join(_UNBOOKED_COLUMNS)} FROM trading_unbooked WHERE time >= $1 "
            "ORDER BY time DESC, signature LIMIT $2",
            since,
            limit,
        )
        return [
            UnbookedTrade(**{**dict(row), "candidates": tuple(row["candidates"])})
            for row in reversed(rows)
        ]

    async def acknowledge_unbooked(
        self, signatures: Sequence[str] | None, *, holder: str | None = None
    ) -> int:
        async with self.pool.acquire() as conn, holding_transaction(conn):
            await _fence(conn, holder)
            rows = await conn.fetch(
                "DELETE FROM trading_unbooked WHERE $1::text[] IS NULL OR signature = ANY($1) "
                "RETURNING signature",
                None if signatures is None else list(signatures),
            )
        return len(rows)

    async def orders(
        self, *, limit: int, state: str | None = None, mint: str | None = None
    ) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            f"{_SELECT_ORDERS} WHERE ($1::text IS NULL OR state = $1) "
            "AND ($2::text IS NULL OR mint = $2) ORDER BY requested_at DESC LIMIT $3",
            state,
            mint,
            limit,
        )
        return [dict(row) for row in rows]

    async def positions(self, *, open_only: bool, limit: int) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT position_id, mint, opened_at, closed_at, close_reason, token_amount, "
            "cost_sol, entry_price, realized_pnl_sol, fees_sol, mark_price FROM positions "
            "WHERE NOT $1 OR closed_at IS NULL ORDER BY opened_at DESC LIMIT $2",
            open_only,
            limit,
        )
        return [dict(row) for row in rows]

    async def order(self, order_id: str) -> tuple[OrderRecord, FillRecord | None] | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(f"{_SELECT_ORDERS} WHERE order_id = $1", order_id)
            if row is None:
                return None
            fill = await conn.fetchrow(f"{_SELECT_FILLS} WHERE f.order_id = $1", order_id)
        return _record(row), None if fill is None else FillRecord(**dict(fill))
