"""ActivityAnalyzer on scripted token histories, driven by a ReplayClock."""

from __future__ import annotations

import pytest

from pumpflow.common.activity import (
    ACTIVE,
    DECLINING,
    GRADUATED,
    INACTIVE,
    NEW,
    ActivityAnalyzer,
    ActivityMetrics,
    LifecycleThresholds,
    Transition,
)
from pumpflow.common.clock import ReplayClock
from pumpflow.common.priority import Priority

TH = LifecycleThresholds()
MINT = "Mint1111111111111111111111111111111111pump"


class Harness:
    def __init__(self, start: float = 1_000.0, thresholds: LifecycleThresholds = TH):
        self.clock = ReplayClock(start)
        self.transitions: list[Transition] = []
        self.retired: list[tuple[str, str, float]] = []
        self.feed: list[tuple[str, str]] = []
        self.analyzer = ActivityAnalyzer(
            clock=self.clock,
            thresholds=thresholds,
            on_transition=self.transitions.append,
            on_retire=lambda mint, state: self.retired.append((mint, state, self.clock.now())),
            on_feed_request=lambda action, mint: self.feed.append((action, mint)),
        )
        self.t0 = start

    async def at(self, offset: float) -> None:
        await self.clock.advance_to(self.t0 + offset)

    async def trade(self, offset: float, mint: str = MINT, **metrics) -> Transition | None:
        await self.at(offset)
        m = ActivityMetrics(time=self.clock.now(), **metrics)
        return self.analyzer.update_activity_metrics(mint, m)

    def states(self, mint: str = MINT) -> list[str]:
        return [t.state for t in self.transitions if t.mint == mint and t.is_transition]

    def state(self, mint: str = MINT):
        return self.analyzer.get_token_lifecycle_state(mint)


HOT = dict(
    trades_per_minute=60.0,
    unique_traders=25,
    new_traders=20,
    sol_volume_per_minute=12.0,
    price_return=0.4,
)


async def pump(h: Harness, until: float, mint: str = MINT, **extra) -> None:
    """Busy trading every 2 s from t=2 to ``until``."""
    t = 2.0
    while t <= until:
        await h.trade(t, mint, **{**HOT, **extra})
        t += 2.0


async def test_pump_goes_active_then_quiet_declines_and_retires_on_time():
    h = Harness()
    h.analyzer.token_created(MINT)
    assert h.state() == NEW
    assert h.analyzer.recommend_priority(MINT) == Priority.NORMAL
    await h.trade(5, trades_per_minute=3, unique_traders=2, sol_volume_per_minute=0.5)
    assert h.state() == NEW
    await pump(h, 120)
    assert h.state() == ACTIVE
    assert h.analyzer.recommend_priority(MINT) == Priority.URGENT
    # silence after the last trade at t=120
    await h.at(120 + TH.decline_after_quiet_s - 0.5)
    assert h.state() == ACTIVE
    await h.at(120 + TH.decline_after_quiet_s)
    assert h.state() == DECLINING
    assert h.analyzer.recommend_priority(MINT) == Priority.LOW
    await h.at(120 + TH.inactive_after_quiet_s - 0.5)
    assert h.state() == DECLINING
    await h.at(120 + TH.inactive_after_quiet_s)
    assert h.state() == INACTIVE
    assert h.states() == [NEW, ACTIVE, DECLINING, INACTIVE]
    assert h.retired == [(MINT, INACTIVE, h.t0 + 120 + TH.inactive_after_quiet_s)]
    assert h.analyzer.live_count == 0 and h.analyzer.tombstone_count == 1
    assert h.analyzer.recommend_priority(MINT) == Priority.IDLE
    assert h.clock.pending_timers == 0


async def test_rug_declines_on_drawdown_at_once():
    h = Harness()
    h.analyzer.token_created(MINT)
    await pump(h, 60)
    assert h.state() == ACTIVE
    # the creator dumps: price 85% below its peak, still lots of (panic) trading
    t = await h.trade(62, **{**HOT, "drawdown": 0.85, "price_return": -0.8})
    assert t is not None and t.state == DECLINING and "drawdown" in t.reason
    # panic selling keeps the rate up, but a dump does not count as recovering
    await h.trade(64, **{**HOT, "drawdown": 0.9, "price_return": -0.85})
    assert h.state() == DECLINING
    await h.at(64 + TH.inactive_after_quiet_s)
    assert h.states() == [NEW, ACTIVE, DECLINING, INACTIVE]


async def test_dump_right_after_launch_declines_a_new_token():
    h = Harness()
    h.analyzer.token_created(MINT)
    t = await h.trade(3, trades_per_minute=1, unique_traders=1, drawdown=0.7, price_return=-0.7)
    assert t.state == DECLINING and t.previous_state == NEW


