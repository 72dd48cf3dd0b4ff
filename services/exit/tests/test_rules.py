"""Each exit rule fires exactly when its condition holds, once, on scripted price paths."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from pumpflow.common.clock import ReplayClock
from pumpflow.common.exit import (
    DECLINE,
    INACTIVITY,
    MIGRATION,
    STALE_STOP,
    STOP_LOSS,
    TIME_STOP,
    TRAILING_STOP,
    ExitDecision,
    ExitEvaluator,
    ExitRules,
    TakeProfitStep,
    TrailBand,
)

START = 1_700_000_000.0
ENTRY = 1e-7  # SOL per token
TOKENS = 1_000_000.0
MINT = "MintA"

#: only the price rules, so each test isolates the rule it is about
PRICE_ONLY = ExitRules(max_hold_s=None, stale_after_s=None, quiet_s=None, decline_fraction=None)


@dataclass
class Position:
    mint: str = MINT
    position_id: str = "pos-1"
    opened_at: float = START
    tokens: float = TOKENS
    entry_price: float = ENTRY


def evaluator(rules: ExitRules, clock: ReplayClock | None = None, timed=None) -> ExitEvaluator:
    ev = ExitEvaluator(rules, clock=clock or ReplayClock(START), on_timed=timed)
    ev.track(Position(), time=START)
    return ev


def walk(
    ev: ExitEvaluator, gains: list[float], step_s: float = 1.0
) -> list[tuple[int, ExitDecision]]:
    """Mark the position along ``gains`` (one a second); the decisions, by step."""
    out = []
    for i, gain in enumerate(gains):
        for decision in ev.on_mark(MINT, ENTRY * (1 + gain), START + (i + 1) * step_s):
            out.append((i, decision))
    return out


def test_take_profit_ladder_sells_each_step_once_as_its_gain_is_reached():
    ev = evaluator(ExitRules(**{**_fields(PRICE_ONLY), "trailing": ()}))
    fired = walk(ev, [0.1, 0.4, 0.5, 0.6, 0.45, 0.55, 0.99, 1.0, 1.2, 0.8, 1.5, 2.5, 3.0])
    assert [(i, d.rule) for i, d in fired] == [
        (2, "take_profit_1"),
        (7, "take_profit_2"),
        (11, "take_profit_3"),
    ]
    # each step sells a quarter of the tokens bought, whatever is left by then
    assert [d.token_amount for _, d in fired] == pytest.approx([TOKENS / 4] * 3)
    assert [d.fraction for _, d in fired] == pytest.approx([0.25, 1 / 3, 0.5])
    assert ev.tokens_left(MINT) == pytest.approx(TOKENS / 4)


def test_a_jump_past_two_steps_fires_both_in_one_mark():
    ev = evaluator(ExitRules(**{**_fields(PRICE_ONLY), "trailing": ()}))
    fired = walk(ev, [0.2, 1.1])
    assert [(i, d.rule) for i, d in fired] == [(1, "take_profit_1"), (1, "take_profit_2")]
    assert sum(d.token_amount for _, d in fired) == pytest.approx(TOKENS / 2)


def test_trailing_stop_arms_at_its_gain_and_tightens_as_the_peak_grows():
    rules = ExitRules(**{**_fields(PRICE_ONLY), "take_profit": (), "stop_loss": None})
    # unarmed below +20%: a fall of 35% from a +15% peak does not fire it
    ev = evaluator(rules)
    assert walk(ev, [0.15, -0.25]) == []
    # armed at a +50% peak: fires at a 30% fall (1.5 -> 1.05), not at 29%
    ev = evaluator(rules)
    fired = walk(ev, [0.5, 1.5 * 0.71 - 1, 1.5 * 0.70 - 1])
    assert [(i, d.rule, d.full) for i, d in fired] == [(2, TRAILING_STOP, True)]
    # peak +150%: the trail is 20%; peak +400%: 12%
    ev = evaluator(rules)
    fired = walk(ev, [2.5 - 1, 2.5 * 0.81 - 1, 2.5 * 0.80 - 1])
    assert [(i, d.rule) for i, d in fired] == [(2, TRAILING_STOP)]
    ev = evaluator(rules)
    fired = walk(ev, [4.0, 5.0 * 0.89 - 1, 5.0 * 0.88 - 1])
    assert [(i, d.rule) for i, d in fired] == [(2, TRAILING_STOP)]
    assert ev.tokens_left(MINT) == 0.0
    assert walk(ev, [0.0, -0.5]) == []


def test_trailing_bands_must_tighten():
    with pytest.raises(ValueError):
        ExitRules(
            trailing=(TrailBand(peak_gain=0.2, giveback=0.2), TrailBand(peak_gain=1, giveback=0.3))
        )
    with pytest.raises(ValueError):
        ExitRules(
            take_profit=(TakeProfitStep(gain=1, fraction=0.6), TakeProfitStep(gain=2, fraction=0.6))
        )


def test_stop_loss_sells_everything_at_its_fall_from_the_entry():
    ev = evaluator(PRICE_ONLY)
    fired = walk(ev, [-0.1, -0.29, 0.05, -0.299, -0.3, -0.5])
    assert [(i, d.rule, d.token_amount) for i, d in fired] == [(4, STOP_LOSS, TOKENS)]


async def test_time_stop_fires_from_a_clock_timer_whatever_the_gain():
    clock = ReplayClock(START)
    timed: list[ExitDecision] = []
    rules = ExitRules(**{**_fields(PRICE_ONLY), "max_hold_s": 600.0})
    ev = evaluator(rules, clock, timed.extend)
    ev.on_mark(MINT, ENTRY * 1.3, START + 1)
    await clock.advance_to(START + 599)
    assert timed == []
    await clock.advance_to(START + 600)
    assert [(d.rule, d.time) for d in timed] == [(TIME_STOP, START + 600)]
    assert ev.next_check_at(MINT) is None


async def test_stale_stop_at_its_time_when_the_gain_is_short_and_not_when_it_is_shown():
    clock = ReplayClock(START)
    timed: list[ExitDecision] = []
    rules = ExitRules(**{**_fields(PRICE_ONLY), "stale_after_s": 300.0, "trailing": ()})
    ev = evaluator(rules, clock, timed.extend)
    ev.on_mark(MINT, ENTRY * 1.05, START + 10)
    await clock.advance_to(START + 299)
    assert timed == []
    await clock.advance_to(START + 300)
    assert [(d.rule, d.time) for d in timed] == [(STALE_STOP, START + 300)]

    # shown +10%: the timer passes; a later mark below it sells
    clock = ReplayClock(START)
    timed.clear()
    ev = evaluator(rules, clock, timed.extend)
    ev.on_mark(MINT, ENTRY * 1.2, START + 10)
    await clock.advance_to(START + 400)
    assert timed == []
    assert ev.on_mark(MINT, ENTRY * 1.15, START + 401) == []
    late = ev.on_mark(MINT, ENTRY * 1.05, START + 402)
    assert [d.rule for d in late] == [STALE_STOP]


async def test_inactivity_fires_after_the_quiet_time_from_the_last_trade():
    clock = ReplayClock(START)
    timed: list[ExitDecision] = []
    rules = ExitRules(**{**_fields(PRICE_ONLY), "quiet_s": 60.0})
    ev = evaluator(rules, clock, timed.extend)
    for t in (10, 40, 70):
        await clock.advance_to(START + t)
        assert ev.on_mark(MINT, ENTRY, START + t) == []
    await clock.advance_to(START + 129)
    assert timed == []
    await clock.advance_to(START + 130)
    assert [(d.rule, d.time, d.token_amount) for d in timed] == [(INACTIVITY, START + 130, TOKENS)]
    await clock.advance_to(START + 1000)
    assert len(timed) == 1


def test_lifecycle_inactive_sells_everything():
    ev = evaluator(PRICE_ONLY)
    assert [d.rule for d in ev.on_lifecycle(MINT, "inactive", START + 5)] == [INACTIVITY]


def test_decline_sells_its_share_once_per_decline():
    ev = evaluator(ExitRules(**{**_fields(PRICE_ONLY), "decline_fraction": 0.5}))
    first = ev.on_lifecycle(MINT, "declining", START + 5)
    assert [(d.rule, d.token_amount) for d in first] == [(DECLINE, TOKENS / 2)]
    # marks while still declining do not sell again
    assert walk(ev, [0.0, -0.05]) == []
    assert ev.on_lifecycle(MINT, "declining", START + 8) == []
    # recovered, then declining again: a new condition, it fires again
    assert ev.on_lifecycle(MINT, "active", START + 10) == []
    again = ev.on_lifecycle(MINT, "declining", START + 20)
    assert [(d.rule, d.token_amount) for d in again] == [(DECLINE, TOKENS / 4)]


def test_migration_sells_everything_by_lifecycle_or_migrate_frame():
    ev = evaluator(PRICE_ONLY)
    assert [(d.rule, d.full) for d in ev.on_migration(MINT, START + 5)] == [(MIGRATION, True)]
    assert ev.on_lifecycle(MINT, "graduated", START + 6) == []
    ev = evaluator(PRICE_ONLY)
    assert [d.rule for d in ev.on_lifecycle(MINT, "graduated", START + 5)] == [MIGRATION]
    ev = evaluator(ExitRules(**{**_fields(PRICE_ONLY), "migration_fraction": 0.5}))
    assert [(d.rule, d.token_amount) for d in ev.on_migration(MINT, START + 5)] == [
        (MIGRATION, TOKENS / 2)
    ]


def test_a_failed_sale_is_rearmed_and_fires_again():
    ev = evaluator(PRICE_ONLY)
    (decision,) = ev.on_mark(MINT, ENTRY * 0.6, START + 1)
    assert decision.rule == STOP_LOSS
    ev.rearm(decision)
    assert ev.tokens_left(MINT) == TOKENS
    assert [d.rule for d in ev.on_mark(MINT, ENTRY * 0.6, START + 2)] == [STOP_LOSS]


def test_a_step_that_sold_short_sells_the_rest_when_due_and_the_steps_after_their_shares():
    """A step's sale sold 40% of its quarter: the rest is the step's again, sold as the
    step is due (its gain gone, on its return), and the steps after it sell a quarter
    of the tokens bought each: the ladder's shares, not shares of more."""
    ev = evaluator(ExitRules(**{**_fields(PRICE_ONLY), "trailing": ()}))
    [(_, first)] = walk(ev, [0.5])
    ev.fell_short(replace(first, token_amount=first.token_amount * 0.6))
    assert ev.tokens_left(MINT) == pytest.approx(TOKENS * 0.9)
    assert walk(ev, [0.4]) == []
    [(_, rest)] = walk(ev, [0.6])
    assert (rest.rule, rest.token_amount) == ("take_profit_1", pytest.approx(TOKENS * 0.15))
    fired = walk(ev, [1.0, 2.0])
    assert [d.token_amount for _, d in fired] == pytest.approx([TOKENS / 4] * 2)
    assert ev.tokens_left(MINT) == pytest.approx(TOKENS / 4)


