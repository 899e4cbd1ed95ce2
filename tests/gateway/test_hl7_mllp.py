"""The HL7 delivery against a real MLLP receiver (python-hl7's MLLP server in its own process,
tests.hl7_receiver): what it receives, what each ACK code does to the delivery, the deadline,
the ACK size bound and TLS. One delivery attempt at a time (gateway.deliver.deliveries.attempt)
on a real database; no model needed."""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from gateway.db.migrate import upgrade
from gateway.db.models import AuditEvent, Delivery, Instance, Study, utcnow
from gateway.db.session import make_engine, make_session_factory, transaction
from gateway.deliver.deliveries import HL7, attempt, targets
from gateway.deliver.hl7_channel import Hl7Sender
from gateway.deliver.mllp import Endpoint, MllpError, exchange
from gateway.errors import ConfigurationError
from gateway.settings import Settings
from inference.finding import ModelInfo, SourceImage, StudyContext, StudyFinding
from tests import dicom_files as files
from tests.hl7_peer import MllpReceiver, mllp_receiver
from tests.pki import Pki, make_pki

MODEL = ModelInfo(name="cxr-pneumonia-v1", version="1.6.0", content_hash="0f" * 32)
MRN_SYSTEM = "urn:oid:1.2.826.0.1.3680043.8.498.77"
REPORT_ID = "5b2f1d7e-8a43-4f0e-9c51-3c9f0d2b7a61"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "ehr.test")


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[Callable[..., MllpReceiver]]:
    started: list[MllpReceiver] = []

    def start(*options: str) -> MllpReceiver:
        receiver = mllp_receiver(tmp_path / f"received{len(started)}", *options)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


def source_image(tmp_path: Path) -> Path:
    """The child's chest film with an order: Request Attributes with placer and filler order
    numbers, a requested procedure ID and its LOINC code."""
    path = files.study_files(files.CHILD_CR, tmp_path / "study", 1)[0]
    ds = dcmread(path)
    request = Dataset()
    request.AccessionNumber = ds.AccessionNumber
    request.RequestedProcedureID = "RP-3"
    request.PlacerOrderNumberImagingServiceRequest = "PL-7"
    request.FillerOrderNumberImagingServiceRequest = "FI-9"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "36572-6", "LN", "XR Chest AP"
    request.RequestedProcedureCodeSequence = [code]
    request.ScheduledProcedureStepID = "SPS-1"
    ds.RequestAttributesSequence = [request]
    ds.save_as(path)
    return path


def finding_for(path: Path) -> StudyFinding:
    ds = dcmread(path, stop_before_pixels=True)
    return StudyFinding(
        study=StudyContext(
            study_instance_uid=str(ds.StudyInstanceUID),
            patient_id=str(ds.PatientID),
            patient_name=str(ds.PatientName),
            patient_birth_date=str(ds.get("PatientBirthDate", "")),
            patient_sex=str(ds.get("PatientSex", "")),
            accession_number=str(ds.AccessionNumber),
        ),
        model=MODEL,
        probability=0.91,
        present=True,
        images=(
            SourceImage(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)),
        ),
        report_id=REPORT_ID,
    )


class Bench:
    """A database with one reported study and one hl7 delivery row to ``destination``."""

    def __init__(self, settings: Settings, path: Path) -> None:
        self.settings = settings
        engine = make_engine(settings.database)
        upgrade(engine)
        self.sessions: sessionmaker[Session] = make_session_factory(engine)
        finding = finding_for(path)
        with transaction(self.sessions) as session:
            study = Study(
                study_uid=finding.study.study_instance_uid,
                version=1,
                state="reported",
                finding_json=json.dumps(finding.to_json()),
            )
            session.add(study)
            session.flush()
            image = finding.images[0]
            session.add(
                Instance(
                    study_id=study.id,
                    sop_instance_uid=image.sop_instance_uid,
                    sop_class_uid=image.sop_class_uid,
                    series_uid=image.series_instance_uid,
                    transfer_syntax="1.2.840.10008.1.2.1",
                    path=str(path),
                    size_bytes=path.stat().st_size,
                    sha256="",
                )
            )
            row = Delivery(study_id=study.id, kind=HL7, destination="ehr-hl7", state="pending")
            session.add(row)
            session.flush()
            self.delivery_id = row.id

    def attempt(self, settings: Settings | None = None) -> str:
        settings = settings or self.settings
        return attempt(self.sessions, settings, self.delivery_id, {HL7: Hl7Sender(settings)})

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        with self.sessions() as session:
            rows = session.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars()
            return [(e.kind, json.loads(e.detail)) for e in rows]

    def delivery(self) -> Delivery:
        with self.sessions() as session:
            row = session.get(Delivery, self.delivery_id)
            assert row is not None
            return row