async def test_slow_bleed_declines_on_rate_then_ends_after_declining_max():
    h = Harness()
    h.analyzer.token_created(MINT)
    await pump(h, 60)
    rates = [12, 8, 5, 3]
    t = 60.0
    for rate in rates:
        t += 10
        await h.trade(t, trades_per_minute=rate, unique_traders=4, sol_volume_per_minute=0.5)
    assert h.state() == ACTIVE  # 3/min is above the decline threshold of 2
    t += 40
    tr = await h.trade(t, trades_per_minute=1.5, unique_traders=3, sol_volume_per_minute=0.2)
    assert tr.state == DECLINING and "rate" in tr.reason
    declined_at = t
    # it keeps trickling: a trade every 45 s, never quiet for long
    while t < declined_at + TH.declining_max_s + 100:
        t += 45
        await h.trade(t, trades_per_minute=1.3, unique_traders=2, sol_volume_per_minute=0.1)
    assert h.state() == INACTIVE
    assert h.retired[0][2] == pytest.approx(h.t0 + declined_at + TH.declining_max_s)
    last = [x for x in h.transitions if x.is_transition][-1]
    assert "declining for" in last.reason


async def test_graduation_is_terminal_and_retires_after_linger():
    h = Harness()
    h.analyzer.token_created(MINT)
    for i, t in enumerate(range(2, 264, 2)):
        progress = min(1.0, i / 130)
        await h.trade(t, **HOT, curve_progress=progress)
    assert h.state() == ACTIVE
    assert h.analyzer.recommend_priority(MINT) == Priority.URGENT
    await h.at(265)
    tr = h.analyzer.token_migrated(MINT)
    assert tr.state == GRADUATED and tr.previous_state == ACTIVE and tr.priority == Priority.IDLE
    assert h.analyzer.token_migrated(MINT) is None
    # AMM trades after migration change nothing
    assert await h.trade(270, **HOT) is None
    assert h.state() == GRADUATED
    await h.at(265 + TH.graduated_linger_s)
    assert h.retired == [(MINT, GRADUATED, h.t0 + 265 + TH.graduated_linger_s)]
    assert h.state() == GRADUATED
    assert await h.trade(400, **HOT) is None
    assert h.states() == [NEW, ACTIVE, GRADUATED]


async def test_silent_launch_goes_inactive_by_timer_alone():
    h = Harness()
    h.analyzer.token_created(MINT)
    await h.at(TH.inactive_after_quiet_s - 1)
    assert h.state() == NEW
    await h.at(TH.inactive_after_quiet_s)
    assert h.state() == INACTIVE
    assert h.retired == [(MINT, INACTIVE, h.t0 + TH.inactive_after_quiet_s)]
    assert "no trades for 180s" in h.transitions[-1].reason


async def test_trickling_new_token_declines_when_never_active():
    h = Harness()
    h.analyzer.token_created(MINT)
    t = 0.0
    while t < 700:
        t += 100
        await h.trade(t, trades_per_minute=1, unique_traders=1, sol_volume_per_minute=0.05)
    assert h.states() == [NEW, DECLINING, INACTIVE]
    declined = next(x for x in h.transitions if x.state == DECLINING)
    assert declined.time == pytest.approx(h.t0 + TH.new_max_age_s)
    assert h.retired[0][2] == pytest.approx(h.t0 + TH.new_max_age_s + TH.declining_max_s)


async def test_declining_token_recovers():
    h = Harness()
    h.analyzer.token_created(MINT)
    await pump(h, 30)
    await h.at(30 + TH.decline_after_quiet_s)
    assert h.state() == DECLINING
    tr = await h.trade(100, **HOT)
    assert tr.state == ACTIVE and tr.previous_state == DECLINING and "recovered" in tr.reason


async def test_inactive_token_revives_on_real_activity_but_not_on_a_straggler():
    h = Harness()
    h.analyzer.token_created(MINT)
    await h.at(TH.inactive_after_quiet_s)
    assert h.state() == INACTIVE and len(h.retired) == 1
    assert h.feed == [("unsubscribe", MINT)]
    # one straggler trade: stays inactive, is retired again after revive_window_s
    assert await h.trade(200, trades_per_minute=1, unique_traders=1) is None
    assert h.state() == INACTIVE and h.analyzer.live_count == 1
    await h.at(200 + TH.revive_window_s)
    assert len(h.retired) == 2 and h.analyzer.live_count == 0
    assert h.feed == [("unsubscribe", MINT)] * 2
    # real activity through another path: revived
    tr = await h.trade(400, **HOT)
    assert tr.state == ACTIVE and tr.previous_state == INACTIVE and "revived" in tr.reason
    assert MINT in set(h.analyzer.watched())
    assert h.feed[-1] == ("subscribe", MINT)


