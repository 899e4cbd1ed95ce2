"""A compressed frame's own size is read before decoding, and must be the header's
(inference/codestream.py): a JPEG that says it is far larger than Rows x Columns is refused
before any decoder allocates for it."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from inference.codestream import FrameSizeError, check_frames, frame_size
from inference.dicom_pixels import PixelDecodeError, dicom_to_image
from tests import dicom_files as files

ROOT = Path(__file__).resolve().parents[2]


def jpeg_of_zeros(rows: int, columns: int) -> bytes:
    ok, data = cv2.imencode(".jpg", np.zeros((rows, columns), np.uint8))
    assert ok
    return bytes(data.tobytes())


def jpeg_dicom(path: Path, frame: bytes, rows: int, columns: int) -> Path:
    """A child's chest CR header (age 3, AP) over an 8-bit JPEG Baseline frame."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.PatientAge, ds.BodyPartExamined, ds.ViewPosition = "CR", "003Y", "CHEST", "AP"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def siz(columns: int, rows: int, x_offset: int = 0, y_offset: int = 0) -> bytes:
    """A JPEG 2000 codestream's SOC and SIZ segment (one component), enough for its size."""
    body = struct.pack(">HIIIIIIIIH", 0, columns, rows, x_offset, y_offset, 64, 64, 0, 0, 1)
    return b"\xff\x4f\xff\x51" + struct.pack(">H", len(body) + 2) + body + b"\x07\x01\x01"


def test_frame_sizes_of_each_kind() -> None:
    assert frame_size(jpeg_of_zeros(30, 70)) == (30, 70)
    assert frame_size(siz(70, 30)) == (30, 70)
    assert frame_size(siz(110, 50, x_offset=40, y_offset=20)) == (30, 70)
    jp2 = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00\x00\x00\x14ftypjp2 " + b"\0" * 12 + siz(70, 30)
    assert frame_size(jp2) == (30, 70)
    # JPEG-LS: SOI, then SOF55 (FFF7) with 8-bit precision, 30 lines, 70 samples per line.
    jpeg_ls = b"\xff\xd8\xff\xf7" + struct.pack(">HBHHB", 11, 8, 30, 70, 1) + b"\x01\x11\x00"
    assert frame_size(jpeg_ls) == (30, 70)
    assert frame_size(b"\x12\x34 the rest of a frame") is None
    with pytest.raises(FrameSizeError):
        frame_size(b"\xff\xd8\xff\xe0\x00\x10JFIF")  # cut before its SOF
    with pytest.raises(FrameSizeError):
        frame_size(b"\xff\xd8\xff\xc0" + struct.pack(">HBHHB", 11, 8, 0, 70, 1))  # DNL lines


@pytest.mark.parametrize("syntax", ["jpeg-baseline", "jpeg-lossless", "jpeg-ls"])
def test_real_encoders_frames_match_their_headers(syntax: str, tmp_path: Path) -> None:
    """DCMTK's JPEG and JPEG-LS encoders (what a PACS stores) and pydicom's JPEG 2000."""
    if not files.have_dcmtk_codecs():
        pytest.fail("DCMTK's dcmcjpeg and dcmcjpls are needed (scripts/install-peers.sh)")
    source = files.eight_bit(files.CHILD_CR, tmp_path / "8bit.dcm")
    for name in (syntax, "jpeg2000-lossless"):
        ds = dcmread(files.encode_variant(source, tmp_path / f"{name}.dcm", name))
        check_frames(ds.PixelData, ds.file_meta.TransferSyntaxUID, ds.Rows, ds.Columns)
        assert dicom_to_image(ds).image.shape == (ds.Rows, ds.Columns)


def test_a_frame_larger_than_its_header_is_refused(tmp_path: Path) -> None:
    path = jpeg_dicom(tmp_path / "liar.dcm", jpeg_of_zeros(600, 500), 256, 256)
    with pytest.raises(PixelDecodeError, match="a compressed frame is 600 x 500, the header"):
        dicom_to_image(dcmread(path))
    honest = jpeg_dicom(tmp_path / "honest.dcm", jpeg_of_zeros(256, 256), 256, 256)
    assert dicom_to_image(dcmread(honest)).image.shape == (256, 256)
    second = encapsulate([jpeg_of_zeros(256, 256), jpeg_of_zeros(4000, 256)])
    with pytest.raises(FrameSizeError, match="4000 x 256"):
        check_frames(second, JPEGBaseline8Bit, 256, 256)


def test_a_jpeg_bomb_is_refused_by_a_memory_capped_process(tmp_path: Path) -> None:
    """A 3 MB file whose header says 256 x 256 over a 16000 x 16000 JPEG of zeros: decoding
    it would take more than a gigabyte. In a process whose data segment may grow by at most
    256 MB, decoding is refused with the sizes; nothing fails for lack of memory."""
    bomb = jpeg_dicom(tmp_path / "bomb.dcm", jpeg_of_zeros(16000, 16000), 256, 256)
    assert bomb.stat().st_size < 4 * 2**20
    script = f"""
import resource, sys
from pydicom import dcmread
from inference.dicom_pixels import PixelDecodeError, dicom_to_image
ds = dcmread({str(bomb)!r})
data_kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmData")).split()[1])
cap = data_kb * 1024 + 256 * 2**20
resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
try:
    dicom_to_image(ds)
except PixelDecodeError as exc:
    print("refused:", exc)
    sys.exit(0)
print("decoded")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: cannot decode pixel data: a compressed frame is 16000 x 16000" in done.stdout
