"""Live execution's core: orders sent to PumpPortal's trade API wait for their trade.

An answer from the API is not a fill. An order the API answered with a signature is
pending until the token's stream shows that signature, traded by the wallet. An order
whose answer never came (a timeout, a lost connection, a crash during the call: the
ledger recorded the order before the call) is pending until the stream shows a trade
of the wallet consistent with it (:func:`consistent`): its token and side, seen
(stamped by the feed) no earlier than the order was sent (give or take the clocks'
skew), and of the order's size: a sale of exactly the tokens the order sold, a buy
whose cost after the venue's and the API's fees is the order's SOL within its slippage
either way, with those fees on top at most. A trade of the wallet that shows while an
order of its token and side still awaits its answer (the API sends before it answers,
so the stream can be first) waits for the answers: it is the order's whose answer names its
signature, else, once no answer is awaited there, the oldest consistent order's whose
answer never came. A trade consistent with no order is not the system's (a trade made
by hand from the wallet, of another size or from before the order): it fills nothing,
as any trade of nobody's order. Taken by whichever order happened to be waiting, it
would give an order another one's trade, and the other order's own trade, showing
later, to nothing. The fill is priced from that trade: its tokens and the SOL it
moved, plus the curve's (or the pool's) fee, the API's fee and the priority fee, at
:class:`~pumpflow.common.trading.LiveExecution`'s rates.

Yet the wallet holds (or sold) what a trade of no order moved, and the book does not:
it is kept as an :class:`UnbookedTrade` (:meth:`LiveBook.unbooked`), naming the orders
whose answer never came that it may be, for the operator to see. A buy of ours that
landed after the price fell past its slippage is one: it cost less than its order
allows, and that order ends unconfirmed (its refusal names the trade). It is not
booked as the order's position: the stream shows a trade's token, side, size,
signature and wallet, and a buy made by hand from the wallet then is told apart from
it by none of them. Booked, a hand trade would be a position the exit service sells,
its cost counted against the capital and the limits. A trade booked as a fill and
delivered again (to the replica taking over, its fill stored before its delivery was
acknowledged: :meth:`LiveBook.booked`) is that fill's: it fills no other order and is
not unbooked; one found unbooked and delivered again is not judged again either.

A trade of the wallet that waits for the answers is an :class:`EarlyTrade`
(:meth:`LiveBook.early`), for the service to keep in the ledger before the trade's
delivery is acknowledged, until its fill or its unbooking is stored: the answer may
never reach this process (killed, or taken over from), and the stream shows the trade
once. The replica that trades next judges it again (:meth:`LiveBook.restore_early`),
as if it showed then: the order its answer named (its signature stored), else the
oldest consistent one whose answer never came, as every order it takes over is.

The reconciliation rule: an order whose trade has not shown ``confirm_s`` after it
was sent (or after a restart took it over) is rejected as unconfirmed, and it is
never sent again (the ledger's order id forbids it). By then the transaction's
blockhash has expired, so it did not land. Should its signature show later all the
same (a frame the stream delivered late), the trade is booked as a late fill, after a
take-over too (:meth:`LiveBook.given_up`): the chain is the truth and the book
follows it.

An API answer without a signature is a refusal: nothing was sent and the order is
rejected at once. The refusal is a slippage refusal (``cause`` ``slippage``, which
the execution breaker does not count for a sale) when the market the stream shows at
the refusal is past the order's limit from the market it was sent on, by the paper
fill's rule (:func:`~pumpflow.common.trading.paper.fill_on_market`): the trade API's
refusals name no cause the system can read (its one documented refusal is a
"Simulation failed" 400), so the market is the evidence. The stream lags the chain the
API simulates on, so some slippage refusals go unrecognised and count, as any other
failure. A transaction that lands and fails shows nothing on the stream (it carries
trades only): its order ends unconfirmed and counts.

An answer with a signature is pending even when it reports an error (a "Simulation
failed" 400 has carried a signature whose sale landed).

No clock and no I/O: the service's live TradeExecutor calls the API and feeds this.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from pumpflow.common.curve import TOKEN_DECIMALS, CurveState
from pumpflow.common.events import (
    SLIPPAGE,
    OrderFilled,
    OrderRejected,
    Side,
    TokenCreated,
    TokenMigrated,
    TokenTrade,
)
from pumpflow.common.trading.fills import VENUE_CURVE, FillRejection, venue_fee_rate
from pumpflow.common.trading.orders import rejected
from pumpflow.common.trading.paper import Market, fill_on_market
from pumpflow.common.trading.risk import EntrySpend
from pumpflow.common.trading.settings import LiveExecution

#: signatures of expired orders kept to recognise a late trade
REMEMBERED_EXPIRED = 1000
#: signatures of the wallet's trades booked as fills, kept to know one delivered again
REMEMBERED_BOOKED = 1000
#: trades of the wallet that matched no order, the latest kept for the operator's view
REMEMBERED_UNBOOKED = 100
#: a sale's tokens as the chain counts them: the API rounds the order's amount to them
TOKEN_UNIT = 10.0**-TOKEN_DECIMALS
#: relative tolerance of the size checks, for the floats' rounding
_SIZE_EPSILON = 1e-9
#: how far the feed's clock, which stamps the wallet's trades, may be behind trading's,
#: which stamps its orders: hosts kept by NTP agree within milliseconds, and a trade
#: lands a slot (~0.4 s) or more after its order was sent
CLOCK_SKEW_S = 1.0


@dataclass(slots=True, kw_only=True)
class LiveOrder:
    """An order sent (or maybe sent) to the trade API, waiting for its trade."""

    order_id: str
    mint: str
    side: Side
    #: when the order is given up as unconfirmed
    deadline: float
    #: when it was sent (the ledger's time of the order): no earlier trade is its
    sent_at: float
    position_id: str | None = None
    #: the API's answer; None while unknown
    signature: str | None = None
    #: SOL to spend (buy) or tokens to sell, and the order's slippage limit
    amount: float = 0.0
    slippage_pct: float = 0.0
    #: the market the order was sent on; None for an order taken over after a restart
    expected: CurveState | None = None
    venue: str = VENUE_CURVE
    #: its call is in flight: the answer, and the signature it names, may still come
    awaiting: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class UnbookedTrade:
    """A trade of the wallet no order matches, or a sale's booked to no position (its
    position closed since): the wallet and the book differ by it."""

    signature: str
    mint: str
    side: Side
    tokens: float
    #: SOL the trade moved in the reserves, before fees
    sol: float
    #: when the feed stamped it
    time: float
    #: the orders of its token and side whose answer never came, waiting when it
    #: showed: it may be one's, at a price past its slippage (else it was made by hand)
    candidates: tuple[str, ...] = ()
    #: the sale whose fill it is, booked to no position: its position closed since
    order_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EarlyTrade:
    """A trade of the wallet that showed while an order of its token and side awaited
    its answer: it waits for the answers."""

    trade: TokenTrade
    #: SOL the trade moved in the reserves, before fees
    sol: float
    #: when the feed stamped it
    time: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Confirmation:
    """A fill the token's stream showed; ``late`` when its order had been given up."""

    fill: OrderFilled
    late: bool = False


