"""The typed values passed between the phases of training.export.finalize."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from inference.input_check import thumbnail
from training.augment import STRESS_NAMES
from training.calibration import sigmoid

if TYPE_CHECKING:
    # Annotations only: inference.model loads TensorFlow.
    from inference.model import ModelRunner

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int64]


def run_batches(runner: ModelRunner, x: F32, batch: int = 64) -> tuple[F32, F32]:
    """(logits, embeddings) for a preprocessed (N, S, S, 1) array."""
    logits, embs = [], []
    for i in range(0, len(x), batch):
        raw = runner.run(x[i : i + batch])
        logits.append(raw.logits)
        embs.append(raw.embedding)
    return np.concatenate(logits), np.concatenate(embs)


def thumbs(x: F32) -> F32:
    return np.stack([thumbnail(xi[..., 0]) for xi in x])


@dataclass(frozen=True)
class ExportedMembers:
    """The serving models written into the artifact folder."""

    stems: tuple[str, ...]
    layer_dims: tuple[int, ...]  # the OOD layers' widths of member 0


@dataclass(frozen=True)
class ValidationPasses:
    """The exported model's outputs on validation: clean, one shift per image, every shift."""

    y: Labels
    logit: F32
    emb: F32
    shifted_logit: F32  # one shift per image (prep.val_stress_x)
    shifted_emb: F32
    stress_logits: dict[str, F32]  # every image under each named shift
    stress_emb: dict[str, F32]
    stress_thumbs: dict[str, F32]
    tflite_diff: float  # max |logit difference| TFLite vs Keras

    @property
    def all_stress(self) -> F32:
        return np.concatenate([self.stress_logits[n] for n in STRESS_NAMES])

    @property
    def y_all_stress(self) -> Labels:
        return np.tile(self.y, len(STRESS_NAMES))


@dataclass(frozen=True)
class Weights:
    """Validation weights reweighting each subgroup to its share of the whole data folder."""

    subgroups: list[str]  # of the validation films
    population: list[str]  # of all films, training and validation
    reweight: bool
    val: F64
    stress: F64  # ``val`` tiled over STRESS_NAMES


@dataclass(frozen=True)
class Calibration:
    """Platt scaling P = sigmoid(logit / T + b), and the temperature-only fit for comparison."""

    temperature: float
    logit_bias: float
    temperature_only: float

    def prob(self, z: npt.NDArray[Any]) -> F64:
        return sigmoid(np.asarray(z) / self.temperature + self.logit_bias)


@dataclass(frozen=True)
class Threshold:
    """The operating threshold, its rule, and the candidates it was chosen from."""

    value: float
    rule: str
    clean: float
    shifted: float


@dataclass(frozen=True)
class ValidationReports:
    """The validation metrics of training_summary.json (each entry a JSON-ready mapping)."""

    validation: dict[str, Any]  # clean: metrics with 95% intervals, subgroups, plots
    shifted_pooled: dict[str, Any]  # every shifted copy pooled
    stress: dict[str, dict[str, float]]  # per shift: auc, accuracy, sensitivity, specificity, ece
    uncalibrated: dict[str, dict[str, float]]  # raw logits at 0.5: clean, shifted
    temperature_only: dict[str, Any]  # temperature, and clean/shifted metrics at 0.5
    composition: dict[str, dict[str, float]]  # per subgroup: validation, data shares, weight
    reweighted_sensitivity: dict[str, float]  # clean, shifted
