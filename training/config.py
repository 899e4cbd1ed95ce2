"""The inputs of a training run: what it was asked to do (TrainConfig, recorded in the
artifact), and what its members share once the data is read (Prepared). Used by training.train,
training.export and training.export_checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from training.data import Sample


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    out: Path
    epochs: int = 40
    image_size: int = 128
    seed: int = 42
    arch: str = "cnn-s"
    members: int = 1
    batch_size: int = 32
    learning_rate: float = 2e-3
    val_fraction: float = 0.15
    # "random" (patients shuffled), "batch" or "low" (see data.batch_split, data.low_split)
    split: str = "random"
    patience: int = 8
    aug_strength: float = 1.0
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"] = str(self.data)
        d["out"] = str(self.out)
        return d


@dataclass
class Prepared:
    """Everything the members share: the split, raw images and fixed validation tensors."""

    train: list[Sample]
    val: list[Sample]
    train_images: list[npt.NDArray[np.uint8]]
    val_images: list[npt.NDArray[np.uint8]]
    val_x: npt.NDArray[np.float32]
    val_stress_x: npt.NDArray[np.float32]

    @property
    def val_y(self) -> npt.NDArray[np.int64]:
        return np.array([s.label for s in self.val], dtype=np.int64)

    @property
    def train_y(self) -> npt.NDArray[np.int64]:
        return np.array([s.label for s in self.train], dtype=np.int64)
