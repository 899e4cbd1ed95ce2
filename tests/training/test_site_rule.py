"""The site calibration's threshold rule and sample hash, checked against known values and
the binomial definitions (no model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

from training.calibrate_site import MIN_PER_CLASS, SiteSampleError, check_sizes, fit_site
from training.calibration import misses_allowed, sensitivity_lower_bound, threshold_with_margin
from training.data import list_samples
from training.metrics import exact_interval
from training.site_sample import ScoredFile, SiteSample, data_hash

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "images" / "kermany"


@pytest.mark.parametrize("target", [0.90, 0.95, 0.98])
def test_misses_allowed_is_the_largest_count_the_binomial_test_accepts(target: float) -> None:
    # The one-sided Clopper-Pearson bound of n - k detected is >= target exactly when
    # P(X >= n - k | X ~ Binomial(n, target)) <= 5%: at most a 5% chance of doing this well
    # if the true sensitivity were only the target.
    for n in range(1, 400):
        k = misses_allowed(n, target)
        if k is None:
            assert binom.sf(n - 1, n, target) > 0.05, n
            continue
        assert binom.sf(n - k - 1, n, target) <= 0.05, (n, k)
        assert k == n - 1 or binom.sf(n - k - 2, n, target) > 0.05, (n, k)


def test_known_values_at_95_percent() -> None:
    assert misses_allowed(58, 0.95) is None  # 0.95 ** 58 = 0.051 > 0.05
    assert [misses_allowed(n, 0.95) for n in (59, 92, 93, 123, 124, 152, 153)] == [
        0, 0, 1, 1, 2, 2, 3,
    ]  # fmt: skip
    assert sensitivity_lower_bound(60, 60) == pytest.approx(0.05 ** (1 / 60))
    assert sensitivity_lower_bound(0, 10) == 0.0


def test_threshold_with_margin_leaves_the_allowed_misses_below_it() -> None:
    rng = np.random.default_rng(0)
    pos = rng.permutation(np.linspace(0.2, 0.99, 100))
    neg = rng.uniform(0.0, 0.5, 80)
    y = np.r_[np.ones(100), np.zeros(80)]
    rule = threshold_with_margin(y, np.r_[pos, neg], 0.95)
    # 100 positives allow one miss: the threshold is the second lowest positive's score.
    assert rule.reachable and rule.misses_allowed == 1 and rule.misses == 1
    assert rule.threshold == pytest.approx(np.sort(pos)[1])
    assert rule.lower_bound >= 0.95 > sensitivity_lower_bound(98, 100)


def test_too_few_positives_call_them_all_and_say_how_sure() -> None:
    y = np.r_[np.ones(50), np.zeros(50)]
    p = np.r_[np.linspace(0.3, 0.9, 50), np.linspace(0.0, 0.4, 50)]
    rule = threshold_with_margin(y, p, 0.95)
    assert not rule.reachable and rule.misses == 0 and rule.threshold == pytest.approx(0.3)
    assert rule.achieved_confidence == pytest.approx(1 - 0.95**50)  # 0.923


def test_tied_scores_never_add_misses() -> None:
    y = np.ones(100)
    p = np.r_[[0.4] * 3, np.linspace(0.5, 0.9, 97)]
    rule = threshold_with_margin(y, p, 0.95)
    assert rule.threshold == 0.4 and rule.misses == 0 <= rule.misses_allowed


def test_platt_refit_recovers_a_known_calibration() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 4.0, 20000)
    y = (rng.uniform(size=z.size) < 1 / (1 + np.exp(-(z / 2.0 - 1.0)))).astype(int)
    fit = fit_site(y, z, 0.95)
    assert fit.temperature == pytest.approx(2.0, rel=0.05)
    assert fit.logit_bias == pytest.approx(-1.0, abs=0.08)


def test_data_hash_follows_names_and_bytes_not_the_folder(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(FIXTURES, a)
    shutil.copytree(FIXTURES, b)
    assert data_hash(list_samples(a)) == data_hash(list_samples(b))
    first = sorted((b / "NORMAL").iterdir())[0]
    first.rename(first.with_name(f"{first.stem}-renamed.jpeg"))  # same bytes, same order
    assert data_hash(list_samples(a)) != data_hash(list_samples(b))
    shutil.rmtree(b)
    shutil.copytree(FIXTURES, b)
    victim = sorted((b / "PNEUMONIA").iterdir())[-1]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    assert data_hash(list_samples(a)) != data_hash(list_samples(b))


def _sample(n_normal: int, n_pneumonia: int, declined: int = 0) -> SiteSample:
    files = [ScoredFile(f"NORMAL/{i}.png", 0, "normal", -2.0) for i in range(n_normal)]
    files += [ScoredFile(f"PNEUMONIA/{i}.png", 1, "virus", 2.0) for i in range(n_pneumonia)]
    files += [ScoredFile(f"NORMAL/x{i}.png", 0, "normal", None, "ood") for i in range(declined)]
    return SiteSample(tuple(files), "0" * 64)


def test_fifty_usable_films_per_class_are_the_minimum() -> None:
    assert MIN_PER_CLASS == 50
    check_sizes(_sample(50, 50), MIN_PER_CLASS)
    with pytest.raises(SiteSampleError, match="49 usable NORMAL films \\(3 declined"):
        check_sizes(_sample(49, 500, declined=3), MIN_PER_CLASS)
    with pytest.raises(SiteSampleError, match="49 usable PNEUMONIA films"):
        check_sizes(_sample(50, 49), MIN_PER_CLASS)


def test_card_cites_the_simulation_only_for_the_model_it_measured(tmp_path: Path) -> None:
    from dataclasses import replace

    from inference.artifact import read_meta
    from inference.predictor import DEFAULT_MODEL_DIR
    from training.site_card import evidence_lines

    base = replace(read_meta(DEFAULT_MODEL_DIR, verify=False), content_hash="ab" * 32)
    spread = {"median": 0.9, "p05_p95": [0.8, 0.95]}
    point = {
        **{k: spread for k in ("sensitivity", "specificity", "ece")},
        "share_meeting": {"all_three": 0.52},
    }
    scenario = {
        "n_site": {"NORMAL": 152, "PNEUMONIA": 533},
        "repeats": 200,
        "first_split": {"n_cal": [37, 127]},
        "summary": {"before": point, "after": point},
    }
    path = tmp_path / "evidence.json"
    path.write_text(
        json.dumps({"base": {"content_hash": "ab" * 32}, "scenarios": {"none": scenario}})
    )
    lines = "\n".join(evidence_lines(base, path))
    assert "| as acquired | site-calibrated | 0.900 (0.800-0.950) |" in lines and "52%" in lines
    other = replace(base, content_hash="cd" * 32)
    assert "has not been measured" in "\n".join(evidence_lines(other, path))


def test_exact_interval_known_values() -> None:
    assert exact_interval(34, 34) == pytest.approx((0.025 ** (1 / 34), 1.0))  # 0.897-1.000
    assert exact_interval(0, 10) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)))  # 0-0.308
    lo, hi = exact_interval(131, 133)
    assert binom.sf(130, 133, lo) == pytest.approx(0.025) and binom.cdf(131, 133, hi) == (
        pytest.approx(0.025)
    )