async def test_unknown_mint_is_tracked_from_its_first_trade():
    h = Harness()
    tr = await h.trade(1, mint="Other", trades_per_minute=1, unique_traders=1)
    assert tr.state == NEW and tr.previous_state is None and tr.reason == "first seen"


async def test_priority_recommendations_follow_activity_and_are_throttled():
    h = Harness()
    h.analyzer.token_created(MINT)
    await pump(h, 20, trades_per_minute=8, unique_traders=4, sol_volume_per_minute=0.3)
    assert h.state() == ACTIVE
    assert h.analyzer.recommend_priority(MINT) == Priority.HIGH
    n = len(h.transitions)
    # heating up to graduate pace: urgent, published once as a recommendation
    for t in range(22, 60, 2):
        await h.trade(t, **HOT)
    recs = [x for x in h.transitions[n:] if not x.is_transition]
    assert [r.priority for r in recs] == [Priority.URGENT]
    assert recs[0].reason == "priority" and recs[0].state == ACTIVE
    assert recs[0].activity_level >= TH.urgent_level


async def test_near_graduation_is_urgent_even_at_moderate_activity():
    h = Harness()
    h.analyzer.token_created(MINT)
    await pump(h, 20, trades_per_minute=8, unique_traders=4, sol_volume_per_minute=0.3)
    assert h.analyzer.recommend_priority(MINT) == Priority.HIGH
    await h.trade(
        22, trades_per_minute=8, unique_traders=4, sol_volume_per_minute=0.3, curve_progress=0.9
    )
    assert h.analyzer.recommend_priority(MINT) == Priority.URGENT


PEAK = dict(trades_per_minute=100, unique_traders=30, new_traders=30, sol_volume_per_minute=19)


async def test_activity_change_detects_surge_and_drop():
    h = Harness()
    h.analyzer.token_created(MINT)
    await h.trade(2, trades_per_minute=1, unique_traders=1, sol_volume_per_minute=0.01)
    assert h.analyzer.detect_activity_change(MINT) is None
    await h.trade(4, **PEAK)
    change = h.analyzer.detect_activity_change(MINT)
    assert change.kind == "surge" and change.level > change.baseline + TH.change_min_delta
    # stays hot: the baseline catches up
    for t in range(6, 300, 3):
        await h.trade(t, **PEAK)
    assert h.analyzer.detect_activity_change(MINT) is None
    await h.trade(302, trades_per_minute=7, unique_traders=3, sol_volume_per_minute=0.2)
    assert h.analyzer.detect_activity_change(MINT).kind == "drop"


async def test_activity_level_fades_with_silence():
    h = Harness()
    h.analyzer.token_created(MINT)
    await h.trade(2, **HOT)
    level = h.analyzer.get_activity_level(MINT)
    assert 0.5 < level <= 1.0
    await h.at(2 + TH.decline_after_quiet_s)
    assert h.analyzer.get_activity_level(MINT) == pytest.approx(level / 2.718281828, rel=1e-6)


async def test_snapshot_restore_carries_on_with_timers_and_warm_up():
    h = Harness()
    h.analyzer.token_created(MINT)
    await pump(h, 40)
    snap = h.analyzer.snapshot(MINT)
    assert snap.state == ACTIVE and not snap.retired
    # a replacement replica takes over 5 s later
    h2 = Harness(start=h.t0)
    await h2.at(45)
    h2.analyzer.restore(snap)
    assert h2.state() == ACTIVE
    # the fresh rolling window shows only one trade: no rate decline while warming up
    tr = await h2.trade(46, trades_per_minute=1, unique_traders=1, sol_volume_per_minute=0.1)
    assert tr is not None and not tr.is_transition  # only a lower priority recommended
    assert h2.state() == ACTIVE
    # the quiet timer still runs from the restored last trade
    await h2.at(46 + TH.decline_after_quiet_s)
    assert h2.state() == DECLINING
    await h2.at(46 + TH.inactive_after_quiet_s)
    assert h2.state() == INACTIVE
    tomb = h2.analyzer.snapshot(MINT)
    assert tomb.retired and tomb.state == INACTIVE


async def test_tombstones_expire():
    h = Harness(thresholds=LifecycleThresholds(tombstone_ttl_s=100))
    h.analyzer.token_created(MINT)
    await h.at(TH.inactive_after_quiet_s)
    assert h.analyzer.tombstone_count == 1
    await h.at(TH.inactive_after_quiet_s + 101)
    assert h.analyzer.prune_tombstones() == [MINT]
    assert h.state() is None


def test_thresholds_reject_inconsistent_values():
    with pytest.raises(ValueError, match="decline_max_trades_per_min"):
        LifecycleThresholds(active_min_trades_per_min=2, decline_max_trades_per_min=3)
    with pytest.raises(ValueError, match="decline_after_quiet_s"):
        LifecycleThresholds(decline_after_quiet_s=300)
