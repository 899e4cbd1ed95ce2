"""Heat map overlay (class-activation map over the radiograph) as PNG bytes.

The map covers the part of the image the model saw: the whole image, or the body's box for an
artifact that crops to the body (``inference.preprocess.input_box``); outside it there is no
heat, since the model never saw those pixels.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

MAX_SIDE = 512


def overlay_png(
    image: npt.NDArray[Any],
    cam: npt.NDArray[Any],
    *,
    alpha: float = 0.4,
    box: tuple[int, int, int, int] | None = None,
) -> bytes:
    """Blend the positive part of ``cam`` (logit units, any size) over ``image`` (2-D, any range).

    ``box`` ``(y0, y1, x0, x1)``, in ``image``'s pixels, is where the model's input came from:
    the map is stretched over it and the rest gets no heat (None: the whole image). The output
    keeps the image's aspect ratio, longest side at most 512 px. Regions that push towards
    PNEUMONIA are warm; a map with no positive evidence shows the plain image.
    ``overlay_png(image, cam, box=b) == overlay_on(background(image), cam, box=b,
    shape=image.shape)``.
    """
    h, w = np.shape(image)[:2]
    return overlay_on(background(image), cam, alpha=alpha, box=box, shape=(h, w))


def background(image: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """The heat map's background: ``image`` (2-D, any range) scaled to 0-255 by its own minimum
    and maximum, longest side at most 512 px. Small: kept instead of the whole image while the
    rest of a study is read."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    gray = np.zeros_like(img) if hi <= lo else (img - lo) / (hi - lo)
    h, w = gray.shape
    scale = min(1.0, MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return (cv2.resize(gray, size, interpolation=cv2.INTER_AREA) * 255).astype(np.uint8)


def overlay_on(
    gray8: npt.NDArray[np.uint8],
    cam: npt.NDArray[Any],
    *,
    alpha: float = 0.4,
    box: tuple[int, int, int, int] | None = None,
    shape: tuple[int, int] | None = None,
) -> bytes:
    """The PNG of ``cam`` blended over a :func:`background` of an image of ``shape`` (h, w);
    ``box`` is in that image's pixels, as for :func:`overlay_png` (None: the whole image).
    ``shape`` None: ``gray8``'s own. Keeping the box and the shape, not the image, is what lets
    a study's images wait for one batch and still get the heat map of :func:`overlay_png`."""
    h, w = shape if shape is not None else (gray8.shape[0], gray8.shape[1])
    size = (gray8.shape[1], gray8.shape[0])
    heat = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
    peak = float(heat.max())
    heat = heat / peak if peak > 0 else heat
    heat = place(heat, (h, w), size, box)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    base = cv2.cvtColor(gray8, cv2.COLOR_GRAY2BGR)
    weight = (alpha * heat)[..., None]
    out = (base * (1 - weight) + colour * weight).astype(np.uint8)
    # Fast compression: the overlay is made per request; size matters less than latency.
    ok, buf = cv2.imencode(".png", out, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return bytes(buf.tobytes())


def place(
    heat: npt.NDArray[Any],
    shape: tuple[int, int],
    size: tuple[int, int],
    box: tuple[int, int, int, int] | None,
) -> npt.NDArray[np.float32]:
    """``heat`` (the model input's grid) resized into ``box`` of an image of ``shape`` (h, w),
    on an output of ``size`` (w, h); zero outside the box."""
    if box is None:
        return np.asarray(cv2.resize(heat, size, interpolation=cv2.INTER_CUBIC).clip(0, 1))
    h, w = shape
    y0, y1, x0, x1 = box
    ow, oh = size
    top, left = min(round(y0 * oh / h), oh - 1), min(round(x0 * ow / w), ow - 1)
    bottom = min(oh, max(top + 1, round(y1 * oh / h)))
    right = min(ow, max(left + 1, round(x1 * ow / w)))
    out = np.zeros((oh, ow), dtype=np.float32)
    inner = cv2.resize(heat, (right - left, bottom - top), interpolation=cv2.INTER_CUBIC)
    out[top:bottom, left:right] = inner.clip(0, 1)
    return out
