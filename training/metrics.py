"""Binary classification metrics, calibration error and bootstrap intervals (numpy only).

ECE: expected calibration error of the PNEUMONIA probability over 10 equal-width bins,
sum over bins of (bin share) * |observed pneumonia rate - mean predicted probability|.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

METRIC_NAMES = (
    "auc",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "npv",
    "ece",
    "brier",
)

Array = npt.NDArray[Any]


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def roc_auc(y: Array, p: Array) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN for one class."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n0 == 0 or n1 == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    sorted_p = p[order]
    ranks = np.empty(len(p), dtype=np.float64)
    # Mid-ranks for ties.
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    mid = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(mid, counts)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n0 * n1))


def ece(y: Array, p: Array, bins: int = 10) -> float:
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(y[m].mean() - p[m].mean())
    return float(total)


def confusion(y: Array, p: Array, threshold: float) -> tuple[int, int, int, int]:
    """(tn, fp, fn, tp) with "positive" meaning p >= threshold."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= threshold
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    tn = int((~pred & ~y).sum())
    return tn, fp, fn, tp


def binary_metrics(y: Array, p: Array, threshold: float) -> dict[str, float]:
    """All METRIC_NAMES at ``threshold`` for labels ``y`` (0/1) and probabilities ``p``."""
    tn, fp, fn, tp = confusion(y, p, threshold)
    sens = _div(tp, tp + fn)
    prec = _div(tp, tp + fp)
    return {
        "auc": roc_auc(y, p),
        "accuracy": _div(tp + tn, tp + tn + fp + fn),
        "sensitivity": sens,
        "specificity": _div(tn, tn + fp),
        "precision": prec,
        "f1": _div(2 * prec * sens, prec + sens) if tp > 0 else 0.0,
        "npv": _div(tn, tn + fn),
        "ece": ece(y, p),
        "brier": float(np.mean((np.asarray(p, dtype=np.float64) - np.asarray(y)) ** 2)),
    }


def bootstrap_intervals(
    y: Array, p: Array, threshold: float, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% percentile bootstrap intervals (resampling images with replacement) per metric."""
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in METRIC_NAMES}
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        for k, v in binary_metrics(y[i], p[i], threshold).items():
            draws[k].append(v)
    out = {}
    for k, vals in draws.items():
        a = np.asarray(vals, dtype=np.float64)
        a = a[np.isfinite(a)]
        out[k] = (
            (float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5)))
            if len(a)
            else (float("nan"), float("nan"))
        )
    return out


def metrics_report(
    y: Array, p: Array, threshold: float, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """``{"n": .., "threshold": {...}, "<metric>": {"value", "ci95"}}`` (JSON-ready)."""
    point = binary_metrics(y, p, threshold)
    ci = bootstrap_intervals(y, p, threshold, n_boot=n_boot, seed=seed)
    tn, fp, fn, tp = confusion(y, p, threshold)
    report: dict[str, Any] = {
        "n": len(y),
        "n_pneumonia": int(np.sum(y)),
        "n_normal": int(len(y) - np.sum(y)),
        # The threshold is fixed on validation before evaluation, so its interval is a point.
        "threshold": {"value": float(threshold), "ci95": [float(threshold), float(threshold)]},
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }
    for k in METRIC_NAMES:
        report[k] = {"value": point[k], "ci95": [ci[k][0], ci[k][1]]}
    return report


def exact_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of a proportion, ``k`` of ``n``. Unlike the
    bootstrap it stays honest at 0 or n (34 of 34 normals cleared: 0.897-1.000, not 1-1)."""
    from scipy.stats import beta

    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got {k} of {n}")
    alpha = 1.0 - confidence
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi
