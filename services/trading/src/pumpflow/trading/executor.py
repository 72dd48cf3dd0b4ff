"""Executors: who carries an order out. Paper (the default) fills on the token's own
stream; live (:mod:`pumpflow.trading.live`) sends to PumpPortal's trade API.

An executor carries out the orders the ledger stored: the engine's entries
(:meth:`TradeExecutor.start_entry`) and the exit service's sales
(:meth:`TradeExecutor.start_exit`). Both start an order and return, with its
outcome only when it is known at once (a refusal): the service goes on consuming
while an order is out and learns its outcome later, from the token events
(:meth:`TradeExecutor.observe`) and from time (:meth:`TradeExecutor.due`). (The
graceful exit's :class:`~pumpflow.common.exit.ExitExecutor` differs: its
``execute_exit`` waits for the sale's fill or refusal.) On start an executor is asked
about each order whose outcome the ledger does not know
(:meth:`TradeExecutor.reconcile`); what it learns of an order still pending (the API's
signature, or that no answer came) it gives the service to store
(:meth:`TradeExecutor.progress`). An outcome is an
:class:`~pumpflow.common.events.OrderFilled` or an
:class:`~pumpflow.common.events.OrderRejected`; the service books it.
"""

from __future__ import annotations

from typing import Protocol

from pumpflow.common.curve import CurveState
from pumpflow.common.events import ExitOrder, OrderFilled, OrderRejected, OrderRequested
from pumpflow.common.trading import (
    VENUE_CURVE,
    EarlyTrade,
    PaperBroker,
    PaperExecution,
    PaperOrder,
    UnbookedTrade,
)
from pumpflow.common.trading.orders import rejected
from pumpflow.common.trading.paper import Market
from pumpflow.trading.ledger import FillRecord, OrderOutcome, OrderRecord

Outcome = OrderFilled | OrderRejected


class TradeExecutor(Protocol):
    name: str

    def expected(self, mint: str) -> tuple[str, CurveState | None]:
        """The venue ``mint`` trades on and its state there, as an order decided now sees it."""
        ...

    async def start_entry(self, order: OrderRequested, *, time: float) -> Outcome | None:
        """Start buying as ``order`` (stored already, decided at ``time``) asks; its
        outcome if known at once, else None: it is in the executor's hands."""
        ...

    async def start_exit(self, order: ExitOrder, *, time: float) -> Outcome | None:
        """Start selling one exit order (stored already, at ``time``); its outcome if
        known at once, else None: it is in the executor's hands."""
        ...

    def observe(self, payload: object, *, time: float) -> list[Outcome]:
        """A token event stamped ``time``; the outcomes it shows."""
        ...

    def due(self, now: float) -> list[Outcome]:
        """Outcomes that time has brought by ``now``."""
        ...

    def next_due(self) -> float | None: ...

    def reconcile(self, order: OrderRecord) -> Outcome | None:
        """An order of this executor the ledger has no outcome for (a restart): its
        outcome, or None when it is in the executor's hands again and its outcome comes
        later. (The service rejects another executor's.)"""
        ...

    def progress(self) -> list[OrderOutcome]:
        """What became known of orders still pending since the last call, to store."""
        ...

    def unbooked(self) -> list[UnbookedTrade]:
        """The trades of the live wallet found to match no order since the last call."""
        ...

    def early(self) -> list[EarlyTrade]:
        """The trades of the live wallet that began to wait for their orders' answers since
        the last call: to keep in the ledger until their fills or unbooking are stored."""
        ...

    def restore_early(self, trades: list[EarlyTrade]) -> list[Outcome]:
        """The trades of the live wallet that waited for answers when the replica that saw
        them went (a take-over, after the orders are reconciled): the fills they show."""
        ...

    def restore_unbooked(self, trades: list[UnbookedTrade]) -> None:
        """The unbooked trades the ledger keeps (a take-over): an order given up names
        those that may be its."""
        ...

    def given_up(self, order: OrderRecord) -> None:
        """An order rejected unconfirmed (given up, or refused by a take-over after it was
        sent), with what it was sent as: its trade, should it show late after all, is
        booked."""
        ...

    def booked(self, fill: FillRecord) -> None:
        """A fill stored before a take-over: the trade of the live wallet it was, should
        its delivery come again, is its own and no other order's nor unbooked."""
        ...

    def restore_market(self, mint: str, market: Market) -> None:
        """``mint``'s market as the stored token view holds it (a take-over): where its
        orders fill until the token's next event."""
        ...

    def forget(self, mint: str) -> None: ...

    async def close(self) -> None:
        """Stop what is in flight (the ledger keeps those orders to reconcile)."""
        ...


class PaperExecutor:
    """Paper execution: :class:`~pumpflow.common.trading.PaperBroker` fills the orders."""

    name = "paper"

    def __init__(self, execution: PaperExecution | None = None):
        self.broker = PaperBroker(execution or PaperExecution())

    def expected(self, mint: str) -> tuple[str, CurveState | None]:
        market = self.broker.market(mint)
        if market is None:
            return VENUE_CURVE, None
        return market.venue, market.state

    async def start_entry(self, order: OrderRequested, *, time: float) -> Outcome | None:
        return self._submit(order, time)

    async def start_exit(self, order: ExitOrder, *, time: float) -> Outcome | None:
        return self._submit(order, time)

    def _submit(self, order: OrderRequested | ExitOrder, time: float) -> Outcome | None:
        outcome = self.broker.submit(order, time=time)
        return None if outcome is None else outcome.result

    def observe(self, payload: object, *, time: float) -> list[Outcome]:
        return [o.result for o in self.broker.observe(payload, time=time)]

    def due(self, now: float) -> list[Outcome]:
        return [o.result for o in self.broker.due(now)]

    def next_due(self) -> float | None:
        return self.broker.next_due()

    def reconcile(self, order: OrderRecord) -> Outcome | None:
        """Queue the order again as it was submitted: it fills where it would have, on the
        token's stream after its latency (the broker's queue was lost with the process)."""
        amount = order.sol_amount if order.side == "buy" else order.token_amount
        if order.expected_v_sol is None or order.expected_v_tokens is None or not amount:
            return rejected(order, "no market data when the order was decided")
        self.broker.resume(
            PaperOrder(
                order_id=order.order_id,
                mint=order.mint,
                side=order.side,
                submitted_at=order.requested_at,
                due_at=order.requested_at + self.broker.execution.latency_s,
                amount=float(amount),
                slippage_pct=order.slippage_pct,
                expected=CurveState(v_sol=order.expected_v_sol, v_tokens=order.expected_v_tokens),
                venue=order.venue,
                position_id=order.position_id,
            )
        )
        return None

    def restore_market(self, mint: str, market: Market) -> None:
        self.broker.markets[mint] = Market(venue=market.venue, state=market.state)

    def forget(self, mint: str) -> None:
        self.broker.forget(mint)

    def progress(self) -> list[OrderOutcome]:
        return []

    def unbooked(self) -> list[UnbookedTrade]:
        return []  # no wallet trades on paper

    def early(self) -> list[EarlyTrade]:
        return []

    def restore_early(self, trades: list[EarlyTrade]) -> list[Outcome]:
        return []  # a live executor's: judged when one trades again

    def restore_unbooked(self, trades: list[UnbookedTrade]) -> None:
        return None

    def given_up(self, order: OrderRecord) -> None:
        return None  # a paper order's outcome is never late

    def booked(self, fill: FillRecord) -> None:
        return None  # no wallet trades on paper

    async def close(self) -> None:
        return None
