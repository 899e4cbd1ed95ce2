"""Pure functions from a study finding to FHIR R4 resources and transaction bundles (no I/O).

The worker's calls, in order (``gateway.deliver.channels.FhirSender``)::

    ident = patient_identifier(finding, config)          # None: nothing to resolve
    patient = client.find_patient(ident.system, ident.value) if ident else None
    orders = client.search_by_identifier("ServiceRequest", *order_identifier(...))
    versions = client.report_versions(*report_search_identifier(...))  # version > 1 only
    plan = plan_delivery(finding, config, ehr=EhrRecords(patient, orders, versions))
    if plan.status is DeliveryStatus.READY:
        client.post_transaction(plan.bundle)
    else:
        audit(plan.status, plan.reason)                  # held for a person, or skipped
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
from fhir_mappings.config import (
    FhirMappingConfig,
    ReportStatus,
    UnknownOrderPolicy,
    UnknownPatientPolicy,
)
from fhir_mappings.ehr import EhrRecords, order_identifier, report_search_identifier
from fhir_mappings.validate import FhirMappingError, validate_r4_bundle

__all__ = [
    "DeliveryStatus",
    "EhrRecords",
    "FhirDeliveryPlan",
    "FhirMappingConfig",
    "FhirMappingError",
    "PatientIdentifier",
    "ReportStatus",
    "UnknownOrderPolicy",
    "UnknownPatientPolicy",
    "build_transaction_bundle",
    "order_identifier",
    "patient_identifier",
    "plan_delivery",
    "report_search_identifier",
    "subject_reference",
    "validate_r4_bundle",
]
