"""Build the DICOM Structured Report of a finding (pure: no network, no files).

The report is a highdicom TID 1500 Measurement Report in a Comprehensive SR, placed in a new
series of the SOURCE study, and follows the IHE AI Results (AIR) profile:

- Procedure Reported is the imaging procedure (the source's Procedure Code Sequence when it
  carries a standard code, else SNOMED CT 399208008 "Plain X-ray of chest"), never the algorithm.
- The algorithm appears in the Contributing Equipment Sequence (manufacturer, model name,
  software version, and a Device UID derived from the model's content hash, so it changes
  whenever the model does), as the device observer, and as TID 4019 Algorithm Identification.
- One TID 1501 measurement group: finding type SNOMED CT 233604007 Pneumonia, a qualitative
  evaluation Pneumonia = Present / Absent (CID 240), the calibrated probability as a numeric
  measurement (DCM 122157 "Probability", UCUM "1"), and the source images.
- Verification Flag UNVERIFIED, Completion Flag COMPLETE, Preliminary Flag FINAL.

"No result" (every image declined): an SR is still produced, stating Pneumonia = Undetermined
(SNOMED CT 373068000, CID 240) with no probability, referencing the examined images, with the
source's own procedure code or the neutral SNOMED CT 363679005 "Imaging" (never "chest": the
images may be a hand or a lateral view). Declined images are listed with their reasons in a
TID 1500 Qualitative Evaluations container, so the PACS user sees what was received and why
the AI could not assess it, instead of silence.

Identity: every report version has a random report id (a UUID minted once by the worker and
stored with the study version). The SR's SOP Instance UID is 2.25 + that UUID and its other
UIDs derive from it, so a re-sent finding overwrites the same object on the PACS while another
installation, a database reset or a test instance can never make a different document with
the same UID. Reports made before random ids (report id = Study Instance UID) keep their old
derivation. Series Number 9900 + version and a Series Description naming the version (and the
one it amends) tell the reader which SR is current; an amendment names the SR it replaces in
the Predecessor Documents Sequence.

Times: Timezone Offset From UTC is the sources' own when they carry one, else the site time
zone's, and the SR's dates and times are written in it. The order the images were acquired for
(Request Attributes Sequence, Accession Number) becomes the Referenced Request Sequence.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from collections.abc import Iterable, Sequence
from copy import deepcopy
from dataclasses import dataclass

import highdicom as hd
from pydicom import Dataset
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ComprehensiveSRStorage
from pydicom.valuerep import validate_value

from gateway.errors import GatewayError
from inference.finding import ModelInfo, StudyFinding

# Codes (all from standard coding schemes, so dciodvfy has nothing to warn about).
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PRESENT = Code("52101004", "SCT", "Present")  # CID 240 Present-Absent
# SNOMED CT "Absent (qualifier value)", the partner of 52101004; pydicom 3.0's CID 240 table
# still lists 272519000 ("Absence findings", a finding concept, not a qualifier value).
ABSENT = Code("2667000", "SCT", "Absent")
UNDETERMINED = Code("373068000", "SCT", "Undetermined")  # CID 240
PROBABILITY = Code("122157", "DCM", "Probability")
UNITLESS = Code("1", "UCUM", "no units")
CHEST_RADIOGRAPH = Code("399208008", "SCT", "Plain X-ray of chest")
NEUTRAL_PROCEDURE = Code("363679005", "SCT", "Imaging")  # for a study the model declined
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500
COMMENT = Code("121106", "DCM", "Comment")

SR_SOP_CLASS_UID = ComprehensiveSRStorage
# Series Number = base + version (v1 9901, v2 9902, ...): a high number keeps the AI series
# after the acquired ones in viewers, and the version tells amendments apart.
SR_SERIES_BASE = 9900
CONTRIBUTION_DESCRIPTION = "AI pneumonia detection on frontal chest radiographs"
_OFFSET = re.compile(r"^([+-])(\d\d)(\d\d)$")

# A fixed namespace makes every derived UID reproducible across processes and hosts.
_NAMESPACE = uuid.UUID("6f1c2b1e-3f0a-5b7e-9a61-2c5d0e8f4a10")

# Patient and study attributes copied from the source (type 2 ones are written empty when the
# source lacks them or holds an invalid value: real inputs are imperfect, the SR must not be).
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_TYPE3_COPIED = ("IssuerOfPatientID", "StudyDescription", "PatientAge")
_CONTEXT_FALLBACK = {
    "PatientName": "patient_name",
    "PatientID": "patient_id",
    "IssuerOfPatientID": "issuer_of_patient_id",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
    "AccessionNumber": "accession_number",
    "StudyID": "study_id",
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "StudyDescription": "study_description",
    "ReferringPhysicianName": "referring_physician_name",
}


class SRBuildError(GatewayError, ValueError):
    """The finding and its source headers cannot make a valid SR (bad input, not a bug)."""

    def __init__(self, message: str, *, study_instance_uid: str = "") -> None:
        super().__init__(
            f"{message} (study {study_instance_uid})" if study_instance_uid else message
        )
        self.study_instance_uid = study_instance_uid


@dataclass(frozen=True)
class SRReference:
    """Where an SR lives: enough to reference it (e.g. as the predecessor of an amendment)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str = SR_SOP_CLASS_UID


def uid_from(*parts: str) -> str:
    """A deterministic DICOM UID under the 2.25 root (PS3.5 B.2) from the given strings. Only
    for what is the same everywhere by design (the model's Device UID) and for reports made
    before random report ids; a report's own objects use ``report_uid``."""
    name = "\x1f".join(parts)
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


def is_minted(report_id: str) -> bool:
    """True for a random report id (a canonical UUID string, as
    gateway.pipeline.inference_stage mints them); False for one made before (the Study Instance
    UID)."""
    try:
        return str(uuid.UUID(report_id)) == report_id
    except ValueError:
        return False


def report_uid(report_id: str, purpose: str = "") -> str:
    """A UID of one object of the report ``report_id`` (a minted UUID): 2.25 + the UUID itself
    for the SR (``purpose`` ""), else a name-based UUID under it, as unique as the UUID."""
    root = uuid.UUID(report_id)
    return f"2.25.{(uuid.uuid5(root, purpose) if purpose else root).int}"


def device_uid(model: ModelInfo) -> str:
    """The algorithm's Device UID: the same for the same weights, new for any new model."""
    return uid_from("device", model.name, model.content_hash)


def sr_reference(*, study_instance_uid: str, report_id: str, version: int) -> SRReference:
    """The UIDs the SR of ``(report_id, version)`` has (or will have) in ``study_instance_uid``.

    The integrator uses it to name the predecessor of an amendment without storing the SR.
    """
    if is_minted(report_id):
        return SRReference(
            study_instance_uid=study_instance_uid,
            series_instance_uid=report_uid(report_id, "sr-series"),
            sop_instance_uid=report_uid(report_id),
        )
    key = report_id or study_instance_uid  # a report made before random report ids
    return SRReference(
        study_instance_uid=study_instance_uid,
        series_instance_uid=uid_from("sr-series", key, str(version)),
        sop_instance_uid=uid_from("sr-instance", key, str(version)),
    )


def previous_sr(finding: StudyFinding) -> SRReference | None:
    """The SR that ``finding`` amends: the one of ``finding.previous_report_id`` (or, for a
    report made before random report ids, of the same id at the version before); None when no
    earlier version of the study was reported."""
    study_uid = finding.study.study_instance_uid
    if finding.previous_report_id:
        return sr_reference(
            study_instance_uid=study_uid,
            report_id=finding.previous_report_id,
            version=finding.previous_version,
        )
    if finding.version > 1 and not is_minted(finding.report_id):
        return sr_reference(
            study_instance_uid=study_uid, report_id=finding.report_id, version=finding.version - 1
        )
    return None


