"""Pure functions from a study finding to FHIR R4 resources and transaction bundles (no I/O).

The worker's calls, in order::

    ident = patient_identifier(finding, config)          # None: nothing to resolve
    pid = client.resolve_patient(ident.system, ident.value) if ident else None
    plan = plan_delivery(finding, config, resolved_patient_id=pid)
    if plan.status is DeliveryStatus.READY:
        client.post_transaction(plan.bundle)
    else:
        audit(plan.status, plan.reason)                  # held for an admin, or skipped
"""

from fhir_mappings.bundle import (
    DeliveryStatus,
    FhirDeliveryPlan,
    PatientIdentifier,
    build_transaction_bundle,
    patient_identifier,
    plan_delivery,
    subject_reference,
)
from fhir_mappings.config import FhirMappingConfig, UnknownPatientPolicy
from fhir_mappings.validate import FhirMappingError, validate_r4_bundle

__all__ = [
    "DeliveryStatus",
    "FhirDeliveryPlan",
    "FhirMappingConfig",
    "FhirMappingError",
    "PatientIdentifier",
    "UnknownPatientPolicy",
    "build_transaction_bundle",
    "patient_identifier",
    "plan_delivery",
    "subject_reference",
    "validate_r4_bundle",
]
