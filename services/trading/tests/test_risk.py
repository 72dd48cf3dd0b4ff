"""RiskManager: sizing, limits, the kill switch, each circuit breaker's trip and recovery."""

from __future__ import annotations

import msgspec
import pytest

from pumpflow.common.curve import CurveState, buy_for_impact, quote_buy
from pumpflow.common.events import (
    SLIPPAGE,
    CircuitBreakerChanged,
    FeedTradeStream,
    ModelPrediction,
    OrderFilled,
    OrderRejected,
    SystemShutdown,
    TokenLifecycle,
    TradingStateChanged,
    make_event,
)
from pumpflow.common.priority import Priority
from pumpflow.common.trading import (
    BREAKERS,
    BreakerSettings,
    EntrySpend,
    LiveExecution,
    PaperExecution,
    PositionBook,
    RiskLimits,
    RiskManager,
    fill_buy,
    live_entry_spend,
)

from .conftest import START


def test_size_risks_the_per_trade_fraction_down_to_the_stop():
    risk = RiskManager(100.0, 0.02, 5)
    # 2% of 100 SOL at risk over a 50% stop: 4 SOL, under the 10 SOL per-trade cap
    assert risk.calculate_position_size("m", 1.0, 0.5) == pytest.approx(4.0)
    # a tight stop would risk more than the cap allows
    assert risk.calculate_position_size("m", 1.0, 0.99) == pytest.approx(10.0)
    # confidence 0 is half a size, NORMAL priority half again; LOW none
    assert risk.calculate_position_size("m", 1.0, 0.5, confidence=0.0) == pytest.approx(2.0)
    normal = risk.calculate_position_size("m", 1.0, 0.5, priority=Priority.NORMAL)
    assert normal == pytest.approx(2.0)
    assert risk.calculate_position_size("m", 1.0, 0.5, priority=Priority.LOW) == 0.0
    assert risk.calculate_position_size("m", 1.0, 1.2) == 0.0
    risk.update_capital(10.0)
    assert risk.calculate_position_size("m", 1.0, 0.5) == pytest.approx(0.4)


def test_size_is_capped_by_the_curve_s_depth():
    risk = RiskManager(1000.0, 0.02, 5)
    curve = CurveState()
    size = risk.calculate_position_size("m", curve.price, curve.price / 2, curve=curve)
    assert size == buy_for_impact(curve, 0.02) == pytest.approx(0.02 * 30 * 1.0125)
    assert quote_buy(curve, size).price_impact == pytest.approx(0.02)


def test_a_token_is_entered_once_unless_adding_is_allowed():
    book = PositionBook()
    risk = RiskManager(100.0, 0.02, 5, positions=book)
    assert risk.check_risk_limits("a", 4.0)
    risk.reserve("o1", "a", 4.0)  # an entry in flight counts as held
    assert "one entry a token" in risk.check_risk_limits("a", 1.0).reason.text
    adding = RiskManager(100.0, 0.02, 5, positions=book, limits=RiskLimits(add_to_positions=True))
    adding.reserve("o1", "a", 4.0)
    assert adding.check_risk_limits("a", 1.0)


def test_a_token_sold_out_is_entered_again_only_after_the_re_entry_cooldown(clock):
    book = PositionBook()
    cooled = RiskManager(
        100.0, 0.02, 5, positions=book, limits=RiskLimits(reentry_cooldown_s=60.0), clock=clock
    )
    at_once = RiskManager(100.0, 0.02, 5, positions=book, clock=clock)
    book.apply_fill(_fill("b1", "buy", 1e6, 1.0, mint="a"), time=START - 100.0)
    book.apply_fill(_fill("s1", "sell", 1e6, 1.2, mint="a"), time=START)
    assert not book.holds("a")
    clock.set_sync(START + 59.0)
    refusal = cooled.check_risk_limits("a", 1.0)
    assert not refusal and refusal.reason.text == "closed 59s ago, in the re-entry cooldown of 60s"
    assert cooled.check_risk_limits("b", 1.0)  # another token: no cooldown
    assert at_once.check_risk_limits("a", 1.0)  # the default: at once
    clock.set_sync(START + 60.0)
    assert cooled.check_risk_limits("a", 1.0)
    # a later position of the token counts from its own close
    book.apply_fill(_fill("b2", "buy", 1e6, 1.0, mint="a"), time=START + 61.0)
    book.apply_fill(_fill("s2", "sell", 1e6, 0.9, mint="a"), time=START + 70.0)
    clock.set_sync(START + 100.0)
    assert "closed 30s ago" in cooled.check_risk_limits("a", 1.0).reason.text