def sr_series_number(version: int) -> int:
    return SR_SERIES_BASE + version


def series_description(finding: StudyFinding) -> str:
    """Says which version this SR is, and which one it amends (LO: 64 characters at most)."""
    what = "AI pneumonia finding" if finding.has_result else "AI pneumonia: no result"
    text = f"{what} v{finding.version}"
    previous = previous_sr(finding)
    if previous is not None:
        text += f", amends v{finding.previous_version or finding.version - 1}"
    return f"{text} (UNVERIFIED)"[:64]


def report_time(
    finding: StudyFinding, sources: Sequence[Dataset], site_timezone: dt.tzinfo
) -> tuple[dt.datetime, str]:
    """When the report was made, as a naive local time, and the Timezone Offset From UTC it is
    local to ("+HHMM"): the sources' own offset when they carry a valid one (the copied study
    times are then in it), else the site time zone's offset at that moment."""
    moment = finding.created_at
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    for src in sources:
        text = str(src.get("TimezoneOffsetFromUTC", "") or "").strip()
        match = _OFFSET.match(text)
        if match and int(match[2]) <= 14 and int(match[3]) < 60:
            minutes = int(match[2]) * 60 + int(match[3])
            offset = dt.timedelta(minutes=-minutes if match[1] == "-" else minutes)
            return moment.astimezone(dt.timezone(offset)).replace(tzinfo=None), text
    local = moment.astimezone(site_timezone)
    offset = local.utcoffset() or dt.timedelta(0)
    sign = "-" if offset < dt.timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return local.replace(tzinfo=None), f"{sign}{minutes // 60:02d}{minutes % 60:02d}"


def build_sr(
    finding: StudyFinding,
    sources: Sequence[Dataset],
    *,
    replaces: SRReference | Sequence[SRReference] | None = None,
    site_timezone: dt.tzinfo = dt.UTC,
) -> hd.sr.ComprehensiveSR:
    """Build the SR of one finding.

    ``sources`` are the headers (read with ``stop_before_pixels``) of the study's images: at
    least every image in ``finding.images`` (or, for "no result", in ``finding.declined``);
    other headers are ignored. ``replaces`` names the SR(s) an amendment replaces; by default
    the one ``previous_sr(finding)`` names. ``site_timezone`` is the zone of the site's DICOM
    times, used when no source carries a Timezone Offset From UTC.

    Returns a highdicom ``ComprehensiveSR`` (a pydicom Dataset with file meta, ready for
    ``save_as`` or C-STORE). Raises ``SRBuildError`` for inconsistent input: no source image,
    a source from another study, a used image whose header is missing, a missing predecessor.
    """
    study_uid = finding.study.study_instance_uid
    by_uid = _checked_sources(finding, sources)
    examined = finding.images if finding.has_result else tuple(d.image for d in finding.declined)
    predecessors = _as_list(replaces if replaces is not None else previous_sr(finding))
    if finding.previous_report_id and not predecessors:
        raise SRBuildError(
            f"version {finding.version} is an amendment and must name the SR it replaces",
            study_instance_uid=study_uid,
        )

    examined_headers = [by_uid[im.sop_instance_uid] for im in examined]
    evidence = [source_header(src, finding) for src in examined_headers]
    ref = sr_reference(
        study_instance_uid=study_uid, report_id=finding.report_id, version=finding.version
    )
    dev_uid = device_uid(finding.model)
    fallback = CHEST_RADIOGRAPH if finding.has_result else NEUTRAL_PROCEDURE
    procedure = procedure_reported(examined_headers, fallback)
    content = _measurement_report(finding, evidence, dev_uid, procedure)
    if finding.declined or finding.caveats:
        _add_declined(content, finding, by_uid)

    # DICOM dates and times are local unless the instance says otherwise, and the study's are
    # copied as the modality wrote them: the SR's own times are written in the same offset.
    created, offset = report_time(finding, examined_headers, site_timezone)
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=content,
        series_instance_uid=ref.series_instance_uid,
        series_number=sr_series_number(finding.version),
        sop_instance_uid=ref.sop_instance_uid,
        instance_number=finding.version,
        manufacturer=finding.model.manufacturer,
        is_complete=True,
        is_final=True,
        is_verified=False,
        requested_procedures=referenced_requests(list(by_uid.values()), study_uid) or None,
        previous_versions=[_predecessor_header(p) for p in predecessors] or None,
        contributing_equipment=[algorithm_equipment(finding.model, dev_uid, created)],
        series_description=series_description(finding),
        manufacturer_model_name=finding.model.name,
        software_versions=finding.model.version,
        content_date=created.date(),
        content_time=created.time(),
        series_date=created.date(),
        series_time=created.time(),
    )
    sr.DeviceUID = dev_uid
    sr.TimezoneOffsetFromUTC = offset
    # Instance creation time follows the finding, so the same finding gives the same object.
    sr["InstanceCreationDate"].value = created.strftime("%Y%m%d")
    sr["InstanceCreationTime"].value = created.strftime("%H%M%S")
    return sr


