"""Labels after the curve fee both ways, resolved only within the data; AUC by ranks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pumpflow.common.model.card import LabelDefinition
from pumpflow.common.model.labels import label_history, net_multiplier
from pumpflow.common.model.metrics import auc

TAKE = LabelDefinition(
    kind="take_profit_first", horizon_s=60.0, take_profit=0.2, stop_loss=0.1, fee_rate=0.0125
)
KEEP = net_multiplier(0.0125)


def labels(times, prices, definition=TAKE, data_end=1_000.0):
    return label_history(
        np.asarray(times, float), np.asarray(prices, float), definition, data_end=data_end
    )


def test_take_profit_first_counts_the_fee_both_ways():
    # +20% gross is not +20% net: the fee on the buy and on the sell eat 2.5%
    gross_only = 1.2
    net = 1.2 / KEEP
    assert labels([0, 10], [1.0, gross_only])[0] == 0.0
    assert labels([0, 10], [1.0, net * 1.0001])[0] == 1.0


def test_the_first_barrier_hit_decides():
    up, down = 1.3 / KEEP, 0.8 / KEEP
    assert labels([0, 10, 20], [1.0, up, down])[0] == 1.0
    assert labels([0, 10, 20], [1.0, down, up])[0] == 0.0


def test_only_trades_within_the_horizon_count():
    up = 1.3 / KEEP
    assert labels([0, 60.0], [1.0, up])[0] == 1.0  # at the horizon: inside
    assert labels([0, 60.5], [1.0, up])[0] == 0.0  # after it: the horizon passed, no hit


def test_unresolved_rows_are_nan_until_the_horizon_passes_within_the_data():
    up = 1.3 / KEEP
    got = labels([0, 10, 20], [1.0, 1.0, 1.0], data_end=65.0)
    # row 0's horizon (60) ended inside the data: no hit, label 0; rows 1 and 2 not yet
    assert got[0] == 0.0 and math.isnan(got[1]) and math.isnan(got[2])
    # a hit before the data ends resolves a row whose horizon runs past it
    assert labels([0, 10], [1.0, up], data_end=15.0)[0] == 1.0


def test_net_return_sells_at_the_last_price_within_the_horizon():
    definition = LabelDefinition(kind="net_return", horizon_s=60.0, fee_rate=0.0125)
    got = labels([0, 30, 50, 70], [1.0, 2.0, 1.5, 9.0], definition, data_end=200.0)
    assert got[0] == pytest.approx(1.5 * KEEP - 1.0)
    assert got[3] == pytest.approx(KEEP - 1.0)  # no later trade: sold at its own price
    assert math.isnan(labels([0], [1.0], definition, data_end=30.0)[0])


def test_labels_match_a_direct_walk_on_random_paths():
    rng = np.random.default_rng(3)
    times = np.cumsum(rng.exponential(5.0, 300))
    prices = np.exp(np.cumsum(rng.normal(0.0, 0.08, 300)))
    got = labels(times, prices, data_end=float(times[-1]))
    for i in range(len(times)):
        expected = 0.0 if times[i] + TAKE.horizon_s <= times[-1] else math.nan
        for j in range(i + 1, len(times)):
            if times[j] > times[i] + TAKE.horizon_s:
                break
            net = prices[j] * KEEP / prices[i] - 1.0
            if net <= -TAKE.stop_loss:
                expected = 0.0
                break
            if net >= TAKE.take_profit:
                expected = 1.0
                break
        assert got[i] == expected or (math.isnan(got[i]) and math.isnan(expected)), i


def test_auc_matches_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(5)
    y = rng.random(200) < 0.3
    s = np.round(rng.random(200) + y * 0.3, 1)  # many ties
    wins = 0.0
    for i, j in itertools.product(np.flatnonzero(y), np.flatnonzero(~y)):
        wins += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
    assert auc(y, s) == pytest.approx(wins / (y.sum() * (~y).sum()))
    assert math.isnan(auc(np.ones(3, bool), np.arange(3.0)))