def test_each_limit_holds_and_names_itself():
    book = PositionBook()
    limits = RiskLimits(add_to_positions=True)
    risk = RiskManager(100.0, 0.02, 2, positions=book, limits=limits)
    assert risk.check_risk_limits("a", 4.0)
    assert "per-trade" in risk.check_risk_limits("a", 11.0).reason.text
    assert "under" in risk.check_risk_limits("a", 0.001).reason.text
    risk.reserve("o1", "a", 8.0)
    assert "token's exposure" in risk.check_risk_limits("a", 4.0).reason.text
    assert risk.check_risk_limits("a", 2.0)
    risk.reserve("o2", "b", 4.0)
    assert "2 positions" in risk.check_risk_limits("c", 1.0).reason.text
    risk.release("o2")
    assert risk.check_risk_limits("c", 1.0)
    # total: 50% of capital
    risk = RiskManager(100.0, 0.02, 20, positions=book)
    for i in range(4):
        risk.reserve(f"t{i}", f"m{i}", 10.0)
    assert risk.check_risk_limits("m9", 10.0)
    risk.reserve("t4", "m4", 9.0)
    assert "total exposure" in risk.check_risk_limits("m9", 2.0).reason.text
    assert risk.calculate_position_size("m9", 1.0, 0.5) == pytest.approx(1.0)


def test_a_live_entry_is_sized_checked_and_reserved_at_the_most_it_can_spend():
    """A live buy of S SOL at 5% slippage may spend S x 1.05 x 1.0125 x 1.01 (the price
    up by the slippage, the curve's and the API's fees on top) plus the 0.0001 SOL
    priority fee, about 7.4% more than S: each limit holds against that, the sizing
    gives the largest order whose worst case fits, and the reservation is that worst
    case until the fill, whose real cost the position then carries."""
    spend = live_entry_spend(LiveExecution(wallet="w"), 5.0)
    assert spend.factor == pytest.approx(1.05 * 1.0125 * 1.01, rel=1e-8)
    assert spend.fixed_sol == 0.0001
    book = PositionBook()
    risk = RiskManager(10.0, 0.02, 20, positions=book, entry_spend=spend)
    paper = RiskManager(10.0, 0.02, 20, positions=PositionBook())

    # the per-trade cap, 1 SOL: 0.95 SOL is under it, its worst case (1.02 SOL) is not
    assert paper.check_risk_limits("a", 0.95)
    refused = risk.check_risk_limits("a", 0.95).reason
    assert refused.text == "size 0.9500 SOL over the per-trade limit (at the most it spends)"
    assert refused.kind == "size # SOL over the per-trade limit (at the most it spends)"
    capped = risk.calculate_position_size("a", 1.0, 0.99)
    assert capped == pytest.approx((1.0 - 0.0001) / spend.factor)
    assert spend.most(capped) == pytest.approx(1.0)
    assert risk.check_risk_limits("a", capped)
    # the risk per trade: 2% of 10 SOL down to a 50% stop is 0.4 SOL spent at most
    sized = risk.calculate_position_size("b", 1.0, 0.5)
    assert spend.most(sized) == pytest.approx(0.4)

    risk.reserve("o1", "a", capped)
    [(mint, reserved)] = risk.reservations.values()
    assert mint == "a" and reserved == pytest.approx(1.0)
    assert risk.exposure("a") == risk.total_exposure == reserved
    # the total, 5 SOL: four more entries at the cap take it whole
    for n in range(4):
        assert risk.check_risk_limits(f"m{n}", capped)
        risk.reserve(f"t{n}", f"m{n}", capped)
    assert risk.total_exposure == pytest.approx(5.0)
    assert risk.calculate_position_size("z", 1.0, 0.5) == 0.0
    assert "total exposure" in risk.check_risk_limits("z", 0.01).reason.text

    # filled for less than the worst case: the position holds what it cost
    cost = capped * 1.02
    assert risk.release("o1") == reserved
    book.apply_fill(
        OrderFilled(
            order_id="o1", mint="a", side="buy", token_amount=1e6, sol_amount=cost, price=1e-7
        ),
        time=START,
    )
    assert "o1" not in risk.reservations and risk.exposure("a") == cost
    assert risk.total_exposure == pytest.approx(4.0 + cost)
    assert risk.release("o1") is None


def test_a_paper_entry_reserves_its_size_the_most_its_fill_spends():
    """A paper buy spends its SOL whole and no more, at any slippage its limit lets
    fill (:func:`fill_buy` takes the fees out of it and buys fewer tokens when the price
    rose): its reservation is its size."""
    risk = RiskManager(100.0, 0.02, 5)
    risk.reserve("o", "m", 4.0)
    assert risk.reservations == {"o": ("m", 4.0)}
    launch = CurveState()
    # others bought before the fill, up to just inside the 5% limit
    for others in (0.0, 0.25, 0.5, 0.75, 0.79):
        moved = quote_buy(launch, others).after if others else launch
        fill = fill_buy(moved, 4.0, expected=launch, execution=PaperExecution())
        assert fill.sol <= 4.0 * (1 + 1e-15), others
    assert 0.049 < fill.slippage <= 0.05


def bought(book: PositionBook, order_id: str, mint: str, cost: float) -> None:
    """Book a buy of ``mint`` that cost ``cost`` SOL."""
    fill = OrderFilled(
        order_id=order_id, mint=mint, side="buy", token_amount=1e6, sol_amount=cost, price=1e-7
    )
    assert book.apply_fill(fill, time=START) is not None


