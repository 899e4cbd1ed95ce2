"""Temperature scaling and the operating-threshold rule, both fitted on validation only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]


def sigmoid(z: Array) -> npt.NDArray[np.float64]:
    z = np.asarray(z, dtype=np.float64)
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)), dtype=np.float64)


def nll(y: Array, logits: Array, temperature: float) -> float:
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(y, dtype=np.float64)
    # log(1 + exp(-|z|)) form, stable for large |z|.
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def fit_temperature(y: Array, logits: Array) -> float:
    """Temperature T > 0 minimising the validation negative log-likelihood of sigmoid(z / T)."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(
        lambda log_t: nll(y, logits, float(np.exp(log_t))), bounds=(-3.0, 3.0), method="bounded"
    )
    return float(np.exp(res.x))


def composition_weights(groups: list[str], population: list[str]) -> npt.NDArray[np.float64]:
    """Per-sample weights that give ``groups`` the group shares of ``population``.

    The weights average 1. A group absent from ``population`` gets weight 0.
    """
    names, counts = np.unique(np.asarray(groups), return_counts=True)
    pop_names, pop_counts = np.unique(np.asarray(population), return_counts=True)
    pop_share = dict(zip(pop_names.tolist(), (pop_counts / pop_counts.sum()).tolist(), strict=True))
    share = dict(zip(names.tolist(), (counts / counts.sum()).tolist(), strict=True))
    w = np.array([pop_share.get(g, 0.0) / share[g] for g in groups], dtype=np.float64)
    if w.sum() <= 0:
        raise ValueError("no validation group occurs in the population")
    return np.asarray(w * len(w) / w.sum(), dtype=np.float64)


def fit_platt(y: Array, logits: Array, weights: Array | None = None) -> tuple[float, float]:
    """Temperature and bias (T, b) minimising the NLL of sigmoid(z / T + b) (Platt scaling),
    optionally with per-sample weights.

    Why a bias as well as a temperature: class-weighted training centres the logits on a
    balanced prior, which a temperature alone cannot move.
    """
    from scipy.optimize import minimize

    z = np.asarray(logits, dtype=np.float64)
    yy = np.asarray(y, dtype=np.float64)
    w = np.ones_like(z) if weights is None else np.asarray(weights, dtype=np.float64)

    def loss(ab: Array) -> float:
        s = ab[0] * z + ab[1]
        # A weak pull towards (1, 0) keeps the fit finite on separable (tiny) validation sets.
        prior = 1e-5 * ((ab[0] - 1.0) ** 2 + ab[1] ** 2)
        return float(np.average(np.logaddexp(0.0, s) - yy * s, weights=w) + prior)

    res = minimize(
        loss,
        np.array([1.0, 0.0]),
        method="Nelder-Mead",
        options={"xatol": 1e-6, "fatol": 1e-9, "maxiter": 2000},
    )
    a, b = float(res.x[0]), float(res.x[1])
    if a <= 0:
        raise ValueError("Platt scaling found a non-positive slope: logits do not rank the classes")
    return 1.0 / a, b


def threshold_for_sensitivity(
    y: Array, p: Array, target: float, weights: Array | None = None
) -> float:
    """The highest threshold whose sensitivity (p >= threshold) is at least ``target``;
    with ``weights``, the weighted share of positives at or above it."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(p[y], kind="stable")
    pos, pos_w = p[y][order], w[y][order]
    if len(pos) == 0:
        raise ValueError("no positive cases to set a sensitivity threshold")
    # Leave out the lowest positives while their weight stays within (1 - target) of the total.
    missed = np.cumsum(pos_w)
    k = int(np.searchsorted(missed, (1.0 - target) * pos_w.sum() * (1 + 1e-12), side="right"))
    return float(pos[min(k, len(pos) - 1)])


def weighted_sensitivity(y: Array, p: Array, threshold: float, weights: Array) -> float:
    """Share of the positives' weight at or above ``threshold``."""
    y = np.asarray(y).astype(bool)
    w = np.asarray(weights, dtype=np.float64)[y]
    return float(np.sum(w * (np.asarray(p)[y] >= threshold)) / np.sum(w))


