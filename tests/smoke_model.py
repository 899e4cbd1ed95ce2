"""The tiny model the tests train when they need one: seconds on 2 cores, fixture images only."""

from __future__ import annotations

from pathlib import Path

KERMANY_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "images" / "kermany"


def smoke_train_args(out: Path, data: Path = KERMANY_FIXTURES) -> list[str]:
    """`cxr-gateway train` arguments (after the program name) for the smoke model."""
    return [
        "train", "--data", str(data), "--out", str(out), "--epochs", "2", "--image-size", "32",
        "--batch-size", "8", "--val-fraction", "0.3", "--seed", "3",
    ]  # fmt: skip