def test_the_limits_a_book_exceeds_are_named_with_the_excess():
    """A buy booked without its limit check (a late fill) can leave the book over a
    limit: each one exceeded is named, with what it measures, its limit and the excess."""
    book = PositionBook()
    risk = RiskManager(10.0, 0.02, 3, positions=book)
    bought(book, "a", "a", 0.9)
    assert risk.breaches("a", spent=0.9) == []
    bought(book, "b", "b", 1.2)  # over the per-trade cap and the token's 1 SOL
    risk.reserve("c", "c", 0.5)
    assert {b.limit: (b.value, b.cap) for b in risk.breaches("b", spent=1.2)} == {
        "per_trade": (1.2, 1.0),
        "token_exposure": (1.2, 1.0),
    }
    bought(book, "d", "d", 3.0)  # three tokens held and one in flight: over 3, over 5 SOL
    breaches = {b.limit: b for b in risk.breaches("d", spent=3.0)}
    assert breaches.keys() == {"per_trade", "token_exposure", "total_exposure", "positions"}
    assert breaches["total_exposure"].excess == pytest.approx(0.9 + 1.2 + 0.5 + 3.0 - 5.0)
    assert breaches["positions"].excess == 1
    assert "total exposure 5.6000 SOL over its limit 5.0000 SOL by 0.6000 SOL" in str(
        breaches["total_exposure"]
    )


def test_the_limits_exceeded_now_are_named_for_every_token_held_or_entered():
    """What an operator is shown (``/limits``): every limit the book and the entries in
    flight exceed now, a token's exposure naming the token; a fill's cost against the
    per-trade cap is no standing measure, and is not among them."""
    book = PositionBook()
    risk = RiskManager(10.0, 0.02, 3, positions=book, entry_spend=EntrySpend(1.05, 0.001))
    bought(book, "a", "a", 0.9)
    assert risk.exceeded() == []
    bought(book, "b", "b", 1.2)  # a late fill over the per-trade cap and the token's 1 SOL
    risk.reserve("c", "c", 0.5)
    risk.reserve("a2", "a", 0.2)  # a's 0.9 and an entry adding to it, at its most
    bought(book, "d", "d", 2.5)
    exceeded = {(b.limit, b.mint): b for b in risk.exceeded()}
    assert exceeded.keys() == {
        ("token_exposure", "a"),
        ("token_exposure", "b"),
        ("token_exposure", "d"),
        ("total_exposure", None),
        ("positions", None),
    }
    a = exceeded["token_exposure", "a"]
    assert (a.value, a.cap) == (pytest.approx(0.9 + 0.2 * 1.05 + 0.001), 1.0)
    assert a.excess == pytest.approx(0.111)
    total = exceeded["total_exposure", None]
    assert total.value == pytest.approx(0.9 + 1.2 + 2.5 + (0.5 + 0.2) * 1.05 + 0.002)
    assert exceeded["positions", None].value == 4
    assert "the exposure of b 1.2000 SOL over its limit 1.0000 SOL by 0.2000 SOL" in str(
        exceeded["token_exposure", "b"]
    )


def test_no_entry_is_admitted_while_a_limit_is_exceeded_and_the_refusal_names_it():
    """Over the total exposure limit (a late fill booked past it), no entry fits: the
    sizing gives none, and the refusal names the limit, not the size it left."""
    book = PositionBook()
    risk = RiskManager(10.0, 0.02, 20, positions=book)
    for n in range(6):
        bought(book, f"o{n}", f"m{n}", 0.9)
    assert risk.calculate_position_size("z", 1.0, 0.5) == 0.0
    assert "over the total exposure limit" in risk.check_risk_limits("z", 0.0).reason.text
    assert "over the total exposure limit" in risk.check_risk_limits("z", 0.4).reason.text
    # over a token's limit: no entry of it, adding to it allowed or not
    adding = RiskManager(10.0, 0.02, 20, positions=book, limits=RiskLimits(add_to_positions=True))
    bought(book, "x", "m0", 0.2)
    assert adding.calculate_position_size("m0", 1.0, 0.5) == 0.0
    assert "over the token's exposure limit" in adding.check_risk_limits("m0", 0.0).reason.text
    # a size under the minimum with room to spare is still that
    fresh = RiskManager(10.0, 0.02, 20, positions=PositionBook())
    assert "under" in fresh.check_risk_limits("z", 0.001).reason.text


def test_the_kill_switch_halts_entries_and_reports_it(clock):
    risk = RiskManager(100.0, 0.02, 5, clock=clock)
    [change] = risk.kill("operator: test")
    assert change == TradingStateChanged(
        state="halted", previous_state="active", reason="operator: test"
    )
    assert not risk.check_risk_limits("m", 1.0)
    assert "halted" in risk.check_risk_limits("m", 1.0).reason.text
    assert risk.kill("again") == []
    [back] = risk.resume("operator: resume")
    assert back.state == "active" and risk.check_risk_limits("m", 1.0)
    assert risk.take_reports() == [change, back]


def frame_event(tokens, mint, *, time, **fields):
    return tokens.buy(mint, "x", sol=0.1, time=time, **fields)


def tripped(reports, breaker):
    return [r for r in reports if isinstance(r, CircuitBreakerChanged) and r.breaker == breaker]


