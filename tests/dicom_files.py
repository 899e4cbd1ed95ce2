"""Test inputs made at test time from the small real fixtures in tests/fixtures/dicom:
transfer-syntax variants (encoded by DCMTK and pydicom), new UIDs, and broken files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "dicom"
CHEST_CR = FIXTURES / "rg1_cr_small.dcm"  # CR chest PA, MONOCHROME1, 16-bit
CHEST_SC = FIXTURES / "nih_sc_small.dcm"  # NIH chest as Secondary Capture, 8-bit
# A film of the kind the model is for (a 3-year-old's chest AP): tests that need a finding use
# it; the adult CHEST_CR gets "no result" for its age (born 1940).
CHILD_CR = FIXTURES / "kermany_child_cr.dcm"


def ct_image() -> Path:
    """pydicom's bundled CT_small.dcm: an unsupported SOP class for the gateway."""
    return Path(str(get_testdata_file("CT_small.dcm")))


def with_new_uids(src: Path, dst: Path, *, study_uid: str | None = None) -> Dataset:
    """Copy ``src`` with a new SOP Instance UID (and the given or a new Study UID)."""
    ds = dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(dst, enforce_file_format=True)
    return ds


def study_files(src: Path, folder: Path, count: int, *, study_uid: str | None = None) -> list[Path]:
    """``count`` instances of one new study made from ``src``."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    paths = []
    for i in range(count):
        path = folder / f"img{i:04d}.dcm"
        with_new_uids(src, path, study_uid=study_uid)
        paths.append(path)
    return paths


def encode_variant(src: Path, dst: Path, syntax: str) -> Path:
    """Re-encode ``src`` in another transfer syntax, as a PACS would store it. DCMTK does
    JPEG, JPEG-LS and RLE; pydicom (with pylibjpeg-openjpeg) does JPEG 2000 and deflate."""
    dcmtk = {
        "jpeg-lossless": ["dcmcjpeg", "+e1"],
        "jpeg-baseline": ["dcmcjpeg", "+eb"],
        "jpeg-ls": ["dcmcjpls", "+el"],
        "rle-dcmtk": ["dcmcrle"],
    }
    if syntax in dcmtk:
        subprocess.run([*dcmtk[syntax], str(src), str(dst)], check=True, capture_output=True)
        return dst
    ds = dcmread(src)
    if syntax == "jpeg2000-lossless":
        ds.compress(JPEG2000Lossless)
    elif syntax == "rle":
        ds.compress(RLELossless)
    elif syntax == "deflated":
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    else:
        raise ValueError(syntax)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def eight_bit(src: Path, dst: Path) -> Path:
    """An 8-bit copy of a 16-bit image (JPEG baseline needs 8 bits)."""
    ds = dcmread(src)
    arr = ds.pixel_array.astype(np.float64)
    arr = (255 * (arr - arr.min()) / max(1.0, float(np.ptp(arr)))).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = arr.tobytes()
    for keyword in ("WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(dst, enforce_file_format=True)
    return dst


def without_pixel_data(src: Path, dst: Path) -> Path:
    ds = dcmread(src)
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=True)
    return dst


def large_image(src: Path, dst: Path, rows: int, cols: int) -> Path:
    """A bigger 16-bit image (to exceed a size limit), with the header of ``src``."""
    ds = dcmread(src)
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = np.random.default_rng(0).integers(0, 4096, (rows, cols), np.uint16).tobytes()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=True)
    return dst


def have_dcmtk_codecs() -> bool:
    return all(shutil.which(tool) for tool in ("dcmcjpeg", "dcmcjpls", "dcmcrle"))
