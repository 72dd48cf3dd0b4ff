"""Graceful exit: every position sold once, tranches under the impact limit, by the deadline.

The collaborators are in-memory: the bus is the library's real InMemoryBus, the
position book and the executor are small fakes here; the executor fills each tranche
against the token's curve with the common curve maths after a latency on the
ReplayClock (every order sent together lands together).
"""

from __future__ import annotations

import asyncio
import itertools
import math
from dataclasses import dataclass

import pytest

from pumpflow.common.bus import InMemoryBus, Subscription
from pumpflow.common.clock import ReplayClock
from pumpflow.common.curve import CurveState, quote_buy, quote_sell, sell_for_impact
from pumpflow.common.events import Event, ExitOrder, OrderFilled, OrderRejected
from pumpflow.common.exit import (
    DEADLINE,
    GRACEFUL,
    ExitPlanner,
    ExitRecord,
    GracefulExitConfig,
    GracefulExitManager,
    GracefulExitSummary,
)

START = 1_700_000_000.0
LATENCY_S = 0.5


@dataclass
class Position:
    mint: str
    position_id: str
    opened_at: float
    tokens: float
    entry_price: float
    mark_price: float | None = None
    mark_state: CurveState | None = None


class Book:
    """The position manager as the exit sees it."""

    def __init__(self) -> None:
        self.open_positions: dict[str, Position] = {}


class PaperExecutor:
    """Fills a tranche on its token's curve after ``LATENCY_S``; refuses on request."""

    def __init__(self, clock: ReplayClock, book: Book, markets: dict[str, CurveState]):
        self.clock = clock
        self.book = book
        self.markets = markets
        self.orders: list[ExitOrder] = []
        #: (order, price impact, fill time)
        self.fills: list[tuple[ExitOrder, float, float]] = []
        self.refuse: set[str] = set()

    async def execute_exit(self, order: ExitOrder) -> OrderFilled | OrderRejected:
        sent = self.clock.now()
        assert order.order_id not in {o.order_id for o in self.orders}, "order sent twice"
        self.orders.append(order)
        await asyncio.sleep(0)  # the other orders of the round go out meanwhile
        self.clock.set_sync(sent + LATENCY_S)
        if order.order_id in self.refuse:
            return OrderRejected(order_id=order.order_id, mint=order.mint, reason="slippage")
        position = self.book.open_positions[order.mint]
        assert order.token_amount <= position.tokens * (1 + 1e-9), "sold more than held"
        quote = quote_sell(self.markets[order.mint], order.token_amount)
        self.markets[order.mint] = quote.after
        position.tokens -= order.token_amount
        if position.tokens <= position.tokens * 1e-9 + 1e-9:
            del self.book.open_positions[order.mint]
        self.fills.append((order, quote.price_impact, self.clock.now()))
        return OrderFilled(
            order_id=order.order_id,
            mint=order.mint,
            side="sell",
            token_amount=order.token_amount,
            sol_amount=quote.sol,
            price=quote.average_price,
            fee_sol=quote.fee,
            position_id=order.position_id,
        )


class Harness:
    def __init__(self, config: GracefulExitConfig):
        self.clock = ReplayClock(START)
        self.book = Book()
        self.markets: dict[str, CurveState] = {}
        self.executor = PaperExecutor(self.clock, self.book, self.markets)
        self.bus = InMemoryBus(partitions=4, synchronous=True, source="exit")
        self.reports: list[Event] = []
        self.manager = GracefulExitManager(
            self.bus,
            self.book,
            self.executor,
            clock=self.clock,
            config=config,
            wait_until=self.clock.advance_to,
        )

    async def start(self) -> None:
        await self.bus.start()

        async def collect(event: Event) -> None:
            self.reports.append(event)

        await self.bus.subscribe(
            Subscription(service="probe", patterns=("exit.report",), handler=collect)
        )

    def open(self, mint: str, sol: float, *, curve_sol: float, age_s: float = 60.0) -> Position:
        """A position bought for ``sol`` on a curve that others had bought ``curve_sol`` into."""
        curve = quote_buy(CurveState(), curve_sol).after if curve_sol else CurveState()
        buy = quote_buy(curve, sol)
        position = Position(
            mint=mint,
            position_id=f"pos-{mint}",
            opened_at=START - age_s,
            tokens=buy.tokens,
            entry_price=buy.sol / buy.tokens,
            mark_price=buy.after.price,
            mark_state=buy.after,
        )
        self.book.open_positions[mint] = position
        self.markets[mint] = buy.after
        self.manager.on_market(mint, buy.after)
        return position


