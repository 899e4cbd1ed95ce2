"""The one preprocessing function shared by training and serving.

Every image, whether a Kermany JPEG, a PNG upload or a decoded DICOM, goes through
:func:`preprocess` so that training and the gateway never drift apart.

Steps (parameters are stored in the model artifact's metadata):

1. grayscale: colour inputs are averaged over channels (Kermany JPEGs have identical channels);
2. scale to [0, 1] by the image's own minimum and maximum (a DICOM arrives already windowed
   by :mod:`inference.dicom_pixels`; a JPEG is 0..255);
2a. optional crop to the body (``crop_body``, off unless the artifact declares it): the image
   is cut to the box of rows and columns that the body covers, found from the pixels
   (:func:`body_box`), so that dark air, black collimation borders and padding around the
   patient no longer set the framing. Why: every change of framing raised the validation
   normals' probability (the normal class is tied to the training framing, docs/model.md);
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
    crop_body: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        # Artifacts written before an option existed hash the same.
        if not self.detail_target:
            del d["detail_target"]
        if not self.crop_body:
            del d["crop_body"]
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreprocessConfig:
        return cls(
            size=int(data["size"]),
            equalize=bool(data["equalize"]),
            mean=float(data["mean"]),
            std=float(data["std"]),
            detail_target=float(data.get("detail_target", 0.0)),
            crop_body=bool(data.get("crop_body", False)),
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
    return preprocess_with_box(image, config)[0]


def preprocess_with_box(
    image: npt.NDArray[Any], config: PreprocessConfig
) -> tuple[FloatImage, tuple[int, int, int, int]]:
    """:func:`preprocess`, and the part ``(y0, y1, x0, x1)`` of ``image`` it used (as
    :func:`input_box` finds it, without a second pass over a large image)."""
    gray = to_gray(image)
    if gray.size == 0 or min(gray.shape) < 2:
        raise ValueError(f"image too small: {gray.shape}")
    unit = to_unit_range(gray)
    box = (0, gray.shape[0], 0, gray.shape[1])
    if config.crop_body:
        box = body_box(unit)
        y0, y1, x0, x1 = box
        unit = unit[y0:y1, x0:x1]
    small = cv2.resize(unit, (config.size, config.size), interpolation=cv2.INTER_AREA)
    if config.equalize:
        levels = np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)
        small = cv2.equalizeHist(levels).astype(np.float32) * (1.0 / 255.0)
    if config.detail_target > 0:
        small = normalise_detail(
            np.asarray(small, dtype=np.float32), config.detail_target, sigma=config.size / 128.0
        )
    return ((small - config.mean) * (1.0 / config.std)).astype(np.float32), box


# body_box: the body is where pixels are brighter than the air by this share of the image's
# range; a row or column belongs to the body box if at least COVER of it is body; at most
# MAX_CUT of the height or width is cut from each side (the box keeps at least half of each).
BODY_LEVEL = 0.2
BODY_COVER = 0.3
BODY_MAX_CUT = 0.25


def body_box(unit: FloatImage) -> tuple[int, int, int, int]:
    """The body's bounding box ``(y0, y1, x0, x1)`` in a [0, 1] radiograph (slices, end excluded).

    Found on a copy of at most 128 px: pixels above ``lo + BODY_LEVEL * (hi - lo)`` (the 1st and
    99th percentiles) are body; the box spans the first to the last row (column) of which at
    least ``BODY_COVER`` is body, cut by at most ``BODY_MAX_CUT`` per side. A flat image, or
    one with no such row or column, keeps its whole extent.
    """
    h, w = unit.shape
    scale = 128.0 / max(h, w)
    small = (
        cv2.resize(
            unit, (max(2, round(w * scale)), max(2, round(h * scale))), interpolation=cv2.INTER_AREA
        )
        if scale < 1.0
        else unit
    )
    lo, hi = (float(v) for v in np.percentile(small, [1.0, 99.0]))
    if hi - lo < 0.05:
        return 0, h, 0, w
    body = small > lo + BODY_LEVEL * (hi - lo)

    def span(cover: npt.NDArray[np.float64], n: int) -> tuple[int, int]:
        idx = np.flatnonzero(cover >= BODY_COVER)
        if idx.size == 0:
            return 0, n
        start = min(idx[0] / cover.size, BODY_MAX_CUT)
        end = max((idx[-1] + 1) / cover.size, 1.0 - BODY_MAX_CUT)
        return int(np.floor(start * n)), int(np.ceil(end * n))

    y0, y1 = span(body.mean(axis=1), h)
    x0, x1 = span(body.mean(axis=0), w)
    return y0, y1, x0, x1


def input_box(image: npt.NDArray[Any], config: PreprocessConfig) -> tuple[int, int, int, int]:
    """The part ``(y0, y1, x0, x1)`` of ``image`` that :func:`preprocess` turns into the model's
    input: the whole image, or the body's box when ``config.crop_body`` (a heatmap of the input
    belongs there, not on the whole image)."""
    gray = to_gray(image)
    if not config.crop_body:
        return 0, gray.shape[0], 0, gray.shape[1]
    return body_box(to_unit_range(gray))


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
