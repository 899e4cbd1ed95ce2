"""HL7 v2 results end to end: a study in through the listener (DCMTK storescu), Redis, a real
worker running the model, ORU^R01 out over MLLP to real receivers (python-hl7's MLLP server in
its own process, tests.hl7_receiver): one message per destination and study version, "no
result" for an adult film, a receiver down then up gets each once, a new image makes a corrected
result, an AE is not sent again, a TLS destination with a wrong CA never gets it."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hl7
import pytest
from pydicom import dcmread

from tests import dicom_files as files
from tests.gateway.helpers import Recorded, start_pipeline, wait_until
from tests.hl7_peer import MllpReceiver, mllp_receiver
from tests.peers import GatewayProcess, Redis, missing_peer, storescu
from tests.pki import make_ca, make_leaf

pytestmark = pytest.mark.slow

MRN_SYSTEM = "urn:oid:1.2.826.0.1.3680043.8.498.77"


@pytest.fixture
def gateway(
    tmp_path: Path, redis_server: Redis, model_dir: Path
) -> Iterator[Callable[..., tuple[Recorded, list[GatewayProcess], int]]]:
    procs: list[GatewayProcess] = []

    def start(destinations: list[dict[str, Any]]) -> tuple[Recorded, list[GatewayProcess], int]:
        db, listener = start_pipeline(
            tmp_path,
            model_dir,
            redis_server.url,
            procs,
            CXR_FHIR_PATIENT_IDENTIFIER_SYSTEM=MRN_SYSTEM,
            CXR_HL7_DESTINATIONS=json.dumps(destinations),
        )
        return db, procs, listener.dicom_port

    yield start
    for p in procs:
        p.stop()


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[list[MllpReceiver]]:
    started: list[MllpReceiver] = []
    yield started
    for receiver in started:
        receiver.stop()


def destination(name: str, receiver: MllpReceiver, **extra: Any) -> dict[str, Any]:
    return {"name": name, "host": "127.0.0.1", "port": receiver.port, **extra}


def send_study(port: int, tmp_path: Path) -> None:
    (path,) = files.study_files(files.CHILD_CR, tmp_path / "study", 1)
    assert storescu(port, [path]).returncode == 0


def details(db: Recorded, kind: str, name: str) -> list[dict[str, Any]]:
    found = [json.loads(e.detail) for e in db.events(kind)]
    return [d for d in found if d["destination"] == name]


def by_finding(receiver: MllpReceiver) -> dict[str, list[hl7.Message]]:
    """The receiver's messages by the finding's coded value (OBX-5 of SNOMED CT 233604007)."""
    out: dict[str, list[hl7.Message]] = {}
    for message in receiver.messages():
        (finding,) = [s for s in message.segments("OBX") if str(s(3)(1)(1)) == "233604007"]
        out.setdefault(str(finding(5)(1)(1)), []).append(message)
    return out


def notes(message: hl7.Message) -> str:
    return " ".join(str(message.unescape(str(s(3)))) for s in message.segments("NTE"))


def test_one_oru_per_destination_and_a_receiver_down_then_up_gets_it_once(
    gateway: Callable[..., Any], receivers: list[MllpReceiver], tmp_path: Path
) -> None:
    ris = mllp_receiver(tmp_path / "ris")
    ehr = mllp_receiver(tmp_path / "ehr", start=False)  # down at first
    receivers.extend([ris, ehr])
    db, procs, port = gateway(
        [destination("ris", ris), destination("ehr-hl7", ehr, receiving_application="EPIC")]
    )
    child = files.study_files(files.CHILD_CR, tmp_path / "child", 2)
    adult = files.study_files(files.CHEST_CR, tmp_path / "adult", 1)  # declined: no result
    assert storescu(port, [child[0], *adult]).returncode == 0
    source = dcmread(child[0], stop_before_pixels=True)
    wait_until(lambda: len(details(db, "hl7.delivered", "ris")) == 2, 180, "ORUs to ris", procs)
    wait_until(
        lambda: len(details(db, "delivery.retry_scheduled", "ehr-hl7")) >= 4, 60, "retries", procs
    )
    ehr.start()
    wait_until(lambda: len(details(db, "hl7.delivered", "ehr-hl7")) == 2, 60, "ORUs to ehr", procs)
    time.sleep(3)  # several reconcile passes: nothing is sent again
    assert len(ris.messages()) == 2 and len(ehr.messages()) == 2

    retries = details(db, "delivery.retry_scheduled", "ehr-hl7")
    assert all("cannot connect" in r["error"] and r["ack_code"] == "none" for r in retries)
    for delivered in details(db, "hl7.delivered", "ehr-hl7"):
        mine = [r for r in retries if r["delivery_id"] == delivered["delivery_id"]]
        assert delivered["attempt"] == len(mine) + 1 >= 2 and delivered["ack_code"] == "AA"
        assert {r["message_control_id"] for r in mine} == {delivered["message_control_id"]}

    for receiver, application in ((ris, ""), (ehr, "EPIC")):
        found = by_finding(receiver)
        (result,) = found.get("52101004", []) + found.get("2667000", [])
        (no_result,) = found["373068000"]  # Undetermined
        assert str(result.segment("MSH")(5)) == application
        assert str(result.segment("MSH")(12)) == "2.5.1"
        pid = result.segment("PID")
        assert str(pid(3)(1)(1)) == str(source.PatientID)
        assert str(pid(3)(1)(4)) == f"&{MRN_SYSTEM.removeprefix('urn:oid:')}&ISO"
        assert str(result.segment("OBR")(18)) == str(source.AccessionNumber)
        assert str(result.segment("OBR")(25)) == "P"
        probability = [s for s in result.segments("OBX") if str(s(3)(1)(1)) == "122157"]
        assert 0.0 <= float(str(probability[0](5))) <= 1.0
        assert "No AI result" in notes(no_result)
        assert not [s for s in no_result.segments("OBX") if str(s(3)(1)(1)) == "122157"]
    ids = {str(m.segment("MSH")(10)) for r in (ris, ehr) for m in r.messages()}
    assert len(ids) == 4  # one control ID per message

    # A new image of the child's study makes version 2: a corrected result naming the first.
    first = [by_finding(r) for r in (ris, ehr)]
    assert storescu(port, [child[1]]).returncode == 0
    wait_until(lambda: len(db.events("hl7.delivered")) == 6, 180, "corrected results", procs)
    for receiver, before in zip((ris, ehr), first, strict=True):
        (earlier,) = before.get("52101004", []) + before.get("2667000", [])
        corrected = receiver.messages()[-1]
        assert str(corrected.segment("OBR")(25)) == "C"
        assert str(corrected.segment("OBR")(3)) == str(earlier.segment("OBR")(3))
        assert f"message control ID {earlier.segment('MSH')(10)}" in notes(corrected)


def test_ae_is_not_sent_again_and_a_wrong_ca_never_gets_the_message(
    gateway: Callable[..., Any], receivers: list[MllpReceiver], tmp_path: Path
) -> None:
    if shutil.which("openssl") is None:
        missing_peer("openssl is not installed")
    site_ca = make_ca(tmp_path, "site-ca")
    _, other_ca = make_ca(tmp_path, "other-ca")
    cert, key = make_leaf(tmp_path, "ehr.test", site_ca, "DNS:ehr.test,IP:127.0.0.1")
    rejecting = mllp_receiver(tmp_path / "ae", "--ack", "AE")
    secure = mllp_receiver(tmp_path / "tls", "--tls-cert", str(cert), "--tls-key", str(key))
    receivers.extend([rejecting, secure])
    db, procs, port = gateway(
        [
            destination("ae", rejecting),
            destination("tls", secure, tls=True, tls_ca=str(other_ca)),  # not the site's CA
        ]
    )
    send_study(port, tmp_path)
    wait_until(lambda: len(details(db, "delivery.failed", "ae")) == 1, 180, "AE failed", procs)
    wait_until(
        lambda: len(details(db, "delivery.retry_scheduled", "tls")) >= 2, 60, "TLS retries", procs
    )
    time.sleep(3)
    (failed,) = details(db, "delivery.failed", "ae")
    assert failed["ack_code"] == "AE" and failed["attempt"] == 1
    assert len(rejecting.messages()) == 1
    for retry in details(db, "delivery.retry_scheduled", "tls"):
        assert "certificate is not accepted for '127.0.0.1'" in retry["error"]
        assert retry["ack_code"] == "none"
    assert secure.messages() == []
    assert db.count("hl7.delivered") == 0