def test_curve_breaker_trips_on_a_frame_off_the_curve_and_recovers(clock, market):
    risk = RiskManager(100.0, 0.02, 5, clock=clock)
    tokens = market.tokens
    mint = tokens.mint()
    assert risk.observe(tokens.created(mint), now=START) == []
    good = tokens.buy(mint, "x", sol=0.1)
    assert risk.observe(good, now=START) == []
    bad = tokens.buy(mint, "y", sol=0.1, marketCapSol=good.data.marketCapSol * 1.01)
    reports = risk.observe(bad, now=START + 1)
    [trip] = tripped(reports, "curve")
    assert trip.tripped and "off the curve maths" in trip.reason
    assert reports[-1] == TradingStateChanged(
        state="halted", previous_state="active", reason=f"curve breaker: {trip.reason}"
    )
    assert not risk.entries_allowed
    # clean frames keep flowing; a minute after the last bad one it recovers
    for t in range(2, 61, 5):
        clock.set_sync(START + t)
        assert tripped(risk.observe(tokens.buy(mint, "z", sol=0.01), now=START + t), "curve") == []
    clock.set_sync(START + 61)
    reports = risk.observe(tokens.buy(mint, "z", sol=0.01), now=START + 61)
    [recovery] = tripped(reports, "curve")
    assert not recovery.tripped
    assert reports[-1].state == "active" and risk.entries_allowed


def test_observe_frame_checks_raw_fields(clock):
    risk = RiskManager(100.0, 0.02, 5, clock=clock)
    assert risk.observe_frame(30.0, 1_073_000_000.0, 27.958993476234857) == []
    assert tripped(risk.observe_frame(30.0, 1_000_000_000.0, 30.0), "curve")


def test_stale_breaker_trips_on_feed_lag_and_on_silence_and_recovers(clock, market):
    risk = RiskManager(100.0, 0.02, 5, clock=clock)
    tokens = market.tokens
    mint = tokens.mint()
    late = tokens.created(mint, time=START - 5.0)
    [trip] = tripped(risk.observe(late, now=START), "stale")
    assert "feed lag 5.0s" in trip.reason
    clock.set_sync(START + 9)
    assert tripped(risk.observe(tokens.buy(mint), now=START + 9), "stale") == []
    assert not risk.entries_allowed
    clock.set_sync(START + 10)
    [recovery] = tripped(risk.observe(tokens.buy(mint), now=START + 10), "stale")
    assert not recovery.tripped and risk.entries_allowed
    # silence: nothing for more than 30 s
    assert risk.check(START + 40) == []
    [trip] = tripped(risk.check(START + 41), "stale")
    assert trip.tripped and "no event for 31s" in trip.reason
    assert not risk.entries_allowed
    clock.set_sync(START + 45)
    assert tripped(risk.observe(tokens.buy(mint), now=START + 45), "stale") == []
    assert not risk.entries_allowed  # the last fault was at 41 s: 10 s to go
    clock.set_sync(START + 50)
    assert tripped(risk.observe(tokens.buy(mint), now=START + 50), "stale") == []
    [recovery] = tripped(risk.check(START + 51), "stale")
    assert not recovery.tripped and risk.entries_allowed


def test_a_backlog_after_a_restart_halts_entries_only_until_it_is_drained(clock, market):
    # two market minutes waited in the queues while trading was down, at 175 events/s
    # (the market's top average), consumed in 4 s: stale, not a flood
    risk = RiskManager(100.0, 0.02, 5, clock=clock)
    event = market.tokens.buy(market.tokens.mint(), "z", sol=0.01)
    waited = 120 * 175
    reports = []
    for i in range(waited):
        consumed = START + 4.0 * i / waited
        happened = START - 120.0 + 120.0 * i / waited
        reports += risk.observe(msgspec.structs.replace(event, time=happened), now=consumed)
    assert [(r.breaker, r.tripped) for r in reports if isinstance(r, CircuitBreakerChanged)] == [
        ("stale", True)
    ]
    # then the market as it happens, each event reaching trading 50 ms after the feed
    drained = START + 4.0
    resumed = None
    for i in range(1, 30 * 175):
        now = drained + i / 175
        clock.set_sync(now)
        reports = risk.observe(msgspec.structs.replace(event, time=now - 0.05), now=now)
        assert tripped(reports, "rate") == []
        if risk.entries_allowed:
            resumed = now
            break
    last_fault = drained - 4.0 / waited
    recovery = risk.breaker_settings.stale_recovery_s
    assert resumed == pytest.approx(last_fault + recovery, abs=2 / 175)
    assert recovery < risk.breaker_settings.recovery_s


def _lifecycle(mint: str, state: str, now: float):
    return make_event(TokenLifecycle(mint=mint, state=state), source="activity/test", time=now)


