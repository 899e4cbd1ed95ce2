"""The kinds of delivery: DICOM SR (+ optional heat-map Secondary Capture) by C-STORE or by
STOW-RS, and the FHIR transaction Bundle by HTTP, with the outbox folder as the destination when
no PACS or EHR is configured; HL7 v2 ORU^R01 over MLLP (gateway.deliver.hl7_channel) to each
HL7 destination. Built once per worker process."""

from __future__ import annotations

import json
import logging
import ssl
from io import BytesIO
from typing import Any
from zoneinfo import ZoneInfo

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from fhir_mappings import (
    DeliveryStatus,
    EhrRecords,
    FhirMappingConfig,
    FhirMappingError,
    ReportStatus,
    UnknownOrderPolicy,
    UnknownPatientPolicy,
    order_identifier,
    patient_identifier,
    plan_delivery,
    report_search_identifier,
)
from gateway.deliver.deliveries import (
    DICOMWEB,
    FHIR,
    HL7,
    OUTBOX,
    SR,
    DeliveryJob,
    HeldDelivery,
    PermanentDeliveryError,
    Sender,
    source_headers,
    write_outbox,
)
from gateway.deliver.dicom_store import (
    Destination,
    StoreFailedError,
    client_tls_context,
    send_with_retries,
)
from gateway.deliver.dicomweb_client import StowRejected, StowTarget
from gateway.deliver.dicomweb_client import store as stow
from gateway.deliver.fhir_client import (
    FhirAuthError,
    FhirClient,
    FhirClientConfig,
    FhirConfigError,
    FhirPatientAmbiguous,
    FhirRejected,
)
from gateway.deliver.sr import SRBuildError, build_sr
from gateway.settings import DicomDestination, DicomWebDestination, Settings
from inference.finding import StudyFinding

log = logging.getLogger(__name__)

# Patients in outbox bundles are referenced by identifier; without a configured system, this
# one says "a DICOM Patient ID of the sending site" (documented in the README).
OUTBOX_PATIENT_SYSTEM = "urn:cxr-gateway:dicom-patient-id"


