"""Gather a report's results from trading's ledger and, in process, from the bus and the model.

:func:`from_ledger` reads any trading ledger (the embedded run's memory one, or a
deployment's Postgres tables of migration 0005) through its read methods: positions
become trades, each filled order with the market its decision saw gives a slippage, and
the fills, applied in order to a position book as trading rebuilds its own, give each
sale's realised PnL and each position's buys as the book counts them.
:class:`Collector` rides the bus of an embedded system for what no ledger keeps: the
tokens by lifecycle state reached and the arm whose prediction ordered each entry;
:func:`calibration_of` takes the model's resolved
labels, :func:`model_figures` its predictions and live figures by model and arm, both
over every label of the stream (:func:`stream_performance`).
Nothing here changes what it reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from pumpflow.common.bus.abc import Subscription
from pumpflow.common.events import (
    Event,
    ModelPrediction,
    OrderRequested,
    TokenCreated,
    TokenLifecycle,
)
from pumpflow.common.trading import PositionBook
from pumpflow.report.results import (
    Calibration,
    Results,
    Sale,
    Slippage,
    Trade,
    calibration_bins,
)

#: far more rows than any run has: the ledger's reads want a limit
ALL_ROWS = 10_000_000
#: an order's state in the ledger, as the reports say it
ORDER_STATES = {"sent": "in flight"}


def slippage_pct(side: str, price: float, expected_v_sol: float, expected_v_tokens: float) -> float:
    """A fill's price against the spot price of the reserves its decision saw, in percent;
    positive is worse for the order's side."""
    expected = expected_v_sol / expected_v_tokens
    ratio = price / expected
    return 100.0 * (ratio - 1.0 if side == "buy" else 1.0 - ratio)


async def from_ledger(
    ledger: Any,
    *,
    title: str,
    source: str,
    unrealized: Mapping[str, float | None] | None = None,
) -> Results:
    """The trades, slippage and orders of ``ledger``. An open position is worth
    ``unrealized[position_id]`` when given (what selling it would bring after fees),
    else its tokens at its mark price less its cost; None (unmarked) without either."""
    positions = await ledger.positions(open_only=False, limit=ALL_ROWS)
    orders = await ledger.orders(limit=ALL_ROWS)
    fills = (await ledger.load(remembered=0)).fills
    sales, bought = booked(fills)
    trades = []
    # ties in the order of their tokens: their ids differ from run to run
    for p in sorted(positions, key=lambda p: (p["opened_at"], p["mint"], p["position_id"])):
        marked: float | None = 0.0
        if p["closed_at"] is None:
            if unrealized is not None and p["position_id"] in unrealized:
                marked = unrealized[p["position_id"]]
            elif p["mark_price"] is not None:
                marked = p["token_amount"] * p["mark_price"] - p["cost_sol"]
            else:
                marked = None
        trades.append(Trade(
            position_id=p["position_id"], mint=p["mint"], opened_at=p["opened_at"],
            closed_at=p["closed_at"], close_reason=p["close_reason"],
            bought_sol=bought[p["position_id"]], realized_pnl_sol=p["realized_pnl_sol"],
            unrealized_pnl_sol=marked, fees_sol=p["fees_sol"],
        ))  # fmt: skip
    by_id = {o["order_id"]: o for o in orders}
    slippage = []
    for fill in sorted(fills, key=lambda f: (f.filled_at, f.order_id)):
        order = by_id.get(fill.order_id)
        if order is None or not order["expected_v_sol"] or not order["expected_v_tokens"]:
            continue
        slippage.append(Slippage(
            order_id=fill.order_id, side=fill.side, reason=order["reason"], time=fill.filled_at,
            pct=slippage_pct(
                fill.side, fill.price, order["expected_v_sol"], order["expected_v_tokens"]
            ),
        ))  # fmt: skip
    outcomes = Counter(f"{ORDER_STATES.get(o['state'], o['state'])} {o['side']}" for o in orders)
    return Results(
        title=title, source=source, trades=tuple(trades), sales=sales, slippage=tuple(slippage),
        orders=dict(sorted(outcomes.items())),
    )  # fmt: skip


def booked(fills: Iterable[Any]) -> tuple[tuple[Sale, ...], Counter[str]]:
    """Each sale's realised PnL and the SOL each position's buys spent, as a position
    book applying the ledger's ``fills`` in order books them."""
    book = PositionBook()
    sales: list[Sale] = []
    bought: Counter[str] = Counter()
    for fill in fills:
        change = book.apply_fill(fill.payload(), time=fill.filled_at, reason=fill.reason)
        if change is None:  # an order booked already, a sale of a position not held
            continue
        if fill.side == "buy":
            bought[change.position_id] += fill.sol_amount
        else:
            # the sale just booked is the latest of the book's realisations
            time, realized = book.realizations[-1]
            sales.append(Sale(
                position_id=change.position_id, mint=fill.mint, time=time,
                realized_pnl_sol=realized, reason=fill.reason,
            ))  # fmt: skip
    return tuple(sales), bought


