"""Drift: flagged on a shifted distribution, not on one sampled from the reference, and
recovered with hysteresis; the rolling window's counts are those of its last vectors."""

from __future__ import annotations

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


def market(rng: np.random.Generator, n: int, *, shift: float = 0.0) -> np.ndarray:
    """Rows like feature vectors: a heavy-tailed column, a bounded one, one often missing."""
    volume = rng.lognormal(0.0 + shift, 1.0, n)
    buy_share = rng.beta(2.0, 2.0, n)
    sparse = np.where(rng.random(n) < 0.3, np.nan, rng.normal(0.0, 1.0, n))
    return np.column_stack([volume, buy_share, sparse])


def card_for(reference_rows: np.ndarray) -> ModelCard:
    return ModelCard(
        model_id="entry",
        version="0123456789abcdef",
        task="classification",
        feature_set_version="fs",
        feature_names=NAMES,
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
        reference=reference_distribution(prepare_inputs(reference_rows), NAMES),
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
    monitor = DriftMonitor(card, clock=ReplayClock(10.0))
    # one vector at a time, as features.updated come
    assert feed(monitor, market(rng, 8_000), batch=1) == []
    assert monitor.drifting == ()
    report = monitor.report()
    assert report.max_psi < 0.02
    assert report.observations == monitor.thresholds.window


def test_a_shifted_feature_drifts_alone_and_recovers(card, rng):
    clock = ReplayClock(100.0)
    monitor = DriftMonitor(card, clock=clock)
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
    monitor = DriftMonitor(card, clock=ReplayClock(0.0))
    monitor.restore(["volume", "unknown"])
    assert monitor.drifting == ("volume",)
    # still drifting: nothing new to report
    assert feed(monitor, market(rng, 6_000, shift=1.0), batch=64) == []
    back = feed(monitor, market(rng, 6_000), batch=64)
    assert [(d.feature, d.state) for d in back] == [("volume", "recovered")]


def test_a_moderate_shift_neither_raises_nor_clears_a_drift(card, rng):
    monitor = DriftMonitor(card, clock=ReplayClock(0.0))
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
    thresholds = DriftThresholds(window=1_000, min_observations=800, check_every=100)
    monitor = DriftMonitor(card, thresholds=thresholds, clock=ReplayClock(0.0))
    assert feed(monitor, market(rng, 700, shift=2.0), batch=10) == []
    assert monitor.report().max_psi > 0.25  # computed, not judged
    assert [d.feature for d in feed(monitor, market(rng, 100, shift=2.0), batch=10)] == ["volume"]


@pytest.mark.parametrize("batch", [1, 37, 5_000])
def test_the_window_holds_the_last_vectors_in_bounded_memory(card, rng, batch):
    thresholds = DriftThresholds(window=2_000, min_observations=1_000, check_every=250)
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
    thresholds = DriftThresholds(window=1_000, min_observations=300, check_every=100)
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
