"""Issue #17, the SR's side: its identity (random per report version), which version it is,
what a declined study's SR says, its time zone and the order it answers. Every SR built here
also passes dciodvfy with zero errors."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import ComprehensiveSRStorage

from gateway.deliver import sr as srmod
from gateway.deliver.heatmap_sc import build_heatmap_sc
from gateway.deliver.sr import build_sr, sr_reference
from inference.finding import DeclinedImage, ModelInfo, SourceImage, StudyContext, StudyFinding
from tests.sr.conftest import FIXTURES
from tests.sr.dicom_tools import ACCEPTED_WARNINGS, dciodvfy, dsrdump, save

MODEL = ModelInfo(name="cxr-pneumonia-cnn", version="1.2.0", content_hash="0f" * 32, threshold=0.5)
CREATED = dt.datetime(2026, 11, 27, 12, 30, 5, tzinfo=dt.UTC)


def header(name: str = "rg1_cr_small.dcm") -> Dataset:
    return pydicom.dcmread(FIXTURES / name, stop_before_pixels=True)


def image_of(ds: Dataset) -> SourceImage:
    return SourceImage(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID))


def finding(
    src: Dataset,
    *,
    probability: float | None = 0.8,
    report_id: str | None = None,
    version: int = 1,
    reason: str = "body part is HAND",
) -> StudyFinding:
    image = image_of(src)
    return StudyFinding(
        study=StudyContext(study_instance_uid=str(src.StudyInstanceUID)),
        model=MODEL,
        probability=probability,
        present=None if probability is None else probability >= MODEL.threshold,
        images=(image,) if probability is not None else (),
        declined=() if probability is not None else (DeclinedImage(image, reason),),
        report_id=report_id or str(uuid.uuid4()),
        version=version,
        created_at=CREATED,
    )


def valid(sr: Dataset, tmp_path: Path, name: str) -> str:
    """dciodvfy: no error and no unexpected warning; returns dsrdump's tree."""
    path = save(sr, tmp_path / f"{name}.dcm")
    verdict = dciodvfy(path)
    assert verdict.errors == [], verdict.output
    unexpected = [w for w in verdict.warnings if not any(a in w for a in ACCEPTED_WARNINGS)]
    assert unexpected == [], verdict.output
    return dsrdump(path)


def texts(sr: Dataset) -> list[str]:
    """Every TEXT content item's value, depth first."""
    out: list[str] = []
    for item in sr.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            out.append(str(item.TextValue))
        out += texts(item)
    return out


def procedure_reported(sr: Dataset) -> Dataset:
    return next(
        item.ConceptCodeSequence[0]
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"
    )


def test_sr_uids_are_the_random_report_id_and_stable_for_it(tmp_path: Path) -> None:
    src = header()
    report_id = str(uuid.uuid4())
    first = build_sr(finding(src, report_id=report_id), [src])
    again = build_sr(finding(src, report_id=report_id), [src])  # a retry rebuilds it
    other = build_sr(finding(src), [src])  # same study and version, another installation

    assert first.SOPInstanceUID == f"2.25.{uuid.UUID(report_id).int}"
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        again.SOPInstanceUID,
        again.SeriesInstanceUID,
    )
    assert first.SOPInstanceUID != other.SOPInstanceUID
    assert first.SeriesInstanceUID != other.SeriesInstanceUID
    assert len(first.SeriesInstanceUID) <= 64
    valid(first, tmp_path, "identity")


def test_reports_made_before_random_ids_keep_their_uids() -> None:
    """A delivery stored before the upgrade (report id = Study UID) retried after it, and the
    amendment of such a report, name the SR that was sent then."""
    src = header()
    study = str(src.StudyInstanceUID)
    legacy = finding(src, report_id=study)
    old = build_sr(legacy, [src])
    assert old.SOPInstanceUID == srmod.uid_from("sr-instance", study, "1")
    amendment = dataclasses.replace(
        finding(src, probability=0.2, version=2), previous_report_id=study, previous_version=1
    )
    item = build_sr(amendment, [src]).PredecessorDocumentsSequence[0]
    assert item.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        old.SOPInstanceUID
    )


