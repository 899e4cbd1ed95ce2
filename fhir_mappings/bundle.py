"""A study finding as one FHIR R4 transaction Bundle, and the decision whether to post it.

Idempotence (a re-sent or re-processed study never makes a second report):
- Device: conditional create on the model's content-hash identifier (one Device per model).
- Version 1: DiagnosticReport and Observations are conditional creates (``ifNoneExist`` on our
  stable per-study identifier); posting the same bundle again matches and creates nothing.
- Version N > 1 (the study changed): conditional updates (``PUT Type?identifier=...``) of the
  same DiagnosticReport and Observations, status ``amended``; the server keeps the earlier
  version in the resource's history. A late re-send of an older version 1 matches the existing
  report and changes nothing. Re-sending version N rewrites identical content (PUT is idempotent).
- Provenance has no ``identifier`` element in R4, so it carries a ``meta.tag`` with our
  report-version id and is conditionally created on ``_tag``: one Provenance per report version.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import quote

from fhir_mappings import resources
from fhir_mappings.config import FhirMappingConfig, UnknownPatientPolicy
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
    HELD = "held"  # patient unknown (or unidentifiable) and the policy is hold: admin decides
    SKIPPED = "skipped"  # a "no result" finding and post_no_result is off


@dataclass(frozen=True)
class FhirDeliveryPlan:
    """What the worker should do with a finding. ``reason`` is for the audit log (no PHI)."""

    status: DeliveryStatus
    reason: str
    bundle: Json | None = None


def patient_identifier(
    finding: StudyFinding, config: FhirMappingConfig
) -> PatientIdentifier | None:
    """The patient identifier to resolve in the EHR, or None when the study has none usable.

    The system is the configured one; without it, the DICOM Issuer of Patient ID when present.
    """
    value = finding.study.patient_id.strip()
    system = config.patient_identifier_system or finding.study.issuer_of_patient_id.strip()
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


def plan_delivery(
    finding: StudyFinding,
    config: FhirMappingConfig,
    *,
    resolved_patient_id: str | None,
) -> FhirDeliveryPlan:
    """Decide and build: the worker calls this after ``resolve_patient`` (None = not found).

    Never creates a Patient. Raises ``FhirMappingError`` when the bundle is not valid R4.
    """
    if not finding.has_result and not config.post_no_result:
        return FhirDeliveryPlan(DeliveryStatus.SKIPPED, "no result and post_no_result is off")
    ident = patient_identifier(finding, config)
    if resolved_patient_id is None:
        if ident is None:
            return FhirDeliveryPlan(
                DeliveryStatus.HELD, "study has no patient identifier with a known system"
            )
        if config.unknown_patient_policy is UnknownPatientPolicy.HOLD:
            return FhirDeliveryPlan(DeliveryStatus.HELD, "patient not found in the EHR")
    subject = subject_reference(patient_id=resolved_patient_id, identifier=ident)
    bundle = build_transaction_bundle(finding, config, subject=subject)
    how = "resolved patient" if resolved_patient_id else "patient referenced by identifier"
    return FhirDeliveryPlan(DeliveryStatus.READY, how, bundle)


def _full_url(*parts: str) -> str:
    return "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, "|".join(parts)))


def _token(ident: Json) -> str:
    system = quote(ident.get("system", ""), safe=":/")
    return f"{system}|{quote(ident['value'], safe=':/')}" if system else quote(ident["value"])


def _write_request(resource: Json, *, amend: bool) -> Json:
    """Conditional create (first version) or conditional update (amendment) by our identifier."""
    rtype = resource["resourceType"]
    # The stable identifier is the one in our report system: the last of the list.
    query = f"identifier={_token(resource['identifier'][_stable_index(resource)])}"
    if amend:
        return {"method": "PUT", "url": f"{rtype}?{query}"}
    return {"method": "POST", "url": rtype, "ifNoneExist": query}


def _stable_index(resource: Json) -> int:
    # DiagnosticReport: [accession?, stable, version?]; Observation / Device: [stable].
    idents = resource["identifier"]
    if resource["resourceType"] == "DiagnosticReport":
        return next(i for i, x in enumerate(idents) if "type" not in x)
    return len(idents) - 1


def build_transaction_bundle(
    finding: StudyFinding, config: FhirMappingConfig, *, subject: Json
) -> Json:
    """The transaction Bundle (R4 JSON dict) for a finding; validated before it is returned.

    ``subject`` comes from ``subject_reference``. Raises ``FhirMappingError`` if invalid.
    """
    uid = finding.study.study_instance_uid
    version = str(finding.version)
    amend = finding.version > 1
    status = "amended" if amend else "final"
    device = resources.device(finding, config)
    device_url = _full_url("device", finding.model.content_hash)
    entries: list[Json] = [
        {
            "fullUrl": device_url,
            "resource": device,
            "request": _write_request(device, amend=False),
        }
    ]
    result_urls: list[str] = []
    if finding.has_result:
        prob_url = _full_url("probability", uid, version)
        prob = resources.probability_observation(
            finding, config, subject=subject, device_url=device_url, status=status
        )
        find_url = _full_url("finding", uid, version)
        find = resources.finding_observation(
            finding,
            config,
            subject=subject,
            device_url=device_url,
            status=status,
            probability_url=prob_url,
        )
        for url, obs in ((find_url, find), (prob_url, prob)):
            entries.append(
                {"fullUrl": url, "resource": obs, "request": _write_request(obs, amend=amend)}
            )
        result_urls = [find_url, prob_url]
    report = resources.diagnostic_report(finding, config, subject=subject, result_urls=result_urls)
    report_url = _full_url("report", uid, version)
    entries.append(
        {"fullUrl": report_url, "resource": report, "request": _write_request(report, amend=amend)}
    )
    version_id = finding.report_id or f"{uid}/v{version}"
    tag = {"system": config.report_identifier_system + ":provenance", "code": version_id}
    prov = resources.provenance(
        finding, target_urls=[report_url, *result_urls], device_url=device_url, tag=tag
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
