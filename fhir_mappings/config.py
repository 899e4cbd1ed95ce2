"""Configuration of the FHIR mapping: identifier systems and policies (plain values, no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class UnknownPatientPolicy(StrEnum):
    """What to do when the EHR has no Patient with the study's patient identifier.

    ``HOLD``: post nothing; the worker records the study as held for an administrator.
    ``REFERENCE``: post the report with a logical reference by identifier
    (``Reference.identifier``), so the EHR can link it when the patient appears.
    The gateway never creates Patient resources.
    """

    HOLD = "hold"
    REFERENCE = "reference"


class UnknownOrderPolicy(StrEnum):
    """What to do when the EHR has no ServiceRequest with the study's accession number.

    ``OMIT``: post the report without ``basedOn`` (the delivery's audit event says so).
    ``REFERENCE``: ``basedOn`` a logical reference by the accession identifier.
    ``HOLD``: post nothing; an administrator decides.
    """

    OMIT = "omit"
    REFERENCE = "reference"
    HOLD = "hold"


class ReportStatus(StrEnum):
    """The status our reports and observations are filed with.

    FHIR R4 defines ``final`` as verified by a responsible person; AI output that nobody has
    verified is ``preliminary`` (every version). A site whose policy files it as ``final``
    anyway gets ``final``, and ``amended`` for a later version of the same report.
    """

    PRELIMINARY = "preliminary"
    FINAL = "final"


_ORG_REFERENCE = re.compile(r"^(https?://\S+/)?Organization/[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True)
class FhirMappingConfig:
    """Identifier systems and policies for the FHIR output.

    The default systems are URNs owned by this project; a site sets its own (usually an
    ``urn:oid:`` under the hospital's root, or an https URL it controls).
    """

    # System of the patient identifier (MRN) that DICOM PatientID values belong to. Empty: the
    # patient cannot be identified and the report is held (the free-text Issuer of Patient ID is
    # never used as a system URI).
    patient_identifier_system: str = ""
    unknown_patient_policy: UnknownPatientPolicy = UnknownPatientPolicy.HOLD
    # Our own identifiers: reports, observations and provenance records are found again by these
    # (conditional create / update), so a re-sent study never makes a second report.
    report_identifier_system: str = "urn:cxr-gateway:report"
    # The model content hash identifies the algorithm Device.
    device_identifier_system: str = "urn:cxr-gateway:model-sha256"
    # System of accession numbers (the RIS/order filler's); empty = identifier without a system,
    # and no order is looked up.
    accession_identifier_system: str = ""
    unknown_order_policy: UnknownOrderPolicy = UnknownOrderPolicy.OMIT
    # IANA zone of DICOM dates and times without a Timezone Offset From UTC. Empty: unknown, so
    # a time without an offset is not stated (effective is the date alone).
    timezone: str = ""
    # Post a DiagnosticReport saying "no result" (and why) when no image could be used.
    post_no_result: bool = False
    report_status: ReportStatus = ReportStatus.PRELIMINARY
    # The organization on whose behalf the AI Device acts (Provenance.agent.onBehalfOf, US Core
    # provenance-1): a reference ("Organization/123") when the EHR holds it, else an identifier
    # ("system|value"), else a contained Organization with this name.
    organization_reference: str = ""
    organization_identifier: str = ""
    organization_name: str = ""

    def __post_init__(self) -> None:
        for name in ("report_identifier_system", "device_identifier_system"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for name in (
            "patient_identifier_system",
            "report_identifier_system",
            "accession_identifier_system",
        ):
            if "|" in getattr(self, name):
                raise ValueError("identifier systems must not contain '|'")
        # Accept the plain strings from settings as well as the enums.
        object.__setattr__(
            self, "unknown_patient_policy", UnknownPatientPolicy(self.unknown_patient_policy)
        )
        object.__setattr__(
            self, "unknown_order_policy", UnknownOrderPolicy(self.unknown_order_policy)
        )
        object.__setattr__(self, "report_status", ReportStatus(self.report_status))
        check_timezone(self.timezone)
        if self.organization_reference and not _ORG_REFERENCE.match(self.organization_reference):
            raise ValueError("organization_reference must look like 'Organization/<id>'")
        if self.organization_identifier:
            system, sep, value = self.organization_identifier.partition("|")
            if not (sep and system and value) or "|" in value:
                raise ValueError("organization_identifier must be 'system|value'")


def check_timezone(name: str) -> str:
    """``name`` if it is empty or an IANA zone known here; else ValueError."""
    if name:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA time zone {name!r}") from exc
    return name