async def stream_performance(model: Any) -> Any:
    """The model service's figures over every label it stored by now (the labels
    released by now counted), each model and arm's in one window: a report is of its
    whole stream, where the live figures are of the newest labels only (2,000: minutes
    of a busy market). Read once at a run's end, for :func:`model_figures` and
    :meth:`Collector.results` both."""
    from pumpflow.common.model.performance import RollingPerformance

    model.resolve_labels()
    live = model.performance
    if not model.settings.model_store_labels:
        return live  # counted unstored: the live window is all there is
    labels = await model.label_store.last_labels(ALL_ROWS)
    whole = RollingPerformance(
        window=max(len(labels), 1),
        thresholds=live.thresholds,
        threshold=live.default_threshold,
    )
    whole.extend(labels)
    return whole


def calibration_of(performance: Any) -> tuple[Calibration, ...]:
    """Each classification arm's calibration from a model's rolling performance."""
    found = []
    for model_id, arm in performance.keys():
        figures = performance.figures(model_id, arm)
        if figures is None or figures.task != "classification":
            continue
        labels, scores = performance.window_of(model_id, arm)
        found.append(Calibration(
            name=f"{model_id}/{arm}", labels=len(labels),
            bins=calibration_bins(labels.tolist(), scores.tolist()),
        ))  # fmt: skip
    return tuple(found)


class ModelFigures(NamedTuple):
    """What a model service did by "model/arm"."""

    #: model version -> predictions it published
    predicted: dict[str, dict[str, int]]
    #: (live AUC, labels)
    auc: dict[str, tuple[float, int]]
    #: (live precision at the model's threshold, the threshold)
    precision: dict[str, tuple[float, float]]
    #: (labels scored at or above the threshold, labels): what the precision is of
    selected: dict[str, tuple[int, int]]


def model_figures(model: Any, performance: Any) -> ModelFigures:
    """The model service's predictions, and the live figures by "model/arm" of
    ``performance`` (:func:`stream_performance`)."""
    figures = {
        f"{model_id}/{arm}": found.metrics | {"labels": found.labels}
        for model_id, arm in performance.keys()
        if (found := performance.figures(model_id, arm)) is not None
    }
    return ModelFigures(
        predicted={
            f"{model_id}/{arm}": versions
            for (model_id, arm), versions in model.metrics.published_by_arm().items()
        },
        auc={k: (float(m["auc"]), m["labels"]) for k, m in figures.items() if "auc" in m},
        precision={
            k: (float(m["precision"]), float(m["threshold"]))
            for k, m in figures.items()
            if "precision" in m
        },
        selected={
            k: (round(m["selected_rate"] * m["labels"]), m["labels"])
            for k, m in figures.items()
            if "selected_rate" in m
        },
    )


#: live predictions a buy can name as its cause: far more than trading ever lags behind
SCORED_KEPT = 20_000


class Collector:
    """Tokens by lifecycle state reached, from the bus of an embedded system."""

    PATTERNS = ("token.created", "token.lifecycle", "model.prediction", "order.requested")

    def __init__(self) -> None:
        self.reached: dict[str, set[str]] = {}
        #: the newest live predictions' event ids -> their "model/arm", oldest first: a
        #: buy names its prediction by causation, after predictions of other tokens, or of
        #: its own, came in the meantime
        self._scored: dict[str, str] = {}
        #: mint -> the "model/arm" whose live prediction ordered its entry
        self.entered: dict[str, str] = {}

    async def attach(self, bus: Any) -> None:
        await bus.subscribe(
            Subscription(service="report", patterns=self.PATTERNS, handler=self.on_event)
        )

    async def on_event(self, event: Event) -> None:
        data = event.data
        if isinstance(data, TokenCreated):
            self.reached.setdefault("new", set()).add(data.mint)
        elif isinstance(data, TokenLifecycle):
            self.reached.setdefault(data.state, set()).add(data.mint)
        elif isinstance(data, ModelPrediction):
            if not data.shadow:
                if len(self._scored) >= SCORED_KEPT:
                    del self._scored[next(iter(self._scored))]
                self._scored[event.id] = f"{data.model_id}/{data.arm}"
        elif isinstance(data, OrderRequested) and data.side == "buy":
            arm = self._scored.get(event.causation_id or "")
            if arm is not None:
                self.entered.setdefault(data.mint, arm)

    def lifecycle(self) -> dict[str, int]:
        return {state: len(mints) for state, mints in self.reached.items()}

    async def results(
        self, system: Any, *, title: str, source: str, performance: Any = None
    ) -> Results:
        """Everything the embedded ``system`` holds for a report, at its end; the
        calibration is of ``performance`` (:func:`stream_performance`), none without."""
        import msgspec

        trading = system["trading"]
        unrealized = {p.position_id: p.marked_pnl_sol for p in trading.book.open_positions.values()}
        results = await from_ledger(
            trading.ledger, title=title, source=source, unrealized=unrealized
        )
        calibration = None if performance is None else calibration_of(performance)
        trades = tuple(
            msgspec.structs.replace(t, arm=self.entered.get(t.mint, "")) for t in results.trades
        )
        return msgspec.structs.replace(
            results, trades=trades, lifecycle=self.lifecycle(), calibration=calibration
        )
