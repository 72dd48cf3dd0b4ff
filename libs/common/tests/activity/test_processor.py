"""ActivityProcessor run per key the way the keyed consumer runs it, on a fake Effects."""

from __future__ import annotations

import pytest

from pumpflow.common.activity import (
    ACTIVE,
    DECLINING,
    GRADUATED,
    INACTIVE,
    NEW,
    REQUIRED_FEATURES,
    ActivityMetrics,
    ActivityProcessor,
    ActivityState,
    LifecycleThresholds,
)
from pumpflow.common.events import (
    Event,
    FeaturesUpdated,
    Payload,
    TokenLifecycle,
    TokenMigrated,
    TokenTrade,
    make_event,
)
from pumpflow.common.keyed import UNCHANGED, InvalidInput, StaleState
from pumpflow.common.priority import Priority

TH = LifecycleThresholds()
MINT = "Mint1111111111111111111111111111111111pump"
T0 = 1_000.0
#: a vector layout with the needed features out of order among others
NAMES = ("price", *reversed(REQUIRED_FEATURES), "rsi_14")

HOT = dict(
    trades_per_minute=60.0,
    unique_traders=25,
    new_traders=20,
    sol_volume_per_minute=12.0,
    price_return=0.4,
)
#: exactly the active criteria
EDGE = dict(
    trades_per_minute=TH.active_min_trades_per_min,
    unique_traders=TH.active_min_unique_traders,
    sol_volume_per_minute=TH.active_min_sol_per_min,
)
TRICKLE = dict(trades_per_minute=1.0, unique_traders=1, sol_volume_per_minute=0.05)


def vector(
    time: float,
    *,
    names: tuple[str, ...] = NAMES,
    trades_per_minute: float = 0.0,
    sol_volume_per_minute: float = 0.0,
    unique_traders: int = 0,
    new_traders: int = 0,
    price_return: float = 0.0,
    drawdown: float = 0.0,
    curve_progress: float = 0.0,
) -> Event:
    """A features.updated event carrying the given metrics under their feature names."""
    by_name = {
        "price": 3e-8,
        "rsi_14": 50.0,
        "trades_per_minute": trades_per_minute,
        "buy_volume_sol_60s": sol_volume_per_minute,
        "sell_volume_sol_60s": 0.0,
        "unique_traders": float(unique_traders),
        "new_traders_60s": float(new_traders),
        "return_60s": price_return,
        "drawdown_from_peak": drawdown,
        "curve_progress": curve_progress,
    }
    payload = FeaturesUpdated(
        mint=MINT,
        feature_set_version="test",
        source_seq=1,
        names=names,
        values=tuple(by_name[n] for n in names),
    )
    return make_event(payload, source="features/test", time=time)


class FakeEffects:
    """Records what the processor asks for; one timer, as the consumer keeps per key."""

    def __init__(self, key: str, now: float, *, more: bool = False):
        self.key = key
        self.now = now
        self.more = more
        self.emitted: list[tuple[Payload, float]] = []
        self.timer: float | None = None
        self.timers_set: list[float] = []
        self.priority: int | None = None
        self.retired: float | None = None

    def emit(self, payload: Payload, *, time: float) -> None:
        self.emitted.append((payload, time))

    def set_timer(self, at: float) -> None:
        self.timer = at
        self.timers_set.append(at)

    def cancel_timer(self) -> None:
        self.timer = None

    def set_priority(self, priority: int) -> None:
        self.priority = priority

    def retire(self, ttl_s: float) -> None:
        self.retired = ttl_s


