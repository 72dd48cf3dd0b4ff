"""The position book: open positions, their marks, realised and unrealised PnL after fees.

A fill is an :class:`~pumpflow.common.events.OrderFilled` whatever executed it (paper
or live): a buy's ``sol_amount`` is everything spent on it (venue fee, trade-API fee
included), a sale's is everything received after every fee. So a position's
``cost_sol`` is its cost basis with every fee, and realised PnL is what sales brought
less the share of the cost basis they sold. A mark values the tokens held at what
selling them all at once would bring after every fee (:func:`~.fills.exit_value`: the
curve's own impact and fee, the API's fee; and the fee a sale pays whatever its size,
live execution's priority fee), so unrealised PnL is what closing now would realise.

One position per token at a time; its id is the order id of the buy that opened it
(deterministic, see :func:`~.decisions.order_id_for`). A buy for a token already held
adds to its position. A sale belongs to the position it was ordered for (its order's
position id): its fill never sells another position of the token, opened since.

A sale is sized against what the position holds less what its sales in flight ask
for (:meth:`PositionBook.reserve_sale`): each sale reserves its tokens until its
outcome (its fill, which takes the tokens it sold out of the holding in the same step,
or :meth:`PositionBook.release_sale` on a rejection), so sales that overlap (a rule's
sale and a tranche of the graceful exit, say) never ask the venue together for more
than is held: neither the paper broker nor the chain knows what the book holds.

Persistence: the trading service writes each order (id, token, side, amounts, state:
requested, sent, unknown, filled, rejected), each fill and each position's change to its
ledger in one transaction; the book here is what it rebuilds on start by applying the
stored fills in order (:meth:`PositionBook.apply_fill` is deterministic and idempotent
per order id), before reconciling the orders whose outcome is unknown.

Memory is bounded over a long run: a closed position stays in memory only among the
latest ``closed_kept`` (the ledger keeps them all), and what every closed position adds
up to is kept as numbers (:attr:`PositionBook.closed_count`,
:attr:`PositionBook.closed_fees_sol`, the realised PnL). So a rebuild applies only the
fills of the positions open or closed within ``REALIZATIONS_KEPT_S`` (what the daily
loss limit reads) and takes every position's totals from the ledger
(:meth:`PositionBook.restore_totals`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from pumpflow.common.curve import CurveState
from pumpflow.common.events import OrderFilled, PositionClosed, PositionOpened, PositionUpdated
from pumpflow.common.trading.fills import VENUE_CURVE, exit_value
from pumpflow.common.trading.settings import PaperExecution

#: tokens below which a position counts as sold out (6-decimal base units)
DUST_TOKENS = 1e-6
#: how long realised PnL is kept in memory for :meth:`PositionBook.realized_since`
#: (the daily loss limit reads today's; the ledger keeps them all)
REALIZATIONS_KEPT_S = 2 * 86_400.0
#: closed positions kept in memory, the latest: the one a fill just closed is its ledger
#: row's, the views show the latest while the ledger may lack their last change (a commit
#: behind), and a fill of one delivered again counts once. An executor gives one outcome
#: an order, so a copy comes within seconds, and a hundred closes are hours of trading at
#: hundreds of positions a day. Older ones are read from the ledger.
CLOSED_KEPT = 100


@dataclass(slots=True, kw_only=True)
class Position:
    """One token's holding."""

    position_id: str
    mint: str
    opened_at: float
    tokens: float = 0.0
    #: cost basis of the tokens held, every fee included
    cost_sol: float = 0.0
    #: what all fills bought, and what they cost with fees (for the entry price)
    bought_tokens: float = 0.0
    bought_sol: float = 0.0
    realized_pnl_sol: float = 0.0
    fees_sol: float = 0.0
    #: SOL selling the tokens held would bring after every fee, at the last mark
    mark_value_sol: float | None = None
    mark_price: float | None = None
    marked_at: float | None = None
    #: the market the last mark was taken on, to value the holding again after a fill
    mark_state: CurveState | None = None
    mark_venue: str = VENUE_CURVE
    closed_at: float | None = None
    close_reason: str = ""
    #: ids of the orders whose fills were booked to it
    order_ids: list[str] = field(default_factory=list)

    @property
    def is_open(self) -> bool:
        return self.closed_at is None

    @property
    def entry_price(self) -> float:
        """SOL paid per token bought, fees included."""
        return self.bought_sol / self.bought_tokens if self.bought_tokens else 0.0

    @property
    def marked(self) -> bool:
        """Whether the holding has a worth: closed, or marked by a trade of its token seen
        since its entry. An unmarked one's worth is unknown, not its cost."""
        return not self.is_open or self.mark_value_sol is not None

    @property
    def marked_pnl_sol(self) -> float | None:
        """The unrealised PnL at the last mark; None while :attr:`marked` is not."""
        if not self.is_open:
            return 0.0
        if self.mark_value_sol is None:
            return None
        return self.mark_value_sol - self.cost_sol

    @property
    def unrealized_pnl_sol(self) -> float:
        """:attr:`marked_pnl_sol`, an unmarked holding left out as 0 (the book's sums)."""
        marked = self.marked_pnl_sol
        return 0.0 if marked is None else marked

    @property
    def pnl_sol(self) -> float:
        return self.realized_pnl_sol + self.unrealized_pnl_sol

    def payload_fields(self) -> dict:
        return {
            "position_id": self.position_id,
            "mint": self.mint,
            "token_amount": self.tokens,
            "cost_sol": self.cost_sol,
            "entry_price": self.entry_price,
            "mark_price": self.mark_price,
            "realized_pnl_sol": self.realized_pnl_sol,
            "unrealized_pnl_sol": self.unrealized_pnl_sol,
        }


