"""The size a compressed frame says it has, read from its own header before it is decoded.

A DICOM header's Rows and Columns are what ``bounded_read.check_pixel_count`` bounds, but a
JPEG, JPEG-LS or JPEG 2000 frame carries its own dimensions, and the decoders allocate for
those: a 3 MB file whose header says 256 x 256 can hold a 16000 x 16000 JPEG of zeros and cost
more than a gigabyte to decode before pydicom notices that the sizes differ. ``check_frames``
reads each frame's own size (JPEG and JPEG-LS: the SOF segment; JPEG 2000: the SIZ segment,
also inside a JP2 file) and refuses a frame whose size is not the header's, or cannot be read,
before any decoder runs. Standard library only; it reads headers, never pixels.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from inference.bounded_read import jpeg_dimensions

_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian
_SEQUENCE_END = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD)
_JPEG_SOI = b"\xff\xd8"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
# How far into a JP2 file its codestream (and its SIZ) may start: the boxes before it are small.
_JP2_SEARCH_BYTES = 1 << 16
# How much of a frame is read for its header: a JPEG's SOF follows its APP segments (at most
# 64 KB each); one that comes later is refused as unreadable.
_HEADER_BYTES = 1 << 20

# The encapsulated transfer syntaxes whose frames are checked here. RLE Lossless is not: its
# decoder stops at the header's size (a 256 x 256 frame whose runs expand to 300 MB decoded
# with a peak of 87 MB for the whole process).
CHECKED_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.202",  # High-Throughput JPEG 2000 RPCL Lossless
        "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000
    }
)


class FrameSizeError(ValueError):
    """A compressed frame whose own size differs from the header's, or cannot be read."""


def check_frames(
    pixel_data: bytes | memoryview, transfer_syntax: str, rows: int, columns: int
) -> None:
    """Raise FrameSizeError unless every frame of the encapsulated ``pixel_data`` says it is
    ``rows`` x ``columns``. A fragment that starts a frame (a JPEG SOI, a JPEG 2000 codestream
    or JP2 file) is read; a fragment that continues one is skipped. Other syntaxes: nothing
    to check."""
    if transfer_syntax not in CHECKED_SYNTAXES:
        return
    frames = 0
    for fragment in _fragments(memoryview(pixel_data)):
        size = frame_size(bytes(fragment[:_HEADER_BYTES]))
        if size is None:
            if frames == 0:
                raise FrameSizeError("the first compressed fragment does not start a frame")
            continue  # the rest of a frame split across fragments
        frames += 1
        if size != (rows, columns):
            raise FrameSizeError(
                f"a compressed frame is {size[0]} x {size[1]}, the header says {rows} x {columns}"
            )
    if frames == 0:
        raise FrameSizeError("no compressed frame found")


def frame_size(fragment: bytes) -> tuple[int, int] | None:
    """(rows, columns) from the header of the frame ``fragment`` starts, or None when it does
    not start with a JPEG, JPEG-LS or JPEG 2000 frame. FrameSizeError when it starts one whose
    size cannot be read."""
    if fragment.startswith(_JPEG_SOI):
        try:
            columns, rows = jpeg_dimensions(fragment)
        except (ValueError, struct.error) as exc:
            raise FrameSizeError(f"a JPEG frame whose size cannot be read ({exc})") from exc
        if rows == 0:  # the number of lines given later by a DNL marker: refused
            raise FrameSizeError("a JPEG frame that does not state its number of lines")
        return rows, columns
    if fragment.startswith(_J2K_SOC_SIZ):
        return _siz_size(fragment, 4)
    if fragment.startswith(_JP2_SIGNATURE):
        at = fragment.find(_J2K_SOC_SIZ, 0, _JP2_SEARCH_BYTES)
        if at < 0:
            raise FrameSizeError("a JP2 frame without a readable codestream header")
        return _siz_size(fragment, at + 4)
    return None


def _fragments(pixel_data: memoryview) -> Iterator[memoryview]:
    """The items of encapsulated Pixel Data after the Basic Offset Table (PS3.5 A.4)."""
    position, first = 0, True
    while position + 8 <= len(pixel_data):
        tag = bytes(pixel_data[position : position + 4])
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM:
            raise FrameSizeError("encapsulated Pixel Data is not a sequence of items")
        (length,) = struct.unpack_from("<I", pixel_data, position + 4)
        start = position + 8
        if length == 0xFFFFFFFF or start + length > len(pixel_data):
            raise FrameSizeError("an encapsulated item runs past the end of Pixel Data")
        if not first:
            yield pixel_data[start : start + length]
        position, first = start + length, False


def _siz_size(data: bytes, at: int) -> tuple[int, int]:
    """Image size from a JPEG 2000 SIZ segment starting at ``at`` (after its marker; ITU-T
    T.800 A.5.1): Xsiz - XOsiz columns, Ysiz - YOsiz rows."""
    if at + 20 > len(data):
        raise FrameSizeError("a JPEG 2000 frame whose size cannot be read")
    x_siz, y_siz, x_offset, y_offset = struct.unpack_from(">IIII", data, at + 4)
    if x_offset >= x_siz or y_offset >= y_siz:
        raise FrameSizeError("a JPEG 2000 frame with an empty image area")
    return y_siz - y_offset, x_siz - x_offset