def test_a_decline_that_sold_short_sells_the_rest_and_a_new_decline_its_share():
    ev = evaluator(ExitRules(**{**_fields(PRICE_ONLY), "decline_fraction": 0.5}))
    [first] = ev.on_lifecycle(MINT, "declining", START + 5)
    ev.fell_short(replace(first, token_amount=TOKENS / 4))
    [rest] = ev.check_time(MINT, START + 6)
    assert (rest.rule, rest.token_amount) == (DECLINE, pytest.approx(TOKENS / 4))
    ev.fell_short(replace(rest, token_amount=TOKENS / 8))
    # recovered before the rest sold: the next decline sells half of what is left
    assert ev.on_lifecycle(MINT, "active", START + 7) == []
    [again] = ev.on_lifecycle(MINT, "declining", START + 8)
    assert again.token_amount == pytest.approx(TOKENS * 5 / 8 / 2)


def test_a_full_exit_that_sold_short_sells_the_rest_while_due():
    ev = evaluator(PRICE_ONLY)
    [stop] = ev.on_mark(MINT, ENTRY * 0.6, START + 1)
    ev.fell_short(replace(stop, token_amount=TOKENS * 0.3))
    [rest] = ev.check_time(MINT, START + 1)
    assert (rest.rule, rest.token_amount) == (STOP_LOSS, pytest.approx(TOKENS * 0.3))


