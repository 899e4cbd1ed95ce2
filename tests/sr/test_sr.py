"""The SR builder: every variant we produce passes dciodvfy with zero errors, parses with
dsrdump, and carries what AIR and issue 4 ask for."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import uuid
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import ComprehensiveSRStorage

from gateway.deliver import sr as srmod
from gateway.deliver.sr import SRBuildError, SRReference, build_sr, device_uid, sr_reference
from inference.finding import DeclinedImage, ModelInfo, SourceImage, StudyContext, StudyFinding
from tests.sr.conftest import FIXTURES
from tests.sr.dicom_tools import ACCEPTED_WARNINGS, dciodvfy, dsrdump, save

MODEL = ModelInfo(name="cxr-pneumonia-cnn", version="1.2.0", content_hash="0f" * 32, threshold=0.42)
CREATED = dt.datetime(2026, 11, 27, 12, 30, 5, tzinfo=dt.UTC)
TEXT_VRS = ("LO", "SH", "ST", "LT", "UT", "CS")
AGE_CAVEAT = (
    "patient age 12 years is outside the ages the model was validated on (1-5 years); "
    "this site accepts 0-17 years"
)


def report_of(sr: Dataset) -> hd.sr.MeasurementReport:
    """The TID 1500 content, parsed back from the dataset as a receiver would."""
    content = hd.sr.ComprehensiveSR.from_dataset(sr).content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def procedure_reported(sr: Dataset) -> Dataset:
    return next(
        item.ConceptCodeSequence[0]
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"
    )


def header(name: str) -> Dataset:
    return pydicom.dcmread(FIXTURES / name, stop_before_pixels=True)


def image_of(ds: Dataset) -> SourceImage:
    return SourceImage(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID))


def report_id_for(study_uid: str, version: int) -> str:
    """A fixed UUID per (study, version), so that tests are reproducible; the worker mints
    random ones (gateway.pipeline.inference_stage.report_identity)."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, f"{study_uid}/v{version}"))


def finding_for(
    sources: list[Dataset], *, probability: float | None = 0.91, version: int = 1
) -> StudyFinding:
    images = tuple(image_of(ds) for ds in sources)
    study_uid = str(sources[0].StudyInstanceUID)
    present = None if probability is None else probability >= MODEL.threshold
    return StudyFinding(
        study=StudyContext(study_instance_uid=study_uid),
        model=MODEL,
        probability=probability,
        present=present,
        images=images if probability is not None else (),
        declined=()
        if probability is not None
        else tuple(DeclinedImage(i, "out of distribution") for i in images),
        report_id=report_id_for(study_uid, version),
        version=version,
        created_at=CREATED,
        previous_report_id=report_id_for(study_uid, version - 1) if version > 1 else "",
        previous_version=version - 1,
    )


def second_image(ds: Dataset) -> Dataset:
    """Another image of the same study and series (a second frontal view)."""
    other = pydicom.dcmread(FIXTURES / "rg1_cr_small.dcm", stop_before_pixels=True)
    other.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["second", str(ds.SOPInstanceUID)])
    return other


def variants() -> dict[str, tuple[StudyFinding, list[Dataset], SRReference | None]]:
    rg1 = header("rg1_cr_small.dcm")
    nih = header("nih_sc_small.dcm")
    minimal = header("nih_sc_minimal_header.dcm")
    amend = finding_for([rg1], probability=0.35, version=2)
    previous = sr_reference(
        study_instance_uid=str(rg1.StudyInstanceUID),
        report_id=report_id_for(str(rg1.StudyInstanceUID), 1),
        version=1,
    )
    two = [rg1, second_image(rg1)]
    return {
        "present_cr_monochrome1": (finding_for([rg1], probability=0.91), [rg1], None),
        "absent_cr_monochrome1": (finding_for([rg1], probability=0.08), [rg1], None),
        "no_result": (finding_for([rg1], probability=None), [rg1], None),
        "amendment": (amend, [rg1], previous),
        "two_source_images": (finding_for(two, probability=0.77), two, None),
        "one_used_one_declined": (
            dataclasses.replace(
                finding_for(two[:1], probability=0.77),
                declined=(DeclinedImage(image_of(two[1]), "lateral view"),),
            ),
            two,
            None,
        ),
        "nih_secondary_capture": (finding_for([nih], probability=0.66), [nih], None),
        "outside_validated_ages": (
            dataclasses.replace(finding_for([rg1], probability=0.4), caveats=(AGE_CAVEAT,)),
            [rg1],
            None,
        ),
        "missing_optional_attributes": (finding_for([minimal], probability=0.2), [minimal], None),
    }


