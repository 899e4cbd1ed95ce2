"""Settings of what the PACS and the EHR receive (issue #17, items 6 and 7): the site time zone
under its new name and its former one, and what a study the model declined sends by default
(a "no result" SR to the PACS, nothing to the EHR)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from gateway.deliver.channels import FhirSender, SrSender
from gateway.deliver.deliveries import FHIR, OUTBOX, SR, DeliveryJob
from gateway.errors import ConfigurationError
from gateway.settings import Settings
from inference.finding import DeclinedImage, ModelInfo, SourceImage, StudyContext, StudyFinding
from tests import dicom_files as files

MODEL = ModelInfo(name="cxr-pneumonia-cnn", version="1.4.1", content_hash="0f" * 32)


def declined_job(kind: str) -> DeliveryJob:
    header = pydicom.dcmread(files.CHEST_CR, stop_before_pixels=True)
    image = SourceImage(
        str(header.SOPClassUID), str(header.SOPInstanceUID), str(header.SeriesInstanceUID)
    )
    finding = StudyFinding(
        study=StudyContext(study_instance_uid=str(header.StudyInstanceUID), patient_id="9RG1"),
        model=MODEL,
        probability=None,
        present=None,
        images=(),
        declined=(DeclinedImage(image, "body part is HAND"),),
        report_id="0c6f3e0a-2a5e-4d59-8f4e-3c3b8f1f2d11",
        created_at=dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC),
    )
    study_uid = finding.study.study_instance_uid
    return DeliveryJob(1, kind, OUTBOX, 1, 1, study_uid, finding, [files.CHEST_CR])


def test_site_timezone_and_its_former_name(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert make_settings().site_timezone == "UTC"
    monkeypatch.setenv("CXR_FHIR_TIMEZONE", "Europe/Berlin")
    assert make_settings().site_timezone == "Europe/Berlin"
    monkeypatch.setenv("CXR_SITE_TIMEZONE", "America/New_York")  # the new name wins
    settings = make_settings()
    assert settings.site_timezone == settings.fhir_timezone == "America/New_York"
    monkeypatch.setenv("CXR_SITE_TIMEZONE", "Europe/Atlantis")
    with pytest.raises(ConfigurationError, match=r"CXR_SITE_TIMEZONE.*not an IANA time zone"):
        make_settings()


def test_declined_study_sends_a_no_result_sr_and_nothing_to_the_ehr_by_default(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    assert settings.fhir_post_no_result is False and settings.send_no_result_sr is True
    sent = SrSender(settings)(declined_job(SR))
    sr = pydicom.dcmread(settings.outbox_path / sent["file"])
    assert sr.SeriesDescription == "AI pneumonia: no result v1 (UNVERIFIED)"
    assert FhirSender(settings)(declined_job(FHIR)).get("skipped")
    assert not list(settings.outbox_path.glob("*_fhir.json"))

    quiet = make_settings(send_no_result_sr=False, data_dir=tmp_path / "quiet")
    assert SrSender(quiet)(declined_job(SR)).get("skipped")
    assert not quiet.outbox_path.exists() or not list(quiet.outbox_path.iterdir())
