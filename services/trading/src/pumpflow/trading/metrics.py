"""Metrics of the trading service, on an injected registry."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pumpflow.common.events import Side
from pumpflow.common.metrics import families
from pumpflow.common.trading import (
    BREAKERS,
    LIMITS,
    PositionBook,
    RiskLimits,
    RiskManager,
    TradingState,
)

#: the target is a p99 within 25 ms; the tail shows a backlog
RECEIPT_TO_DECISION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.075, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

#: what the book does not hold though the wallet moved by it (see ``unbooked``)
UNBOOKED_KINDS = ("wallet_trade", "sale_of_closed_position")
#: who may execute orders (see ``executor``)
EXECUTORS = ("paper", "live")
#: what became of an order (see ``order``)
ORDER_OUTCOMES = ("sent", "filled", "rejected", "duplicate")
#: what an operator does to the risk limits (see ``limit_changes``)
LIMIT_CHANGES = ("set", "reset")
#: a prediction's outcome, by whether it led to an order
PREDICTION_OUTCOMES = {True: "order", False: "no_order"}


class _Families:
    def __init__(self, registry: CollectorRegistry):
        self.orders = Counter(
            "pumpflow_trading_orders",
            "Orders by side and what became of them (sent, filled, rejected, duplicate)",
            ["side", "outcome"],
            registry=registry,
        )
        self.fill_sol = Counter(
            "pumpflow_trading_fill_sol",
            "SOL of fills: spent on buys, received from sales (after every fee)",
            ["side"],
            registry=registry,
        )
        self.fees = Counter(
            "pumpflow_trading_fees_sol", "Fees paid on fills (venue and API)", registry=registry
        )
        self.pnl = Gauge(
            "pumpflow_trading_pnl_sol", "PnL after every fee, by kind", ["kind"], registry=registry
        )
        self.capital = Gauge(
            "pumpflow_trading_capital_sol", "Capital the limits are fractions of", registry=registry
        )
        self.exposure = Gauge(
            "pumpflow_trading_exposure_sol",
            "Cost basis held and entries in flight",
            registry=registry,
        )
        self.positions = Gauge("pumpflow_trading_open_positions", "Tokens held", registry=registry)
        self.executor = Gauge(
            "pumpflow_trading_executor",
            "1 for who executes orders (paper, or live: real money through the trade API)",
            ["executor"],
            registry=registry,
        )
        self.state = Gauge(
            "pumpflow_trading_state",
            "1 for the trading state in force (active, reducing, halted)",
            ["state"],
            registry=registry,
        )
        self.breaker = Gauge(
            "pumpflow_trading_breaker_tripped",
            "1 while the circuit breaker is tripped",
            ["breaker"],
            registry=registry,
        )
        self.trips = Counter(
            "pumpflow_trading_breaker_trips", "Circuit breaker trips", ["breaker"],
            registry=registry,
        )  # fmt: skip
        self.predictions = Counter(
            "pumpflow_trading_predictions",
            "Predictions decided on: an order, or none (filters, limits, state, seen before)",
            ["outcome"],
            registry=registry,
        )
        self.receipt_to_decision = Histogram(
            "pumpflow_receipt_to_decision_seconds",
            "Clock seconds from the feed's receipt of a frame to the decision on the "
            "prediction it led to (through features and model)",
            buckets=RECEIPT_TO_DECISION_BUCKETS,
            registry=registry,
        )
        self.leader = Gauge(
            "pumpflow_trading_leader",
            "1 while this replica holds the lease and trades",
            registry=registry,
        )
        self.operator_state_stored = Gauge(
            "pumpflow_trading_operator_state_stored",
            "0 while the operator's state given to this replica (a halt) waits for the "
            "ledger: a take-over or a restart does not know of it, nor, given to a stand-by, "
            "does the trading replica",
            registry=registry,
        )
        self.sales_in_flight = Gauge(
            "pumpflow_trading_sales_in_flight",
            "Sales sent and not yet filled or rejected (their tokens are not for another sale)",
            registry=registry,
        )
        self.sales_refused = Counter(
            "pumpflow_trading_sales_refused",
            "Sales refused unsent, nothing left to sell: the position's tokens all asked for "
            "by sales in flight, or none held",
            registry=registry,
        )
        self.unbooked = Counter(
            "pumpflow_trading_unbooked_trades",
            "Trades the book does not hold, by kind: a sale filled for a position closed "
            "since (sale_of_closed_position), a trade of the live wallet no order matches "
            "(wallet_trade): the wallet and the book differ by it",
            ["kind"],
            registry=registry,
        )
        self.over_limit = Counter(
            "pumpflow_trading_fills_over_limit",
            "Buys booked past their limit check (the late fill of a live order given up as "
            "unconfirmed, or one dearer than its order reserved) that left a limit exceeded, "
            "by limit: per_trade (the fill's cost), token_exposure, total_exposure, positions",
            ["limit"],
            registry=registry,
        )
        self.limit = Gauge(
            "pumpflow_trading_limit",
            "The risk limits in force (the settings', or the operator's over them: GET "
            "/limits says which), by name: fractions of capital, a count, seconds "
            "(reentry_cooldown_s), a switch 1 or 0 (add_to_positions)",
            ["limit"],
            registry=registry,
        )
        self.limit_changes = Counter(
            "pumpflow_trading_limit_changes",
            "Operators' changes of the risk limits: set (PUT /limits), reset to the "
            "settings (DELETE /limits)",
            ["action"],
            registry=registry,
        )


class TradingMetrics:
    """Orders, fills, fees, PnL, exposure, the trading state and the breakers, the sales
    in flight and refused, and whether the operator's state given here is stored."""

    def __init__(self, *, registry: CollectorRegistry | None = None):
        self._f = families("trading", _Families, registry)
        # nothing given here waits for the ledger until a halt does
        self._f.operator_state_stored.set(1)
        # from 0, so the first of each (a breaker's first trip) shows as an increase
        for kind in UNBOOKED_KINDS:
            self._f.unbooked.labels(kind)
        for limit in LIMITS:
            self._f.over_limit.labels(limit)
        for breaker in BREAKERS:
            self._f.trips.labels(breaker)
        for action in LIMIT_CHANGES:
            self._f.limit_changes.labels(action)
        for side in get_args(Side):
            self._f.fill_sol.labels(side)
            for outcome in ORDER_OUTCOMES:
                self._f.orders.labels(side, outcome)
        for outcome in PREDICTION_OUTCOMES.values():
            self._f.predictions.labels(outcome)
        #: ordered -> its predictions counter (looked up once: one a prediction)
        self._predictions: dict[bool, Any] = {}

    def executor(self, name: str) -> None:
        for executor in EXECUTORS:
            self._f.executor.labels(executor).set(1 if executor == name else 0)

    def order(self, side: str, outcome: str) -> None:
        self._f.orders.labels(side, outcome).inc()

    def orders(self, side: str, outcome: str) -> float:
        return self._f.orders.labels(side, outcome)._value.get()

    def prediction(self, ordered: bool) -> None:
        counter = self._predictions.get(ordered)
        if counter is None:
            counter = self._predictions[ordered] = self._f.predictions.labels(
                PREDICTION_OUTCOMES[ordered]
            )
        counter.inc()

    def receipt_to_decision(self, seconds: float) -> None:
        self._f.receipt_to_decision.observe(seconds)

    def fill(self, side: str, sol: float, fee: float) -> None:
        self._f.fill_sol.labels(side).inc(sol)
        self._f.fees.inc(fee)

    def breaker(self, name: str, tripped: bool) -> None:
        self._f.breaker.labels(name).set(1 if tripped else 0)
        if tripped:
            self._f.trips.labels(name).inc()

    def leading(self, leader: bool) -> None:
        self._f.leader.set(1 if leader else 0)

    def state(self, current: TradingState | str) -> None:
        """Set the trading state in force to ``current``."""
        current = TradingState(current)
        for state in TradingState:
            self._f.state.labels(state.value).set(1 if state is current else 0)

    def operator_state(self, stored: bool) -> None:
        self._f.operator_state_stored.set(1 if stored else 0)

    def sale_refused(self) -> None:
        self._f.sales_refused.inc()

    def unbooked(self, kind: str) -> None:
        self._f.unbooked.labels(kind).inc()

    def unbooked_trades(self, kind: str) -> float:
        return self._f.unbooked.labels(kind)._value.get()

    def over_limit(self, limit: str) -> None:
        self._f.over_limit.labels(limit).inc()

    def fills_over_limit(self, limit: str) -> float:
        return self._f.over_limit.labels(limit)._value.get()

    def limits(self, limits: RiskLimits, names: Iterable[str]) -> None:
        """Export the limits ``names`` of ``limits`` in force."""
        for name in names:
            self._f.limit.labels(name).set(getattr(limits, name))

    def limit_change(self, action: str) -> None:
        self._f.limit_changes.labels(action).inc()

    def book(self, book: PositionBook, risk: RiskManager) -> None:
        f = self._f
        f.pnl.labels("realized").set(book.realized_pnl_sol)
        f.pnl.labels("unrealized").set(book.unrealized_pnl_sol)
        f.capital.set(risk.capital)
        f.exposure.set(risk.total_exposure)
        f.positions.set(book.open_count)
        f.sales_in_flight.set(len(book.sales))
        self.state(risk.state)
        for name in BREAKERS:
            f.breaker.labels(name).set(1 if risk.breakers[name].tripped else 0)
