"""Hostile files built by hand, small on disk and huge once decoded: a PNG whose header
declares width x height pixels of zeros, a JPEG header that declares a huge frame, and DICOM
instances that are deflated or declare more pixels than a limit."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from tests import dicom_files as files


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_zeros(width: int, height: int) -> bytes:
    """An 8-bit greyscale PNG of ``width`` x ``height`` zeros, compressed row block by row
    block (30000 x 30000 comes to about 1 MB without ever holding the 900 MB of pixels)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    rows = max(1, (4 << 20) // (width + 1))  # about 4 MB of filtered rows at a time
    block = bytes((width + 1) * rows)  # filter byte 0 and zero pixels, per row
    parts = []
    for start in range(0, height, rows):
        n = min(rows, height - start)
        parts.append(compressor.compress(block if n == rows else block[: (width + 1) * n]))
    parts.append(compressor.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )


def jpeg_header(width: int, height: int) -> bytes:
    """The start of a baseline JPEG whose frame header declares ``width`` x ``height`` (one
    component); no scan follows, since nothing may get as far as decoding it."""
    sof = struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0])
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def dicom_instance(
    dst: Path, *, rows: int, columns: int, deflated: bool = False, padding: int = 0
) -> Path:
    """A MONOCHROME2 8-bit chest SC instance of zeros with new UIDs, optionally deflated and
    with ``padding`` bytes of zeros in a private element (they inflate, the pixels do not
    grow)."""
    ds = dcmread(files.CHEST_SC)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = np.zeros((rows, columns), np.uint8).tobytes()
    if padding:
        block = ds.private_block(0x0099, "cxr-gateway tests", create=True)
        block.add_new(0x01, "OB", bytes(padding))
    syntax = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = syntax
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst
