"""TradingEngine and its policy: entries, filters, order ids, limits under a burst, kill switch."""

from __future__ import annotations

import msgspec
import pytest

from pumpflow.common.events import Event, OrderFilled, OrderRejected, OrderRequested, make_event
from pumpflow.common.priority import Priority
from pumpflow.common.trading import (
    MIGRATION_POOL,
    VENUE_POOL,
    BreakerSettings,
    Decision,
    DecisionPolicy,
    EntryDecision,
    EntryFilters,
    PaperBroker,
    PositionBook,
    RiskManager,
    TradingEngine,
    exit_value,
    order_id_for,
)

from .conftest import START


def orders(events: list[Event]) -> list[OrderRequested]:
    return [e.data for e in events if isinstance(e.data, OrderRequested)]


def test_a_ready_token_s_prediction_becomes_a_sized_entry_order(engine, market, risk):
    mint = market.ready(engine)
    prediction = market.prediction(mint, score=0.9)
    out = engine.process(prediction)
    [order] = orders(out)
    assert order.mint == mint and order.side == "buy"
    assert order.order_id == order_id_for(prediction.id)
    assert out[0].causation_id == prediction.id
    # 4 SOL at full confidence; 0.9 is 3/4 of the way from 0.6 to 1: 0.875 of it;
    # the curve's depth (2% impact) caps it first
    curve = engine.views[mint].curve
    wanted = 4.0 * 0.875
    assert order.sol_amount == pytest.approx(min(wanted, 0.02 * curve.v_sol * 1.0125))
    assert risk.exposure(mint) == order.sol_amount  # reserved until filled


def test_a_shadow_arm_s_prediction_is_never_traded_on(engine, market):
    mint = market.ready(engine)
    live = market.prediction(mint, score=0.9)
    shadow = make_event(
        msgspec.structs.replace(live.data, arm="shadow", shadow=True),
        source="model/test",
        time=live.time,
    )
    assert orders(engine.process(shadow)) == []
    assert engine.views[mint].prediction is None and engine.last_decision is None
    assert len(orders(engine.process(live))) == 1


def test_a_redelivered_prediction_never_sends_a_second_order(engine, market, book, clock):
    mint = market.ready(engine)
    prediction = market.prediction(mint)
    [first] = orders(engine.process(prediction))
    assert orders(engine.process(prediction)) == []
    # a second engine deciding the same stream (paper or live) orders the same id
    other = TradingEngine(
        None, PositionBook(), RiskManager(100.0, 0.02, 5, clock=clock), clock=clock
    )
    market.ready(other, mint)
    [same] = orders(other.process(prediction))
    assert same == first
    assert engine.process(prediction) == other.process(prediction) == []


def test_the_order_event_id_is_derived_too(engine, market, clock):
    mint = market.ready(engine)
    prediction = market.prediction(mint)
    [event] = engine.process(prediction)
    other = TradingEngine(
        None, PositionBook(), RiskManager(100.0, 0.02, 5, clock=clock), clock=clock
    )
    market.ready(other, mint)
    [again] = other.process(prediction)
    assert event.id == again.id and len(event.id) == 32


@pytest.mark.parametrize("state", ["declining", "inactive", "graduated"])
def test_no_entry_into_declining_inactive_or_graduated_tokens(engine, market, state):
    mint = market.ready(engine)
    engine.process(market.lifecycle(mint, state, Priority.HIGH))
    decision = engine.make_decision(mint, GOOD)
    assert not decision.enter
    assert orders(engine.process(market.prediction(mint))) == []


GOOD = {
    "time_since_launch": 60.0,
    "curve_progress": 0.2,
    "creator_holding_share": 0.02,
    "creator_sold": 0.0,
    "buy_volume_sol_60s": 5.0,
    "unique_traders": 25.0,
    "top_buyer_share": 0.2,
}


def said(decision: Decision | EntryDecision) -> tuple[str, ...]:
    """What ``decision``'s reasons say."""
    return tuple(reason.text for reason in decision.reasons)


def test_a_migrated_token_is_not_entered(engine, market):
    mint = market.ready(engine)
    engine.process(market.tokens.migrated(mint))
    decision = engine.make_decision(mint, GOOD)
    assert "graduated" in said(decision)


def test_a_new_token_is_entered_at_its_priority_and_a_low_one_not(engine, market, risk):
    risk.update_capital(20.0)  # sizes well inside the curve's depth
    mint = market.ready(engine)
    engine.process(market.lifecycle(mint, "new", Priority.NORMAL))
    [order] = orders(engine.process(market.prediction(mint, score=1.0)))
    assert order.sol_amount == pytest.approx(0.4)  # NORMAL: half of 4% of 20 SOL
    low = market.ready(engine)
    engine.process(market.lifecycle(low, "new", Priority.LOW))
    assert "priority LOW" in said(engine.make_decision(low, GOOD))


@pytest.mark.parametrize(
    ("feature", "value", "reason"),
    [
        ("time_since_launch", 5.0, "age"),
        ("time_since_launch", 300.0, "age"),
        ("curve_progress", 0.01, "curve progress"),
        ("curve_progress", 0.85, "curve progress"),
        ("creator_holding_share", 0.08, "creator holds"),
        ("creator_sold", 1.0, "creator sold"),
        ("buy_volume_sol_60s", 1.0, "bought"),
        ("unique_traders", 5.0, "traders"),
        ("top_buyer_share", 0.6, "top buyer"),
    ],
)
def test_each_entry_filter_blocks_an_entry(engine, market, feature, value, reason):
    mint = market.ready(engine, **{feature: value})
    assert orders(engine.process(market.prediction(mint))) == []
    [why] = said(engine.analyze_token(mint, {**GOOD, feature: value}))
    assert reason in why
    assert engine.analyze_token(mint, GOOD).enter


def test_a_token_whose_creation_was_not_seen_is_not_entered(engine, market):
    """First seen by a trade (the wallet's own, made by hand; a stream joined late), a
    token's age and creator are counted from that trade: it looks new and is not."""
    mint = market.tokens.mint()
    for event in (
        market.tokens.buy(mint, "alice", sol=3.0),
        market.features(mint),
        market.lifecycle(mint),
    ):
        engine.process(event)
    assert orders(engine.process(market.prediction(mint))) == []
    assert said(engine.analyze_token(mint, GOOD)) == ("creation not seen",)


def test_low_scores_and_missing_inputs_block_an_entry(engine, market):
    mint = market.ready(engine)
    assert orders(engine.process(market.prediction(mint, score=0.59))) == []
    assert "no prediction" in said(engine.analyze_token("unknown", GOOD))
    assert "lifecycle unknown" in said(engine.analyze_token("unknown", GOOD))
    assert any("features lack" in r for r in said(engine.analyze_token(mint, {})))


def test_name_and_creator_block_lists(market, book, risk, clock):
    policy = DecisionPolicy(EntryFilters(name_blocklist=("good",), creator_blocklist=()))
    engine = TradingEngine(None, book, risk, policy=policy, clock=clock)
    mint = market.ready(engine)  # named "Good Coin"
    assert orders(engine.process(market.prediction(mint))) == []
    assert said(engine.analyze_token(mint, GOOD)) == ("name blocked ('good')",)
    policy = DecisionPolicy(EntryFilters(creator_blocklist=("dev",)))
    engine = TradingEngine(None, book, risk, policy=policy, clock=clock)
    mint = market.ready(engine)
    assert orders(engine.process(market.prediction(mint))) == []
    assert said(engine.analyze_token(mint, GOOD)) == ("creator blocked",)
    # a token whose creation trading never saw cannot be cleared against a block list
    engine.process(market.features("seen-late"))
    assert "creator unknown (block list set)" in said(engine.analyze_token("seen-late", GOOD))


