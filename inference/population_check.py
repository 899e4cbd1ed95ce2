"""Is this a frontal chest film of a young child? The check for what a header does not say.

The out-of-distribution score (inference.input_check.OODModel) measures distance from the
training films; adult frontal films and lateral views are close enough to pass it (it declined
5% of adult films and 14% of laterals). This check is supervised instead: a logistic regression
on the same features (member 0's pooled block features and a PCA of the 32 x 32 thumbnail)
separating the training films (children of one to five years, AP) from films outside that
population (adult frontal films, laterals, other body parts and modalities). Its threshold is a
high percentile of the scores of training patients held out of its fit, so that films of the
training kind are rarely declined. Fitted by ``python -m training.population_check``; the
figures, measured by leaving each image source out in turn, are in the model card.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

F = npt.NDArray[Any]
POPULATION_FILE = "population.npz"


@dataclass(frozen=True)
class PopulationModel:
    """Score = a linear function of standardised [embedding, thumbnail PCA]; above
    ``threshold`` the image is outside the model's population."""

    pca_mean: F  # (T,) thumbnail mean
    pca_components: F  # (K, T)
    feature_mean: F  # (E + K,)
    feature_scale: F  # (E + K,)
    coef: F  # (E + K,)
    intercept: float
    threshold: float

    def scores(self, embedding: F, thumbs: F) -> F:
        thumbs = np.asarray(thumbs, np.float64).reshape(len(thumbs), -1)
        projected = (thumbs - self.pca_mean) @ self.pca_components.T
        features = np.hstack([np.asarray(embedding, np.float64), projected])
        z = (features - self.feature_mean) / self.feature_scale
        return np.asarray(z @ self.coef + self.intercept, np.float64)

    def save(self, path: Path) -> None:
        np.savez(
            path,
            pca_mean=self.pca_mean,
            pca_components=self.pca_components,
            feature_mean=self.feature_mean,
            feature_scale=self.feature_scale,
            coef=self.coef,
            intercept=np.float64(self.intercept),
            threshold=np.float64(self.threshold),
        )

    @classmethod
    def load(cls, path: Path) -> PopulationModel:
        with np.load(path) as data:
            return cls(
                pca_mean=data["pca_mean"],
                pca_components=data["pca_components"],
                feature_mean=data["feature_mean"],
                feature_scale=data["feature_scale"],
                coef=data["coef"],
                intercept=float(data["intercept"]),
                threshold=float(data["threshold"]),
            )

    @classmethod
    def load_optional(cls, folder: Path) -> PopulationModel | None:
        """The artifact's population check, or None for an artifact made before it existed."""
        path = folder / POPULATION_FILE
        return cls.load(path) if path.exists() else None