@pytest.mark.parametrize("name", list(variants()))
def test_every_variant_passes_dciodvfy_and_dsrdump(name: str, tmp_path: Path) -> None:
    finding, sources, replaces = variants()[name]
    path = save(build_sr(finding, sources, replaces=replaces), tmp_path / f"{name}.dcm")

    verdict = dciodvfy(path)
    assert verdict.errors == [], verdict.output
    unexpected = [w for w in verdict.warnings if not any(a in w for a in ACCEPTED_WARNINGS)]
    assert unexpected == [], verdict.output

    tree = dsrdump(path)
    assert "Imaging Measurement Report" in tree
    assert '(233604007,SCT,"Pneumonia")' in tree
    assert "Verification Flag   : UNVERIFIED" in tree
    assert "Completion Flag     : COMPLETE" in tree


def test_present_sr_content_and_header() -> None:
    rg1 = header("rg1_cr_small.dcm")
    finding = finding_for([rg1], probability=0.91)
    sr = build_sr(finding, [rg1])

    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert sr.Modality == "SR"
    # Same study, new series; patient and study attributes copied from the source.
    assert sr.StudyInstanceUID == rg1.StudyInstanceUID
    assert sr.SeriesInstanceUID != rg1.SeriesInstanceUID
    for kw in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
    ):
        assert sr[kw].value == rg1[kw].value, kw
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert "PredecessorDocumentsSequence" not in sr

    # The algorithm as contributing equipment, with a Device UID derived from its weights.
    ours = sr.ContributingEquipmentSequence[0]
    assert ours.Manufacturer == MODEL.manufacturer
    assert ours.ManufacturerModelName == MODEL.name
    assert ours.SoftwareVersions == MODEL.version
    assert ours.DeviceUID == device_uid(MODEL) == sr.DeviceUID
    assert ours.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"

    # Evidence: the source image, by SOP class and instance UID.
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        rg1.SOPClassUID,
        rg1.SOPInstanceUID,
    )

    assert procedure_reported(sr).CodeValue == srmod.CHEST_RADIOGRAPH.value
    groups = report_of(sr).get_image_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    assert group.finding_type == srmod.PNEUMONIA
    (evaluation,) = group.get_qualitative_evaluations()
    assert (evaluation.name, evaluation.value) == (srmod.PNEUMONIA, srmod.PRESENT)
    (probability,) = group.get_measurements(name=srmod.PROBABILITY)
    assert probability.value == pytest.approx(0.91)
    assert probability.unit == srmod.UNITLESS
    texts = {
        (i.ConceptNameCodeSequence[0].CodeValue, i.TextValue)
        for i in group[0].ContentSequence
        if i.ValueType == "TEXT"
    }
    assert ("111001", MODEL.name) in texts  # TID 4019 Algorithm Name
    assert ("111003", MODEL.version) in texts  # TID 4019 Algorithm Version
    assert [s.referenced_sop_instance_uid for s in group.source_images] == [rg1.SOPInstanceUID]


def test_absent_and_no_result_values() -> None:
    rg1 = header("rg1_cr_small.dcm")
    absent = report_of(
        build_sr(finding_for([rg1], probability=0.1), [rg1])
    ).get_image_measurement_groups()[0]
    assert absent.get_qualitative_evaluations()[0].value == srmod.ABSENT

    none = report_of(
        build_sr(finding_for([rg1], probability=None), [rg1])
    ).get_image_measurement_groups()[0]
    assert none.get_qualitative_evaluations()[0].value == srmod.UNDETERMINED
    assert none.get_measurements() == []
    # The examined (declined) image is still referenced.
    assert [s.referenced_sop_instance_uid for s in none.source_images] == [rg1.SOPInstanceUID]


def test_uids_are_deterministic_per_report_and_version() -> None:
    rg1 = header("rg1_cr_small.dcm")
    f1 = finding_for([rg1])
    a, b = build_sr(f1, [rg1]), build_sr(f1, [rg1])
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.SOPInstanceUID.startswith("2.25.") and len(a.SOPInstanceUID) <= 64
    expected = sr_reference(
        study_instance_uid=f1.study.study_instance_uid, report_id=f1.report_id, version=1
    )
    assert a.SOPInstanceUID == expected.sop_instance_uid
    # Rebuilding later (e.g. a re-delivery) gives the same bytes apart from nothing at all.
    assert a.InstanceCreationTime == b.InstanceCreationTime

    f2 = dataclasses.replace(f1, version=2, report_id=report_id_for(f1.study.study_instance_uid, 2))
    c = build_sr(f2, [rg1], replaces=expected)
    assert c.SOPInstanceUID != a.SOPInstanceUID


def test_device_uid_changes_with_the_model() -> None:
    other = dataclasses.replace(MODEL, content_hash="1e" * 32)
    assert device_uid(MODEL) == device_uid(dataclasses.replace(MODEL))
    assert device_uid(MODEL) != device_uid(other)