def _checked_sources(finding: StudyFinding, sources: Sequence[Dataset]) -> dict[str, Dataset]:
    """The sources by SOP Instance UID, after checking the finding and the sources agree."""
    study_uid = finding.study.study_instance_uid
    if not study_uid:
        raise SRBuildError("finding has no Study Instance UID")
    if finding.has_result != (finding.present is not None):
        raise SRBuildError(
            "probability and present must be both set or both None", study_instance_uid=study_uid
        )
    if finding.probability is not None and not 0.0 <= finding.probability <= 1.0:
        raise SRBuildError(
            f"probability {finding.probability} is outside [0, 1]", study_instance_uid=study_uid
        )
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    for ds in sources:
        if str(ds.get("StudyInstanceUID", "")) != study_uid:
            raise SRBuildError(
                f"source {ds.get('SOPInstanceUID', '?')} belongs to another study",
                study_instance_uid=study_uid,
            )
    examined = finding.images if finding.has_result else tuple(d.image for d in finding.declined)
    if not examined:
        raise SRBuildError("finding references no image", study_instance_uid=study_uid)
    missing = [im.sop_instance_uid for im in examined if im.sop_instance_uid not in by_uid]
    if missing:
        raise SRBuildError(f"no source header for images {missing}", study_instance_uid=study_uid)
    return by_uid


def _as_list(replaces: SRReference | Sequence[SRReference] | None) -> list[SRReference]:
    if replaces is None:
        return []
    if isinstance(replaces, SRReference):
        return [replaces]
    return list(replaces)


def _predecessor_header(ref: SRReference) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = ref.study_instance_uid
    ds.SeriesInstanceUID = ref.series_instance_uid
    ds.SOPInstanceUID = ref.sop_instance_uid
    ds.SOPClassUID = ref.sop_class_uid
    return ds


def _valid(keyword: str, value: object) -> bool:
    try:
        validate_value(dictionary_VR(keyword), value, pydicom_config.RAISE)
    except (ValueError, KeyError):
        return False
    return True


def source_header(src: Dataset, finding: StudyFinding) -> Dataset:
    """A small, clean copy of a source header: the UIDs and image size a derived object references,
    and the patient/study attributes it copies, with invalid values dropped (e.g. a Patient's
    Age of "81", which is not a valid AS and would make the SR itself invalid)."""
    ds = Dataset()
    for kw in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Rows",
        "Columns",
    ):
        if kw not in src:
            raise SRBuildError(
                f"source header lacks {kw}", study_instance_uid=finding.study.study_instance_uid
            )
        ds[kw] = src[kw]
    # highdicom's image library adds TID 1603 projection descriptors (orientation, imager
    # pixel spacing) when Modality is CR/DX. Offer them only when the source has usable
    # values (RG1's spacing is zero); otherwise a neutral Modality skips the descriptors.
    # Modality here only steers the library: the SR's own Modality is always SR.
    orientation = src.get("PatientOrientation")
    spacing = src.get("ImagerPixelSpacing")
    if (
        orientation is not None
        and len(orientation) == 2
        and all(orientation)
        and spacing is not None
        and len(spacing) == 2
        and all(float(v) > 0 for v in spacing)
    ):
        ds.Modality = src.get("Modality", "OT")
        ds.PatientOrientation = orientation
        ds.ImagerPixelSpacing = spacing
    else:
        ds.Modality = "OT"
    # The character set is copied as it is (it may be multi-valued, ISO 2022): the copied
    # names and descriptions are only readable with it.
    if "SpecificCharacterSet" in src:
        ds.SpecificCharacterSet = src.SpecificCharacterSet
    for kw in (*_TYPE2_COPIED, *_TYPE3_COPIED):
        value = src.get(kw)
        if value in (None, "") and kw in _CONTEXT_FALLBACK:
            value = getattr(finding.study, _CONTEXT_FALLBACK[kw]) or None
        if kw == "PatientSex" and value not in ("M", "F", "O"):
            value = None
        if value not in (None, "") and _valid(kw, str(value)):
            setattr(ds, kw, value)
        elif kw in _TYPE2_COPIED:
            setattr(ds, kw, "")
    return ds


def algorithm_equipment(
    model: ModelInfo, dev_uid: str, created: dt.datetime
) -> hd.ContributingEquipment:
    item = hd.ContributingEquipment(
        manufacturer=model.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=_short_hash(model.content_hash),
        contribution_datetime=created,
        contribution_description=CONTRIBUTION_DESCRIPTION,
    )
    item.DeviceUID = dev_uid
    return item


def _short_hash(content_hash: str) -> str:
    # LO holds 64 characters: a sha256 hex fits exactly; anything else is hashed to fit.
    if len(content_hash) <= 64:
        return content_hash
    return hashlib.sha256(content_hash.encode()).hexdigest()


def procedure_reported(sources: Iterable[Dataset], fallback: Code) -> list[Code]:
    """AIR: the procedure reported is the imaging procedure. Use the source's own code when it
    is from a standard scheme (a private "99..." code would draw warnings and mean little),
    else ``fallback``."""
    for src in sources:
        for item in src.get("ProcedureCodeSequence", []):
            scheme = str(item.get("CodingSchemeDesignator", ""))
            value = str(item.get("CodeValue", ""))
            meaning = str(item.get("CodeMeaning", ""))
            if value and meaning and scheme in ("LN", "SCT", "DCM", "RADLEX", "RADLEX_PLAYBOOK"):
                return [Code(value, scheme, meaning)]
    return [fallback]


# Referenced Request Sequence item (SR Document General Module): type 2 attributes copied from
# the source's Request Attributes Sequence item, else from the source's own top level.
_REQUEST_TEXT = (
    "AccessionNumber",
    "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
)


def referenced_requests(sources: Sequence[Dataset], study_uid: str) -> list[Dataset]:
    """The orders the images were acquired for, as Referenced Request Sequence items: one per
    Request Attributes Sequence item of the sources (distinct accession number and requested
    procedure ID), or one from the Accession Number when a source has no such sequence. Empty
    when the sources name no order at all (the attribute is then absent: type 1C)."""
    items: dict[tuple[str, str], Dataset] = {}
    for src in sources:
        requests = list(src.get("RequestAttributesSequence", None) or [])
        if not requests and str(src.get("AccessionNumber", "") or ""):
            requests = [Dataset()]
        for request in requests:
            item = _request_item(request, src, study_uid)
            items.setdefault((item.AccessionNumber, item.RequestedProcedureID), item)
    return list(items.values())


