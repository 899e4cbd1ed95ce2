"""DICOM dataset -> 2-D float32 image in [0, 1] as a radiologist would see it.

Decodes any transfer syntax pydicom can (with pylibjpeg: JPEG baseline/lossless, JPEG-LS,
JPEG 2000, RLE), applies the Modality LUT (rescale slope/intercept or a LUT sequence), the first
VOI window (LINEAR, LINEAR_EXACT or SIGMOID, in float32 because pydicom's ``apply_voi_lut``
works in float64 and is several times slower on large CRs) or a VOI LUT sequence, and inverts
MONOCHROME1 so that bone is always bright. Only the first frame of a multi-frame image is used;
the frame count is reported so that callers can decline it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

FloatImage = npt.NDArray[np.float32]


class PixelDecodeError(ValueError):
    """The dataset has no usable pixel data (missing, undecodable or not an image)."""


@dataclass(frozen=True)
class DicomPixels:
    image: FloatImage  # 2-D, float32, [0, 1], high = dense (bone bright)
    n_frames: int
    photometric: str
    windowed: str  # "window", "voi-lut" or "min-max": how the display range was chosen
    colour: str | None = None  # why a colour image is not a radiograph (input_check)


def _first(value: Any) -> float:
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def _window(x: FloatImage, center: float, width: float, function: str) -> FloatImage:
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / max(width, 1e-6)))
        return np.asarray(out, dtype=np.float32)
    if function == "LINEAR_EXACT":
        lo, hi = center - width / 2.0, center + width / 2.0
    else:  # LINEAR, PS3.3 C.11.2.1.2.1
        width = max(width, 1.0)
        lo = center - 0.5 - (width - 1.0) / 2.0
        hi = center - 0.5 + (width - 1.0) / 2.0
    if hi <= lo:
        hi = lo + 1.0
    out = (x - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _min_max(x: FloatImage) -> FloatImage:
    # Full range, like a viewer with no window; preprocessing equalises the histogram anyway.
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    out = (x - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return out.astype(np.float32, copy=False)


def dicom_to_image(ds: Any) -> DicomPixels:
    """Decode ``ds`` (a pydicom Dataset) to a display-ready 2-D float32 image in [0, 1].

    Raises PixelDecodeError when there is no pixel data or it cannot be decoded.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise PixelDecodeError("dataset has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for unsupported or broken data
        raise PixelDecodeError(f"cannot decode pixel data: {exc}") from exc
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if n_frames > 1:
        arr = arr[0]
    colour = None
    if samples > 1:
        if photometric.startswith("YBR"):
            from pydicom.pixels.processing import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        from inference.input_check import colour_decline_reason

        colour = colour_decline_reason(arr)
        x = np.asarray(arr, dtype=np.float32).mean(axis=-1)
    else:
        x = np.asarray(arr, dtype=np.float32)
    if x.ndim != 2:
        raise PixelDecodeError(f"unexpected pixel array shape {np.shape(arr)}")

    windowed = "min-max"
    if samples == 1:
        if "ModalityLUTSequence" in ds:
            from pydicom.pixels.processing import apply_modality_lut

            x = np.asarray(apply_modality_lut(np.asarray(arr), ds), dtype=np.float32)
        else:
            slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
            intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
            if slope != 1.0 or intercept != 0.0:
                x = x * np.float32(slope) + np.float32(intercept)
        center = getattr(ds, "WindowCenter", None)
        width = getattr(ds, "WindowWidth", None)
        if center is not None and width is not None and _first(width) > 0:
            function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
            x = _window(x, _first(center), _first(width), function)
            windowed = "window"
        elif "VOILUTSequence" in ds:
            from pydicom.pixels.processing import apply_voi_lut

            x = _min_max(np.asarray(apply_voi_lut(x, ds), dtype=np.float32))
            windowed = "voi-lut"
        else:
            x = _min_max(x)
    else:
        x = _min_max(x)
    if photometric == "MONOCHROME1":
        x = 1.0 - x
    return DicomPixels(
        np.ascontiguousarray(x, dtype=np.float32), n_frames, photometric, windowed, colour
    )


def is_dicom_file(path: Path) -> bool:
    """True if the file has the DICOM Part 10 preamble marker ``DICM`` at offset 128."""
    with path.open("rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


# Gray decode for JPEG/PNG, keeping 16-bit PNGs at 16 bits. Training reads its JPEGs with the
# same flags, so a served JPEG is bit-identical to a training one (libjpeg decodes luminance).
_IMREAD_FLAGS = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH


def decode_image_bytes(data: bytes) -> FloatImage:
    """Decode an uploaded PNG/JPEG (or DICOM Part 10) file's bytes to a 2-D float32 image.

    Raises PixelDecodeError when the bytes are not a readable image.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        import io

        import pydicom

        return dicom_to_image(pydicom.dcmread(io.BytesIO(data))).image
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _IMREAD_FLAGS)
    if img is None:
        raise PixelDecodeError("cannot decode the file as PNG/JPEG/DICOM")
    return np.asarray(img, dtype=np.float32)


def read_image_file(path: Path) -> tuple[FloatImage, Any]:
    """Read a DICOM, PNG or JPEG file. Returns (2-D float32 image, dataset or None).

    Raises PixelDecodeError when the file cannot be read as an image.
    """
    import pydicom

    if is_dicom_file(path):
        ds = pydicom.dcmread(path)
        return dicom_to_image(ds).image, ds
    data = cv2.imread(str(path), _IMREAD_FLAGS)
    if data is None:
        # Part 10 files without a preamble still parse with force=True.
        try:
            ds = pydicom.dcmread(path, force=True)
            return dicom_to_image(ds).image, ds
        except Exception as exc:
            raise PixelDecodeError(f"cannot read {path.name} as an image") from exc
    return np.asarray(data, dtype=np.float32), None