async def test_a_time_stop_refused_again_and_again_orders_again_less_and_less_often():
    """A timer rule refused for good (an API error, a wallet short of SOL for fees) fires
    again at once the first time, then 1, 2, 4 ... 30 s after each refusal: not at the
    pace of the round trip to trading and back, spending the trade API's requests."""
    clock = ReplayClock(START)
    timed: list[ExitDecision] = []
    rules = ExitRules(**{**_fields(PRICE_ONLY), "max_hold_s": 600.0})
    ev = evaluator(rules, clock, timed.extend)
    await clock.advance_to(START + 600)
    gaps = []
    for _ in range(9):
        [decision] = timed
        timed.clear()
        refused_at = clock.now()
        ev.rearm(replace(decision, time=refused_at))
        await clock.advance_to(refused_at + 0.001)
        if not timed:
            await clock.advance_to(ev.next_check_at(MINT))
        [again] = timed
        assert again.rule == TIME_STOP and again.token_amount == TOKENS
        gaps.append(round(again.time - refused_at, 3))
    assert gaps == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0], gaps


def test_marks_during_the_wait_after_refusals_order_nothing_then_the_rule_fires():
    """The wait after repeated refusals holds every rule, the price ones too (a mark a
    trade would otherwise order again each time); the marks still count, and the stop
    loss fires on the first mark past the wait."""
    ev = evaluator(PRICE_ONLY)
    (decision,) = ev.on_mark(MINT, ENTRY * 0.6, START + 1)
    ev.rearm(decision)
    (decision,) = ev.on_mark(MINT, ENTRY * 0.6, START + 1.1)  # at once, the first time
    ev.rearm(replace(decision, time=START + 1.2))  # refused again: 1 s to wait
    assert ev.on_mark(MINT, ENTRY * 0.5, START + 1.5) == []
    assert ev.on_mark(MINT, ENTRY * 0.4, START + 2.1) == []
    [fired] = ev.on_mark(MINT, ENTRY * 0.4, START + 2.2)
    assert fired.rule == STOP_LOSS and fired.mark_price == ENTRY * 0.4


