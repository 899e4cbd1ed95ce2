"""One function per FHIR R4 resource of the report: plain JSON dicts, validated elsewhere.

References between the resources of a bundle are ``urn:uuid:`` full URLs that the server
replaces with the ids it assigns (or finds, for a conditional create that matched).
"""

from __future__ import annotations

import base64
from typing import Any

import fhir_mappings.codes as codes
from fhir_mappings.config import FhirMappingConfig
from fhir_mappings.dates import effective_datetime, instant
from fhir_mappings.summary import conclusion_text, summary_text
from inference.finding import StudyFinding

Json = dict[str, Any]


def identifier(system: str, value: str, **extra: Any) -> Json:
    return {"system": system, "value": value, **extra} if system else {"value": value, **extra}


def dicom_uid(uid: str) -> Json:
    """A DICOM UID as a FHIR Identifier (system urn:dicom:uid, value urn:oid:...)."""
    return {"system": codes.DICOM_UID_SYSTEM, "value": f"urn:oid:{uid}"}


def imaging_study_reference(finding: StudyFinding) -> Json:
    """Logical reference to the ImagingStudy by Study Instance UID (the EHR may not hold one)."""
    return {
        "type": "ImagingStudy",
        "identifier": dicom_uid(finding.study.study_instance_uid),
        "display": "Source imaging study",
    }


def ai_meta() -> Json:
    """AI Transparency on FHIR: label the resource as asserted by an AI."""
    return {"security": [codes.AI_ASSERTED]}


def device(finding: StudyFinding, config: FhirMappingConfig) -> Json:
    """The algorithm as a Device; identified by the model's content hash (new model, new Device).
    A site-calibrated model says so in a note (its version also ends "+site.<hash>")."""
    m = finding.model
    notes = [{"text": f"Operating threshold {m.threshold:.4f}; sha256 {m.content_hash}"}]
    if m.site_calibration:
        notes.append({"text": f"Calibrated for this site: {m.site_calibration}"})
    return {
        "resourceType": "Device",
        "identifier": [identifier(config.device_identifier_system, m.content_hash)],
        "status": "active",
        "manufacturer": m.manufacturer,
        "deviceName": [{"name": m.name, "type": codes.DEVICE_NAME_TYPE}],
        "type": {"text": "AI algorithm: pneumonia detection on chest radiographs"},
        "version": [{"value": m.version}],
        "note": notes,
    }


def _observation_base(
    finding: StudyFinding,
    config: FhirMappingConfig,
    *,
    obs_id: str,
    subject: Json,
    device_url: str,
    status: str,
    encounter: Json | None,
) -> Json:
    obs: Json = {
        "resourceType": "Observation",
        "meta": ai_meta(),
        "identifier": [identifier_for(finding, config, obs_id)],
        "status": status,
        "category": [{"coding": [codes.IMAGING_CATEGORY]}],
        "subject": subject,
        "issued": instant(finding.created_at),
        "device": {"reference": device_url},
        "derivedFrom": [imaging_study_reference(finding)],
    }
    if encounter:
        obs["encounter"] = encounter
    effective = effective_datetime(finding.study, config.timezone)
    if effective:
        obs["effectiveDateTime"] = effective
    return obs


def identifier_for(finding: StudyFinding, config: FhirMappingConfig, suffix: str) -> Json:
    """Our stable identifier of one resource of this study's report (same for every version)."""
    uid = finding.study.study_instance_uid
    return identifier(config.report_identifier_system, f"{uid}/{suffix}" if suffix else uid)