def consistent(
    order: LiveOrder, trade: TokenTrade, *, time: float, execution: LiveExecution, moved_sol: float
) -> bool:
    """Whether ``trade`` (the wallet's, stamped ``time``) can be ``order``'s, whose answer
    never came: its token and side, not before the order was sent (the clocks' skew
    allowed), and of its size.

    A sale sells the order's tokens, to the token's unit. A buy's cost after the venue's
    and the API's fees is the order's SOL within its slippage either way, plus at most
    those two fees: the API spends the SOL, or buys the tokens it quotes for them, paying
    up to the slippage more when the price rose before the trade landed (less when it
    fell); and the reference does not say whether the venue's fee (the curve's 1.25%, or
    the pool's) and the API's 1% come out of the SOL or on top of it, so the cost at the
    quoted price is anywhere from the SOL to the SOL with both fees on top.
    """
    if trade.mint != order.mint or trade.txType != order.side:
        return False
    if time < order.sent_at - CLOCK_SKEW_S or order.amount <= 0:
        return False
    if order.side == "sell":
        tokens = float(trade.tokenAmount)
        return abs(tokens - order.amount) <= TOKEN_UNIT + order.amount * _SIZE_EPSILON
    fill = confirmed_fill(order, trade, execution=execution, moved_sol=moved_sol)
    cost = fill.sol_amount - execution.priority_fee_sol
    slipped = (1.0 + order.slippage_pct / 100.0) * (1.0 + _SIZE_EPSILON)
    most = live_entry_spend(execution, order.slippage_pct, venue=trade.pool or VENUE_CURVE)
    return order.amount / slipped <= cost and fill.sol_amount <= most.most(order.amount)


