"""Validation of the R4 JSON we produce, with fhir.resources' R4B models.

fhir.resources 8.x has no FHIR R4 (4.0.1) model set: its default modules are R5 and R4B lives in
``fhir.resources.R4B``. For the resources we produce (Bundle, DiagnosticReport, Observation,
Device, Provenance) R4B is wire-compatible with R4: same element names (``imagingStudy``,
``deviceName``, ``Device.version``) and cardinalities. The R5 models would be wrong here
(``DiagnosticReport.study``, ``Device.name``), so they are never used. The JSON we send is the
dict we built (the models only check it), so the models' own serialisation (e.g. of dates) never
changes what goes on the wire. fhir.resources does not check required code values, so the few
status codes are checked here against R4's value sets.
"""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

_STATUS = {
    "DiagnosticReport": {
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "unknown",
    },
    "Observation": {
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    },
    "Device": {"active", "inactive", "entered-in-error", "unknown"},
}
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"}


class FhirMappingError(ValueError):
    """The mapping produced a resource that is not valid FHIR R4 (a bug, not a data problem)."""

    def __init__(self, message: str, *, study_uid: str = "") -> None:
        super().__init__(message)
        self.study_uid = study_uid


def validate_r4_bundle(bundle: dict[str, Any], *, study_uid: str = "") -> None:
    """Raise ``FhirMappingError`` unless ``bundle`` is a valid R4 transaction/batch Bundle."""
    try:
        Bundle.model_validate(bundle)
    except ValidationError as exc:
        # Pydantic's message quotes input values, which may be PHI: keep locations and types only.
        where = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['type']}" for err in exc.errors()
        )
        raise FhirMappingError(f"invalid FHIR R4 bundle: {where}", study_uid=study_uid) from None
    for i, entry in enumerate(bundle.get("entry", [])):
        resource = entry.get("resource", {})
        rtype = resource.get("resourceType", "")
        allowed = _STATUS.get(rtype)
        if allowed is not None and resource.get("status") not in allowed:
            raise FhirMappingError(f"entry {i}: bad {rtype}.status", study_uid=study_uid)
        if entry.get("request", {}).get("method") not in _METHODS:
            raise FhirMappingError(f"entry {i}: bad request.method", study_uid=study_uid)