def test_every_limit_holds_under_a_burst_of_signals(engine, market, risk, book):
    mints = [market.ready(engine) for _ in range(12)]
    sent: list[OrderRequested] = []
    for _ in range(5):  # each token predicted five times over, interleaved
        for mint in mints:
            sent += orders(engine.process(market.prediction(mint, score=1.0)))
    lim = risk.limits
    by_token: dict[str, float] = {}
    for order in sent:
        by_token[order.mint] = by_token.get(order.mint, 0.0) + order.sol_amount
    assert len(by_token) == lim.max_concurrent_positions
    assert max(by_token.values()) <= risk.capital * lim.max_token_exposure_fraction + 1e-9
    assert sum(by_token.values()) <= risk.capital * lim.max_total_exposure_fraction + 1e-9
    assert all(o.sol_amount <= risk.capital * lim.max_position_fraction for o in sent)
    assert risk.total_exposure == pytest.approx(sum(by_token.values()))


def test_limits_hold_as_fills_turn_reservations_into_positions(market, clock):
    book = PositionBook()
    risk = RiskManager(20.0, 0.02, 3, positions=book, clock=clock)
    engine = TradingEngine(None, book, risk, clock=clock)
    broker = PaperBroker()
    mints = [market.ready(engine, broker=broker) for _ in range(6)]
    for round_ in range(4):
        for mint in mints:
            for event in engine.process(market.prediction(mint, score=1.0)):
                if isinstance(event.data, OrderRequested):
                    assert broker.submit(event.data, time=clock.now()) is None
        clock.set_sync(START + round_ + 1)
        for outcome in broker.due(clock.now()):
            engine.process(market.filled(outcome.result))
        assert book.open_count + len(risk.reservations) <= 3
        assert risk.total_exposure <= 20.0 * 0.5 + 1e-9
        for mint in mints:
            assert risk.exposure(mint) <= 20.0 * 0.1 + 1e-9
    assert book.open_count == 3 and risk.reservations == {}


def test_the_kill_switch_stops_entries_within_one_event(engine, market, risk):
    mints = [market.ready(engine) for _ in range(3)]
    [_] = orders(engine.process(market.prediction(mints[0])))
    risk.kill("operator: stop")
    out = engine.process(market.prediction(mints[1]))
    assert orders(out) == []
    [halt] = [e.data for e in out]
    assert (halt.state, halt.reason) == ("halted", "operator: stop")
    risk.resume("operator: go")
    assert [e.data.state for e in engine.process(market.features(mints[2]))] == ["active"]
    assert len(orders(engine.process(market.prediction(mints[2])))) == 1


def test_a_breaker_trip_stops_entries_from_the_event_that_trips_it(engine, market):
    mint = market.ready(engine)
    bad = market.tokens.buy(mint, "x", sol=0.1, marketCapSol=1.0)
    out = engine.process(bad)
    assert [type(e.data).__name__ for e in out] == ["CircuitBreakerChanged", "TradingStateChanged"]
    assert orders(engine.process(market.prediction(mint))) == []


def test_a_prediction_late_past_the_feed_lag_limit_enters_nothing(engine, market, clock):
    """A prediction is stamped with the time of the trade its vector follows from: one
    arriving past ``max_feed_lag_s`` (the model service behind, its queue draining after
    a restart) scores a market long gone, while the token's own events are on time. It
    trips the stale breaker as a late trade does, and orders nothing."""
    mint = market.ready(engine)
    late = make_event(market.prediction(mint).data, source="model/test", time=clock.now() - 5.0)
    out = engine.process(late)
    assert orders(out) == []
    [trip, _halt] = [e.data for e in out]
    assert trip.breaker == "stale" and trip.tripped and "feed lag 5.0s" in trip.reason
    assert "model.prediction" in trip.reason


