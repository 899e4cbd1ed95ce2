"""The HL7 v2 delivery: the finding as ORU^R01 (gateway.deliver.hl7_message) to one MLLP
destination of CXR_HL7_DESTINATIONS (gateway.deliver.mllp), its ACK deciding the outcome.

Every attempt is one audit event (``hl7.delivered``, ``delivery.retry_scheduled`` or
``delivery.failed``) carrying the message control ID sent and the ACK's code and control ID
(or none when no ACK came), never the message itself. A retry re-sends the same message with
the same control ID; a TLS destination is only ever reached over TLS.
"""

from __future__ import annotations

import ssl
from typing import Any

from pydicom.dataset import Dataset

from gateway.deliver.deliveries import DeliveryJob, PermanentDeliveryError, source_headers
from gateway.deliver.dicom_store import client_tls_context
from gateway.deliver.hl7_message import (
    Envelope,
    Hl7BuildError,
    Order,
    build_oru,
    control_id,
)
from gateway.deliver.mllp import PERMANENT, Endpoint, MllpError, exchange, parse_ack
from gateway.deliver.sr import referenced_requests
from gateway.settings import Hl7Destination, Settings
from inference.finding import StudyFinding


def order_of(finding: StudyFinding, headers: list[Dataset]) -> Order:
    """The order of the study's images: the first Referenced Request the SR would carry (from
    the Request Attributes Sequence, else the Accession Number); the finding's accession number
    when no header names one."""
    study_uid = finding.study.study_instance_uid
    own = [h for h in headers if str(h.get("StudyInstanceUID", "")) == study_uid]
    requests = referenced_requests(own, study_uid)
    if not requests:
        return Order(accession_number=finding.study.accession_number)
    item = requests[0]
    codes = list(item.get("RequestedProcedureCodeSequence", None) or [])
    procedure = None
    if codes:
        code = codes[0]
        procedure = (str(code.CodeValue), str(code.CodeMeaning), str(code.CodingSchemeDesignator))
    return Order(
        placer_order_number=str(item.PlacerOrderNumberImagingServiceRequest or ""),
        filler_order_number=str(item.FillerOrderNumberImagingServiceRequest or ""),
        accession_number=str(item.AccessionNumber or "") or finding.study.accession_number,
        requested_procedure_id=str(item.RequestedProcedureID or ""),
        procedure=procedure,
    )


def tls_context(config: Hl7Destination) -> ssl.SSLContext | None:
    """The destination's TLS context (built per attempt, so renewed files are read), or None.
    Raises PermanentDeliveryError when a file cannot be loaded."""
    if not config.tls:
        return None
    try:
        return client_tls_context(
            ca_file=config.tls_ca, cert_file=config.tls_cert, key_file=config.tls_key
        )
    except (OSError, ssl.SSLError) as exc:
        raise PermanentDeliveryError(
            f"TLS files of HL7 destination {config.name!r} cannot be loaded: {exc}"
        ) from exc


class Hl7Sender:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.destinations = {d.name: d for d in settings.hl7_destinations}

    def envelope(self, finding: StudyFinding, config: Hl7Destination) -> Envelope:
        report = finding.report_id or finding.study.study_instance_uid
        return Envelope(
            control_id=control_id(report, config.name),
            sending_application=self.settings.hl7_sending_application,
            sending_facility=self.settings.hl7_sending_facility,
            receiving_application=config.receiving_application,
            receiving_facility=config.receiving_facility,
            patient_identifier_system=self.settings.fhir_patient_identifier_system,
            corrects_control_id=(
                control_id(finding.previous_report_id, config.name)
                if finding.previous_report_id
                else ""
            ),
        )

    def __call__(self, job: DeliveryJob) -> dict[str, Any]:
        config = self.destinations.get(job.destination)
        if config is None:
            raise PermanentDeliveryError(
                f"HL7 destination {job.destination!r} is no longer configured"
            )
        finding = job.finding
        envelope = self.envelope(finding, config)
        try:
            message = build_oru(finding, order_of(finding, source_headers(job.paths)), envelope)
        except Hl7BuildError as exc:
            raise PermanentDeliveryError(f"ORU^R01 not built: {exc}") from exc
        sent = {
            "message_control_id": envelope.control_id,
            "result_status": "C" if envelope.corrects_control_id else "P",
        }
        endpoint = Endpoint(
            host=config.host,
            port=config.port,
            timeout=config.timeout_seconds,
            tls=tls_context(config),
            server_hostname=config.tls_server_name or config.host,
        )
        try:
            ack = parse_ack(
                exchange(endpoint, message.encode("utf-8")), expected_id=envelope.control_id
            )
        except MllpError as exc:
            exc.detail = {**sent, "ack_code": "none", **exc.detail}
            raise
        outcome = {**sent, **ack.audit()}
        if ack.accepted:
            return outcome
        if ack.code in PERMANENT:
            raise PermanentDeliveryError(
                f"the receiver answered {ack.code}: not sent again (docs/results.md)", outcome
            )
        raise MllpError(f"the receiver answered {ack.code}: sent again later", outcome)