class Key:
    """One mint through the processor: its state stored encoded between steps."""

    def __init__(self, thresholds: LifecycleThresholds = TH):
        self.feed: list[tuple[str, str]] = []
        self.processor = ActivityProcessor(
            thresholds=thresholds, on_feed_request=lambda a, m: self.feed.append((a, m))
        )
        self.fx = FakeEffects(MINT, T0)
        self.raw: bytes | None = None
        self.fired = 0

    def _run(self, step) -> ActivityState:
        self.fx.retired = None
        processor = self.processor
        state = step(processor.initial(MINT) if self.raw is None else processor.decode(self.raw))
        self.raw = self.processor.encode(state)
        return state

    def features(self, offset: float, *, lag: float = 0.0, **metrics) -> ActivityState:
        """A vector of a trade at ``offset - lag`` reaching the processor at ``offset``."""
        self.fx.now = T0 + offset
        event = vector(T0 + offset - lag, **metrics)
        return self._run(lambda s: self.processor.apply(s, event, self.fx))

    def migrated(self, offset: float) -> ActivityState:
        self.fx.now = T0 + offset
        payload = TokenMigrated(signature="sig", mint=MINT, txType="migrate")
        event = make_event(payload, source="feed/test", time=self.fx.now)
        return self._run(lambda s: self.processor.apply(s, event, self.fx))

    def advance(self, offset: float) -> None:
        """Move the clock to ``offset``, firing the timer whenever it is due."""
        while self.fx.timer is not None and self.fx.timer <= T0 + offset:
            self.fx.now, self.fx.timer = self.fx.timer, None
            self.fired += 1
            self._run(lambda s: self.processor.fire(s, self.fx))
        self.fx.now = T0 + offset

    @property
    def state(self) -> ActivityState:
        assert self.raw is not None
        return self.processor.decode(self.raw)

    def events(self) -> list[TokenLifecycle]:
        return [p for p, _ in self.fx.emitted if isinstance(p, TokenLifecycle)]

    def transitions(self) -> list[tuple[str | None, str, str]]:
        return [
            (p.previous_state, p.state, p.reason)
            for p in self.events()
            if p.state != p.previous_state
        ]

    def states(self) -> list[str]:
        return [state for _, state, _ in self.transitions()]


def active_key(at: float = 2.0) -> Key:
    key = Key()
    key.features(at, **HOT)
    assert key.state.state == ACTIVE
    return key


# ------------------------------------------------------------------ event rules


def test_first_vector_starts_a_new_token_with_its_deadline():
    key = Key()
    key.features(0, **TRICKLE)
    assert key.fx.emitted == [
        (
            TokenLifecycle(
                mint=MINT,
                state=NEW,
                previous_state=None,
                reason="first seen",
                priority=Priority.NORMAL,
                activity_level=0.0,
            ),
            T0,
        )
    ]
    assert key.fx.priority == Priority.NORMAL
    assert key.fx.timer == T0 + min(TH.inactive_after_quiet_s, TH.new_max_age_s)
    state = key.state
    assert state.state == NEW and state.created_at == T0 and not state.retired
    assert state.metrics == ActivityMetrics(
        time=T0,
        trades_per_minute=1.0,
        unique_traders=1,
        sol_volume_per_minute=0.05,
        curve_progress=0.0,
    )


@pytest.mark.parametrize(
    "metrics, active",
    [
        (EDGE, True),
        ({**EDGE, "trades_per_minute": TH.active_min_trades_per_min - 0.01}, False),
        ({**EDGE, "unique_traders": TH.active_min_unique_traders - 1}, False),
        ({**EDGE, "sol_volume_per_minute": TH.active_min_sol_per_min - 0.001}, False),
    ],
)
def test_new_token_goes_active_exactly_at_the_active_criteria(metrics, active):
    key = Key()
    key.features(0, **TRICKLE)
    key.features(3, **metrics)
    assert key.state.state == (ACTIVE if active else NEW)
    if active:
        assert key.transitions()[-1] == (NEW, ACTIVE, "6 trades/min, 3 traders")
        assert key.fx.priority == Priority.HIGH


@pytest.mark.parametrize(
    "metrics, reason",
    [
        ({"trades_per_minute": TH.decline_max_trades_per_min}, "rate fell to 2.0 trades/min"),
        ({"sol_volume_per_minute": TH.decline_max_sol_per_min}, "volume fell to 0.020 SOL/min"),
        ({"drawdown": TH.decline_drawdown, "price_return": 0.0}, "drawdown 50% from peak"),
    ],
)
def test_active_token_declines_on_rate_volume_or_dump(metrics, reason):
    key = active_key()
    key.features(4, **{**EDGE, **metrics})
    assert key.transitions()[-1] == (ACTIVE, DECLINING, reason)
    assert key.fx.priority == Priority.LOW