def _request_item(request: Dataset, src: Dataset, study_uid: str) -> Dataset:
    item = Dataset()
    uid = str(request.get("StudyInstanceUID", "") or "")
    item.StudyInstanceUID = uid if uid and _valid("StudyInstanceUID", uid) else study_uid
    item.ReferencedStudySequence = []
    for kw in _REQUEST_TEXT:
        value = str(request.get(kw, "") or src.get(kw, "") or "")
        setattr(item, kw, value if value and _valid(kw, value) else "")
    issuer = request.get("IssuerOfAccessionNumberSequence") or src.get(
        "IssuerOfAccessionNumberSequence"
    )
    if issuer:
        item.IssuerOfAccessionNumberSequence = deepcopy(issuer)
    item.RequestedProcedureCodeSequence = [
        _code_item(code)
        for code in request.get("RequestedProcedureCodeSequence", None) or []
        if all(str(code.get(kw, "") or "") for kw in _CODE_KEYWORDS)
    ][:1]  # type 2, zero or one item
    return item


_CODE_KEYWORDS = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")


def _code_item(code: Dataset) -> Dataset:
    item = Dataset()
    for kw in (*_CODE_KEYWORDS, "CodingSchemeVersion"):
        if str(code.get(kw, "") or ""):
            setattr(item, kw, code.get(kw))
    return item


def _add_declined(
    content: hd.sr.MeasurementReport, finding: StudyFinding, by_uid: dict[str, Dataset]
) -> None:
    """List the images the model did not use, and why, in TID 1500's Qualitative Evaluations
    container: what was received and why it was declined, in plain words; then the finding's
    caveats (e.g. a patient outside the ages the model was validated on)."""
    used = len(finding.images)
    total = used + len(finding.declined)
    summary = (
        f"No result: none of the {total} image(s) received could be used"
        if not finding.has_result
        else f"{used} of {total} image(s) used"
    )
    summary += " (the model reads frontal chest radiographs only)."
    texts = [summary] if finding.declined else []
    texts += [f"Caveat: {caveat}" for caveat in finding.caveats]
    for declined in finding.declined:
        src = by_uid.get(declined.image.sop_instance_uid)
        kind = str(src.get("Modality", "") or "") if src is not None else ""
        texts.append(
            f"{kind or 'image'} {declined.image.sop_instance_uid} not used: {declined.reason}"
        )
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=COMMENT,
                value=text[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for text in texts
        ]
    )
    content[0].ContentSequence.append(container)


def _measurement_report(
    finding: StudyFinding, evidence: Sequence[Dataset], dev_uid: str, procedure: list[Code]
) -> hd.sr.MeasurementReport:
    model = finding.model
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[
            f"threshold={model.threshold:g}",
            f"sha256={model.content_hash}",
            f"rule={finding.rule}",
            *([f"calibration={model.site_calibration}"] if model.site_calibration else []),
        ],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=dev_uid,
            name=model.name,
            manufacturer_name=model.manufacturer,
            model_name=f"{model.name} {model.version}",
        ),
    )
    value = UNDETERMINED if finding.present is None else PRESENT if finding.present else ABSENT
    measurements = None
    if finding.probability is not None:
        measurements = [
            hd.sr.Measurement(
                name=PROBABILITY,
                value=round(float(finding.probability), 6),
                unit=UNITLESS,
                # The group's TID 4019 below covers this measurement too; repeating it here
                # would double the tree for no information.
            )
        ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=report_uid(finding.report_id, "tracking")
            if is_minted(finding.report_id)
            else uid_from(
                "tracking", finding.report_id or finding.study.study_instance_uid, "pneumonia"
            ),
            identifier="AI pneumonia finding",
        ),
        finding_type=PNEUMONIA,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=PNEUMONIA, value=value)],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(ds.SOPClassUID),
                referenced_sop_instance_uid=str(ds.SOPInstanceUID),
            )
            for ds in evidence
        ],
    )
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=[group],
        referenced_images=list(evidence),
    )