@pytest.fixture
async def harness():
    made: list[Harness] = []

    async def make(**config) -> Harness:
        h = Harness(GracefulExitConfig(**config))
        await h.start()
        made.append(h)
        return h

    yield make
    for h in made:
        await h.bus.close()


async def test_twenty_positions_on_thin_curves_sold_by_the_deadline_under_the_impact_limit(
    harness,
):
    h = await harness()
    bought = {}
    for i in range(20):
        # 0.5 to 2.4 SOL into curves 0 to 9.5 SOL deep: a whole sale moves them 2-7%
        position = h.open(f"mint{i:02d}", 0.5 + 0.1 * i, curve_sol=0.5 * (i % 20), age_s=5 * i)
        bought[position.mint] = position.tokens
    assert h.manager.accepting_entries
    assert h.manager.begin_graceful_exit("test") == 20
    assert not h.manager.accepting_entries
    deadline = h.manager.planner.deadline
    assert deadline == START + 60

    summary = await h.manager.run()

    assert h.book.open_positions == {}
    assert summary.finished_at <= deadline - h.manager.planner.config.final_sweep_s
    limit = h.manager.planner.config.max_tranche_impact
    impacts = [impact for _, impact, _ in h.executor.fills]
    assert max(impacts) <= limit * (1 + 1e-9)
    # the plan needed tranches: most positions were too big to sell at once
    assert len(h.executor.fills) > 40
    assert all(order.reason == GRACEFUL for order, _, _ in h.executor.fills)
    # a token's tranches never overlap and are spaced by the interval
    for mint in bought:
        times = [t for order, _, t in h.executor.fills if order.mint == mint]
        assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(times))

    # one report per position, then the summary; reports match the fills
    singles = [e.data for e in h.reports if not e.data.graceful]
    (final,) = [e.data for e in h.reports if e.data.graceful]
    assert h.reports[-1].data is final
    assert sorted(r.positions[0].mint for r in singles) == sorted(bought)
    for report in singles:
        (line,) = report.positions
        fills = [(o, t) for o, _, t in h.executor.fills if o.mint == line.mint]
        assert line.tranches == len(fills)
        assert line.tokens_sold == pytest.approx(bought[line.mint])
        assert line.completed and line.reason == GRACEFUL
        assert line.finished_at == fills[-1][1]
        assert 0 < line.slippage < limit * line.tranches
    assert final.positions_left == 0
    assert final.sol_recovered == pytest.approx(sum(r.sol_recovered for r in singles))
    assert final.sol_recovered < final.mark_value_sol
    assert final.worst_slippage == max(r.worst_slippage for r in singles)
    assert GracefulExitSummary.from_report(final).text().startswith("graceful exit (test)")

    progress = h.manager.monitor_exit_progress()
    assert progress.done and progress.sold_out == 20 and progress.tokens_left == 0
    assert progress.deadline_margin_s > 0


async def test_the_deadline_sells_whatever_is_left_whole(harness):
    # a tiny impact limit would need hundreds of tranches: the sweep takes over
    h = await harness(max_tranche_impact=0.001, deadline_s=8.0, final_sweep_s=2.0)
    for i in range(20):
        h.open(f"mint{i:02d}", 1.0, curve_sol=1.0)
    h.manager.begin_graceful_exit()
    summary = await h.manager.run()
    assert h.book.open_positions == {}
    assert summary.finished_at <= START + 8.0
    sweep = [o for o, _, _ in h.executor.fills if o.reason == DEADLINE]
    assert sorted(o.mint for o in sweep) == sorted(f"mint{i:02d}" for i in range(20))
    assert all(o.slippage_pct == h.manager.planner.config.sweep_slippage_pct for o in sweep)
    assert {line.reason for line in summary.lines} == {DEADLINE}
    assert summary.positions_left == 0


async def test_a_refused_tranche_is_tried_again_and_no_position_is_sold_twice(harness):
    h = await harness()
    for i in range(3):
        h.open(f"mint{i}", 2.0, curve_sol=0.0)
    h.executor.refuse.add("pos-mint1:exit:1")
    h.manager.begin_graceful_exit()
    summary = await h.manager.run()
    assert h.book.open_positions == {}
    assert summary.positions_left == 0
    sent = [o.order_id for o in h.executor.orders]
    assert len(sent) == len(set(sent))
    assert "pos-mint1:exit:1" in sent
    assert [e.data.positions[0].mint for e in h.reports if not e.data.graceful].count("mint1") == 1