@pytest.mark.parametrize(
    "metrics",
    [
        {"trades_per_minute": TH.decline_max_trades_per_min + 0.01},
        {"sol_volume_per_minute": TH.decline_max_sol_per_min + 0.001},
        {"drawdown": TH.decline_drawdown - 0.01},
        # deep below the peak but bouncing: not a dump
        {"drawdown": 0.9, "price_return": TH.recover_min_return},
    ],
)
def test_active_token_holds_just_above_the_decline_thresholds(metrics):
    key = active_key()
    key.features(4, **{**EDGE, **metrics})
    assert key.state.state == ACTIVE


def test_dump_right_after_launch_declines_a_new_token():
    key = Key()
    key.features(0, trades_per_minute=1, unique_traders=1, drawdown=0.7, price_return=-0.7)
    assert key.transitions() == [
        (None, NEW, "first seen"),
        (NEW, DECLINING, "drawdown 70% from peak"),
    ]


def test_declining_token_recovers_on_active_metrics_but_not_while_dumping():
    key = active_key()
    key.features(4, **{**HOT, "drawdown": 0.8, "price_return": -0.5})
    assert key.state.state == DECLINING
    key.features(6, **{**HOT, "drawdown": 0.8, "price_return": -0.2})
    assert key.state.state == DECLINING
    key.features(8, **{**HOT, "drawdown": 0.8, "price_return": 0.2})
    assert key.transitions()[-1] == (DECLINING, ACTIVE, "recovered: 60 trades/min")
    assert key.feed == []  # never unsubscribed, so nothing to resubscribe


def test_a_token_hovering_at_half_its_peak_declines_once():
    # bots move a live token by 10-20% within seconds: its price crosses the dump's
    # edge on one trade and back on the next, and every turn to declining sells half
    # of what a position holds
    key = active_key()
    for i in range(6):
        drawdown = TH.decline_drawdown + (0.01 if i % 2 == 0 else -0.01)
        key.features(4 + 2 * i, **{**HOT, "drawdown": drawdown, "price_return": 0.0})
    assert key.states() == [NEW, ACTIVE, DECLINING]


def test_priority_recommendation_is_throttled_and_sets_the_priority():
    key = Key()
    key.features(2, **EDGE)
    assert key.fx.priority == Priority.HIGH
    # graduate pace: urgent, but the last recommendation was under the interval ago
    key.features(2 + TH.priority_min_interval_s - 0.1, **HOT)
    assert key.fx.priority == Priority.HIGH and len(key.events()) == 2
    key.features(2 + TH.priority_min_interval_s, **HOT)
    rec = key.events()[-1]
    assert (rec.state, rec.previous_state, rec.reason) == (ACTIVE, ACTIVE, "priority")
    assert rec.priority == Priority.URGENT and rec.activity_level >= TH.urgent_level
    assert key.fx.priority == Priority.URGENT
    assert key.fx.emitted[-1][1] == T0 + 2 + TH.priority_min_interval_s


def test_near_graduation_is_urgent_at_moderate_activity():
    key = Key()
    key.features(2, **EDGE)
    key.features(10, **EDGE, curve_progress=TH.urgent_curve_progress)
    assert key.events()[-1].priority == Priority.URGENT


# ------------------------------------------------------------------ time rules


def test_lazy_timer_fires_early_re_arms_and_declines_exactly_when_quiet():
    key = active_key(at=10)
    for t in (12, 14):
        key.features(t, **HOT)
    # trades moved the deadline on without moving the timer
    assert key.fx.timers_set == [T0 + 10 + TH.decline_after_quiet_s]
    key.advance(10 + TH.decline_after_quiet_s)
    assert key.fired == 1 and key.state.state == ACTIVE
    assert key.fx.timer == T0 + 14 + TH.decline_after_quiet_s
    key.advance(14 + TH.decline_after_quiet_s - 0.01)
    assert key.state.state == ACTIVE
    key.advance(14 + TH.decline_after_quiet_s)
    assert key.transitions()[-1] == (ACTIVE, DECLINING, "no trades for 60s")
    assert key.fx.emitted[-1][1] == T0 + 14 + TH.decline_after_quiet_s


def test_quiet_runs_from_the_trade_time_not_the_arrival():
    key = Key()
    key.features(0, **TRICKLE)
    key.features(5, lag=4, **HOT)
    assert key.state.last_activity == T0 + 1
    assert key.fx.timer == T0 + 1 + TH.decline_after_quiet_s


def test_an_earlier_deadline_moves_the_timer_forward():
    key = Key()
    key.features(0, **TRICKLE)
    assert key.fx.timer == T0 + TH.inactive_after_quiet_s
    key.features(2, **HOT)
    assert key.fx.timer == T0 + 2 + TH.decline_after_quiet_s


def test_silent_launch_retires_as_inactive_with_a_tombstone():
    key = Key()
    key.features(0, **TRICKLE)
    key.advance(TH.inactive_after_quiet_s - 0.01)
    assert key.state.state == NEW and key.fx.retired is None
    key.advance(TH.inactive_after_quiet_s)
    assert key.transitions()[-1] == (NEW, INACTIVE, "no trades for 180s")
    assert key.fx.retired == TH.tombstone_ttl_s
    assert key.fx.timer is None
    assert key.feed == [("unsubscribe", MINT)]
    tomb = key.state
    assert tomb.retired and tomb.state == INACTIVE and tomb.metrics is None
    assert tomb.retired_at == T0 + TH.inactive_after_quiet_s and tomb.timer_at is None


def test_trickling_new_token_declines_at_new_max_age_then_ends_after_declining_max():
    key = Key()
    t = 0.0
    while t < 700:
        key.advance(t)
        key.features(t, **TRICKLE)
        t += 100
    assert key.states() == [NEW, DECLINING, INACTIVE]
    declined, ended = [time for p, time in key.fx.emitted if p.state != p.previous_state][1:]
    assert declined == T0 + TH.new_max_age_s
    assert ended == T0 + TH.new_max_age_s + TH.declining_max_s
    assert key.transitions()[1][2] == "never active in 300s"
    assert key.transitions()[2][2] == "declining for 300s"


def test_declining_token_goes_inactive_after_quiet():
    key = active_key(at=0)
    key.advance(TH.decline_after_quiet_s)
    assert key.state.state == DECLINING
    key.advance(TH.inactive_after_quiet_s - 0.01)
    assert key.state.state == DECLINING
    key.advance(TH.inactive_after_quiet_s)
    assert key.states() == [NEW, ACTIVE, DECLINING, INACTIVE]
    assert key.state.retired


# ------------------------------------------------------------------ retire / revive


def retired_key() -> Key:
    key = Key()
    key.features(0, **TRICKLE)
    key.advance(TH.inactive_after_quiet_s)
    assert key.state.retired
    key.fx.emitted.clear()
    key.feed.clear()
    return key


def test_straggler_of_a_retired_token_stays_inactive_and_retires_again():
    key = retired_key()
    state = key.features(200, **TRICKLE)
    assert not state.retired and state.state == INACTIVE
    assert key.fx.emitted == [] and key.fx.retired is None
    assert key.fx.timer == T0 + 200 + TH.revive_window_s
    key.advance(200 + TH.revive_window_s - 0.01)
    assert not key.state.retired
    key.advance(200 + TH.revive_window_s)
    assert key.state.retired and key.fx.retired == TH.tombstone_ttl_s
    # stragglers mean the feed still streams it: unsubscribe again
    assert key.feed == [("unsubscribe", MINT)]
    assert key.fx.emitted == []


def test_retired_token_revives_on_active_metrics_and_is_resubscribed():
    key = retired_key()
    state = key.features(400, **HOT)
    assert key.transitions() == [(INACTIVE, ACTIVE, "revived: 60 trades/min")]
    assert not state.retired and key.fx.retired is None
    assert key.feed == [("subscribe", MINT)]
    assert key.fx.timer == T0 + 400 + TH.decline_after_quiet_s
    assert key.fx.priority == Priority.URGENT


def test_graduate_lingers_then_retires_and_stays_terminal():
    key = active_key()
    key.migrated(50)
    assert key.transitions()[-1] == (ACTIVE, GRADUATED, "migrated")
    assert key.events()[-1].priority == Priority.IDLE
    key.features(55, **HOT)  # AMM trades while it lingers change nothing
    key.migrated(56)
    assert key.states()[-1] == GRADUATED and len(key.transitions()) == 3
    # the quiet timer of the active token comes first: it fires and re-arms for the linger
    key.advance(2 + TH.decline_after_quiet_s)
    assert key.fired == 1 and key.fx.timer == T0 + 50 + TH.graduated_linger_s
    key.advance(50 + TH.graduated_linger_s - 0.01)
    assert key.fx.retired is None
    key.advance(50 + TH.graduated_linger_s)
    assert key.fx.retired == TH.tombstone_ttl_s and key.feed == [("unsubscribe", MINT)]
    emitted = len(key.fx.emitted)
    # a late event loads the tombstone: it goes again, keeping its expiry
    state = key.features(50 + TH.graduated_linger_s + 100, **HOT)
    assert state.retired and state.state == GRADUATED
    assert key.fx.retired == pytest.approx(TH.tombstone_ttl_s - 100)
    key.migrated(50 + TH.graduated_linger_s + 200)
    assert key.fx.retired == pytest.approx(TH.tombstone_ttl_s - 200)
    assert len(key.fx.emitted) == emitted and len(key.feed) == 1


def test_migration_of_an_unknown_token_graduates_it():
    key = Key()
    key.migrated(0)
    assert key.transitions() == [(None, GRADUATED, "migrated")]
    assert key.fx.timer == T0 + TH.graduated_linger_s


def test_migration_of_a_retired_token_graduates_it_without_resubscribing():
    key = retired_key()
    key.migrated(300)
    assert key.transitions() == [(INACTIVE, GRADUATED, "migrated")]
    assert not key.state.retired and key.feed == []


# ------------------------------------------------------------------ input and storage


def test_vector_without_a_needed_feature_is_invalid_input():
    key = Key()
    key.features(0, **TRICKLE)
    before = key.raw
    names = tuple(n for n in NAMES if n != "new_traders_60s")
    event = vector(T0 + 1, names=names)
    with pytest.raises(InvalidInput, match="new_traders_60s"):
        key.processor.apply(key.state, event, key.fx)
    assert key.raw == before and len(key.fx.emitted) == 1


def test_vector_with_values_not_matching_its_names_is_invalid_input():
    event = vector(T0)
    short = make_event(
        FeaturesUpdated(
            mint=MINT,
            feature_set_version="test",
            source_seq=1,
            names=event.data.names,
            values=event.data.values[:-1],
        ),
        source="features/test",
        time=T0,
    )
    key = Key()
    with pytest.raises(InvalidInput, match="values"):
        key.processor.apply(key.processor.initial(MINT), short, key.fx)


def test_other_event_types_are_invalid_input():
    trade = TokenTrade(
        signature="s",
        mint=MINT,
        traderPublicKey="w",
        txType="buy",
        tokenAmount=1,
        newTokenBalance=1,
        bondingCurveKey="c",
        vTokensInBondingCurve=1,
        vSolInBondingCurve=1,
        marketCapSol=1,
    )
    key = Key()
    with pytest.raises(InvalidInput, match=r"token\.trade"):
        key.processor.apply(
            key.processor.initial(MINT), make_event(trade, source="feed/test", time=T0), key.fx
        )


def test_a_vector_a_newer_one_follows_in_its_batch_is_not_read():
    key = Key()
    followed = FakeEffects(MINT, T0, more=True)
    state = key.processor.initial(MINT)
    assert key.processor.apply(state, vector(T0, **HOT), followed) is UNCHANGED
    assert state.state is None and state.metrics is None and followed.emitted == []
    newest = FakeEffects(MINT, T0)
    state = key.processor.apply(state, vector(T0, **HOT), newest)
    assert state.state is not None and state.metrics is not None and newest.emitted


def test_the_same_layout_in_another_order_reads_the_same_metrics():
    key = Key()
    key.features(0, **HOT)
    first = key.state.metrics
    reordered = vector(T0, names=tuple(reversed(NAMES)), **HOT)
    state = key.processor.apply(key.processor.initial(MINT), reordered, FakeEffects(MINT, T0))
    assert state.metrics == first


def test_state_round_trips_and_garbage_is_stale():
    key = active_key()
    state = key.features(4, **HOT, curve_progress=0.3)
    processor = key.processor
    assert processor.decode(processor.encode(state)) == state
    assert state.metrics is not None and state.timer_at is not None
    tomb = retired_key().state
    assert processor.decode(processor.encode(tomb)) == tomb
    assert len(processor.encode(tomb)) < len(processor.encode(state))
    with pytest.raises(StaleState):
        processor.decode(b"\x01not msgpack")
