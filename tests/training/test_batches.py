"""Training batches: class weights as sample weights, mixup blends images and labels alike."""

from __future__ import annotations

from typing import Any

import numpy as np

from inference.preprocess import PreprocessConfig
from training.train import _batches

PRE = PreprocessConfig(size=16)
W0, W1 = 2.0, 0.5


def _data(n: int = 12) -> tuple[list[Any], Any]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 24), dtype=np.uint8) for _ in range(n)]
    labels = np.array([i % 2 for i in range(n)], dtype=np.int64)
    return images, labels


def _make(mixup: float) -> Any:
    images, labels = _data()
    return _batches(
        images,
        labels,
        batch_size=6,
        pre=PRE,
        seed=1,
        strength=0.0,
        debias=0.0,
        reframe=0.0,
        mixup=mixup,
        class_weight=(W0, W1),
        start_epoch=0,
    )


def test_without_mixup_labels_are_hard_and_weighted_by_class() -> None:
    x, y, w = _make(0.0)[0]
    assert x.shape == (6, 16, 16, 1)
    assert set(np.unique(y)) <= {0.0, 1.0}
    np.testing.assert_allclose(w, np.where(y == 1, W1, W0))


def test_mixup_blends_labels_and_interpolates_weights() -> None:
    plain = _make(0.0)
    mixed = _make(0.4)
    x0, _, _ = plain[0]
    x, y, w = mixed[0]
    assert x.shape == x0.shape
    # Soft labels strictly between the classes for some images, never outside [0, 1].
    assert np.all((y >= 0) & (y <= 1)) and np.any((y > 0.01) & (y < 0.99))
    np.testing.assert_allclose(w, y * W1 + (1 - y) * W0, rtol=1e-6)
    # The images change with their labels: a blend is no longer any original image.
    assert not np.allclose(x, x0)
    # Deterministic per (seed, epoch, batch), so a resumed run sees the same stream.
    x2, y2, _ = _make(0.4)[0]
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