PositionChange = PositionOpened | PositionUpdated | PositionClosed


@dataclass(frozen=True, slots=True)
class SaleReservation:
    """What a sale may sell: its tokens, reserved; none, with the reason, when nothing
    is left."""

    tokens: float
    reason: str = ""

    def __bool__(self) -> bool:
        return self.tokens > 0


@dataclass(slots=True)
class PositionBook:
    """Positions in memory; the service persists what changes (see the module docstring)."""

    execution: PaperExecution = field(default_factory=PaperExecution)
    #: SOL a sale pays whatever its size (live execution's priority fee)
    sale_fee_sol: float = 0.0
    open_positions: dict[str, Position] = field(default_factory=dict)
    #: the latest closed positions, oldest first, at most ``closed_kept``
    closed_positions: deque[Position] = field(default_factory=deque)
    closed_kept: int = CLOSED_KEPT
    #: positions closed, and their fees, those no longer kept included
    closed_count: int = 0
    closed_fees_sol: float = 0.0
    #: ids of the orders whose fills were booked to the positions kept (open, or among
    #: the latest closed), so a fill delivered twice counts once
    applied_orders: set[str] = field(default_factory=set)
    #: order id -> (mint, tokens) of the sales sent and not yet filled or rejected
    sales: dict[str, tuple[str, float]] = field(default_factory=dict)
    #: (time, realised PnL) of the recent sales, oldest first, to sum a new day's again
    realizations: deque[tuple[float, float]] = field(default_factory=deque)
    #: realised PnL of every sale
    realized_total: float = 0.0
    #: the start :meth:`realized_since` was last asked for, and the running sum since then
    running_since: float | None = None
    running_realized: float = 0.0

    # ---------------------------------------------------------------- queries

    def position(self, mint: str) -> Position | None:
        return self.open_positions.get(mint)

    def holds(self, mint: str) -> bool:
        return mint in self.open_positions

    def last_closed_at(self, mint: str) -> float | None:
        """When ``mint``'s latest position among the closed ones kept was closed."""
        for position in reversed(self.closed_positions):
            if position.mint == mint:
                return position.closed_at
        return None

    @property
    def open_count(self) -> int:
        return len(self.open_positions)

    @property
    def mints_held(self) -> Collection[str]:
        return self.open_positions.keys()

    def selling(self, mint: str) -> float:
        """Tokens of ``mint`` the sales in flight ask for."""
        return sum(tokens for m, tokens in self.sales.values() if m == mint)

    def sellable(self, mint: str) -> float:
        """Tokens of ``mint`` held and not asked for by a sale in flight."""
        position = self.open_positions.get(mint)
        held = position.tokens if position is not None else 0.0
        return max(0.0, held - self.selling(mint))

    def not_held(self, mint: str, position_id: str | None) -> str:
        """Why a sale of ``mint`` ordered for ``position_id`` has no position to sell from
        (none held, or the token's position is another one: it closed and the token was
        entered again); empty when it has. A sale without a position id sells the
        token's."""
        position = self.open_positions.get(mint)
        if position is None:
            return "no position held"
        if position_id is not None and position.position_id != position_id:
            return (
                f"position {position_id} is not held (the token's position is "
                f"{position.position_id})"
            )
        return ""

    def exposure(self, mint: str) -> float:
        """Cost basis held in ``mint``."""
        position = self.open_positions.get(mint)
        return position.cost_sol if position else 0.0

    @property
    def total_exposure(self) -> float:
        return sum((p.cost_sol for p in self.open_positions.values()), 0.0)

    @property
    def realized_pnl_sol(self) -> float:
        return self.realized_total

    @property
    def fees_sol(self) -> float:
        """Fees of every position, open and closed."""
        return self.closed_fees_sol + sum((p.fees_sol for p in self.open_positions.values()), 0.0)

    @property
    def unrealized_pnl_sol(self) -> float:
        """The open positions' unrealised PnL at their marks, the unmarked left out."""
        return sum((p.unrealized_pnl_sol for p in self.open_positions.values()), 0.0)

    @property
    def unmarked_count(self) -> int:
        """Open positions no trade has marked since their entry (worth unknown)."""
        return sum(not p.marked for p in self.open_positions.values())

    def realized_since(self, since: float) -> float:
        """Realised PnL of the sales at or after ``since`` (within ``REALIZATIONS_KEPT_S``).

        A running sum: each sale adds to it, and it is summed again only when ``since``
        changes (the daily loss limit asks with the day's start on every event).
        """
        if since != self.running_since:
            self.running_since = since
            self.running_realized = sum(pnl for time, pnl in self.realizations if time >= since)
        return self.running_realized

    # ---------------------------------------------------------------- changes

    def reserve_sale(
        self, order_id: str, mint: str, tokens: float, *, position_id: str | None = None
    ) -> SaleReservation:
        """Reserve for the sale ``order_id`` up to ``tokens`` of ``mint``: no more than is
        held less what the other sales in flight ask for; nothing, and why, when nothing
        is left or the token's position is not ``position_id`` (the sale was ordered for
        one that closed since). Reserved until the sale's fill or :meth:`release_sale`."""
        self.sales.pop(order_id, None)
        position = self.open_positions.get(mint)
        other = self.not_held(mint, position_id)
        if position is not None and other:
            return SaleReservation(0.0, f"nothing to sell: {other}")
        left = self.sellable(mint)
        if left <= DUST_TOKENS:
            if position is None:
                return SaleReservation(0.0, "nothing to sell: no position held")
            return SaleReservation(
                0.0,
                f"nothing to sell: the {position.tokens:g} tokens held are all asked for "
                f"by sales in flight ({self.selling(mint):g} tokens)",
            )
        amount = min(tokens, left)
        if amount <= 0:
            return SaleReservation(0.0, f"nothing to sell: {tokens:g} tokens asked for")
        self.sales[order_id] = (mint, amount)
        return SaleReservation(amount)

    def resume_sale(self, order_id: str, mint: str, tokens: float) -> None:
        """Reserve what a sale sent before a restart asks for: it is in flight for all of
        it, whatever is left to sell."""
        if tokens > 0:
            self.sales[order_id] = (mint, tokens)

    def release_sale(self, order_id: str) -> None:
        """The sale ``order_id`` was refused (or never sent): its tokens may sell again."""
        self.sales.pop(order_id, None)

    def restore_totals(
        self, *, realized_pnl_sol: float, closed_count: int, closed_fees_sol: float
    ) -> None:
        """Take the totals of every position as the ledger keeps them (a rebuild that
        applied only the fills of the recent positions): the realised PnL of all, open
        ones included, and the count and fees of those closed."""
        self.realized_total = realized_pnl_sol
        self.closed_count = closed_count
        self.closed_fees_sol = closed_fees_sol

    def apply_fill(
        self, fill: OrderFilled, *, time: float, reason: str = ""
    ) -> PositionChange | None:
        """Book a fill; the position change to publish, or None for a repeated order id or
        a sale of a position not held (:meth:`not_held`), which changes nothing.

        A sale's reservation ends here, as the tokens it sold leave the holding.
        """
        self.sales.pop(fill.order_id, None)
        if fill.order_id in self.applied_orders:
            return None
        if fill.side == "buy":
            return self._buy(fill, time)
        return self._sell(fill, time, reason)

    def mark(
        self, mint: str, state: CurveState, *, time: float, venue: str = VENUE_CURVE
    ) -> Position | None:
        """Value ``mint``'s position on the market ``state`` (a trade of the token)."""
        position = self.open_positions.get(mint)
        if position is None:
            return None
        position.mark_state = state
        position.mark_venue = venue
        position.mark_price = state.price
        position.marked_at = time
        self._value(position)
        return position

    # ---------------------------------------------------------------- internals

    def _value(self, position: Position) -> None:
        if position.mark_state is not None:
            value = exit_value(
                position.mark_state,
                position.tokens,
                execution=self.execution,
                venue=position.mark_venue,
            )
            position.mark_value_sol = value - self.sale_fee_sol if position.tokens > 0 else 0.0

    def _buy(self, fill: OrderFilled, time: float) -> PositionChange:
        position = self.open_positions.get(fill.mint)
        opened = position is None
        if position is None:
            position_id = fill.position_id or fill.order_id
            position = Position(position_id=position_id, mint=fill.mint, opened_at=time)
            self.open_positions[fill.mint] = position
        self._booked(position, fill.order_id)
        position.tokens += fill.token_amount
        position.cost_sol += fill.sol_amount
        position.bought_tokens += fill.token_amount
        position.bought_sol += fill.sol_amount
        position.fees_sol += fill.fee_sol
        self._value(position)
        if opened:
            return PositionOpened(**position.payload_fields())
        return PositionUpdated(**position.payload_fields())

    def _sell(self, fill: OrderFilled, time: float, reason: str) -> PositionChange | None:
        if self.not_held(fill.mint, fill.position_id):
            # a sale sells the position it was ordered for, never the next one of its token
            return None
        position = self.open_positions[fill.mint]
        if position.tokens <= 0:
            return None
        self._booked(position, fill.order_id)
        sold = min(fill.token_amount, position.tokens)
        share = sold / position.tokens
        released = position.cost_sol * share
        # a sale of more than is held is booked for what was held: the rest was never ours
        booked = sold / fill.token_amount if fill.token_amount > sold else 1.0
        realized = fill.sol_amount * booked - released
        position.realized_pnl_sol += realized
        position.fees_sol += fill.fee_sol * booked
        position.cost_sol -= released
        position.tokens -= sold
        self._value(position)
        self.realizations.append((time, realized))
        while self.realizations[0][0] < time - REALIZATIONS_KEPT_S:
            self.realizations.popleft()
        self.realized_total += realized
        if self.running_since is not None and time >= self.running_since:
            self.running_realized += realized
        if position.tokens <= DUST_TOKENS:
            position.tokens = 0.0
            position.cost_sol = 0.0
            position.closed_at = time
            position.close_reason = reason
            del self.open_positions[fill.mint]
            self._keep_closed(position)
            return PositionClosed(**position.payload_fields(), reason=reason)
        return PositionUpdated(**position.payload_fields())

    def _booked(self, position: Position, order_id: str) -> None:
        position.order_ids.append(order_id)
        self.applied_orders.add(order_id)

    def _keep_closed(self, position: Position) -> None:
        """Count ``position`` closed; keep it among the latest, the oldest of which goes
        with its order ids."""
        self.closed_count += 1
        self.closed_fees_sol += position.fees_sol
        self.closed_positions.append(position)
        while len(self.closed_positions) > self.closed_kept:
            self.applied_orders.difference_update(self.closed_positions.popleft().order_ids)