async def test_a_sweep_refused_just_before_the_deadline_is_tried_again_at_it(harness):
    # tranches far apart: a refusal's usual wait would end past the deadline
    h = await harness(deadline_s=10.0, final_sweep_s=5.0, min_tranche_interval_s=8.0)
    h.open("mint1", 1.0, curve_sol=0.0)
    h.executor.refuse.update({"pos-mint1:exit:1", "pos-mint1:exit:2"})
    h.manager.begin_graceful_exit()
    summary = await h.manager.run()
    assert h.book.open_positions == {}
    assert [(o.order_id, o.reason) for o in h.executor.orders] == [
        ("pos-mint1:exit:1", GRACEFUL),
        ("pos-mint1:exit:2", DEADLINE),
        ("pos-mint1:exit:3", DEADLINE),
    ]
    [(_, _, filled_at)] = h.executor.fills
    assert filled_at == START + 10.0 + LATENCY_S  # sent at the deadline
    assert summary.positions_left == 0


def every_token_in_rule_sales(h, mint: str) -> tuple[float, Position]:
    """Open a position of ``mint`` whose every token rule sales ordered before the exit
    hold: its tokens, and the book's view of it (none held, all pending)."""
    position = h.open(mint, 1.0, curve_sol=0.0)
    view = Position(**{**position.__dict__, "tokens": 0.0})
    view.pending_tokens = position.tokens
    h.book.open_positions[mint] = view
    return position.tokens, view


async def run_until_rules_hold_the_rest(h, mint: str) -> asyncio.Future:
    """Begin a graceful exit whose clock holds once the exit's own share of ``mint`` is
    sold, while rule sales ordered before it hold the rest (their outcomes end the
    wait): the running exit, once it holds there."""
    held = asyncio.Event()

    async def wait_until(when: float) -> None:
        if h.manager.planner.exits[mint].tokens_left == 0:
            held.set()
            await asyncio.Event().wait()
        await h.clock.advance_to(when)

    h.manager = GracefulExitManager(
        h.bus, h.book, h.executor, clock=h.clock, config=h.manager.planner.config,
        wait_until=wait_until,
    )  # fmt: skip
    h.manager.begin_graceful_exit()
    running = asyncio.ensure_future(h.manager.run())
    await asyncio.wait_for(held.wait(), 10)
    return running


async def test_a_rule_sale_under_way_holds_its_tokens_until_settled_and_a_refusal_gives_them_back(
    harness,
):
    h = await harness(deadline_s=30.0)
    position = h.open("mint1", 1.0, curve_sol=0.0)
    held = position.tokens
    # a rule's sale of a quarter was ordered before the exit began
    view = Position(**{**position.__dict__, "tokens": held * 0.75})
    view.pending_tokens = held * 0.25
    h.book.open_positions["mint1"] = view
    running = await run_until_rules_hold_the_rest(h, "mint1")
    assert not running.done(), "sold out while a rule's sale still held tokens"
    refused = OrderRejected(order_id="pos-mint1:rule:1", mint="mint1", reason="slippage")
    view.tokens = held * 0.25  # the book holds what the rule did not sell
    h.book.open_positions["mint1"] = view
    await h.manager.on_rule_outcome("mint1", refused, held * 0.25, held_back=0.0, rule="stop_loss")
    summary = await running
    assert h.book.open_positions == {}
    sold = sum(o.token_amount for o, _, _ in h.executor.fills)
    assert sold == pytest.approx(held, rel=1e-9)
    [line] = summary.lines
    assert line.completed and line.tokens_sold == pytest.approx(held, rel=1e-9)
    assert summary.finished_at < START + 30.0


async def test_overlapping_rule_sales_release_what_filled_and_a_refusal_gives_the_rest_back(
    harness,
):
    """Two rule sales of 60% each were under way as the exit began; trading cut the
    second to the 40% not already asked for. It fills 40%, then the first is refused:
    the 60% still held are the exit's, not the 40% that 60% ordered less would leave."""
    h = await harness(deadline_s=30.0)
    held, view = every_token_in_rule_sales(h, "mint1")
    running = await run_until_rules_hold_the_rest(h, "mint1")
    cut = OrderFilled(
        order_id="pos-mint1:rule:2", mint="mint1", side="sell", token_amount=held * 0.4,
        sol_amount=0.3, price=0.3 / (held * 0.4), position_id="pos-mint1",
    )  # fmt: skip
    view.tokens, view.pending_tokens = held * 0.6, 0.0
    # the first sale still holds back what it ordered, all that is left
    await h.manager.on_rule_outcome(
        "mint1", cut, held * 0.6, held_back=held * 0.6, rule="take_profit"
    )
    refused = OrderRejected(order_id="pos-mint1:rule:1", mint="mint1", reason="slippage")
    await h.manager.on_rule_outcome("mint1", refused, held * 0.6, held_back=0.0, rule="stop_loss")
    summary = await running
    assert h.book.open_positions == {}, "tokens left held by a sold-out exit"
    sold = sum(o.token_amount for o, _, _ in h.executor.fills)
    assert sold == pytest.approx(held * 0.6, rel=1e-9)
    [line] = summary.lines
    assert line.completed and line.tokens_sold == pytest.approx(held * 0.6, rel=1e-9)


