"""Temperature scaling fixes a synthetic over-confident model; threshold rules hold."""

from __future__ import annotations

import numpy as np
import pytest

from training.calibration import (
    composition_weights,
    fit_platt,
    fit_temperature,
    nll,
    sigmoid,
    threshold_for_sensitivity,
    threshold_for_specificity,
    weighted_sensitivity,
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


def test_composition_weights_give_population_shares() -> None:
    groups = ["normal"] * 20 + ["bacteria"] * 70 + ["virus"] * 10
    population = ["normal"] * 25 + ["bacteria"] * 50 + ["virus"] * 25
    w = composition_weights(groups, population)
    g = np.array(groups)
    assert w.mean() == pytest.approx(1.0)
    shares = {k: w[g == k].sum() / w.sum() for k in ("normal", "bacteria", "virus")}
    assert shares == pytest.approx({"normal": 0.25, "bacteria": 0.5, "virus": 0.25})


def test_weighted_threshold_counts_an_underrepresented_group_at_its_population_share() -> None:
    rng = np.random.default_rng(3)
    # Validation: 180 easy bacterial cases and 20 hard viral ones; the population is 50/50.
    p_bact, p_virus = rng.beta(8, 2, 180), rng.beta(3, 2, 20)
    y = np.ones(200, int)
    p = np.r_[p_bact, p_virus]
    groups = ["bacteria"] * 180 + ["virus"] * 20
    w = composition_weights(groups, ["bacteria", "virus"])
    assert threshold_for_sensitivity(y, p, 0.95, np.ones(200)) == threshold_for_sensitivity(
        y, p, 0.95
    )
    t = threshold_for_sensitivity(y, p, 0.95, w)
    assert weighted_sensitivity(y, p, t, w) >= 0.95
    assert weighted_sensitivity(y, p, np.nextafter(t, 1), w) < 0.95
    # The viral cases now hold the threshold down: the unweighted rule sets a higher one.
    assert t < threshold_for_sensitivity(y, p, 0.95)
    assert np.mean(p_virus >= t) > np.mean(p_virus >= threshold_for_sensitivity(y, p, 0.95))


def test_weighted_platt_equals_platt_on_repeated_samples() -> None:
    rng = np.random.default_rng(4)
    z = rng.normal(0, 3, 400)
    y = (rng.random(400) < sigmoid(0.5 * z + 1.0)).astype(int)
    w = rng.integers(1, 4, 400).astype(float)
    weighted = fit_platt(y, z, w)
    repeated = fit_platt(np.repeat(y, w.astype(int)), np.repeat(z, w.astype(int)))
    assert weighted == pytest.approx(repeated, rel=1e-3, abs=1e-3)
    assert fit_platt(y, z) != pytest.approx(weighted, rel=1e-3)
