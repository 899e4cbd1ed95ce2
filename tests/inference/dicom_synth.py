"""Build small, valid DICOM datasets from a 2-D array for tests (no files from shared/)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def make_dataset(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    modality: str = "CR",
    sop_class: str = CR_STORAGE,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    **attrs: Any,
) -> Dataset:
    """``pixels``: 2-D (or 3-D for frames) unsigned integers that fit ``bits_stored``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class if sop_class != "CT" else CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "AP"  # the model's population: anterior-posterior films
    arr = np.asarray(pixels)
    if arr.ndim == 3:
        ds.NumberOfFrames = arr.shape[0]
    ds.Rows, ds.Columns = arr.shape[-2], arr.shape[-1]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter = f"{window[0]:g}"
        ds.WindowWidth = f"{window[1]:g}"
    if rescale is not None:
        ds.RescaleSlope = f"{rescale[0]:g}"
        ds.RescaleIntercept = f"{rescale[1]:g}"
        ds.RescaleType = "US"
    for key, value in attrs.items():
        setattr(ds, key, value)
    dtype = np.uint8 if ds.BitsAllocated == 8 else np.uint16
    ds.PixelData = np.ascontiguousarray(arr.astype(dtype)).tobytes()
    return ds
