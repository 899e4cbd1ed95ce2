"""Pictures for the study page: a thumbnail of a spooled instance, rendered with inference's
decoder (LUTs, MONOCHROME1), and the stored heat map of an image."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

THUMB_SIZE = 256
UID = re.compile(r"[0-9][0-9.]{0,63}")


def render_thumbnail(
    path: Path, *, max_bytes: int, max_pixels: int, size: int = THUMB_SIZE
) -> bytes:
    """PNG bytes of the instance's first frame, fitted into ``size`` x ``size``. The file is
    read with bounds (its dataset, inflated if deflated, at most ``max_bytes``; its header at
    most ``max_pixels``) before any pixel is decoded. Raises InputTooLarge beyond them,
    PixelDecodeError (or OSError) when the file cannot be decoded."""
    from inference.bounded_read import InputTooLarge, read_dicom_file
    from inference.dicom_pixels import PixelDecodeError, dicom_to_image

    try:
        ds = read_dicom_file(path, max_bytes=max_bytes, max_pixels=max_pixels)
    except (InputTooLarge, OSError):
        raise
    except Exception as exc:  # pydicom raises many kinds of errors on corrupt files
        raise PixelDecodeError(f"cannot read the file: {type(exc).__name__}") from exc
    image = dicom_to_image(ds).image
    if image.ndim == 3:
        image = image[0]
    return png_thumbnail(image, size)


def png_thumbnail(image: np.ndarray, size: int = THUMB_SIZE) -> bytes:
    """Scale a 2-D image to 0-255 and fit it into ``size`` x ``size`` (aspect kept)."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    scale = size / max(img.shape)
    shape = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
    small = cv2.resize(img, shape, interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".png", np.clip(small * 255 + 0.5, 0, 255).astype(np.uint8))
    if not ok:
        raise ValueError("PNG encoding failed")
    return bytes(encoded.tobytes())


def heatmap_file(heatmap_root: Path, study_id: int, sop_instance_uid: str) -> Path | None:
    """The heat map PNG of one image, if the worker kept one. The UID comes from the database
    (never straight from the URL), so it cannot name a file outside the folder."""
    if not UID.fullmatch(sop_instance_uid):  # a crafted "UID" must never name a path
        return None
    path = heatmap_root / str(study_id) / f"{sop_instance_uid}.png"
    return path if path.is_file() else None
