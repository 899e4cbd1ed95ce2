"""A DICOM chest radiograph made from a Kermany training JPEG (the NIH Secondary Capture's
header with the JPEG's pixels), so that any model the tests use, even the tiny one trained
on the fixtures, accepts it and produces a finding with a heat map."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests import dicom_files as files

ROOT = Path(__file__).resolve().parents[2]
KERMANY = ROOT / "tests" / "fixtures" / "images" / "kermany"


def kermany_jpeg(label: str = "PNEUMONIA") -> Path:
    return sorted((KERMANY / label).iterdir())[0]


def chest_dicom(dst: Path, *, study_uid: str | None = None, label: str = "PNEUMONIA") -> Path:
    """Write a DICOM SC instance with the pixels of a Kermany JPEG and new UIDs."""
    pixels = cv2.imread(str(kermany_jpeg(label)), cv2.IMREAD_GRAYSCALE)
    assert pixels is not None
    ds = dcmread(files.CHEST_SC)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    ds.PatientID, ds.PatientName, ds.AccessionNumber = "MRN-4242", "Doe^Jane", "ACC-0042"
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst
