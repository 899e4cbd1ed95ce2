"""Configuration of the FHIR mapping: identifier systems and policies (plain values, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class UnknownPatientPolicy(StrEnum):
    """What to do when the EHR has no Patient with the study's patient identifier.

    ``HOLD``: post nothing; the worker records the study as held for an administrator.
    ``REFERENCE``: post the report with a logical reference by identifier
    (``Reference.identifier``), so the EHR can link it when the patient appears.
    The gateway never creates Patient resources.
    """

    HOLD = "hold"
    REFERENCE = "reference"


@dataclass(frozen=True)
class FhirMappingConfig:
    """Identifier systems and policies for the FHIR output.

    The default systems are URNs owned by this project; a site sets its own (usually an
    ``urn:oid:`` under the hospital's root, or an https URL it controls).
    """

    # System of the patient identifier (MRN) that DICOM PatientID values belong to. Empty:
    # use the study's Issuer of Patient ID as the system when present, else the patient cannot
    # be identified and the report is held.
    patient_identifier_system: str = ""
    unknown_patient_policy: UnknownPatientPolicy = UnknownPatientPolicy.HOLD
    # Our own identifiers: reports, observations and provenance records are found again by these
    # (conditional create / update), so a re-sent study never makes a second report.
    report_identifier_system: str = "urn:cxr-gateway:report"
    # The model content hash identifies the algorithm Device.
    device_identifier_system: str = "urn:cxr-gateway:model-sha256"
    # System of accession numbers (the RIS/order filler's); empty = identifier without a system.
    accession_identifier_system: str = ""
    # DICOM dates and times carry no zone; FHIR needs one on any dateTime with a time.
    timezone: str = "UTC"
    # Post a DiagnosticReport saying "no result" (and why) when no image could be used.
    post_no_result: bool = True

    def __post_init__(self) -> None:
        for name in ("report_identifier_system", "device_identifier_system"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if "|" in self.patient_identifier_system or "|" in self.report_identifier_system:
            raise ValueError("identifier systems must not contain '|'")
        # Accept the plain string from settings as well as the enum.
        object.__setattr__(
            self, "unknown_patient_policy", UnknownPatientPolicy(self.unknown_patient_policy)
        )
