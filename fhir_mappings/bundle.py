"""A study finding as one FHIR R4 transaction Bundle, and the decision whether to post it.

Idempotence (a re-sent or re-processed study never makes a second report):
- Device: conditional create on the model's content-hash identifier (one Device per model).
- Version 1: DiagnosticReport and Observations are conditional creates (``ifNoneExist`` on our
  stable per-study identifier); posting the same bundle again matches and creates nothing.
- Version N > 1 (the study changed): conditional updates (``PUT Type?identifier=...``) of the
  same DiagnosticReport and Observations; the server keeps the earlier version in the resource's
  history. A late re-send of an older version 1 matches the existing report and changes nothing.
  Re-sending version N rewrites identical content (PUT is idempotent).
- Each version has its own identifier (``report:version``, ``ehr.report_version_id``) on the
  DiagnosticReport, and its own Provenance: R4's Provenance has no ``identifier``, so it carries
  a ``meta.tag`` with that id and is conditionally created on ``_tag``. A version that replaces
  one in the EHR names it (``entity`` role ``revision``, activity UPDATE).

Status (``ReportStatus``): ``preliminary`` by default, for every version; a site that files AI
output as ``final`` gets ``final``, then ``amended`` when a version replaces one in the EHR.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import fhir_mappings.resources as resources
from fhir_mappings.config import FhirMappingConfig, ReportStatus, UnknownPatientPolicy
from fhir_mappings.ehr import EhrRecords, earlier_version, link_order, report_version_id
from fhir_mappings.matching import demographic_conflicts
from fhir_mappings.provenance import provenance
from fhir_mappings.validate import validate_r4_bundle
from inference.finding import StudyFinding

Json = dict[str, Any]


@dataclass(frozen=True)
class PatientIdentifier:
    """The patient's identifier in the EHR's terms (PHI: never log ``value``)."""

    system: str
    value: str

    def token(self) -> str:
        """Search token ``system|value`` for ``Patient?identifier=``."""
        return f"{self.system}|{self.value}"


class DeliveryStatus(StrEnum):
    READY = "ready"  # ``bundle`` is to be posted
    HELD = "held"  # a person decides: patient unknown, unidentifiable or not the same person
    SKIPPED = "skipped"  # a "no result" finding and post_no_result is off


@dataclass(frozen=True)
class FhirDeliveryPlan:
    """What the worker should do with a finding. ``reason`` and ``notes`` are for the audit log
    (no PHI): ``notes`` says how the subject, the order and the earlier version were linked."""

    status: DeliveryStatus
    reason: str
    bundle: Json | None = None
    notes: dict[str, str] = field(default_factory=dict)


def patient_identifier(
    finding: StudyFinding, config: FhirMappingConfig
) -> PatientIdentifier | None:
    """The patient identifier to resolve in the EHR, or None when the study has none usable.

    The system is the configured one. Without it there is none: DICOM's Issuer of Patient ID is
    free text (a name, a local code), not a URI the EHR would know, so it is never used as one.
    """
    value = finding.study.patient_id.strip()
    system = config.patient_identifier_system
    if not value or not system:
        return None
    return PatientIdentifier(system=system, value=value)


def subject_reference(*, patient_id: str | None, identifier: PatientIdentifier | None) -> Json:
    """``Patient/<id>`` when resolved, else a logical reference by identifier."""
    if patient_id:
        return {"reference": f"Patient/{patient_id}"}
    if identifier is None:
        raise ValueError("either patient_id or identifier is required")
    return {
        "type": "Patient",
        "identifier": {"system": identifier.system, "value": identifier.value},
    }


def _held(reason: str) -> FhirDeliveryPlan:
    return FhirDeliveryPlan(DeliveryStatus.HELD, reason)


def _subject_problem(
    finding: StudyFinding, config: FhirMappingConfig, ehr: EhrRecords
) -> str | None:
    """Why the report cannot be filed against a subject (None: it can)."""
    if patient_identifier(finding, config) is None:
        if not finding.study.patient_id.strip():
            return "study has no Patient ID"
        return "no patient identifier system configured (the Issuer of Patient ID is not one)"
    if ehr.patient is None:
        if config.unknown_patient_policy is UnknownPatientPolicy.HOLD:
            return "patient not found in the EHR"
        return None
    conflicts = demographic_conflicts(finding.study, ehr.patient)
    if conflicts:
        return "patient found by identifier, but " + " and ".join(conflicts)
    return None


def plan_delivery(
    finding: StudyFinding, config: FhirMappingConfig, *, ehr: EhrRecords
) -> FhirDeliveryPlan:
    """Decide and build, from what the worker found in the EHR (``ehr``).

    Held (nothing posted, a person decides) when the patient cannot be identified, is not found
    and the policy is hold, or was found by identifier but disagrees with the DICOM header
    (``matching``); and when the order found by accession number is another patient's, or is
    missing and the order policy is hold. Never creates a Patient. Raises ``FhirMappingError``
    when the bundle is not valid R4.
    """
    if not finding.has_result and not config.post_no_result:
        return FhirDeliveryPlan(DeliveryStatus.SKIPPED, "no result and post_no_result is off")
    problem = _subject_problem(finding, config, ehr)
    if problem:
        return _held(problem)
    patient_id = str(ehr.patient["id"]) if ehr.patient else None
    order = link_order(finding, config, ehr, patient_id=patient_id)
    if order.hold:
        return _held(order.note)
    ident = patient_identifier(finding, config)
    subject = subject_reference(patient_id=patient_id, identifier=ident)
    revises = earlier_version(finding, config, ehr)
    bundle = build_transaction_bundle(
        finding,
        config,
        subject=subject,
        based_on=order.based_on,
        encounter=order.encounter,
        revises=revises,
    )
    how = "resolved patient" if patient_id else "patient referenced by identifier"
    notes = {
        "subject": how,
        "order": order.note,
        "revises": "an earlier version in the EHR" if revises else "nothing in the EHR",
    }
    return FhirDeliveryPlan(DeliveryStatus.READY, how, bundle, notes)


def report_status(config: FhirMappingConfig, *, revises: bool) -> str:
    """``preliminary`` (unverified AI output), or the site's ``final`` / ``amended``."""
    if config.report_status is ReportStatus.PRELIMINARY:
        return "preliminary"
    return "amended" if revises else "final"


def _full_url(*parts: str) -> str:
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, "|".join(parts)))


def _token(ident: Json) -> str:
    system = quote(ident.get("system", ""), safe=":/")
    return f"{system}|{quote(ident['value'], safe=':/')}" if system else quote(ident["value"])


def _write_request(resource: Json, *, amend: bool) -> Json:
    """Conditional create (first version) or conditional update (amendment) by our identifier."""
    rtype = resource["resourceType"]
    query = f"identifier={_token(resource['identifier'][_stable_index(resource)])}"
    if amend:
        return {"method": "PUT", "url": f"{rtype}?{query}"}
    return {"method": "POST", "url": rtype, "ifNoneExist": query}


def _stable_index(resource: Json) -> int:
    # DiagnosticReport: [accession?, stable, version]; Observation / Device: [stable].
    idents = resource["identifier"]
    if resource["resourceType"] == "DiagnosticReport":
        return next(i for i, x in enumerate(idents) if "type" not in x)
    return len(idents) - 1


def build_transaction_bundle(
    finding: StudyFinding,
    config: FhirMappingConfig,
    *,
    subject: Json,
    based_on: Json | None = None,
    encounter: Json | None = None,
    revises: Json | None = None,
) -> Json:
    """The transaction Bundle (R4 JSON dict) for a finding; validated before it is returned.

    ``subject`` comes from ``subject_reference``; ``based_on`` and ``encounter`` from
    ``ehr.link_order``; ``revises`` is the earlier version in the EHR (``ehr.earlier_version``)
    or empty. Raises ``FhirMappingError`` if the result is not valid R4.
    """
    uid = finding.study.study_instance_uid
    version = str(finding.version)
    amend = finding.version > 1
    status = report_status(config, revises=bool(revises))
    device = resources.device(finding, config)
    device_url = _full_url("device", finding.model.content_hash)
    entries: list[Json] = [
        {"fullUrl": device_url, "resource": device, "request": _write_request(device, amend=False)}
    ]
    result_urls: list[str] = []
    if finding.has_result:
        common: dict[str, Any] = {
            "subject": subject,
            "device_url": device_url,
            "status": status,
            "encounter": encounter,
        }
        prob_url = _full_url("probability", uid, version)
        prob = resources.probability_observation(finding, config, **common)
        find_url = _full_url("finding", uid, version)
        find = resources.finding_observation(finding, config, **common, probability_url=prob_url)
        for url, obs in ((find_url, find), (prob_url, prob)):
            entries.append(
                {"fullUrl": url, "resource": obs, "request": _write_request(obs, amend=amend)}
            )
        result_urls = [find_url, prob_url]
    version_id = report_version_id(finding)
    report = resources.diagnostic_report(
        finding,
        config,
        subject=subject,
        result_urls=result_urls,
        status=status,
        version_id=version_id,
        based_on=based_on,
        encounter=encounter,
    )
    report_url = _full_url("report", uid, version)
    entries.append(
        {"fullUrl": report_url, "resource": report, "request": _write_request(report, amend=amend)}
    )
    tag = {"system": config.report_identifier_system + ":provenance", "code": version_id}
    prov = provenance(
        finding,
        config,
        target_urls=[report_url, *result_urls],
        device_url=device_url,
        tag=tag,
        revises=revises or {},
    )
    entries.append(
        {
            "fullUrl": _full_url("provenance", version_id),
            "resource": prov,
            "request": {
                "method": "POST",
                "url": "Provenance",
                "ifNoneExist": f"_tag={_token({'system': tag['system'], 'value': tag['code']})}",
            },
        }
    )
    bundle: Json = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    validate_r4_bundle(bundle, study_uid=uid)
    return bundle