def test_fills_open_positions_and_trades_mark_them(engine, market, book, risk, clock):
    broker = PaperBroker()
    mint = market.ready(engine, broker=broker)
    [order] = orders(engine.process(market.prediction(mint)))
    broker.submit(order, time=START)
    clock.set_sync(START + 1)
    [outcome] = broker.due(clock.now())
    [opened] = engine.process(market.filled(outcome.result))
    assert opened.type == "position.opened" and opened.data.position_id == order.order_id
    assert risk.reservations == {} and risk.exposure(mint) == outcome.fill.sol
    engine.process(market.tokens.buy(mint, "bob", sol=5.0))
    position = book.position(mint)
    assert position.unrealized_pnl_sol > 0 and position.mark_price is not None


def test_a_buy_booked_past_its_limit_check_is_told_with_the_limits_it_leaves_exceeded(
    market, clock
):
    """A buy's fill the risk manager holds no reservation for (a live order's late fill,
    given up as unconfirmed) or costing more than it reserved is booked, and told
    (:meth:`TradingEngine.take_fills_over_limit`) when it leaves a limit exceeded; one
    within its reservation, or within every limit, or delivered again is not."""
    book = PositionBook()
    risk = RiskManager(10.0, 0.02, 20, positions=book, clock=clock)
    engine = TradingEngine(None, book, risk, clock=clock)

    def filled(order_id: str, mint: str, cost: float) -> Event:
        fill = OrderFilled(
            order_id=order_id, mint=mint, side="buy", token_amount=1e6, sol_amount=cost, price=1e-7
        )
        return market.filled(fill)

    engine.process(filled("late-1", "a", 0.5))
    assert book.holds("a") and engine.take_fills_over_limit() == []
    risk.reserve("o2", "b", 0.9)
    engine.process(filled("o2", "b", 0.9))
    assert engine.take_fills_over_limit() == []

    engine.process(filled("late-3", "b", 0.5))
    [late] = engine.take_fills_over_limit()
    assert late.fill.order_id == "late-3" and late.reserved is None
    [breach] = late.breaches
    assert breach.limit == "token_exposure" and breach.excess == pytest.approx(0.4)
    assert book.exposure("b") == pytest.approx(1.4)
    engine.process(filled("late-3", "b", 0.5))
    assert engine.take_fills_over_limit() == []

    risk.reserve("o4", "c", 0.9)
    engine.process(filled("o4", "c", 1.1))
    [dear] = engine.take_fills_over_limit()
    assert dear.reserved == 0.9
    assert {b.limit for b in dear.breaches} == {"per_trade", "token_exposure"}
    assert risk.reservations == {}


def test_a_sale_s_outcome_releases_the_tokens_it_reserved(engine, market, book, clock):
    broker = PaperBroker()
    mint = market.ready(engine, broker=broker)
    [order] = orders(engine.process(market.prediction(mint)))
    broker.submit(order, time=START)
    clock.set_sync(START + 1)
    [bought] = broker.due(clock.now())
    engine.process(market.filled(bought.result))
    held = book.position(mint).tokens
    assert book.reserve_sale("s1", mint, held).tokens == held
    assert book.reserve_sale("s2", mint, held).tokens == 0.0
    refused = OrderRejected(order_id="s1", mint=mint, reason="refused", side="sell")
    engine.process(market.filled(refused))
    assert book.sales == {} and book.reserve_sale("s2", mint, held).tokens == held


