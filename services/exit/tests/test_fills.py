"""The rules' counts of a position against its fills, on the exit processor: a sale that
fills short of its order, a sale refused, tokens sold by other means, and the mark of a
token on its AMM pool after the migration."""

from __future__ import annotations

import pytest

from pumpflow.common.clock import ReplayClock
from pumpflow.common.curve import MIGRATION_POOL, CurveState, pool_after_trade
from pumpflow.common.events import (
    Event,
    ExitOrder,
    OrderFilled,
    OrderRejected,
    PositionOpened,
    PositionUpdated,
    make_event,
)
from pumpflow.common.exit import ExitProcessor, ExitRules, ExitState
from pumpflow.common.keyed import UNCHANGED
from pumpflow.common.testing import TokenEvents
from pumpflow.common.trading import PaperBroker, PaperExecution

from .helpers import START

BOUGHT = 1_000_000.0
#: only the take-profit ladder (its default: +50%, +100%, +200%, a quarter each)
LADDER_ONLY = ExitRules(
    trailing=(),
    stop_loss=None,
    max_hold_s=None,
    stale_after_s=None,
    quiet_s=None,
    decline_fraction=None,
)


class _Effects:
    """What the processor asks of the keyed consumer: its orders kept, its time the
    market's."""

    more = False

    def __init__(self, key: str, clock: ReplayClock):
        self.key, self.clock = key, clock
        self.orders: list[ExitOrder] = []

    @property
    def now(self) -> float:
        return self.clock.now()

    def emit(self, payload, *, time):
        self.orders.append(payload)

    def set_timer(self, at):
        pass

    def cancel_timer(self):
        pass

    def retire(self, ttl_s):
        pass


class _Position:
    """One position on the exit processor; the test is the market and trading."""

    def __init__(self, rules: ExitRules, *, held: float = BOUGHT, entry: float | None = None):
        self.clock = ReplayClock(START)
        self.tokens = TokenEvents(self.clock)
        self.processor = ExitProcessor(rules, clock=self.clock)
        self.mint = self.tokens.mint()
        self.state: ExitState = self.processor.initial(self.mint)
        self.effects = _Effects(self.mint, self.clock)
        self.tokens.created(self.mint, sol=5.0)
        self.trade(self.tokens.buy(self.mint, "whale", sol=10.0))
        self.entry = self.tokens.curves[self.mint].price if entry is None else entry
        self.held = held
        self.position_id = "pos-1"
        opened = PositionOpened(
            position_id=self.position_id, mint=self.mint, token_amount=held,
            cost_sol=held * self.entry, entry_price=self.entry, mark_price=self.entry,
        )  # fmt: skip
        self.apply(opened)
        #: tokens trading sold of the position, order by order
        self.sold: dict[str, float] = {}

    def apply(self, payload, *, seq: int | None = None) -> None:
        """``payload`` as trading publishes it (numbered ``seq``, if given)."""
        event = make_event(payload, source="trading/test", time=self.clock.now(), seq=seq)
        self.trade(event)

    def trade(self, event: Event) -> None:
        state = self.processor.apply(self.state, event, self.effects)
        if state is not UNCHANGED:
            self.state = state

    def buy_until(self, gain: float) -> None:
        while self.tokens.curves[self.mint].price < self.entry * (1 + gain):
            self.trade(self.tokens.buy(self.mint, "whale", sol=1.0))

    def orders(self) -> list[ExitOrder]:
        return self.effects.orders

    def fill(self, order: ExitOrder, tokens: float | None = None) -> None:
        """Trading fills ``order`` (``tokens`` of it: all by default) and tells the
        position's tokens left."""
        self.apply(self.filled(order, tokens))
        self.tell_held()

    def filled(self, order: ExitOrder, tokens: float | None = None) -> OrderFilled:
        """Trading's fill of ``order`` (``tokens`` of it: all by default), counted sold."""
        sold = order.token_amount if tokens is None else tokens
        price = self.tokens.curves[self.mint].price
        self.sold[order.order_id] = sold
        return OrderFilled(
            order_id=order.order_id, mint=self.mint, side="sell", token_amount=sold,
            sol_amount=sold * price, price=price, position_id=self.position_id,
        )  # fmt: skip

    def refuse(self, order: ExitOrder) -> None:
        refused = OrderRejected(
            order_id=order.order_id, mint=self.mint, reason="slippage", side="sell",
            position_id=self.position_id,
        )  # fmt: skip
        self.apply(refused)

    def tell_held(self) -> None:
        """Trading's position event: what it holds after every sale so far."""
        self.apply(self.holding())

    def holding(self) -> PositionUpdated:
        """Trading's position: what it bought less every sale so far."""
        left = self.held - sum(self.sold.values())
        return PositionUpdated(
            position_id=self.position_id, mint=self.mint, token_amount=left,
            cost_sol=left * self.entry, entry_price=self.entry,
        )  # fmt: skip

    def total_sold(self) -> float:
        return sum(self.sold.values())