async def test_a_stop_loss_held_by_the_wait_fires_as_it_ends_on_a_silent_token():
    clock = ReplayClock(START)
    timed: list[ExitDecision] = []
    ev = evaluator(PRICE_ONLY, clock, timed.extend)
    for t in (1.0, 1.1):
        await clock.advance_to(START + t)
        (decision,) = ev.on_mark(MINT, ENTRY * 0.6, START + t)
        ev.rearm(decision)
    assert ev.next_check_at(MINT) == START + 2.1
    await clock.advance_to(START + 2.1)
    assert [(d.rule, d.time) for d in timed] == [(STOP_LOSS, START + 2.1)]


async def test_a_stop_loss_held_by_the_wait_fires_as_it_ends_with_the_time_rules_on():
    """The time rules' next due (the quiet rule's 60 s, the max hold) lies past the wait:
    the rules still look again as the wait ends, not when the next time rule is due."""
    clock = ReplayClock(START)
    timed: list[ExitDecision] = []
    ev = evaluator(ExitRules(trailing=()), clock, timed.extend)
    for t in (1.0, 1.1):
        await clock.advance_to(START + t)
        (decision,) = ev.on_mark(MINT, ENTRY * 0.6, START + t)
        ev.rearm(decision)
    assert ev.next_check_at(MINT) == START + 2.1
    await clock.advance_to(START + 2.1)
    assert [(d.rule, d.time) for d in timed] == [(STOP_LOSS, START + 2.1)]


def test_a_refusal_long_after_the_last_orders_again_at_once():
    ev = evaluator(PRICE_ONLY)
    for t in (1.0, 1.1):
        (decision,) = ev.on_mark(MINT, ENTRY * 0.6, START + t)
        ev.rearm(decision)
    # waited 1 s; 45 s without a refusal since: the next one is retried at once
    (decision,) = ev.on_mark(MINT, ENTRY * 0.6, START + 47)
    ev.rearm(decision)
    assert [d.rule for d in ev.on_mark(MINT, ENTRY * 0.6, START + 47.1)] == [STOP_LOSS]


def test_the_default_rules_on_a_pump_and_dump():
    """Defaults: two ladder steps on the way up, the trailing stop on the way down."""
    ev = evaluator(ExitRules())
    path = [0.1, 0.3, 0.6, 0.9, 1.2, 1.4, 1.3, 1.2, 1.1, 0.9, 0.5]
    fired = walk(ev, path)
    # peak +140% (trail 20% from 2.4x): fires at 1.9x and below, i.e. at +90%
    assert [(i, d.rule) for i, d in fired] == [
        (2, "take_profit_1"),
        (4, "take_profit_2"),
        (9, TRAILING_STOP),
    ]
    assert sum(d.token_amount for _, d in fired) == pytest.approx(TOKENS)


async def test_a_replay_takes_the_same_exits():
    """The same marks on a fresh ReplayClock give the same decisions, timers included."""

    async def run() -> list[tuple[str, float, float]]:
        clock = ReplayClock(START)
        out: list[ExitDecision] = []
        ev = evaluator(ExitRules(), clock, out.extend)
        for i, gain in enumerate([0.1, 0.6, 0.4, 0.3, 0.2]):
            t = START + 20 * (i + 1)
            await clock.advance_to(t)
            out.extend(ev.on_mark(MINT, ENTRY * (1 + gain), t))
        await clock.advance_to(START + 700)
        return [(d.rule, d.time, d.token_amount) for d in out]

    first = await run()
    assert first == await run()
    assert [r for r, _, _ in first] == ["take_profit_1", INACTIVITY]


def _fields(rules: ExitRules) -> dict:
    return {name: getattr(rules, name) for name in rules.__dataclass_fields__}


async def test_a_timer_moved_by_less_than_a_second_fires_on_time():
    """Epoch times are ~1.7e9: a due time moved by 0.5 s is a new timer, not the same."""
    clock = ReplayClock(START)
    timed: list[ExitDecision] = []
    ev = evaluator(ExitRules(**{**_fields(PRICE_ONLY), "quiet_s": 60.0}), clock, timed.extend)
    await clock.advance_to(START + 0.5)
    ev.on_mark(MINT, ENTRY, START + 0.5)
    assert ev.next_check_at(MINT) == START + 60.5
    await clock.advance_to(START + 60.4)
    assert timed == []
    await clock.advance_to(START + 60.5)
    assert [d.time for d in timed] == [START + 60.5]
