"""HL7 v2 results end to end: a study in through the listener (DCMTK storescu), Redis, a real
worker running the model, ORU^R01 out over MLLP to real receivers (python-hl7's MLLP server in
its own process, tests.hl7_receiver): one message per destination, a receiver down then up
gets it once, an AE is not sent again, a TLS destination with a wrong CA never gets it."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests import dicom_files as files
from tests.gateway.helpers import Recorded, process_env, wait_until
from tests.hl7_peer import MllpReceiver, mllp_receiver
from tests.peers import GatewayProcess, Redis, missing_peer, start_gateway, storescu
from tests.sr.test_tls_delivery import _ca, _leaf

pytestmark = pytest.mark.slow

MRN_SYSTEM = "urn:oid:1.2.826.0.1.3680043.8.498.77"


@pytest.fixture
def gateway(
    tmp_path: Path, redis_server: Redis, model_dir: Path
) -> Iterator[Callable[..., tuple[Recorded, list[GatewayProcess], int]]]:
    procs: list[GatewayProcess] = []

    def start(destinations: list[dict[str, Any]]) -> tuple[Recorded, list[GatewayProcess], int]:
        database = f"sqlite:///{tmp_path / 'gateway.sqlite3'}"
        env = process_env(
            tmp_path,
            model_dir,
            database,
            redis_server.url,
            CXR_DELIVERY_BACKOFF_SECONDS="1",
            CXR_DELIVERY_BACKOFF_MAX_SECONDS="2",
            CXR_FHIR_PATIENT_IDENTIFIER_SYSTEM=MRN_SYSTEM,
            CXR_HL7_DESTINATIONS=json.dumps(destinations),
        )
        listener = start_gateway(env, tmp_path / "listen.log", ("listen",))
        procs.extend([listener, start_gateway(env, tmp_path / "worker.log", ("worker",))])
        return Recorded(database), procs, listener.dicom_port

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


def send_study(port: int, tmp_path: Path) -> Path:
    (path,) = files.study_files(files.CHILD_CR, tmp_path / "study", 1)
    assert storescu(port, [path]).returncode == 0
    return path


def details(db: Recorded, kind: str, name: str) -> list[dict[str, Any]]:
    found = [json.loads(e.detail) for e in db.events(kind)]
    return [d for d in found if d["destination"] == name]


def test_one_oru_per_destination_and_a_receiver_down_then_up_gets_it_once(
    gateway: Callable[..., Any], receivers: list[MllpReceiver], tmp_path: Path
) -> None:
    ris = mllp_receiver(tmp_path / "ris")
    ehr = mllp_receiver(tmp_path / "ehr", start=False)  # down at first
    receivers.extend([ris, ehr])
    db, procs, port = gateway(
        [destination("ris", ris), destination("ehr", ehr, receiving_application="EPIC")]
    )
    source = dcmread(send_study(port, tmp_path), stop_before_pixels=True)
    wait_until(lambda: len(details(db, "hl7.delivered", "ris")) == 1, 180, "ORU to ris", procs)
    wait_until(
        lambda: len(details(db, "delivery.retry_scheduled", "ehr")) >= 2, 60, "retries", procs
    )
    ehr.start()
    wait_until(lambda: len(details(db, "hl7.delivered", "ehr")) == 1, 60, "ORU to ehr", procs)
    time.sleep(3)  # several reconcile passes: nothing is sent again
    assert len(ris.messages()) == 1 and len(ehr.messages()) == 1
    assert len(db.events("hl7.delivered")) == 2

    retries = details(db, "delivery.retry_scheduled", "ehr")
    delivered = details(db, "hl7.delivered", "ehr")[0]
    assert all("cannot connect" in r["error"] for r in retries)
    assert delivered["attempt"] == len(retries) + 1 and delivered["ack_code"] == "AA"
    assert {r["message_control_id"] for r in retries} == {delivered["message_control_id"]}

    for receiver, application in ((ris, ""), (ehr, "EPIC")):
        (message,) = receiver.messages()
        assert str(message.segment("MSH")(5)) == application
        assert str(message.segment("MSH")(12)) == "2.5.1"
        pid = message.segment("PID")
        assert str(pid(3)(1)(1)) == str(source.PatientID)
        assert str(pid(3)(1)(4)) == f"&{MRN_SYSTEM.removeprefix('urn:oid:')}&ISO"
        assert str(message.segment("OBR")(18)) == str(source.AccessionNumber)
        assert str(message.segment("OBR")(25)) == "P"
        obx = {str(s(3)(1)(1)): s for s in message.segments("OBX")}
        assert str(obx["233604007"](3)) == "233604007^Pneumonia^SCT"
        assert 0.0 <= float(str(obx["122157"](5))) <= 1.0
    ids = {str(r.messages()[0].segment("MSH")(10)) for r in (ris, ehr)}
    assert len(ids) == 2  # one control ID per message


def test_ae_is_not_sent_again_and_a_wrong_ca_never_gets_the_message(
    gateway: Callable[..., Any], receivers: list[MllpReceiver], tmp_path: Path
) -> None:
    if shutil.which("openssl") is None:
        missing_peer("openssl is not installed")
    site_ca = _ca(tmp_path, "site-ca")
    _, other_ca = _ca(tmp_path, "other-ca")
    cert, key = _leaf(tmp_path, "ehr.test", site_ca, "DNS:ehr.test,IP:127.0.0.1")
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