async def test_a_position_a_rules_sale_sold_out_is_reported_under_that_rule(harness):
    """Every token was in a stale-stop sale as the exit began; it fills whole: the line
    names the rule that sold it, not the exit, which sold nothing of it."""
    h = await harness(deadline_s=30.0)
    held, view = every_token_in_rule_sales(h, "mint1")
    running = await run_until_rules_hold_the_rest(h, "mint1")
    sold = OrderFilled(
        order_id="pos-mint1:rule:1", mint="mint1", side="sell", token_amount=held,
        sol_amount=0.9, price=0.9 / held, position_id="pos-mint1",
    )  # fmt: skip
    view.pending_tokens = 0.0
    del h.book.open_positions["mint1"]
    await h.manager.on_rule_outcome("mint1", sold, held, held_back=0.0, rule="stale_stop")
    summary = await running
    [line] = summary.lines
    assert (line.reason, line.tranches, line.completed) == ("stale_stop", 0, True)
    assert "sold by its stale_stop sale" in summary.text().splitlines()[-1]


async def test_a_position_closed_while_its_tranche_is_in_flight_ends_closed_at_its_answer(
    harness,
):
    """A hand sale closes the position while the exit's first tranche is on its way;
    trading refuses that tranche (nothing held): the exit ends there, its line closed by
    trading, no tranche more and nothing left."""
    h = await harness(deadline_s=30.0)
    h.open("mint1", 1.0, curve_sol=0.0)

    async def closed_meanwhile(order: ExitOrder) -> OrderRejected:
        del h.book.open_positions["mint1"]
        await h.manager.on_closed("mint1", order.position_id, "manual")
        return OrderRejected(order_id=order.order_id, mint="mint1", reason="nothing held")

    h.executor.execute_exit = closed_meanwhile
    h.manager.begin_graceful_exit()
    summary = await asyncio.wait_for(h.manager.run(), 10)
    [line] = summary.lines
    assert line.closed == "manual" and line.completed and line.tranches == 0, line
    assert summary.positions_left == 0
    assert summary.finished_at == START


async def test_a_second_begin_adds_nothing_twice(harness):
    h = await harness()
    h.open("a", 1.0, curve_sol=0.0)
    assert h.manager.begin_graceful_exit() == 1
    h.open("b", 1.0, curve_sol=0.0)
    assert h.manager.begin_graceful_exit() == 2
    assert h.manager.begin_graceful_exit() == 2
    await h.manager.run()
    assert len([e for e in h.reports if not e.data.graceful]) == 2


async def test_a_position_with_nothing_to_sell_is_the_exits_over_at_once_and_reported(harness):
    """A position held with no token to sell is queued closed, "nothing to sell": no
    tranche, nothing left to take up (left out, every look at what is held would take
    the share up again), and its line in the report beside the one sold."""
    h = await harness()
    sold = h.open("MintA", 1.0, curve_sol=0.0)
    h.book.open_positions["MintZ"] = Position(
        mint="MintZ", position_id="pos-MintZ", opened_at=START, tokens=0.0, entry_price=1e-8
    )
    h.manager.begin_graceful_exit()
    assert h.manager.untaken() == []
    assert len(h.manager.planner.exits) == 2
    summary = await asyncio.wait_for(h.manager.run(), 10)

    assert h.manager.untaken() == []
    assert {o.mint for o in h.executor.orders} == {sold.mint}
    lines = {line.mint: line for line in summary.lines}
    assert set(lines) == {"MintA", "MintZ"}
    empty = lines["MintZ"]
    assert empty.completed and empty.closed == "nothing to sell", empty
    assert empty.tranches == 0 and empty.tokens_sold == 0.0
    assert lines["MintA"].completed and not lines["MintA"].closed
    assert summary.positions_left == 0
    assert "closed by trading (nothing to sell)" in summary.text()


