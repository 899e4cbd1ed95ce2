"""Reading DICOM and image files from untrusted sources with every size bounded before decoding.

A deflated dataset of a few MB can inflate to gigabytes, and a PNG of 1 MB can declare 30000 x
30000 pixels: these functions refuse such input from what its header says (or by inflating in
bounded steps) before any large buffer is allocated. Only pydicom and the standard library are
imported, so that the DICOM listener can use them without loading OpenCV or TensorFlow.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

Buffer: TypeAlias = bytes | bytearray | memoryview

DEFAULT_MAX_PIXELS = 50_000_000
_INFLATE_STEP = 1 << 20
_PREAMBLE_END = 132  # 128-byte preamble + "DICM"


class InputTooLarge(ValueError):
    """The input declares or inflates to more than a configured limit. ``reason`` is a short
    machine-readable word for audit records ("too_large", "too_many_pixels")."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ContentChanged(ValueError):
    """A file's content is not the content recorded when it was received."""


def inflate_bounded(data: Buffer, limit: int) -> bytearray:
    """Inflate raw deflate data (PS3.5 A.5: no zlib header) to at most ``limit`` bytes.

    Raises InputTooLarge as soon as the output would pass ``limit`` (never holding more than
    ``limit`` + one step in memory), and ValueError when the stream is corrupt."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending = memoryview(data)
    try:
        while True:
            room = limit + 1 - len(out)
            out += inflater.decompress(pending, min(_INFLATE_STEP, room))
            if len(out) > limit:
                raise InputTooLarge(
                    f"deflated data inflates to more than {limit} bytes", reason="too_large"
                )
            pending = memoryview(inflater.unconsumed_tail)
            # After the end of the stream, what is left is padding (an odd-length dataset
            # gets a byte), which inflating again would never consume.
            if not pending or inflater.eof:
                break
        out += inflater.flush()
    except zlib.error as exc:
        raise ValueError(f"corrupt deflated data: {exc}") from exc
    if len(out) > limit:
        raise InputTooLarge(
            f"deflated data inflates to more than {limit} bytes", reason="too_large"
        )
    return out


def pixel_count(ds: Any) -> int:
    """Rows x Columns x frames x samples as declared by the header (no decoding).

    Raises ValueError when the image pixel module is missing or not numeric."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError("image pixel module incomplete (Rows, Columns)") from exc
    if min(rows, cols, frames, samples) < 1:
        raise ValueError("invalid image dimensions")
    return rows * cols * frames * samples


def check_pixel_count(ds: Any, max_pixels: int) -> None:
    """Raise InputTooLarge when the header declares more than ``max_pixels`` samples."""
    count = pixel_count(ds)
    if count > max_pixels:
        raise InputTooLarge(
            f"image declares {count} pixels (rows x columns x frames x samples), "
            f"limit {max_pixels}",
            reason="too_many_pixels",
        )


def _bounded_encoding(
    data: Buffer, transfer_syntax: str, max_bytes: int
) -> tuple[Buffer, bool, bool]:
    """The dataset's bytes (inflated to at most ``max_bytes`` when deflated; else at most that
    size, or InputTooLarge), and whether they are implicit VR and little endian."""
    syntax = UID(transfer_syntax)
    raw: Buffer = data
    if syntax == DeflatedExplicitVRLittleEndian:
        raw = inflate_bounded(data, max_bytes)
    elif len(memoryview(data)) > max_bytes:
        raise InputTooLarge(
            f"instance is {len(memoryview(data))} bytes, limit {max_bytes}", reason="too_large"
        )
    implicit = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
    little = syntax.is_little_endian if syntax.is_transfer_syntax else True
    return raw, implicit, little


def parse_dataset(data: Buffer, transfer_syntax: str, *, max_bytes: int) -> Dataset:
    """Decode a dataset encoded in ``transfer_syntax`` (no file meta), fully, with bounds.

    Deflated data is inflated to at most ``max_bytes``; other data must be at most that size.
    Every element is parsed here (pydicom otherwise parses lazily, at first access), so a
    corrupt dataset raises now. Raises InputTooLarge, or ValueError (and pydicom's errors,
    which derive from it or from EOFError/KeyError/NotImplementedError) for malformed data."""
    raw, is_implicit, little = _bounded_encoding(data, transfer_syntax, max_bytes)
    ds = read_dataset(io.BytesIO(raw), is_implicit, little)
    ds.walk(lambda _ds, _elem: None)  # converts every raw element: errors surface here
    return ds


MAX_FILE_META_BYTES = 64 * 1024


def read_file_meta(data: Buffer) -> tuple[FileMetaDataset, int]:
    """The file meta information of a DICOM Part 10 file held in memory, and the offset where
    its dataset starts. The meta group is at most MAX_FILE_META_BYTES and must name a
    Transfer Syntax UID. Raises ValueError for anything that is not a Part 10 file."""
    view = memoryview(data)
    if len(view) < _PREAMBLE_END + 12 or bytes(view[128:132]) != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM marker)")
    # File meta: group 0002, explicit VR little endian; its first element is its group length.
    group, element, vr = struct.unpack_from("<HH2s", view, _PREAMBLE_END)
    if (group, element, vr) != (2, 0, b"UL"):
        raise ValueError("file meta information has no group length")
    (meta_length,) = struct.unpack_from("<I", view, _PREAMBLE_END + 8)
    if meta_length > MAX_FILE_META_BYTES:
        raise ValueError(f"file meta information of {meta_length} bytes is implausibly long")
    start = _PREAMBLE_END + 12 + meta_length
    if start > len(view):
        raise ValueError("file meta information is truncated")
    meta = FileMetaDataset(read_dataset(io.BytesIO(view[_PREAMBLE_END:start]), False, True))
    if not str(meta.get("TransferSyntaxUID", "")):
        raise ValueError("file meta information has no Transfer Syntax UID")
    return meta, start


PIXEL_DATA_TAG = 0x7FE00010
_ITEM_TAG = 0xFFFEE000
_SEQUENCE_DELIMITER_TAG = 0xFFFEE0DD
_VR_WITH_32_BIT_LENGTH = {b"OB", b"OW", b"OD", b"OF", b"OL", b"OV", b"UN"}


@dataclass(frozen=True)
class PixelExtent:
    """Where a dataset's Pixel Data value lies in its bytes, read from the element header (and
    the item headers of encapsulated data), never copied. ``length``: the bytes present (fewer
    than declared when the data is cut short; for encapsulated data every item, headers
    included, up to the sequence delimiter); ``fragments``: the items, Basic Offset Table
    included."""

    offset: int
    length: int
    declared_length: int
    encapsulated: bool
    fragments: int = 0