def probability_observation(
    finding: StudyFinding,
    config: FhirMappingConfig,
    *,
    subject: Json,
    device_url: str,
    status: str,
    encounter: Json | None = None,
) -> Json:
    """The calibrated probability of pneumonia, in percent (UCUM ``%``), coded as the SR codes
    it (DCM 122157 "Probability"); the text says of what."""
    assert finding.probability is not None
    obs = _observation_base(
        finding,
        config,
        obs_id="probability",
        subject=subject,
        device_url=device_url,
        status=status,
        encounter=encounter,
    )
    obs["code"] = {"coding": [codes.PROBABILITY_CODE], "text": "Probability of pneumonia (AI)"}
    obs["valueQuantity"] = {"value": round(finding.probability * 100, 2), **codes.PERCENT}
    obs["method"] = {"text": f"{finding.model.name} {finding.model.version}; {finding.rule}"}
    obs["note"] = [{"text": f"Operating threshold {finding.model.threshold * 100:.1f} %"}]
    return obs


def finding_observation(
    finding: StudyFinding,
    config: FhirMappingConfig,
    *,
    subject: Json,
    device_url: str,
    status: str,
    probability_url: str,
    encounter: Json | None = None,
) -> Json:
    """Pneumonia present/absent at the model's operating threshold."""
    obs = _observation_base(
        finding,
        config,
        obs_id="finding",
        subject=subject,
        device_url=device_url,
        status=status,
        encounter=encounter,
    )
    obs["code"] = {"coding": [codes.PNEUMONIA], "text": "Pneumonia (AI finding)"}
    present = bool(finding.present)
    obs["valueCodeableConcept"] = {"coding": [codes.PRESENT if present else codes.ABSENT]}
    obs["interpretation"] = [{"coding": [codes.POSITIVE if present else codes.NEGATIVE]}]
    obs["derivedFrom"].append({"reference": probability_url})
    return obs


def diagnostic_report(
    finding: StudyFinding,
    config: FhirMappingConfig,
    *,
    subject: Json,
    result_urls: list[str],
    status: str,
    version_id: str,
    based_on: Json | None = None,
    encounter: Json | None = None,
) -> Json:
    """The DiagnosticReport of one version (``version_id``: ``ehr.report_version_id``).

    A study without a usable image gets a report that says what was received and why nothing
    was analysed: no results, no conclusion code, and a code text that is not a chest finding.
    """
    study = finding.study
    ids = [
        identifier_for(finding, config, ""),
        identifier(config.report_identifier_system + ":version", version_id),
    ]
    if study.accession_number:
        ids.insert(
            0,
            identifier(
                config.accession_identifier_system,
                study.accession_number,
                type={"coding": [codes.ACCESSION_TYPE]},
            ),
        )
    title = (
        "AI chest radiograph analysis (pneumonia)"
        if finding.has_result
        else "AI image analysis: no result (no image suitable for the algorithm)"
    )
    report: Json = {
        "resourceType": "DiagnosticReport",
        "meta": ai_meta(),
        "identifier": ids,
        "status": status,
        "category": [{"coding": codes.CATEGORY_RADIOLOGY}],
        "code": {"coding": [codes.REPORT_CODE], "text": title},
        "subject": subject,
        "issued": instant(finding.created_at),
        "imagingStudy": [imaging_study_reference(finding)],
        "conclusion": conclusion_text(finding),
        "presentedForm": [
            {
                "contentType": "text/plain; charset=utf-8",
                "language": "en",
                "data": base64.b64encode(summary_text(finding).encode("utf-8")).decode("ascii"),
                "title": "AI result summary (unverified)",
                "creation": instant(finding.created_at),
            }
        ],
    }
    if based_on:
        report["basedOn"] = [based_on]
    if encounter:
        report["encounter"] = encounter
    effective = effective_datetime(study, config.timezone)
    if effective:
        report["effectiveDateTime"] = effective
    if result_urls:
        report["result"] = [{"reference": u} for u in result_urls]
    if finding.has_result and finding.present:
        # Only a positive finding gets a conclusion code: SNOMED CT has no pre-coordinated
        # "no pneumonia" concept we would trust here; the negative is in the conclusion text
        # and in the Observation (Absent).
        report["conclusionCode"] = [{"coding": [codes.PNEUMONIA]}]
    return report