def test_a_ladder_step_filled_short_sells_the_rest_as_that_step_and_the_ladder_its_shares():
    """The first step's sale fills half of what it ordered: the other half stays due as
    that step (ordered again at once, the gain still there), not taken for tokens
    bought, so every step after it sells a quarter of the tokens bought, and the ladder
    has sold 25%, 50% and 75% of them as it reaches each step."""
    p = _Position(LADDER_ONLY)
    p.buy_until(0.5)
    [first] = p.orders()
    assert (first.reason, first.token_amount) == ("take_profit_1", pytest.approx(BOUGHT / 4))
    p.fill(first, first.token_amount / 2)
    rest = p.orders()[-1]
    assert rest is not first, "the step's unsold half was not ordered again"
    assert (rest.reason, rest.token_amount) == ("take_profit_1", pytest.approx(BOUGHT / 8))
    p.fill(rest)
    assert p.total_sold() == pytest.approx(0.25 * BOUGHT)
    for gain, cumulative in ((1.0, 0.5), (2.0, 0.75)):
        p.buy_until(gain)
        step = p.orders()[-1]
        assert step.token_amount == pytest.approx(BOUGHT / 4), step
        p.fill(step)
        assert p.total_sold() == pytest.approx(cumulative * BOUGHT)
    assert p.state.watch.bought == pytest.approx(BOUGHT)
    assert p.state.watch.left == pytest.approx(BOUGHT / 4)


def test_a_stop_loss_filled_short_orders_the_rest_at_once_and_counts_nothing_bought():
    """A stop loss's sale sells 60% of the position: the 40% left is still held, and the
    stop loss, still due, orders it at once (a dump may bring no trade to look again
    at), as tokens the position held all along, not an entry added."""
    p = _Position(ExitRules(trailing=(), max_hold_s=None, stale_after_s=None, quiet_s=None))
    while p.tokens.curves[p.mint].price > p.entry * 0.69:
        p.trade(p.tokens.sell(p.mint, "whale", tokens=p.tokens.balance(p.mint, "whale") * 0.1))
    [stop] = p.orders()
    assert (stop.reason, stop.token_amount) == ("stop_loss", pytest.approx(BOUGHT))
    p.fill(stop, BOUGHT * 0.6)
    rest = p.orders()[-1]
    assert rest is not stop, "the rest waited for the token's next trade"
    assert (rest.reason, rest.token_amount) == ("stop_loss", pytest.approx(BOUGHT * 0.4))
    assert p.state.watch.bought == pytest.approx(BOUGHT)
    p.fill(rest)
    assert p.total_sold() == pytest.approx(BOUGHT)
    p.trade(p.tokens.buy(p.mint, "small", sol=0.001))
    assert p.orders()[-1] is rest


def test_the_rest_of_a_step_refused_is_ordered_again_as_that_rest_not_as_a_whole_step():
    """The first step fills short, the sale of its rest is refused: what comes back is
    that rest (the step sold the rest of its quarter already), so the step orders it
    again, and the ladder has sold a quarter, not a quarter and then some."""
    p = _Position(LADDER_ONLY)
    p.buy_until(0.5)
    [first] = p.orders()
    p.fill(first, first.token_amount * 0.4)
    rest = p.orders()[-1]
    assert rest.token_amount == pytest.approx(BOUGHT / 4 * 0.6)
    p.refuse(rest)
    again = p.orders()[-1]
    assert again is not rest
    assert (again.reason, again.token_amount) == ("take_profit_1", pytest.approx(rest.token_amount))
    p.fill(again)
    assert p.total_sold() == pytest.approx(BOUGHT / 4)
    p.buy_until(1.0)
    second = p.orders()[-1]
    assert (second.reason, second.token_amount) == ("take_profit_2", pytest.approx(BOUGHT / 4))