async def test_reprioritises_as_prices_and_lifecycles_move(harness):
    h = await harness()
    # same size, same curve, different ages: the oldest first
    for i, age in enumerate((300.0, 200.0, 100.0)):
        h.open(f"m{i}", 1.0, curve_sol=5.0, age_s=age)
    h.manager.begin_graceful_exit()
    assert [q.mint for q in h.manager.exit_queue] == ["m0", "m1", "m2"]

    # m2's token doubles: a gain to protect moves it ahead
    pumped = quote_buy(h.markets["m2"], 12.0).after
    h.markets["m2"] = pumped
    h.manager.on_market("m2", pumped)
    h.manager.prioritize_exits()
    assert next(q.mint for q in h.manager.exit_queue) == "m2"

    # m1's token goes inactive: its buyers are leaving, it goes first
    h.manager.on_lifecycle("m1", "inactive")
    tranche = await h.manager.execute_next_exit()
    assert tranche is not None and tranche.mint == "m1"
    assert next(q.mint for q in h.manager.exit_queue) == "m1"
    score = h.manager.planner.exits["m1"].score
    assert score.lifecycle == 1.0


def test_tranches_sized_to_the_impact_limit_and_the_optimal_price():
    planner = ExitPlanner(GracefulExitConfig(max_tranche_impact=0.02))
    curve = CurveState()
    buy = quote_buy(curve, 3.0)
    position = Position(
        mint="m", position_id="p", opened_at=START, tokens=buy.tokens,
        entry_price=buy.sol / buy.tokens, mark_state=buy.after, mark_price=buy.after.price,
    )  # fmt: skip
    planner.begin(START)
    queued = planner.add(position)
    at_once = quote_sell(buy.after, buy.tokens)
    assert at_once.price_impact > 0.05
    # equal parts, as few as keep each under the limit
    parts = math.ceil(buy.tokens / sell_for_impact(buy.after, 0.02))
    assert parts == 5
    expected = planner.expected_exit_price("m")
    assert buy.after.price * 0.98 < expected < buy.after.price
    assert expected > at_once.average_price
    tranche = planner.next_tranche(START)
    assert tranche.token_amount == pytest.approx(buy.tokens / parts)
    assert 0.015 < tranche.price_impact <= 0.02
    assert planner.next_tranche(START) is None  # the same token waits for its fill
    planner.record_fill(tranche, tranche.token_amount, START + 0.5)
    assert queued.tokens_left == pytest.approx(buy.tokens - tranche.token_amount)
    assert planner.next_tranche(START + 1.0) is None  # spacing
    assert planner.next_ready_at() == pytest.approx(START + 1.5)
    second = planner.next_tranche(START + 1.5)
    assert second.number == 2 and second.order_id == "p:exit:2"
    assert 0.015 < second.price_impact <= 0.02
    # the next parts are equal again, over what is left
    rest = math.ceil(queued.tokens_left / sell_for_impact(queued.state, 0.02))
    assert rest == 4
    assert second.token_amount == pytest.approx(queued.tokens_left / rest)


async def test_a_position_handed_over_mid_exit_gets_no_more_tranches_and_no_report(harness):
    h = await harness(max_tranche_impact=0.005, min_tranche_interval_s=1.0)
    moving = h.open("MintA", 2.0, curve_sol=5.0)
    staying = h.open("MintB", 2.0, curve_sol=5.0)
    execute = h.executor.execute_exit

    async def partition_moves_after_first_tranche(order: ExitOrder):
        outcome = await execute(order)
        if order.mint == moving.mint:
            # its partition moved while the tranche was out: another replica sells it now
            assert h.manager.hand_over(moving.mint)
        return outcome

    h.executor.execute_exit = partition_moves_after_first_tranche
    h.manager.trade_executor = h.executor
    h.manager.begin_graceful_exit("handed over")
    summary = await h.manager.run()

    sent = [o for o in h.executor.orders if o.mint == moving.mint]
    assert len(sent) == 1, "tranches sent after the hand-over"
    assert [line.position_id for line in summary.lines] == [staying.position_id]
    assert summary.positions_left == 0
    reported = {line.position_id for r in h.reports for line in r.data.positions}
    assert moving.position_id not in reported
    # the position comes back in the book: this manager does not queue it again
    h.manager.begin_graceful_exit("handed over")
    assert moving.mint not in h.manager.planner.exits


async def test_a_take_up_queues_the_positions_come_and_leaves_one_handed_over_alone(harness):
    """Positions come in the middle of the exit (a partition taken over) with their
    stored records; one handed over to another seller gets neither a place nor a line
    here (ended unsold in this exit's summary, it would close its exit for the run)."""
    h = await harness(max_tranche_impact=0.005, min_tranche_interval_s=1.0)
    moving = h.open("MintA", 2.0, curve_sol=5.0)
    staying = h.open("MintB", 2.0, curve_sol=5.0)
    h.manager.begin_graceful_exit("taken over")
    assert h.manager.hand_over(moving.mint)
    assert h.manager.untaken() == []
    come = h.open("MintC", 2.0, curve_sol=5.0)
    assert h.manager.untaken() == [come.mint]
    stored = [
        ExitRecord(mint=p.mint, position_id=p.position_id, rule=GRACEFUL,
                   tokens_at_start=p.tokens, mark_price=p.mark_price, started_at=START)
        for p in (moving, come)
    ]  # fmt: skip
    sent = {moving.position_id: 3, come.position_id: 2}
    h.manager.resume_graceful_exit(
        "taken over", started_at=START, deadline=START + 60.0, records=stored, sent=sent
    )
    assert h.manager.untaken() == []
    summary = await h.manager.run()

    assert not [o for o in h.executor.orders if o.mint == moving.mint]
    numbers = [o.order_id for o in h.executor.orders if o.mint == come.mint]
    assert numbers[0] == f"{come.position_id}:exit:3", numbers
    lines = {line.position_id: line for line in summary.lines}
    assert set(lines) == {staying.position_id, come.position_id}
    assert summary.positions_left == 0


async def test_tranches_without_an_outcome_are_not_offered_again_and_reported_unconfirmed(
    harness,
):
    h = await harness()
    lost = h.open("MintLost", 2.0, curve_sol=5.0)
    sold = h.open("MintSold", 2.0, curve_sol=5.0)
    held = lost.tokens
    execute = h.executor.execute_exit
    asked: list[ExitOrder] = []

    async def outcomes_of_one_mint_lost(order: ExitOrder):
        if order.mint != lost.mint:
            return await execute(order)
        asked.append(order)
        if len(asked) == 1:
            # the first tranche is refused: its tokens go back to sell
            return OrderRejected(order_id=order.order_id, mint=order.mint, reason="slippage")
        return None  # no outcome came: the sale may have gone through

    h.executor.execute_exit = outcomes_of_one_mint_lost
    h.manager.begin_graceful_exit("outcomes lost")
    summary = await h.manager.run()

    # what the tranches without an outcome asked for never adds up to more than the
    # position held: none is asked for again under a new order id
    unanswered = asked[1:]
    assert len(unanswered) >= 2
    assert len({o.order_id for o in asked}) == len(asked)
    assert sum(o.token_amount for o in unanswered) == pytest.approx(held, rel=1e-9)
    assert sold.mint not in h.book.open_positions
    lines = {line.mint: line for line in summary.lines}
    assert lines[sold.mint].completed and lines[sold.mint].unconfirmed_tranches == 0
    # the exit waited for their outcomes to the deadline, then said what is unknown
    assert summary.finished_at == h.manager.planner.deadline
    line = lines[lost.mint]
    assert not line.completed and line.tranches == 0 and line.tokens_sold == 0
    assert line.unconfirmed_tranches == len(unanswered)
    assert line.unconfirmed_tokens == pytest.approx(held, rel=1e-9)
    assert summary.unconfirmed == (line,) and summary.positions_left == 1
    assert f"UNCONFIRMED: {len(unanswered)} tranches of 1 position got no outcome" in (
        summary.text()
    )
    progress = h.manager.monitor_exit_progress()
    assert progress.unconfirmed_tranches == len(unanswered) and progress.sold_out == 1


async def test_a_later_position_on_a_mint_whose_exit_is_over_gets_an_exit_of_its_own(harness):
    """A position is sold out; another opens on its mint (an entry in flight as the exit
    began fills): the next look queues it, and it is sold by tranches of its own, with a
    report of its own, not left to the deadline's sweep."""
    h = await harness(deadline_s=30.0)
    first = h.open("mint1", 1.0, curve_sol=5.0)
    bought = first.tokens
    later: list[Position] = []

    async def entry_filled(record: ExitRecord) -> None:
        if not later:
            position = h.open("mint1", 0.5, curve_sol=5.0)
            position.position_id = "pos-mint1-later"
            later.append(position)
            h.manager.begin_graceful_exit()

    h.manager.on_exited = entry_filled
    h.manager.begin_graceful_exit()
    summary = await asyncio.wait_for(h.manager.run(), 10)

    [position] = later
    lines = {line.position_id: line for line in summary.lines}
    assert set(lines) == {first.position_id, position.position_id}
    assert lines[first.position_id].tokens_sold == pytest.approx(bought)
    assert all(line.completed for line in lines.values()) and summary.positions_left == 0
    asked = [o for o in h.executor.orders if o.position_id == position.position_id]
    assert asked[0].order_id == f"{position.position_id}:exit:1"
    assert all(o.reason == GRACEFUL for o in asked), asked
    sold = lines[position.position_id].tokens_sold
    assert sum(o.token_amount for o in asked) == pytest.approx(sold)
    assert "mint1" not in h.book.open_positions
    reports = [e.data.positions[0].position_id for e in h.reports if not e.data.graceful]
    assert reports == [first.position_id, position.position_id]


