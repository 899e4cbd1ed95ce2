"""What the EHR already holds, as the worker found it before building a bundle, and the pure
decisions taken on it: the order a report is based on and the report version it replaces.

The worker looks up (``gateway.deliver.fhir_client``) the Patient by identifier, the
ServiceRequest by accession number (``order_identifier``) and, for a later version, the history
of our DiagnosticReport (``report_search_identifier``); ``plan_delivery`` decides on what it found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fhir_mappings.codes as codes
from fhir_mappings.config import FhirMappingConfig, UnknownOrderPolicy
from inference.finding import StudyFinding

Json = dict[str, Any]


@dataclass(frozen=True)
class EhrRecords:
    """Resources found in the EHR (PHI: never log them). Empty: nothing found or looked up."""

    patient: Json | None = None  # the one Patient with the study's patient identifier
    orders: tuple[Json, ...] = ()  # ServiceRequests with the study's accession number
    report_versions: tuple[Json, ...] = ()  # our DiagnosticReport's versions, newest first
    # True when these come from the EHR; False when nothing was looked up (the outbox).
    consulted: bool = False


@dataclass(frozen=True)
class OrderLink:
    """``basedOn`` and ``encounter`` for the report, or why there are none (``note``)."""

    based_on: Json | None
    encounter: Json | None
    note: str
    hold: bool = False


def version_identifier_system(config: FhirMappingConfig) -> str:
    return config.report_identifier_system + ":version"


def report_version_id(finding: StudyFinding) -> str:
    """Our identifier of one version of a study's report.

    The worker's report id is unique per study version; the version is added so that findings
    stored before that (report id = Study Instance UID) still get one identifier per version.
    """
    return f"{finding.report_id or finding.study.study_instance_uid}/v{finding.version}"


def report_search_identifier(config: FhirMappingConfig, finding: StudyFinding) -> tuple[str, str]:
    """(system, value) of our report's identifier that stays the same across versions."""
    return config.report_identifier_system, finding.study.study_instance_uid


def order_identifier(finding: StudyFinding, config: FhirMappingConfig) -> tuple[str, str] | None:
    """(system, accession number) to find the order by; None without either."""
    value = finding.study.accession_number.strip()
    if not value or not config.accession_identifier_system:
        return None
    return config.accession_identifier_system, value


def earlier_version(finding: StudyFinding, config: FhirMappingConfig, ehr: EhrRecords) -> Json:
    """The reference to the version this one replaces; {} when there is none.

    From the EHR: the newest version there that is older than this one, as a versioned
    reference (a retried delivery finds its own version on top, when the transaction went
    through but the answer was lost: the one below it is then the earlier version; a later
    version of the study found there is never the one this replaces); {} when the EHR holds no
    earlier version. Without the EHR (the outbox): a logical reference by the identifier of the
    version the finding says it amends.
    """
    if finding.version <= 1:
        return {}
    system, ours = version_identifier_system(config), report_version_id(finding)
    if not ehr.consulted:
        if not finding.previous_report_id:
            return {}
        value = f"{finding.previous_report_id}/v{finding.previous_version}"
        return {"type": "DiagnosticReport", "identifier": {"system": system, "value": value}}
    for resource in ehr.report_versions:
        versions = [
            i for i in resource.get("identifier", []) if i.get("system") == system and "value" in i
        ]
        if any(i["value"] == ours for i in versions):
            continue
        if any((_version_number(i["value"]) or 0) >= finding.version for i in versions):
            continue  # this version or a later one of the study: not the one this replaces
        rid, vid = resource.get("id"), resource.get("meta", {}).get("versionId")
        if not rid or not vid:
            continue
        ref: Json = {"reference": f"DiagnosticReport/{rid}/_history/{vid}"}
        if versions:
            ref["identifier"] = {"system": system, "value": versions[0]["value"]}
        return ref
    return {}


def _version_number(value: str) -> int | None:
    """N of a version identifier ``<report id>/v<N>`` (``report_version_id``); None otherwise."""
    _, sep, number = str(value).rpartition("/v")
    return int(number) if sep and number.isdigit() else None


def _patient_id_of(reference: Json) -> str:
    """The id in a literal ``[base/]Patient/<id>`` reference, else ""."""
    parts = str(reference.get("reference", "")).split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == "Patient" else ""


def link_order(
    finding: StudyFinding, config: FhirMappingConfig, ehr: EhrRecords, *, patient_id: str | None
) -> OrderLink:
    """basedOn the one ServiceRequest with the study's accession number, and its encounter.

    An order is linked only when it is the resolved patient's own; an order of another patient
    holds the report (accession and patient identifier contradict each other).
    """
    ident = order_identifier(finding, config)
    if ident is None:
        why = (
            "no accession number"
            if not finding.study.accession_number.strip()
            else ("no accession identifier system configured")
        )
        return OrderLink(None, None, f"order not looked up: {why}")
    if len(ehr.orders) > 1:
        return OrderLink(None, None, "several orders have the accession number: basedOn left out")
    if not ehr.orders:
        return _unknown_order(ident, config)
    order = ehr.orders[0]
    owner = _patient_id_of(order.get("subject") or {})
    if patient_id is None or not owner:
        return OrderLink(None, None, "order found, its patient not checked: basedOn left out")
    if owner != patient_id:
        return OrderLink(
            None, None, "the order with the accession number is another patient's", hold=True
        )
    encounter = order.get("encounter") or {}
    enc = {"reference": encounter["reference"]} if encounter.get("reference") else None
    return OrderLink({"reference": f"ServiceRequest/{order['id']}"}, enc, "order linked")


def _unknown_order(ident: tuple[str, str], config: FhirMappingConfig) -> OrderLink:
    policy = config.unknown_order_policy
    if policy is UnknownOrderPolicy.HOLD:
        return OrderLink(None, None, "order not found in the EHR", hold=True)
    if policy is UnknownOrderPolicy.REFERENCE:
        logical = {
            "type": "ServiceRequest",
            "identifier": {
                "system": ident[0],
                "value": ident[1],
                "type": {"coding": [codes.ACCESSION_TYPE]},
            },
        }
        return OrderLink(logical, None, "order not found: referenced by accession number")
    return OrderLink(None, None, "order not found in the EHR: basedOn left out")