@pytest.mark.parametrize("outcome", ["refused", "filled short"])
def test_a_steps_outcome_after_a_dump_is_judged_at_the_dumps_mark_not_at_the_steps(outcome):
    """The first step is ordered at +50%; the token dumps to +30% before trading settles
    the sale, which it refuses (slipped past its limit) or fills by half. Trading settles
    it on the trades it applied, which the exit's keyed consumer gets before the outcome
    (test_outcomes_behind_trades.py): the step comes back at the mark the dump left,
    below its gain, and is ordered again only as a trade brings the gain back, at that
    trade's mark; never again at the mark it was first ordered at."""
    p = _Position(LADDER_ONLY)
    p.buy_until(0.5)
    [first] = p.orders()
    assert first.reason == "take_profit_1"
    assert p.state.pending[first.order_id].mark_price == pytest.approx(
        p.tokens.curves[p.mint].price
    )
    while p.tokens.curves[p.mint].price > p.entry * 1.3:
        p.trade(p.tokens.sell(p.mint, "whale", tokens=p.tokens.balance(p.mint, "whale") * 0.02))
    dumped = p.tokens.curves[p.mint].price
    if outcome == "refused":
        p.refuse(first)
        owed = first.token_amount
    else:
        p.fill(first, first.token_amount / 2)
        owed = first.token_amount / 2
    assert p.orders() == [first], "the step was ordered again at a mark the dump left behind"
    assert p.state.watch.mark_price == pytest.approx(dumped)
    p.buy_until(0.5)
    again = p.orders()[-1]
    assert again is not first
    assert (again.reason, again.token_amount) == ("take_profit_1", pytest.approx(owed))
    assert p.state.pending[again.order_id].mark_price == pytest.approx(
        p.tokens.curves[p.mint].price
    )


def test_tokens_sold_by_other_means_leave_the_rules_no_more_than_is_held():
    """Trading's position shows 60% of it sold by other means (a graceful exit's
    tranches before it ended at its deadline, a sale by hand): the rules order what is
    held, not what they had left; the ladder's steps are still shares of what was bought
    (the first sells its quarter of it)."""
    p = _Position(ExitRules(max_hold_s=None, stale_after_s=None, quiet_s=None))
    p.sold["by hand"] = BOUGHT * 0.6
    p.tell_held()
    p.buy_until(0.5)
    [step] = p.orders()
    assert (step.reason, step.token_amount) == ("take_profit_1", pytest.approx(BOUGHT / 4))
    p.fill(step)
    while p.tokens.curves[p.mint].price > p.entry * 0.69:
        p.trade(p.tokens.sell(p.mint, "whale", tokens=p.tokens.balance(p.mint, "whale") * 0.1))
    stop = p.orders()[-1]
    assert stop.reason in ("trailing_stop", "stop_loss")
    assert stop.token_amount == pytest.approx(BOUGHT * 0.15)
    p.fill(stop)
    assert p.total_sold() == pytest.approx(BOUGHT)


def test_a_position_event_applied_after_a_later_one_counts_nothing_bought_again():
    """Trading adds 20% to the position (its update, seq 2), then a step's sale fills
    (seq 3) and the position says what is left (seq 4); the update of seq 2 comes last
    (the consumer applies an overtaken seq as it arrives). What it holds is past: the
    rules count the 20% bought once, and the next step sells a quarter of 1.2 times the
    holding, not of more."""
    p = _Position(LADDER_ONLY)
    p.buy_until(0.5)
    [first] = p.orders()
    p.held = BOUGHT * 1.2
    added = p.holding()
    p.apply(p.filled(first), seq=3)
    p.apply(p.holding(), seq=4)
    p.apply(added, seq=2)
    assert p.state.position.tokens == pytest.approx(BOUGHT * 0.95)
    assert p.state.watch.bought == pytest.approx(BOUGHT * 1.2)
    p.buy_until(1.0)
    second = p.orders()[-1]
    assert (second.reason, second.token_amount) == ("take_profit_2", pytest.approx(3e5))


