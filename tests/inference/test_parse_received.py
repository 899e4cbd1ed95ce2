"""The listener's parse (issue #20): every element but Pixel Data decoded as parse_dataset
decodes it, Pixel Data located by its header without being copied, in every encoding the
listener accepts; cut-short and malformed pixel data found by length."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from inference.bounded_read import InputTooLarge, parse_dataset, parse_received
from tests import dicom_files as files

LIMIT = 64 << 20


def _encoded(ds: Dataset, syntax: UID) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = syntax.is_little_endian
    fp.is_implicit_VR = syntax.is_implicit_VR
    write_dataset(fp, ds)
    return fp.getvalue()


def _dataset_bytes(path: Path) -> tuple[bytes, UID]:
    ds = dcmread(path)
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    data = path.read_bytes()
    meta_end = 132 + 12 + struct.unpack_from("<I", data, 140)[0]
    return data[meta_end:], syntax


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_native_pixel_data_is_located_not_copied(syntax: UID) -> None:
    ds = dcmread(files.CHEST_CR)
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 8)  # Data Set Trailing Padding after Pixel Data
    body = _encoded(ds, syntax)
    parsed, pixels = parse_received(memoryview(body), str(syntax), max_bytes=LIMIT)
    full = parse_dataset(body, str(syntax), max_bytes=LIMIT)
    assert pixels is not None and not pixels.encapsulated
    assert body[pixels.offset : pixels.offset + pixels.length] == full.PixelData
    assert pixels.length == pixels.declared_length == len(full.PixelData)
    assert parsed["PixelData"].value == b""  # a placeholder: the bytes stay in ``body``
    assert [e.tag for e in parsed] == [e.tag for e in full]
    for element in full:
        if element.keyword != "PixelData":
            assert parsed[element.tag].value == element.value


def test_big_endian_and_encapsulated_pixel_data(tmp_path: Path) -> None:
    ds = dcmread(files.CHEST_CR)
    body = _encoded(ds, UID(ExplicitVRBigEndian))
    parsed, pixels = parse_received(body, str(ExplicitVRBigEndian), max_bytes=LIMIT)
    assert pixels is not None and pixels.length == len(ds.PixelData)
    assert parsed.PatientName == ds.PatientName

    rle = files.encode_variant(files.CHEST_CR, tmp_path / "rle.dcm", "rle")
    body, syntax = _dataset_bytes(rle)
    parsed, pixels = parse_received(body, str(syntax), max_bytes=LIMIT)
    full = parse_dataset(body, str(syntax), max_bytes=LIMIT)
    assert pixels is not None and pixels.encapsulated
    assert pixels.fragments == 2  # the Basic Offset Table and one frame
    assert body[pixels.offset : pixels.offset + pixels.length] == full.PixelData
    assert parsed["PixelData"].is_undefined_length


def test_deflated_is_inflated_bounded(tmp_path: Path) -> None:
    deflated = files.encode_variant(files.CHEST_CR, tmp_path / "d.dcm", "deflated")
    body, syntax = _dataset_bytes(deflated)
    _, pixels = parse_received(body, str(syntax), max_bytes=LIMIT)
    assert pixels is not None and pixels.length == len(dcmread(files.CHEST_CR).PixelData)
    with pytest.raises(InputTooLarge):
        parse_received(body, str(syntax), max_bytes=pixels.length // 2)


def test_cut_short_and_malformed_pixel_data(tmp_path: Path) -> None:
    body = _encoded(dcmread(files.CHEST_CR), UID(ExplicitVRLittleEndian))
    _, whole = parse_received(body, str(ExplicitVRLittleEndian), max_bytes=LIMIT)
    assert whole is not None
    cut = body[: whole.offset + whole.length - 1000]  # inside Pixel Data
    _, pixels = parse_received(cut, str(ExplicitVRLittleEndian), max_bytes=LIMIT)
    assert pixels is not None and pixels.length == pixels.declared_length - 1000

    rle = files.encode_variant(files.CHEST_CR, tmp_path / "rle.dcm", "rle")
    body, syntax = _dataset_bytes(rle)
    _, whole = parse_received(body, str(syntax), max_bytes=LIMIT)
    assert whole is not None
    with pytest.raises(ValueError, match="truncated item"):
        parse_received(body[: whole.offset + whole.length - 20], str(syntax), max_bytes=LIMIT)
    with pytest.raises(ValueError, match="no sequence delimiter"):
        parse_received(body[: whole.offset + whole.length], str(syntax), max_bytes=LIMIT)


def test_implicit_vr_sent_as_explicit_is_parsed_as_what_it_is() -> None:
    """pydicom reads implicit VR bytes announced as explicit VR in their real encoding; the
    Pixel Data header is read in it too, so the listener can answer "transfer syntax
    mismatch" rather than "undecodable"."""
    ds = dcmread(files.CHEST_CR)
    body = _encoded(ds, UID(ImplicitVRLittleEndian))
    parsed, pixels = parse_received(body, str(ExplicitVRLittleEndian), max_bytes=LIMIT)
    assert parsed.original_encoding == (True, True)
    assert pixels is not None and pixels.length == len(ds.PixelData)