def test_stale_breaker_trips_when_most_active_tokens_fall_silent_at_once(clock, market):
    """Their trade subscriptions lost while new tokens keep coming: the stream is not
    silent, the active tokens are; a few silent, or a handful in all, is no fault."""
    risk = RiskManager(100.0, 0.02, 5, clock=clock)
    tokens = market.tokens
    active = [tokens.mint() for _ in range(10)]
    for mint in active:
        risk.observe(_lifecycle(mint, "active", START), now=START)
    assert sorted(risk.active_tokens) == sorted(active)

    def second(t: float, trading: list[str]) -> list:
        """A market second: a new token, the trades of ``trading``, then the timer."""
        clock.set_sync(START + t)
        reports = risk.observe(tokens.created(tokens.mint(), time=START + t), now=START + t)
        for mint in trading:
            reports += risk.observe(tokens.buy(mint, "x", sol=0.01, time=START + t), now=START + t)
        return reports + risk.check(START + t)

    # seven of ten silent for over 30 s: under 80%, no fault
    for t in range(1, 41):
        assert tripped(second(t, active[7:]), "stale") == [], t
    # the eighth stops: 8 of 10 silent once its 30 s are over
    for t in range(41, 71):
        assert tripped(second(t, active[8:]), "stale") == [], t
    [trip] = tripped(second(71, active[8:]), "stale")
    assert trip.tripped and trip.reason == "8 of 10 active tokens silent for over 30s"
    assert not risk.entries_allowed
    # the subscriptions back: every token trades again, and the breaker recovers
    for t in range(72, 81):
        assert tripped(second(t, active), "stale") == [], t
    [recovery] = tripped(second(81, active), "stale")
    assert not recovery.tripped and risk.entries_allowed
    # tokens that leave the active state are no longer watched
    for mint in active[:9]:
        risk.observe(_lifecycle(mint, "declining", START + 82), now=START + 82)
    assert list(risk.active_tokens) == active[9:]
    for t in range(82, 200):
        assert tripped(second(t, []), "stale") == [], t  # one token: under the 10 watched


def test_rate_breaker_trips_on_an_anomalous_event_rate_and_recovers(clock, market):
    # one event observed over and over, then silence: only the rate is under test
    settings = BreakerSettings(
        max_events_per_s=100.0, rate_window_s=10.0, max_feed_lag_s=1e9, max_silence_s=1e9
    )
    risk = RiskManager(100.0, 0.02, 5, clock=clock, breakers=settings)
    tokens = market.tokens
    mint = tokens.mint()
    event = tokens.created(mint)
    for i in range(1000):  # 100/s over the window: at the limit, not over it
        assert risk.observe(event, now=START + i / 100.0) == []
    [trip] = tripped(risk.observe(event, now=START + 9.999), "rate")
    assert trip.tripped and not risk.entries_allowed
    # the burst ends; a minute later the breaker recovers
    assert risk.check(START + 60) == []
    [recovery] = tripped(risk.check(START + 70), "rate")
    assert not recovery.tripped and risk.entries_allowed


@pytest.mark.parametrize(("per_s", "trips"), [(95, False), (105, True)])
def test_a_steady_event_rate_trips_the_rate_breaker_only_over_the_limit(
    clock, market, per_s, trips
):
    """The window holds the events of the last ``rate_window_s``, no older: a steady
    stream 5% under the limit never trips the breaker, one 5% over it does."""
    settings = BreakerSettings(
        max_events_per_s=100.0, rate_window_s=10.0, max_feed_lag_s=1e9, max_silence_s=1e9
    )
    risk = RiskManager(100.0, 0.02, 5, clock=clock, breakers=settings)
    event = market.tokens.created(market.tokens.mint())
    for i in range(per_s * 30):
        risk.observe(event, now=START + i / per_s)
    assert risk.breakers["rate"].tripped is trips


def _any_event(kind: str, market, mint: str, now: float):
    """An event of ``kind`` stamped ``now``: of the token watched or another, keyed or not."""
    if kind == "trade of the token":
        return market.tokens.buy(mint, "x", sol=0.01, time=now)
    if kind == "trade of another token":
        return market.tokens.created(market.tokens.mint(), time=now)
    if kind == "prediction":
        payload = ModelPrediction(
            mint=mint, model_id="m1", arm="a", feature_set_version="test", score=0.5
        )
        return make_event(payload, source="model/test", time=now)
    if kind == "order outcome":
        payload = OrderRejected(order_id="o1", mint=mint, reason="refused", side="buy")
        return make_event(payload, source="trading/test", time=now)
    assert kind == "keyless"
    return make_event(SystemShutdown(reason="test"), source="cli/test", time=now)


EVENT_KINDS = [
    "trade of the token",
    "trade of another token",
    "prediction",
    "order outcome",
    "keyless",
]


@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_any_event_ends_a_silence_and_the_silence_is_counted_from_it(clock, market, kind):
    """Silence is the timer's to find: an event after a silence no timer saw ends it
    without tripping, whatever the event (keyed or not, of any token), and the next
    silence is counted from that event."""
    risk = RiskManager(100.0, 0.02, 5, clock=clock)
    mint = market.tokens.mint()
    assert risk.observe(_any_event("trade of the token", market, mint, START), now=START) == []
    assert risk.check(START + 20) == []
    # 45 s with no event and no timer: the event that ends it trips nothing
    assert risk.observe(_any_event(kind, market, mint, START + 45), now=START + 45) == []
    assert risk.check(START + 45) == [] and risk.entries_allowed
    assert risk.check(START + 75) == []
    [trip] = tripped(risk.check(START + 76), "stale")
    assert trip.tripped and "no event for 31s" in trip.reason
    assert not risk.entries_allowed


