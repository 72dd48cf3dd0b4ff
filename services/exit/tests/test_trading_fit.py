"""Trading's position book and paper fills are what the exit's protocols ask for."""

from __future__ import annotations

from pumpflow.common.bus import InMemoryBus, Subscription
from pumpflow.common.clock import ReplayClock
from pumpflow.common.curve import CurveState
from pumpflow.common.events import Event, ExitOrder, OrderFilled, OrderRejected
from pumpflow.common.exit import (
    STOP_LOSS,
    ExitEvaluator,
    ExitRules,
    GracefulExitConfig,
    GracefulExitManager,
)
from pumpflow.common.trading import PaperExecution, PaperFill, PositionBook, fill_buy, fill_sell

START = 1_700_000_000.0


def buy(book: PositionBook, mint: str, state: CurveState, sol: float) -> CurveState:
    fill = fill_buy(state, sol, expected=state, execution=book.execution)
    assert isinstance(fill, PaperFill)
    book.apply_fill(
        OrderFilled(
            order_id=f"buy-{mint}", mint=mint, side="buy", token_amount=fill.tokens,
            sol_amount=fill.sol, price=fill.price, fee_sol=fill.fee_sol,
        ),
        time=START,
    )  # fmt: skip
    book.mark(mint, fill.after, time=START)
    return fill.after


class BookExecutor:
    """Sells on paper with trading's fill maths and books the fill in trading's book."""

    def __init__(self, clock: ReplayClock, book: PositionBook, markets: dict[str, CurveState]):
        self.clock, self.book, self.markets = clock, book, markets

    async def execute_exit(self, order: ExitOrder) -> OrderFilled | OrderRejected:
        state = self.markets[order.mint]
        fill = fill_sell(
            state, order.token_amount, expected=state, execution=self.book.execution,
            slippage_pct=order.slippage_pct,
        )  # fmt: skip
        if not isinstance(fill, PaperFill):
            return OrderRejected(order_id=order.order_id, mint=order.mint, reason=fill.reason)
        self.markets[order.mint] = fill.after
        self.clock.set_sync(self.clock.now() + self.book.execution.latency_s)
        filled = OrderFilled(
            order_id=order.order_id, mint=order.mint, side="sell",
            token_amount=fill.tokens, sol_amount=fill.sol, price=fill.price,
            fee_sol=fill.fee_sol, position_id=order.position_id,
        )  # fmt: skip
        self.book.apply_fill(filled, time=self.clock.now(), reason=order.reason)
        return filled


def test_the_rules_read_tradings_positions():
    book = PositionBook(execution=PaperExecution())
    after = buy(book, "m", CurveState(), 1.0)
    position = book.open_positions["m"]
    evaluator = ExitEvaluator(ExitRules(), clock=ReplayClock(START))
    evaluator.track(position, time=START)
    # the entry price carries every fee, the mark the buy's own move: near each other
    assert abs(after.price / position.entry_price - 1) < 0.05
    assert evaluator.on_mark("m", after.price, START + 1) == []
    (decision,) = evaluator.on_mark("m", position.entry_price * 0.69, START + 5)
    assert decision.rule == STOP_LOSS and decision.token_amount == position.tokens


async def test_a_graceful_exit_over_tradings_book_leaves_it_flat():
    clock = ReplayClock(START)
    book = PositionBook(execution=PaperExecution())
    markets = {f"m{i}": buy(book, f"m{i}", CurveState(), 1.0 + i) for i in range(5)}
    bus = InMemoryBus(partitions=2, synchronous=True, source="exit")
    await bus.start()
    reports: list[Event] = []

    async def collect(event: Event) -> None:
        reports.append(event)

    await bus.subscribe(Subscription(service="probe", patterns=("exit.report",), handler=collect))
    manager = GracefulExitManager(
        bus, book, BookExecutor(clock, book, markets), clock=clock,
        config=GracefulExitConfig(), wait_until=clock.advance_to,
    )  # fmt: skip
    manager.begin_graceful_exit("shutdown")
    summary = await manager.run()
    await bus.close()
    assert book.open_positions == {}
    assert len(book.closed_positions) == 5
    assert summary.positions_left == 0
    assert summary.sol_recovered == sum(line.sol_received for line in summary.lines)
    # what the book realised is what the report says the fills paid
    realised = sum(p.realized_pnl_sol + p.bought_sol for p in book.closed_positions)
    assert abs(realised - summary.sol_recovered) < 1e-9
    assert reports[-1].data.graceful