def live_entry_spend(
    execution: LiveExecution, slippage_pct: float, *, venue: str | None = None
) -> EntrySpend:
    """The most a live buy at ``slippage_pct`` can spend, fees included: its SOL with the
    whole slippage, the venue's fee (``venue``'s; None: the dearer of the curve's and
    the pool's, where the order may fill) and the API's on top, and the matcher's
    rounding tolerance; plus the priority fee (the figures are argued in
    :mod:`pumpflow.common.trading.risk`).

    The one bound of a live buy's cost: the risk manager reserves it and checks it
    against the limits, and :func:`consistent` takes no dearer trade for the buy's.
    """
    fees = execution.fees
    if venue is None:
        venue_fee = max(fees.curve_fee_rate, fees.pool_fee_rate)
    else:
        venue_fee = venue_fee_rate(fees, venue)
    factor = (
        (1.0 + slippage_pct / 100.0)
        * (1.0 + _SIZE_EPSILON)
        * (1.0 + venue_fee)
        * (1.0 + fees.api_fee_rate)
    )
    return EntrySpend(factor=factor, fixed_sol=execution.priority_fee_sol)


def confirmed_fill(
    order: LiveOrder, trade: TokenTrade, *, execution: LiveExecution, moved_sol: float
) -> OrderFilled:
    """The fill ``trade`` shows for ``order``, after every fee.

    ``moved_sol`` is the SOL the trade moved in the reserves. A buy paid that plus the
    venue's fee, the API's fee on both and the priority fee; a sale received it less
    the venue's fee, the API's fee on the rest and the priority fee (as paper fills).
    """
    fees = execution.fees
    rate = venue_fee_rate(fees, trade.pool)
    tokens = float(trade.tokenAmount)
    venue_fee = moved_sol * rate
    if order.side == "buy":
        api_fee = (moved_sol + venue_fee) * fees.api_fee_rate
        sol = moved_sol + venue_fee + api_fee + execution.priority_fee_sol
    else:
        api_fee = (moved_sol - venue_fee) * fees.api_fee_rate
        sol = moved_sol - venue_fee - api_fee - execution.priority_fee_sol
    return OrderFilled(
        order_id=order.order_id,
        mint=order.mint,
        side=order.side,
        token_amount=tokens,
        sol_amount=sol,
        price=moved_sol / tokens if tokens else 0.0,
        fee_sol=venue_fee + api_fee + execution.priority_fee_sol,
        signature=trade.signature,
        position_id=order.position_id,
        venue=trade.pool,
    )