class Collected:
    """A publisher that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish(self, event: Event) -> None:
        self.events.append(event)


async def test_on_feature_event_publishes_what_process_returns(market, book, risk, clock):
    bus = Collected()
    engine = TradingEngine(bus, book, risk, clock=clock)
    mint = market.ready(engine)
    out = await engine.on_feature_event(market.prediction(mint))
    assert bus.events == out and len(orders(out)) == 1


def held_then_migrated(engine, market, clock) -> str:
    """Enter a token on its curve, fill the entry, then migrate the token to its pool."""
    broker = PaperBroker()
    mint = market.ready(engine, broker=broker)
    [order] = orders(engine.process(market.prediction(mint)))
    broker.submit(order, time=clock.now())
    clock.set_sync(START + 1)
    [outcome] = broker.due(clock.now())
    engine.process(market.filled(outcome.result))
    engine.process(market.tokens.migrated(mint))
    return mint


def test_after_migration_positions_are_marked_on_the_pool(engine, market, book, clock):
    mint = held_then_migrated(engine, market, clock)
    position = book.position(mint)
    on_pool = exit_value(
        MIGRATION_POOL, position.tokens, execution=book.execution, venue=VENUE_POOL
    )
    assert position.mark_value_sol == on_pool
    engine.process(market.tokens.buy(mint, "amm", sol=2.0, pool="pump-amm"))
    assert position.mark_value_sol > on_pool
    assert "graduated" in said(engine.make_decision(mint, GOOD))


def test_a_redelivered_token_event_is_folded_into_its_view_once(engine, market, book, clock):
    """A trade on the pool moves the pool's state in the view: one that comes again (by
    its publisher's seq) leaves it, and the position's mark, as they were."""
    mint = held_then_migrated(engine, market, clock)
    pool_trade = market.tokens.buy(mint, "amm", sol=2.0, pool="pump-amm")
    engine.process(pool_trade)
    view = engine.views[mint]
    once, mark = view.market.state, book.position(mint).mark_value_sol
    assert once != MIGRATION_POOL
    assert engine.process(pool_trade) == []
    assert not engine.admit(pool_trade)
    assert (view.market.state, book.position(mint).mark_value_sol) == (once, mark)
    # the next trade moves it on
    engine.process(market.tokens.sell(mint, "amm", pool="pump-amm"))
    assert view.market.state != once


def test_a_redelivered_token_event_counts_once_toward_the_rate_breaker(market, clock):
    """More distinct events than the rate window allows trip the rate breaker; the same
    trade delivered as often (by its publisher's seq, a redelivery) counts once."""
    settings = BreakerSettings(
        max_events_per_s=1.0, rate_window_s=10.0, max_feed_lag_s=1e9, max_silence_s=1e9
    )

    def rate_tripped(events: list[Event]) -> bool:
        book = PositionBook()
        risk = RiskManager(100.0, 0.02, 5, positions=book, clock=clock, breakers=settings)
        engine = TradingEngine(None, book, risk, clock=clock)
        for event in events:
            engine.process(event)
        return risk.breakers["rate"].tripped

    mint = market.tokens.mint()
    created = market.tokens.created(mint)
    trade = market.tokens.buy(mint, "bob")
    assert not rate_tripped([created, *[trade] * 20])
    assert rate_tripped([created, trade, *(market.tokens.buy(mint, "bob") for _ in range(19))])


@pytest.mark.parametrize("state", ["inactive", "graduated"])
def test_late_events_of_a_token_retired_unheld_make_no_view_again(engine, market, state):
    """A token retired with nothing held leaves with its retirement. Its late events (a
    straggler's trade, the vector and the score the features and the model announce for
    it, as for a graduate's pool trades) make no view again: activity retires such a
    token again without a lifecycle event, so nothing would ever forget that view. A
    lifecycle event reviving it takes it back."""
    mint = market.ready(engine)
    engine.process(market.lifecycle(mint, state))
    assert mint not in engine.views
    late = [market.features(mint), market.prediction(mint)]
    if state == "inactive":
        late.insert(0, market.tokens.buy(mint, "straggler", sol=0.1))
    for event in late:
        assert orders(engine.process(event)) == []
        assert mint not in engine.views
    assert engine.last_decision is not None and not engine.last_decision.enter
    if state == "inactive":
        engine.process(market.lifecycle(mint, "active"))
        assert engine.views[mint].lifecycle.state == "active"
