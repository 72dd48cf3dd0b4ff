"""Metrics of the exit service, on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pumpflow.common.exit import DEADLINE, GRACEFUL, REQUESTED, RULES, ExitProgress
from pumpflow.common.metrics import families

#: the fields of :class:`ExitProgress` the graceful gauge shows, by ``what``
_PROGRESS = (
    "positions", "sold_out", "in_flight", "tranches", "tokens_left", "unconfirmed_tranches",
    "unconfirmed_tokens", "pending_tokens",
)  # fmt: skip
#: what became of an operator's sale request (see ``requested``)
REQUEST_OUTCOMES = ("ordered", "refused")
#: the rules whose sales are counted as they settle (a graceful exit's tranches are not)
SETTLED_RULES = (*RULES, REQUESTED)
#: every rule that names an exit order
ORDER_RULES = (*SETTLED_RULES, GRACEFUL, DEADLINE)
#: how a rule's sale settled (see ``settled``)
OUTCOMES = ("filled", "rejected")


class _Families:
    def __init__(self, registry: CollectorRegistry):
        self.exits = Counter(
            "pumpflow_exit_orders",
            "Exit orders sent, by rule (graceful and deadline for a graceful exit's)",
            ["rule"],
            registry=registry,
        )
        self.outcomes = Counter(
            "pumpflow_exit_outcomes",
            "Exit orders of the rules settled, by rule and outcome (filled, rejected); a "
            "graceful exit's tranches are counted in pumpflow_exit_graceful",
            ["rule", "outcome"],
            registry=registry,
        )
        self.slippage = Histogram(
            "pumpflow_exit_slippage",
            "Slippage of a settled exit: 1 - average fill price / mark when it began",
            ["rule"],
            buckets=(-0.1, -0.02, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=registry,
        )
        self.graceful = Gauge(
            "pumpflow_exit_graceful",
            "Graceful exit progress: positions, sold_out, in_flight, tranches, tokens_left; "
            "unconfirmed_tranches and unconfirmed_tokens (tranches whose outcome never came: "
            "they may have sold); pending_tokens (held back by rule sales ordered before "
            "it began, awaiting their outcome)",
            ["what"],
            registry=registry,
        )
        self.requests = Counter(
            "pumpflow_exit_sale_requests",
            "Operators' sale requests applied, by outcome (ordered; refused: no such "
            "position, a graceful exit selling it, all of it ordered already)",
            ["outcome"],
            registry=registry,
        )
        self.margin = Gauge(
            "pumpflow_exit_graceful_deadline_margin_seconds",
            "Clock seconds left to the graceful exit's deadline (at its end: the margin kept)",
            registry=registry,
        )


class ExitMetrics:
    """Exits by rule, slippage, graceful-exit progress (tranches unconfirmed included) and
    deadline margin."""

    def __init__(self, *, registry: CollectorRegistry | None = None):
        self._f = families("exit", _Families, registry)
        # from 0, so an operator's first sale refused, or a rule's first exit, shows as
        # an increase
        for outcome in REQUEST_OUTCOMES:
            self._f.requests.labels(outcome)
        for rule in ORDER_RULES:
            self._f.exits.labels(rule)
        for rule in SETTLED_RULES:
            for outcome in OUTCOMES:
                self._f.outcomes.labels(rule, outcome)

    def ordered(self, rule: str) -> None:
        self._f.exits.labels(rule).inc()

    def orders(self, rule: str) -> float:
        return self._f.exits.labels(rule)._value.get()

    def requested(self, outcome: str) -> None:
        self._f.requests.labels(outcome).inc()

    def settled(self, rule: str, outcome: str, slippage: float | None = None) -> None:
        self._f.outcomes.labels(rule, outcome).inc()
        if slippage is not None:
            self._f.slippage.labels(rule).observe(slippage)

    def progress(self, progress: ExitProgress) -> None:
        for what in _PROGRESS:
            self._f.graceful.labels(what).set(getattr(progress, what))
        self._f.margin.set(progress.deadline_margin_s)

    def margin(self, seconds: float) -> None:
        self._f.margin.set(seconds)