def hl7_settings(make_settings: Callable[..., Settings], port: int, **extra: Any) -> Settings:
    destination = {"name": "ehr-hl7", "host": "127.0.0.1", "port": port, **extra}
    return make_settings(
        hl7_destinations=[destination],
        hl7_sending_facility="RADIOLOGY",
        fhir_patient_identifier_system=MRN_SYSTEM,
        delivery_max_attempts=3,
    )


def test_the_receiver_gets_one_oru_with_the_order_and_the_ack_is_audited(
    receivers: Callable[..., MllpReceiver],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    receiver = receivers()
    settings = hl7_settings(
        make_settings,
        receiver.port,
        receiving_application="EPIC",
        receiving_facility="MAIN",
    )
    bench = Bench(settings, source_image(tmp_path))
    assert bench.attempt() == "delivered"
    (message,) = receiver.messages()
    assert str(message.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    assert str(message.segment("MSH")(4)) == "RADIOLOGY"
    assert str(message.segment("MSH")(5)) == "EPIC" and str(message.segment("MSH")(6)) == "MAIN"
    pid = message.segment("PID")
    assert str(pid(3)(1)(1)) == "CHILD-0001" and str(pid(3)(1)(5)) == "MR"
    assert str(pid(3)(1)(4)) == f"&{MRN_SYSTEM.removeprefix('urn:oid:')}&ISO"
    assert str(pid(5)) == "Example^Child"
    orc, obr = message.segment("ORC"), message.segment("OBR")
    assert (str(orc(2)), str(orc(3))) == ("PL-7", "FI-9")
    assert (str(obr(2)), str(obr(3))) == ("PL-7", "FI-9")
    assert str(obr(4)) == "36572-6^XR Chest AP^LN"
    assert (str(obr(18)), str(obr(19)), str(obr(25))) == ("ACC-CHILD-1", "RP-3", "P")
    obx = {str(s(3)(1)(1)): s for s in message.segments("OBX")}
    assert str(obx["233604007"](5)) == "52101004^Present^SCT"
    assert float(str(obx["122157"](5))) == 0.91

    kind, detail = bench.events()[-1]
    assert kind == "hl7.delivered"
    assert detail["message_control_id"] == str(message.segment("MSH")(10))
    assert detail["ack_code"] == "AA" and detail["ack_control_id"]
    assert "CHILD-0001" not in json.dumps(bench.events())  # no patient data in the audit log
    assert json.loads(bench.delivery().remote_ids)["ack_code"] == "AA"


@pytest.mark.parametrize(
    ("code", "state", "event"),
    [
        ("CA", "delivered", "hl7.delivered"),
        ("AE", "failed", "delivery.failed"),
        ("CR", "failed", "delivery.failed"),
        ("AR", "retrying", "delivery.retry_scheduled"),
        ("CE", "retrying", "delivery.retry_scheduled"),
    ],
)
def test_each_ack_code_does_what_docs_results_say(
    code: str,
    state: str,
    event: str,
    receivers: Callable[..., MllpReceiver],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    receiver = receivers("--ack", code)
    bench = Bench(hl7_settings(make_settings, receiver.port), source_image(tmp_path))
    assert bench.attempt() == state
    kind, detail = bench.events()[-1]
    assert (kind, detail["ack_code"]) == (event, code)
    assert detail["message_control_id"] == str(receiver.messages()[0].segment("MSH")(10))


def test_ar_is_sent_again_with_the_same_control_id_until_attempts_run_out(
    receivers: Callable[..., MllpReceiver],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    receiver = receivers("--ack", "AR")
    bench = Bench(hl7_settings(make_settings, receiver.port), source_image(tmp_path))
    assert [bench.attempt() for _ in range(3)] == ["retrying", "retrying", "failed"]
    ids = {str(m.segment("MSH")(10)) for m in receiver.messages()}
    assert len(receiver.messages()) == 3 and len(ids) == 1
    kinds = [k for k, _ in bench.events()]
    assert kinds == ["delivery.retry_scheduled", "delivery.retry_scheduled", "delivery.failed"]
    assert "gave up after 3 attempts" in bench.delivery().last_error


def test_a_receiver_that_never_answers_meets_the_deadline(
    receivers: Callable[..., MllpReceiver],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    receiver = receivers("--silent")
    settings = hl7_settings(make_settings, receiver.port, timeout_seconds=1.0)
    bench = Bench(settings, source_image(tmp_path))
    started = time.monotonic()
    assert bench.attempt() == "retrying"
    assert time.monotonic() - started < 3.0
    _, detail = bench.events()[-1]
    assert "no ACK from" in detail["error"] and detail["ack_code"] == "none"
    assert len(receiver.messages()) == 1


def test_an_ack_past_the_bound_is_not_read(
    receivers: Callable[..., MllpReceiver],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    receiver = receivers("--ack-pad", str(100_000))
    bench = Bench(hl7_settings(make_settings, receiver.port), source_image(tmp_path))
    assert bench.attempt() == "retrying"
    assert "longer than 65536 bytes" in bench.events()[-1][1]["error"]


def test_an_ack_for_another_message_is_not_taken_as_delivery(
    receivers: Callable[..., MllpReceiver],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    receiver = receivers("--ack-for", "SOMEONE-ELSES")
    bench = Bench(hl7_settings(make_settings, receiver.port), source_image(tmp_path))
    assert bench.attempt() == "retrying"
    detail = bench.events()[-1][1]
    assert "the ACK is for another message" in detail["error"]
    assert detail["ack_for"] == "SOMEONE-ELSES" and detail["ack_code"] == "AA"


def test_a_receiver_that_is_down_is_retried(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    receiver = mllp_receiver(tmp_path / "later", start=False)
    bench = Bench(hl7_settings(make_settings, receiver.port), source_image(tmp_path))
    assert bench.attempt() == "retrying"
    assert "cannot connect" in bench.events()[-1][1]["error"]
    receiver.start()
    try:
        assert bench.attempt() == "delivered"
        assert len(receiver.messages()) == 1
    finally:
        receiver.stop()


def tls_receiver(start: Callable[..., MllpReceiver], pki: Pki) -> MllpReceiver:
    return start("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))


def test_tls_destination_gets_the_message_over_verified_tls(
    receivers: Callable[..., MllpReceiver],
    make_settings: Callable[..., Settings],
    pki: Pki,
    tmp_path: Path,
) -> None:
    receiver = tls_receiver(receivers, pki)
    settings = hl7_settings(make_settings, receiver.port, tls=True, tls_ca=str(pki.ca))
    bench = Bench(settings, source_image(tmp_path))
    assert bench.attempt() == "delivered"
    assert len(receiver.messages()) == 1


@pytest.mark.parametrize("peer", ["wrong-ca", "plain-receiver"])
def test_tls_that_fails_is_retried_and_never_sent_in_clear(
    peer: str,
    receivers: Callable[..., MllpReceiver],
    make_settings: Callable[..., Settings],
    pki: Pki,
    tmp_path: Path,
) -> None:
    if peer == "wrong-ca":
        receiver, ca = tls_receiver(receivers, pki), pki.other_ca
    else:
        receiver, ca = receivers(), pki.ca
    settings = hl7_settings(
        make_settings, receiver.port, tls=True, tls_ca=str(ca), timeout_seconds=2.0
    )
    bench = Bench(settings, source_image(tmp_path))
    assert bench.attempt() == "retrying"
    _, detail = bench.events()[-1]
    assert "MllpTlsError: TLS handshake failed" in detail["error"]
    if peer == "wrong-ca":
        assert "certificate is not accepted for '127.0.0.1'" in detail["error"]
    assert receiver.messages() == []


def test_destinations_are_checked_with_the_settings(
    make_settings: Callable[..., Settings], pki: Pki
) -> None:
    base = {"name": "ehr-hl7", "host": "127.0.0.1", "port": 2575}
    with pytest.raises(ConfigurationError, match="not tls: true"):
        make_settings(hl7_destinations=[{**base, "tls_ca": str(pki.ca)}])
    with pytest.raises(ConfigurationError, match="Extra inputs are not permitted"):
        make_settings(hl7_destinations=[{**base, "tls": True, "tls_ca_file": str(pki.ca)}])
    with pytest.raises(ConfigurationError, match="go together"):
        make_settings(hl7_destinations=[{**base, "tls": True, "tls_cert": str(pki.ca)}])
    with pytest.raises(ConfigurationError, match="duplicate names"):
        make_settings(hl7_destinations=[base, base])
    # An attempt that can outlast half the lease could be taken over and sent twice.
    with pytest.raises(ConfigurationError, match="at most half of job_lease_seconds"):
        make_settings(hl7_destinations=[{**base, "timeout_seconds": 301}])
    make_settings(hl7_destinations=[{**base, "timeout_seconds": 600}], job_lease_seconds=1200)
    settings = make_settings(hl7_destinations=[base, {**base, "name": "ris"}])
    assert settings.hl7_destinations[0].timeout_seconds == 30.0
    # One hl7 delivery per destination, beside the SR and FHIR ones; none without destinations.
    assert [t for t in targets(settings) if t[0] == HL7] == [(HL7, "ehr-hl7"), (HL7, "ris")]
    assert [t for t in targets(make_settings()) if t[0] == HL7] == []


def test_an_attempt_that_outlived_its_lease_leaves_the_next_attempts_outcome(
    receivers: Callable[..., MllpReceiver],
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """Worker A's attempt hangs past its lease; worker B claims the delivery and sends the ORU
    (acknowledged). A then fails: its outcome must not turn B's `delivered` into `retrying`,
    which would send a second ORU. It is audited as a stale attempt and dropped."""
    receiver = receivers()
    settings = hl7_settings(make_settings, receiver.port)
    bench = Bench(settings, source_image(tmp_path))

    def hangs_past_its_lease(job: Any) -> dict[str, Any]:
        with transaction(bench.sessions) as session:  # the lease runs out meanwhile
            row = session.get(Delivery, bench.delivery_id)
            assert row is not None
            row.next_attempt_at = utcnow() - dt.timedelta(seconds=1)
        assert bench.attempt() == "delivered"  # worker B
        raise TimeoutError("no ACK in time")

    outcome = attempt(bench.sessions, settings, bench.delivery_id, {HL7: hangs_past_its_lease})

    assert outcome == "stale-attempt"
    assert bench.delivery().state == "delivered" and bench.delivery().attempts == 2
    assert len(receiver.messages()) == 1
    kinds = [kind for kind, _ in bench.events()]
    assert kinds[-2:] == ["hl7.delivered", "delivery.stale_attempt"]
    stale = bench.events()[-1][1]
    assert (stale["attempt"], stale["outcome_dropped"]) == (1, "retrying")


def test_a_slow_name_lookup_counts_against_the_one_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """getaddrinfo has no timeout: a resolver that takes 3 s (a test double: no DNS server
    here) must not stretch a 0.5 s deadline."""

    def slow_lookup(*args: Any, **kwargs: Any) -> list[Any]:
        time.sleep(3)
        return []

    monkeypatch.setattr(socket, "getaddrinfo", slow_lookup)
    started = time.monotonic()
    with pytest.raises(MllpError, match=r"within 0\.5 s"):
        exchange(Endpoint("ehr.test", 2575, 0.5), b"MSH|^~\\&|")
    assert time.monotonic() - started < 1.5
