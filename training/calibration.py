"""Temperature scaling and the operating-threshold rule, both fitted on validation only."""

from __future__ import annotations

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


def fit_platt(y: Array, logits: Array) -> tuple[float, float]:
    """Temperature and bias (T, b) minimising the NLL of sigmoid(z / T + b) (Platt scaling).

    Why a bias as well as a temperature: class-weighted training centres the logits on a
    balanced prior, which a temperature alone cannot move.
    """
    from scipy.optimize import minimize

    z = np.asarray(logits, dtype=np.float64)
    yy = np.asarray(y, dtype=np.float64)

    def loss(ab: Array) -> float:
        s = ab[0] * z + ab[1]
        # A weak pull towards (1, 0) keeps the fit finite on separable (tiny) validation sets.
        prior = 1e-5 * ((ab[0] - 1.0) ** 2 + ab[1] ** 2)
        return float(np.mean(np.logaddexp(0.0, s) - yy * s) + prior)

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


def threshold_for_sensitivity(y: Array, p: Array, target: float) -> float:
    """The highest threshold whose sensitivity (p >= threshold) is at least ``target``."""
    y = np.asarray(y).astype(bool)
    pos = np.sort(np.asarray(p, dtype=np.float64)[y])
    if len(pos) == 0:
        raise ValueError("no positive cases to set a sensitivity threshold")
    # Allow floor((1 - target) * n) positives below the threshold.
    k = int(np.floor((1.0 - target) * len(pos) + 1e-9))
    return float(pos[k])


def threshold_for_specificity(y: Array, p: Array, target: float) -> float:
    """The lowest threshold whose specificity (negatives with p < threshold) is >= ``target``."""
    y = np.asarray(y).astype(bool)
    neg = np.sort(np.asarray(p, dtype=np.float64)[~y])
    if len(neg) == 0:
        raise ValueError("no negative cases to set a specificity threshold")
    k = int(np.ceil(target * len(neg) - 1e-9))
    k = min(max(k, 1), len(neg))
    return float(np.nextafter(neg[k - 1], np.inf))
