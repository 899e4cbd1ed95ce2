"""Temperature scaling fixes a synthetic over-confident model; threshold rules hold."""

from __future__ import annotations

import numpy as np
import pytest

from training.calibration import (
    fit_temperature,
    nll,
    sigmoid,
    threshold_for_sensitivity,
    threshold_for_specificity,
)
from training.metrics import binary_metrics, ece


def test_temperature_scaling_improves_ece() -> None:
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < sigmoid(true_logit)).astype(int)
    overconfident = 3.0 * true_logit  # miscalibrated: logits three times too large
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(3.0, rel=0.15)
    before = ece(y, sigmoid(overconfident))
    after = ece(y, sigmoid(overconfident / t))
    assert before > 0.08
    assert after < before / 2
    assert nll(y, overconfident, t) < nll(y, overconfident, 1.0)


def test_threshold_for_sensitivity() -> None:
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(300, int), np.ones(200, int)]
    p = np.r_[rng.beta(2, 5, 300), rng.beta(5, 2, 200)]
    for target in (0.9, 0.95, 0.99):
        t = threshold_for_sensitivity(y, p, target)
        assert binary_metrics(y, p, t)["sensitivity"] >= target
        # Highest such threshold: any higher threshold loses the target.
        assert binary_metrics(y, p, np.nextafter(t, 1))["sensitivity"] < target


def test_threshold_for_specificity() -> None:
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(300, int), np.ones(200, int)]
    p = np.r_[rng.beta(2, 5, 300), rng.beta(5, 2, 200)]
    t = threshold_for_specificity(y, p, 0.9)
    assert binary_metrics(y, p, t)["specificity"] >= 0.9