def test_a_sale_filled_after_the_position_event_that_counts_it_sells_the_position_down_once():
    """A step's fill (seq 3) comes after the position event that follows it (seq 4):
    the position is what that event says, not that less the fill again, and the stop
    loss after it sells every token held."""
    rules = ExitRules(trailing=(), max_hold_s=None, stale_after_s=None, quiet_s=None)
    p = _Position(rules)
    p.buy_until(0.5)
    [first] = p.orders()
    fill = p.filled(first)
    p.apply(p.holding(), seq=4)
    p.apply(fill, seq=3)
    assert p.state.position.tokens == pytest.approx(BOUGHT * 0.75)
    while p.tokens.curves[p.mint].price > p.entry * 0.69:
        p.trade(p.tokens.sell(p.mint, "whale", tokens=p.tokens.balance(p.mint, "whale") * 0.1))
    stop = p.orders()[-1]
    assert (stop.reason, stop.token_amount) == ("stop_loss", pytest.approx(BOUGHT * 0.75))


@pytest.mark.parametrize("told", ["by its migrate frame", "by its first pool trade"])
def test_on_its_pool_the_position_is_marked_at_the_pools_spot_price_not_the_trades_average(
    told: str,
):
    """Half the position is held on after the migration (``migration_fraction`` 0.5). A
    buy of 10 SOL on the pool lifts its spot price 25% (constant product: the price goes
    with the square of the SOL in it) at an average 12% above the spot before it. With
    the entry 60% below the spot after the buy, the first step's +50% is reached on
    the spot price, not on the trade's average (+43%)."""
    sol = 10.0
    bought = sol * MIGRATION_POOL.v_tokens / (MIGRATION_POOL.v_sol + sol)
    spot = pool_after_trade(MIGRATION_POOL, "buy", sol, bought).price
    average = sol / bought
    assert spot / average == pytest.approx(1 + sol / MIGRATION_POOL.v_sol)
    rules = ExitRules(**{**_fields(LADDER_ONLY), "migration_fraction": 0.5})
    p = _Position(rules, entry=spot / 1.6)
    if told == "by its migrate frame":
        p.trade(p.tokens.migrated(p.mint))
    pool_buy = p.tokens.buy(p.mint, "bob", sol=sol, pool="pump-amm", tokenAmount=bought,
                            solAmount=sol)  # fmt: skip
    p.trade(pool_buy)
    assert p.state.mark_price == pytest.approx(spot)
    assert p.state.watch.mark_price == pytest.approx(spot)
    migration, step = p.orders()
    assert (migration.reason, migration.token_amount) == ("migration", pytest.approx(BOUGHT / 2))
    assert (step.reason, step.token_amount) == ("take_profit_1", pytest.approx(BOUGHT / 4))
    # the next pool trade moves the pool on from there
    pool_sale = p.tokens.sell(p.mint, "bob", tokens=bought / 2, pool="pump-amm",
                              tokenAmount=bought / 2, solAmount=sol / 3)  # fmt: skip
    p.trade(pool_sale)
    after = pool_after_trade(
        pool_after_trade(MIGRATION_POOL, "buy", sol, bought), "sell", sol / 3, bought / 2
    )
    assert p.state.mark_price == pytest.approx(after.price)


def test_a_migration_its_first_pool_trade_reveals_is_decided_at_the_pools_spot():
    """No migrate frame came: a buy on the token's pool tells the migration. The
    migration's sale is decided at the pool's spot after that buy (the price it sells
    near), not at the curve's last mark."""
    sol = 10.0
    bought = sol * MIGRATION_POOL.v_tokens / (MIGRATION_POOL.v_sol + sol)
    spot = pool_after_trade(MIGRATION_POOL, "buy", sol, bought).price
    p = _Position(LADDER_ONLY)
    p.trade(p.tokens.buy(p.mint, "small", sol=0.001))
    curve_mark = p.state.watch.mark_price
    assert spot > curve_mark * 1.2
    p.trade(p.tokens.buy(p.mint, "bob", sol=sol, pool="pump-amm", tokenAmount=bought,
                         solAmount=sol))  # fmt: skip
    [migration] = p.orders()
    assert migration.reason == "migration"
    assert p.state.pending[migration.order_id].mark_price == pytest.approx(spot)


def _pool(state: ExitState) -> tuple[float, float]:
    return state.pool_v_sol, state.pool_v_tokens


def _reserves(pool: CurveState) -> tuple[float, float]:
    return pool.v_sol, pool.v_tokens


