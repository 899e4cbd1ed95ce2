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

from inference.bounded_read import (
    DEFAULT_MAX_PIXELS,
    InputTooLarge,
    check_image_file,
    check_pixel_count,
    read_dicom_bytes,
)
from inference.codestream import CHECKED_SYNTAXES, FrameSizeError, check_frames

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
    arr = _pixel_array(ds)
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if n_frames > 1:
        arr = arr[0]
    colour = None
    if samples > 1:
        arr, x, colour = _colour_to_gray(arr, photometric)
    else:
        x = np.asarray(arr, dtype=np.float32)
    if x.ndim != 2:
        raise PixelDecodeError(f"unexpected pixel array shape {np.shape(arr)}")

    windowed = "min-max"
    if samples == 1:
        x = _modality_values(ds, arr, x)
        x, windowed = _voi(ds, x)
    else:
        x = _min_max(x)
    if photometric == "MONOCHROME1":
        x = 1.0 - x
    return DicomPixels(
        np.ascontiguousarray(x, dtype=np.float32), n_frames, photometric, windowed, colour
    )


def _pixel_array(ds: Any) -> npt.NDArray[Any]:
    """The stored pixels of ``ds``; PixelDecodeError when absent or undecodable."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise PixelDecodeError("dataset has no pixel data")
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if syntax in CHECKED_SYNTAXES and "PixelData" in ds:
        try:  # before any decoder allocates for the size a frame claims
            check_frames(ds.PixelData, syntax, int(ds.Rows), int(ds.Columns))
        except (FrameSizeError, AttributeError, TypeError, ValueError) as exc:
            raise PixelDecodeError(f"cannot decode pixel data: {exc}") from exc
    try:
        arr: npt.NDArray[Any] = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for unsupported or broken data
        raise PixelDecodeError(f"cannot decode pixel data: {exc}") from exc
    return arr


def _colour_to_gray(
    arr: npt.NDArray[Any], photometric: str
) -> tuple[npt.NDArray[Any], FloatImage, str | None]:
    """(RGB pixels, their channel mean, colour decline reason or None) of a colour frame."""
    if photometric.startswith("YBR"):
        from pydicom.pixels.processing import convert_color_space

        arr = convert_color_space(arr, photometric, "RGB")
    from inference.input_check import colour_decline_reason

    colour = colour_decline_reason(arr)
    return arr, np.asarray(arr, dtype=np.float32).mean(axis=-1), colour


def _modality_values(ds: Any, arr: npt.NDArray[Any], x: FloatImage) -> FloatImage:
    """The modality LUT or rescale slope/intercept applied to a grayscale frame."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels.processing import apply_modality_lut

        return np.asarray(apply_modality_lut(np.asarray(arr), ds), dtype=np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    if slope != 1.0 or intercept != 0.0:
        x = x * np.float32(slope) + np.float32(intercept)
    return x


def _voi(ds: Any, x: FloatImage) -> tuple[FloatImage, str]:
    """(image in [0, 1], how: "window", "voi-lut" or "min-max") of a grayscale frame."""
    center = getattr(ds, "WindowCenter", None)
    width = getattr(ds, "WindowWidth", None)
    if center is not None and width is not None and _first(width) > 0:
        function = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
        return _window(x, _first(center), _first(width), function), "window"
    if "VOILUTSequence" in ds:
        from pydicom.pixels.processing import apply_voi_lut

        return _min_max(np.asarray(apply_voi_lut(x, ds), dtype=np.float32)), "voi-lut"
    return _min_max(x), "min-max"


def is_dicom_file(path: Path) -> bool:
    """True if the file has the DICOM Part 10 preamble marker ``DICM`` at offset 128."""
    with path.open("rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


# Gray decode for JPEG/PNG, keeping 16-bit PNGs at 16 bits. Training reads its JPEGs with the
# same flags, so a served JPEG is bit-identical to a training one (libjpeg decodes luminance).
_IMREAD_FLAGS = cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH
# The dataset size accepted by default (inflated, if deflated): CXR_MAX_INSTANCE_MB's default.
DEFAULT_MAX_BYTES = 256 * 2**20


class ImageTooLarge(InputTooLarge, PixelDecodeError):
    """The header declares more pixels (or the dataset holds more bytes) than allowed; raised
    before anything is decoded. An InputTooLarge (with its ``reason``) and a PixelDecodeError,
    so that callers that skip undecodable files skip these too."""


def _bounded_dicom(data: bytes, *, max_bytes: int, max_pixels: int) -> Any:
    """``read_dicom_bytes`` with its errors as ImageTooLarge or PixelDecodeError."""
    try:
        return read_dicom_bytes(data, max_bytes=max_bytes, max_pixels=max_pixels)
    except InputTooLarge as exc:
        raise ImageTooLarge(str(exc), reason=exc.reason) from exc
    except Exception as exc:  # pydicom raises many kinds of errors on corrupt files
        raise PixelDecodeError(f"cannot read the DICOM file: {exc}") from exc


def _decode_png_jpeg(data: bytes, max_pixels: int) -> FloatImage:
    """Decode PNG/JPEG bytes (nothing else) once their header is within ``max_pixels``."""
    try:
        check_image_file(data, max_pixels)
    except InputTooLarge as exc:
        raise ImageTooLarge(str(exc), reason=exc.reason) from exc
    except ValueError as exc:  # neither PNG nor JPEG: OpenCV's other decoders are not exposed
        raise PixelDecodeError(f"cannot decode the file as PNG/JPEG/DICOM: {exc}") from exc
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _IMREAD_FLAGS)
    if img is None:
        raise PixelDecodeError("cannot decode the file as PNG/JPEG/DICOM")
    return np.asarray(img, dtype=np.float32)


def decode_image_bytes(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
) -> FloatImage:
    """Decode an uploaded PNG/JPEG (or DICOM Part 10) file's bytes to a 2-D float32 image.

    The header must declare at most ``max_pixels`` (a DICOM dataset also at most ``max_bytes``,
    inflated); this is checked before anything is decoded. Raises ImageTooLarge beyond those
    limits, PixelDecodeError when the bytes are not a readable PNG, JPEG or DICOM image.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        ds = _bounded_dicom(data, max_bytes=max_bytes, max_pixels=max_pixels)
        return dicom_to_image(ds).image
    return _decode_png_jpeg(data, max_pixels)


def read_image_file(
    path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[FloatImage, Any]:
    """Read a DICOM, PNG or JPEG file. Returns (2-D float32 image, dataset or None).

    Bounded like :func:`decode_image_bytes` (a file larger than ``max_bytes`` + 1 MB is not
    read). Raises ImageTooLarge beyond the limits, PixelDecodeError when the file cannot be read
    as an image.
    """
    size = path.stat().st_size
    if size > max_bytes + 2**20:
        raise ImageTooLarge(f"file is {size} bytes, limit {max_bytes}", reason="too_large")
    data = path.read_bytes()
    if len(data) >= 132 and data[128:132] == b"DICM":
        ds = _bounded_dicom(data, max_bytes=max_bytes, max_pixels=max_pixels)
        return dicom_to_image(ds).image, ds
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:2] == b"\xff\xd8":
        return _decode_png_jpeg(data, max_pixels), None
    ds = _dicom_without_preamble(data, max_bytes=max_bytes, max_pixels=max_pixels)
    return dicom_to_image(ds).image, ds


def _dicom_without_preamble(data: bytes, *, max_bytes: int, max_pixels: int) -> Any:
    """A Part 10 file written without its 128-byte preamble and "DICM" (or a bare dataset),
    read with the same bounds."""
    if data[:2] == b"\x02\x00":  # starts with file meta: may declare a deflated dataset
        fake = bytes(128) + b"DICM" + data
        return _bounded_dicom(fake, max_bytes=max_bytes, max_pixels=max_pixels)
    # No file meta, so no deflate: the dataset is at most the file (checked by the caller).
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if "PixelData" in ds:
            check_pixel_count(ds, max_pixels)
    except InputTooLarge as exc:
        raise ImageTooLarge(str(exc), reason=exc.reason) from exc
    except Exception as exc:  # as above
        raise PixelDecodeError(f"cannot read the file as an image: {exc}") from exc
    return ds
