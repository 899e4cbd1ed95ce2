"""Metrics against scikit-learn on known inputs; bootstrap intervals; ECE."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from training.metrics import binary_metrics, bootstrap_intervals, ece, metrics_report, roc_auc


@pytest.fixture
def case() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.6).astype(int)
    p = np.clip(0.35 * y + rng.random(500) * 0.65, 0, 1)
    p[:40] = np.round(p[:40], 1)  # ties
    return y, p


def test_against_scikit_learn(case: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = case
    t = 0.5
    pred = (p >= t).astype(int)
    m = binary_metrics(y, p, t)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["npv"] == pytest.approx(tn / (tn + fn))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert tp + fp + tn + fn == len(y)


def test_known_values() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(y, p) == pytest.approx(0.75)
    m = binary_metrics(y, p, 0.5)
    assert (m["sensitivity"], m["specificity"], m["precision"]) == (0.5, 1.0, 1.0)
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_ece_known_values() -> None:
    # Perfectly calibrated bins -> 0; always 0.9 with 50% positives -> 0.4.
    assert ece(np.array([0, 1] * 50), np.full(100, 0.5)) == pytest.approx(0.0)
    assert ece(np.array([0, 1] * 50), np.full(100, 0.9)) == pytest.approx(0.4)


def test_bootstrap_interval_contains_point(case: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = case
    ci = bootstrap_intervals(y, p, 0.5, n_boot=200, seed=1)
    point = binary_metrics(y, p, 0.5)
    for k, (lo, hi) in ci.items():
        assert lo <= point[k] <= hi, k
        assert hi - lo < 0.2, k
    # Deterministic for a seed.
    assert ci == bootstrap_intervals(y, p, 0.5, n_boot=200, seed=1)


def test_report_has_every_required_field(case: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = case
    r = metrics_report(y, p, 0.42, n_boot=50)
    assert r["n"] == 500
    assert r["threshold"]["value"] == 0.42
    for k in (
        "auc",
        "accuracy",
        "sensitivity",
        "specificity",
        "precision",
        "f1",
        "npv",
        "ece",
        "brier",
        "threshold",
    ):
        assert len(r[k]["ci95"]) == 2