def test_the_exits_own_paper_sale_on_the_pool_moves_its_pool_as_it_moves_tradings():
    """Half the position is sold as the token migrates (``migration_fraction`` 0.5) and
    trading's paper broker fills the sale on the token's pool. The sale never shows in
    the token's stream, yet it moved the pool the next sale fills on: the exit's pool is
    the broker's after it (and after a market buy come before its fill), and the rules
    mark what is held at that pool's spot, not at one the sale's own impact has not
    lowered."""
    rules = ExitRules(**{**_fields(LADDER_ONLY), "take_profit": (), "migration_fraction": 0.5})
    held = 20 * BOUGHT
    p = _Position(rules, held=held)
    broker = PaperBroker(PaperExecution())
    now = p.clock.now()
    migrated = p.tokens.migrated(p.mint, time=now)
    broker.observe(migrated.data, time=now)
    p.trade(migrated)
    [sale] = p.orders()
    assert (sale.reason, sale.token_amount) == ("migration", pytest.approx(held / 2))
    assert broker.submit(sale, time=now) is None
    sol = 10.0
    bought = sol * MIGRATION_POOL.v_tokens / (MIGRATION_POOL.v_sol + sol)
    market_buy = p.tokens.buy(p.mint, "bob", sol=sol, pool="pump-amm", tokenAmount=bought,
                              solAmount=sol, time=now + 1.0)  # fmt: skip
    # past the latency: the sale fills on the pool before the buy, which trading then takes
    [outcome] = broker.observe(market_buy.data, time=now + 1.0)
    fill = outcome.result
    assert isinstance(fill, OrderFilled) and fill.token_amount == pytest.approx(held / 2)
    # the exit sees the feed's buy before trading's fill, which trading publishes after it
    p.trade(market_buy)
    unmoved = pool_after_trade(MIGRATION_POOL, "buy", sol, bought)
    assert _pool(p.state) == pytest.approx(_reserves(unmoved))
    p.sold[sale.order_id] = fill.token_amount
    p.apply(fill)
    p.tell_held()
    trading_pool = broker.market(p.mint).state
    assert _pool(p.state) == pytest.approx(_reserves(trading_pool), rel=1e-12)
    assert p.state.mark_price == pytest.approx(trading_pool.price, rel=1e-12)
    assert p.state.watch.mark_price == pytest.approx(trading_pool.price, rel=1e-12)
    # its own impact: 10M tokens sold into a pool of some 185M take 9% off the spot
    assert trading_pool.price < unmoved.price * 0.92


def test_a_sale_the_stream_reports_or_one_on_the_curve_moves_the_pool_no_more():
    """A take-profit sale decided on the curve fills there just before the migration, its
    fill coming after the migrate frame: it moved the curve, not the pool. The migration's
    sale is sold live: the stream reports the wallet's trade, which moves the pool, and
    its fill names that trade's signature: the pool moves by the sale once."""
    p = _Position(LADDER_ONLY)
    p.buy_until(0.5)
    [step] = p.orders()
    p.trade(p.tokens.migrated(p.mint))
    [_, migration] = p.orders()
    on_curve = OrderFilled(
        order_id=step.order_id, mint=p.mint, side="sell", token_amount=step.token_amount,
        sol_amount=1.0, price=p.tokens.curves[p.mint].price, position_id=p.position_id,
        venue="pump",
    )  # fmt: skip
    p.sold[step.order_id] = step.token_amount
    p.apply(on_curve)
    p.tell_held()
    assert p.state.pool is None or _pool(p.state) == pytest.approx(_reserves(MIGRATION_POOL))
    tokens = migration.token_amount
    moved = tokens * MIGRATION_POOL.v_sol / (MIGRATION_POOL.v_tokens + tokens)
    ours = p.tokens.sell(p.mint, "wallet", tokens=tokens, pool="pump-amm", tokenAmount=tokens,
                         solAmount=moved)  # fmt: skip
    p.trade(ours)
    live = OrderFilled(
        order_id=migration.order_id, mint=p.mint, side="sell", token_amount=tokens,
        sol_amount=moved * 0.98, price=moved / tokens, fee_sol=moved * 0.02,
        signature=ours.data.signature, position_id=p.position_id, venue="pump-amm",
    )  # fmt: skip
    p.sold[migration.order_id] = tokens
    p.apply(live)
    once = pool_after_trade(MIGRATION_POOL, "sell", moved, tokens)
    assert _pool(p.state) == pytest.approx(_reserves(once), rel=1e-12)
    assert p.state.mark_price == pytest.approx(once.price, rel=1e-12)


def _fields(rules: ExitRules) -> dict:
    return {name: getattr(rules, name) for name in rules.__dataclass_fields__}