def test_each_version_has_its_series_number_and_says_what_it_amends(tmp_path: Path) -> None:
    src = header()
    study = str(src.StudyInstanceUID)
    v1_id = str(uuid.uuid4())
    v1 = build_sr(finding(src, report_id=v1_id), [src])
    previous = sr_reference(study_instance_uid=study, report_id=v1_id, version=1)
    v2_finding = dataclasses.replace(
        finding(src, probability=0.2, version=2), previous_report_id=v1_id, previous_version=1
    )
    v2 = build_sr(v2_finding, [src], replaces=previous)

    assert (v1.SeriesNumber, v2.SeriesNumber) == (9901, 9902)
    assert v1.SeriesDescription == "AI pneumonia finding v1 (UNVERIFIED)"
    assert v2.SeriesDescription == "AI pneumonia finding v2, amends v1 (UNVERIFIED)"
    assert v1.SeriesInstanceUID != v2.SeriesInstanceUID
    referenced = v2.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == v1.SeriesInstanceUID
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == v1.SOPInstanceUID
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPClassUID == ComprehensiveSRStorage
    # Without being told, the builder finds the predecessor from the finding itself.
    assert build_sr(v2_finding, [src]).PredecessorDocumentsSequence == (
        v2.PredecessorDocumentsSequence
    )
    valid(v2, tmp_path, "v2")


def test_declined_study_gets_a_neutral_no_result_sr_saying_why(tmp_path: Path) -> None:
    hand = header()
    hand.BodyPartExamined = "HAND"
    sr = build_sr(finding(hand, probability=None, reason="body part is HAND"), [hand])

    code = procedure_reported(sr)
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("363679005", "SCT")
    assert code.CodeValue != srmod.CHEST_RADIOGRAPH.value
    assert "no result" in sr.SeriesDescription
    tree = valid(sr, tmp_path, "no_result_hand")
    # Pneumonia is undetermined, never present or absent, and no probability is given.
    assert '(373068000,SCT,"Undetermined")' in tree
    assert "52101004" not in tree and "2667000" not in tree and "122157" not in tree
    # What was received and why it was declined, in words.
    assert '<contains CONTAINER:(,,"Qualitative Evaluations")' in tree
    container = sr.ContentSequence[-1].ConceptNameCodeSequence[0]
    assert (container.CodeValue, container.CodingSchemeDesignator) == ("C0034375", "UMLS")
    said = texts(sr)
    assert f"CR {hand.SOPInstanceUID} not used: body part is HAND" in said
    assert any("none of the 1 image(s) received could be used" in text for text in said)

    # With the source's own (standard) procedure code, that is the procedure reported.
    code_item = Dataset()
    code_item.CodeValue, code_item.CodingSchemeDesignator = "37181-5", "LN"
    code_item.CodeMeaning = "XR Hand views"
    hand.ProcedureCodeSequence = [code_item]
    sr = build_sr(finding(hand, probability=None), [hand])
    assert procedure_reported(sr).CodeValue == "37181-5"


def test_timezone_offset_from_the_source_else_the_site_zone(tmp_path: Path) -> None:
    src = header()  # RG1 carries Timezone Offset From UTC -0400
    assert src.TimezoneOffsetFromUTC == "-0400"
    sr = build_sr(finding(src), [src], site_timezone=ZoneInfo("Europe/Berlin"))
    assert sr.TimezoneOffsetFromUTC == "-0400"
    assert (str(sr.ContentDate), str(sr.ContentTime)) == (
        "20261127",
        "083005",
    )  # 12:30:05 UTC - 4 h
    assert str(sr.InstanceCreationTime) == "083005"
    valid(sr, tmp_path, "source_offset")

    del src.TimezoneOffsetFromUTC
    sr = build_sr(finding(src), [src], site_timezone=ZoneInfo("Europe/Berlin"))
    assert sr.TimezoneOffsetFromUTC == "+0100"  # CET in November
    assert (str(sr.ContentDate), str(sr.ContentTime)) == ("20261127", "133005")
    summer = dataclasses.replace(
        finding(src), created_at=dt.datetime(2026, 7, 1, 23, 30, tzinfo=dt.UTC)
    )
    sr = build_sr(summer, [src], site_timezone=ZoneInfo("Europe/Berlin"))
    assert (sr.TimezoneOffsetFromUTC, str(sr.ContentDate), str(sr.ContentTime)) == (
        "+0200",
        "20260702",
        "013000",
    )
    sr = build_sr(finding(src), [src], site_timezone=ZoneInfo("America/St_Johns"))
    assert sr.TimezoneOffsetFromUTC == "-0330"
    valid(sr, tmp_path, "site_offset")