def threshold_for_specificity(y: Array, p: Array, target: float) -> float:
    """The lowest threshold whose specificity (negatives with p < threshold) is >= ``target``."""
    y = np.asarray(y).astype(bool)
    neg = np.sort(np.asarray(p, dtype=np.float64)[~y])
    if len(neg) == 0:
        raise ValueError("no negative cases to set a specificity threshold")
    k = int(np.ceil(target * len(neg) - 1e-9))
    k = min(max(k, 1), len(neg))
    return float(np.nextafter(neg[k - 1], np.inf))


def sensitivity_lower_bound(detected: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson lower confidence bound of a sensitivity: ``detected`` of ``n``
    positives called. Exact (binomial), conservative; 0.0 when none is detected."""
    from scipy.stats import beta

    if n <= 0 or not 0 <= detected <= n:
        raise ValueError(f"need 0 <= detected <= n and n > 0, got {detected} of {n}")
    if detected == 0:
        return 0.0
    return float(beta.ppf(1.0 - confidence, detected, n - detected + 1))


def misses_allowed(n_positive: int, target: float, confidence: float = 0.95) -> int | None:
    """The most positives a threshold may miss among ``n_positive`` while the one-sided
    Clopper-Pearson lower bound of sensitivity stays >= ``target``; None when even no miss
    reaches it (fewer than log(1 - confidence) / log(target) positives: 59 at 0.95/0.95)."""
    allowed = None
    for k in range(n_positive):
        if sensitivity_lower_bound(n_positive - k, n_positive, confidence) < target:
            break
        allowed = k
    return allowed


@dataclass(frozen=True)
class SensitivityRule:
    """What :func:`threshold_with_margin` chose, and the guarantee it carries."""

    threshold: float
    n_positive: int
    misses_allowed: int  # by the rule (0 when the target is out of reach)
    misses: int  # positives below the threshold on the sample (<= misses_allowed; ties)
    lower_bound: float  # one-sided Clopper-Pearson bound of sensitivity at ``confidence``
    confidence: float
    reachable: bool  # False: even 0 misses leave the bound below the target
    achieved_confidence: float  # the confidence at which 0 misses show the target, if not


def threshold_with_margin(
    y: Array, p: Array, target: float, confidence: float = 0.95
) -> SensitivityRule:
    """The highest threshold (at a positive's score) whose sensitivity on the sample has a
    one-sided ``confidence`` Clopper-Pearson lower bound >= ``target``.

    The margin shrinks as the sample grows: with n positives the rule allows
    ``misses_allowed(n)`` of them below the threshold (at 0.95/0.95: 0 of 59-92, 1 of 93-123,
    2 of 124-152, 3 of 153-180, 4 of 181-207, ...). When no threshold can show the target (too
    few positives), the threshold is the lowest positive's score (every sample positive is
    called) and ``achieved_confidence`` says how sure that is (1 - target ** n).
    Raises ValueError when there is no positive.
    """
    y = np.asarray(y).astype(bool)
    pos = np.sort(np.asarray(p, dtype=np.float64)[y])
    n = len(pos)
    if n == 0:
        raise ValueError("no positive cases to set a sensitivity threshold")
    k = misses_allowed(n, target, confidence)
    reachable = k is not None
    k = k or 0
    threshold = float(pos[k])
    misses = int(np.sum(pos < threshold))
    return SensitivityRule(
        threshold=threshold,
        n_positive=n,
        misses_allowed=k,
        misses=misses,
        lower_bound=sensitivity_lower_bound(n - misses, n, confidence),
        confidence=confidence,
        reachable=reachable,
        achieved_confidence=confidence if reachable else float(1.0 - target**n),
    )
