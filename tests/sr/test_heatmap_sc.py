"""The heat-map Secondary Capture: valid (dciodvfy), in the source study, marked not for
diagnosis in the pixels and in the header."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import SecondaryCaptureImageStorage

from gateway.deliver.heatmap_sc import NOT_FOR_DIAGNOSIS, build_heatmap_sc
from gateway.deliver.sr import SRBuildError, device_uid
from inference.finding import ModelInfo, SourceImage, StudyContext, StudyFinding
from tests.sr.conftest import FIXTURES
from tests.sr.dicom_tools import ACCEPTED_WARNINGS, dciodvfy, save

MODEL = ModelInfo(name="cxr-pneumonia-cnn", version="1.2.0", content_hash="0f" * 32)


def finding_for(src: pydicom.Dataset) -> StudyFinding:
    image = SourceImage(str(src.SOPClassUID), str(src.SOPInstanceUID), str(src.SeriesInstanceUID))
    return StudyFinding(
        study=StudyContext(study_instance_uid=str(src.StudyInstanceUID)),
        model=MODEL,
        probability=0.8,
        present=True,
        images=(image,),
        report_id=f"{src.StudyInstanceUID}/v1",
        created_at=dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC),
    )


def heatmap(size: int = 224) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    hot = np.exp(-((x - size / 2) ** 2 + (y - size / 2) ** 2) / (2 * (size / 6) ** 2))
    rgb = np.stack([hot * 255, np.zeros_like(hot), (1 - hot) * 255], axis=-1)
    return rgb.astype(np.uint8)


@pytest.mark.parametrize(
    "name", ["rg1_cr_small.dcm", "nih_sc_small.dcm", "nih_sc_minimal_header.dcm"]
)
def test_heatmap_sc_passes_dciodvfy(name: str, tmp_path: Path) -> None:
    src = pydicom.dcmread(FIXTURES / name, stop_before_pixels=True)
    sc = build_heatmap_sc(finding_for(src), src, heatmap())
    verdict = dciodvfy(save(sc, tmp_path / "sc.dcm"))
    assert verdict.errors == [], verdict.output
    unexpected = [w for w in verdict.warnings if not any(a in w for a in ACCEPTED_WARNINGS)]
    assert unexpected == [], verdict.output


def test_heatmap_sc_header_and_pixels() -> None:
    src = pydicom.dcmread(FIXTURES / "rg1_cr_small.dcm", stop_before_pixels=True)
    png = io.BytesIO()
    Image.fromarray(heatmap(200)).save(png, format="PNG")
    sc = build_heatmap_sc(finding_for(src), src, png.getvalue())

    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == src.StudyInstanceUID
    assert sc.SeriesInstanceUID != src.SeriesInstanceUID
    assert sc.PatientID == src.PatientID
    assert sc.BurnedInAnnotation == "YES"
    assert NOT_FOR_DIAGNOSIS in sc.ImageComments
    assert NOT_FOR_DIAGNOSIS in sc.SeriesDescription
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert sc.ContributingEquipmentSequence[0].DeviceUID == device_uid(MODEL)
    assert (sc.Rows, sc.Columns, sc.SamplesPerPixel) == (200, 200, 3)
    # The banner is burned in: the top rows are no longer the heat map's colours.
    pixels = sc.pixel_array
    assert (pixels[:5] != heatmap(200)[:5]).any()
    assert (pixels[-20:] == heatmap(200)[-20:]).all()
    # Deterministic UIDs: the same finding and source make the same instance.
    again = build_heatmap_sc(finding_for(src), src, heatmap(200))
    assert again.SOPInstanceUID == sc.SOPInstanceUID


def test_heatmap_sc_refuses_bad_input() -> None:
    src = pydicom.dcmread(FIXTURES / "rg1_cr_small.dcm", stop_before_pixels=True)
    other = pydicom.dcmread(FIXTURES / "nih_sc_small.dcm", stop_before_pixels=True)
    with pytest.raises(SRBuildError, match="another study"):
        build_heatmap_sc(finding_for(src), other, heatmap())
    with pytest.raises(ValueError, match="RGB uint8"):
        build_heatmap_sc(finding_for(src), src, np.zeros((64, 64), dtype=np.uint8))
