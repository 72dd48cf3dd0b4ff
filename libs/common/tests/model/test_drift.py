"""Drift: flagged on a shifted distribution, not on one sampled from the reference, and
recovered with hysteresis; the rolling window's counts are those of its last vectors; not
judged while the observation is too young to hold the ages the reference holds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pumpflow.common.clock import ReplayClock
from pumpflow.common.events import ModelDrift, decode_payload, encode_payload
from pumpflow.common.model.card import (
    PREPROCESSING,
    HeldOut,
    LabelDefinition,
    ModelCard,
    TrainingWindow,
    bin_index,
    prepare_inputs,
    reference_distribution,
)
from pumpflow.common.model.drift import DriftMonitor, DriftThresholds

NAMES = ("volume", "buy_share", "sparse")
#: a market of rows without token ages (the tests of the PSI and its states): nothing to
#: wait for
NO_WARMUP = DriftThresholds(warmup_s=0.0)


def market(rng: np.random.Generator, n: int, *, shift: float = 0.0) -> np.ndarray:
    """Rows like feature vectors: a heavy-tailed column, a bounded one, one often missing."""
    volume = rng.lognormal(0.0 + shift, 1.0, n)
    buy_share = rng.beta(2.0, 2.0, n)
    sparse = np.where(rng.random(n) < 0.3, np.nan, rng.normal(0.0, 1.0, n))
    return np.column_stack([volume, buy_share, sparse])


def card_for(reference_rows: np.ndarray, names: tuple[str, ...] = NAMES) -> ModelCard:
    return ModelCard(
        model_id="entry",
        version="0123456789abcdef",
        task="classification",
        feature_set_version="fs",
        feature_names=names,
        preprocessing=PREPROCESSING,
        output_name="probabilities",
        label=LabelDefinition(
            kind="take_profit_first", horizon_s=120.0, take_profit=0.2, stop_loss=0.1
        ),
        training=TrainingWindow(
            source="test", start=0.0, end=1.0, tokens=1, rows=len(reference_rows)
        ),
        held_out=HeldOut(
            source="test", tokens=1, rows=1, model={}, baseline_rule="none", baseline={}
        ),
        reference=reference_distribution(prepare_inputs(reference_rows), names),
        trainer={},
        created_at=0.0,
        expires_at=1e12,
        model_sha256="0123456789abcdef" + "0" * 48,
    )


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.fixture
def card(rng):
    return card_for(market(rng, 50_000))


def feed(monitor: DriftMonitor, rows: np.ndarray, batch: int) -> list[ModelDrift]:
    out: list[ModelDrift] = []
    for start in range(0, len(rows), batch):
        out += monitor.observe(rows[start : start + batch])
    return out


def direct_psi(card: ModelCard, rows: np.ndarray, floor: float) -> np.ndarray:
    """PSI of each column of ``rows`` against the card, computed from scratch."""
    inputs = prepare_inputs(rows).astype(np.float64)
    out = []
    for j, ref in enumerate(card.reference):
        column = inputs[:, j]
        present = column[~np.isnan(column)]
        counts = np.bincount(
            bin_index(np.asarray(ref.edges)[None, :], present[:, None])[:, 0],
            minlength=len(ref.edges) + 1,
        )
        live = np.append(counts, len(column) - len(present)) / len(column)
        expected = np.append(ref.shares, ref.missing_share)
        live, expected = np.maximum(live, floor), np.maximum(expected, floor)
        out.append(float(np.sum((live - expected) * np.log(live / expected))))
    return np.asarray(out)


def test_a_sample_of_the_reference_is_not_drift(card, rng):
    monitor = DriftMonitor(card, thresholds=NO_WARMUP, clock=ReplayClock(10.0))
    # one vector at a time, as features.updated come
    assert feed(monitor, market(rng, 8_000), batch=1) == []
    assert monitor.drifting == ()
    report = monitor.report()
    assert report.max_psi < 0.02
    assert report.observations == monitor.thresholds.window


def test_a_shifted_feature_drifts_alone_and_recovers(card, rng):
    clock = ReplayClock(100.0)
    monitor = DriftMonitor(card, thresholds=NO_WARMUP, clock=clock)
    feed(monitor, market(rng, 6_000), batch=64)
    clock.set_sync(200.0)
    # volumes one log-unit higher: the whole distribution moves up
    drift = feed(monitor, market(rng, 6_000, shift=1.0), batch=64)
    assert [(d.feature, d.state) for d in drift] == [("volume", "drifting")]
    assert drift[0].psi >= 0.25 and drift[0].threshold == 0.25 and drift[0].drifting == 1
    assert drift[0].model_id == "entry" and drift[0].version == card.version
    assert monitor.drifting == ("volume",)
    assert monitor.transitions[-1] == (200.0, drift[0])
    clock.set_sync(300.0)
    back = feed(monitor, market(rng, 6_000), batch=64)
    assert [(d.feature, d.state) for d in back] == [("volume", "recovered")]
    assert back[0].psi < 0.1 and back[0].threshold == 0.1 and back[0].drifting == 0
    assert monitor.drifting == ()
    assert decode_payload("model.drift", 1, encode_payload(back[0])) == back[0]


def test_a_monitor_restored_drifting_reports_the_recovery_not_the_drift(card, rng):
    monitor = DriftMonitor(card, thresholds=NO_WARMUP, clock=ReplayClock(0.0))
    monitor.restore(["volume", "unknown"])
    assert monitor.drifting == ("volume",)
    # still drifting: nothing new to report
    assert feed(monitor, market(rng, 6_000, shift=1.0), batch=64) == []
    back = feed(monitor, market(rng, 6_000), batch=64)
    assert [(d.feature, d.state) for d in back] == [("volume", "recovered")]


def test_a_moderate_shift_neither_raises_nor_clears_a_drift(card, rng):
    monitor = DriftMonitor(card, thresholds=NO_WARMUP, clock=ReplayClock(0.0))
    thresholds = monitor.thresholds
    # a mix of shifted and unshifted rows whose PSI lies between the two thresholds
    moderate = np.concatenate([market(rng, 3_800), market(rng, 2_200, shift=1.0)])
    rng.shuffle(moderate)
    assert feed(monitor, moderate, batch=100) == []
    psi = monitor.report().features[0].psi
    assert thresholds.recover_psi < psi < thresholds.alert_psi
    # drifting, then the same moderate mix again: it stays drifting (no flapping)
    assert feed(monitor, market(rng, 6_000, shift=1.0), batch=100)
    assert feed(monitor, moderate, batch=100) == []
    assert monitor.drifting == ("volume",)


def test_nothing_is_judged_before_the_least_number_of_vectors(card, rng):
    thresholds = DriftThresholds(window=1_000, min_observations=800, check_every=100, warmup_s=0.0)
    monitor = DriftMonitor(card, thresholds=thresholds, clock=ReplayClock(0.0))
    assert feed(monitor, market(rng, 700, shift=2.0), batch=10) == []
    assert monitor.report().max_psi > 0.25  # computed, not judged
    assert [d.feature for d in feed(monitor, market(rng, 100, shift=2.0), batch=10)] == ["volume"]


@pytest.mark.parametrize("batch", [1, 37, 5_000])
def test_the_window_holds_the_last_vectors_in_bounded_memory(card, rng, batch):
    thresholds = DriftThresholds(
        window=2_000, min_observations=1_000, check_every=250, warmup_s=0.0
    )
    monitor = DriftMonitor(card, thresholds=thresholds, clock=ReplayClock(0.0))
    rows = np.concatenate([market(rng, 7_000), market(rng, 3_333, shift=0.5)])
    ring = monitor._ring
    feed(monitor, rows, batch=batch)
    assert monitor._ring is ring and ring.shape == (2_000, len(NAMES))
    assert monitor.seen == len(rows) and monitor.observations == 2_000
    np.testing.assert_allclose(
        monitor.psi(), direct_psi(card, rows[-2_000:], thresholds.share_floor), rtol=1e-9
    )


def test_one_row_at_a_time_checks_and_reports_as_whole_batches(card, rng):
    thresholds = DriftThresholds(window=1_000, min_observations=300, check_every=100, warmup_s=0.0)
    rows = np.concatenate([market(rng, 1_500), market(rng, 1_200, shift=2.0)])
    by_batch = DriftMonitor(card, thresholds=thresholds, clock=ReplayClock(0.0))
    by_row = DriftMonitor(card, thresholds=thresholds, clock=ReplayClock(0.0))
    batches, singles = [], []
    for start in range(0, len(rows), 50):
        batches.append(by_batch.observe(rows[start : start + 50]))
        singles.append([d for row in rows[start : start + 50] for d in by_row.observe(row[None])])
        if start % 350 == 0:
            # a read between checks counts what came since the last one
            assert by_row.observations == by_batch.observations
            np.testing.assert_array_equal(by_row.psi(), by_batch.psi())
    assert singles == batches
    assert any(singles) and by_row.drifting == by_batch.drifting == ("volume",)
    assert by_row.report() == by_batch.report()
    for batch in (rows[:7], rows[:1_000]):  # under a window, then a whole one at once
        by_batch.observe(batch)
        for row in batch:
            by_row.observe(row[None])
        assert by_row.report(fresh=True) == by_batch.report(fresh=True)
    with pytest.raises(ValueError, match="3 features per row, got 2"):
        by_row.observe(rows[:1, :2])


def test_one_vector_by_names_and_values(card):
    monitor = DriftMonitor(card, clock=ReplayClock(0.0))
    monitor.observe_vector(("buy_share", "volume"), (0.5, math.inf))
    assert monitor.observations == 1
    # volume infinite and sparse absent: both in the missing bin, as in training
    assert (
        monitor.bins(np.array([[math.inf, 0.5, math.nan]]))[0, [0, 2]] == monitor._missing_bin
    ).all()


# ----------------------------------------------------------------------------------------
# A market of tokens: what a feed sees from when it starts.

#: token age, a cumulative feature (it grows with the age) and one the age does not move
AGED = ("time_since_launch", "unique_traders", "volume")
HOUR = 3_600.0


def token_market(
    rng: np.random.Generator,
    start: float,
    end: float,
    *,
    launched_from: float,
    shift: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(times, rows) of the trades between ``start`` and ``end`` of the tokens launched
    from ``launched_from`` on (the first a feed started then sees), each row the
    trade's :data:`AGED` features, in time order.

    About 30 launches a minute and 26 trades a second: most tokens trade for a minute or
    two, one in ten for about eight minutes, so that of a running market's trades 7% are
    by tokens older than 10 minutes, 4% older than 15 and 2% older than 20 (the
    simulator's market: 12%, 5% and 2%)."""
    n = rng.poisson(0.5 * (end - launched_from))
    launch = rng.uniform(launched_from, end, n)
    survivor = rng.random(n) < 0.1
    life = np.where(survivor, rng.exponential(480.0, n), rng.exponential(90.0, n))
    rate = np.where(survivor, 0.2, 0.5)  # trades a second
    token = np.repeat(np.arange(n), rng.poisson(rate * life))
    times = launch[token] + rng.random(len(token)) * life[token]
    kept = (times >= start) & (times < end)
    times, token = times[kept], token[kept]
    order = np.argsort(times)
    times, token = times[order], token[order]
    age = times - launch[token]
    traders = 1.0 + rng.poisson(rate[token] * age)
    volume = rng.lognormal(shift, 1.0, len(times))
    return times, np.column_stack([age, traders, volume])