def test_amendment_references_the_sr_it_replaces() -> None:
    finding, sources, replaces = variants()["amendment"]
    assert replaces is not None
    sr = build_sr(finding, sources, replaces=replaces)
    item = sr.PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == replaces.study_instance_uid
    series = item.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == replaces.series_instance_uid
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == replaces.sop_instance_uid
    assert series.ReferencedSOPSequence[0].ReferencedSOPClassUID == ComprehensiveSRStorage
    assert sr.InstanceNumber == 2


def test_amendment_without_predecessor_is_refused() -> None:
    finding, sources, _ = variants()["amendment"]
    with pytest.raises(SRBuildError, match="amendment"):
        build_sr(finding, sources, replaces=[])


def test_bad_inputs_are_refused_at_build_time() -> None:
    rg1, nih = header("rg1_cr_small.dcm"), header("nih_sc_small.dcm")
    with pytest.raises(SRBuildError, match="another study"):
        build_sr(finding_for([rg1]), [rg1, nih])
    with pytest.raises(SRBuildError, match="no source header"):
        build_sr(finding_for([rg1]), [])
    with pytest.raises(SRBuildError, match="outside"):
        build_sr(dataclasses.replace(finding_for([rg1]), probability=1.5), [rg1])
    with pytest.raises(SRBuildError, match="both"):
        build_sr(dataclasses.replace(finding_for([rg1]), present=None), [rg1])


def test_invalid_source_values_do_not_leak_into_the_sr() -> None:
    nih = header("nih_sc_small.dcm")
    assert nih.PatientAge == "81"  # not a valid AS: the source is imperfect
    sr = build_sr(finding_for([nih]), [nih])
    assert "PatientAge" not in sr
    assert sr.PatientBirthDate == "" and sr.StudyDate == ""  # type 2: present, empty


def test_source_procedure_code_is_used_when_standard() -> None:
    rg1 = header("rg1_cr_small.dcm")
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "36643-5", "LN", "XR Chest 2V"
    rg1.ProcedureCodeSequence = [code]
    sr = build_sr(finding_for([rg1]), [rg1])
    assert procedure_reported(sr).CodeValue == "36643-5"

    code.CodingSchemeDesignator = "99LOCAL"
    sr = build_sr(finding_for([rg1]), [rg1])
    assert procedure_reported(sr).CodeValue == srmod.CHEST_RADIOGRAPH.value


def test_build_time_once_warm() -> None:
    rg1 = header("rg1_cr_small.dcm")
    finding = finding_for([rg1])
    build_sr(finding, [rg1])  # the first build loads highdicom's standard tables
    start = time.perf_counter()
    for _ in range(5):
        build_sr(finding, [rg1])
    per_build_ms = (time.perf_counter() - start) / 5 * 1000
    # Generous bound for a shared 2-core machine; measured about 35 ms here.
    assert per_build_ms < 250, per_build_ms


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        ("ISO_IR 192", "Müller^Hans"),
        (["ISO 2022 IR 6", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),
    ],
)
def test_character_set_is_kept_with_the_names(
    charset: str | list[str], name: str, tmp_path: Path
) -> None:
    rg1 = header("rg1_cr_small.dcm")
    rg1.SpecificCharacterSet = charset
    rg1.PatientName = name
    path = save(build_sr(finding_for([rg1]), [rg1]), tmp_path / "sr.dcm")
    back = pydicom.dcmread(path)
    assert str(back.PatientName) == name
    assert dciodvfy(path).errors == []


def test_a_result_outside_the_validated_ages_says_so(tmp_path: Path) -> None:
    """A site that widened the ages gets its result, and the SR carries the caveat in words
    a reader sees (a Comment in the Qualitative Evaluations container)."""
    finding, sources, _ = variants()["outside_validated_ages"]
    sr = build_sr(finding, sources)
    texts = [
        str(item.TextValue)
        for item in sr.ContentSequence[-1].ContentSequence
        if "TextValue" in item
    ]
    assert texts == [f"Caveat: {AGE_CAVEAT}"]
    plain = build_sr(dataclasses.replace(finding, caveats=()), sources)
    assert "Caveat" not in str(plain)


def test_a_site_calibrated_model_is_named_in_the_algorithm_parameters() -> None:
    finding, sources, _ = variants()["present_cr_monochrome1"]
    site = "site calibration 2026-11-30 on 60 normal + 100 pneumonia local films"
    sited = dataclasses.replace(
        finding,
        model=dataclasses.replace(MODEL, version="1.6.0+site.1a2b3c4d", site_calibration=site),
    )

    def texts(sr: Dataset) -> list[str]:
        found: list[str] = []
        sr.walk(lambda _ds, elem: found.append(str(elem.value)) if elem.VR in TEXT_VRS else None)
        return found

    with_site = texts(build_sr(sited, sources))
    assert f"calibration={site}" in with_site and "1.6.0+site.1a2b3c4d" in with_site
    assert not any(t.startswith("calibration=") for t in texts(build_sr(finding, sources)))