@dataclass(slots=True)
class LiveBook:
    """Live orders waiting for their trade, and the markets of their tokens."""

    execution: LiveExecution
    markets: dict[str, Market] = field(default_factory=dict)
    pending: dict[str, LiveOrder] = field(default_factory=dict)
    #: signature -> an order given up as unconfirmed, newest last
    expired: OrderedDict[str, LiveOrder] = field(default_factory=OrderedDict)
    #: signatures of the wallet's trades booked as fills, newest last
    filled: OrderedDict[str, None] = field(default_factory=OrderedDict)
    #: signature -> a trade of the wallet waiting for answers
    unclaimed: dict[str, EarlyTrade] = field(default_factory=dict)
    #: those that began to wait since the last :meth:`early`
    _early: list[EarlyTrade] = field(default_factory=list)
    #: fills that answers settled, to take with :meth:`settled`
    _settled: list[Confirmation] = field(default_factory=list)
    #: the latest trades of the wallet that matched no order, oldest first
    recent_unbooked: deque[UnbookedTrade] = field(
        default_factory=lambda: deque(maxlen=REMEMBERED_UNBOOKED)
    )
    #: those not taken with :meth:`unbooked` yet
    _unbooked: list[UnbookedTrade] = field(default_factory=list)

    def market(self, mint: str) -> Market | None:
        return self.markets.get(mint)

    def add(self, order: LiveOrder) -> None:
        """Wait for ``order``'s trade (sent now, or taken over after a restart)."""
        self.pending.setdefault(order.order_id, order)

    def answered(self, order_id: str, signature: str) -> bool:
        """The API gave ``signature``; False when the order is no longer pending."""
        order = self.pending.get(order_id)
        if order is None:
            return False
        order.signature, order.awaiting = signature, False
        claimed = self.unclaimed.pop(signature, None)
        if claimed is not None:
            del self.pending[order_id]
            self._settle(order, claimed.trade, claimed.sol)
        self._resolve(order.mint, order.side)
        return True

    def unanswered(self, order_id: str) -> None:
        """No answer will come for the order: a trade of the wallet consistent with it
        fills it."""
        order = self.pending.get(order_id)
        if order is not None:
            order.awaiting = False
            self._resolve(order.mint, order.side)

    def settled(self) -> list[Confirmation]:
        """The fills answers settled since the last call (then forgotten)."""
        found, self._settled = self._settled, []
        return found

    def unbooked(self) -> list[UnbookedTrade]:
        """The trades of the wallet found to match no order since the last call."""
        found, self._unbooked = self._unbooked, []
        return found

    def early(self) -> list[EarlyTrade]:
        """The trades of the wallet that began to wait for answers since the last call
        (then forgotten)."""
        found, self._early = self._early, []
        return found

    def restore_early(self, trades: list[EarlyTrade]) -> list[Confirmation]:
        """Judge again the trades of the wallet that waited for answers when the replica
        that saw them went (a take-over): the fills they confirm; the rest wait again or
        are unbooked, as any trade of the wallet showing now."""
        confirmations = []
        for early in trades:
            confirmation = self._confirm(early.trade, early.time, moved=early.sol)
            if confirmation is not None:
                confirmations.append(confirmation)
        return confirmations

    def refused(self, order_id: str, reason: str, *, answered: bool = True) -> OrderRejected | None:
        """The API refused without a signature: nothing was sent, the order is rejected.

        ``answered``: the API answered the refusal; an API never reached (no connection)
        refuses too, and then the market is no cause.
        """
        order = self.pending.pop(order_id, None)
        if order is None:
            return None
        self._resolve(order.mint, order.side)
        slipped = self._slippage_refusal(order) if answered else None
        if slipped is None:
            return rejected(order, reason)
        return rejected(order, f"{reason} ({slipped.reason})", cause=slipped.cause)

    def observe(self, payload: object, *, time: float) -> list[Confirmation]:
        """Take a token event the feed stamped ``time``; return the orders its trade
        confirms."""
        if not isinstance(payload, TokenTrade | TokenCreated | TokenMigrated):
            return []
        confirmations: list[Confirmation] = []
        if isinstance(payload, TokenTrade) and payload.traderPublicKey == self.execution.wallet:
            confirmation = self._confirm(payload, time)
            if confirmation is not None:
                confirmations.append(confirmation)
        self.markets.setdefault(payload.mint, Market()).apply(payload)
        return confirmations

    def due(self, now: float) -> list[OrderRejected]:
        """Give up the orders whose trade has not shown by their deadline."""
        given_up = []
        for order in [o for o in self.pending.values() if o.deadline <= now]:
            if self.pending.pop(order.order_id, None) is None:
                continue  # filled by the trade an earlier one's resolve gave it
            wait = f"{self.execution.confirm_s:g} s"
            if order.signature is None:
                reason = (
                    f"unconfirmed: no answer from the trade API and no trade of the wallet "
                    f"on the token within {wait}"
                )
                near = [u.signature for u in self.recent_unbooked if order.order_id in u.candidates]
                if near:
                    reason += (
                        f"; the wallet's {order.side} {', '.join(near)} on the token matched "
                        "no order (its price past the slippage, or made by hand): unbooked"
                    )
            else:
                self.given_up(order)
                reason = (
                    f"unconfirmed: signature {order.signature} showed in no trade of the "
                    f"wallet within {wait}; its blockhash has expired"
                )
            given_up.append(rejected(order, reason))
            if order.awaiting:
                self._resolve(order.mint, order.side)
        return given_up

    def given_up(self, order: LiveOrder) -> None:
        """Remember ``order``, given up as unconfirmed with its signature (here, or before
        a take-over): its trade, should it show late, is booked all the same."""
        assert order.signature is not None
        self.expired[order.signature] = order
        while len(self.expired) > REMEMBERED_EXPIRED:
            self.expired.popitem(last=False)

    def booked(self, signature: str) -> None:
        """Remember ``signature``, a trade of the wallet booked as an order's fill (here,
        or before a take-over): delivered again (its fill stored, its delivery not
        acknowledged), it fills nothing and is no trade the book lacks."""
        self.filled[signature] = None
        self.filled.move_to_end(signature)
        while len(self.filled) > REMEMBERED_BOOKED:
            self.filled.popitem(last=False)

    def next_due(self) -> float | None:
        return min((o.deadline for o in self.pending.values()), default=None)

    def forget(self, mint: str) -> None:
        """Drop a token's market once no order waits there."""
        if all(o.mint != mint for o in self.pending.values()):
            self.markets.pop(mint, None)

    # ---------------------------------------------------------------- internals

    def _confirm(
        self, trade: TokenTrade, time: float, *, moved: float | None = None
    ) -> Confirmation | None:
        signature = trade.signature
        if signature in self.filled or any(u.signature == signature for u in self.recent_unbooked):
            # judged already (here, or before a take-over): a delivery again, neither a
            # fill nor unbooked again
            return None
        if moved is None:
            moved = self._moved(trade)
        order, late = self._match(trade, moved, time)
        if order is None:
            if self._unanswered(trade.mint, trade.txType, awaiting=True):
                early = EarlyTrade(trade=trade, sol=moved, time=time)
                self.unclaimed[trade.signature] = early
                self._early.append(early)
            else:
                self._unbook(trade, moved, time)
            return None
        self.booked(trade.signature)
        fill = confirmed_fill(order, trade, execution=self.execution, moved_sol=moved)
        return Confirmation(fill=fill, late=late)

    def _match(self, trade: TokenTrade, moved: float, time: float) -> tuple[LiveOrder | None, bool]:
        """The order ``trade`` (the wallet's) confirms: by signature, else, when no order of
        the token and side awaits its answer, the oldest one consistent with it whose
        answer never came."""
        for order in self.pending.values():
            if order.signature == trade.signature:
                del self.pending[order.order_id]
                return order, False
        late = self.expired.pop(trade.signature, None)
        if late is not None:
            return late, True
        if self._unanswered(trade.mint, trade.txType, awaiting=True):
            return None, False
        return self._claim(trade, moved, time), False

    def _claim(self, trade: TokenTrade, moved: float, time: float) -> LiveOrder | None:
        """Take the oldest order whose answer never came that ``trade`` is consistent with;
        None when it is no order's."""
        candidates = [
            o
            for o in self._unanswered(trade.mint, trade.txType, awaiting=False)
            if consistent(o, trade, time=time, execution=self.execution, moved_sol=moved)
        ]
        if not candidates:
            return None
        order = min(candidates, key=lambda o: o.deadline)
        del self.pending[order.order_id]
        return order

    def _unanswered(self, mint: str, side: str, *, awaiting: bool) -> list[LiveOrder]:
        """Orders of the token and side without a signature, whose answer may still come
        (``awaiting``) or never will."""
        return [
            o
            for o in self.pending.values()
            if o.signature is None and o.awaiting is awaiting and o.mint == mint and o.side == side
        ]

    def _resolve(self, mint: str, side: str) -> None:
        """Once no answer is awaited on the token and side, give the trades waiting there to
        the orders whose answer never came that they are consistent with, oldest first;
        the rest are not the system's."""
        if self._unanswered(mint, side, awaiting=True):
            return
        waiting = [
            s for s, e in self.unclaimed.items() if e.trade.mint == mint and e.trade.txType == side
        ]
        for signature in waiting:
            early = self.unclaimed.pop(signature)
            order = self._claim(early.trade, early.sol, early.time)
            if order is not None:
                self._settle(order, early.trade, early.sol)
            else:
                self._unbook(early.trade, early.sol, early.time)

    def _unbook(self, trade: TokenTrade, moved: float, time: float) -> None:
        """Keep ``trade``, the wallet's, as matching no order."""
        unbooked = UnbookedTrade(
            signature=trade.signature,
            mint=trade.mint,
            side=trade.txType,
            tokens=float(trade.tokenAmount),
            sol=moved,
            time=time,
            candidates=tuple(
                o.order_id for o in self._unanswered(trade.mint, trade.txType, awaiting=False)
            ),
        )
        self.recent_unbooked.append(unbooked)
        self._unbooked.append(unbooked)

    def _settle(self, order: LiveOrder, trade: TokenTrade, moved: float) -> None:
        self.booked(trade.signature)
        fill = confirmed_fill(order, trade, execution=self.execution, moved_sol=moved)
        self._settled.append(Confirmation(fill=fill))

    def _slippage_refusal(self, order: LiveOrder) -> FillRejection | None:
        """The paper fill's refusal on slippage when the market the stream shows has moved
        past the order's limit since it was sent."""
        market = self.markets.get(order.mint)
        if order.expected is None or market is None or market.state is None:
            return None
        fill = fill_on_market(
            market,
            order.side,
            order.amount,
            expected=order.expected,
            venue=order.venue,
            slippage_pct=order.slippage_pct,
            execution=self.execution.fees,
        )
        slipped = isinstance(fill, FillRejection) and fill.cause == SLIPPAGE
        return fill if slipped else None

    def _moved(self, trade: TokenTrade) -> float:
        """SOL the trade moved in the reserves: its ``solAmount``, or (older frames) the
        change of the curve's virtual SOL since the token's last event."""
        if trade.solAmount is not None:
            return float(trade.solAmount)
        market = self.markets.get(trade.mint)
        if market is None or market.state is None:
            # no state before it: the tokens at the price the trade left
            return (
                float(trade.tokenAmount)
                * float(trade.vSolInBondingCurve)
                / float(trade.vTokensInBondingCurve)
            )
        return abs(float(trade.vSolInBondingCurve) - market.state.v_sol)