def run_market(
    monitor: DriftMonitor, clock: ReplayClock, times: np.ndarray, rows: np.ndarray
) -> list[tuple[float, ModelDrift]]:
    """Feed the rows second by second of market time, the clock at each second's end;
    the transitions with the time they were made."""
    out = []
    first, last = int(times[0]), int(times[-1]) + 1
    bounds = np.searchsorted(times, np.arange(first, last + 1))
    for second, (a, b) in enumerate(itertools.pairwise(bounds), start=first):
        clock.set_sync(float(second + 1))
        out += [(second + 1.0, d) for d in monitor.observe(rows[a:b])]
    return out


@pytest.fixture(scope="module")
def mature():
    """A card whose reference is every trade of a market observed for hours: every age."""
    rng = np.random.default_rng(11)
    _, rows = token_market(rng, 0.0, 3 * HOUR, launched_from=-HOUR)
    return rows


@pytest.mark.parametrize("columns", [(0, 1, 2), (1, 2)], ids=["with ages", "without ages"])
def test_a_market_observed_from_its_start_is_not_drift_while_its_tokens_are_young(mature, columns):
    """A feed started now sees only tokens launched since: minutes after it starts, no
    token is older than the feed, the age and what accumulates with it are far under the
    reference's; that is the observation's youth, not drift. With the token ages in the
    rows or without, nothing is judged until the feed could have seen every age the
    reference holds; then the market, the reference's, is not drift either."""
    rng = np.random.default_rng(5)
    names = tuple(AGED[j] for j in columns)
    card = card_for(mature[:, columns], names)
    times, rows = token_market(rng, 0.0, HOUR, launched_from=0.0)
    clock = ReplayClock(0.0)
    monitor = DriftMonitor(card, clock=clock)
    warmup = monitor.thresholds.warmup_s
    young = times < 5 * 60
    assert run_market(monitor, clock, times[young], rows[young][:, columns]) == []
    # the youth shows: computed, reported, not judged
    report = monitor.report(fresh=True)
    assert report.max_psi > 0.5 and report.warming_up
    assert report.judged_from == pytest.approx(warmup, abs=1.0)
    assert run_market(monitor, clock, times[~young], rows[~young][:, columns]) == []
    assert not monitor.report().warming_up and monitor.report().max_psi < 0.1


def test_a_shift_after_the_warm_up_is_drift(mature):
    rng = np.random.default_rng(6)
    card = card_for(mature, AGED)
    clock = ReplayClock(0.0)
    monitor = DriftMonitor(card, clock=clock)
    times, rows = token_market(rng, 0.0, 30 * 60, launched_from=0.0)
    assert run_market(monitor, clock, times, rows) == []
    # the market's volumes one log-unit higher from the 30th minute
    times, rows = token_market(rng, 30 * 60, 40 * 60, launched_from=0.0, shift=1.0)
    drift = run_market(monitor, clock, times, rows)
    assert [(d.feature, d.state) for _, d in drift] == [("volume", "drifting")]
    assert drift[0][0] < 35 * 60


@pytest.mark.parametrize("restored", [False, True])
def test_a_monitor_joining_a_running_market_judges_at_once(mature, restored):
    """A replica started, or restarted, while the market's feed runs on sees tokens of
    every age in its first vectors: the feed has been observing longer than the warm-up,
    so nothing is waited for. A shift is flagged at its first check; a drift announced
    before the restart, over since, is reported recovered at its first check."""
    rng = np.random.default_rng(8)
    card = card_for(mature, AGED)
    clock = ReplayClock(0.0)
    monitor = DriftMonitor(card, clock=clock)
    if restored:
        monitor.restore(["volume"])
    times, rows = token_market(
        rng, 0.0, 5 * 60, launched_from=-HOUR, shift=0.0 if restored else 1.0
    )
    drift = run_market(monitor, clock, times, rows)
    expected = "recovered" if restored else "drifting"
    assert [(d.feature, d.state) for _, d in drift] == [("volume", expected)]
    # at the first check the least number of vectors allows
    assert drift[0][1].observations < monitor.thresholds.min_observations + 2 * (
        monitor.thresholds.check_every
    )
    assert not monitor.report().warming_up


def test_without_token_ages_a_monitor_joining_a_running_market_waits_the_warm_up(mature):
    """Rows without the token's age cannot tell a running market from a fresh one: the
    monitor then waits the warm-up in market time since its first vector."""
    rng = np.random.default_rng(8)
    card = card_for(mature[:, 1:], AGED[1:])
    clock = ReplayClock(0.0)
    monitor = DriftMonitor(card, clock=clock)
    warmup = monitor.thresholds.warmup_s
    times, rows = token_market(rng, 0.0, warmup + 5 * 60, launched_from=-HOUR, shift=1.0)
    drift = run_market(monitor, clock, times, rows[:, 1:])
    assert [(d.feature, d.state) for _, d in drift] == [("volume", "drifting")]
    assert warmup <= drift[0][0] < warmup + 60
