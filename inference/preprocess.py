"""The one preprocessing function shared by training and serving.

Every image, whether a Kermany JPEG, a PNG upload or a decoded DICOM, goes through
:func:`preprocess` so that training and the gateway never drift apart.

Steps (parameters are stored in the model artifact's metadata):

1. grayscale: colour inputs are averaged over channels (Kermany JPEGs have identical channels);
2. scale to [0, 1] by the image's own minimum and maximum (a DICOM arrives already windowed
   by :mod:`inference.dicom_pixels`; a JPEG is 0..255);
3. plain resize of the whole image to ``size`` x ``size`` with area interpolation (the training
   JPEGs were plain-resized from the originals without keeping the aspect ratio, so serving does
   the same);
4. histogram equalisation on 256 levels. Why: it maps intensities to their rank, so any monotone
   change of exposure, contrast, gamma or window (the main differences between acquisition sites
   and between a DICOM and its JPEG export) gives the same tensor;
5. optional detail normalisation (``detail_target`` > 0): the finest band (image minus its
   Gaussian blur, sigma = size / 128 px) is rescaled so that its standard deviation equals
   ``detail_target`` (gain limited to [0.5, 3]). Why: on the Kermany training images normal
   films are sharper than pneumonia films (edge-enhancement and resolution of the originals),
   and a model learns that shortcut; films processed differently (softer normals) are then
   called pneumonia. Normalising the fine detail per image removes the cue;
6. centre and scale: equalised values are close to uniform on [0, 1], so ``(x - 0.5) / 0.29``
   gives roughly zero mean and unit variance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

FloatImage = npt.NDArray[np.float32]


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of :func:`preprocess`; saved with the model so serving uses the same ones."""

    size: int = 128
    equalize: bool = True
    mean: float = 0.5
    std: float = 0.29
    detail_target: float = 0.0  # 0 = off

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.detail_target:
            del d["detail_target"]  # artifacts written before the option existed hash the same
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreprocessConfig:
        return cls(
            size=int(data["size"]),
            equalize=bool(data["equalize"]),
            mean=float(data["mean"]),
            std=float(data["std"]),
            detail_target=float(data.get("detail_target", 0.0)),
        )


def to_gray(image: npt.NDArray[Any]) -> FloatImage:
    """Return a 2-D float32 image from a 2-D, (H, W, 1), (H, W, 3) or (H, W, 4) array.

    Raises ValueError for any other shape.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        arr = arr[:, :, :3].mean(axis=2) if arr.shape[2] >= 3 else arr[:, :, 0]
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D or (H, W, C) image, got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


def to_unit_range(gray: FloatImage) -> FloatImage:
    """Scale a 2-D image linearly to [0, 1] by its own minimum and maximum (flat -> zeros)."""
    lo = float(gray.min())
    hi = float(gray.max())
    if hi <= lo:
        return np.zeros_like(gray, dtype=np.float32)
    return ((gray - lo) * (1.0 / (hi - lo))).astype(np.float32)


def preprocess(image: npt.NDArray[Any], config: PreprocessConfig) -> FloatImage:
    """Turn any 2-D or colour image into the model's (size, size) float32 input.

    ``image`` may be uint8, uint16 or float of any range. Raises ValueError for an empty or
    non-image array.
    """
    gray = to_gray(image)
    if gray.size == 0 or min(gray.shape) < 2:
        raise ValueError(f"image too small: {gray.shape}")
    unit = to_unit_range(gray)
    small = cv2.resize(unit, (config.size, config.size), interpolation=cv2.INTER_AREA)
    if config.equalize:
        levels = np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)
        small = cv2.equalizeHist(levels).astype(np.float32) * (1.0 / 255.0)
    if config.detail_target > 0:
        small = normalise_detail(
            np.asarray(small, dtype=np.float32), config.detail_target, sigma=config.size / 128.0
        )
    return ((small - config.mean) * (1.0 / config.std)).astype(np.float32)


def normalise_detail(image: FloatImage, target: float, *, sigma: float) -> FloatImage:
    """Rescale the finest band (image - blur) to standard deviation ``target``."""
    base = cv2.GaussianBlur(image, (0, 0), sigma)
    detail = image - base
    energy = float(detail.std())
    gain = 1.0 if energy <= 1e-6 else min(3.0, max(0.5, target / energy))
    return np.asarray(base + gain * detail, dtype=np.float32)


def preprocess_batch(images: list[npt.NDArray[Any]], config: PreprocessConfig) -> FloatImage:
    """Preprocess several images into a (N, size, size, 1) float32 batch."""
    out = np.empty((len(images), config.size, config.size, 1), dtype=np.float32)
    for i, img in enumerate(images):
        out[i, :, :, 0] = preprocess(img, config)
    return out
