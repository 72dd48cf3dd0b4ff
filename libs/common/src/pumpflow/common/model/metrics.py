"""Metrics of scores against labels: AUC, Brier score, precision, RMSE, MAE."""

from __future__ import annotations

import math

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN without both classes."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return math.nan
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    ranks = np.empty(len(scores))
    # average rank of each run of equal scores
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    ends = np.r_[starts[1:], len(ranked)]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float(
        (ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives)
    )


def brier(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return float(np.mean((np.asarray(probabilities, np.float64) - labels) ** 2))


def precision_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """Share of positives among the rows scored at or above ``threshold``; NaN if none."""
    chosen = np.asarray(scores, np.float64) >= threshold
    if not chosen.any():
        return math.nan
    return float(np.mean(np.asarray(labels, np.float64)[chosen]))


def rmse(targets: np.ndarray, predictions: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(predictions, np.float64) - targets) ** 2)))


def mae(targets: np.ndarray, predictions: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(predictions, np.float64) - targets)))


def classification_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    return {
        "auc": auc(labels, scores),
        "brier": brier(labels, scores),
        "positive_rate": float(np.mean(labels)),
    }


def regression_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    return {"rmse": rmse(targets, predictions), "mae": mae(targets, predictions)}