async def test_a_take_up_of_two_positions_on_a_mint_sells_the_later_on_its_own_record(harness):
    """Resumed with the records of two positions on a mint, the first sold out and the
    later one held: the later one's exit numbers on from its own tranches and counts
    its own fills; the first keeps its line."""
    h = await harness()
    held = h.open("mint1", 1.0, curve_sol=5.0)
    held.position_id = "pos-later"
    tokens_held = held.tokens

    def record(position_id: str, tokens: float, started_at: float) -> ExitRecord:
        made = ExitRecord(
            mint="mint1",
            position_id=position_id,
            rule=GRACEFUL,
            tokens_at_start=tokens,
            mark_price=None,
            started_at=started_at,
        )
        made.add_fill(
            OrderFilled(
                order_id=f"{position_id}:exit:1",
                mint="mint1",
                side="sell",
                token_amount=50.0,
                sol_amount=1e-6,
                price=2e-8,
                position_id=position_id,
            ),
            started_at + 1,
        )
        return made

    first = record("pos-first", 50.0, START - 10.0)
    first.finish(START - 9.0)
    ongoing = record(held.position_id, tokens_held + 50.0, START - 5.0)
    h.manager.resume_graceful_exit(
        "resumed", started_at=START - 20.0, deadline=START + 60.0,
        records=[ongoing, first], sent={"pos-first": 1, held.position_id: 1},
    )  # fmt: skip
    summary = await h.manager.run()

    lines = {line.position_id: line for line in summary.lines}
    assert lines["pos-first"].tokens_sold == 50.0 and lines["pos-first"].tranches == 1
    assert lines[held.position_id].completed and summary.positions_left == 0
    assert lines[held.position_id].tokens_sold == pytest.approx(tokens_held + 50.0)
    asked = [o.order_id for o in h.executor.orders]
    assert asked[0] == f"{held.position_id}:exit:2", asked


async def test_a_position_closed_before_the_exit_began_leaves_it_with_no_report(harness):
    """Closes come late (the exit's consumer was behind): one trading made before the
    exit began takes its position out of the exit, with no report (it was never the
    exit's); one made after it is reported closed by trading."""
    h = await harness(deadline_s=30.0)
    before = h.open("mint1", 1.0, curve_sol=0.0)
    during = h.open("mint2", 1.0, curve_sol=0.0)
    withdrawn: list[ExitRecord] = []

    async def on_withdrawn(record: ExitRecord) -> None:
        withdrawn.append(record)

    h.manager.on_withdrawn = on_withdrawn
    h.manager.begin_graceful_exit()
    for position, closed_at in ((before, START - 1.0), (during, START)):
        del h.book.open_positions[position.mint]
        await h.manager.on_closed(position.mint, position.position_id, "manual", closed_at)
    summary = await asyncio.wait_for(h.manager.run(), 10)

    [line] = summary.lines
    assert line.position_id == during.position_id and line.closed == "manual"
    assert [r.position_id for r in withdrawn] == [before.position_id]
    assert [r.position_id for r in h.manager.withdrawn] == [before.position_id]
    assert summary.positions == 1 and summary.finished_at == START
    reports = [e.data.positions[0].position_id for e in h.reports if not e.data.graceful]
    assert reports == [during.position_id]
    assert not h.executor.orders


async def test_a_later_positions_record_waits_until_the_mints_exit_goes_on_no_more(harness):
    """A take-up brings the record of a later position on a mint whose exit still goes
    on here: the mint's exit keeps its own record (its fills are counted there), and the
    later one's comes with a take-up once that exit is over."""
    h = await harness()
    selling = h.open("mint1", 1.0, curve_sol=5.0)
    h.manager.begin_graceful_exit()
    later = ExitRecord(mint="mint1", position_id="pos-later", rule=GRACEFUL,
                       tokens_at_start=10.0, mark_price=None, started_at=START + 1.0)  # fmt: skip
    h.manager.resume_graceful_exit("taken up", started_at=START, deadline=START + 60.0,
                                   records=[later])  # fmt: skip
    assert h.manager.records["mint1"].position_id == selling.position_id
    assert not h.manager.took_up("mint1", "pos-later")