def _encode(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def tls_for(settings: Settings, config: DicomDestination) -> ssl.SSLContext | None:
    """The TLS context for a destination with ``tls`` on (its own files, else the global
    CXR_PACS_TLS_* ones), or None for a plain one. Built per attempt, so renewed certificate
    files are read without a restart. Raises PermanentDeliveryError when a file cannot be
    loaded (a broken PEM; their existence was checked with the settings)."""
    if not config.tls:
        return None
    cert = config.tls_cert or settings.pacs_tls_cert
    key = config.tls_key if config.tls_cert else settings.pacs_tls_key
    try:
        return client_tls_context(
            ca_file=config.tls_ca or settings.pacs_tls_ca, cert_file=cert, key_file=key
        )
    except (OSError, ssl.SSLError) as exc:
        raise PermanentDeliveryError(
            f"TLS files of destination {config.name!r} cannot be loaded: {exc}"
        ) from exc


class SrSender:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.destinations = {d.name: d for d in settings.pacs_destinations}
        self.site_timezone = ZoneInfo(settings.site_timezone)

    def build(self, job: DeliveryJob) -> list[Dataset]:
        """The SR (its predecessor named by the finding) and the optional heat-map SC."""
        finding = job.finding
        headers = source_headers(job.paths)
        try:
            datasets: list[Dataset] = [build_sr(finding, headers, site_timezone=self.site_timezone)]
        except SRBuildError as exc:
            raise PermanentDeliveryError(f"SR not built: {exc}") from exc
        if self.settings.send_heatmap_sc and finding.images:
            datasets += self._heatmap_sc(job, headers)
        return datasets

    def _heatmap_sc(self, job: DeliveryJob, headers: list[Dataset]) -> list[Dataset]:
        from gateway.deliver.heatmap_sc import build_heatmap_sc

        first = job.finding.images[0].sop_instance_uid
        png = self.settings.heatmap_path / str(job.study_id) / f"{first}.png"
        source = next((h for h in headers if str(h.SOPInstanceUID) == first), None)
        if source is None or not png.exists():
            return []
        return [build_heatmap_sc(job.finding, source, png, site_timezone=self.site_timezone)]

    def __call__(self, job: DeliveryJob) -> dict[str, Any]:
        if not job.finding.has_result and not self.settings.send_no_result_sr:
            return {"skipped": "no result and CXR_SEND_NO_RESULT_SR is off"}
        datasets = self.build(job)
        sr = datasets[0]
        remote = {
            "sr_sop_instance_uid": str(sr.SOPInstanceUID),
            "sr_series_instance_uid": str(sr.SeriesInstanceUID),
        }
        if job.destination == OUTBOX:
            name = f"{job.finding.study.study_instance_uid}_v{job.finding.version}"
            path = write_outbox(self.settings.outbox_path, f"{name}_sr.dcm", _encode(sr))
            for i, extra in enumerate(datasets[1:], start=1):
                write_outbox(self.settings.outbox_path, f"{name}_sc{i}.dcm", _encode(extra))
            return {**remote, "file": path.name}
        config = self.destinations.get(job.destination)
        if config is None:
            raise PermanentDeliveryError(f"destination {job.destination!r} is no longer configured")
        # A destination that asks for TLS gets TLS or nothing: never a plain association.
        destination = Destination(
            ae_title=config.ae_title,
            host=config.host,
            port=config.port,
            calling_ae_title=self.settings.ae_title,
            tls=tls_for(self.settings, config),
            server_hostname=config.tls_server_name or config.host,
        )
        try:
            send_with_retries(destination, datasets, attempts=2, backoff=0.5)
        except StoreFailedError as exc:
            if not exc.transient:
                statuses = [f"0x{r.status:04X}" for r in exc.failed if r.status is not None]
                raise PermanentDeliveryError(f"PACS refused the SR: {statuses}") from exc
            raise
        return remote


def stow_target(settings: Settings, config: DicomWebDestination) -> StowTarget:
    return StowTarget(
        url=config.url,
        auth=config.auth,
        username=config.username,
        password_file=config.password_file,
        token_file=config.token_file,
        ca_file=config.ca_file,
        timeout=settings.dicomweb_timeout_seconds,
    )


class DicomWebSender:
    """The SR (and heat-map SC), built as for C-STORE, stored by STOW-RS on a DICOMweb server."""

    def __init__(self, settings: Settings, sr: SrSender) -> None:
        self.settings = settings
        self.sr = sr
        self.destinations = {d.name: d for d in settings.dicomweb_destinations}

    def __call__(self, job: DeliveryJob) -> dict[str, Any]:
        if not job.finding.has_result and not self.settings.send_no_result_sr:
            return {"skipped": "no result and CXR_SEND_NO_RESULT_SR is off"}
        config = self.destinations.get(job.destination)
        if config is None:
            raise PermanentDeliveryError(f"destination {job.destination!r} is no longer configured")
        datasets = self.sr.build(job)
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        try:
            result = stow(stow_target(self.settings, config), [_encode(d) for d in datasets], uids)
        except StowRejected as exc:
            raise PermanentDeliveryError(
                f"DICOMweb server refused the SR: {exc}", exc.detail
            ) from exc
        sr = datasets[0]
        return {
            "sr_sop_instance_uid": str(sr.SOPInstanceUID),
            "sr_series_instance_uid": str(sr.SeriesInstanceUID),
            "instances": len(datasets),
            "http_status": result.http_status,
        }


def mapping_config(settings: Settings, *, outbox: bool) -> FhirMappingConfig:
    system = settings.fhir_patient_identifier_system
    return FhirMappingConfig(
        patient_identifier_system=system or (OUTBOX_PATIENT_SYSTEM if outbox else ""),
        unknown_patient_policy=(
            UnknownPatientPolicy.REFERENCE
            if outbox
            else UnknownPatientPolicy(settings.fhir_unknown_patient_policy)
        ),
        report_identifier_system=settings.fhir_report_identifier_system,
        device_identifier_system=settings.fhir_device_identifier_system,
        accession_identifier_system=settings.fhir_accession_identifier_system,
        # The outbox has no EHR to look orders up in: a logical reference when it can.
        unknown_order_policy=(
            UnknownOrderPolicy.REFERENCE
            if outbox
            else UnknownOrderPolicy(settings.fhir_unknown_order_policy)
        ),
        report_status=ReportStatus(settings.fhir_report_status),
        organization_reference=settings.fhir_organization_reference,
        organization_identifier=settings.fhir_organization_identifier,
        organization_name=settings.fhir_organization_name,
        timezone=settings.site_timezone,
        post_no_result=settings.fhir_post_no_result,
    )


def client_config(settings: Settings) -> FhirClientConfig:
    return FhirClientConfig(
        base_url=settings.fhir_base_url,
        auth=settings.fhir_auth,
        bearer_token=settings.fhir_bearer_token.get_secret_value(),
        token_url=settings.fhir_token_url,
        client_id=settings.fhir_client_id,
        client_secret=settings.fhir_client_secret.get_secret_value(),
        scope=settings.fhir_scope,
        private_key_file=str(settings.fhir_private_key_file or ""),
        key_id=settings.fhir_key_id,
        jwt_alg=settings.fhir_jwt_alg,
        verify_tls=settings.fhir_verify_tls,
        ca_bundle=settings.fhir_ca_bundle,
        read_timeout=settings.fhir_timeout_seconds,
        max_attempts=3,
    )


class FhirSender:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: FhirClient | None = None

    @property
    def client(self) -> FhirClient:
        if self._client is None:
            self._client = FhirClient(client_config(self.settings))
        return self._client

    def __call__(self, job: DeliveryJob) -> dict[str, Any]:
        try:
            return self._deliver(job)
        except FhirConfigError as exc:
            raise PermanentDeliveryError(f"FHIR client misconfigured: {exc}") from exc
        except FhirAuthError as exc:
            raise PermanentDeliveryError(
                f"EHR authentication failed: {exc}",
                {"http_status": exc.status, "operation_outcome": exc.outcome_text},
            ) from exc
        except FhirRejected as exc:
            raise PermanentDeliveryError(
                f"EHR rejected the request (HTTP {exc.status})",
                {"http_status": exc.status, "operation_outcome": exc.outcome_text},
            ) from exc

    def _deliver(self, job: DeliveryJob) -> dict[str, Any]:
        outbox = job.destination == OUTBOX
        config = mapping_config(self.settings, outbox=outbox)
        ehr = EhrRecords() if outbox else look_up(self.client, job.finding, config)
        try:
            plan = plan_delivery(job.finding, config, ehr=ehr)
        except FhirMappingError as exc:
            raise PermanentDeliveryError(f"FHIR bundle not valid R4: {exc}") from exc
        if plan.status is DeliveryStatus.HELD:
            raise HeldDelivery(plan.reason)
        if plan.status is DeliveryStatus.SKIPPED or plan.bundle is None:
            return {"skipped": plan.reason}
        if outbox:
            name = f"{job.finding.study.study_instance_uid}_v{job.finding.version}_fhir.json"
            data = json.dumps(plan.bundle, indent=2, sort_keys=True).encode()
            return {"file": write_outbox(self.settings.outbox_path, name, data).name, **plan.notes}
        result = self.client.post_transaction(plan.bundle)
        # The notes (subject, order, revises) go into the fhir.delivered audit event.
        return {
            "diagnostic_report": result.ids("DiagnosticReport"),
            "observations": result.ids("Observation"),
            "created": result.created_count,
            **plan.notes,
        }


def look_up(client: FhirClient, finding: StudyFinding, config: FhirMappingConfig) -> EhrRecords:
    """What the EHR holds for the finding: the Patient by identifier, the ServiceRequests by
    accession number, and (for a later version) our DiagnosticReport's history.

    Raises HeldDelivery when several Patients have the identifier; the client's errors."""
    ident = patient_identifier(finding, config)
    try:
        patient = client.find_patient(ident.system, ident.value) if ident else None
    except FhirPatientAmbiguous as exc:
        raise HeldDelivery(str(exc)) from exc
    order = order_identifier(finding, config)
    orders = client.search_by_identifier("ServiceRequest", *order) if order else []
    versions: list[dict[str, Any]] = []
    if finding.version > 1:
        versions = client.report_versions(*report_search_identifier(config, finding))
    return EhrRecords(patient, tuple(orders), tuple(versions), consulted=True)


def announce_report_status(
    settings: Settings, sessions: sessionmaker[Session], *, actor: str
) -> None:
    """Log and audit (``settings.report_status_final``) a site that files unverified AI output
    as ``final``; call once when a worker starts. Nothing happens for the default."""
    if settings.fhir_report_status != "final":
        return
    from gateway.audit import record_event
    from gateway.db.session import transaction

    log.warning(
        "CXR_FHIR_REPORT_STATUS=final: unverified AI reports are filed in the EHR as final "
        "(FHIR R4: verified by a responsible person); later versions as amended"
    )
    with transaction(sessions) as session:
        record_event(
            session=session,
            kind="settings.report_status_final",
            outcome="warning",
            actor=actor,
            detail={
                "setting": "CXR_FHIR_REPORT_STATUS",
                "value": "final",
                "default": "preliminary",
            },
        )


def build_senders(settings: Settings) -> dict[str, Sender]:
    from gateway.deliver.hl7_channel import Hl7Sender

    sr = SrSender(settings)
    return {
        SR: sr,
        DICOMWEB: DicomWebSender(settings, sr),
        FHIR: FhirSender(settings),
        HL7: Hl7Sender(settings),
    }