@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_a_silence_s_breaker_recovers_on_any_event_once_it_is_over(clock, market, kind):
    risk = RiskManager(100.0, 0.02, 5, clock=clock)
    mint = market.tokens.mint()
    risk.observe(_any_event("trade of the token", market, mint, START), now=START)
    [trip] = tripped(risk.check(START + 31), "stale")
    assert trip.tripped
    # events end the silence; the breaker holds for stale_recovery_s (10 s) without a fault
    assert risk.observe(_any_event(kind, market, mint, START + 32), now=START + 32) == []
    assert risk.observe(_any_event(kind, market, mint, START + 40), now=START + 40) == []
    assert not risk.entries_allowed
    reports = risk.observe(_any_event(kind, market, mint, START + 41), now=START + 41)
    assert [type(r).__name__ for r in reports] == ["CircuitBreakerChanged", "TradingStateChanged"]
    assert reports[0].breaker == "stale" and not reports[0].tripped
    assert reports[1] == TradingStateChanged(
        state="active", previous_state="halted", reason="stale breaker recovered"
    )


@pytest.mark.parametrize("kind", EVENT_KINDS)
def test_the_rate_breaker_holds_while_its_window_is_over_the_limit(clock, market, kind):
    """Recovery waits for the rate as well as ``recovery_s``: past ``recovery_s`` the
    breaker stays tripped while the window still holds the burst, for a timer and for an
    event alike (the event counted in); it recovers once the burst left the window, on an
    event as on a timer."""
    settings = BreakerSettings(
        max_events_per_s=10.0,
        rate_window_s=10.0,
        recovery_s=5.0,
        max_feed_lag_s=1e9,
        max_silence_s=1e9,
    )
    mint = market.tokens.mint()
    for recover_by in ("timer", "event"):
        risk = RiskManager(100.0, 0.02, 5, clock=clock, breakers=settings)
        burst = _any_event("trade of another token", market, mint, START)
        for i in range(100):  # 10/s over the window: at the limit
            assert risk.observe(burst, now=START + i / 200.0) == []
        [trip] = tripped(risk.observe(burst, now=START + 0.5), "rate")
        assert trip.tripped
        # 6 s quiet (over recovery_s) but 101 events in the window: still tripped
        assert risk.check(START + 6.5) == [] and not risk.entries_allowed
        # an event there adds to the burst still in the window: a fault again
        assert risk.observe(_any_event(kind, market, mint, START + 7), now=START + 7) == []
        assert not risk.entries_allowed
        # the burst's second has left the window (and 5 s passed since the last fault)
        later = START + 12.5
        if recover_by == "timer":
            reports = risk.check(later)
        else:
            reports = risk.observe(_any_event(kind, market, mint, later), now=later)
        [recovery] = tripped(reports, "rate")
        assert not recovery.tripped
        assert reports[-1].state == "active" and risk.entries_allowed


