"""A study's images go through the model in one batch (issue #21): each image gets exactly the
numbers (to the last bit of the model's outputs), the reason and the heat map it gets alone,
whatever the batch holds (declined images,
a batch padded to the next power of two, one split in pieces of MAX_BATCH)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from inference.model import MAX_BATCH, padded_size
from inference.predictor import Prediction, Predictor
from tests import dicom_files as files

ROOT = Path(__file__).resolve().parents[2]
KERMANY = sorted((ROOT / "tests" / "fixtures" / "images" / "kermany").rglob("*.jp*g"))


@pytest.fixture(scope="module")
def predictor(model_dir: Path) -> Predictor:
    return Predictor.load(model_dir)


@pytest.fixture
def batches(predictor: Predictor) -> Iterator[list[int]]:
    """The batch sizes the model is run with, in order (the runner's ``run``, wrapped)."""
    sizes: list[int] = []
    run = predictor.runner.run

    def recording(x: Any) -> Any:
        sizes.append(len(x))
        return run(x)

    predictor.runner.run = recording
    yield sizes
    predictor.runner.run = run


def same(batched: Prediction, alone: Prediction) -> None:
    assert batched.declined_reason == alone.declined_reason
    assert batched.probability == alone.probability
    assert batched.present == alone.present
    # The network's outputs are bit for bit the same; the input-check score, a float64 matrix
    # product over the batch, may differ in its last bit (seen: 1e-16).
    if alone.ood_score is None:
        assert batched.ood_score is None
    else:
        assert batched.ood_score == pytest.approx(alone.ood_score, rel=1e-12, abs=1e-12)
    assert batched.caveat == alone.caveat
    assert batched.heatmap_png == alone.heatmap_png


def study(tmp_path: Path) -> list[Dataset]:
    """A child's film, the same flipped, a lateral of it, an adult's film, a Secondary
    Capture: used, used or declined by the image checks, declined by the header, by age."""
    child = dcmread(files.CHILD_CR)
    flipped = dcmread(files.CHILD_CR)
    flipped.PixelData = np.ascontiguousarray(flipped.pixel_array[:, ::-1]).tobytes()
    lateral = dcmread(files.CHILD_CR)
    lateral.ViewPosition = "LL"
    return [child, flipped, lateral, dcmread(files.CHEST_CR), dcmread(files.CHEST_SC)]


def test_a_study_in_one_batch_gives_each_image_its_own_numbers(
    predictor: Predictor, batches: list[int], tmp_path: Path
) -> None:
    alone = [predictor.predict_dataset(ds) for ds in study(tmp_path)]
    del batches[:]
    together = predictor.predict_datasets(study(tmp_path))
    used = [p for p in alone if p.declined_reason is None or p.ood_score is not None]
    assert batches == [len(used)]  # the images past the header checks, in one run
    assert alone[0].probability is not None and alone[2].declined_reason is not None
    for batched, single in zip(together, alone, strict=True):
        same(batched, single)


def film(path: Path, turn: int) -> Any:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return np.ascontiguousarray(np.rot90(image, turn) if turn % 2 == 0 else image[:, ::-1])


@pytest.mark.parametrize("count", [3, MAX_BATCH + 3])
def test_padded_and_split_batches_change_no_image(
    predictor: Predictor, batches: list[int], count: int
) -> None:
    """3 images run padded to 4; MAX_BATCH + 3 run as MAX_BATCH and 3 (padded to 4)."""
    images = [film(KERMANY[i % len(KERMANY)], i // len(KERMANY)) for i in range(count)]
    alone = [predictor.predict_array(image) for image in images]
    together = predictor.predict_arrays(images, heatmap=True)
    for batched, single in zip(together, alone, strict=True):
        same(batched, single)


def test_padded_sizes() -> None:
    assert [padded_size(n) for n in range(1, MAX_BATCH + 1)] == [1, 2, 4, 4, 8, 8, 8, 8]
    for bad in (0, MAX_BATCH + 1):
        with pytest.raises(ValueError):
            padded_size(bad)