async def test_a_position_without_a_mark_is_measured_against_its_first_market_report(harness):
    h = await harness()
    buy = quote_buy(CurveState(), 2.0)
    # opened with no mark, and no trade of its token before the exit began
    h.book.open_positions["mint1"] = Position(
        mint="mint1",
        position_id="pos-mint1",
        opened_at=START - 60,
        tokens=buy.tokens,
        entry_price=buy.sol / buy.tokens,
    )
    h.markets["mint1"] = buy.after
    h.manager.begin_graceful_exit()
    h.manager.on_market("mint1", buy.after)
    summary = await h.manager.run()
    assert h.book.open_positions == {}
    (line,) = summary.lines
    assert line.mark_price == buy.after.price
    assert line.mark_value_sol == pytest.approx(line.tokens_sold * buy.after.price)
    # the tranches, with no trade between them, average what one sale of it all would
    assert line.slippage == pytest.approx(quote_sell(buy.after, buy.tokens).price_impact)
    (report,) = [e.data for e in h.reports if not e.data.graceful]
    assert report.positions[0].mark_price == buy.after.price


class SlowToAnswer(PaperExecutor):
    """Answers the orders in ``lost`` with nothing once ``wait_s`` of the clock passed
    since they went, or a moment of the wall (the time a lost order waits in vain)."""

    def __init__(self, clock: ReplayClock, book: Book, markets: dict[str, CurveState]):
        super().__init__(clock, book, markets)
        self.lost: set[str] = set()
        self.wait_s = 30.0

    async def execute_exit(self, order: ExitOrder) -> OrderFilled | OrderRejected | None:
        if order.order_id not in self.lost:
            return await super().execute_exit(order)
        self.orders.append(order)
        until = self.clock.now() + self.wait_s
        reached = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not reached.done():
                reached.set_result(None)

        handle = self.clock.call_at(until, wake)
        try:
            await asyncio.wait_for(reached, 0.3)
        except TimeoutError:
            self.clock.set_sync(max(until, self.clock.now()))
        finally:
            handle.cancel()
        return None


async def test_a_tranche_without_an_outcome_holds_back_no_other_tokens_tranches(harness):
    h = await harness()
    executor = SlowToAnswer(h.clock, h.book, h.markets)
    h.manager.trade_executor = h.executor = executor
    h.open("slow", 2.0, curve_sol=0.0)
    h.open("fast", 2.0, curve_sol=0.0)
    executor.lost.update({"pos-slow:exit:1", "pos-slow:exit:2"})
    h.manager.begin_graceful_exit()
    summary = await h.manager.run()

    # the fast token sold in tranches as its own spacing allows, while the other's
    # orders waited in vain
    fast = [(order, impact, t) for order, impact, t in executor.fills if order.mint == "fast"]
    assert len(fast) > 2
    assert all(order.reason == GRACEFUL for order, _, _ in fast)
    assert max(impact for _, impact, _ in fast) <= 0.02 * (1 + 1e-9)
    assert fast[-1][2] < START + 10.0
    line = next(line for line in summary.lines if line.mint == "fast")
    assert line.completed and line.finished_at == fast[-1][2]


async def test_a_sale_refused_past_the_deadline_is_not_tried_again(harness):
    """A refusal that comes past the deadline gives its position no more tries: it would
    go out when another sale's answer wakes the exit, and could wait a whole order
    timeout more. The position is reported left."""
    h = await harness(deadline_s=10.0, final_sweep_s=5.0, min_tranche_interval_s=1.0)

    class Timed(SlowToAnswer):
        """Notes when each order went."""

        def __init__(self, *args):
            super().__init__(*args)
            self.sent: list[tuple[str, float]] = []

        async def execute_exit(self, order):
            self.sent.append((order.order_id, self.clock.now()))
            return await super().execute_exit(order)

    executor = Timed(h.clock, h.book, h.markets)
    h.manager.trade_executor = h.executor = executor
    h.open("slow", 2.0, curve_sol=0.0)
    h.open("refused", 2.0, curve_sol=0.0)
    executor.lost.add("pos-slow:exit:1")  # its answer comes 30 s after it went
    executor.refuse.update(f"pos-refused:exit:{n}" for n in range(1, 40))
    h.manager.begin_graceful_exit()
    summary = await h.manager.run()

    deadline = START + 10.0
    refused = [at for order_id, at in executor.sent if order_id.startswith("pos-refused")]
    assert refused and max(refused) == deadline  # the sweep's last go is at the deadline
    line = next(line for line in summary.lines if line.mint == "refused")
    assert not line.completed