class _ViewReader:
    """The minimal binary file pydicom's ``read_dataset`` needs, over a buffer it never copies
    (``io.BytesIO`` copies a memoryview whole)."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else min(len(self._view), self._pos + size)
        data = bytes(self._view[self._pos : end])
        self._pos = end
        return data

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, len(self._view))[whence]
        self._pos = max(0, base + offset)
        return self._pos


def parse_received(
    data: Buffer, transfer_syntax: str, *, max_bytes: int
) -> tuple[Dataset, PixelExtent | None]:
    """``parse_dataset`` for the listener, which keeps the bytes as received and never decodes
    the pixels: every element is parsed except Pixel Data, whose extent is read from its
    header (``PixelExtent``, or None when there is none). In the returned dataset Pixel Data is
    an empty placeholder with the received VR and length kind, so the dataset answers
    ``"PixelData" in ds`` and ``is_undefined_length``; it must not be written anywhere.
    Nothing of the pixel data is copied, so a 200 MB instance is held once, as received.
    Raises InputTooLarge, or ValueError (and pydicom's errors) for malformed data."""
    raw, implicit, little = _bounded_encoding(data, transfer_syntax, max_bytes)
    view = memoryview(raw).cast("B")
    reader = _ViewReader(view)
    ds = read_dataset(
        reader,  # type: ignore[arg-type]
        implicit,
        little,
        stop_when=lambda tag, _vr, _length: tag == PIXEL_DATA_TAG,
    )
    extent = None
    start = reader.tell()
    # pydicom switches to the encoding the data really has (implicit VR sent as explicit):
    # read on in that one, so that the caller can report the mismatch.
    found_implicit, found_little = ds.original_encoding
    implicit = implicit if found_implicit is None else found_implicit
    little = little if found_little is None else found_little
    if start < len(view):
        vr, extent = _pixel_extent(view, start, implicit=implicit, little=little)
        end = extent.offset + extent.length + (8 if extent.encapsulated else 0)
        if end < len(view):  # elements after Pixel Data (padding, signatures)
            ds.update(read_dataset(_ViewReader(view[end:]), implicit, little))  # type: ignore[arg-type]
        ds.add_new(PIXEL_DATA_TAG, vr, b"")
        ds["PixelData"].is_undefined_length = extent.encapsulated
    ds.walk(lambda _ds, _elem: None)  # converts every raw element: errors surface here
    return ds, extent


def _pixel_extent(
    view: memoryview, start: int, *, implicit: bool, little: bool
) -> tuple[str, PixelExtent]:
    order = "<" if little else ">"
    if implicit:
        if start + 8 > len(view):
            raise ValueError("Pixel Data element header is truncated")
        (length,) = struct.unpack_from(order + "I", view, start + 4)
        vr, offset = "OW", start + 8
    else:
        if start + 12 > len(view):
            raise ValueError("Pixel Data element header is truncated")
        raw_vr = bytes(view[start + 4 : start + 6])
        if raw_vr not in _VR_WITH_32_BIT_LENGTH:
            raise ValueError(f"Pixel Data has VR {raw_vr!r}")
        (length,) = struct.unpack_from(order + "I", view, start + 8)
        vr, offset = raw_vr.decode(), start + 12
    if length != 0xFFFFFFFF:
        present = min(length, len(view) - offset)
        return vr, PixelExtent(offset, present, length, encapsulated=False)
    return vr, _encapsulated_extent(view, offset)


def _encapsulated_extent(view: memoryview, offset: int) -> PixelExtent:
    """Walk the items of encapsulated Pixel Data (always little endian, PS3.5 A.4) by their
    headers up to the sequence delimiter; ValueError when they do not fit the data."""
    pos, fragments = offset, 0
    while True:
        if pos + 8 > len(view):
            raise ValueError("encapsulated Pixel Data has no sequence delimiter")
        group, element, length = struct.unpack_from("<HHI", view, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER_TAG:
            return PixelExtent(
                offset, pos - offset, 0xFFFFFFFF, encapsulated=True, fragments=fragments
            )
        if tag != _ITEM_TAG or length == 0xFFFFFFFF or pos + 8 + length > len(view):
            raise ValueError("encapsulated Pixel Data has a malformed or truncated item")
        pos += 8 + length
        fragments += 1


def read_dicom_bytes(
    data: Buffer,
    *,
    max_bytes: int,
    max_pixels: int,
    expected_sha256: str | None = None,
) -> FileDataset:
    """Read a DICOM Part 10 file held in memory, bounded: the dataset (inflated if deflated)
    must be at most ``max_bytes`` and declare at most ``max_pixels``; with ``expected_sha256``
    the bytes must hash to it (ContentChanged otherwise). Raises InputTooLarge, ContentChanged
    or ValueError for a file that is not readable DICOM."""
    view = memoryview(data)
    if expected_sha256 is not None and hashlib.sha256(view).hexdigest() != expected_sha256:
        raise ContentChanged("the file's SHA-256 differs from the one recorded at receipt")
    meta, start = read_file_meta(view)
    syntax = str(meta.TransferSyntaxUID)
    dataset = parse_dataset(view[start:], syntax, max_bytes=max_bytes)
    if "PixelData" in dataset:
        check_pixel_count(dataset, max_pixels)
    syntax_uid = UID(syntax)
    ds = FileDataset(
        "",
        dataset,
        preamble=bytes(view[:128]),
        file_meta=meta,
        is_implicit_VR=syntax_uid.is_implicit_VR if syntax_uid.is_transfer_syntax else False,
        is_little_endian=syntax_uid.is_little_endian if syntax_uid.is_transfer_syntax else True,
    )
    return ds


def read_dicom_file(
    path: Path,
    *,
    max_bytes: int,
    max_pixels: int,
    expected_sha256: str | None = None,
) -> FileDataset:
    """``read_dicom_bytes`` on a file, read once (the bytes hashed are the bytes parsed). A file
    larger than ``max_bytes`` plus 1 MB of header is refused before it is read."""
    size = path.stat().st_size
    if size > max_bytes + _INFLATE_STEP:
        raise InputTooLarge(f"file is {size} bytes, limit {max_bytes}", reason="too_large")
    return read_dicom_bytes(
        path.read_bytes(),
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        expected_sha256=expected_sha256,
    )


def image_file_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) declared by a PNG or JPEG header, or None if ``data`` is neither.

    Raises ValueError for a PNG/JPEG whose header is truncated or has no frame header."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ValueError("PNG without an IHDR header")
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data[:2] == b"\xff\xd8":
        return jpeg_dimensions(data)
    return None


# Start-of-frame markers (baseline, extended, progressive, lossless, the arithmetic ones, and
# JPEG-LS's SOF55).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def jpeg_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG or JPEG-LS frame header (SOF); ValueError when there is
    none before the scan. Also reads the frames in DICOM Pixel Data (inference.codestream)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError("corrupt JPEG marker stream")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(width), int(height)
        if marker == 0xDA or length < 2:  # scan data before any frame header
            break
        pos += 2 + length
    raise ValueError("JPEG without a frame header")


def check_image_file(data: bytes, max_pixels: int) -> None:
    """Refuse a PNG/JPEG whose header declares more than ``max_pixels`` (InputTooLarge), or a
    file that is neither PNG nor JPEG (ValueError), before OpenCV decodes anything."""
    dims = image_file_dimensions(data)
    if dims is None:
        raise ValueError("not a PNG or JPEG file")
    width, height = dims
    if width * height > max_pixels:
        raise InputTooLarge(
            f"image declares {width} x {height} pixels, limit {max_pixels}",
            reason="too_many_pixels",
        )