def test_the_state_stays_halted_until_the_last_tripped_breaker_recovers(clock, market):
    """Breakers recover one by one: the state changes only with the last one, and goes
    back to what the operator and the daily loss limit call for."""
    book = PositionBook()
    risk = RiskManager(100.0, 0.02, 5, positions=book, clock=clock)
    tokens = market.tokens
    mint = tokens.mint()
    good = tokens.buy(mint, "x", sol=0.1, time=START)
    risk.observe(tokens.created(mint, time=START), now=START)
    bad = tokens.buy(mint, "y", sol=0.1, marketCapSol=good.data.marketCapSol * 1.01, time=START)
    assert tripped(risk.observe(bad, now=START), "curve")
    for _ in range(3):
        risk.record_execution(False, reason="timeout", now=START + 30)
    assert risk.breakers["execution"].tripped and risk.state == "halted"
    # the curve's minute is up, not the execution's: one report, no state change
    event = tokens.buy(mint, "z", sol=0.01, time=START + 60)
    [recovery] = risk.observe(event, now=START + 60)
    assert recovery.breaker == "curve" and not recovery.tripped
    assert risk.state == "halted" and risk.state_reason().startswith("execution: ")
    assert risk.check(START + 89) == []
    # the loss limit is hit meanwhile: the last breaker's recovery leaves it reducing
    day = (START // 86_400) * 86_400
    book.apply_fill(_fill("b", "buy", 100.0, 10.0), time=day + 1.0)
    book.apply_fill(_fill("s", "sell", 100.0, 1.0), time=START + 89.5)
    [recovery, change] = risk.check(START + 90)
    assert recovery.breaker == "execution" and not recovery.tripped
    assert (change.state, change.previous_state) == ("reducing", "halted")
    assert "daily loss" in change.reason


def test_execution_breaker_trips_on_failures_in_a_row_and_half_opens(clock):
    risk = RiskManager(100.0, 0.02, 5, clock=clock)
    assert risk.record_execution(False, reason="timeout", now=START) == []
    assert risk.record_execution(True, now=START) == []
    assert risk.record_execution(False, reason="timeout", now=START) == []
    assert risk.record_execution(False, reason="timeout", now=START) == []
    [trip, halt] = risk.record_execution(False, reason="slippage", now=START + 1)
    assert trip.breaker == "execution" and "3 failed orders" in trip.reason
    assert halt.state == "halted"
    [recovery, resumed] = risk.check(START + 61)
    assert not recovery.tripped and resumed.state == "active"
    # half open: one more failure trips it again
    [again, _] = risk.record_execution(False, reason="timeout", now=START + 62)
    assert again.tripped


def test_a_halts_refusals_are_of_its_breakers_kind_whatever_their_faults_said(clock):
    """The faults' texts differ trip to trip (the last failure, its values): the kind of
    the refusal names the breaker only, so refusals count under one key a breaker."""
    risk = RiskManager(100.0, 0.02, 5, clock=clock)
    refusals = []
    for n, last in enumerate(("slippage 12.5% over 5%", "timeout after 3.1s")):
        for _ in range(3):
            risk.record_execution(False, reason=last, now=START + 100 * n)
        refusals.append(risk.check_risk_limits("m", 1.0).reason)
        risk.check(START + 100 * n + 61)
        assert risk.state == "active"
    assert refusals[0].text != refusals[1].text
    assert {r.kind for r in refusals} == {"trading is halted: execution breaker"}
    risk.observe_frame(1.0, 1.0, 1.0, now=START + 300)
    assert risk.check_risk_limits("m", 1.0).reason.kind == "trading is halted: curve breaker"


def test_sales_the_market_refused_on_slippage_do_not_count_toward_the_execution_breaker(clock):
    risk = RiskManager(100.0, 0.02, 5, clock=clock)
    slipped = "slippage 12.00% over the 10% limit"
    assert risk.record_execution(False, reason="timeout", side="sell", now=START) == []
    # a falling token's sale refused again and again: neither a failure nor a success
    for _ in range(5):
        refused = risk.record_execution(
            False, reason=slipped, side="sell", cause=SLIPPAGE, now=START
        )
        assert refused == []
    assert risk.consecutive_failures == 1
    # a buy refused on slippage counts, and so does a sale failing otherwise
    assert risk.record_execution(False, reason=slipped, side="buy", cause=SLIPPAGE, now=START) == []
    [trip, _] = risk.record_execution(False, reason="no confirmation", side="sell", now=START)
    assert trip.breaker == "execution" and trip.tripped


def test_the_daily_loss_limit_reduces_until_the_next_day(clock):
    book = PositionBook()
    risk = RiskManager(100.0, 0.02, 5, positions=book, clock=clock)
    day = (START // 86_400 + 1) * 86_400  # a UTC midnight
    # 100 tokens bought for 10 SOL, then sold in halves for 2 and 3: -3 SOL, then -2
    book.apply_fill(_fill("b", "buy", 100.0, 10.0), time=day - 10.0)
    book.apply_fill(_fill("s1", "sell", 50.0, 2.0), time=day + 10.0)
    assert risk.check(day + 20.0) == []
    book.apply_fill(_fill("s2", "sell", 50.0, 3.0), time=day + 30.0)
    [change] = risk.check(day + 40.0)
    assert change.state == "reducing" and "daily loss" in change.reason
    assert not risk.check_risk_limits("m", 1.0)
    # a kill while reducing is more severe; resuming returns to reducing, not active
    risk.kill("operator")
    assert risk.resume("operator")[-1].state == "reducing"
    [back] = risk.check(day + 86_400.0)
    assert back.state == "active"


def _fill(order_id: str, side: str, tokens: float, sol: float, mint: str = "m") -> OrderFilled:
    return OrderFilled(
        order_id=order_id,
        mint=mint,
        side=side,
        token_amount=tokens,
        sol_amount=sol,
        price=sol / tokens,
        fee_sol=0.0,
    )


def test_reports_are_payloads_the_bus_carries():
    risk = RiskManager(100.0, 0.02, 5)
    risk.kill("test")
    for report in risk.take_reports():
        event = make_event(report, source="trading/test", time=1.0)
        assert event.key is None and event.critical


def test_a_manager_taking_over_announces_what_differs_from_what_was_heard_and_nothing_else():
    """A manager starts with every breaker clear and its state computed afresh: it tells
    listeners who heard its predecessor exactly where that differs (a breaker recovered,
    the state), nothing where it does not (a first start, an operator's halt carried over)."""
    risk = RiskManager(100.0, 0.02, 5)
    assert risk.announce_start(None, (), "taken over by b") == []
    assert risk.announce_start("active", frozenset(), "taken over by b") == []
    assert risk.announce_start("halted", {"stale"}, "taken over by b") == [
        CircuitBreakerChanged(
            breaker="stale", tripped=False, reason="taken over by b: starts clear"
        ),
        TradingStateChanged(
            state="active", previous_state="halted", reason="taken over by b: starts active"
        ),
    ]
    # heard tripped of a breaker there is no longer: it holds nothing back
    assert risk.announce_start("active", {"gone"}, "taken over by b") == [
        CircuitBreakerChanged(
            breaker="gone", tripped=False, reason="taken over by b: no such breaker"
        )
    ]
    risk.kill("operator")
    assert risk.announce_start("halted", (), "taken over by b") == []
    assert risk.announce_start(None, (), "taken over by b") == [
        TradingStateChanged(
            state="halted",
            previous_state="active",
            reason="taken over by b: starts halted: operator",
        )
    ]
    # what it says takes nothing of its own reports
    assert [r.state for r in risk.take_reports()] == ["halted"]


REFUSAL = (
    "'subscribeTokenTrade' and 'subscribeAccountTrade' methods are only available when "
    "connecting with an API key funded with at least 0.02 SOL."
)


def trade_stream(refused: bool, *, time: float, source: str = "feed/one", reason: str = ""):
    """The feed's word on its trade subscriptions, as the lease holder announces it."""
    payload = FeedTradeStream(
        refused=refused,
        reason=reason or (REFUSAL if refused else "Successfully subscribed to keys."),
        since=time,
    )
    return make_event(payload, source=source, time=time)


def test_the_feed_breaker_halts_entries_while_the_feeds_trade_stream_is_refused(clock, market):
    """No token trade comes and no live order can be confirmed while PumpPortal refuses the
    feed's trade subscriptions: entries halt until the feed says they are accepted, however
    long that takes (no time recovers it), and only then; the feed's announcements are
    not market data, so they end no silence and count toward no rate."""
    risk = RiskManager(100.0, 0.02, 5, clock=clock)
    assert "feed" in BREAKERS
    reports = risk.observe(trade_stream(True, time=START), now=START)
    [trip] = tripped(reports, "feed")
    assert trip == CircuitBreakerChanged(
        breaker="feed",
        tripped=True,
        reason=f"PumpPortal refuses the trade subscriptions of feed/one: {REFUSAL}",
    )
    assert reports[-1] == TradingStateChanged(
        state="halted", previous_state="active", reason=f"feed breaker: {trip.reason}"
    )
    assert not risk.entries_allowed
    refusal = risk.check_risk_limits("m", 0.1)
    assert refusal.reason.kind == "trading is halted: feed breaker"
    # re-announced: nothing new to say; and no quiet time recovers it
    mint = market.tokens.mint()
    for t in range(10, 3_601, 10):
        clock.set_sync(START + t)
        assert risk.observe(market.tokens.buy(mint, "z", sol=0.01), now=START + t) == []
    counted = risk._events_in_window
    assert risk.observe(trade_stream(True, time=START + 3_600), now=START + 3_600) == []
    # the feed's word is not the market's: counted toward no rate, it ends no silence
    assert risk._events_in_window == counted and risk.last_event_time == START + 3_600
    assert risk.observe(trade_stream(True, time=START + 3_620), now=START + 3_620) == []
    assert risk.last_event_time == START + 3_600
    [silence] = tripped(risk.check(START + 3_631), "stale")
    assert "no event for 31s" in silence.reason
    assert not risk.entries_allowed
    for t in range(3_632, 3_643):
        clock.set_sync(START + t)
        risk.observe(market.tokens.buy(mint, "z", sol=0.01), now=START + t)
    assert not risk.breakers["stale"].tripped and not risk.entries_allowed
    # the next feed replica's own connection is accepted
    clock.set_sync(START + 3_643)
    reports = risk.observe(
        trade_stream(False, time=START + 3_643, source="feed/two"), now=START + 3_643
    )
    [recovery] = tripped(reports, "feed")
    assert recovery == CircuitBreakerChanged(
        breaker="feed",
        tripped=False,
        reason="PumpPortal accepts the trade subscriptions of feed/two: "
        "Successfully subscribed to keys.",
    )
    assert reports[-1] == TradingStateChanged(
        state="active", previous_state="halted", reason="feed breaker recovered"
    )
    assert risk.entries_allowed
    # said again: nothing changes
    assert risk.observe(trade_stream(False, time=START + 3_644), now=START + 3_644) == []


def test_an_announcement_of_the_feed_older_than_the_last_heard_changes_nothing(clock):
    """Two feed replicas around a take-over: the old holder's late word (a refusal its
    connection heard before the new holder's was accepted) is not the state any more."""
    risk = RiskManager(100.0, 0.02, 5, clock=clock)
    assert risk.observe(trade_stream(False, time=START + 5, source="feed/two"), now=START + 6) == []
    assert risk.observe(trade_stream(True, time=START + 4), now=START + 6) == []
    assert risk.entries_allowed and not risk.breakers["feed"].tripped


def test_a_manager_taking_over_keeps_the_feed_breaker_tripped_as_last_announced():
    """Only the feed's word recovers the feed breaker, and a replica of trading that starts
    hears the feed only at its next announcement: it starts with the breaker as last
    announced, tripped, and says nothing of it (nothing changed for the listeners); every
    other breaker starts clear as ever."""
    risk = RiskManager(100.0, 0.02, 5)
    assert risk.announce_start("halted", {"feed", "stale"}, "taken over by b") == [
        CircuitBreakerChanged(
            breaker="stale", tripped=False, reason="taken over by b: starts clear"
        ),
    ]
    assert risk.breakers["feed"].tripped and not risk.entries_allowed
    assert risk.breakers["feed"].reason == (
        "taken over by b: as last announced, until the feed announces its trade stream"
    )
    assert risk.take_reports() == []
    assert risk.state_refusal().kind == "trading is halted: feed breaker"
    # heard halted by no breaker, it says the state
    fresh = RiskManager(100.0, 0.02, 5)
    assert fresh.announce_start("active", {"feed"}, "taken over by b") == [
        TradingStateChanged(
            state="halted",
            previous_state="active",
            reason="taken over by b: starts halted: feed: taken over by b: as last announced, "
            "until the feed announces its trade stream",
        )
    ]