def _request(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def test_referenced_request_sequence_names_the_order(tmp_path: Path) -> None:
    src = header()
    study = str(src.StudyInstanceUID)
    code = _request(CodeValue="36643-5", CodingSchemeDesignator="LN", CodeMeaning="XR Chest 2V")
    issuer = _request(LocalNamespaceEntityID="RIS")
    src.RequestAttributesSequence = [
        _request(
            RequestedProcedureID="RP-7",
            ScheduledProcedureStepID="SPS-7",
            AccessionNumber="ACC-7",
            IssuerOfAccessionNumberSequence=[issuer],
            RequestedProcedureDescription="Chest PA",
            RequestedProcedureCodeSequence=[code],
        )
    ]
    sr = build_sr(finding(src), [src])
    (item,) = sr.ReferencedRequestSequence
    assert item.StudyInstanceUID == study
    assert (item.AccessionNumber, item.RequestedProcedureID) == ("ACC-7", "RP-7")
    assert item.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == "RIS"
    assert item.RequestedProcedureDescription == "Chest PA"
    assert item.RequestedProcedureCodeSequence[0].CodeValue == "36643-5"
    assert item.ReferencedStudySequence == []
    assert item.PlacerOrderNumberImagingServiceRequest == ""  # type 2: present, empty
    valid(sr, tmp_path, "request_attributes")

    # No Request Attributes Sequence: the Accession Number alone names the order.
    del src.RequestAttributesSequence
    (item,) = build_sr(finding(src), [src]).ReferencedRequestSequence
    assert (item.AccessionNumber, item.RequestedProcedureID) == (str(src.AccessionNumber), "")

    # Neither: nothing to reference, and the attribute (type 1C) is absent.
    src.AccessionNumber = ""
    sr = build_sr(finding(src), [src])
    assert "ReferencedRequestSequence" not in sr
    valid(sr, tmp_path, "no_request")


def test_heatmap_sc_identity_series_and_time_zone(tmp_path: Path) -> None:
    src = header()
    report_id = str(uuid.uuid4())
    rgb = np.zeros((64, 64, 3), np.uint8)
    first = build_heatmap_sc(finding(src, report_id=report_id), src, rgb)
    again = build_heatmap_sc(finding(src, report_id=report_id), src, rgb)
    other = build_heatmap_sc(finding(src), src, rgb)
    assert first.SOPInstanceUID == again.SOPInstanceUID != other.SOPInstanceUID
    assert first.SeriesInstanceUID != other.SeriesInstanceUID
    v2 = build_heatmap_sc(finding(src, version=2), src, rgb)
    assert (first.SeriesNumber, v2.SeriesNumber) == (9801, 9802)
    assert first.TimezoneOffsetFromUTC == "-0400"
    verdict = dciodvfy(save(first, tmp_path / "sc.dcm"))
    assert verdict.errors == [], verdict.output


@pytest.mark.parametrize("offset", ["+2400", "0100", "+01:00", "-1299"])
def test_invalid_source_offsets_fall_back_to_the_site_zone(offset: str) -> None:
    src = header()
    src.TimezoneOffsetFromUTC = offset
    sr = build_sr(finding(src), [src], site_timezone=ZoneInfo("Asia/Kolkata"))
    assert sr.TimezoneOffsetFromUTC == "+0530"
